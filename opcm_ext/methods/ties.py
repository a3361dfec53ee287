"""Continual TIES-Merging with an exact, streaming global threshold.

Rows are the two flattened vectors ``[θ(t−1) − θ0, τt]`` over every floating tensor. Each row
keeps the entries whose magnitude is at least its ``(d − ⌊d·keep⌋)``-th smallest magnitude. That
k-th value is found without ever holding a row: magnitudes are non-negative fp32 numbers, whose
bit patterns sort like unsigned integers, so a radix selection over the bits is exact: pass 1
counts the top 16 bits (32768 buckets: the sign bit is clear), pass 2 counts the low 16 bits
inside the one bucket that holds rank k. Pass 3 sums the elected signs over the whole checkpoint
(the tie-break for entries whose column sum is zero), pass 4 merges and writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .base import Batch, Method, Param, Pass, Sums, _zero

__all__ = ["TIES", "radix_select_bucket"]

_HI = 1 << 15  # buckets of the top 16 bits of a non-negative fp32 (sign bit clear)
_LO = 1 << 16


def radix_select_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th smallest (1-based) value and k's rank inside it."""
    cum = torch.cumsum(hist.to(torch.int64), 0)
    b = int(torch.searchsorted(cum, torch.tensor(k, dtype=torch.int64)).item())
    before = int(cum[b - 1].item()) if b > 0 else 0
    return b, k - before


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.abs().view(torch.int32)


@dataclass
class HiSums(Sums):
    """Histogram of the top 16 bits of |M| and |T|, and the row length d."""

    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(2, _HI, dtype=torch.int64))
    d: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))


@dataclass
class LoSums(Sums):
    """Histogram of the low 16 bits inside each row's threshold bucket."""

    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(2, _LO, dtype=torch.int64))


@dataclass
class SignSums(Sums):
    """Sum of the elected signs over the whole checkpoint."""

    sign_sum: torch.Tensor = field(default_factory=_zero)


@dataclass
class TIESStep:
    """TIES's state within one step: the radix selection and the tie-break."""

    buckets: tuple[int, int] = (0, 0)
    ranks: tuple[int, int] = (0, 0)
    thresholds: tuple[float, float] = (0.0, 0.0)
    majority: float = 0.0


class TIES(Method):
    name = "ties"
    params = {
        # λ = 0.3 as continual Task Arithmetic on 8 tasks: the paper's appendix uses TA's λ for TIES too.
        "lam": Param(0.3, 0.0, math.inf, low_open=True, high_open=True, help="scaling of the merged update"),
        "keep": Param(0.2, 0.0, 1.0, low_open=True, high_open=True, help="fraction of entries kept per row"),
    }

    def begin(self, info):
        super().begin(info)
        self.step_state = TIESStep()

    def passes(self) -> list[Pass]:
        if self.info.step == 1:  # θ(1) = θ0 + λ·τ1
            return [Pass("scan", ("base", "new")), Pass("write", ("base", "new"), run=self._write_first, output=True)]
        rows = ("base", "merged", "new")
        return [
            Pass("hist_hi", rows, run=self._hist_hi, sums=HiSums, reduce=self._select_bucket),
            Pass("hist_lo", rows, run=self._hist_lo, sums=LoSums, reduce=self._select_threshold),
            Pass("signs", rows, run=self._signs, sums=SignSums, reduce=self._majority),
            Pass("write", rows, run=self._write, output=True),
        ]

    def cost(self, kind, shape, itemsize_sum):
        return math.prod(shape) * (itemsize_sum + 8 * 4)

    def _rows(self, batch: Batch):
        ms, ts = batch.deltas()
        for M, T in zip(ms, ts):
            yield M.reshape(-1), T.reshape(-1)

    def _trimmed(self, M: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        thr = self.step_state.thresholds
        return torch.stack([torch.where(M.abs() >= thr[0], M, 0.0), torch.where(T.abs() >= thr[1], T, 0.0)])

    def _write_first(self, batch: Batch, sums: Sums) -> list[torch.Tensor]:
        lam = self.values["lam"]
        return [(b.float() + lam * (nw.float() - b.float())).to(dt)
                for b, nw, dt in zip(batch["base"], batch["new"], batch.out_dtypes)]

    def _hist_hi(self, batch: Batch, sums: HiSums) -> None:
        for M, T in self._rows(batch):
            sums.d += M.numel()
            for r, x in enumerate((M, T)):
                sums.hist[r] += torch.bincount((_bits(x) >> 16).to(torch.int64), minlength=_HI)

    def _select_bucket(self, sums: HiSums) -> None:
        d = int(sums.d)
        k = d - math.floor(d * self.values["keep"])  # 1-based rank of the threshold (k >= 1 as keep < 1)
        hist = sums.hist.cpu()
        sel = [radix_select_bucket(hist[r], k) for r in range(2)]
        self.step_state.buckets = (sel[0][0], sel[1][0])
        self.step_state.ranks = (sel[0][1], sel[1][1])

    def _hist_lo(self, batch: Batch, sums: LoSums) -> None:
        for M, T in self._rows(batch):
            for r, x in enumerate((M, T)):
                bits = _bits(x)
                sel = bits[(bits >> 16) == self.step_state.buckets[r]] & 0xFFFF
                sums.hist[r] += torch.bincount(sel.to(torch.int64), minlength=_LO)

    def _select_threshold(self, sums: LoSums) -> None:
        hist = sums.hist.cpu()
        thr = []
        for r in range(2):
            lo, _ = radix_select_bucket(hist[r], self.step_state.ranks[r])
            bits = (self.step_state.buckets[r] << 16) | lo
            thr.append(torch.tensor(bits, dtype=torch.int32).view(torch.float32).item())
        self.step_state.thresholds = (thr[0], thr[1])

    def _signs(self, batch: Batch, sums: SignSums) -> None:
        for M, T in self._rows(batch):
            s = self._trimmed(M, T).sum(0)
            sums.sign_sum += torch.sign(s).sum(dtype=torch.float64)

    def _majority(self, sums: SignSums) -> None:
        total = float(sums.sign_sum)
        self.step_state.majority = float(math.copysign(1.0, total)) if total != 0 else 0.0

    def _write(self, batch: Batch, sums: Sums) -> list[torch.Tensor]:
        # Elected sign per entry, zero sums take the majority sign, keep the agreeing entries.
        lam = self.values["lam"]
        majority = self.step_state.majority
        outs = []
        for (M, T), m, dt in zip(self._rows(batch), batch["merged"], batch.out_dtypes):
            trimmed = self._trimmed(M, T)
            sign = torch.sign(trimmed.sum(0))
            sign = torch.where(sign == 0, torch.full_like(sign, majority), sign)
            # The published rule: keep x > 0 where the sign is positive, else x < 0 (also for a sign of 0).
            agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
            merged = (trimmed * agree).sum(0)
            outs.append((m.float() + lam * merged.reshape(m.shape)).to(dt))
        return outs
