"""Rebuild the example zoo deterministically: ``python -m opcm_ext.zoo.build --out opcm_ext/zoo/models``.

Pre-trains a small CLIP vision tower (``CLIPVisionModelWithProjection``) on generically augmented
digits with a learned cosine head (thrown away), then fine-tunes a copy of the whole encoder per
task against that task's fixed head (random unit class embeddings, never trained, like CLIP's
zero-shot text heads). Writes every checkpoint as an HF folder (fp16 safetensors), the fixed heads
and the held-out test sets, and ``zoo.json`` with the accuracies measured on the shipped weights.
Needs scikit-learn (for its bundled digits); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opcm_ext.zoo.tasks import CONCEPTS, DIGITS, IMAGE_SIZE, PATCH_SIZE, TASKS, pretrain_augment, upscale

__all__ = ["BuildConfig", "build", "main"]

LOGIT_SCALE = 100.0  # CLIP's trained temperature (exp(4.6052)); argmax does not depend on it


class BuildConfig:
    """Every knob of the build; the defaults are what the shipped zoo was built with."""

    def __init__(self, **kw):
        self.seed = 0
        self.hidden_size = 128
        self.intermediate_size = 512
        self.num_hidden_layers = 4
        self.num_attention_heads = 4
        self.projection_dim = 64
        self.test_size = 500
        self.batch_size = 64
        self.pretrain_steps = 1000
        self.pretrain_lr = 1e-3
        self.finetune_steps = 300
        self.finetune_lr = 1e-4
        self.weight_decay = 0.1
        self.threads = 1
        self.dtype = "float16"
        for k, v in kw.items():
            if not hasattr(self, k):
                raise TypeError(f"unknown build option {k!r}")
            setattr(self, k, v)

    def as_dict(self) -> dict:
        return dict(vars(self))


def _vision_config(cfg: BuildConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        projection_dim=cfg.projection_dim,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_act="quick_gelu",
    )


def _load_digits(cfg: BuildConfig):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - build-time only
        raise SystemExit("building the zoo needs scikit-learn (pip install scikit-learn)") from exc
    d = load_digits()
    images = upscale((d.images / 16.0).astype(np.float32))
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(cfg.seed).permutation(len(labels))
    test, train = order[: cfg.test_size], order[cfg.test_size :]
    return (images[train], labels[train]), (images[test], labels[test])


def concept_table(dim: int, seed: int) -> torch.Tensor:
    """Fixed random unit embeddings of every concept (the zoo's stand-in for CLIP's text encoder)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return F.normalize(torch.randn(len(CONCEPTS), dim, generator=gen), dim=-1)


def concept_head(classnames, table: torch.Tensor) -> torch.Tensor:
    """A task's fixed head: the concept embeddings of its class names."""
    return table[[CONCEPTS.index(c) for c in classnames]].clone()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _embed(model, pixels: torch.Tensor) -> torch.Tensor:
    return F.normalize(model(pixel_values=pixels).image_embeds, dim=-1)


