// Host entry points of the CUDA backend (opcm_ext._cuda).
//
// Plain C++ on purpose: bindings_cuda.cpp includes this header without any
// CUDA header, and nothing here links libtorch. Tensors cross as raw device
// addresses (uintptr_t) plus sizes and dtype codes; the CUDA stream is the
// last argument of every launcher (0 = the legacy default stream) and all
// work is enqueued on it. Every function validates its arguments
// (std::invalid_argument naming the argument) and checks every CUDA, cuBLAS
// and cuSOLVER call (std::runtime_error with file:line and the library's own
// error string).
#pragma once

#include <cstddef>
#include <cstdint>

namespace opcm::cuda {

// dtype codes shared with opcm_ext/ops.py and the CPU module _C.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// M = f32(merged) - f32(base), T = f32(new) - f32(base). sums[0] += sum(M^2),
// sums[1] += sum(T^2) (float64 device memory). merged == 0: only T is formed
// and sums[0] is left untouched (out_m may then be 0).
void deltas(std::uintptr_t base, int base_dtype, std::uintptr_t merged, int merged_dtype,
            std::uintptr_t new_, int new_dtype, std::uintptr_t out_m, std::uintptr_t out_t,
            std::int64_t n, std::uintptr_t sums, std::uintptr_t stream);

// out = f32(lam_prev) * M + T' (two fp32 roundings, like torch); out may alias m.
// sums[0] += sum(out^2).
void sigma_update(std::uintptr_t m, std::uintptr_t tp, double lam_prev, std::uintptr_t out,
                  std::int64_t n, std::uintptr_t sums, std::uintptr_t stream);

// out = cast(f32(base) + sigma / f32(lam)), rounded to nearest even.
void finalize(std::uintptr_t base, int base_dtype, std::uintptr_t sigma, double lam,
              std::uintptr_t out, int out_dtype, std::int64_t n, std::uintptr_t stream);

// P, Q: [batch, k, k] fp32 row-major; r, keep: int64[batch] in device memory.
// Q[i,j] = P[i,j] if i < r and j < r; Q[i,i] = P[i,i] if r <= i < keep; else 0.
// Q may alias P.
void mask_projection(std::uintptr_t p, std::uintptr_t r, std::uintptr_t keep, std::int64_t batch,
                     std::int64_t k, std::uintptr_t q, std::uintptr_t stream);

// sums[0] += sum(f32(x)^2).
void sumsq(std::uintptr_t x, int dtype, std::int64_t n, std::uintptr_t sums,
           std::uintptr_t stream);

// Bytes of device workspace batched_thin_svd needs for [batch, m, n] on the
// current device (includes the fallback path's needs and alignment slack).
std::size_t svd_workspace_size(std::int64_t batch, std::int64_t m, std::int64_t n);

// Thin SVD of A [batch, m, n] fp32 row-major: U [batch, m, k], S [batch, k]
// descending, V [batch, n, k], k = min(m, n), all fp32 row-major; info
// int32[batch] (0 = success). The small side (V if m >= n, else U) is
// orthonormal; on the big side only the columns of kept triplets
// (sigma_i > sigma_1 * max(m, n) * eps32) are re-orthonormalised, and a column
// with sigma_i == 0 is zero. See csrc/svd/thin_svd.cu for the algorithm.
void batched_thin_svd(std::uintptr_t a, std::int64_t batch, std::int64_t m, std::int64_t n,
                      std::uintptr_t u, std::uintptr_t s, std::uintptr_t v, std::uintptr_t work,
                      std::size_t work_bytes, std::uintptr_t info, std::uintptr_t stream);

// Test hook: when enabled, batched_thin_svd skips cusolverDnXsyevBatched and
// runs every matrix through the per-matrix gesvdj fallback (process-wide).
void set_svd_force_fallback(bool enabled);

// Build facts for opcm_ext._cuda.build_info(): the cuSOLVER/cuBLAS/CUDA
// versions compiled against and whether cusolverDnXsyevBatched is used.
struct BuildInfo {
  int cuda_runtime_version;
  int cusolver_version;
  int cublas_version;
  bool syev_batched;
};
BuildInfo build_info();

}  // namespace opcm::cuda
