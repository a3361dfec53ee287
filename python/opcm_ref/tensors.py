"""Whole-model helpers shared by the reference merges: norms, task vectors, checks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

__all__ = [
    "StateDict",
    "is_floating",
    "flat_norm",
    "task_vector",
    "check_compatible",
    "check_finite",
    "floating_keys",
]

StateDict = Mapping[str, torch.Tensor]


def is_floating(t: torch.Tensor) -> bool:
    """True for floating-point tensors (the only ones that are merged)."""
    return t.is_floating_point()


def floating_keys(state_dict: StateDict) -> list[str]:
    """Sorted names of the floating-point tensors of a checkpoint."""
    return sorted(k for k, v in state_dict.items() if is_floating(v))


def flat_norm(state_dict: StateDict) -> float:
    """2-norm of all floating tensors flattened together, accumulated in float64."""
    # docs/algorithm.md, "Notation": `‖·‖` on a whole checkpoint is the 2-norm of all
    # floating-point tensors flattened together.
    total = 0.0
    for k in sorted(state_dict):
        v = state_dict[k]
        if is_floating(v):
            total += float(v.detach().double().pow(2).sum())
    return math.sqrt(total)


def task_vector(base: StateDict, model: StateDict) -> dict[str, torch.Tensor]:
    """fp32 task vector `model - base` of every floating tensor."""
    # docs/algorithm.md, "Notation": task vector `τt = θt − θ0`, taken tensor by tensor.
    return {k: model[k].float() - base[k].float() for k in floating_keys(base)}


def check_compatible(
    base: StateDict, others: Iterable[tuple[str, StateDict]]
) -> None:
    """Raise ValueError unless every checkpoint has base's keys, shapes and kinds."""
    base_keys = set(base)
    for what, sd in others:
        keys = set(sd)
        if keys != base_keys:
            missing = sorted(base_keys - keys)[:5]
            extra = sorted(keys - base_keys)[:5]
            raise ValueError(
                f"{what} does not have the base checkpoint's tensors "
                f"(missing {missing}, unexpected {extra}); all checkpoints must "
                "share one architecture"
            )
        for k in sorted(base):
            b, o = base[k], sd[k]
            if tuple(b.shape) != tuple(o.shape):
                raise ValueError(
                    f"{what}[{k!r}] has shape {tuple(o.shape)}, the base has "
                    f"{tuple(b.shape)}"
                )
            if is_floating(b) != is_floating(o):
                raise ValueError(
                    f"{what}[{k!r}] is {o.dtype} but the base has {b.dtype}; a "
                    "tensor must be floating in every checkpoint or in none"
                )
            if not is_floating(b) and b.dtype != o.dtype:
                raise ValueError(
                    f"{what}[{k!r}] is {o.dtype} but the base has {b.dtype}; "
                    "carried (non-floating) tensors must keep their dtype"
                )


def check_finite(what: str, sd: StateDict) -> None:
    """Raise ValueError naming the first floating tensor with a NaN or Inf."""
    for k in sorted(sd):
        v = sd[k]
        if is_floating(v) and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{what}[{k!r}] holds NaN or Inf values")
