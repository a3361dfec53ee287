"""Continual averaging (SWA): θ(1) = θ1, θ(t) = ((t−1)·θ(t−1) + θt) / t."""

from __future__ import annotations

import torch

from .base import Batch, Method, Pass, Sums

__all__ = ["Average"]


class Average(Method):
    name = "average"
    params = {}
    copies_first = True

    def passes(self) -> list[Pass]:
        if self.info.step == 1:
            return [Pass("scan", ("base", "new")), Pass("write", ("new",), output=True, copy="new")]
        return [Pass("scan", ("base", "new")), Pass("write", ("merged", "new"), run=self._write, output=True)]

    def _write(self, batch: Batch, sums: Sums) -> list[torch.Tensor]:
        t = self.info.step
        return [
            (((t - 1) * m.float() + nw.float()) / t).to(dt)
            for m, nw, dt in zip(batch["merged"], batch["new"], batch.out_dtypes)
        ]
