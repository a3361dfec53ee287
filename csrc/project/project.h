// The projection mask: the one statement of its contract, implemented by
// project_cpu.cpp (opcm_ext._C) and mask.cu (opcm_ext._cuda).
//
// mask_projection: P, Q: [batch, k, k] fp32 row-major; r, keep: int64[batch].
//   Q[i,j] = P[i,j] if i < r and j < r;  Q[i,i] = P[i,i] if r <= i < keep;
//   every other entry +0.
// With P = U^T T V this makes T' = T - U Q V^T the cheap exact OPCM projection
// (opcm_ext/ops.py: project), with the triplets i >= keep (sigma ~ 0) dropped.
// Since 2026-12-01 only the CUDA path masks: on the CPU, T - Y V^T (opcm_ext/_projection.py)
// skips Q's zero blocks and is 1.45x faster; project_cpu.cpp stays the contract's host build,
// tested and benchmarked against its torch twin.
// Requires 0 <= r[b] <= k and 0 <= keep[b] <= k (checked on the CPU, where r and
// keep are host memory; on CUDA they are device memory). Q may alias P. The
// CUDA launcher takes the stream last and runs on the device owning P.
#pragma once

#include <cstdint>

#include "common/check.h"

namespace opcm::cpu {
void mask_projection(addr_t p, addr_t r, addr_t keep, std::int64_t batch, std::int64_t k, addr_t q);
}  // namespace opcm::cpu

namespace opcm::cuda {
void mask_projection(addr_t p, addr_t r, addr_t keep, std::int64_t batch, std::int64_t k, addr_t q,
                     addr_t stream);
}  // namespace opcm::cuda
