// Deterministic parallel loops for the CPU kernels.
//
// Work is cut into fixed blocks of kBlock elements, independent of the thread count.
// A reduction computes one float64 partial per block (inside a block: 8 interleaved
// accumulators, i.e. element i goes to lane i % 8, lanes summed in order at the end)
// and then adds the block partials in block order on one thread. The result is
// therefore bit-identical for any number of OpenMP threads and any schedule; it
// differs from torch's float64 `sum()` only by rounding (relative ~1e-15 for sums of
// squares, which have no cancellation).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace opcm {

constexpr std::int64_t kBlock = std::int64_t{1} << 15;  // 32768 elements = 128 KiB of fp32
constexpr int kLanes = 8;

inline std::int64_t num_blocks(std::int64_t n) { return (n + kBlock - 1) / kBlock; }

// body(begin, end) for every block, in parallel.
template <typename Body>
void parallel_blocks(std::int64_t n, const Body& body) {
  const std::int64_t nb = num_blocks(n);
#pragma omp parallel for schedule(static) if (nb > 1)
  for (std::int64_t b = 0; b < nb; ++b) {
    const std::int64_t begin = b * kBlock;
    body(begin, std::min(n, begin + kBlock));
  }
}

// Sums K float64 quantities over [0, n): body(begin, end, acc) adds block [begin, end)
// into acc[K][kLanes] (lane = element index % kLanes, see sum_lanes). Returns the K totals.
template <int K, typename Body>
std::array<double, K> parallel_sum(std::int64_t n, const Body& body) {
  const std::int64_t nb = num_blocks(n);
  std::vector<std::array<double, K>> partial(static_cast<std::size_t>(nb));
#pragma omp parallel for schedule(static) if (nb > 1)
  for (std::int64_t b = 0; b < nb; ++b) {
    const std::int64_t begin = b * kBlock;
    double acc[K][kLanes] = {};
    body(begin, std::min(n, begin + kBlock), acc);
    for (int k = 0; k < K; ++k) {
      double s = 0.0;
      for (int l = 0; l < kLanes; ++l) s += acc[k][l];
      partial[static_cast<std::size_t>(b)][k] = s;
    }
  }
  std::array<double, K> total{};
  for (const auto& p : partial)
    for (int k = 0; k < K; ++k) total[k] += p[k];
  return total;
}

}  // namespace opcm
