"""Continual TIES-Merging (../shared/SPEC.md) with an exact, streaming global threshold.

Rows are the two flattened vectors ``[θ(t−1) − θ0, τt]`` over every floating
tensor. Each row keeps the entries whose magnitude is at least its
``(d − ⌊d·keep⌋)``-th smallest magnitude. That k-th value is found without
ever holding a row: magnitudes are non-negative fp32 numbers, whose bit
patterns sort like unsigned integers, so a radix selection over the bits is
exact: pass 1 counts the top 16 bits (32768 buckets: the sign bit is clear),
pass 2 counts the low 16 bits inside the one bucket that holds rank k. Pass 3
sums the elected signs over the whole checkpoint (the tie-break for entries
whose column sum is zero), pass 4 merges and writes.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from .base import Method, Param, Pass

__all__ = ["TIES", "radix_select_bucket"]

_HI = 1 << 15  # buckets of the top 16 bits of a non-negative fp32 (sign bit clear)
_LO = 1 << 16
_ROWS = ("merged", "new")


def radix_select_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th smallest (1-based) value and k's rank inside it."""
    cum = torch.cumsum(hist.to(torch.int64), 0)
    b = int(torch.searchsorted(cum, torch.tensor(k, dtype=torch.int64)).item())
    before = int(cum[b - 1].item()) if b > 0 else 0
    return b, k - before


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.abs().view(torch.int32)


class TIES(Method):
    name = "ties"
    params = {
        "lam": Param(0.5, 0.0, math.inf, low_open=True, high_open=True, help="scaling of the merged update"),
        "keep": Param(0.2, 0.0, 1.0, low_open=True, high_open=True, help="fraction of entries kept per row"),
    }

    def passes(self, ctx):
        if ctx.step == 1:  # θ(1) = θ0 + λ·τ1
            return [Pass("scan", ("base", "new")), Pass("write", ("base", "new"), output=True)]
        rows = ("base", "merged", "new")
        return [Pass("hist_hi", rows), Pass("hist_lo", rows), Pass("signs", rows), Pass("write", rows, output=True)]

    def cost(self, kind, shape, itemsize_sum):
        return math.prod(shape) * (itemsize_sum + 8 * 4)

    def _rows(self, tensors):
        for b, m, nw in zip(tensors["base"], tensors["merged"], tensors["new"]):
            M, T, ss_m, ss_t = ops.deltas(b, m, nw)
            yield M.reshape(-1), T.reshape(-1), ss_t, m

    def _trimmed(self, M, T, ctx):
        thr = ctx.scalars["thresholds"]
        return torch.stack([torch.where(M.abs() >= thr[0], M, 0.0), torch.where(T.abs() >= thr[1], T, 0.0)])

    def process(self, p, group, tensors, ctx):
        dev = ctx.device
        if p.name == "scan":
            for b, nw in zip(tensors["base"], tensors["new"]):
                ctx.accumulate("tau_sq", ops.deltas(b, None, nw)[3])
            return None
        if p.name == "write" and ctx.step == 1:
            lam = self.values["lam"]
            return [(b.float() + lam * (nw.float() - b.float())).to(ctx.out_dtype(k))
                    for k, b, nw in zip(group.keys, tensors["base"], tensors["new"])]
        if p.name == "hist_hi":
            hist = ctx.scalars.setdefault("hist_hi", torch.zeros(2, _HI, dtype=torch.int64, device=dev))
            for M, T, ss_t, _ in self._rows(tensors):
                ctx.accumulate("tau_sq", ss_t)
                ctx.scalars["d"] = ctx.scalars.get("d", 0) + M.numel()
                for r, x in enumerate((M, T)):
                    hist[r] += torch.bincount((_bits(x) >> 16).to(torch.int64), minlength=_HI)
            return None
        if p.name == "hist_lo":
            hist = ctx.scalars.setdefault("hist_lo", torch.zeros(2, _LO, dtype=torch.int64, device=dev))
            buckets = ctx.scalars["buckets"]
            for M, T, _, _ in self._rows(tensors):
                for r, x in enumerate((M, T)):
                    bits = _bits(x)
                    sel = bits[(bits >> 16) == buckets[r]] & 0xFFFF
                    hist[r] += torch.bincount(sel.to(torch.int64), minlength=_LO)
            return None
        if p.name == "signs":
            for M, T, _, _ in self._rows(tensors):
                s = self._trimmed(M, T, ctx).sum(0)
                ctx.accumulate("sign_sum", torch.sign(s).sum(dtype=torch.float64))
            return None
        # write: elected sign per entry, zero sums take the majority sign, keep the agreeing entries.
        lam = self.values["lam"]
        majority = ctx.scalars["majority"]
        outs = []
        for k, (M, T, _, m) in zip(group.keys, self._rows(tensors)):
            trimmed = self._trimmed(M, T, ctx)
            sign = torch.sign(trimmed.sum(0))
            sign = torch.where(sign == 0, torch.full_like(sign, majority), sign)
            # The published rule: keep x > 0 where the sign is positive, else x < 0 (also for a sign of 0).
            agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
            merged = (trimmed * agree).sum(0)
            outs.append((m.float() + lam * merged.reshape(m.shape)).to(ctx.out_dtype(k)))
        return outs

    def end_pass(self, p, ctx):
        if p.name in ("scan", "hist_hi"):
            ctx.scalars["norm"] = math.sqrt(ctx.value("tau_sq"))
        if p.name == "hist_hi":
            d = ctx.scalars["d"]
            k = d - math.floor(d * self.values["keep"])  # 1-based rank of the threshold (k >= 1 as keep < 1)
            ctx.scalars["k"] = k
            hist = ctx.scalars.pop("hist_hi").cpu()
            sel = [radix_select_bucket(hist[r], k) for r in range(2)]
            ctx.scalars["buckets"] = [b for b, _ in sel]
            ctx.scalars["ranks"] = [rank for _, rank in sel]
        elif p.name == "hist_lo":
            hist = ctx.scalars.pop("hist_lo").cpu()
            thr = []
            for r in range(2):
                lo, _ = radix_select_bucket(hist[r], ctx.scalars["ranks"][r])
                bits = (ctx.scalars["buckets"][r] << 16) | lo
                thr.append(torch.tensor(bits, dtype=torch.int32).view(torch.float32).item())
            ctx.scalars["thresholds"] = thr
        elif p.name == "signs":
            total = ctx.value("sign_sum")
            ctx.scalars["majority"] = float(math.copysign(1.0, total)) if total != 0 else 0.0
