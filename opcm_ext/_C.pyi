"""Type stub of ``opcm_ext._C``, the CPU kernels (csrc/bindings_cpu.cpp).

Tensors cross as raw addresses (``tensor.data_ptr()``), element counts and dtype codes
(0 float32, 1 float16, 2 bfloat16); ``sums_ptr`` points at float64 values the kernel ADDS to.
Each function's contract is its header's (csrc/update/update.h, csrc/project/project.h); every
call releases the GIL; bad arguments raise ValueError naming the argument.
"""

FLOAT32: int
FLOAT16: int
BFLOAT16: int

def deltas(base_ptr: int, base_dtype: int, merged_ptr: int, merged_dtype: int, new_ptr: int, new_dtype: int,
           out_m_ptr: int, out_t_ptr: int, n: int, sums_ptr: int) -> None:
    """M, T = merged - base, new - base in fp32; sums += their sums of squares (csrc/update/update.h)."""

def sigma_update(m_ptr: int, tp_ptr: int, lam_prev: float, out_ptr: int, n: int, sums_ptr: int) -> None:
    """out = lam_prev * M + T' in fp32; sums[0] += sum(out^2) (csrc/update/update.h)."""

def finalize(base_ptr: int, base_dtype: int, sigma_ptr: int, lam: float, out_ptr: int, out_dtype: int,
             n: int) -> None:
    """out = cast(base + sigma / lam), round to nearest even (csrc/update/update.h)."""

def sumsq(x_ptr: int, dtype: int, n: int, sums_ptr: int) -> None:
    """sums[0] += sum(x^2) in float64 (csrc/update/update.h)."""

def mask_projection(p_ptr: int, r_ptr: int, keep_ptr: int, batch: int, k: int, q_ptr: int) -> None:
    """Q = P masked to its leading r x r block and its diagonal r <= i < keep (csrc/project/project.h)."""

def build_info() -> dict[str, object]:
    """Compiler, OpenMP version, this thread's OpenMP max threads and the reduction block size."""