def _accuracy(model, pixels_u8: torch.Tensor, labels: torch.Tensor, head: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(labels), 500):
            x = _normalize(pixels_u8[i : i + 500].float() / 255.0)
            pred = (_embed(model, x) @ head.T).argmax(-1)
            correct += int((pred == labels[i : i + 500]).sum())
    return correct / len(labels)


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(model, params, batches, steps, lr, wd, loss_fn, log, label):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, warmup=max(1, steps // 10))
        x, y = next(batches)
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % 100 == 0 or step == steps - 1):
            print(f"  {label} step {step + 1}/{steps} loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)


def _batches(make, n, batch_size, rng):
    """Endless shuffled batches; ``make(idx, rng)`` returns (pixels float [0,1], labels)."""
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            x, y = make(perm[i : i + batch_size], rng)
            yield _normalize(torch.from_numpy(np.ascontiguousarray(x))), torch.from_numpy(y)


def _save(model, folder: Path, dtype: torch.dtype) -> None:
    from opcm_ext.zoo import write_preprocessor_config

    model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    write_preprocessor_config(folder)


def build(out: Path, cfg: BuildConfig | None = None, *, log: bool = True) -> dict:
    """Train and write the zoo into ``out`` (replaced); returns the zoo.json dict."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    cfg = cfg or BuildConfig()
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)

    (g_train, y_train), (g_test, y_test) = _load_digits(cfg)
    out = Path(out)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    # ---- pre-training: generically augmented digits aligned with the digit concepts (CLIP-style)
    model = CLIPVisionModelWithProjection(_vision_config(cfg))
    table = concept_table(cfg.projection_dim, cfg.seed)
    pre_head = concept_head(DIGITS, table)
    rng = np.random.default_rng(cfg.seed + 1)

    def pre_loss(x, y):
        return F.cross_entropy(LOGIT_SCALE * _embed(model, x) @ pre_head.T, y)

    batches = _batches(lambda idx, r: (pretrain_augment(g_train[idx], r), y_train[idx]),
                       len(y_train), cfg.batch_size, rng)
    t0 = time.perf_counter()
    _train(model, list(model.parameters()), batches, cfg.pretrain_steps,
           cfg.pretrain_lr, cfg.weight_decay, pre_loss, log, "pre-train")
    timings = {"pretrain_s": time.perf_counter() - t0}
    _save(model, tmp / "base", dtype)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    # ---- fixed heads and held-out test sets
    heads, test_tensors, task_meta = {}, {}, []
    for i, spec in enumerate(TASKS):
        heads[spec.name] = concept_head(spec.classnames, table)
        x, y = spec.make(g_test, y_test, np.random.default_rng(cfg.seed * 1000 + 31 * (i + 1)))
        test_tensors[f"{spec.name}.pixels"] = torch.from_numpy(_to_uint8(x))
        test_tensors[f"{spec.name}.labels"] = torch.from_numpy(y)
    save_file({k: v.contiguous() for k, v in heads.items()}, str(tmp / "heads.safetensors"))
    save_file(test_tensors, str(tmp / "test_sets.safetensors"))

    # ---- fine-tuning: the whole encoder per task, its head fixed
    for i, spec in enumerate(TASKS):
        model.load_state_dict(base_state)
        head = heads[spec.name]
        rng = np.random.default_rng(cfg.seed * 1000 + 53 * (i + 1))

        def ft_loss(x, y, head=head):
            return F.cross_entropy(LOGIT_SCALE * _embed(model, x) @ head.T, y)

        batches = _batches(lambda idx, r, spec=spec: spec.make(g_train[idx], y_train[idx], r),
                           len(y_train), cfg.batch_size, rng)
        t0 = time.perf_counter()
        _train(model, list(model.parameters()), batches, cfg.finetune_steps, cfg.finetune_lr,
               cfg.weight_decay, ft_loss, log, f"fine-tune {spec.name}")
        timings[f"finetune_{spec.name}_s"] = time.perf_counter() - t0
        _save(model, tmp / spec.name, dtype)
        task_meta.append({"name": spec.name, "description": spec.description,
                          "classnames": list(spec.classnames)})

    # ---- measure on the shipped (stored-dtype) weights
    from opcm_ext.zoo import Zoo

    zoo = Zoo(tmp)
    acc_base = {t: zoo.accuracy(zoo.base, t) for t in zoo.tasks}
    acc_ft = {t: zoo.accuracy(zoo.model(t), t) for t in zoo.tasks}
    info = {
        "format": 1,
        "tasks": task_meta,
        "image_size": IMAGE_SIZE,
        "logit_scale": LOGIT_SCALE,
        "build": cfg.as_dict(),
        "accuracy": {"pretrained": acc_base, "finetuned": acc_ft},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "build_seconds": round(time.perf_counter() - t_start, 1),
        "environment": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                        "machine": platform.machine()},
    }
    (tmp / "zoo.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("models"))
    defaults = BuildConfig()
    for k, v in defaults.as_dict().items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    info = build(out, BuildConfig(**args))
    acc = info["accuracy"]
    print(f"{'task':<10} {'base':>6} {'fine-tuned':>10}")
    for t in acc["finetuned"]:
        print(f"{t:<10} {100 * acc['pretrained'][t]:6.1f} {100 * acc['finetuned'][t]:10.1f}")
    print(f"built in {info['build_seconds']:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
