"""OPCM's projection of one matrix that is too large to hold whole, from blocks of its long side.

Everything the projection needs can be accumulated over blocks. In the tall orientation (X = M,
or Mᵀ when M is wide, so X is L x k with L >= k, and T likewise), two passes over the blocks:

1. ``G = Σ_I X_Iᵀ X_I`` and ``Z = Σ_I X_Iᵀ T_I`` (float64, k x k). ``G = W diag(S²) Wᵀ`` by
   ``eigh``; then ``P = diag(1/S) Wᵀ Z W = Uᵀ T V`` with ``U = X W diag(1/S)`` (the long side's
   vectors) and ``V = W`` — the same P as the whole-matrix path (for a wide M it is that P
   transposed, and the mask below is symmetric under transposition). S from the eigenvalues is
   accurate to ~k·eps64·(S_1/S_i)² relative: far below what matters for every triplet kept.
2. ``Q`` keeps P's top-left r x r block and the diagonal entries r <= i < keep (the dropped
   triplets, S_i <= S_1 · L · eps32, count as zero, exactly as ``ops.project``), and block by
   block ``T'_I = T_I − U_I Q Wᵀ = T_I − X_I R`` with ``R = W diag(1/S) Q Wᵀ``.

So the working set is a few k x k float64 matrices plus one block: the memory floor is set by
the small side, not by the matrix. G, Z and R are float64; the last product is float32, as in
the whole-matrix path, and the two agree to float32 rounding.
"""

from __future__ import annotations

import torch

from .base import BlockSource

__all__ = ["project_streamed", "STREAM_FIXED_K2", "stream_row_bytes"]

_EPS32 = torch.finfo(torch.float32).eps

#: float64 k x k matrices alive at the peak (G, Z, W and eigh's workspace of about 2 k²).
STREAM_FIXED_K2 = 5 * 8


def stream_row_bytes(k: int, itemsize_sum: int) -> int:
    """Bytes per long-side row of one block: stored inputs, fp32 M, T, T', Σ and float64 copies of M and T."""
    return k * (itemsize_sum + 4 * 4 + 2 * 8)


def project_streamed(src: BlockSource, ops, alpha: float, lam_prev: float, sums) -> None:
    """Σ = lam_prev · M + T' of one matrix, block by block, into ``src.keep``; adds ‖Σ‖² to ``sums.sigma_sq``."""
    m, n = src.shape
    L, k = max(m, n), min(m, n)
    with sums.timed("svd"):
        G = Z = None
        for i in range(src.nblocks):
            X, T = src.deltas(i)
            Xd = X.double()
            if G is None:
                G, Z = Xd.mT @ Xd, Xd.mT @ T.double()
            else:
                G.addmm_(Xd.mT, Xd)
                Z.addmm_(Xd.mT, T.double())
            del X, T, Xd
        evals, W = torch.linalg.eigh(G)
        del G
        W = W.flip(-1)
        S = evals.flip(-1).clamp_min(0).sqrt()
    with sums.timed("project"):
        arange = torch.arange(k, device=S.device)
        keep = int((S > S[:1] * (L * _EPS32)).sum()) if k else 0
        S_kept = torch.where(arange < keep, S, 0.0)
        r = int(ops.split_rank(S_kept, alpha))
        inv = torch.where(arange < keep, 1.0 / torch.where(S > 0, S, 1.0), 0.0)
        P = inv[:, None] * (W.mT @ Z @ W)  # Uᵀ T V
        del Z
        Q = torch.zeros_like(P)
        Q[:r, :r] = P[:r, :r]
        idx = torch.arange(r, keep, device=P.device)
        Q[idx, idx] = P[idx, idx]
        R = ((W * inv[None, :]) @ Q @ W.mT).to(torch.float32)  # T' = T − U Q Vᵀ = T − X W diag(1/S) Q Wᵀ
        del P, Q, W
        for i in range(src.nblocks):
            X, T = src.deltas(i)
            Tp = torch.addmm(T, X, R, alpha=-1.0)
            sig, ss = ops.sigma_update(X, Tp, lam_prev)
            sums.sigma_sq = sums.sigma_sq + ss
            src.keep(i, sig)
            del X, T, Tp, sig
