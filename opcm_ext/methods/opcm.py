"""OPCM (../shared/SPEC.md, "OPCM step"): projection away from the merged task vector's top directions."""

from __future__ import annotations

import math
import time

import torch

from .. import ops
from ..errors import InputError
from ..plan import Kind
from .base import Method, Param, Pass

__all__ = ["OPCM"]


class OPCM(Method):
    """θ(t) = θ0 + Σ/λ(t), Σ = λ(t−1)·M + T', T' the projected task vector."""

    name = "opcm"
    params = {"alpha": Param(0.5, 0.0, 1.0, low_open=True, high_open=False, help="split-rank threshold on the cumulative singular-value share")}
    copies_first = True

    def passes(self, ctx):
        if ctx.step == 1:
            # θ(1) = θ1 byte for byte; pass 1 only measures n1 = ‖τ1‖.
            return [Pass("norm", ("base", "new")), Pass("write", ("new",), output=True, on_device=False)]
        return [Pass("sigma", ("base", "merged", "new")), Pass("write", ("base", "scratch"), output=True)]

    def cost(self, kind, shape, itemsize_sum):
        n = math.prod(shape)
        c = n * (itemsize_sum + 5 * 4)  # inputs + M, T, T', U Q Vᵀ, stacked copy (fp32)
        if kind is Kind.PROJECTED:
            k = min(shape)
            c += 4 * (shape[0] * k + shape[1] * k + 4 * k * k + n)  # U, V, P, Q, SVD's own copy of M
            c += ops.svd_workspace_bytes(shape[0], shape[1])  # float64 work of one SVD worker
        return c

    def process(self, p, group, tensors, ctx):
        if p.name == "norm":
            for b, nw in zip(tensors["base"], tensors["new"]):
                _, _, _, ss_t = ops.deltas(b, None, nw)
                ctx.accumulate("tau_sq", ss_t)
            return None
        if p.name == "write" and ctx.step == 1:
            return tensors["new"]
        if p.name == "sigma":
            lam_prev = ctx.prev.lam
            ms, ts = [], []
            for b, m, nw in zip(tensors["base"], tensors["merged"], tensors["new"]):
                M, T, ss_m, ss_t = ops.deltas(b, m, nw)
                ctx.accumulate("m_sq", ss_m)
                ctx.accumulate("tau_sq", ss_t)
                ms.append(M)
                ts.append(T)
            if group.kind is Kind.PROJECTED:
                Mb = torch.stack(ms)
                Tb = torch.stack(ts)
                del ms, ts
                t0 = time.perf_counter()
                U, S, V = ops.thin_svd(Mb)
                ctx.add_time("svd", time.perf_counter() - t0)
                t0 = time.perf_counter()
                Tp = ops.project(Tb, U, S, V, self.values["alpha"])
                ctx.add_time("project", time.perf_counter() - t0)
                del U, S, V, Tb
                sig, ss = ops.sigma_update(Mb, Tp, lam_prev, out=Mb)
                ctx.accumulate("sigma_sq", ss)
                for key, s in zip(group.keys, sig):
                    ctx.scratch.put(key, s)
            else:
                for key, M, T in zip(group.keys, ms, ts):
                    sig, ss = ops.sigma_update(M, T, lam_prev, out=M)
                    ctx.accumulate("sigma_sq", ss)
                    ctx.scratch.put(key, sig)
            return None
        # pass "write", t >= 2: θ(t) = θ0 + Σ/λ(t), cast to the merged checkpoint's dtype
        lam = ctx.scalars["lam"]
        return [
            ops.finalize(b, s, lam, ctx.out_dtype(key))
            for key, b, s in zip(group.keys, tensors["base"], tensors["scratch"])
        ]

    def end_pass(self, p, ctx):
        if p.name == "norm":
            ctx.scalars["norm"] = math.sqrt(ctx.value("tau_sq"))
        elif p.name == "sigma":
            ctx.scalars["norm"] = math.sqrt(ctx.value("tau_sq"))
            ctx.scalars["m_norm"] = math.sqrt(ctx.value("m_sq"))
            sigma_norm = math.sqrt(ctx.value("sigma_sq"))
            norms = list(ctx.prev.norms) + [ctx.scalars["norm"]]
            mean = sum(norms) / len(norms)
            if sigma_norm == 0.0 or mean == 0.0:
                raise InputError(
                    "nothing changed anywhere: the merged and new task vectors are zero (‖Σ‖ = 0), so λ(t) is "
                    "undefined; check that the new model is really a fine-tune of this base."
                )
            ctx.scalars["lam"] = sigma_norm / mean
            ctx.check_merged_norm(ctx.scalars["m_norm"])

    def finish(self, ctx):
        return 1.0 if ctx.step == 1 else ctx.scalars["lam"]
