"""OPCM: each new task vector is projected away from the merged task vector's top singular directions.

Step t >= 2, per tensor (M = θ(t−1) − θ0, T = θt − θ0): projected weights get
T' = T − U_r (U_rᵀ T V_r) V_rᵀ − Σ_{i>=r} d_i u_i v_iᵀ from the thin SVD of M (r: the split rank
at alpha), other floating tensors T' = T; Σ = λ(t−1)·M + T'; then λ(t) = ‖Σ‖ / n̄t and
θ(t) = θ0 + Σ/λ(t). Step 1 is the first model itself. See docs/algorithm.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import ops
from ..errors import InputError
from ..plan import Kind
from .base import Batch, BlockSource, Choice, Method, Param, Pass, Sums, _zero
from .fusionbench import FusionBenchNumerics
from .streamed import STREAM_FIXED_K2, project_streamed, stream_row_bytes

__all__ = ["OPCM"]


@dataclass
class SigmaSums(Sums):
    """‖Σ‖² over the whole checkpoint."""

    sigma_sq: torch.Tensor = field(default_factory=_zero)


@dataclass
class OPCMStep:
    """OPCM's state within one step."""

    lam_prev: float
    lam: float = 1.0


class OPCM(Method):
    """θ(t) = θ0 + Σ/λ(t), Σ = λ(t−1)·M + T', T' the projected task vector."""

    name = "opcm"
    params = {
        "alpha": Param(0.5, 0.0, 1.0, low_open=True, high_open=False,
                       help="split-rank threshold on the cumulative singular-value share"),
        "compat": Choice("paper", ("paper", "fusionbench", "release"),
                         help="paper: the paper's math; fusionbench: FusionBench's OPCM byte for byte (parameters "
                              "owned by non-leaf modules are never merged, only rescaled; its float32 arithmetic, "
                              "full SVDs and whole-model norms); release: also keep P's diagonal, as the code "
                              "behind the paper's Table 1"),
    }
    copies_first = True

    def begin(self, info):
        super().begin(info)
        self.step_state = OPCMStep(lam_prev=info.prev.lam if info.prev else 1.0)
        self._fb: FusionBenchNumerics | None = None

    @property
    def fb(self) -> FusionBenchNumerics | None:
        """FusionBench's arithmetic (compat fusionbench/release), built once the tensor layout is known."""
        if self.values["compat"] == "paper":
            return None
        if self._fb is None:
            self._fb = FusionBenchNumerics(self, self._check_merged_norm)
        return self._fb

    @property
    def streams(self) -> bool:  # type: ignore[override]
        return self.fb is None

    def reserved(self) -> tuple[int, str]:
        fb = self.fb
        if fb is None:
            return 0, ""
        return fb.reserved_bytes(), f"--compat {self.values['compat']}: the whole-model float32 vector FusionBench takes its norms over"

    def one_process(self) -> str:
        fb = self.fb
        return "" if fb is None else f"--compat {self.values['compat']} takes its norms over one whole-model vector in one process"

    @property
    def projects(self) -> bool:
        return self.info.step >= 2

    def passes(self) -> list[Pass]:
        if self.fb is not None:
            return self.fb.passes()
        if self.info.step == 1:
            # θ(1) = θ1 byte for byte; the engine's first pass measures n1 = ‖τ1‖.
            return [Pass("norm", ("base", "new")), Pass("write", ("new",), output=True, copy="new")]
        return [
            Pass("sigma", ("base", "merged", "new"), run=self._sigma, streamed=self._sigma_streamed,
                 sums=SigmaSums, reduce=self._lam, keep=True),
            Pass("write", ("base", "kept"), run=self._write, output=True),
        ]

    def lam(self) -> float:
        return self.step_state.lam

    def cost(self, kind, shape, itemsize_sum):
        n = math.prod(shape)
        if self.fb is not None:
            c = n * (itemsize_sum + 6 * 4)  # inputs, their fp32 copies, M, T, θ', θ' − θ0
            if kind is Kind.PROJECTED and self.projects:  # full fp32 SVD: U (m x m), Vᵀ (n x n), LAPACK's work
                m_, n_ = shape[0], shape[1]
                k = min(m_, n_)
                c += 4 * (2 * m_ * m_ + 2 * n_ * n_ + 4 * n + 5 * k * k + 7 * k)
            return c
        c = n * (itemsize_sum + 5 * 4)  # inputs + M, T, T', U Q Vᵀ, stacked copy (fp32)
        if kind is Kind.PROJECTED and self.projects:
            k = min(shape)
            c += 4 * (shape[0] * k + shape[1] * k + 4 * k * k + n)  # U, V, P, Q, SVD's own copy of M
            c += ops.svd_workspace_bytes(shape[0], shape[1])  # float64 work of one SVD worker
        return c

    def stream_cost(self, shape, itemsize_sum, rows):
        k = min(shape)
        return STREAM_FIXED_K2 * k * k + rows * stream_row_bytes(k, itemsize_sum)

    # -- pass "sigma": Σ = λ(t−1)·M + T' -------------------------------------------
    def _sigma(self, batch: Batch, sums: SigmaSums) -> list[torch.Tensor]:
        ops, lam_prev = batch.ops, self.step_state.lam_prev
        ms, ts = batch.deltas()
        assert ms is not None
        if batch.kind is Kind.PROJECTED:
            batch.deltas_cache = None  # the T's go once their projections exist
            ts, took = ops.svd_project(ms, ts, self.values["alpha"])
            sums.add_times(took)
        out = []
        for M, T in zip(ms, ts):
            sig, ss = ops.sigma_update(M, T, lam_prev, out=M)
            sums.sigma_sq = sums.sigma_sq + ss
            out.append(sig)
        return out

    def _sigma_streamed(self, src: BlockSource, sums: SigmaSums) -> None:
        project_streamed(src, src.ops, self.values["alpha"], self.step_state.lam_prev, sums)

    def _lam(self, sums: SigmaSums) -> None:
        info = self.info
        sigma_norm = math.sqrt(float(sums.sigma_sq))
        norms = info.norms
        mean = sum(norms) / len(norms)
        if sigma_norm == 0.0 or mean == 0.0:
            raise InputError(
                "nothing changed anywhere: the merged and new task vectors are zero (‖Σ‖ = 0), so λ(t) is "
                "undefined; check that the new model is really a fine-tune of this base."
            )
        self.step_state.lam = sigma_norm / mean
        self._check_merged_norm()

    def _check_merged_norm(self) -> None:
        """P2 says ‖θ(t−1) − θ0‖ = n̄(t−1): a large gap means the merged checkpoint was edited or mixed up."""
        prev = self.info.prev
        if prev is None or not prev.norms:
            return
        expect, got = prev.mean_norm, self.info.m_norm
        if expect > 0 and abs(got - expect) > 1e-2 * expect:
            self.info.warnings.append(
                f"the merged checkpoint's distance from the base is {got:.6g}, but its state records "
                f"{expect:.6g}: it was modified after merging, or belongs to another base"
            )

    # -- pass "write": θ(t) = θ0 + Σ/λ(t), cast to the merged checkpoint's dtype -----------------
    def _write(self, batch: Batch, sums: Sums) -> list[torch.Tensor]:
        lam = self.step_state.lam
        return [batch.ops.finalize(b, s, lam, dt) for b, s, dt in zip(batch["base"], batch["kept"], batch.out_dtypes)]
