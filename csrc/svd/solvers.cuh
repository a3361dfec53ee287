// The cuSOLVER side of batched_thin_svd (thin_svd.cu): which eigensolver runs
// on the Gram matrices, the per-matrix fallbacks, and their workspaces.
//
//   1. cusolverDnXsyevBatched, one call per chunk, when the loaded cuSOLVER
//      has it (>= 11.7.2, looked up at run time) and accepts the size;
//   2. cusolverDnXsyevd per matrix on the same Gram matrix, for whatever
//      syevBatched declined (or every matrix without it);
//   3. cusolverDnDgesvdj on A itself, only for matrices whose eigensolve
//      failed (non-zero info) or was declined: the last resort.
// The per-matrix paths run round-robin on up to kMaxSlots streams forked from
// the caller's stream and joined back into it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "svd/solver_context.cuh"

namespace opcm::cuda {

constexpr std::size_t kAlign = 256;  // cuBLAS/cuSOLVER workspaces: >= 256-byte aligned
constexpr int kMaxSlots = 4;         // streams for the per-matrix paths

inline std::size_t align_up(std::size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// s = min(m, n), L = max(m, n); tall: m >= n, the Gram matrix is A^T A (n x n).
struct Dims {
  std::int64_t batch, m, n, s, L;
  bool tall;
};

// The fp64 regions of the caller's workspace, per matrix packed and
// column-major (see thin_svd.cu for the layout conventions).
struct Buffers {
  double *x, *y, *g, *c, *lam, *sig, *tau;  // X = fp64(A); Y = P W; G -> W; NS; eigenvalues; sigma; cut
  int* perm;
  void* blas;                // cuBLAS workspace
  char* solver;              // the solver region, solver_bytes long
  std::size_t solver_bytes;
  int* info;                 // the caller's info int32[batch]
};

// Bytes of the solver region for `d`: the largest of syevBatched's workspace
// and the per-slot Xsyevd / gesvdj workspaces (they never run at the same time).
std::size_t solver_workspace_bytes(SolverContext& ctx, const Dims& d);

// G_b -> W_b (eigenvectors, ascending eigenvalues in lam_b) for every matrix.
// Returns the matrices left for gesvdj: declined by every eigensolver, or
// info != 0. Synchronises `stream` once to read info.
std::vector<std::int64_t> eigendecompose(SolverContext& ctx, const Dims& d, const Buffers& buf,
                                         cudaStream_t stream);

// gesvdj on X_b for the listed matrices: W_b (small side), Y_b (big side times
// sigma, as Y = P W leaves it) and info[b]. X_b is destroyed.
void gesvdj_fallback(SolverContext& ctx, const Dims& d, const Buffers& buf,
                     const std::vector<std::int64_t>& failed, cudaStream_t stream);

// cuSOLVER as loaded in this process: major * 10000 + minor * 100 + patch (-1
// when the query fails), and whether syevBatched can be used.
int cusolver_loaded_version();
bool syev_batched_compiled();
bool syev_batched_usable();

// Test hook (set_svd_path in thin_svd.h): 0 automatic, 1 no syevBatched, 2 gesvdj only.
void set_solver_path(int path);

}  // namespace opcm::cuda
