"""The numerical ops of a merge step; the only module that knows backends.

Two implementations of every op, on the tensors' device and (on CUDA) the caller's current stream:

- native: CPU tensors use the compiled kernels ``opcm_ext._C`` (OpenMP) and the float64 Gram
  SVD of :mod:`opcm_ext._cpu_svd`; CUDA tensors use ``opcm_ext._cuda`` (GEMMs through torch);
- torch: plain torch twins, the second implementation the tests and the self-test compare with.

:func:`select` chooses once per step and device: native only after a load-time self-test
(handles created, every kernel run on a small input and compared with its twin; cached per
process and device) passed, else the twins, with the reason. The module functions take
``backend="native" | "torch" | None`` (None: what ``select(tensor.device)`` chose).

Norms come back as 0-d float64 tensors on the tensors' device, so a caller synchronises once
per pass rather than once per tensor. Element-wise results are fp32 with the same IEEE
operation order as the twins (bit-identical on CPU); the CPU kernels reduce fixed 32768-element
blocks in a fixed order (reproducible for any thread count, ~1e-15 from torch's float64 sum).
CuPy arrays are accepted too (DLPack) and give CuPy arrays back.
"""

from __future__ import annotations

import functools
import math
import struct
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import _native
from ._cpu_svd import svd_project_cpu, svd_workers, svd_workspace_bytes, thin_svd_cpu
from ._projection import mask_twin as _mask_torch, project_twin as _project_torch  # noqa: F401 (the twins)
from .errors import BackendError, ConfigError

__all__ = [
    "DTYPE_CODES",
    "Ops",
    "select",
    "deltas",
    "sigma_update",
    "finalize",
    "thin_svd",
    "split_rank",
    "keep_count",
    "project",
    "svd_project",
    "sumsq",
    "svd_workspace_bytes",
    "device_svd_workspace_bytes",
    "svd_parallelism",
]

#: dtype codes understood by the kernels of ``_C`` and ``_cuda`` (csrc/common/dtype.h).
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_EPS32 = torch.finfo(torch.float32).eps
_BACKENDS = ("auto", "native", "torch")


# ----------------------------------------------------------------------------- the backend choice
@dataclass(frozen=True)
class Ops:
    """The ops of one device, bound to the backend :func:`select` chose (native kernels or torch twins)."""

    device: torch.device
    native: bool
    reason: str | None = None  # why the native kernels are not used (None: they are, or torch was asked for)

    @property
    def _backend(self) -> str:
        return "native" if self.native else "torch"

    def deltas(self, base: Any, merged: Any, new: Any) -> tuple[Any, Any, Any, Any]:
        """See :func:`deltas`."""
        return deltas(base, merged, new, backend=self._backend)

    def sigma_update(self, M: Any, Tp: Any, lam_prev: float, out: Any = None) -> tuple[Any, Any]:
        """See :func:`sigma_update`."""
        return sigma_update(M, Tp, lam_prev, out, backend=self._backend)

    def finalize(self, base: Any, sigma: Any, lam: float, out_dtype: torch.dtype, out: Any = None) -> Any:
        """See :func:`finalize`."""
        return finalize(base, sigma, lam, out_dtype, out, backend=self._backend)

    def thin_svd(self, A: Any) -> tuple[Any, Any, Any]:
        """See :func:`thin_svd`."""
        return thin_svd(A, backend=self._backend)

    def project(self, T: Any, U: Any, S: Any, V: Any, alpha: float) -> Any:
        """See :func:`project`."""
        return project(T, U, S, V, alpha, backend=self._backend)

    def svd_project(self, Ms: list[Any], Ts: list[Any], alpha: float) -> tuple[list[Any], dict[str, float]]:
        """See :func:`svd_project`."""
        return svd_project(Ms, Ts, alpha, backend=self._backend)

    def sumsq(self, x: Any) -> Any:
        """See :func:`sumsq`."""
        return sumsq(x, backend=self._backend)

    def split_rank(self, S: Any, alpha: float) -> Any:
        """See :func:`split_rank` (one implementation: float64 torch ops)."""
        return split_rank(S, alpha)


