"""The projection's plain-torch pieces, for any device: the cheap exact form and the twins of the kernels.

OPCM projects T against the thin SVD (U, S, V) of M: keep = the triplets above the float32
cut, r = the split rank, and T' = T - U Q V^T where Q keeps P = U^T T V's top-left r x r block
and its diagonal from r to keep. The CUDA kernels mask P (csrc/project/project.h);
:func:`project_one` computes the same T' without multiplying Q's zero blocks, which is the
faster form on the CPU and the torch twin everywhere.
"""

from __future__ import annotations

import torch

__all__ = ["project_one", "project_twin", "mask_twin"]


def project_one(T: torch.Tensor, U: torch.Tensor, V: torch.Tensor, r: int, keep: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """T' of one matrix in the cheap exact form: T - U_r (U_r^T T V_r) V_r^T - sum_{r<=i<keep} d_i u_i v_i^T.

    With A = T V_keep (m x keep; d_i = u_i^T A_i) and Y = [U_r (U_r^T A_r), U_d diag(d)]:
    T' = T - Y V_keep^T. Two GEMMs of m x n x keep and small ones; none of Q's zero blocks is
    multiplied, so it costs about 60 % of forming P = U^T T V and U Q V^T in full.
    """
    Uk, Vk = U[:, :keep], V[:, :keep]
    A = T @ Vk  # [m, keep]
    Y = torch.empty_like(A)
    if r:
        torch.mm(Uk[:, :r], Uk[:, :r].mT @ A[:, :r], out=Y[:, :r])
    if keep > r:
        d = (Uk[:, r:] * A[:, r:]).sum(dim=0)  # d_i = u_i^T T v_i
        torch.mul(Uk[:, r:], d, out=Y[:, r:])
    if out is None:
        out = torch.empty_like(T)
    return torch.addmm(T, Y, Vk.mT, beta=1.0, alpha=-1.0, out=out)


def project_twin(T: torch.Tensor, U: torch.Tensor, V: torch.Tensor, r: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
    """T'[B, m, n] matrix by matrix with :func:`project_one` (the twin of ops.project's kernels)."""
    out = torch.empty_like(T)
    for b in range(T.shape[0]):
        project_one(T[b], U[b], V[b], int(r[b]), int(keep[b]), out=out[b])
    return out


def mask_twin(P: torch.Tensor, r: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The twin of the mask_projection kernel: P's top-left r x r block and diagonal entries r <= i < keep."""
    idx = torch.arange(P.shape[-1], device=P.device)
    in_r = idx[None, :] < r[:, None]  # [B, k]
    block = in_r[:, :, None] & in_r[:, None, :]
    diag = torch.diag_embed((~in_r) & (idx[None, :] < keep[:, None]))
    return torch.where(block | diag, P, 0.0)
