// CPU element-wise kernels (opcm_ext._C): fused task vectors + norms, the Sigma
// update + norm, the final rescale + cast, a sum of squares. Contract: update.h.
#include "update/update.h"

#include <cmath>

#include "common/dtype.h"
#include "common/parallel.h"

namespace opcm::cpu {
namespace {

constexpr const char* kDeltas = "opcm_ext._C.deltas";
constexpr const char* kSigmaUpdate = "opcm_ext._C.sigma_update";
constexpr const char* kFinalize = "opcm_ext._C.finalize";
constexpr const char* kSumsq = "opcm_ext._C.sumsq";

inline double sq(float x) {
  const double d = x;
  return d * d;
}

// Every element is loaded before it is stored, so outputs may alias inputs
// element for element (an fp32 input overwritten by its own delta).
template <typename TB, typename TM, typename TN>
void deltas_mt(const TB* base, const TM* merged, const TN* nw, float* out_m, float* out_t, std::int64_t n,
               double* sums) {
  const auto tot = parallel_sum<2>(n, [&](std::int64_t b, std::int64_t e, double (*acc)[kLanes]) {
    std::int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float x0 = to_float(base[i + l]);
        const float m = to_float(merged[i + l]) - x0;
        const float t = to_float(nw[i + l]) - x0;
        out_m[i + l] = m;
        out_t[i + l] = t;
        acc[0][l] += sq(m);
        acc[1][l] += sq(t);
      }
    }
    for (int l = 0; i < e; ++i, ++l) {
      const float x0 = to_float(base[i]);
      const float m = to_float(merged[i]) - x0;
      const float t = to_float(nw[i]) - x0;
      out_m[i] = m;
      out_t[i] = t;
      acc[0][l] += sq(m);
      acc[1][l] += sq(t);
    }
  });
  sums[0] += tot[0];
  sums[1] += tot[1];
}

template <typename TB, typename TN>
void deltas_t(const TB* base, const TN* nw, float* out_t, std::int64_t n, double* sums) {
  const auto tot = parallel_sum<1>(n, [&](std::int64_t b, std::int64_t e, double (*acc)[kLanes]) {
    std::int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float t = to_float(nw[i + l]) - to_float(base[i + l]);
        out_t[i + l] = t;
        acc[0][l] += sq(t);
      }
    }
    for (int l = 0; i < e; ++i, ++l) {
      const float t = to_float(nw[i]) - to_float(base[i]);
      out_t[i] = t;
      acc[0][l] += sq(t);
    }
  });
  sums[1] += tot[0];
}

template <typename T>
void sumsq_impl(const T* x, std::int64_t n, double* sums) {
  const auto tot = parallel_sum<1>(n, [&](std::int64_t b, std::int64_t e, double (*acc)[kLanes]) {
    std::int64_t i = b;
    for (; i + kLanes <= e; i += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[0][l] += sq(to_float(x[i + l]));
    for (int l = 0; i < e; ++i, ++l) acc[0][l] += sq(to_float(x[i]));
  });
  sums[0] += tot[0];
}

template <typename TB, typename TO>
void finalize_impl(const TB* base, const float* sigma, float lam, TO* out, std::int64_t n) {
  parallel_blocks(n, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) out[i] = from_float<TO>(to_float(base[i]) + sigma[i] / lam);
  });
}

}  // namespace

