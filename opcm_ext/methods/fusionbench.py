"""OPCM as FusionBench computes it: ``compat="fusionbench"`` (and ``"release"``), byte for byte.

The modes differ from the paper's math in what is merged (a tensor owned directly by a module
with children, CLIP's ``class_embedding``, is never merged: it keeps the merged value and is only
rescaled) and, for ``release``, in keeping the projection's diagonal. Matching FusionBench's bytes
as well takes its arithmetic, which this module replays in the same order:

- every tensor in float32; a projected weight gets a full float32 SVD of M (``torch.linalg.svd``,
  ``full_matrices=True``; the gesvd driver on CUDA), ``P = Uᵀ T V`` with its diagonal and top-left
  r x r block zeroed, ``θ' = θ0 + (λ(t−1)·M + U P Vᵀ)``; any other merged tensor
  ``θ' = θ0 + (λ(t−1)·M + T)``;
- whole-model norms are ``torch.linalg.norm`` of ONE float32 vector holding every tensor's
  difference from the base in sorted-name order (integer tensors as zeros): n_t for the new model,
  ‖θ' − θ0‖ for the unscaled merge. These float32 sums are what make FusionBench's λ differ from
  the exact one (by ~1e-3 at ViT-B/32 size on a CPU), so they are computed the same way here;
- n̄ is numpy's float32 mean of the float32 norms, λ(t) = ‖θ' − θ0‖ / n̄ and the rescale factor
  n̄ / ‖θ' − θ0‖ are float32 scalars, and θ(t) = θ0 + (θ' − θ0)·factor.

Same torch build and thread count on the same device give the same bytes as FusionBench's run. The
cost: the vector (4 bytes per parameter) is held for the whole step, a projected matrix cannot be
streamed in blocks, and the step runs in one process. The split rank r is taken in float64 as in
every other path (FusionBench takes it in float32; they differ only on an exact tie with α).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable

import torch

from ..errors import InputError
from ..plan import Kind
from .base import Batch, Method, Pass, Sums

__all__ = ["FusionBenchNumerics"]


class FusionBenchNumerics:
    """The passes of one OPCM step replaying FusionBench's arithmetic (see the module docstring)."""

    def __init__(self, method: Method, check_merged_norm: Callable[[], None]) -> None:
        self.m = method  # OPCM: its values (alpha, compat), info and step_state (lam_prev in, lam out)
        self._check_merged_norm = check_merged_norm
        self.flat: torch.Tensor | None = None  # the whole-model float32 vector, allocated by the first pass
        self.factor: Any = None  # n̄ / ‖θ' − θ0‖, a float32 0-d tensor

    @functools.cached_property
    def offsets(self) -> dict[str, int]:
        """Where each tensor starts in the vector: every tensor of the checkpoint in sorted-name order."""
        shapes = self.m.info.shapes
        assert shapes, "the step's tensor shapes are set before planning"
        names = sorted(shapes)
        return dict(zip(names, itertools.accumulate((math.prod(shapes[k]) for k in names), initial=0)))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.m.info.shapes.values())

    def reserved_bytes(self) -> int:
        return 4 * self.numel

    def passes(self) -> list[Pass]:
        norm = Pass("norm", ("base", "new"), run=self._tau, reduce=self._tau_done)
        if self.m.info.step == 1:
            return [norm, Pass("write", ("new",), output=True, copy="new")]
        return [norm, Pass("merge", ("base", "merged", "new"), run=self._merge, reduce=self._merge_done),
                Pass("write", ("base",), run=self._write, output=True)]

    # -- the whole-model vector ---------------------------------------------------------------------------
    def _slot(self, key: str, rows: tuple[int, int] | None, numel: int) -> torch.Tensor:
        assert self.flat is not None
        start = self.offsets[key]
        if rows is not None:
            shape = self.m.info.shapes[key]
            start += rows[0] * math.prod(shape[1:])
        return self.flat[start:start + numel]

    def _fresh(self) -> None:
        # Integer tensors stay 0, as in FusionBench; each pass overwrites every floating tensor's slot.
        self.flat = torch.zeros(self.numel, dtype=torch.float32)

    def _norm(self) -> torch.Tensor:
        assert self.flat is not None
        return torch.linalg.norm(self.flat)

    # -- pass "norm": n_t = ‖θt − θ0‖ over the float32 vector --------------------------------------------------
    def _tau(self, batch: Batch, sums: Sums) -> None:
        if self.flat is None:
            self._fresh()
        _, ts = batch.deltas()  # the engine's scan computed them already: new − base in float32, as FusionBench
        for k, d in zip(batch.keys, ts):
            self._slot(k, batch.rows, d.numel()).copy_(d.reshape(-1))

    def _tau_done(self, sums: Sums) -> None:
        self.m.info.tau_norm = float(self._norm())  # recorded in the state: FusionBench's n_t, exactly
        if self.m.info.step == 1:
            self.flat = None

    # -- pass "merge": θ' − θ0 of every tensor into the vector ------------------------------------------------
    def _merge(self, batch: Batch, sums: Sums) -> None:
        lam_prev = self.m.step_state.lam_prev
        zero_diagonal = self.m.values["compat"] != "release"
        alpha = self.m.values["alpha"]
        nonleaf = self.m.info.nonleaf
        ms, ts = batch.deltas()  # M = θ(t−1) − θ0 and T = θt − θ0 in float32 (the same IEEE subtractions)
        assert ms is not None
        for k, b, ptv, ttv in zip(batch.keys, batch["base"], ms, ts):
            if k in nonleaf:  # never merged: θ' − θ0 = M
                d = ptv
            else:
                pre = b.float()
                if batch.kind is Kind.PROJECTED:
                    with sums.timed("svd"):
                        u, s, vh = torch.linalg.svd(ptv, full_matrices=True, driver="gesvd" if ptv.is_cuda else None)
                    with sums.timed("project"):
                        v = vh.T
                        r = int(batch.ops.split_rank(s, alpha))
                        P = u.T @ ttv @ v
                        if zero_diagonal:
                            P.diagonal().fill_(0)
                        P[:r, :r] = 0
                        ttv = u @ P @ v.T
                    del u, s, vh, v, P
                new = pre + (lam_prev * ptv + ttv)
                d = new - pre
            self._slot(k, batch.rows, d.numel()).copy_(d.reshape(-1))

    def _merge_done(self, sums: Sums) -> None:
        import numpy as np

        tvn = self._norm()
        if float(tvn) == 0.0 or not math.isfinite(float(tvn)):
            raise InputError(
                "nothing changed anywhere: the merged and new task vectors are zero (‖Σ‖ = 0), so λ(t) is "
                "undefined; check that the new model is really a fine-tune of this base."
            )
        mean = np.mean(np.asarray(self.m.info.norms, dtype=np.float32))  # a float32 scalar, as numpy gives it
        lam = 1
        lam *= tvn / mean
        self.factor = mean / tvn
        self.m.step_state.lam = float(lam)
        self._check_merged_norm()

    # -- pass "write": θ(t) = θ0 + (θ' − θ0)·factor ---------------------------------------------------------
    def _write(self, batch: Batch, sums: Sums) -> list[torch.Tensor]:
        out = []
        for k, b, dt in zip(batch.keys, batch["base"], batch.out_dtypes):
            pre = b.float()
            d = self._slot(k, batch.rows, pre.numel()).view(pre.shape).to(pre.device)
            out.append((pre + d * self.factor.to(pre.device)).to(dt))
        return out
