"""Typed stub of the compiled CUDA module ``opcm_ext._cuda`` (csrc/bindings_cuda.cpp).

Tensors cross as raw device addresses (``tensor.data_ptr()``) plus sizes and
dtype codes (``FLOAT32 = 0``, ``FLOAT16 = 1``, ``BFLOAT16 = 2``). The CUDA
stream is the last argument of every launcher
(``torch.cuda.current_stream().cuda_stream``; 0 = the legacy default stream)
and all work is enqueued on it; every call releases the GIL and runs on the
device that owns the pointers. Bad arguments raise ``ValueError``; CUDA,
cuBLAS and cuSOLVER failures raise ``RuntimeError`` with ``csrc/...:line`` and
the library's error string. Norm accumulators are float64 device arrays that
the kernels ADD to (zero them first).
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

def deltas(
    base_ptr: int,
    base_dtype: int,
    merged_ptr: int,
    merged_dtype: int,
    new_ptr: int,
    new_dtype: int,
    out_m_ptr: int,
    out_t_ptr: int,
    n: int,
    sums_ptr: int,
    stream: int,
) -> None:
    """M = f32(merged) - f32(base), T = f32(new) - f32(base) (fp32 out); sums[0] += sum(M^2), sums[1] += sum(T^2).

    ``merged_ptr == 0``: only T is formed, ``out_m_ptr`` is ignored and sums[0] is untouched.
    """

def sigma_update(
    m_ptr: int, tp_ptr: int, lam_prev: float, out_ptr: int, n: int, sums_ptr: int, stream: int
) -> None:
    """out = f32(lam_prev) * M + T' in fp32 (two roundings, like torch); out may alias M; sums[0] += sum(out^2)."""

def finalize(
    base_ptr: int,
    base_dtype: int,
    sigma_ptr: int,
    lam: float,
    out_ptr: int,
    out_dtype: int,
    n: int,
    stream: int,
) -> None:
    """out = cast(f32(base) + sigma / f32(lam)), fp32 arithmetic, round-to-nearest-even cast."""

def mask_projection(
    p_ptr: int, r_ptr: int, keep_ptr: int, batch: int, k: int, q_ptr: int, stream: int
) -> None:
    """Q[i,j] = P[i,j] if i<r and j<r; Q[i,i] = P[i,i] if r<=i<keep; else 0.

    P, Q: [batch, k, k] fp32 row-major (Q may alias P); r, keep: int64[batch] device arrays.
    """

def sumsq(x_ptr: int, dtype: int, n: int, sums_ptr: int, stream: int) -> None:
    """sums[0] += sum(f32(x)^2)."""

def svd_workspace_size(batch: int, m: int, n: int) -> int:
    """Bytes of device workspace ``batched_thin_svd`` needs for [batch, m, n] on the current device.

    About 16*m*n + 16*k*k + 28*k bytes per matrix (k = min(m, n)), plus 4 MiB for
    cuBLAS and the larger of cusolverDnXsyevBatched's and the gesvdj fallback's
    workspaces. 0 when batch == 0 or k == 0.
    """

def batched_thin_svd(
    a_ptr: int,
    batch: int,
    m: int,
    n: int,
    u_ptr: int,
    s_ptr: int,
    v_ptr: int,
    work_ptr: int,
    work_bytes: int,
    info_ptr: int,
    stream: int,
) -> None:
    """Thin SVD of A [batch, m, n] fp32 row-major.

    Writes U [batch, m, k], S [batch, k] (descending) and V [batch, n, k], fp32
    row-major with k = min(m, n), and info int32[batch] (0 = success; non-zero:
    neither the eigensolver nor the gesvdj fallback converged, the caller must
    raise). The small side (V if m >= n, else U) is orthonormal. On the big side
    (U = A V / S if m >= n, else V = A^T U / S) the columns of the triplets the
    projection keeps (sigma_i > sigma_1 * max(m, n) * eps32) are re-orthonormalised
    in fp64; the others are left as computed (unit, or zero when sigma_i == 0).
    ``work_ptr`` must hold ``svd_workspace_size(batch, m,
    n)`` bytes. Synchronises ``stream`` once (to read the eigensolver's info).
    """

def build_info() -> BuildInfo:
    """Versions compiled against and whether cusolverDnXsyevBatched is used."""

def _force_svd_fallback(enabled: bool) -> None:
    """Test hook: route every ``batched_thin_svd`` matrix through the per-matrix gesvdj fallback."""
