"""OPCM's projection of one matrix that is too large to hold whole, from blocks of its long side.

Everything the projection needs can be accumulated over blocks. In the tall orientation (X = M,
or Mᵀ when M is wide, so X is L x k with L >= k, and T likewise):

1. ``G = Σ_I X_Iᵀ X_I`` (float64, k x k); ``G = W diag(S²) Wᵀ`` by ``eigh``.
2. ``Y_I = X_I W``: ``S_i² = Σ_I ‖Y_I[:, i]‖²`` and ``P̃ = Σ_I Y_Iᵀ (T_I W)``; then
   ``P = diag(1/S) P̃ = Uᵀ T V`` with ``U = X W diag(1/S)`` (the long side's vectors) and
   ``V = W`` — the same P as the whole-matrix path (for a wide M it is that P transposed, and
   the mask below is symmetric under transposition).
3. ``Q`` keeps P's top-left r x r block and the diagonal entries r <= i < keep (the dropped
   triplets, S_i <= S_1 · L · eps32, count as zero, exactly as ``ops.project``), and
   ``T'_I = T_I − U_I Q Wᵀ = T_I − X_I R`` with ``R = W diag(1/S) Q Wᵀ``.

So the working set is a few k x k float64 matrices plus one block: the memory floor is set by
the small side, not by the matrix. The arithmetic is float64 throughout (the whole-matrix path
forms P and T' in float32), so the two agree to float32 rounding.
"""

from __future__ import annotations

import torch

from .base import BlockSource

__all__ = ["project_streamed", "STREAM_FIXED_K2", "stream_row_bytes"]

_EPS32 = torch.finfo(torch.float32).eps

#: float64 k x k matrices alive at the peak (G, W and eigh's workspace; later W, P̃, Q, R).
STREAM_FIXED_K2 = 4 * 8


def stream_row_bytes(k: int, itemsize_sum: int) -> int:
    """Bytes per long-side row of one block: stored inputs, fp32 M, T, T', Σ and float64 X, Y, T W."""
    return k * (itemsize_sum + 4 * 4 + 3 * 8)


def project_streamed(src: BlockSource, ops, alpha: float, lam_prev: float, sums, *, zero_diagonal: bool = True) -> None:
    """Σ = lam_prev · M + T' of one matrix, block by block, into ``src.keep``; adds ‖Σ‖² to ``sums.sigma_sq``.

    ``zero_diagonal=False`` keeps P's diagonal (only the top-left r x r block is removed).
    """
    m, n = src.shape
    L, k = max(m, n), min(m, n)
    dev = None
    with sums.timed("svd"):
        G = None
        for i in range(src.nblocks):
            X, _ = src.deltas(i)
            X = X.double()
            G = X.mT @ X if G is None else G.addmm_(X.mT, X)
            dev = X.device
        evals, W = torch.linalg.eigh(G)
        del G, evals
        W = W.flip(-1)
        s2 = torch.zeros(k, dtype=torch.float64, device=dev)
        Pt = torch.zeros(k, k, dtype=torch.float64, device=dev)
        for i in range(src.nblocks):
            X, T = src.deltas(i)
            Y = X.double() @ W
            s2 += Y.square().sum(0)
            Pt.addmm_(Y.mT, T.double() @ W)
            del X, T, Y
        S = s2.sqrt()
        S, order = torch.sort(S, descending=True, stable=True)
        W, Pt = W[:, order], Pt[order][:, order]
    with sums.timed("project"):
        keep = int((S > S[:1] * (L * _EPS32)).sum()) if k else 0
        S_kept = torch.where(torch.arange(k, device=S.device) < keep, S, 0.0)
        r = int(ops.split_rank(S_kept, alpha))
        inv = torch.where(torch.arange(k, device=S.device) < keep, 1.0 / torch.where(S > 0, S, 1.0), 0.0)
        Q = torch.zeros_like(Pt)
        Q[:r, :r] = Pt[:r, :r]
        idx = torch.arange(r, keep if zero_diagonal else r, device=Pt.device)
        Q[idx, idx] = Pt[idx, idx]
        Q.mul_(inv[:, None])  # P = diag(1/S) P̃, masked
        R = (W * inv[None, :]) @ Q @ W.mT  # T' = T − U Q Vᵀ = T − X W diag(1/S) Q Wᵀ
        del Pt, Q, W
        for i in range(src.nblocks):
            X, T = src.deltas(i)
            Tp = T.double().sub_(X.double() @ R).to(torch.float32)
            sig, ss = ops.sigma_update(X, Tp, lam_prev)
            sums.sigma_sq = sums.sigma_sq + ss
            src.keep(i, sig)
            del X, T, Tp, sig
