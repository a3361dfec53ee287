"""docs/algorithm.md, "The continual baselines": Task Arithmetic, TIES-Merging, averaging (SWA)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .tensors import StateDict, check_compatible, check_finite, floating_keys, is_floating

__all__ = [
    "TaskArithmeticRef",
    "task_arithmetic_merge",
    "TiesRef",
    "ties_merge",
    "ties_combine",
    "AverageRef",
    "average_merge",
]


class _StepwiseRef:
    """Common state handling: `t` and `merged` (theta(t))."""

    def __init__(self) -> None:
        self.t = 0
        self.merged: dict[str, torch.Tensor] | None = None

    def _check(self, base: StateDict, new: StateDict) -> None:
        others = [("new model", new)]
        if self.merged is not None:
            others.append(("merged model", self.merged))
        check_compatible(base, others)
        check_finite("base model", base)
        check_finite("new model", new)

    def _merge(self, base: StateDict, models: Iterable[StateDict]) -> dict[str, torch.Tensor]:
        for sd in models:
            self.step(base, sd)  # type: ignore[attr-defined]
        if self.merged is None:
            raise ValueError("merging needs at least one model")
        return dict(self.merged)


class TaskArithmeticRef(_StepwiseRef):
    """Continual Task Arithmetic: theta(t) = theta(t-1) + lam * tau_t."""

    def __init__(self, lam: float = 0.3) -> None:
        super().__init__()
        if not math.isfinite(float(lam)):
            raise ValueError(f"lam must be finite, got {lam}")
        self.lam = float(lam)

    def step(self, base: StateDict, new: StateDict) -> dict[str, torch.Tensor]:
        """Add one more task vector; returns theta(t) (treat as read-only)."""
        self._check(base, new)
        # `θ(0) = θ0`
        prev = self.merged if self.merged is not None else base
        out: dict[str, torch.Tensor] = {}
        for k in sorted(base):
            if is_floating(base[k]):
                # `θ(t) = θ(t−1) + λ · τt`, fp32, cast to the stored dtype.
                tau = new[k].float() - base[k].float()
                out[k] = (prev[k].float() + self.lam * tau).to(prev[k].dtype)
            else:
                # carried: copied unchanged from the current merged checkpoint
                # (theta(0) = theta0 at t = 1).
                out[k] = prev[k].clone()
        self.merged = out
        self.t += 1
        return dict(out)


def task_arithmetic_merge(base: StateDict, models: Iterable[StateDict], lam: float = 0.3) -> dict[str, torch.Tensor]:
    """Continual Task Arithmetic over `models` in order."""
    return TaskArithmeticRef(lam)._merge(base, models)


def ties_combine(rows: torch.Tensor, keep: float) -> torch.Tensor:
    """TIES trim / elect / disjoint-sum of a (n_rows, d) float32 matrix -> (d,)."""
    if rows.dim() != 2:
        raise ValueError(f"ties_combine needs a 2-D (rows, d) tensor, got {tuple(rows.shape)}")
    n_rows, d = rows.shape
    # Per row, keep entries whose magnitude is `≥` the row's `(d − ⌊d·k⌋)`-th
    # smallest magnitude (`d` = vector length), zero the rest.
    k = d - math.floor(d * keep)
    thresholds = rows.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = rows * (rows.abs() >= thresholds)
    # Elected sign per entry = sign of the column sum (of the trimmed rows, as
    # the published code does).
    sign = torch.sign(trimmed.sum(dim=0))
    # entries whose sum is 0 get the sign of the sum of all elected signs
    # (that sum is taken before the fix; it may itself be 0).
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority
    # Merged entry = sum of the kept entries that agree with the elected sign,
    # with the published code's rule `where(sign > 0, x > 0, x < 0)`: NOTE if
    # the elected sign is still 0 (majority 0), the NEGATIVE entries are the
    # ones kept, exactly like the published code.
    agree = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    return (trimmed * agree).sum(dim=0)


class TiesRef(_StepwiseRef):
    """Continual TIES-Merging (merge function `sum`)."""

    def __init__(self, lam: float = 0.3, keep: float = 0.2) -> None:
        super().__init__()
        keep = float(keep)
        if not (0.0 < keep < 1.0):
            raise ValueError(f"keep must be a fraction in (0, 1), got {keep}")
        if not math.isfinite(float(lam)):
            raise ValueError(f"lam must be finite, got {lam}")
        self.lam = float(lam)
        self.keep = keep

    def step(self, base: StateDict, new: StateDict) -> dict[str, torch.Tensor]:
        """Merge one more model; returns theta(t) (treat as read-only)."""
        self._check(base, new)
        fkeys = floating_keys(base)  # a fixed key order: sorted names
        if self.merged is None:
            # t = 1: `θ(1) = θ0 + λ τ1`.
            prev: StateDict = base
            merged_vec = {k: new[k].float() - base[k].float() for k in fkeys}
        else:
            prev = self.merged
            # t ≥ 2: stack the two flattened vectors `[θ(t−1) − θ0, τt]` (all
            # floating parameters, a fixed key order).
            row0 = torch.cat([(prev[k].float() - base[k].float()).reshape(-1) for k in fkeys])
            row1 = torch.cat([(new[k].float() - base[k].float()).reshape(-1) for k in fkeys])
            flat = ties_combine(torch.stack([row0, row1]), self.keep)
            merged_vec = {}
            offset = 0
            for k in fkeys:
                n = base[k].numel()
                merged_vec[k] = flat[offset : offset + n].reshape(base[k].shape)
                offset += n
        out: dict[str, torch.Tensor] = {}
        for k in sorted(base):
            if is_floating(base[k]):
                # `θ(t) = θ(t−1) + λ · merged`, fp32, cast to the stored dtype.
                out[k] = (prev[k].float() + self.lam * merged_vec[k]).to(prev[k].dtype)
            else:
                # carried from the current merged checkpoint (theta0 at t = 1).
                out[k] = prev[k].clone()
        self.merged = out
        self.t += 1
        return dict(out)


def ties_merge(base: StateDict, models: Iterable[StateDict], lam: float = 0.3, keep: float = 0.2) -> dict[str, torch.Tensor]:
    """Continual TIES-Merging over `models` in order."""
    return TiesRef(lam, keep)._merge(base, models)


class AverageRef(_StepwiseRef):
    """Continual averaging (SWA): theta(t) = ((t-1) theta(t-1) + theta_t) / t."""

    def step(self, base: StateDict, new: StateDict) -> dict[str, torch.Tensor]:
        """Average in one more model (`base` is only checked); returns theta(t)."""
        self._check(base, new)
        if self.merged is None:
            # `θ(1) = θ1`.
            out = {k: new[k].clone() for k in sorted(base)}
        else:
            prev = self.merged
            t = self.t + 1
            out = {}
            for k in sorted(base):
                if is_floating(base[k]):
                    # `θ(t) = ((t−1) · θ(t−1) + θt) / t`, fp32, cast.
                    out[k] = (((t - 1) * prev[k].float() + new[k].float()) / t).to(prev[k].dtype)
                else:
                    out[k] = prev[k].clone()
        self.merged = out
        self.t += 1
        return dict(out)


def average_merge(base: StateDict, models: Iterable[StateDict]) -> dict[str, torch.Tensor]:
    """Continual averaging over `models` in order."""
    return AverageRef()._merge(base, models)
