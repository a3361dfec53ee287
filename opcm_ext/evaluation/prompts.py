"""Class names and prompt templates for zero-shot heads, and precomputed head files.

The paper's public fine-tuned CLIP checkpoints were trained against heads built from FusionBench's
curated class names and templates (e.g. GTSRB's class 0 is "red and white circle 20 kph speed
limit", not the folder name "00000"); evaluating them with other names lowers every method's
accuracy. Those lists ship as data in ``fusionbench_heads.json`` (its ``source`` names the
repository, package version and commit they were read from; ``bench/peer/extract_heads.py``
regenerates it). The names are matched to a test set's labels BY INDEX, so each list is checked
against the test set's class count when a head is built.

A head file is a safetensors file with one 2-D float tensor per task, ``(num_classes, dim)``,
named by the task (any spelling ``canonical_task`` maps to the same key); ``opcm heads`` writes one.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from opcm_ext.errors import CheckpointError, ConfigError, InputError

__all__ = ["PROMPTS_FILE", "GENERIC_TEMPLATES", "CLASS_NAME_SOURCES", "TaskPrompts", "ClassNamesMismatchError",
           "canonical_task", "load_prompts", "prompts_for", "templates_for", "classnames_for", "check_head_rows",
           "save_heads", "load_heads"]

PROMPTS_FILE = Path(__file__).with_name("fusionbench_heads.json")
PROMPTS_FORMAT = "opcm-ext/zero-shot-prompts"
HEADS_FORMAT = "opcm-ext/zero-shot-heads"
GENERIC_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
# "fusionbench": the curated names for the paper's tasks (others: the dataset's own);
# "dataset": always the dataset's folder / ClassLabel names.
CLASS_NAME_SOURCES = ("fusionbench", "dataset")

_ALIASES = {"cars": "stanford_cars", "flowers102": "oxford_flowers102", "oxford_pets": "oxford_iiit_pet",
            "oxfordiiitpet": "oxford_iiit_pet", "emnist": "emnist_letters", "fashionmnist": "fashion_mnist",
            "renderedsst2": "rendered_sst2", "sst2": "rendered_sst2"}


class ClassNamesMismatchError(InputError):
    """A curated class-name list or a precomputed head does not fit the test set's class count."""


@dataclass(frozen=True)
class TaskPrompts:
    """One task's curated class names (in label order) and prompt templates (``{}`` = class name)."""

    task: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    source: str


def canonical_task(name: str) -> str:
    """Lower case, '-' and ' ' -> '_', known aliases resolved ('stanford-cars' -> 'stanford_cars')."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return _ALIASES.get(key, key)


@functools.lru_cache(maxsize=4)
def load_prompts(path: str | Path = PROMPTS_FILE) -> dict[str, TaskPrompts]:
    """The prompt file's tasks, keyed by canonical task name; validated (format, placeholders, names)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the class-name/template file ({exc}); reinstall opcm-ext or "
                          "regenerate it with bench/peer/extract_heads.py") from exc
    if not isinstance(doc, dict) or doc.get("format") != PROMPTS_FORMAT or doc.get("version") != 1:
        raise ConfigError(f"{path}: not a {PROMPTS_FORMAT} version 1 file")
    src = doc.get("source", {})
    origin = f"{src.get('repository')} {src.get('tag')} ({src.get('commit')})"
    out: dict[str, TaskPrompts] = {}
    for task, entry in doc["tasks"].items():
        names, templates = list(entry["classnames"]), list(entry["templates"])
        bad = [t for t in templates if not (t.count("{}") == t.count("{") == t.count("}") == 1)]
        if not names or not templates or bad or len(set(names)) != len(names):
            raise ConfigError(f"{path}: task {task!r} needs unique class names and templates with one '{{}}' each "
                              f"(bad templates: {bad})")
        key = canonical_task(task)
        if key in out:
            raise ConfigError(f"{path}: task {task!r} repeats ({key!r})")
        out[key] = TaskPrompts(task, tuple(names), tuple(templates), f"{origin} {entry.get('source', '')}".strip())
    return out


def prompts_for(task: str) -> TaskPrompts | None:
    """The curated names and templates of a known task, or None."""
    return load_prompts().get(canonical_task(task))


def templates_for(task: str) -> tuple[str, ...]:
    """A known task's templates, or the generic ``'a photo of a {}.'``."""
    p = prompts_for(task)
    return p.templates if p is not None else GENERIC_TEMPLATES


def classnames_for(task: str, dataset_classnames: Sequence[str], *, source: str = "fusionbench",
                   where: str | Path = "") -> list[str]:
    """The class names a head is built from: curated for known tasks (count-checked), else the dataset's."""
    if source not in CLASS_NAME_SOURCES:
        raise ConfigError(f"class-name source must be one of {CLASS_NAME_SOURCES}, got {source!r}")
    p = prompts_for(task)
    if source == "dataset" or p is None:
        return list(dataset_classnames)
    if len(p.classnames) != len(dataset_classnames):
        raise ClassNamesMismatchError(
            f"task {task!r}: the curated class-name list ({p.source}) has {len(p.classnames)} names, but the test "
            f"set {where or ''} has {len(dataset_classnames)} classes. The names are matched to the labels by index, "
            f"so the test set must be {task}'s own, with its original labels. Fix the test set, or pass "
            "--class-names dataset to use the dataset's own class names, or --heads FILE with precomputed heads")
    return list(p.classnames)


def check_head_rows(task: str, head: torch.Tensor, num_classes: int, *, where: str | Path = "") -> torch.Tensor:
    """A precomputed head must have one row per class of the test set."""
    if head.dim() != 2 or head.shape[0] != num_classes:
        raise ClassNamesMismatchError(f"task {task!r}: the head in {where} has shape {tuple(head.shape)}, but the test "
                                      f"set has {num_classes} classes; a head needs one row per class")
    return head


def save_heads(heads: Mapping[str, torch.Tensor], path: str | Path, *, meta: Mapping | None = None) -> Path:
    """Write heads as a safetensors file keyed by canonical task name (``meta`` goes in its metadata as JSON)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for task, h in heads.items():
        key = canonical_task(task)
        if key in tensors:
            raise ConfigError(f"two heads for task {key!r}")
        if h.dim() != 2 or not h.is_floating_point():
            raise ConfigError(f"head of {task!r} must be a 2-D float tensor, got {h.dtype} {tuple(h.shape)}")
        tensors[key] = h.detach().float().cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": HEADS_FORMAT, "version": "1", "meta": json.dumps(meta or {})})
    return path


def load_heads(path: str | Path) -> dict[str, torch.Tensor]:
    """A head file's heads keyed by canonical task name: 2-D, floating, finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such head file (a .safetensors file with one (classes, dim) tensor per "
                              "task; `opcm heads` writes one)")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors head file ({exc})") from exc
    out: dict[str, torch.Tensor] = {}
    for name, h in raw.items():
        key = canonical_task(name)
        if key in out:
            raise CheckpointError(f"{path}: two heads for task {key!r}")
        if h.dim() != 2 or not h.is_floating_point() or not bool(torch.isfinite(h).all()):
            raise CheckpointError(f"{path}: head {name!r} must be a finite 2-D float tensor, got {h.dtype} "
                                  f"{tuple(h.shape)}")
        out[key] = h.float()
    if not out:
        raise CheckpointError(f"{path}: holds no heads")
    return out
