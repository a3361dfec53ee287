// Projection masking (CUDA): the P -> Q step of the spec's cheap exact form.
//
// P, Q: [batch, k, k] fp32 row-major; r, keep: int64[batch] device arrays.
//   Q[b, i, j] = P[b, i, j]   if i < r[b] and j < r[b]        (the U_r^T T V_r block)
//   Q[b, i, i] = P[b, i, i]   if r[b] <= i < keep[b]          (the d_i terms, i >= r)
//   Q[b, i, j] = 0            otherwise
// One block per row (b, i) in a grid-stride loop over rows, threads over j,
// so the row's index math is done once per block.
#include <cstdint>

#include "../cuda_common/device.cuh"
#include "../cuda_common/ops.h"

namespace opcm::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    mask_projection_kernel(const float* p, const std::int64_t* __restrict__ r,
                           const std::int64_t* __restrict__ keep, std::int64_t batch,
                           std::int64_t k, float* q) {
  const std::int64_t rows = batch * k;
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const std::int64_t b = row / k;
    const std::int64_t i = row - b * k;
    const std::int64_t rb = r[b];
    const std::int64_t kb = keep[b];
    const bool row_in_block = i < rb;                // row i of the leading r x r block
    const bool diag_kept = i >= rb && i < kb;        // diagonal entry kept in row i
    const std::int64_t off = row * k;                // == (b * k + i) * k
    for (std::int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const bool keep_ij = (row_in_block && j < rb) || (diag_kept && j == i);
      // P is read before Q is written by the same thread: Q may alias P.
      q[off + j] = keep_ij ? p[off + j] : 0.0f;
    }
  }
}

}  // namespace

void mask_projection(std::uintptr_t p, std::uintptr_t r, std::uintptr_t keep, std::int64_t batch,
                     std::int64_t k, std::uintptr_t q, std::uintptr_t stream) {
  OPCM_CUDA_ARG_CHECK(batch >= 0, "batch must be >= 0, got " << batch);
  OPCM_CUDA_ARG_CHECK(k >= 0, "k must be >= 0, got " << k);
  if (batch == 0 || k == 0) return;
  OPCM_CUDA_ARG_CHECK(aligned_to(p, 4) && aligned_to(q, 4),
                      "p_ptr and q_ptr must be 4-byte aligned (float32)");
  OPCM_CUDA_ARG_CHECK(aligned_to(r, 8) && aligned_to(keep, 8),
                      "r_ptr and keep_ptr must be 8-byte aligned (int64)");
  const NamedPtr ptrs[] = {{p, "p_ptr"}, {r, "r_ptr"}, {keep, "keep_ptr"}, {q, "q_ptr"}};
  DeviceGuard guard(common_device(ptrs));
  const std::int64_t rows = batch * k;
  const std::int64_t cap = static_cast<std::int64_t>(sm_count()) * 16;
  const unsigned blocks = static_cast<unsigned>(rows < cap ? rows : cap);
  mask_projection_kernel<<<blocks, kThreads, 0, as_stream(stream)>>>(
      as_ptr<const float>(p), as_ptr<const std::int64_t>(r), as_ptr<const std::int64_t>(keep),
      batch, k, as_ptr<float>(q));
  OPCM_CUDA_CHECK_LAUNCH();
}

}  // namespace opcm::cuda
