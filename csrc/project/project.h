// Host entry point of the CPU projection mask (opcm_ext._C).
#pragma once

#include <cstdint>

#include "common/check.h"

namespace opcm::cpu {

// P, Q: [batch, k, k] fp32 row-major; r, keep: int64[batch].
// Q[i,j] = P[i,j] if i < r and j < r; Q[i,i] = P[i,i] if r <= i < keep; every
// other entry 0. With P = U^T T V this makes T' = T - U Q V^T the spec's cheap
// exact projection, with the triplets i >= keep (sigma ~ 0) dropped.
// Requires 0 <= r[b] <= k and 0 <= keep[b] <= k. Q may alias P.
void mask_projection(addr_t p, addr_t r, addr_t keep, std::int64_t batch, std::int64_t k, addr_t q);

}  // namespace opcm::cpu
