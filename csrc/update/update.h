// Host entry points of the CPU element-wise kernels (opcm_ext._C).
//
// Tensors cross as raw addresses (Python ints) plus element counts and dtype
// codes (common/dtype.h). Every entry validates its arguments first (a
// std::invalid_argument naming the argument) and then runs OpenMP-parallel
// over fixed blocks with deterministic float64 reductions (common/parallel.h).
// "sums" points at float64 values the kernel ADDS to, so a caller can
// accumulate over a whole pass and read the result once.
#pragma once

#include <cstdint>

#include "common/check.h"

namespace opcm::cpu {

// M = f32(merged) - f32(base), T = f32(new) - f32(base), fp32 outputs.
// sums[0] += sum(M^2), sums[1] += sum(T^2). merged == 0: only T is formed,
// out_m is ignored and sums[0] left untouched. Outputs may alias fp32 inputs
// element for element.
void deltas(addr_t base, int base_dtype, addr_t merged, int merged_dtype, addr_t new_, int new_dtype,
            addr_t out_m, addr_t out_t, std::int64_t n, addr_t sums);

// out = f32(lam_prev) * M + T' (two fp32 roundings, like torch's M * lam + T);
// out may alias m or tp. sums[0] += sum(out^2).
void sigma_update(addr_t m, addr_t tp, double lam_prev, addr_t out, std::int64_t n, addr_t sums);

// out = cast(f32(base) + sigma / f32(lam)) (a true division, then round to
// nearest even into out_dtype).
void finalize(addr_t base, int base_dtype, addr_t sigma, double lam, addr_t out, int out_dtype,
              std::int64_t n);

// sums[0] += sum(f32(x)^2).
void sumsq(addr_t x, int dtype, std::int64_t n, addr_t sums);

}  // namespace opcm::cpu
