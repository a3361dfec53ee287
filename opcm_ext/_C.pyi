"""Type stub of ``opcm_ext._C``: the CPU kernels (C++17 + OpenMP; csrc/bindings_cpu.cpp).

Tensors cross as raw addresses (``tensor.data_ptr()``), element counts and dtype codes
(0 float32, 1 float16, 2 bfloat16). ``sums_ptr`` points at float64 values the kernel ADDS
to. Every function releases the GIL; bad arguments raise ValueError naming the argument.
``opcm_ext._cuda`` has the same functions with a trailing ``stream`` argument.
"""

FLOAT32: int
FLOAT16: int
BFLOAT16: int

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
) -> None:
    """M = f32(merged) - f32(base), T = f32(new) - f32(base); sums[0] += sum(M^2), sums[1] += sum(T^2).

    merged_ptr == 0: only T is formed (out_m_ptr ignored, sums[0] untouched).
    """

def sigma_update(m_ptr: int, tp_ptr: int, lam_prev: float, out_ptr: int, n: int, sums_ptr: int) -> None:
    """out = lam_prev * M + T' (fp32; out may alias M); sums[0] += sum(out^2)."""

def finalize(
    base_ptr: int, base_dtype: int, sigma_ptr: int, lam: float, out_ptr: int, out_dtype: int, n: int
) -> None:
    """out = cast(f32(base) + sigma / lam), rounded to nearest even."""

def mask_projection(p_ptr: int, r_ptr: int, keep_ptr: int, batch: int, k: int, q_ptr: int) -> None:
    """Q[i,j] = P[i,j] if i<r and j<r; Q[i,i] = P[i,i] if r<=i<keep; else 0 (P, Q fp32 [batch,k,k]; r, keep int64[batch])."""

def sumsq(x_ptr: int, dtype: int, n: int, sums_ptr: int) -> None:
    """sums[0] += sum(f32(x)^2)."""

def build_info() -> dict[str, object]:
    """Compiler, OpenMP version, this thread's OpenMP max threads, reduction block size."""