void deltas(addr_t base, int base_dtype, addr_t merged, int merged_dtype, addr_t new_, int new_dtype,
            addr_t out_m, addr_t out_t, std::int64_t n, addr_t sums) {
  OPCM_CHECK_SIZE(n, kDeltas, "n");
  OPCM_CHECK_DTYPE(base_dtype, kDeltas, "base_dtype");
  OPCM_CHECK_DTYPE(new_dtype, kDeltas, "new_dtype");
  OPCM_CHECK_PTR(base, n, kDeltas, "base_ptr");
  OPCM_CHECK_PTR(new_, n, kDeltas, "new_ptr");
  OPCM_CHECK_PTR(out_t, n, kDeltas, "out_t_ptr");
  OPCM_CHECK_ARG(sums != 0, kDeltas, "sums_ptr", "is a null address (it needs two float64 values)");
  double* s = as_ptr<double>(sums);
  if (merged == 0) {
    OPCM_DISPATCH_DTYPE(base_dtype, TB, [&] {
      OPCM_DISPATCH_DTYPE(new_dtype, TN, [&] {
        deltas_t(as_ptr<const TB>(base), as_ptr<const TN>(new_), as_ptr<float>(out_t), n, s);
      });
    });
    return;
  }
  OPCM_CHECK_DTYPE(merged_dtype, kDeltas, "merged_dtype");
  OPCM_CHECK_PTR(out_m, n, kDeltas, "out_m_ptr");
  OPCM_DISPATCH_DTYPE(base_dtype, TB, [&] {
    OPCM_DISPATCH_DTYPE(merged_dtype, TM, [&] {
      OPCM_DISPATCH_DTYPE(new_dtype, TN, [&] {
        deltas_mt(as_ptr<const TB>(base), as_ptr<const TM>(merged), as_ptr<const TN>(new_), as_ptr<float>(out_m),
                  as_ptr<float>(out_t), n, s);
      });
    });
  });
}

void sigma_update(addr_t m, addr_t tp, double lam_prev, addr_t out, std::int64_t n, addr_t sums) {
  OPCM_CHECK_SIZE(n, kSigmaUpdate, "n");
  OPCM_CHECK_PTR(m, n, kSigmaUpdate, "m_ptr");
  OPCM_CHECK_PTR(tp, n, kSigmaUpdate, "tp_ptr");
  OPCM_CHECK_PTR(out, n, kSigmaUpdate, "out_ptr");
  OPCM_CHECK_ARG(sums != 0, kSigmaUpdate, "sums_ptr", "is a null address");
  const float lam = checked_scale(lam_prev, kSigmaUpdate, "lam_prev", false);
  const float* pm = as_ptr<const float>(m);
  const float* pt = as_ptr<const float>(tp);
  float* po = as_ptr<float>(out);
  const auto tot = parallel_sum<1>(n, [&](std::int64_t b, std::int64_t e, double (*acc)[kLanes]) {
    std::int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float prod = lam * pm[i + l];  // a separate rounding: no FMA (-ffp-contract=off)
        const float v = prod + pt[i + l];
        po[i + l] = v;
        acc[0][l] += sq(v);
      }
    }
    for (int l = 0; i < e; ++i, ++l) {
      const float prod = lam * pm[i];
      const float v = prod + pt[i];
      po[i] = v;
      acc[0][l] += sq(v);
    }
  });
  as_ptr<double>(sums)[0] += tot[0];
}

void finalize(addr_t base, int base_dtype, addr_t sigma, double lam, addr_t out, int out_dtype, std::int64_t n) {
  OPCM_CHECK_SIZE(n, kFinalize, "n");
  OPCM_CHECK_DTYPE(base_dtype, kFinalize, "base_dtype");
  OPCM_CHECK_DTYPE(out_dtype, kFinalize, "out_dtype");
  OPCM_CHECK_PTR(base, n, kFinalize, "base_ptr");
  OPCM_CHECK_PTR(sigma, n, kFinalize, "sigma_ptr");
  OPCM_CHECK_PTR(out, n, kFinalize, "out_ptr");
  const float lamf = checked_scale(lam, kFinalize, "lam", true);
  OPCM_DISPATCH_DTYPE(base_dtype, TB, [&] {
    OPCM_DISPATCH_DTYPE(out_dtype, TO, [&] {
      finalize_impl(as_ptr<const TB>(base), as_ptr<const float>(sigma), lamf, as_ptr<TO>(out), n);
    });
  });
}

void sumsq(addr_t x, int dtype, std::int64_t n, addr_t sums) {
  OPCM_CHECK_SIZE(n, kSumsq, "n");
  OPCM_CHECK_DTYPE(dtype, kSumsq, "dtype");
  OPCM_CHECK_PTR(x, n, kSumsq, "x_ptr");
  OPCM_CHECK_ARG(sums != 0, kSumsq, "sums_ptr", "is a null address");
  OPCM_DISPATCH_DTYPE(dtype, T, [&] { sumsq_impl(as_ptr<const T>(x), n, as_ptr<double>(sums)); });
}

}  // namespace opcm::cpu
