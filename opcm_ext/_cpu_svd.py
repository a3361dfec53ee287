"""The CPU thin SVD of the native backend: float64 Gram matrices and LAPACK eigh, several matrices side by side.

Per matrix, the float64 Gram matrix of the small side and its eigendecomposition (LAPACK syevd
through torch/MKL); single-threaded matrices run side by side in a thread pool (torch releases
the GIL). It costs the same as LAPACK sgesdd on the tall orientation but is float64-accurate
(sgesdd's T' is off by up to 1e-2 for power-law spectra whose small singular values lie closer
than eps32), and on 2 cores it is ~3x faster than torch's batched multi-threaded svd, whose
OpenMP barriers also collapse when the cores are shared with other work. Used by
:func:`opcm_ext.ops.thin_svd`.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import BackendError

__all__ = ["svd_workspace_bytes", "thin_svd_cpu"]

_EPS32 = torch.finfo(torch.float32).eps

_svd_pool: ThreadPoolExecutor | None = None
_svd_pool_size = 0
_svd_lock = threading.Lock()


def _reset_svd_pool_after_fork() -> None:
    # A forked child has none of the parent's pool threads: start a fresh pool there.
    global _svd_pool, _svd_pool_size, _svd_lock
    _svd_pool, _svd_pool_size, _svd_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_svd_pool_after_fork)


def svd_workers() -> int:
    """Matrices decomposed side by side: ``OPCM_SVD_WORKERS``, else torch's thread count."""
    env = os.environ.get("OPCM_SVD_WORKERS", "")
    return max(1, int(env) if env.strip() else torch.get_num_threads())


def _svd_workers(batch: int) -> int:
    return max(1, min(svd_workers(), batch))


def _gram_block_rows(k: int) -> int:
    """Rows per float64 block when forming X^T X and X W: about 4 MiB of float64 per block."""
    return max(64, (4 << 20) // (8 * max(k, 1)))


def svd_workspace_bytes(m: int, n: int) -> int:
    """Host bytes one CPU thin_svd worker holds beyond its inputs and outputs for an m x n matrix.

    X W in float64 (max(m, n) x k), the Gram matrix, its eigenvectors and eigh's workspace
    (a few k x k in float64) and one float64 row block; k = min(m, n).
    """
    L, k = max(m, n), min(m, n)
    return 8 * (L * k + 5 * k * k) + 2 * 8 * min(L, _gram_block_rows(k)) * k


def _gram_eigh_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) of one fp32 matrix from the float64 Gram matrix of its small side.

    X = A (or A^T when wide), G = X^T X = W diag(S^2) W^T (eigh, float64), then
    S_i = ||X w_i|| and the big side's vectors X w_i / S_i, sorted by S descending. All
    arithmetic is float64, so every triplet with S_i above ~sqrt(k) * 1e-8 * S_1 is
    resolved to float32 accuracy - far below project()'s cut S_1 * max(m, n) * eps32,
    so every triplet it keeps is exact to float32. A column with S_i == 0 is zero.
    """
    wide = a.shape[-2] < a.shape[-1]
    x = a.mT if wide else a  # [L, k], L >= k, float32
    L, k = x.shape
    # G = X^T X in float64, accumulated over row blocks so that no float64 copy of X
    # exists: the float64 working set of one matrix is X W (L x k) plus a few k x k.
    rows = _gram_block_rows(k)
    g = torch.zeros(k, k, dtype=torch.float64)
    for i in range(0, L, rows):
        blk = x[i:i + rows].to(torch.float64)
        g.addmm_(blk.mT, blk)
        del blk
    _, w = torch.linalg.eigh(g)
    del g
    w = w.flip(-1)  # eigenvalues descending, so the norms below are (almost always) sorted already
    xw = torch.empty(L, k, dtype=torch.float64)
    for i in range(0, L, rows):
        torch.mm(x[i:i + rows].to(torch.float64), w, out=xw[i:i + rows])
    s = torch.linalg.vector_norm(xw, dim=0)
    s, order = torch.sort(s, descending=True, stable=True)
    if not bool((order == torch.arange(k)).all()):
        w, xw = w[:, order], xw[:, order]
    big = xw.div_(torch.where(s > 0, s, 1.0))
    big[:, s == 0] = 0.0
    # The kept big-side columns lose orthogonality ~eps64 * S_1^2 / (S_i * S_j), at most
    # ~1.6e-2 / L^2 (L = max(m, n)): below float32 rounding from L ~ 512 on. For smaller
    # matrices (cheap) two Newton-Schulz polar steps X <- X (3I - X^T X) / 2 restore it,
    # as the CUDA kernel does.
    if max(a.shape) < 512:
        kept = s > s[:1] * (max(a.shape) * _EPS32)
        if bool(kept.any()):
            X = big[:, kept]
            eye = torch.eye(X.shape[1], dtype=X.dtype)
            for _ in range(2):
                X = X @ (1.5 * eye - 0.5 * (X.mT @ X))
            big[:, kept] = X
    if wide:
        return w, s, big
    return big, s, w


def thin_svd_cpu(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of fp32 A[B, m, n] on the CPU, B matrices side by side on single-threaded workers."""
    global _svd_pool, _svd_pool_size
    B, m, n = A.shape
    k = min(m, n)
    U = torch.empty(B, m, k, dtype=torch.float32)
    S = torch.empty(B, k, dtype=torch.float32)
    V = torch.empty(B, n, k, dtype=torch.float32)

    def one(b: int) -> None:
        try:
            u, s, v = _gram_eigh_svd(A[b])
            err = None if bool(torch.isfinite(s).all()) else "non-finite singular values"
        except RuntimeError as e:  # torch.linalg.LinAlgError: syevd did not converge
            err = str(e).rstrip(".")
        if err is not None:
            raise BackendError(
                f"ops.thin_svd: the eigensolver failed on matrix {b} of {B} (shape {m}x{n}): {err}; "
                "check the inputs for NaN/Inf."
            )
        U[b].copy_(u)
        S[b].copy_(s)
        V[b].copy_(v)

    workers = _svd_workers(B)
    if workers == 1:
        for b in range(B):
            one(b)
        return U, S, V

    def single_threaded(b: int) -> None:
        torch.set_num_threads(1)  # this worker's OpenMP team and MKL: 1 thread
        one(b)

    threads = torch.get_num_threads()
    with _svd_lock:  # one batch at a time: the MKL thread setting is process-wide
        if _svd_pool is None or _svd_pool_size != workers:
            if _svd_pool is not None:
                _svd_pool.shutdown(wait=True)
            _svd_pool = ThreadPoolExecutor(workers, thread_name_prefix="opcm-svd")
            _svd_pool_size = workers
        try:
            list(_svd_pool.map(single_threaded, range(B)))
        finally:
            torch.set_num_threads(threads)  # MKL's setting is global: restore the caller's
    return U, S, V
