// Fused element-wise passes of the OPCM step (CUDA, opcm_ext._cuda): task-vector
// deltas with their squared norms, the Sigma update with its squared norm, the
// final rescale-and-cast, and a plain sum of squares. Contract: update.h.
//
// All kernels are grid-stride loops that move 4 elements per thread and
// iteration (float4 / 4 x 16 bit) when every pointer is aligned to 4
// elements, and fall back to one element at a time otherwise (torch views can
// start anywhere). Squared norms accumulate in float64: per thread, then per
// block (warp shuffles), then one atomicAdd per block into the caller's
// float64 `sums` (so the sums are reproducible up to the order of those
// per-block atomics, i.e. to ~1e-16 relative).
#include <cmath>
#include <cstdint>

#include "common/device.cuh"
#include "update/update.h"

namespace opcm::cuda {
namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------- kernels

__global__ void __launch_bounds__(kThreads)
    deltas_kernel(const void* __restrict__ base, int base_dt, const void* __restrict__ merged,
                  int merged_dt, const void* __restrict__ nw, int new_dt, float* __restrict__ out_m,
                  float* __restrict__ out_t, std::int64_t n, bool vec, double* sums) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t tid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool has_m = merged != nullptr;
  double acc_m = 0.0, acc_t = 0.0;
  std::int64_t head = 0;
  if (vec) {
    const std::int64_t nq = n / 4;
    for (std::int64_t q = tid; q < nq; q += stride) {
      const float4 b = load4_as_float(base, base_dt, q);
      float4 t = load4_as_float(nw, new_dt, q);
      t.x -= b.x; t.y -= b.y; t.z -= b.z; t.w -= b.w;
      reinterpret_cast<float4*>(out_t)[q] = t;
      acc_t += sq4(t);
      if (has_m) {
        float4 mm = load4_as_float(merged, merged_dt, q);
        mm.x -= b.x; mm.y -= b.y; mm.z -= b.z; mm.w -= b.w;
        reinterpret_cast<float4*>(out_m)[q] = mm;
        acc_m += sq4(mm);
      }
    }
    head = nq * 4;
  }
  for (std::int64_t i = head + tid; i < n; i += stride) {
    const float b = load_as_float(base, base_dt, i);
    const float t = load_as_float(nw, new_dt, i) - b;
    out_t[i] = t;
    acc_t += static_cast<double>(t) * t;
    if (has_m) {
      const float mm = load_as_float(merged, merged_dt, i) - b;
      out_m[i] = mm;
      acc_m += static_cast<double>(mm) * mm;
    }
  }
  const double block_t = block_sum(acc_t);
  const double block_m = has_m ? block_sum(acc_m) : 0.0;  // `has_m` is uniform over the grid
  if (threadIdx.x == 0) {
    atomicAdd(&sums[1], block_t);
    if (has_m) atomicAdd(&sums[0], block_m);
  }
}

// out = fl(fl(lam * m) + tp): the two fp32 roundings of torch's `lam * M + Tp`
// (explicit _rn intrinsics so the compiler cannot contract them into an FMA).
__global__ void __launch_bounds__(kThreads)
    sigma_update_kernel(const float* m, const float* __restrict__ tp, float lam, float* out,
                        std::int64_t n, bool vec, double* sums) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t tid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double acc = 0.0;
  std::int64_t head = 0;
  if (vec) {
    const std::int64_t nq = n / 4;
    for (std::int64_t q = tid; q < nq; q += stride) {
      // `out` may alias `m`: each element is read before it is written, by
      // the same thread, and by no other thread.
      const float4 a = reinterpret_cast<const float4*>(m)[q];
      const float4 t = reinterpret_cast<const float4*>(tp)[q];
      float4 o;
      o.x = __fadd_rn(__fmul_rn(lam, a.x), t.x);
      o.y = __fadd_rn(__fmul_rn(lam, a.y), t.y);
      o.z = __fadd_rn(__fmul_rn(lam, a.z), t.z);
      o.w = __fadd_rn(__fmul_rn(lam, a.w), t.w);
      reinterpret_cast<float4*>(out)[q] = o;
      acc += sq4(o);
    }
    head = nq * 4;
  }
  for (std::int64_t i = head + tid; i < n; i += stride) {
    const float o = __fadd_rn(__fmul_rn(lam, m[i]), tp[i]);
    out[i] = o;
    acc += static_cast<double>(o) * o;
  }
  const double block = block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(&sums[0], block);
}

