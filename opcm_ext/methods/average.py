"""Continual averaging (SWA; ../shared/SPEC.md): θ(1) = θ1, θ(t) = ((t−1)·θ(t−1) + θt) / t."""

from __future__ import annotations

import math

from .. import ops
from .base import Method, Pass

__all__ = ["Average"]


class Average(Method):
    name = "average"
    params = {}
    copies_first = True

    def passes(self, ctx):
        if ctx.step == 1:
            return [Pass("scan", ("base", "new")), Pass("write", ("new",), output=True, on_device=False)]
        return [Pass("scan", ("base", "new")), Pass("write", ("merged", "new"), output=True)]

    def process(self, p, group, tensors, ctx):
        if p.name == "scan":
            for b, nw in zip(tensors["base"], tensors["new"]):
                ctx.accumulate("tau_sq", ops.deltas(b, None, nw)[3])
            return None
        if ctx.step == 1:
            return tensors["new"]
        t = ctx.step
        return [
            (((t - 1) * m.float() + nw.float()) / t).to(ctx.out_dtype(k))
            for k, m, nw in zip(group.keys, tensors["merged"], tensors["new"])
        ]

    def end_pass(self, p, ctx):
        if p.name == "scan":
            ctx.scalars["norm"] = math.sqrt(ctx.value("tau_sq"))
