"""OPCM, written to mirror docs/algorithm.md "One OPCM step" line by line.

Plain on purpose: whole checkpoints in memory, FULL SVD (m x m U, n x n V),
float32 arithmetic. This is the oracle the fast paths are tested against.

Compatibility modes (``compat=``), docs/algorithm.md, "Where FusionBench's OPCM differs":
- ``"paper"`` (default): the paper's math, every floating tensor merged.
- ``"fusionbench"``: as FusionBench's OPCM (fusion-bench 0.2.33,
  ``fusion_bench/method/opcm/opcm_general.py``) behaves. It merges module by
  module over *leaf* modules only, so a parameter registered directly on a
  module that has child modules (CLIP's ``embeddings.class_embedding``; the
  ``unmerged`` keys, found by ``classify.nonleaf_parameter_keys``) is never
  merged. At every step t >= 2 it keeps its current merged task vector
  ``M = θ(t-1) - θ0`` (NOT ``λ(t-1)·M``, NOT ``+ τt``) in Σ, so M counts in
  ‖Σ‖, and the final rescale gives ``θ(t) = θ0 + M / λ(t)``: the first model's
  value decays towards θ0 by 1/λ(t) per step.
- ``"release"``: as ``"fusionbench"``, and the diagonal of ``P`` is never
  zeroed (the code behind the paper's Table 1 and FusionBench before
  2025-03-18 called ``P.diag().fill_(0)``, which fills a copy); only
  ``P[:r, :r] = 0`` is applied.

These are the modes' *semantics* in exact arithmetic. Their bytes (FusionBench's float32
operations, which ``opcm_ext`` replays in these modes) are ``fusionbench.FusionBenchOPCMRef``'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from .tensors import (
    StateDict,
    check_compatible,
    check_finite,
    flat_norm,
    is_floating,
)

__all__ = ["COMPAT_MODES", "split_rank", "drop_tolerance", "project", "OPCMRef", "opcm_merge"]

_EPS32 = torch.finfo(torch.float32).eps

# "paper": the math of docs/algorithm.md; "fusionbench": FusionBench's current OPCM; "release": the
# code release behind the paper's Table 1 (FusionBench before 2025-03-18).
COMPAT_MODES = ("paper", "fusionbench", "release")


def _check_compat(compat: str) -> str:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    return compat


def split_rank(S: torch.Tensor, alpha: float) -> int:
    """First 0-based k with cumsum(S)[k] / sum(S) > alpha; 0 when none qualifies."""
    # docs/algorithm.md: the split rank `r` = the first 0-based index `k` where
    # `cumsum(S)[k] / sum(S) > α`; if no index qualifies (e.g. `M = 0`), `r = 0`.
    # Computed in float64 with sum(S) taken as the last cumulative sum, so the
    # last ratio is exactly 1 and alpha >= 1 always gives r = 0 (in float32 the
    # published code's s.sum() and s.cumsum()[-1] may differ by an ulp).
    s = S.detach().reshape(-1).double()
    if s.numel() == 0:
        return 0
    c = torch.cumsum(s, dim=0)
    total = c[-1]
    if not bool(total > 0):  # 0 / 0 is NaN, and NaN > α is false everywhere
        return 0
    hits = torch.nonzero(c / total > alpha)
    return int(hits[0, 0]) if hits.numel() else 0


def drop_tolerance(S: torch.Tensor, m: int, n: int) -> float:
    """Singular values at or below this count as zero (docs/algorithm.md, "Degenerate cases")."""
    # Deviation from the published code, documented in the spec: triplets with
    # σ <= σ1 · max(m, n) · eps(float32) are dropped.
    if S.numel() == 0:
        return 0.0
    return float(S[0]) * max(m, n) * _EPS32


def project(M: torch.Tensor, T: torch.Tensor, alpha: float, dtype: torch.dtype = torch.float64, *,
            zero_diagonal: bool = True) -> torch.Tensor:
    """T' of one projected tensor: docs/algorithm.md, "One OPCM step", with the full SVD.

    ``zero_diagonal=False`` skips ``P[i, i] = 0`` (compat ``"release"``); ``P[:r, :r] = 0``
    is applied either way.

    Computed in float64 and returned as float32: a float32 full SVD of a 768x3072
    matrix is itself only accurate to ~1e-4 relative, too coarse to judge a fast
    path against at 1e-5, while the float64 one is exact to far below that.
    ``dtype=torch.float32`` computes it the way FusionBench does (the benchmarks use that).
    """
    if M.dim() != 2 or M.shape != T.shape:
        raise ValueError(f"project needs two 2-D tensors of one shape, got {tuple(M.shape)} and {tuple(T.shape)}")
    M = M.to(dtype)
    T = T.to(dtype)
    m, n = M.shape
    # full SVD `M = U S Vᵀ` (U m×m, V n×n, S descending).
    U, S, Vh = torch.linalg.svd(M, full_matrices=True)
    V = Vh.mT
    # Degenerate cases: drop singular triplets with σ = 0 (relative to σ1 and
    # the dtype's epsilon). They come first-q-kept because S is descending.
    q = int((S > drop_tolerance(S, m, n)).sum())
    if q == 0:
        # "a layer whose merged task vector is zero keeps `T' = T`" (exactly:
        # nothing of P would be zeroed, so T' = U Uᵀ T V Vᵀ = T).
        return T.float()
    # Split rank from the kept singular values, the dropped ones counting as
    # exactly 0 (so r < q whenever alpha < 1).
    S_kept = S.clone()
    S_kept[q:] = 0
    r = split_rank(S_kept, alpha)
    # Form `P = Uᵀ T V`.
    P = U.mT @ T @ V
    # set `P[i, i] = 0` for every `i < min(m, n)` (only the kept triplets:
    # dropped triplets' rows/columns of P are left as they are).
    if zero_diagonal:
        idx = torch.arange(q)
        P[idx, idx] = 0
    # set `P[:r, :r] = 0`.
    P[:r, :r] = 0
    # `T' = U P Vᵀ`.
    return (U @ P @ V.mT).float()


class OPCMRef:
    """Stepwise OPCM on whole state dicts; state `t`, `lam`, `norms`, `merged`."""

    def __init__(self, alpha: float = 0.5, svd_dtype: torch.dtype = torch.float64, compat: str = "paper") -> None:
        alpha = float(alpha)
        self.svd_dtype = svd_dtype
        self.compat = _check_compat(compat)
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.t = 0
        self.lam: float | None = None
        self.norms: list[float] = []
        self.merged: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_state(
        cls,
        merged: StateDict,
        t: int,
        lam: float,
        norms: Sequence[float],
        alpha: float = 0.5,
        svd_dtype: torch.dtype = torch.float64,
        compat: str = "paper",
    ) -> "OPCMRef":
        """Resume from a stored merge state (theta(t), t, lambda(t), n_1..n_t)."""
        if t < 1 or len(norms) != t:
            raise ValueError(f"state needs t >= 1 and t norms, got t={t}, {len(norms)} norms")
        obj = cls(alpha, svd_dtype, compat)
        obj.t = int(t)
        obj.lam = float(lam)
        obj.norms = [float(x) for x in norms]
        obj.merged = dict(merged)
        return obj

    @property
    def mean_norm(self) -> float:
        """n̄t = mean(n1 … nt)."""
        return sum(self.norms) / len(self.norms)

    def step(self, base: StateDict, new: StateDict, projected: Iterable[str],
             unmerged: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Merge one more fine-tuned checkpoint; returns theta(t) (treat as read-only).

        ``unmerged``: parameters owned directly by non-leaf modules; only the ``"fusionbench"``
        and ``"release"`` modes treat them differently (ignored under ``"paper"``).
        """
        projected = set(projected)
        unmerged = set(unmerged) if self.compat != "paper" else set()
        for k in sorted(unmerged):
            if k not in base or not is_floating(base[k]):
                raise ValueError(f"unmerged key {k!r} is not a floating tensor of the checkpoint")
            if k in projected:
                raise ValueError(f"{k!r} cannot be both projected and unmerged")
        check_compatible(base, [("new model", new)] + ([("merged model", self.merged)] if self.merged is not None else []))
        for k in sorted(projected):
            if k not in base:
                raise ValueError(f"projected key {k!r} is not in the checkpoint")
            if not is_floating(base[k]) or base[k].dim() != 2:
                raise ValueError(f"projected key {k!r} must be a 2-D floating tensor, got {base[k].dtype} {tuple(base[k].shape)}")
        check_finite("base model", base)
        check_finite("new model", new)
        keys = sorted(base)

        if self.t == 0:
            # t = 1: `θ(1) = θ1` exactly (byte-identical tensors); `λ(1) = 1`;
            # `n1 = ‖τ1‖`.
            tau = {k: new[k].float() - base[k].float() for k in keys if is_floating(base[k])}
            self.merged = {k: new[k].clone() for k in keys}
            self.lam = 1.0
            self.norms = [flat_norm(tau)]
            self.t = 1
            return dict(self.merged)

        merged = self.merged
        assert merged is not None and self.lam is not None
        lam_prev = self.lam
        # t ≥ 2: `nt = ‖τt‖`, `n̄t = mean(n1 … nt)`.
        tau = {k: new[k].float() - base[k].float() for k in keys if is_floating(base[k])}
        norms = self.norms + [flat_norm(tau)]
        mean_norm = sum(norms) / len(norms)

        sigma: dict[str, torch.Tensor] = {}
        for k in keys:
            if not is_floating(base[k]):
                continue
            # For each tensor, with `M = θ(t−1) − θ0` and `T = θt − θ0`:
            M = merged[k].float() - base[k].float()
            T = tau[k]
            if k in unmerged:
                # fusionbench / release: never merged, so Σ holds M itself (not λ(t−1)·M,
                # no τt); it counts in ‖Σ‖ and the rescale below gives θ0 + M / λ(t).
                sigma[k] = M
                continue
            if k in projected:
                # projected tensors: full SVD, P = Uᵀ T V, zero diag and
                # P[:r, :r], T' = U P Vᵀ.
                Tp = project(M, T, self.alpha, self.svd_dtype, zero_diagonal=self.compat != "release")
            else:
                # averaged tensors: `T' = T`.
                Tp = T
            # unnormalised sum `Σ = λ(t−1) · M + T'`.
            sigma[k] = lam_prev * M + Tp

        # After all tensors: `λ(t) = ‖Σ‖ / n̄t` (norm over all floating tensors
        # together) ...
        sigma_norm = flat_norm(sigma)
        if not sigma_norm > 0.0:
            # "If `‖Σ‖ = 0` (nothing changed anywhere), the step fails with a
            # clear error rather than dividing by zero."
            raise ValueError(
                f"OPCM step {self.t + 1}: the unnormalised sum Sigma is zero "
                "(no task vector changed anything), so lambda(t) = ||Sigma|| / "
                "mean norm would divide by zero; check that the models differ "
                "from the base"
            )
        if not mean_norm > 0.0:
            raise ValueError(
                f"OPCM step {self.t + 1}: the mean task-vector norm is zero but "
                "Sigma is not; the resumed state is inconsistent"
            )
        lam = sigma_norm / mean_norm
        # ... and `θ(t) = θ0 + Σ / λ(t)`, cast to the dtype the merged tensor had.
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            if is_floating(base[k]):
                out[k] = (base[k].float() + sigma[k] / lam).to(merged[k].dtype)
            else:
                # carried: copied unchanged from the current merged checkpoint.
                out[k] = merged[k].clone()

        self.merged = out
        self.lam = lam
        self.norms = norms
        self.t += 1
        return dict(out)


def opcm_merge(
    base: StateDict,
    models: Iterable[StateDict],
    projected: Iterable[str],
    alpha: float = 0.5,
    *,
    compat: str = "paper",
    unmerged: Iterable[str] = (),
    svd_dtype: torch.dtype = torch.float64,
) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """Merge `models` in order; returns (theta(T), [lambda(1..T)], [n_1..n_T])."""
    projected = set(projected)
    unmerged = set(unmerged)
    ref = OPCMRef(alpha, svd_dtype, compat)
    lams: list[float] = []
    for sd in models:
        ref.step(base, sd, projected, unmerged)
        lams.append(float(ref.lam))
    if ref.t == 0:
        raise ValueError("opcm_merge needs at least one model")
    assert ref.merged is not None
    return dict(ref.merged), lams, list(ref.norms)
