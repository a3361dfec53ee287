// CPU projection mask (opcm_ext._C). Contract: project.h.
#include "project/project.h"

#include <algorithm>
#include <cstring>

namespace opcm::cpu {

void mask_projection(addr_t p, addr_t r, addr_t keep, std::int64_t batch, std::int64_t k, addr_t q) {
  constexpr const char* fn = "opcm_ext._C.mask_projection";
  OPCM_CHECK_SIZE(batch, fn, "batch");
  OPCM_CHECK_SIZE(k, fn, "k");
  const std::int64_t n = batch * k * k;
  OPCM_CHECK_PTR(p, n, fn, "p_ptr");
  OPCM_CHECK_PTR(q, n, fn, "q_ptr");
  OPCM_CHECK_PTR(r, batch * (k > 0), fn, "r_ptr");
  OPCM_CHECK_PTR(keep, batch * (k > 0), fn, "keep_ptr");
  if (n == 0) return;
  const std::int64_t* pr = as_ptr<const std::int64_t>(r);
  const std::int64_t* pk = as_ptr<const std::int64_t>(keep);
  for (std::int64_t b = 0; b < batch; ++b) {
    OPCM_CHECK_ARG(pr[b] >= 0 && pr[b] <= k, fn, "r_ptr", "holds r[", b, "] = ", pr[b], " outside [0, k = ", k, "]");
    OPCM_CHECK_ARG(pk[b] >= 0 && pk[b] <= k, fn, "keep_ptr", "holds keep[", b, "] = ", pk[b],
                   " outside [0, k = ", k, "]");
  }
  const float* src = as_ptr<const float>(p);
  float* dst = as_ptr<float>(q);
  // One row per iteration; each row is read completely before it is written (Q may alias P).
#pragma omp parallel for schedule(static) if (n > (std::int64_t{1} << 16))
  for (std::int64_t row = 0; row < batch * k; ++row) {
    const std::int64_t b = row / k;
    const std::int64_t i = row % k;
    const std::int64_t rb = pr[b];
    const float* in = src + row * k;
    float* out = dst + row * k;
    if (i < rb) {
      if (out != in) std::memcpy(out, in, static_cast<std::size_t>(rb) * sizeof(float));
      std::fill(out + rb, out + k, 0.0f);
    } else {
      const float d = i < pk[b] ? in[i] : 0.0f;
      std::fill(out, out + k, 0.0f);
      out[i] = d;
    }
  }
}

}  // namespace opcm::cpu