// out = cast(fl(base + fl(sigma / lam))), true IEEE division (no reciprocal).
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const void* __restrict__ base, int base_dt, const float* __restrict__ sigma,
                    float lam, void* __restrict__ out, int out_dt, std::int64_t n, bool vec) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t tid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  std::int64_t head = 0;
  if (vec) {
    const std::int64_t nq = n / 4;
    for (std::int64_t q = tid; q < nq; q += stride) {
      const float4 b = load4_as_float(base, base_dt, q);
      const float4 s = reinterpret_cast<const float4*>(sigma)[q];
      float4 o;
      o.x = __fadd_rn(b.x, __fdiv_rn(s.x, lam));
      o.y = __fadd_rn(b.y, __fdiv_rn(s.y, lam));
      o.z = __fadd_rn(b.z, __fdiv_rn(s.z, lam));
      o.w = __fadd_rn(b.w, __fdiv_rn(s.w, lam));
      store4_from_float(out, out_dt, q, o);
    }
    head = nq * 4;
  }
  for (std::int64_t i = head + tid; i < n; i += stride) {
    const float o = __fadd_rn(load_as_float(base, base_dt, i), __fdiv_rn(sigma[i], lam));
    store_from_float(out, out_dt, i, o);
  }
}

__global__ void __launch_bounds__(kThreads)
    sumsq_kernel(const void* __restrict__ x, int dt, std::int64_t n, bool vec, double* sums) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t tid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double acc = 0.0;
  std::int64_t head = 0;
  if (vec) {
    const std::int64_t nq = n / 4;
    for (std::int64_t q = tid; q < nq; q += stride) acc += sq4(load4_as_float(x, dt, q));
    head = nq * 4;
  }
  for (std::int64_t i = head + tid; i < n; i += stride) {
    const double v = load_as_float(x, dt, i);
    acc += v * v;
  }
  const double block = block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(&sums[0], block);
}

// ------------------------------------------------------------ host helpers

constexpr const char* kDeltas = "opcm_ext._cuda.deltas";
constexpr const char* kSigmaUpdate = "opcm_ext._cuda.sigma_update";
constexpr const char* kFinalize = "opcm_ext._cuda.finalize";
constexpr const char* kSumsq = "opcm_ext._cuda.sumsq";

// A stored array can be read 4 elements at a time iff its address is a
// multiple of 4 elements.
bool quad_aligned(addr_t p, int dt) { return aligned_to(p, static_cast<addr_t>(4 * dtype_size(dt))); }

void check_elem_aligned(addr_t p, int dt, const char* fn, const char* arg) {
  OPCM_CHECK_ALIGNED(p, static_cast<addr_t>(dtype_size(dt)), fn, arg);
}

void check_sums(addr_t sums, const char* fn) {
  OPCM_CHECK_ARG(sums != 0, fn, "sums_ptr", "is a null address");
  OPCM_CHECK_ALIGNED(sums, 8, fn, "sums_ptr");
}

}  // namespace

// ---------------------------------------------------------------- entries

void deltas(addr_t base, int base_dtype, addr_t merged, int merged_dtype,
            addr_t new_, int new_dtype, addr_t out_m, addr_t out_t,
            std::int64_t n, addr_t sums, addr_t stream) {
  OPCM_CHECK_SIZE(n, kDeltas, "n");
  OPCM_CHECK_DTYPE(base_dtype, kDeltas, "base_dtype");
  OPCM_CHECK_DTYPE(new_dtype, kDeltas, "new_dtype");
  if (merged != 0) {
    OPCM_CHECK_DTYPE(merged_dtype, kDeltas, "merged_dtype");
    OPCM_CHECK_ARG(out_m != 0, kDeltas, "out_m_ptr", "is a null address but merged_ptr is given");
  }
  check_sums(sums, kDeltas);
  if (n == 0) return;
  check_elem_aligned(base, base_dtype, kDeltas, "base_ptr");
  check_elem_aligned(new_, new_dtype, kDeltas, "new_ptr");
  if (merged != 0) check_elem_aligned(merged, merged_dtype, kDeltas, "merged_ptr");
  check_elem_aligned(out_t, kFloat32, kDeltas, "out_t_ptr");
  if (merged != 0) check_elem_aligned(out_m, kFloat32, kDeltas, "out_m_ptr");
  const NamedPtr ptrs[] = {{base, "base_ptr"},   {merged, "merged_ptr"},
                           {new_, "new_ptr"},     {out_t, "out_t_ptr"},
                           {merged ? out_m : 0, "out_m_ptr"}, {sums, "sums_ptr"}};
  DeviceGuard guard(common_device(kDeltas, ptrs));
  const bool vec = quad_aligned(base, base_dtype) && quad_aligned(new_, new_dtype) &&
                   aligned_to(out_t, 16) &&
                   (merged == 0 || (quad_aligned(merged, merged_dtype) && aligned_to(out_m, 16)));
  const std::int64_t items = vec ? (n + 3) / 4 : n;
  deltas_kernel<<<grid_for(items, kThreads), kThreads, 0, as_stream(stream)>>>(
      as_ptr<const void>(base), base_dtype, merged ? as_ptr<const void>(merged) : nullptr,
      merged_dtype, as_ptr<const void>(new_), new_dtype, merged ? as_ptr<float>(out_m) : nullptr,
      as_ptr<float>(out_t), n, vec, as_ptr<double>(sums));
  OPCM_CUDA_CHECK_LAUNCH();
}

