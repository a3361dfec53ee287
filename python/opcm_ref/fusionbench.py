"""FusionBench's OPCM arithmetic on whole state dicts, written out plainly (the oracle of compat fusionbench/release).

FusionBench (fusion-bench 0.2.33, ``fusion_bench.method.opcm.opcm_general.OPCM``) merges a
CLIPVisionModel in float32, module by module: a Linear weight gets a full float32 SVD of its merged
task vector M and the new task vector T projected as ``U (Uᵀ T V with its diagonal and top-left
r x r block zeroed) Vᵀ``; other merged parameters add T; a parameter owned directly by a module
with children is never merged. Whole-model norms are one ``torch.linalg.norm`` over the float32
concatenation of every state-dict entry's difference from the base in sorted-name order; the mean
norm is numpy's float32 mean; λ and the rescale factor are float32 scalars. This class performs
those operations in that order on plain dicts, so the product's ``compat="fusionbench"`` output can
be compared with it byte for byte (tests/test_compat.py). ``release`` keeps P's diagonal.
Unlike FusionBench, the split rank is taken in float64 (as everywhere in opcm-ext).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch

from .opcm import split_rank

StateDict = Mapping[str, torch.Tensor]


def fb_norm(base: StateDict, sd: StateDict) -> torch.Tensor:
    """‖sd − base‖ as one float32 vector over every entry in sorted-name order (a float32 0-d tensor)."""
    return torch.linalg.norm(torch.cat([(sd[k].float() - base[k].float()).reshape(-1) for k in sorted(base)]))


class FusionBenchOPCMRef:
    """Continual OPCM with FusionBench's float32 arithmetic; ``step`` returns θ(t)."""

    def __init__(self, alpha: float = 0.5, compat: str = "fusionbench") -> None:
        if compat not in ("fusionbench", "release"):
            raise ValueError(f"compat must be fusionbench or release, got {compat!r}")
        self.alpha, self.compat = alpha, compat
        self.norms: list[torch.Tensor] = []
        self.lam: torch.Tensor | float = 1.0
        self.merged: dict[str, torch.Tensor] | None = None

    def step(self, base: StateDict, new: StateDict, projected: Iterable[str], unmerged: Iterable[str] = ()
             ) -> dict[str, torch.Tensor]:
        """Fold ``new`` in; ``projected``: the Linear weights; ``unmerged``: parameters never merged."""
        self.norms.append(fb_norm(base, new))
        if self.merged is None:
            self.merged = {k: v.float().clone() for k, v in new.items()}
            return self.merged
        projected, unmerged = set(projected), set(unmerged)
        mean = np.mean(np.asarray([float(n) for n in self.norms], dtype=np.float32))
        merged: dict[str, torch.Tensor] = {}
        for k in base:
            pre, W = base[k].float(), self.merged[k]
            if not base[k].is_floating_point() or k in unmerged:
                merged[k] = W
                continue
            M, T = W - pre, new[k].float() - pre
            if k in projected:
                u, s, vh = torch.linalg.svd(M, full_matrices=True)
                v = vh.T
                r = split_rank(s, self.alpha)
                P = u.T @ T @ v
                if self.compat == "fusionbench":
                    P.diagonal().fill_(0)
                P[:r, :r] = 0
                T = u @ P @ v.T
            merged[k] = pre + (self.lam * M + T)
        tvn = fb_norm(base, merged)
        lam = 1
        lam *= tvn / mean
        factor = mean / tvn
        for k in base:
            if base[k].is_floating_point():
                pre = base[k].float()
                merged[k] = pre + (merged[k] - pre) * factor
        self.lam, self.merged = lam, merged
        return merged
