"""Continual Task Arithmetic: θ(t) = θ(t−1) + λ·τt, with θ(0) = θ0."""

from __future__ import annotations

import math

import torch

from .base import Batch, Method, Param, Pass, Sums

__all__ = ["TaskArithmetic"]


class TaskArithmetic(Method):
    name = "task_arithmetic"
    params = {"lam": Param(0.3, 0.0, math.inf, low_open=True, high_open=True, help="scaling of each task vector")}

    def passes(self) -> list[Pass]:
        # The engine's first pass validates and measures ‖τt‖ before any output byte; the second writes.
        prev = ("merged",) if self.info.step > 1 else ()
        return [Pass("scan", ("base", "new")), Pass("write", ("base", *prev, "new"), run=self._write, output=True)]

    def _write(self, batch: Batch, sums: Sums) -> list[torch.Tensor]:
        lam = self.values["lam"]
        prev = batch.stored.get("merged", batch["base"])  # θ(0) = θ0
        return [
            (m.float() + lam * (nw.float() - b.float())).to(dt)
            for b, m, nw, dt in zip(batch["base"], prev, batch["new"], batch.out_dtypes)
        ]