void sigma_update(addr_t m, addr_t tp, double lam_prev, addr_t out,
                  std::int64_t n, addr_t sums, addr_t stream) {
  OPCM_CHECK_SIZE(n, kSigmaUpdate, "n");
  check_sums(sums, kSigmaUpdate);
  const float lam = checked_scale(lam_prev, kSigmaUpdate, "lam_prev", false);
  if (n == 0) return;
  check_elem_aligned(m, kFloat32, kSigmaUpdate, "m_ptr");
  check_elem_aligned(tp, kFloat32, kSigmaUpdate, "tp_ptr");
  check_elem_aligned(out, kFloat32, kSigmaUpdate, "out_ptr");
  const NamedPtr ptrs[] = {{m, "m_ptr"}, {tp, "tp_ptr"}, {out, "out_ptr"}, {sums, "sums_ptr"}};
  DeviceGuard guard(common_device(kSigmaUpdate, ptrs));
  const bool vec = aligned_to(m, 16) && aligned_to(tp, 16) && aligned_to(out, 16);
  const std::int64_t items = vec ? (n + 3) / 4 : n;
  sigma_update_kernel<<<grid_for(items, kThreads), kThreads, 0, as_stream(stream)>>>(
      as_ptr<const float>(m), as_ptr<const float>(tp), lam,
      as_ptr<float>(out), n, vec, as_ptr<double>(sums));
  OPCM_CUDA_CHECK_LAUNCH();
}

void finalize(addr_t base, int base_dtype, addr_t sigma, double lam,
              addr_t out, int out_dtype, std::int64_t n, addr_t stream) {
  OPCM_CHECK_SIZE(n, kFinalize, "n");
  OPCM_CHECK_DTYPE(base_dtype, kFinalize, "base_dtype");
  OPCM_CHECK_DTYPE(out_dtype, kFinalize, "out_dtype");
  const float lamf = checked_scale(lam, kFinalize, "lam", true);
  if (n == 0) return;
  check_elem_aligned(base, base_dtype, kFinalize, "base_ptr");
  check_elem_aligned(sigma, kFloat32, kFinalize, "sigma_ptr");
  check_elem_aligned(out, out_dtype, kFinalize, "out_ptr");
  const NamedPtr ptrs[] = {{base, "base_ptr"}, {sigma, "sigma_ptr"}, {out, "out_ptr"}};
  DeviceGuard guard(common_device(kFinalize, ptrs));
  const bool vec = quad_aligned(base, base_dtype) && aligned_to(sigma, 16) &&
                   quad_aligned(out, out_dtype);
  const std::int64_t items = vec ? (n + 3) / 4 : n;
  finalize_kernel<<<grid_for(items, kThreads), kThreads, 0, as_stream(stream)>>>(
      as_ptr<const void>(base), base_dtype, as_ptr<const float>(sigma), lamf,
      as_ptr<void>(out), out_dtype, n, vec);
  OPCM_CUDA_CHECK_LAUNCH();
}

void sumsq(addr_t x, int dtype, std::int64_t n, addr_t sums,
           addr_t stream) {
  OPCM_CHECK_SIZE(n, kSumsq, "n");
  OPCM_CHECK_DTYPE(dtype, kSumsq, "dtype");
  check_sums(sums, kSumsq);
  if (n == 0) return;
  check_elem_aligned(x, dtype, kSumsq, "x_ptr");
  const NamedPtr ptrs[] = {{x, "x_ptr"}, {sums, "sums_ptr"}};
  DeviceGuard guard(common_device(kSumsq, ptrs));
  const bool vec = quad_aligned(x, dtype);
  const std::int64_t items = vec ? (n + 3) / 4 : n;
  sumsq_kernel<<<grid_for(items, kThreads), kThreads, 0, as_stream(stream)>>>(
      as_ptr<const void>(x), dtype, n, vec, as_ptr<double>(sums));
  OPCM_CUDA_CHECK_LAUNCH();
}

}  // namespace opcm::cuda
