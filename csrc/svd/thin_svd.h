// The batched thin SVD on the GPU and the facts about the CUDA libraries: the
// one statement of their contract, implemented by thin_svd.cu (opcm_ext._cuda).
// Plain C++ (no CUDA header), so bindings_cuda.cpp can include it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/check.h"

namespace opcm::cuda {

// svd_workspace_size: bytes of device workspace batched_thin_svd needs for
// [batch, m, n] on the current device: the fp64 copies and factors (about
// 16*m*n + 16*k*k + 28*k bytes per matrix, k = min(m, n)), the cuBLAS
// workspace (32 MiB on Hopper and newer, else 4 MiB) and the largest solver
// workspace that may run (syevBatched, or per-matrix Xsyevd / gesvdj on up to
// four streams). 0 when batch == 0 or k == 0.
std::size_t svd_workspace_size(std::int64_t batch, std::int64_t m, std::int64_t n);

// batched_thin_svd: thin SVD of A [batch, m, n] fp32 row-major. Writes U
// [batch, m, k], S [batch, k] (descending) and V [batch, n, k], fp32 row-major,
// k = min(m, n), and info int32[batch] (0 = success; non-zero: no solver
// converged, the caller must raise). The small side (V if m >= n, else U) is
// orthonormal; on the big side the columns of the triplets the projection keeps
// (sigma_i > sigma_1 * max(m, n) * eps32) are re-orthonormalised in fp64, the
// others are left as computed (unit, or zero when sigma_i == 0). Eigensolver of
// the fp64 Gram matrix: cusolverDnXsyevBatched when the loaded cuSOLVER has it
// (>= 11.7.2), else (or where it declines) cusolverDnXsyevd per matrix; gesvdj
// on A only where the eigensolver fails. `work` must hold
// svd_workspace_size(batch, m, n) bytes. Synchronises the stream once (to
// read the eigensolvers' info).
void batched_thin_svd(addr_t a, std::int64_t batch, std::int64_t m, std::int64_t n, addr_t u, addr_t s,
                      addr_t v, addr_t work, std::size_t work_bytes, addr_t info, addr_t stream);

// init_handles: create (once per device, pooled) the cuBLAS and cuSOLVER
// handles of the current device; a std::runtime_error names the failing call.
void init_handles();

// Test hook, process-wide: 0 = automatic, 1 = skip syevBatched (per-matrix
// Xsyevd), 2 = skip both eigensolvers (gesvdj on every matrix).
void set_svd_path(int path);

// Versions: major * 10000 + minor * 100 + patch for the libraries, CUDA's own
// encoding (major * 1000 + minor * 10) for the runtime and driver.
struct BuildInfo {  // what the module was compiled against
  int cuda_runtime_version;
  int cusolver_version;
  int cublas_version;
  bool syev_batched;  // cusolverDnXsyevBatched compiled in (headers >= 11.7.2)
};
BuildInfo build_info();

struct RuntimeInfo {  // what is loaded in this process (-1: the query failed)
  int cuda_runtime_version;
  int cuda_driver_version;  // 0 when no driver is installed
  int cusolver_version;
  int cublas_version;
  int device_count;
  bool syev_batched;  // usable: compiled in, cuSOLVER >= 11.7.2 loaded, symbol found
};
RuntimeInfo runtime_info();

}  // namespace opcm::cuda
