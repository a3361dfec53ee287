"""Type stub of ``opcm_ext._cuda``, the CUDA kernels (csrc/bindings_cuda.cpp).

Tensors cross as raw device addresses (``tensor.data_ptr()``), sizes and dtype codes
(0 float32, 1 float16, 2 bfloat16); the CUDA stream is the last argument of every launcher
(``torch.cuda.current_stream().cuda_stream``) and the work runs on the device owning the
pointers. Each function's contract is its header's (csrc/update/update.h,
csrc/project/project.h, csrc/svd/thin_svd.h); every call releases the GIL. Bad arguments raise
ValueError; CUDA, cuBLAS and cuSOLVER failures RuntimeError with csrc/...:line and the library's
error string. Load it through ``opcm_ext._native.cuda()``, which preloads the matching libraries.
"""

from typing import TypedDict

FLOAT32: int
FLOAT16: int
BFLOAT16: int

class BuildInfo(TypedDict):
    cuda_runtime_version: int
    cusolver_version: int
    cublas_version: int
    syev_batched: bool

class RuntimeInfo(TypedDict):
    cuda_runtime_version: int
    cuda_driver_version: int
    cusolver_version: int
    cublas_version: int
    device_count: int
    syev_batched: bool

def deltas(base_ptr: int, base_dtype: int, merged_ptr: int, merged_dtype: int, new_ptr: int, new_dtype: int,
           out_m_ptr: int, out_t_ptr: int, n: int, sums_ptr: int, stream: int) -> None:
    """M, T = merged - base, new - base in fp32; sums += their sums of squares (csrc/update/update.h)."""

def sigma_update(m_ptr: int, tp_ptr: int, lam_prev: float, out_ptr: int, n: int, sums_ptr: int,
                 stream: int) -> None:
    """out = lam_prev * M + T' in fp32; sums[0] += sum(out^2) (csrc/update/update.h)."""

def finalize(base_ptr: int, base_dtype: int, sigma_ptr: int, lam: float, out_ptr: int, out_dtype: int, n: int,
             stream: int) -> None:
    """out = cast(base + sigma / lam), round to nearest even (csrc/update/update.h)."""

def sumsq(x_ptr: int, dtype: int, n: int, sums_ptr: int, stream: int) -> None:
    """sums[0] += sum(x^2) in float64 (csrc/update/update.h)."""

def mask_projection(p_ptr: int, r_ptr: int, keep_ptr: int, batch: int, k: int, q_ptr: int, stream: int) -> None:
    """Q = P masked to its leading r x r block and its diagonal r <= i < keep (csrc/project/project.h)."""

def svd_workspace_size(batch: int, m: int, n: int) -> int:
    """Device bytes batched_thin_svd needs on the current device (csrc/svd/thin_svd.h)."""

def batched_thin_svd(a_ptr: int, batch: int, m: int, n: int, u_ptr: int, s_ptr: int, v_ptr: int, work_ptr: int,
                     work_bytes: int, info_ptr: int, stream: int) -> None:
    """Thin SVD of A [batch, m, n] fp32 into U, S, V and info (csrc/svd/thin_svd.h)."""

def init_handles() -> None:
    """Create the current device's cuBLAS/cuSOLVER handles (csrc/svd/thin_svd.h)."""

def build_info() -> BuildInfo:
    """Versions compiled against; whether syevBatched is compiled in (csrc/svd/thin_svd.h)."""

def runtime_info() -> RuntimeInfo:
    """Versions loaded in this process, device count, syevBatched usable (csrc/svd/thin_svd.h)."""

def _set_svd_path(path: int) -> None:
    """Test hook: 0 automatic, 1 Xsyevd per matrix, 2 gesvdj only (csrc/svd/thin_svd.h)."""
