"""Reproduce the paper's Table 1 from local copies of the public CLIP checkpoints and test sets.

Layout expected (nothing is downloaded):

    CHECKPOINTS/clip-vit-base-patch32/                the pre-trained full CLIPModel (text tower,
                                                      tokenizer, preprocessor_config.json)
    CHECKPOINTS/clip-vit-base-patch32_<task>/         one fine-tuned CLIPVisionModel per task
    DATASETS/<task>/                                  each task's test set (see datasets.py)

Task folders may spell the task with '-' or '_' (``stanford-cars`` or ``stanford_cars``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from opcm_ext.errors import CheckpointError, ConfigError
from opcm_ext.evaluation.clip_eval import EncoderLoader, accuracy_from_batches, read_state_dict, resolve_device
from opcm_ext.evaluation.datasets import ClipPreprocessor, PreprocessedSet, is_dataset_folder, open_dataset, preprocess
from opcm_ext.evaluation.heads import ZeroShotHeadBuilder
from opcm_ext.evaluation.prompts import (CLASS_NAME_SOURCES, canonical_task, check_head_rows, classnames_for,
                                         load_heads, prompts_for, templates_for)

__all__ = ["PAPER_TASKS", "TASK_SETS", "MissingInputsError", "resolve_tasks", "paper_lambda", "paper_methods",
           "find_inputs", "extract_vision_base", "ClipTaskEvaluator", "run_reproduce"]

# The paper's task order, spelled as in the public checkpoints' names (tanganke/<model>_<task>).
PAPER_TASKS: tuple[str, ...] = (
    "sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd",          # TA8
    "oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100",            # +6 = 14
    "cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2",        # +6 = 20
)
TASK_SETS: dict[int, tuple[str, ...]] = {8: PAPER_TASKS[:8], 14: PAPER_TASKS[:14], 20: PAPER_TASKS}
# The paper's λ for continual Task Arithmetic (appendix C.1.1, its grid-search optimum: 0.3 on 8
# tasks, 0.1 on 14 and 20); the appendix states that continual TIES uses the same λ.
PAPER_LAMBDA: dict[int, float] = {8: 0.3, 14: 0.1, 20: 0.1}
PAPER_LAMBDA_SOURCE = "paper, appendix C.1.1: 0.3 for 8 tasks, 0.1 for 14 and 20 (TIES uses Task Arithmetic's λ)"


class MissingInputsError(CheckpointError):
    """Some checkpoints or datasets are not where the reproduction expects them (all listed)."""


def resolve_tasks(spec: str | int | Sequence[str]) -> list[str]:
    """'8' / '14' / '20' (the paper's sets) or a comma-separated / explicit list of task names."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        n = int(spec)
        if n not in TASK_SETS:
            raise ConfigError(f"the paper's task sets have 8, 14 or 20 tasks, not {n}")
        return list(TASK_SETS[n])
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("no tasks given")
    if len({canonical_task(n) for n in names}) != len(names):
        raise ConfigError(f"task names repeat: {names}")
    return names


def paper_lambda(num_tasks: int) -> float:
    """The paper's λ of both continual baselines: 0.3 up to 8 tasks, 0.1 above (its 14- and 20-task value)."""
    if num_tasks < 1:
        raise ConfigError(f"need at least one task, got {num_tasks}")
    return PAPER_LAMBDA.get(num_tasks, 0.3 if num_tasks <= 8 else 0.1)


def paper_methods(num_tasks: int, methods: Sequence[str] | None = None, lam: float | None = None,
                  compat: str | None = None) -> dict[str, dict]:
    """Each method's parameters for a Table-1 run: the defaults, with λ by task count (or ``lam``) for TA and
    TIES, and OPCM's ``compat`` mode when given (``release``: the code behind the paper's Table 1)."""
    import math

    from opcm_ext.evaluation.runner import DEFAULT_METHODS

    if lam is not None and not (math.isfinite(float(lam)) and float(lam) > 0):
        raise ConfigError(f"--lam must be a positive number, got {lam}")
    value = paper_lambda(num_tasks) if lam is None else float(lam)
    names = list(methods) if methods else list(DEFAULT_METHODS)
    unknown = [m for m in names if m not in DEFAULT_METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {list(DEFAULT_METHODS)}")
    out = {m: {**DEFAULT_METHODS[m], **({"lam": value} if "lam" in DEFAULT_METHODS[m] else {})} for m in names}
    if compat is not None and "opcm" in out:
        out["opcm"]["compat"] = compat
    return out


def _spellings(task: str) -> list[str]:
    c = canonical_task(task)
    out = [task, c, c.replace("_", "-")]
    hub = next((p for p in PAPER_TASKS if canonical_task(p) == c), None)
    if hub:
        out.insert(0, hub)
    return list(dict.fromkeys(out))


def _find(parent: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        p = parent / n
        if p.exists():
            return p
    return None


def _infer_model_name(checkpoints: Path, tasks: Sequence[str]) -> str | None:
    if not checkpoints.is_dir():
        return None
    for d in sorted(p.name for p in checkpoints.iterdir() if p.is_dir()):
        for t in tasks:
            for s in _spellings(t):
                if d.endswith("_" + s) and len(d) > len(s) + 1:
                    return d[: -len(s) - 1]
    return None


def find_inputs(checkpoints: str | Path, datasets: str | Path, tasks: Sequence[str], *,
                model_name: str | None = None, base: str | Path | None = None, split: str = "test"):
    """Locate the pre-trained CLIP model, each task's checkpoint and test set; one error lists all that is missing."""
    ck, ds = Path(checkpoints), Path(datasets)
    missing: list[str] = []
    if not ck.is_dir():
        missing.append(f"checkpoints folder {ck}")
    if not ds.is_dir():
        missing.append(f"datasets folder {ds}")
    model_name = model_name or _infer_model_name(ck, tasks) or "clip-vit-base-patch32"
    base_p = Path(base) if base is not None else ck / model_name
    if not (base_p / "config.json").exists():
        missing.append(f"pre-trained CLIP model {base_p} (a full CLIPModel folder: config.json, model.safetensors, "
                       f"tokenizer files; e.g. openai/{model_name} saved locally)")
    models, data = {}, {}
    for t in tasks:
        p = _find(ck, [f"{model_name}_{s}" for s in _spellings(t)]) if ck.is_dir() else None
        if p is None or not ((p / "model.safetensors").exists() or (p / "model.safetensors.index.json").exists()):
            what = f"checkpoint {ck / f'{model_name}_{_spellings(t)[0]}'}"
            if p is not None:
                what += " (folder exists but has no model.safetensors; convert .bin checkpoints to safetensors)"
            missing.append(what)
        else:
            models[t] = p
        d = _find(ds, _spellings(t)) if ds.is_dir() else None
        if d is None or not is_dataset_folder(d, split):
            missing.append(f"dataset {ds / _spellings(t)[0]} (an ImageFolder tree or a datasets save_to_disk folder)")
        else:
            data[t] = d
    if missing:
        raise MissingInputsError(f"{len(missing)} input(s) missing for {len(tasks)} task(s):\n  - " +
                                 "\n  - ".join(missing))
    return base_p, models, data


def extract_vision_base(clip_model: str | Path, like: str | Path, out: str | Path) -> Path:
    """Write the pre-trained CLIP vision weights under the fine-tuned checkpoints' key names (and config).

    The public fine-tuned checkpoints are ``CLIPVisionModel``s; the merge needs a base with exactly
    their tensors, so the vision tower of the full CLIP model is copied out (no arithmetic).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from opcm_ext.evaluation.clip_eval import _weight_files

    like_keys: list[str] = []
    for f in _weight_files(Path(like)):
        with safe_open(str(f), "pt") as h:
            like_keys.extend(h.keys())
    src = read_state_dict(clip_model)
    out_t = {}
    missing = []
    for k in like_keys:
        cands = [k, "vision_model." + k] if not k.startswith("vision_model.") else [k]
        hit = next((c for c in cands if c in src), None)
        if hit is None:
            missing.append(k)
        else:
            out_t[k] = src[hit].contiguous()
    if missing:
        raise CheckpointError(f"{clip_model}: lacks tensors the fine-tuned checkpoint {like} has: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(out_t, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(Path(like) / "config.json", out / "config.json")
    return out


class ClipTaskEvaluator:
    """``evaluate(checkpoint, tasks)``: zero-shot heads from the pre-trained CLIP model, test sets preprocessed once.

    Heads come from ``heads`` (a head file) when given, else are built from the curated class names
    of the paper's tasks (``class_names="fusionbench"``, count-checked against the test set) or from
    the test set's own names (``"dataset"``, and always for tasks without a curated list).
    """

    def __init__(self, clip_model: str | Path, datasets: dict[str, Path], *, device: str = "auto",
                 batch_size: int = 128, workers: int = 0, max_examples: int | None = None,
                 cache_dir: str | Path | None = None, split: str = "test", progress: bool = True,
                 class_names: str = "fusionbench", heads: str | Path | None = None):
        if class_names not in CLASS_NAME_SOURCES:
            raise ConfigError(f"class names must come from one of {CLASS_NAME_SOURCES}, got {class_names!r}")
        self.class_names = class_names
        self.heads_file = Path(heads) if heads is not None else None
        self._file_heads = load_heads(self.heads_file) if self.heads_file is not None else None
        self.clip_model = Path(clip_model)
        self.datasets = dict(datasets)
        self.device = resolve_device(device)
        self.batch_size, self.workers, self.max_examples, self.split = batch_size, workers, max_examples, split
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.progress = progress
        self.pre = ClipPreprocessor.from_model_dir(self.clip_model)
        self._loader = EncoderLoader(device=self.device, projection_from=self.clip_model)
        self._sets: dict[str, PreprocessedSet] = {}
        self._heads: dict[str, torch.Tensor] = {}
        self._builder: ZeroShotHeadBuilder | None = None

    def test_set(self, task: str) -> PreprocessedSet:
        """The task's test set, resized and cropped once (reused from ``cache_dir`` when it matches)."""
        if task not in self._sets:
            ds = open_dataset(self.datasets[task], self.split)
            if self.cache_dir is None:
                self._sets[task] = preprocess(ds, self.pre, max_examples=self.max_examples, workers=self.workers,
                                              progress=self.progress, desc=f"load {task}")
                return self._sets[task]
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            stem = self.cache_dir / canonical_task(task)
            key = {"source": ds.source, "examples": len(ds), "max_examples": self.max_examples,
                   "classnames": ds.classnames, "size": self.pre.size, "crop": list(self.pre.crop),
                   "resample": self.pre.resample}
            meta = stem.with_suffix(".json")
            if meta.exists() and json.loads(meta.read_text()) == key:
                pixels = np.load(stem.with_suffix(".npy"), mmap_mode="r")
                labels = np.load(stem.with_suffix(".labels.npy"))
                self._sets[task] = PreprocessedSet(pixels, labels, ds.classnames, ds.source)
            else:
                meta.unlink(missing_ok=True)
                pset = preprocess(ds, self.pre, cache_file=stem.with_suffix(".npy"), max_examples=self.max_examples,
                                  workers=self.workers, progress=self.progress, desc=f"load {task}")
                np.save(stem.with_suffix(".labels.npy"), pset.labels)
                pset.pixels.flush()
                meta.write_text(json.dumps(key))
                self._sets[task] = pset
        return self._sets[task]

    def head(self, task: str) -> torch.Tensor:
        """The task's fixed head: from the head file, or built (curated or dataset class names)."""
        if task not in self._heads:
            num_classes = len(self.test_set(task).classnames)
            if self._file_heads is not None:
                h = self._file_heads.get(canonical_task(task))
                if h is None:
                    raise ConfigError(f"head file {self.heads_file} has no head for task {task!r} (it has "
                                      f"{', '.join(sorted(self._file_heads))})")
                self._heads[task] = check_head_rows(task, h, num_classes, where=self.heads_file)
            else:
                names = classnames_for(task, self.test_set(task).classnames, source=self.class_names,
                                       where=self.datasets[task])
                if self._builder is None:
                    self._builder = ZeroShotHeadBuilder(self.clip_model, device=self.device)
                self._heads[task] = self._builder.head(names, templates_for(task))
        return self._heads[task]

    def head_sources(self, tasks: Sequence[str]) -> dict[str, str]:
        """Where each task's head comes from, for the report."""
        if self.heads_file is not None:
            return {t: f"head file {self.heads_file}" for t in tasks}
        out = {}
        for t in tasks:
            p = prompts_for(t)
            out[t] = (f"curated class names and templates: {p.source}" if p is not None and self.class_names ==
                      "fusionbench" else "the test set's class names" + (f"; templates: {p.source}" if p else
                                                                           "; template 'a photo of a {}.'"))
        return out

    def prepare(self, tasks: Sequence[str]) -> None:
        """Preprocess every test set and build every head up front (so the merge loop only evaluates)."""
        for t in tasks:
            self.head(t)
        self._builder = None  # free the text tower

    def evaluate(self, checkpoint: str | Path, tasks: list[str]) -> dict[str, float]:
        enc = self._loader.load(checkpoint)
        return {t: accuracy_from_batches(enc, self.test_set(t).batches(self.pre, self.batch_size), self.head(t),
                                         device=self.device) for t in tasks}


def run_reproduce(checkpoints: str | Path, datasets: str | Path, *, tasks: str | int | Sequence[str] = 8,
                  num_orders: int = 10, seed: int = 0, methods: Sequence[str] | None = None,
                  model_name: str | None = None, base: str | Path | None = None, device: str = "auto",
                  batch_size: int = 128, workers: int = 0, max_examples: int | None = None,
                  cache_dir: str | Path | None = None, keep_dir: str | Path | None = None,
                  work_dir: str | Path | None = None, progress: bool = True, split: str = "test",
                  lam: float | None = None, class_names: str = "fusionbench", heads: str | Path | None = None,
                  compat: str | None = None, memory_budget: str | int | None = None) -> dict:
    """Table 1 for one model and task set: every method over ``num_orders`` seeded orders; returns the report.

    ``lam`` (default: the paper's, by task count) scales continual Task Arithmetic and TIES alike.
    ``memory_budget`` bounds each merge step (``merge_stream``'s default when None).
    """
    from opcm_ext.evaluation.runner import run_experiment

    names = resolve_tasks(tasks)
    method_params = paper_methods(len(names), methods, lam, compat)
    clip_dir, models, data = find_inputs(checkpoints, datasets, names, model_name=model_name, base=base, split=split)
    with tempfile.TemporaryDirectory(prefix="opcm-reproduce-", dir=work_dir) as tmp:
        # Preprocessed test sets are memmapped on disk (ViT-B/32's eight test sets are ~13 GB as
        # uint8 224x224 crops), in the temporary folder unless a cache folder is given.
        evaluator = ClipTaskEvaluator(clip_dir, data, device=device, batch_size=batch_size, workers=workers,
                                      max_examples=max_examples, cache_dir=cache_dir or Path(tmp) / "cache",
                                      split=split, progress=progress, class_names=class_names, heads=heads)
        evaluator.prepare(names)
        first = models[names[0]]
        like_cfg = json.loads((first / "config.json").read_text())
        if like_cfg.get("model_type") == "clip":  # fine-tuned full CLIP models: the CLIP model is the base
            vision_base = clip_dir
        else:
            vision_base = extract_vision_base(clip_dir, first, Path(tmp) / "base")
        report = run_experiment(vision_base, models, evaluator, methods=method_params, num_orders=num_orders,
                                seed=seed, keep_dir=keep_dir, work_dir=tmp, progress=progress,
                                merge_kwargs={} if memory_budget is None else {"memory_budget": memory_budget},
                                meta={"kind": "reproduce", "clip_model": str(clip_dir),
                                      "datasets": {t: str(p) for t, p in data.items()},
                                      "max_examples": max_examples,
                                      "lam": {"value": paper_lambda(len(names)) if lam is None else float(lam),
                                              "source": PAPER_LAMBDA_SOURCE if lam is None else "--lam"},
                                      "heads": evaluator.head_sources(names)})
        del evaluator
    report["base"] = str(clip_dir)
    return report

