"""The CPU thin SVD (and projection) of the native backend: float64 Gram matrices and LAPACK eigh, side by side.

Per matrix, the float64 Gram matrix of the small side and its eigendecomposition (LAPACK syevd
through torch/MKL); single-threaded matrices run side by side in a thread pool (torch releases
the GIL). It costs the same as LAPACK sgesdd on the tall orientation but is float64-accurate
(sgesdd's T' is off by up to 1e-2 for power-law spectra whose small singular values lie closer
than eps32), and on 2 cores it is ~3x faster than torch's batched multi-threaded svd, whose
OpenMP barriers also collapse when the cores are shared with other work. Used by
:func:`opcm_ext.ops.thin_svd` and, decomposing and projecting each matrix on one worker, by
:func:`opcm_ext.ops.svd_project`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ._projection import project_one
from .errors import BackendError

__all__ = ["svd_workers", "svd_workspace_bytes", "thin_svd_cpu", "svd_project_cpu"]

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
    """Rows per float64 block when forming X W in place: about 4 MiB of float64 per block."""
    return max(64, (4 << 20) // (8 * max(k, 1)))


def svd_workspace_bytes(m: int, n: int) -> int:
    """Host bytes one CPU thin_svd worker holds beyond its inputs and outputs for an m x n matrix.

    The float64 copy of X (max(m, n) x k, overwritten by X W), the Gram matrix, its eigenvectors
    and eigh's workspace (a few k x k in float64) and one float64 row block; k = min(m, n).
    """
    L, k = max(m, n), min(m, n)
    return 8 * (L * k + 5 * k * k) + 2 * 8 * min(L, _gram_block_rows(k)) * k


class Workspace:
    """One worker's float64 buffers, reused from matrix to matrix within one call.

    Every matrix of a ViT-B/32 step would otherwise allocate ~75 MiB of fresh float64 memory;
    with the step's 1 MiB mmap threshold (memory.tune_malloc) each allocation is a new mapping
    whose pages fault in one by one, which cost ~2 s of kernel time per step on 2 cores.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n:
            self._bufs.pop(name, None)
            buf = self._bufs[name] = torch.empty(n, dtype=torch.float64)
        return buf[:n].view(*shape)


def gram_eigh_svd(a: torch.Tensor, ws: Workspace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) of one fp32 matrix from the float64 Gram matrix of its small side (float64 results).

    X = A (or A^T when wide), G = X^T X = W diag(S^2) W^T (eigh, float64), then
    S_i = ||X w_i|| and the big side's vectors X w_i / S_i, sorted by S descending. All
    arithmetic is float64, so every triplet with S_i above ~sqrt(k) * 1e-8 * S_1 is
    resolved to float32 accuracy - far below project()'s cut S_1 * max(m, n) * eps32,
    so every triplet it keeps is exact to float32. A column with S_i == 0 is zero.
    The big side's vectors are a view of `ws` (valid until its next use).
    """
    wide = a.shape[-2] < a.shape[-1]
    x = a.mT if wide else a  # [L, k], L >= k, float32
    L, k = x.shape
    # One float64 copy of X (L x k, the size of the X W it becomes): G = X^T X in one GEMM.
    x64 = ws.get("x", L, k)
    x64.copy_(x)
    g = torch.mm(x64.mT, x64, out=ws.get("g", k, k))
    _, w = torch.linalg.eigh(g)
    # eigenvalues descending, so the norms below are (almost always) sorted already
    w = torch.index_select(w, 1, torch.arange(k - 1, -1, -1), out=ws.get("w", k, k))
    rows = min(_gram_block_rows(k), L)
    tmp = ws.get("blk", rows, k)
    for i in range(0, L, rows):  # X W in place, one row block at a time
        r = min(rows, L - i)
        torch.mm(x64[i:i + r], w, out=tmp[:r])
        x64[i:i + r].copy_(tmp[:r])
    xw = x64
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


def checked_svd(a: torch.Tensor, ws: Workspace, b: int, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gram_eigh_svd with LAPACK failures and non-finite results turned into a BackendError."""
    m, n = a.shape
    try:
        u, s, v = gram_eigh_svd(a, ws)
        err = None if bool(torch.isfinite(s).all()) else "non-finite singular values"
    except RuntimeError as e:  # torch.linalg.LinAlgError: syevd did not converge
        err = str(e).rstrip(".")
    if err is not None:
        raise BackendError(
            f"ops.thin_svd: the eigensolver failed on matrix {b} of {B} (shape {m}x{n}): {err}; "
            "check the inputs for NaN/Inf."
        )
    return u, s, v


