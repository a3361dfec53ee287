// Projection mask (CUDA, opcm_ext._cuda). Contract: project.h.
//
// One block per row (b, i) in a grid-stride loop over rows, threads over j,
// so the row's index math is done once per block.
#include <cstdint>

#include "common/device.cuh"
#include "project/project.h"

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

void mask_projection(addr_t p, addr_t r, addr_t keep, std::int64_t batch, std::int64_t k, addr_t q,
                     addr_t stream) {
  constexpr const char* fn = "opcm_ext._cuda.mask_projection";
  OPCM_CHECK_SIZE(batch, fn, "batch");
  OPCM_CHECK_SIZE(k, fn, "k");
  if (batch == 0 || k == 0) return;
  OPCM_CHECK_ALIGNED(p, 4, fn, "p_ptr");
  OPCM_CHECK_ALIGNED(q, 4, fn, "q_ptr");
  OPCM_CHECK_ALIGNED(r, 8, fn, "r_ptr");
  OPCM_CHECK_ALIGNED(keep, 8, fn, "keep_ptr");
  const NamedPtr ptrs[] = {{p, "p_ptr"}, {r, "r_ptr"}, {keep, "keep_ptr"}, {q, "q_ptr"}};
  DeviceGuard guard(common_device(fn, ptrs));
  const std::int64_t rows = batch * k;
  const std::int64_t cap = static_cast<std::int64_t>(sm_count()) * 16;
  const unsigned blocks = static_cast<unsigned>(rows < cap ? rows : cap);
  mask_projection_kernel<<<blocks, kThreads, 0, as_stream(stream)>>>(
      as_ptr<const float>(p), as_ptr<const std::int64_t>(r), as_ptr<const std::int64_t>(keep),
      batch, k, as_ptr<float>(q));
  OPCM_CUDA_CHECK_LAUNCH();
}

}  // namespace opcm::cuda