def select(device: str | torch.device = "auto", backend: str = "auto") -> Ops:
    """The ops for one device: the native kernels when their self-test passes, else the torch twins.

    ``device="auto"``: CUDA when torch sees a GPU, else the CPU. ``backend="auto"`` falls back to
    the twins with ``reason`` saying why; ``"native"`` raises BackendError naming the cause
    instead; ``"torch"`` always uses the twins. A CUDA device without a GPU is a ConfigError.
    """
    b = str(backend).lower()
    if b not in _BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use 'auto', 'native' or 'torch'.")
    dev = _resolve_device(device)
    if b == "torch":
        return Ops(dev, False, None)
    why = _verdict(dev)
    if why is None:
        return Ops(dev, True, None)
    if b == "native":
        raise BackendError(f"backend='native' cannot run on {dev}: {why}")
    return Ops(dev, False, f"native kernels not used on {dev}: {why}; running the torch ops instead")


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'.") from e
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        what = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU (no device or no driver)"
        raise ConfigError(f"device {str(device)!r} was asked for but torch {torch.__version__} {what}; fix: use "
                          "device 'cpu' or 'auto', or install a CUDA build of torch on a machine with a GPU.")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s).")
    return torch.device("cuda", index)


_verdicts: dict[str, str | None] = {}  # device -> None (native passed its self-test) or why not
_verdict_lock = threading.Lock()


def _verdict(dev: torch.device) -> str | None:
    with _verdict_lock:
        if str(dev) not in _verdicts:
            _verdicts[str(dev)] = _self_test(dev)
        return _verdicts[str(dev)]


def _self_test(dev: torch.device) -> str | None:
    """None when the native kernels on `dev` load and agree with their twins on small inputs; else why not."""
    if dev.type not in ("cpu", "cuda"):
        return f"there are no native kernels for {dev.type} devices"
    try:
        if dev.type == "cuda":
            mod = _native.cuda()
            info = mod.runtime_info()
            driver, runtime = info["cuda_driver_version"], info["cuda_runtime_version"]
            if driver // 1000 < runtime // 1000:
                return (f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10} but opcm_ext._cuda "
                        f"uses the CUDA {runtime // 1000}.{runtime % 1000 // 10} runtime; fix: update the driver")
            try:
                with torch.cuda.device(dev):
                    mod.init_handles()
            except RuntimeError as e:
                return f"creating the cuBLAS/cuSOLVER handles on {dev} failed ({e})"
        else:
            _native.cpu()
        _compare_with_twins(dev)
    except BackendError as e:
        return str(e).rstrip(".")
    except (RuntimeError, ValueError) as e:
        return f"the self-test failed: {e}"
    return None


def _compare_with_twins(dev: torch.device) -> None:
    """Every native op on a small input against its torch twin; RuntimeError naming the first that differs."""
    g = torch.Generator().manual_seed(1234)
    rand = lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=g).to(dtype).to(dev)  # noqa: E731
    base, merged, new = rand(1031, dtype=torch.bfloat16), rand(1031, dtype=torch.float16), rand(1031)
    A, T = rand(2, 40, 24), rand(2, 40, 24)
    lam = 1.7320508075688772
    results: dict[str, list[Any]] = {}
    for backend in ("native", "torch"):
        M, Tn, sm, st = deltas(base, merged, new, backend=backend)
        sig, ss = sigma_update(M, Tn, lam, backend=backend)
        out = finalize(base, sig, lam, torch.bfloat16, backend=backend)
        U, S, V = thin_svd(A, backend=backend)
        Tp = project(T, U, S, V, 0.5, backend=backend)
        results[backend] = [M, Tn, sm, st, sig, ss, out, sumsq(new, backend=backend), S, Tp]
    names = ["deltas (M)", "deltas (T)", "deltas (sum M^2)", "deltas (sum T^2)", "sigma_update",
             "sigma_update (sum)", "finalize", "sumsq", "thin_svd (S)", "thin_svd + project"]
    rtol = [2.0**-22, 2.0**-22, 1e-10, 1e-10, 2.0**-22, 1e-10, 2.0**-7, 1e-10, 1e-4, 1e-4]
    for name, tol, got, want in zip(names, rtol, results["native"], results["torch"]):
        got, want = got.double(), want.double()
        err = float((got - want).norm() / want.norm().clamp_min(1e-300)) if got.numel() > 1 else abs(
            float(got) - float(want)) / max(abs(float(want)), 1e-300)
        if not math.isfinite(err) or err > tol:
            raise RuntimeError(f"{name} differs from its torch twin on {dev} (relative error {err:.3g} > {tol:.3g})")