def map_single_threaded(fn: Callable[[int, Workspace], None], count: int) -> None:
    """fn(i, workspace) for i in range(count), side by side on single-threaded workers.

    Each worker keeps one Workspace for the whole call (dropped at its end). torch releases the
    GIL in its kernels, so the workers' LAPACK and BLAS calls run in parallel.
    """
    global _svd_pool, _svd_pool_size
    workers = _svd_workers(count)
    if workers == 1:
        ws = Workspace()
        for i in range(count):
            fn(i, ws)
        return
    spaces: dict[int, Workspace] = {}

    def single_threaded(i: int) -> None:
        torch.set_num_threads(1)  # this worker's OpenMP team and MKL: 1 thread
        ws = spaces.setdefault(threading.get_ident(), Workspace())
        fn(i, ws)

    threads = torch.get_num_threads()
    with _svd_lock:  # one batch at a time: the MKL thread setting is process-wide
        if _svd_pool is None or _svd_pool_size != workers:
            if _svd_pool is not None:
                _svd_pool.shutdown(wait=True)
            _svd_pool = ThreadPoolExecutor(workers, thread_name_prefix="opcm-svd")
            _svd_pool_size = workers
        try:
            list(_svd_pool.map(single_threaded, range(count)))
        finally:
            torch.set_num_threads(threads)  # MKL's setting is global: restore the caller's
            spaces.clear()


def thin_svd_cpu(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of fp32 A[B, m, n] on the CPU, B matrices side by side on single-threaded workers."""
    B, m, n = A.shape
    k = min(m, n)
    U = torch.empty(B, m, k, dtype=torch.float32)
    S = torch.empty(B, k, dtype=torch.float32)
    V = torch.empty(B, n, k, dtype=torch.float32)

    def one(b: int, ws: Workspace) -> None:
        u, s, v = checked_svd(A[b], ws, b, B)
        U[b].copy_(u)
        S[b].copy_(s)
        V[b].copy_(v)

    map_single_threaded(one, B)
    return U, S, V


def svd_project_cpu(
    Ms: list[torch.Tensor], Ts: list[torch.Tensor], ranks: Callable[[torch.Tensor], tuple[int, int]]
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """T'_i for each (M_i, T_i): the thin SVD of M_i and the projection, one matrix per worker.

    ``ranks(S)`` gives (r, keep) from M_i's float32 singular values (ops.split_rank/keep_count).
    Returns the T's and {"svd": s, "project": s}: wall time split between the phases in
    proportion to the workers' time in each.
    """
    B = len(Ms)
    outs: list[torch.Tensor] = [Ts[b] for b in range(B)]  # each replaced by its T' (or an error is raised)
    spent = [[0.0, 0.0] for _ in range(B)]
    t0 = time.perf_counter()

    def one(b: int, ws: Workspace) -> None:
        ta = time.perf_counter()
        u, s, v = checked_svd(Ms[b], ws, b, B)
        U, S, V = u.to(torch.float32), s.to(torch.float32), v.to(torch.float32)
        tb = time.perf_counter()
        r, keep = (int(x) for x in ranks(S))
        outs[b] = project_one(Ts[b], U, V, r, keep)
        spent[b] = [tb - ta, time.perf_counter() - tb]

    map_single_threaded(one, B)
    wall = time.perf_counter() - t0
    svd_s, proj_s = sum(x[0] for x in spent), sum(x[1] for x in spent)
    share = svd_s / (svd_s + proj_s) if svd_s + proj_s > 0 else 1.0
    return outs, {"svd": wall * share, "project": wall * (1.0 - share)}
