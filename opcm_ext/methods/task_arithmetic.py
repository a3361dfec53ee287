"""Continual Task Arithmetic (../shared/SPEC.md): θ(t) = θ(t−1) + λ·τt, θ(0) = θ0."""

from __future__ import annotations

import math

from .. import ops
from .base import Method, Param, Pass

__all__ = ["TaskArithmetic"]


class TaskArithmetic(Method):
    name = "task_arithmetic"
    params = {"lam": Param(0.3, 0.0, math.inf, low_open=True, high_open=True, help="scaling of each task vector")}

    def passes(self, ctx):
        # Pass 1 validates (hashes, finiteness) and measures ‖τt‖ before any output byte; pass 2 writes.
        prev = ("merged",) if ctx.step > 1 else ()
        return [Pass("scan", ("base", "new")), Pass("write", ("base", *prev, "new"), output=True)]

    def process(self, p, group, tensors, ctx):
        if p.name == "scan":
            for b, nw in zip(tensors["base"], tensors["new"]):
                ctx.accumulate("tau_sq", ops.deltas(b, None, nw)[3])
            return None
        lam = self.values["lam"]
        prev = tensors.get("merged", tensors["base"])  # θ(0) = θ0
        return [
            (m.float() + lam * (nw.float() - b.float())).to(ctx.out_dtype(k))
            for k, b, m, nw in zip(group.keys, tensors["base"], prev, tensors["new"])
        ]

    def end_pass(self, p, ctx):
        if p.name == "scan":
            ctx.scalars["norm"] = math.sqrt(ctx.value("tau_sq"))
