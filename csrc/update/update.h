// The element-wise passes of a merge step: the one statement of their contract,
// implemented by update_cpu.cpp (opcm_ext._C) and update.cu (opcm_ext._cuda).
//
// Tensors cross as raw addresses (Python ints) plus element counts and dtype
// codes (common/dtype.h: 0 float32, 1 float16, 2 bfloat16). "sums" points at
// float64 values the kernel ADDS to (the caller zeroes them). Element-wise
// results are the same IEEE fp32 operations as the torch twins in
// opcm_ext/ops.py: no FMA contraction, true division, round to nearest even.
// Every entry validates its arguments first (std::invalid_argument naming the
// argument, common/check.h). The CPU kernels are OpenMP-parallel with
// deterministic float64 reductions (common/parallel.h); the CUDA launchers take
// the stream last, enqueue on it, and run on the device owning the pointers.
#pragma once

#include <cstdint>

#include "common/check.h"

// deltas: M = f32(merged) - f32(base), T = f32(new) - f32(base), fp32 outputs;
// sums[0] += sum(M^2), sums[1] += sum(T^2). merged == 0: only T is formed,
// out_m is ignored and sums[0] left untouched. Outputs may alias fp32 inputs
// element for element.
//
// sigma_update: out = f32(lam_prev) * M + T' (two fp32 roundings, like torch's
// M * lam + T'); out may alias m or tp. sums[0] += sum(out^2).
//
// finalize: out = cast(f32(base) + sigma / f32(lam)), rounded to nearest even
// into out_dtype; lam must be finite and non-zero in float32.
//
// sumsq: sums[0] += sum(f32(x)^2).
namespace opcm::cpu {
void deltas(addr_t base, int base_dtype, addr_t merged, int merged_dtype, addr_t new_, int new_dtype,
            addr_t out_m, addr_t out_t, std::int64_t n, addr_t sums);
void sigma_update(addr_t m, addr_t tp, double lam_prev, addr_t out, std::int64_t n, addr_t sums);
void finalize(addr_t base, int base_dtype, addr_t sigma, double lam, addr_t out, int out_dtype,
              std::int64_t n);
void sumsq(addr_t x, int dtype, std::int64_t n, addr_t sums);
}  // namespace opcm::cpu

namespace opcm::cuda {
void deltas(addr_t base, int base_dtype, addr_t merged, int merged_dtype, addr_t new_, int new_dtype,
            addr_t out_m, addr_t out_t, std::int64_t n, addr_t sums, addr_t stream);
void sigma_update(addr_t m, addr_t tp, double lam_prev, addr_t out, std::int64_t n, addr_t sums,
                  addr_t stream);
void finalize(addr_t base, int base_dtype, addr_t sigma, double lam, addr_t out, int out_dtype,
              std::int64_t n, addr_t stream);
void sumsq(addr_t x, int dtype, std::int64_t n, addr_t sums, addr_t stream);
}  // namespace opcm::cuda
