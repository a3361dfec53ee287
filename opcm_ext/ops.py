"""The numerical ops of a merge step; the only module that knows backends.

Every op takes torch tensors (CuPy arrays are accepted too, through DLPack, and the
results come back as CuPy arrays), runs on the tensors' device and, on CUDA, on the
caller's current stream:

- CPU tensors use the compiled CPU kernels ``opcm_ext._C`` (OpenMP) and LAPACK/MKL
  through torch for the SVD and the GEMMs;
- CUDA tensors use ``opcm_ext._cuda`` (the GEMMs are torch.bmm, i.e. cuBLAS);
- ``backend="torch"`` (or the environment variable ``OPCM_BACKEND=torch``) selects
  plain torch twins of every op: the second implementation the tests compare with.

Norms come back as 0-d float64 tensors on the tensors' device, so a caller synchronises
once per pass rather than once per tensor; ``accum=`` adds them into caller-owned
float64 accumulators instead of returning fresh ones.

Numerics: element-wise results are computed in fp32 with the same IEEE operation order
as the torch twins (bit-identical on CPU). Sums of squares are float64; the CPU kernels
reduce fixed 32768-element blocks in a fixed order, so they are reproducible for any
thread count and agree with torch's float64 ``sum`` to ~1e-15 relative.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from . import _native
from .errors import BackendError, ConfigError

__all__ = [
    "DTYPE_CODES",
    "deltas",
    "sigma_update",
    "finalize",
    "thin_svd",
    "split_rank",
    "keep_count",
    "project",
    "sumsq",
]

#: dtype codes understood by the kernels of ``_C`` and ``_cuda``.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- plumbing
def _use_torch(backend: str | None) -> bool:
    b = backend if backend is not None else os.environ.get("OPCM_BACKEND", "auto")
    b = (b or "auto").lower()
    if b == "torch":
        return True
    if b in ("auto", "native"):
        return False
    raise ConfigError(f"unknown ops backend {b!r} (argument backend= or OPCM_BACKEND); use 'auto' or 'torch'.")


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".", 1)[0] == "cupy"


def _cupy_io(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Accept CuPy arrays (converted with torch.from_dlpack) and return CuPy when any input was CuPy."""

    def conv_in(x: Any) -> Any:
        if _is_cupy(x):
            return torch.from_dlpack(x)
        if isinstance(x, (tuple, list)) and any(_is_cupy(v) for v in x):
            return type(x)(conv_in(v) for v in x)
        return x

    def conv_out(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            import cupy  # type: ignore[import-not-found]

            return cupy.from_dlpack(x)
        if isinstance(x, tuple):
            return tuple(conv_out(v) for v in x)
        return x

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not any(_is_cupy(v) or isinstance(v, (tuple, list)) for v in [*args, *kwargs.values()]):
            return fn(*args, **kwargs)  # the common case: torch tensors only
        args_in = [conv_in(a) for a in args]
        kwargs_in = {k: conv_in(v) for k, v in kwargs.items()}
        was_cupy = any(
            _is_cupy(v) or (isinstance(v, (tuple, list)) and any(_is_cupy(w) for w in v))
            for v in [*args, *kwargs.values()]
        )
        out = fn(*args_in, **kwargs_in)
        return conv_out(out) if was_cupy else out

    return functools.wraps(fn)(wrapper)


def _require(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"ops.{op}: {msg}")


def _check_float(x: torch.Tensor, op: str, arg: str) -> None:
    _require(isinstance(x, torch.Tensor), op, f"{arg} must be a torch tensor or CuPy array, got {type(x).__name__}")
    _require(x.dtype in DTYPE_CODES, op, f"{arg} has dtype {x.dtype}; expected float32, float16 or bfloat16")


def _check_fp32(x: torch.Tensor, op: str, arg: str) -> None:
    _require(isinstance(x, torch.Tensor), op, f"{arg} must be a torch tensor or CuPy array, got {type(x).__name__}")
    _require(x.dtype == torch.float32, op, f"{arg} has dtype {x.dtype}; expected float32")


def _check_like(x: torch.Tensor, ref: torch.Tensor, op: str, arg: str, ref_arg: str) -> None:
    _require(x.shape == ref.shape, op, f"{arg} has shape {tuple(x.shape)} but {ref_arg} has {tuple(ref.shape)}")
    _require(x.device == ref.device, op, f"{arg} is on {x.device} but {ref_arg} is on {ref.device}")


def _f32(x: float, op: str, arg: str, nonzero: bool = False) -> float:
    """x as the float32 the kernels will use; finite (and non-zero) or a ValueError."""
    try:
        v = struct.unpack("f", struct.pack("f", float(x)))[0]
    except OverflowError:
        v = math.inf
    _require(math.isfinite(v) and (v != 0.0 or not nonzero), op,
             f"{arg} must be finite{' and non-zero' if nonzero else ''} in float32, got {x}")
    return v


def _kernels(device: torch.device) -> tuple[Any, tuple[int, ...]]:
    """The kernel module for a device and the trailing arguments (the current stream on CUDA)."""
    if device.type == "cpu":
        return _native.cpu(), ()
    if device.type == "cuda":
        mod = _native.cuda()
        return mod, (torch.cuda.current_stream(device).cuda_stream,)
    raise BackendError(f"no opcm kernels for device {device}; use a CPU or CUDA device, or backend='torch'.")


def _call(op: str, device: torch.device, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a kernel (on CUDA with the tensors' device current); a library failure becomes a BackendError."""
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                return fn(*args)
        return fn(*args)
    except RuntimeError as e:
        raise BackendError(f"ops.{op}: the native kernel failed on {device}: {e}") from e


class _Sums:
    """`count` float64 accumulators the kernels add into: fresh zeros, or the caller's `accum`."""

    def __init__(self, accum: Any, count: int, device: torch.device, op: str) -> None:
        self._targets: list[torch.Tensor | None] | None = None
        if accum is None:
            self.buf = torch.zeros(count, dtype=torch.float64, device=device)
            self.outputs: list[torch.Tensor | None] = list(self.buf.unbind(0))
            return
        if isinstance(accum, torch.Tensor) and accum.dim() <= 1:
            _require(accum.numel() == count, op, f"accum must hold {count} float64 value(s), got {accum.numel()}")
            targets: list[torch.Tensor | None] = list(accum.reshape(-1).unbind(0)) if count > 1 else [accum]
        else:
            targets = list(accum)
            _require(len(targets) == count, op, f"accum must be {count} 0-d float64 tensors, got {len(targets)}")
        for t in targets:
            if t is not None:
                _require(
                    isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.numel() == 1,
                    op,
                    "accum entries must be one-element float64 tensors",
                )
                _require(t.device == device, op, f"accum is on {t.device}, the tensors on {device}")
        self.outputs = targets
        # Pass the caller's memory straight to the kernel when it is laid out as the kernel
        # expects (consecutive float64 values); otherwise use a temporary and add afterwards.
        first = targets[0]
        direct = all(t is not None for t in targets) and all(
            t.data_ptr() == first.data_ptr() + 8 * i for i, t in enumerate(targets)  # type: ignore[union-attr]
        )
        if direct:
            self.buf = first  # type: ignore[assignment]
        else:
            self.buf = torch.zeros(count, dtype=torch.float64, device=device)
            self._targets = targets

    @property
    def ptr(self) -> int:
        return self.buf.data_ptr()

    def finish(self) -> list[torch.Tensor | None]:
        if self._targets is not None:
            for i, t in enumerate(self._targets):
                if t is not None:
                    t.add_(self.buf[i].reshape(t.shape))
        return self.outputs


def _torch_sumsq(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64).square().sum()


def _torch_accumulate(values: list[torch.Tensor | None], accum: Any, op: str) -> list[torch.Tensor | None]:
    if accum is None:
        return values
    device = next(v.device for v in values if v is not None)
    sums = _Sums(accum, len(values), device, op)
    for i, v in enumerate(values):
        if v is not None and sums.outputs[i] is not None:
            sums.outputs[i].add_(v.reshape(sums.outputs[i].shape))  # type: ignore[union-attr]
    return sums.outputs


# ----------------------------------------------------------------------------- element-wise ops
@_cupy_io
def deltas(
    base: torch.Tensor,
    merged: torch.Tensor | None,
    new: torch.Tensor,
    *,
    accum: Any = None,
    backend: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Task vectors M = merged - base, T = new - base (fp32) and their float64 sums of squares."""
    _check_float(base, "deltas", "base")
    _check_float(new, "deltas", "new")
    _check_like(new, base, "deltas", "new", "base")
    if merged is not None:
        _check_float(merged, "deltas", "merged")
        _check_like(merged, base, "deltas", "merged", "base")
    if _use_torch(backend):
        b = base.float()
        T = new.float() - b
        M = merged.float() - b if merged is not None else None
        ss = _torch_accumulate([_torch_sumsq(M) if M is not None else None, _torch_sumsq(T)], accum, "deltas")
        return M, T, (ss[0] if merged is not None else None), ss[1]  # type: ignore[return-value]

    mod, tail = _kernels(base.device)
    base_c, new_c = base.contiguous(), new.contiguous()
    merged_c = merged.contiguous() if merged is not None else None
    T = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    M = torch.empty_like(T) if merged is not None else None
    sums = _Sums(accum, 2, base.device, "deltas")
    _call(
        "deltas",
        base.device,
        mod.deltas,
        base_c.data_ptr(),
        DTYPE_CODES[base.dtype],
        merged_c.data_ptr() if merged_c is not None else 0,
        DTYPE_CODES[merged.dtype] if merged is not None else 0,
        new_c.data_ptr(),
        DTYPE_CODES[new.dtype],
        M.data_ptr() if M is not None else 0,
        T.data_ptr(),
        T.numel(),
        sums.ptr,
        *tail,
    )
    ss_m, ss_t = sums.finish()
    return M, T, (ss_m if merged is not None else None), ss_t  # type: ignore[return-value]


@_cupy_io
def sigma_update(
    M: torch.Tensor,
    Tp: torch.Tensor,
    lam_prev: float,
    out: torch.Tensor | None = None,
    *,
    accum: Any = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigma = lam_prev * M + T' (fp32; ``out`` may be ``M``) and its float64 sum of squares."""
    _check_fp32(M, "sigma_update", "M")
    _check_fp32(Tp, "sigma_update", "Tp")
    _check_like(Tp, M, "sigma_update", "Tp", "M")
    lam_prev = float(lam_prev)
    _f32(lam_prev, "sigma_update", "lam_prev")
    if out is not None:
        _check_fp32(out, "sigma_update", "out")
        _check_like(out, M, "sigma_update", "out", "M")
        _require(out.is_contiguous(), "sigma_update", "out must be contiguous")
    if _use_torch(backend):
        res = M * lam_prev + Tp
        if out is not None:
            out.copy_(res)
            res = out
        (ss,) = _torch_accumulate([_torch_sumsq(res)], accum, "sigma_update")
        return res, ss  # type: ignore[return-value]

    mod, tail = _kernels(M.device)
    M_c, Tp_c = M.contiguous(), Tp.contiguous()
    res = out if out is not None else torch.empty(M.shape, dtype=torch.float32, device=M.device)
    sums = _Sums(accum, 1, M.device, "sigma_update")
    _call("sigma_update", M.device, mod.sigma_update, M_c.data_ptr(), Tp_c.data_ptr(), lam_prev, res.data_ptr(),
          res.numel(), sums.ptr, *tail)
    (ss,) = sums.finish()
    return res, ss  # type: ignore[return-value]


@_cupy_io
def finalize(
    base: torch.Tensor,
    sigma: torch.Tensor,
    lam: float,
    out_dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """theta = base + sigma / lam in fp32, rounded to nearest even into ``out_dtype``."""
    _check_float(base, "finalize", "base")
    _check_fp32(sigma, "finalize", "sigma")
    _check_like(sigma, base, "finalize", "sigma", "base")
    _require(out_dtype in DTYPE_CODES, "finalize", f"out_dtype {out_dtype} is not float32, float16 or bfloat16")
    lam = float(lam)
    lam32 = _f32(lam, "finalize", "lam", nonzero=True)
    if out is not None:
        _require(out.dtype == out_dtype, "finalize", f"out has dtype {out.dtype}, expected {out_dtype}")
        _check_like(out, base, "finalize", "out", "base")
        _require(out.is_contiguous(), "finalize", "out must be contiguous")
    if _use_torch(backend):
        res = (base.float() + sigma / lam32).to(out_dtype)
        if out is not None:
            out.copy_(res)
            res = out
        return res

    mod, tail = _kernels(base.device)
    base_c, sigma_c = base.contiguous(), sigma.contiguous()
    res = out if out is not None else torch.empty(base.shape, dtype=out_dtype, device=base.device)
    _call("finalize", base.device, mod.finalize, base_c.data_ptr(), DTYPE_CODES[base.dtype], sigma_c.data_ptr(), lam,
          res.data_ptr(), DTYPE_CODES[out_dtype], res.numel(), *tail)
    return res


@_cupy_io
def sumsq(x: torch.Tensor, *, accum: Any = None, backend: str | None = None) -> torch.Tensor:
    """Float64 sum of squares of an fp32/fp16/bf16 tensor, as a 0-d tensor on its device."""
    _check_float(x, "sumsq", "x")
    if _use_torch(backend):
        return _torch_accumulate([_torch_sumsq(x.float())], accum, "sumsq")[0]  # type: ignore[return-value]
    mod, tail = _kernels(x.device)
    x_c = x.contiguous()
    sums = _Sums(accum, 1, x.device, "sumsq")
    _call("sumsq", x.device, mod.sumsq, x_c.data_ptr(), DTYPE_CODES[x.dtype], x_c.numel(), sums.ptr, *tail)
    return sums.finish()[0]  # type: ignore[return-value]


# ----------------------------------------------------------------------------- SVD
# CPU: per matrix, the float64 Gram matrix of the small side and its eigendecomposition
# (LAPACK syevd through torch/MKL), several single-threaded matrices side by side in a
# thread pool (torch releases the GIL) - see thin_svd for why.
_svd_pool: ThreadPoolExecutor | None = None
_svd_pool_size = 0
_svd_lock = threading.Lock()


def _reset_svd_pool_after_fork() -> None:
    # A forked child has none of the parent's pool threads: start a fresh pool there.
    global _svd_pool, _svd_pool_size, _svd_lock
    _svd_pool, _svd_pool_size, _svd_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_svd_pool_after_fork)


def _svd_workers(batch: int) -> int:
    env = os.environ.get("OPCM_SVD_WORKERS", "")
    n = int(env) if env.strip() else torch.get_num_threads()
    return max(1, min(n, batch))


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


def _thin_svd_cpu(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _thin_svd_cuda(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, m, n = A.shape
    k = min(m, n)
    mod, (stream,) = _kernels(A.device)
    U = torch.empty(B, m, k, dtype=torch.float32, device=A.device)
    S = torch.empty(B, k, dtype=torch.float32, device=A.device)
    V = torch.empty(B, n, k, dtype=torch.float32, device=A.device)
    info = torch.zeros(B, dtype=torch.int32, device=A.device)
    with torch.cuda.device(A.device):
        work_bytes = int(mod.svd_workspace_size(B, m, n))
    work = torch.empty(max(work_bytes, 1), dtype=torch.uint8, device=A.device)
    _call("thin_svd", A.device, mod.batched_thin_svd, A.data_ptr(), B, m, n, U.data_ptr(), S.data_ptr(), V.data_ptr(),
          work.data_ptr(), work_bytes, info.data_ptr(), stream)
    if bool((info != 0).any()):  # one sync per group
        bad = torch.nonzero(info).flatten().tolist()
        codes = info[bad].tolist()
        raise BackendError(
            f"ops.thin_svd: cuSOLVER did not converge for matrices {bad[:8]} of {B} (shape {m}x{n}; "
            f"info {codes[:8]}); check the inputs for NaN/Inf, or merge with --device cpu."
        )
    return U, S, V


@_cupy_io
def thin_svd(A: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of fp32 A[B,m,n] (or [m,n]): U[B,m,k], S[B,k] descending, V[B,n,k], k = min(m,n).

    The small side (V when m >= n, else U) is orthonormal; the other side's columns are
    orthonormal for every triplet project() keeps (S_i > S_1 * max(m, n) * eps32), and
    zero where S_i == 0 - the same contract as the CUDA kernel.

    CPU: per matrix, eigh of the float64 Gram matrix of the small side (_gram_eigh_svd),
    single-threaded matrices side by side in a thread pool (``OPCM_SVD_WORKERS``, default
    ``torch.get_num_threads()``). It costs the same as LAPACK sgesdd on the tall
    orientation but is float64-accurate (sgesdd's T' is off by up to 1e-2 for power-law
    spectra whose small singular values lie closer than eps32), and on 2 cores it is
    ~3x faster than torch's batched multi-threaded svd, whose OpenMP barriers also
    collapse when the cores are shared with other work.
    """
    _check_fp32(A, "thin_svd", "A")
    _require(A.dim() in (2, 3), "thin_svd", f"A must be [B, m, n] or [m, n], got shape {tuple(A.shape)}")
    squeeze = A.dim() == 2
    A3 = A.unsqueeze(0) if squeeze else A
    B, m, n = A3.shape
    if B == 0 or m == 0 or n == 0:
        k = min(m, n)
        z = dict(dtype=torch.float32, device=A.device)
        U, S, V = torch.zeros(B, m, k, **z), torch.zeros(B, k, **z), torch.zeros(B, n, k, **z)
    elif _use_torch(backend):
        u, S, vh = torch.linalg.svd(A3, full_matrices=False)
        U, V = u, vh.mT
    elif A.device.type == "cuda":
        U, S, V = _thin_svd_cuda(A3.contiguous())
    elif A.device.type == "cpu":
        U, S, V = _thin_svd_cpu(A3)
    else:
        raise BackendError(f"ops.thin_svd: no kernels for device {A.device}; use backend='torch'.")
    if squeeze:
        return U[0], S[0], V[0]
    return U, S, V


# ----------------------------------------------------------------------------- projection
@_cupy_io
def split_rank(S: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per matrix, the first 0-based k with cumsum(S)[k] / sum(S) > alpha, else 0 (int64[B])."""
    _require(isinstance(S, torch.Tensor) and S.dim() in (1, 2), "split_rank", "S must be [B, k] or [k]")
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"alpha must be in (0, 1], got {alpha}")
    S2 = S.unsqueeze(0) if S.dim() == 1 else S
    if S2.shape[-1] == 0:
        r = torch.zeros(S2.shape[0], dtype=torch.int64, device=S.device)
    else:
        share = torch.cumsum(S2, dim=-1) / S2.sum(dim=-1, keepdim=True)
        above = share > alpha  # NaN (all-zero S) compares False: r = 0
        r = torch.where(above.any(dim=-1), above.to(torch.uint8).argmax(dim=-1), 0).to(torch.int64)
    return r[0] if S.dim() == 1 else r


@_cupy_io
def keep_count(S: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Per matrix, the number of singular values above S[0] * max(m, n) * eps(fp32) (int64[B])."""
    S2 = S.unsqueeze(0) if S.dim() == 1 else S
    if S2.shape[-1] == 0:
        keep = torch.zeros(S2.shape[0], dtype=torch.int64, device=S.device)
    else:
        tol = S2[:, :1] * (max(m, n) * _EPS32)
        keep = (S2 > tol).sum(dim=-1).to(torch.int64)
    return keep[0] if S.dim() == 1 else keep


def _mask_torch(P: torch.Tensor, r: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    k = P.shape[-1]
    idx = torch.arange(k, device=P.device)
    in_r = idx[None, :] < r[:, None]  # [B, k]
    block = in_r[:, :, None] & in_r[:, None, :]
    diag = (~in_r) & (idx[None, :] < keep[:, None])
    return P * block + torch.diag_embed(torch.diagonal(P, dim1=-2, dim2=-1) * diag)


def _project_torch(T: torch.Tensor, U: torch.Tensor, V: torch.Tensor, r: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The spec's cheap exact form, matrix by matrix: T - U_r (U_r^T T V_r) V_r^T - sum_{r<=i<keep} d_i u_i v_i^T."""
    out = torch.empty_like(T)
    for b in range(T.shape[0]):
        rb, kb = int(r[b]), int(keep[b])
        Tb, Ub, Vb = T[b], U[b], V[b]
        Ur, Vr = Ub[:, :rb], Vb[:, :rb]
        res = Tb - Ur @ (Ur.mT @ Tb @ Vr) @ Vr.mT
        if kb > rb:
            Ud, Vd = Ub[:, rb:kb], Vb[:, rb:kb]
            d = (Ud * (Tb @ Vd)).sum(dim=0)  # d_i = u_i^T T v_i
            res = res - (Ud * d) @ Vd.mT
        out[b] = res
    return out


@_cupy_io
def project(
    T: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    alpha: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """OPCM projection T' of T[B,m,n] against the thin SVD (U, S, V) of M (the spec's cheap exact form).

    Triplets with S <= S[0] * max(m, n) * eps(fp32) are dropped (so M = 0 gives T' = T):
    keep = how many remain, r = split_rank(S with the dropped values set to 0, alpha).
    With P = U^T T V: T' = T - U Q V^T where Q keeps P's top-left r x r block and the
    diagonal entries r <= i < keep.
    """
    for name, x in (("T", T), ("U", U), ("S", S), ("V", V)):
        _check_fp32(x, "project", name)
    squeeze = T.dim() == 2
    if squeeze:
        T, U, S, V = T.unsqueeze(0), U.unsqueeze(0), S.unsqueeze(0), V.unsqueeze(0)
    _require(T.dim() == 3, "project", f"T must be [B, m, n] or [m, n], got shape {tuple(T.shape)}")
    B, m, n = T.shape
    k = min(m, n)
    _require(tuple(U.shape) == (B, m, k), "project", f"U has shape {tuple(U.shape)}, expected {(B, m, k)}")
    _require(tuple(S.shape) == (B, k), "project", f"S has shape {tuple(S.shape)}, expected {(B, k)}")
    _require(tuple(V.shape) == (B, n, k), "project", f"V has shape {tuple(V.shape)}, expected {(B, n, k)}")
    for name, x in (("U", U), ("S", S), ("V", V)):
        _require(x.device == T.device, "project", f"{name} is on {x.device} but T is on {T.device}")
    keep = keep_count(S, m, n)
    # The split rank counts the dropped triplets as exactly zero (SPEC, "Degenerate cases").
    S_kept = torch.where(torch.arange(k, device=S.device) < keep[:, None], S, 0.0)
    r = split_rank(S_kept, alpha)
    if B == 0 or k == 0:
        out = T.clone()
    elif _use_torch(backend):
        out = _project_torch(T, U, V, r, keep)
    else:
        mod, tail = _kernels(T.device)
        # P = U^T T V, associated so the intermediate has k rows or columns.
        P = torch.bmm(torch.bmm(U.mT, T), V) if m >= n else torch.bmm(U.mT, torch.bmm(T, V))
        P = P.contiguous()
        r_c, keep_c = r.contiguous(), keep.contiguous()
        _call("project", T.device, mod.mask_projection, P.data_ptr(), r_c.data_ptr(), keep_c.data_ptr(), B, k, P.data_ptr(), *tail)
        # T' = T - (U Q) V^T or T - U (Q V^T), whichever inner product is cheaper; one fused GEMM.
        if m <= n:
            out = torch.baddbmm(T, torch.bmm(U, P), V.mT, beta=1.0, alpha=-1.0)
        else:
            out = torch.baddbmm(T, U, torch.bmm(P, V.mT), beta=1.0, alpha=-1.0)
    return out[0] if squeeze else out