_warned: set[str] = set()


def _use_native(backend: str | None, device: torch.device, op: str) -> bool:
    """True: run the compiled kernels; False: the torch twins (None: what select(device) chose)."""
    if backend == "native":
        return True
    if backend == "torch":
        return False
    if backend is not None and backend != "auto":
        raise ConfigError(f"ops.{op}: unknown backend {backend!r}; use 'native', 'torch' or None (auto).")
    chosen = select(device)
    if chosen.reason and str(device) not in _warned:
        _warned.add(str(device))
        warnings.warn(f"opcm: {chosen.reason}", RuntimeWarning, stacklevel=3)
    return chosen.native


# ----------------------------------------------------------------------------- plumbing
def _is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".", 1)[0] == "cupy"


def _cupy_io(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Accept CuPy arrays (torch.from_dlpack) and return CuPy arrays when any input was one."""

    def to_cupy(x: Any) -> Any:
        if isinstance(x, tuple):
            return tuple(to_cupy(v) for v in x)
        if isinstance(x, torch.Tensor):
            import cupy  # type: ignore[import-not-found]

            return cupy.from_dlpack(x)
        return x

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not any(_is_cupy(v) for v in (*args, *kwargs.values())):
            return fn(*args, **kwargs)  # the common case: torch tensors only
        conv = lambda x: torch.from_dlpack(x) if _is_cupy(x) else x  # noqa: E731
        return to_cupy(fn(*map(conv, args), **{k: conv(v) for k, v in kwargs.items()}))

    return wrapper


def _require(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"ops.{op}: {msg}")


def _check_float(x: torch.Tensor, op: str, arg: str, fp32_only: bool = False) -> None:
    _require(isinstance(x, torch.Tensor), op, f"{arg} must be a torch tensor or CuPy array, got {type(x).__name__}")
    if fp32_only:
        _require(x.dtype == torch.float32, op, f"{arg} has dtype {x.dtype}; expected float32")
    else:
        _require(x.dtype in DTYPE_CODES, op, f"{arg} has dtype {x.dtype}; expected float32, float16 or bfloat16")


def _check_like(x: torch.Tensor, ref: torch.Tensor, op: str, arg: str, ref_arg: str) -> None:
    _require(x.shape == ref.shape, op, f"{arg} has shape {tuple(x.shape)} but {ref_arg} has {tuple(ref.shape)}")
    _require(x.device == ref.device, op, f"{arg} is on {x.device} but {ref_arg} is on {ref.device}")


def _check_out(out: torch.Tensor | None, dtype: torch.dtype, ref: torch.Tensor, op: str, ref_arg: str) -> None:
    if out is not None:
        _require(isinstance(out, torch.Tensor) and out.dtype == dtype, op, f"out must be a {dtype} tensor")
        _check_like(out, ref, op, "out", ref_arg)
        _require(out.is_contiguous(), op, "out must be contiguous")


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
        return _native.cuda(), (torch.cuda.current_stream(device).cuda_stream,)
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


def _sums(count: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(count, dtype=torch.float64, device=device)


def _torch_sumsq(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64).square().sum()


# ----------------------------------------------------------------------------- element-wise ops
@_cupy_io
def deltas(
    base: torch.Tensor, merged: torch.Tensor | None, new: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Task vectors M = merged - base, T = new - base (fp32) and their float64 sums of squares (0-d)."""
    _check_float(base, "deltas", "base")
    _check_float(new, "deltas", "new")
    _check_like(new, base, "deltas", "new", "base")
    if merged is not None:
        _check_float(merged, "deltas", "merged")
        _check_like(merged, base, "deltas", "merged", "base")
    if not _use_native(backend, base.device, "deltas"):
        b = base.float()
        T = new.float() - b
        M = merged.float() - b if merged is not None else None
        return M, T, (_torch_sumsq(M) if M is not None else None), _torch_sumsq(T)

    mod, tail = _kernels(base.device)
    base_c, new_c = base.contiguous(), new.contiguous()
    merged_c = merged.contiguous() if merged is not None else None
    T = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    M = torch.empty_like(T) if merged is not None else None
    sums = _sums(2, base.device)
    _call("deltas", base.device, mod.deltas, base_c.data_ptr(), DTYPE_CODES[base.dtype],
          merged_c.data_ptr() if merged_c is not None else 0, DTYPE_CODES[merged.dtype] if merged is not None else 0,
          new_c.data_ptr(), DTYPE_CODES[new.dtype], M.data_ptr() if M is not None else 0, T.data_ptr(), T.numel(),
          sums.data_ptr(), *tail)
    return M, T, (sums[0] if merged is not None else None), sums[1]


@_cupy_io
def sigma_update(
    M: torch.Tensor, Tp: torch.Tensor, lam_prev: float, out: torch.Tensor | None = None, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigma = lam_prev * M + T' (fp32; ``out`` may be ``M``) and its float64 sum of squares (0-d)."""
    _check_float(M, "sigma_update", "M", fp32_only=True)
    _check_float(Tp, "sigma_update", "Tp", fp32_only=True)
    _check_like(Tp, M, "sigma_update", "Tp", "M")
    lam_prev = float(lam_prev)
    _f32(lam_prev, "sigma_update", "lam_prev")
    _check_out(out, torch.float32, M, "sigma_update", "M")
    if not _use_native(backend, M.device, "sigma_update"):
        res = M * lam_prev + Tp
        if out is not None:
            res = out.copy_(res)
        return res, _torch_sumsq(res)

    mod, tail = _kernels(M.device)
    M_c, Tp_c = M.contiguous(), Tp.contiguous()
    res = out if out is not None else torch.empty(M.shape, dtype=torch.float32, device=M.device)
    sums = _sums(1, M.device)
    _call("sigma_update", M.device, mod.sigma_update, M_c.data_ptr(), Tp_c.data_ptr(), lam_prev, res.data_ptr(),
          res.numel(), sums.data_ptr(), *tail)
    return res, sums[0]


@_cupy_io
def finalize(
    base: torch.Tensor, sigma: torch.Tensor, lam: float, out_dtype: torch.dtype, out: torch.Tensor | None = None, *,
    backend: str | None = None,
) -> torch.Tensor:
    """theta = base + sigma / lam in fp32, rounded to nearest even into ``out_dtype``."""
    _check_float(base, "finalize", "base")
    _check_float(sigma, "finalize", "sigma", fp32_only=True)
    _check_like(sigma, base, "finalize", "sigma", "base")
    _require(out_dtype in DTYPE_CODES, "finalize", f"out_dtype {out_dtype} is not float32, float16 or bfloat16")
    lam = float(lam)
    lam32 = _f32(lam, "finalize", "lam", nonzero=True)
    _check_out(out, out_dtype, base, "finalize", "base")
    if not _use_native(backend, base.device, "finalize"):
        res = (base.float() + sigma / lam32).to(out_dtype)
        return out.copy_(res) if out is not None else res

    mod, tail = _kernels(base.device)
    base_c, sigma_c = base.contiguous(), sigma.contiguous()
    res = out if out is not None else torch.empty(base.shape, dtype=out_dtype, device=base.device)
    _call("finalize", base.device, mod.finalize, base_c.data_ptr(), DTYPE_CODES[base.dtype], sigma_c.data_ptr(), lam,
          res.data_ptr(), DTYPE_CODES[out_dtype], res.numel(), *tail)
    return res


@_cupy_io
def sumsq(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Float64 sum of squares of an fp32/fp16/bf16 tensor, as a 0-d tensor on its device."""
    _check_float(x, "sumsq", "x")
    if not _use_native(backend, x.device, "sumsq"):
        return _torch_sumsq(x.float())
    mod, tail = _kernels(x.device)
    x_c = x.contiguous()
    sums = _sums(1, x.device)
    _call("sumsq", x.device, mod.sumsq, x_c.data_ptr(), DTYPE_CODES[x.dtype], x_c.numel(), sums.data_ptr(), *tail)
    return sums[0]


# ----------------------------------------------------------------------------- SVD
def svd_parallelism(device: torch.device) -> int:
    """How many matrices of a batch the native thin SVD decomposes side by side on ``device``."""
    return svd_workers() if torch.device(device).type == "cpu" else 1


def device_svd_workspace_bytes(m: int, n: int, batch: int, device: str | torch.device | None = None) -> int:
    """Device bytes a CUDA thin_svd of `batch` m x n matrices needs beyond its inputs and outputs.

    Exact (the native module's own query) when ``opcm_ext._cuda`` is loaded and a GPU is visible;
    otherwise an estimate: the fp64 copies and factors, 32 MiB for cuBLAS and a k x k solver
    workspace per matrix (k = min(m, n)).
    """
    k = min(m, n)
    if batch <= 0 or k <= 0:
        return 0
    if torch.cuda.is_available() and _native.has_cuda():
        dev = _resolve_device("cuda" if device is None else device)
        with torch.cuda.device(dev):
            return int(_native.cuda().svd_workspace_size(batch, m, n))
    return batch * (16 * m * n + 24 * k * k + 28 * k) + (32 << 20)


def _thin_svd_cuda(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, m, n = A.shape
    k = min(m, n)
    mod, (stream,) = _kernels(A.device)
    U = torch.empty(B, m, k, dtype=torch.float32, device=A.device)
    S = torch.empty(B, k, dtype=torch.float32, device=A.device)
    V = torch.empty(B, n, k, dtype=torch.float32, device=A.device)
    info = torch.zeros(B, dtype=torch.int32, device=A.device)
    work_bytes = int(_call("thin_svd", A.device, mod.svd_workspace_size, B, m, n))
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
    orthonormal for every triplet project() keeps (S_i > S_1 * max(m, n) * eps32), and zero
    where S_i == 0. Native: the float64 Gram route (CPU: opcm_ext._cpu_svd, CUDA:
    csrc/svd/thin_svd.h); torch: torch.linalg.svd.
    """
    _check_float(A, "thin_svd", "A", fp32_only=True)
    _require(A.dim() in (2, 3), "thin_svd", f"A must be [B, m, n] or [m, n], got shape {tuple(A.shape)}")
    squeeze = A.dim() == 2
    A3 = A.unsqueeze(0) if squeeze else A
    B, m, n = A3.shape
    if B == 0 or m == 0 or n == 0:
        k = min(m, n)
        z = dict(dtype=torch.float32, device=A.device)
        U, S, V = torch.zeros(B, m, k, **z), torch.zeros(B, k, **z), torch.zeros(B, n, k, **z)
    elif not _use_native(backend, A.device, "thin_svd"):
        u, S, vh = torch.linalg.svd(A3, full_matrices=False)
        U, V = u, vh.mT
    elif A.device.type == "cuda":
        U, S, V = _thin_svd_cuda(A3.contiguous())
    elif A.device.type == "cpu":
        U, S, V = thin_svd_cpu(A3)
    else:
        raise BackendError(f"ops.thin_svd: no kernels for device {A.device}; use backend='torch'.")
    if squeeze:
        return U[0], S[0], V[0]
    return U, S, V


# ----------------------------------------------------------------------------- projection
@_cupy_io
def split_rank(S: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per matrix, the first 0-based k with cumsum(S)[k] / sum(S) > alpha, else 0 (int64[B]).

    In float64, with sum(S) taken as the last cumulative sum (as the reference does), so the last
    share is exactly 1 and alpha = 1 always gives r = 0; an all-zero S gives r = 0.
    """
    _require(isinstance(S, torch.Tensor) and S.dim() in (1, 2), "split_rank", "S must be [B, k] or [k]")
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"alpha must be in (0, 1], got {alpha}")
    S2 = (S.unsqueeze(0) if S.dim() == 1 else S).to(torch.float64)
    if S2.shape[-1] == 0:
        r = torch.zeros(S2.shape[0], dtype=torch.int64, device=S.device)
    else:
        c = torch.cumsum(S2, dim=-1)
        total = c[:, -1:]
        above = (c / total > alpha) & (total > 0)
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


def _ranks(S: torch.Tensor, m: int, n: int, alpha: float) -> tuple[Any, Any]:
    """(r, keep) per matrix; the split rank counts the dropped triplets as exactly zero (the degenerate-case rule)."""
    keep = keep_count(S, m, n)
    kept = torch.arange(S.shape[-1], device=S.device) < (keep[:, None] if S.dim() == 2 else keep)
    return split_rank(torch.where(kept, S, 0.0), alpha), keep


@_cupy_io
def project(
    T: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, alpha: float, *, backend: str | None = None
) -> torch.Tensor:
    """OPCM projection T' of T[B,m,n] against the thin SVD (U, S, V) of M (the cheap exact form).

    Triplets with S <= S[0] * max(m, n) * eps(fp32) are dropped (so M = 0 gives T' = T):
    keep = how many remain, r = split_rank(S with the dropped values set to 0, alpha).
    With P = U^T T V: T' = T - U Q V^T where Q keeps P's top-left r x r block and the
    diagonal entries r <= i < keep.
    """
    for name, x in (("T", T), ("U", U), ("S", S), ("V", V)):
        _check_float(x, "project", name, fp32_only=True)
    squeeze = T.dim() == 2
    if squeeze:
        T, U, S, V = T.unsqueeze(0), U.unsqueeze(0), S.unsqueeze(0), V.unsqueeze(0)
    _require(T.dim() == 3, "project", f"T must be [B, m, n] or [m, n], got shape {tuple(T.shape)}")
    B, m, n = T.shape
    k = min(m, n)
    for name, x, want in (("U", U, (B, m, k)), ("S", S, (B, k)), ("V", V, (B, n, k))):
        _require(tuple(x.shape) == want, "project", f"{name} has shape {tuple(x.shape)}, expected {want}")
        _require(x.device == T.device, "project", f"{name} is on {x.device} but T is on {T.device}")
    r, keep = _ranks(S, m, n, alpha)
    if B == 0 or k == 0:
        out = T.clone()
    elif T.device.type != "cuda" or not _use_native(backend, T.device, "project"):
        # On the CPU the cheap form is also the fast one (it skips Q's zero blocks); the CUDA
        # kernels mask P = U^T T V in place and rebuild T' with two batched GEMMs.
        out = _project_torch(T, U, V, r, keep)
    else:
        mod, tail = _kernels(T.device)
        # P = U^T T V, associated so the intermediate has k rows or columns.
        P = (torch.bmm(torch.bmm(U.mT, T), V) if m >= n else torch.bmm(U.mT, torch.bmm(T, V))).contiguous()
        r, keep = r.contiguous(), keep.contiguous()
        _call("project", T.device, mod.mask_projection, P.data_ptr(), r.data_ptr(), keep.data_ptr(), B, k, P.data_ptr(), *tail)
        # T' = T - (U Q) V^T or T - U (Q V^T), whichever inner product is cheaper; one fused GEMM.
        if m <= n:
            out = torch.baddbmm(T, torch.bmm(U, P), V.mT, beta=1.0, alpha=-1.0)
        else:
            out = torch.baddbmm(T, U, torch.bmm(P, V.mT), beta=1.0, alpha=-1.0)
    return out[0] if squeeze else out


def svd_project(
    Ms: list[torch.Tensor], Ts: list[torch.Tensor], alpha: float, *, backend: str | None = None
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """project(T_i, *thin_svd(M_i), alpha) for same-shape fp32 matrices, and {"svd": s, "project": s}.

    Native on the CPU one single-threaded worker decomposes and projects each matrix, reusing its
    float64 buffers (_cpu_svd.svd_project_cpu: no stacked copies); elsewhere thin_svd + project.
    """
    _require(len(Ms) == len(Ts), "svd_project", f"{len(Ms)} matrices M but {len(Ts)} matrices T")
    for i, (M, T) in enumerate(zip(Ms, Ts)):
        _check_float(M, "svd_project", f"M[{i}]", fp32_only=True), _check_float(T, "svd_project", f"T[{i}]", True)
        _require(M.dim() == 2 and tuple(M.shape) == tuple(T.shape) == tuple(Ms[0].shape), "svd_project",
                 f"M[{i}] {tuple(M.shape)} and T[{i}] {tuple(T.shape)} must be matrices of the shape of M[0]")
    if not Ms:
        return [], {"svd": 0.0, "project": 0.0}
    if Ms[0].device.type == "cpu" and _use_native(backend, Ms[0].device, "svd_project"):
        return svd_project_cpu(Ms, Ts, lambda S: _ranks(S, *Ms[0].shape, alpha))
    t0 = time.perf_counter()
    U, S, V = thin_svd(torch.stack(Ms), backend=backend)
    t1 = time.perf_counter()
    out = list(project(torch.stack(Ts), U, S, V, alpha, backend=backend).unbind(0))
    return out, {"svd": t1 - t0, "project": time.perf_counter() - t1}
