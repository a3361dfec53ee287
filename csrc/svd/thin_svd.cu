// Batched thin SVD of fp32 matrices (CUDA), through the Gram matrix in fp64.
//
// A: [batch, m, n] fp32 row-major. k = s = min(m, n), L = max(m, n).
// Outputs: U [batch, m, k], S [batch, k] descending, V [batch, n, k], fp32
// row-major; info int32[batch] (0 = success).
//
// Algorithm, per matrix (all steps batched over the whole group):
//   1. X = fp64(A) in the workspace.
//   2. G = P^T P (s x s, fp64), where P is A if m >= n ("tall") and A^T
//      otherwise ("wide"): one cublasDgemmStridedBatched.
//   3. G = W diag(lambda) W^T: ONE cusolverDnXsyevBatched call (eigenvalues
//      ascending; chunked only where n * lda * batch would pass INT32_MAX,
//      the routine's documented limit). W holds the small-side singular
//      vectors: V if tall, U if wide.
//   4. info is read back once (one stream synchronisation per call).
//   5. Y = P W (L x s, fp64): one strided-batched GEMM. Y's columns are the
//      big-side vectors scaled by sigma: Y = U Sigma if tall, V Sigma if wide.
//   6. Matrices whose eigensolve failed (info != 0), or every matrix when
//      syevBatched is unavailable, are redone one by one with
//      cusolverDnDgesvdj on up to kMaxFallbackStreams streams forked from
//      the caller's stream by events and joined back before step 7; they
//      leave W and Y in the same form (Y = big-side vectors times sigma).
//   7. sigma_i = ||Y e_i|| (not sqrt(lambda_i): accurate down to ~eps32 *
//      sigma_1 instead of sqrt(eps64) * sigma_1), Y e_i /= sigma_i; a column
//      with sigma_i == 0 is exactly zero and stays zero (u_i = 0).
//   8. Re-orthonormalisation of the kept big-side columns in fp64: two
//      Newton-Schulz polar steps X <- X (3I - X^T X) / 2, each two GEMMs.
//      Only columns with sigma_i > tau = sigma_max * L * eps32 take part (the
//      triplets the caller keeps; the rest it drops): the coefficient matrix
//      is set to the identity on the other rows/columns, so those columns
//      pass through unchanged and do not disturb the kept ones. Their loss
//      of orthogonality after step 7 is ~eps64 sigma_1^2 / (sigma_i sigma_j)
//      <= ~1e-2 / L^2, so two steps bring it to rounding level.
//   9. Descending order: rank of each sigma (ties broken by index; NaN last),
//      then U, S, V are gathered, transposed to row-major and cast to fp32.
//
// Layout conventions. cuBLAS and cuSOLVER are column-major. A row-major
// [r, c] array with leading stride c is, read column-major, the c x r matrix
// of its transpose with leading dimension c. So the fp64 copy X of A
// (row-major [m, n]) is, column-major, A^T as an n x m matrix with ld n:
//   tall (m >= n, s = n, L = m): X is P^T as an s x L matrix, ld s;
//   wide (m <  n, s = m, L = n): X is P   as an L x s matrix, ld L.
// Every GEMM below states its operands in these terms. G, W and the
// Newton-Schulz coefficients are s x s (ld s); Y is L x s (ld L); all are
// column-major and packed per matrix (stride s*s or L*s).
#include <cfloat>
#include <atomic>
#include <climits>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "../cuda_common/device.cuh"
#include "../cuda_common/ops.h"
#include "solver_context.cuh"

#ifndef OPCM_HAVE_XSYEVBATCHED
// CMake sets this from the cusolverDn.h it compiles against; the version test
// is the fallback when the macro is not set.
#if defined(CUSOLVER_VERSION) && CUSOLVER_VERSION >= 11701
#define OPCM_HAVE_XSYEVBATCHED 1
#else
#define OPCM_HAVE_XSYEVBATCHED 0
#endif
#endif

namespace opcm::cuda {
namespace {

std::atomic<bool> g_force_fallback{false};

bool svd_force_fallback() { return g_force_fallback.load(std::memory_order_relaxed); }

constexpr std::size_t kAlign = 256;  // cublasSetWorkspace needs >= 256-byte alignment
constexpr std::size_t kCublasWorkspaceBytes = std::size_t{4} << 20;
constexpr int kMaxFallbackStreams = 4;
constexpr int kNewtonSchulzSteps = 2;
constexpr int kThreads = 256;
constexpr int kTile = 32;      // gather/transpose tile
constexpr int kTileRows = 8;   // threads in y per tile (each does kTile / kTileRows rows)
constexpr std::int64_t kMaxGridYZ = 65535;

// ------------------------------------------------------------- small utils

std::size_t align_up(std::size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

std::size_t checked_mul(std::size_t a, std::size_t b, const char* what) {
  std::size_t r = 0;
  OPCM_CUDA_ARG_CHECK(!__builtin_mul_overflow(a, b, &r), what << " overflows size_t");
  return r;
}

struct Dims {
  std::int64_t batch, m, n, s, L;
  bool tall;  // m >= n: the Gram matrix is A^T A (n x n)
};

Dims make_dims(std::int64_t batch, std::int64_t m, std::int64_t n) {
  OPCM_CUDA_ARG_CHECK(batch >= 0, "batch must be >= 0, got " << batch);
  OPCM_CUDA_ARG_CHECK(m >= 0 && n >= 0, "m and n must be >= 0, got " << m << " x " << n);
  OPCM_CUDA_ARG_CHECK(m <= INT_MAX && n <= INT_MAX,
                      "m and n must fit in int32 (cuBLAS/cuSOLVER sizes), got " << m << " x " << n);
  OPCM_CUDA_ARG_CHECK((m + kTile - 1) / kTile <= kMaxGridYZ && (n + kTile - 1) / kTile <= kMaxGridYZ,
                      "m and n must be <= " << kMaxGridYZ * kTile << ", got " << m << " x " << n);
  OPCM_CUDA_ARG_CHECK(batch <= kMaxGridYZ,
                      "batch must be <= " << kMaxGridYZ << " per call, got " << batch
                                          << "; split the group");
  Dims d{batch, m, n, m < n ? m : n, m < n ? n : m, m >= n};
  // Every per-matrix region is indexed with int64 and handed to cuBLAS with
  // int leading dimensions; L * s itself must fit an int64 byte count.
  (void)checked_mul(checked_mul(static_cast<std::size_t>(d.L), static_cast<std::size_t>(d.s),
                                "m * n"),
                    8 * static_cast<std::size_t>(batch ? batch : 1), "batch * m * n * 8");
  return d;
}

// Offsets (bytes, from the 256-aligned start of the workspace) of the fixed
// regions; the solver region (syevBatched or gesvdj workspaces) comes last.
struct Layout {
  std::size_t x, y, g, c, lam, sig, tau, perm, blas, solver;
};

Layout make_layout(const Dims& d) {
  const std::size_t b = static_cast<std::size_t>(d.batch);
  const std::size_t ls = static_cast<std::size_t>(d.L) * static_cast<std::size_t>(d.s);
  const std::size_t ss = static_cast<std::size_t>(d.s) * static_cast<std::size_t>(d.s);
  const std::size_t s = static_cast<std::size_t>(d.s);
  Layout l{};
  std::size_t off = 0;
  auto take = [&off](std::size_t bytes) {
    const std::size_t at = off;
    off += align_up(bytes);
    return at;
  };
  l.x = take(b * ls * sizeof(double));    // fp64 A, later Newton-Schulz scratch
  l.y = take(b * ls * sizeof(double));    // Y = P W, then the big-side vectors
  l.g = take(b * ss * sizeof(double));    // G, then W (small-side vectors)
  l.c = take(b * ss * sizeof(double));    // Newton-Schulz Gram / coefficients
  l.lam = take(b * s * sizeof(double));   // eigenvalues / gesvdj singular values
  l.sig = take(b * s * sizeof(double));   // sigma_i = ||Y e_i||
  l.tau = take(b * sizeof(double));       // per-matrix drop threshold
  l.perm = take(b * s * sizeof(int));     // output column j <- internal column perm[j]
  l.blas = take(kCublasWorkspaceBytes);   // cuBLAS workspace (cublasSetWorkspace)
  l.solver = off;
  return l;
}

bool syev_batched_compiled() { return OPCM_HAVE_XSYEVBATCHED != 0; }

// Matrices per syevBatched call: its documented limit is n * lda * batch <=
// INT32_MAX. 0 means syevBatched cannot be used for this size.
// The workspace size ignores the force-fallback test hook, so that toggling
// it between svd_workspace_size() and the call cannot shrink the workspace.
std::int64_t syev_chunk(const Dims& d, bool honour_hook = true) {
  if (!syev_batched_compiled() || (honour_hook && svd_force_fallback())) return 0;
  const std::int64_t per = d.s * d.s;
  const std::int64_t max_chunk = static_cast<std::int64_t>(INT32_MAX) / (per > 0 ? per : 1);
  return d.batch < max_chunk ? d.batch : max_chunk;
}

// The gesvdj problem on X_b: tall -> X_b is P^T = A^T (s x L, ld s), wide ->
// X_b is P = A^T (L x s, ld L). In both cases X_b = A^T, whose SVD
// A^T = V Sigma U^T gives gesvdj's "U" = our V and its "V" = our U. The
// small-side factor (s x s) goes to W, the big-side one (L x s) to Y:
//   tall: gesvdj U (s x s, ld s) -> W,  gesvdj V (L x s, ld L) -> Y
//   wide: gesvdj U (L x s, ld L) -> Y,  gesvdj V (s x s, ld s) -> W
struct GesvdjShape {
  int rows, cols, lda, ldu, ldv;
};
GesvdjShape gesvdj_shape(const Dims& d) {
  const int rows = static_cast<int>(d.tall ? d.s : d.L);
  const int cols = static_cast<int>(d.tall ? d.L : d.s);
  return {rows, cols, rows, rows, cols};
}

std::size_t gesvdj_bytes(cusolverDnHandle_t h, gesvdjInfo_t params, const Dims& d, double* x,
                         double* sv, double* uptr, double* vptr) {
  const GesvdjShape g = gesvdj_shape(d);
  int lwork = 0;
  OPCM_CUSOLVER_CHECK(cusolverDnDgesvdj_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, /*econ=*/1, g.rows,
                                                   g.cols, x, g.lda, sv, uptr, g.ldu, vptr, g.ldv,
                                                   &lwork, params));
  return static_cast<std::size_t>(lwork < 0 ? 0 : lwork) * sizeof(double);
}

#if OPCM_HAVE_XSYEVBATCHED
// cuSOLVER may decline a size or a device it has no syevBatched kernel for;
// those statuses send the matrices to the fallback instead of failing.
bool syev_declined(cusolverStatus_t st) {
  return st == CUSOLVER_STATUS_NOT_SUPPORTED || st == CUSOLVER_STATUS_ARCH_MISMATCH;
}

// Returns false (sizes untouched) when cuSOLVER declines the problem.
bool syev_batched_bytes(SolverContext& ctx, const Dims& d, std::int64_t chunk, const void* g,
                        const void* w, std::size_t* dev_bytes, std::size_t* host_bytes) {
  const cusolverStatus_t st = cusolverDnXsyevBatched_bufferSize(
      ctx.solver, ctx.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, d.s, CUDA_R_64F, g,
      /*lda=*/d.s, CUDA_R_64F, w, CUDA_R_64F, dev_bytes, host_bytes, chunk);
  if (syev_declined(st)) return false;
  check_cusolver(st, __FILE__, __LINE__, "cusolverDnXsyevBatched_bufferSize(...)");
  return true;
}
#endif

int fallback_slots(const Dims& d) {
  return static_cast<int>(d.batch < kMaxFallbackStreams ? d.batch : kMaxFallbackStreams);
}

// Bytes of the solver region: syevBatched's workspace and the fallback's
// per-slot gesvdj workspaces are used one after the other, never together.
std::size_t solver_region_bytes(SolverContext& ctx, const Dims& d) {
  std::size_t bytes = 0;
#if OPCM_HAVE_XSYEVBATCHED
  const std::int64_t chunk = syev_chunk(d, /*honour_hook=*/false);
  if (chunk > 0) {
    std::size_t dev = 0, host = 0;
    if (syev_batched_bytes(ctx, d, chunk, nullptr, nullptr, &dev, &host)) bytes = dev;
  }
#endif
  const std::size_t per_slot =
      align_up(gesvdj_bytes(ctx.solver, ctx.gesvdj, d, nullptr, nullptr, nullptr, nullptr));
  const std::size_t fb = checked_mul(per_slot, static_cast<std::size_t>(fallback_slots(d)),
                                     "fallback workspace");
  return bytes > fb ? bytes : fb;
}

// ----------------------------------------------------------------- kernels

__global__ void __launch_bounds__(kThreads)
    to_f64_kernel(const float* __restrict__ a, double* __restrict__ x, std::int64_t total) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < total; i += stride) {
    x[i] = static_cast<double>(a[i]);
  }
}

// Column c of matrix b (grid: x = column, y = matrix): sigma = ||column||,
// column /= sigma. A zero column stays zero (sigma = 0, u = 0).
__global__ void __launch_bounds__(kThreads)
    normalize_columns_kernel(double* __restrict__ y, std::int64_t L, std::int64_t s,
                             double* __restrict__ sig) {
  __shared__ double norm;
  const std::int64_t b = blockIdx.y;
  const std::int64_t c = blockIdx.x;
  double* col = y + (b * s + c) * L;
  double acc = 0.0;
  for (std::int64_t i = threadIdx.x; i < L; i += blockDim.x) acc += col[i] * col[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    norm = sqrt(acc);
    sig[b * s + c] = norm;
  }
  __syncthreads();
  const double nrm = norm;
  if (nrm > 0.0) {  // false for 0 and NaN
    for (std::int64_t i = threadIdx.x; i < L; i += blockDim.x) col[i] /= nrm;
  }
}

// Fallback: Y's columns (unit big-side vectors from gesvdj) times sigma, so
// that normalize_columns_kernel treats both paths alike. One matrix.
__global__ void __launch_bounds__(kThreads)
    scale_columns_kernel(double* __restrict__ y, std::int64_t L, const double* __restrict__ sv) {
  const std::int64_t c = blockIdx.x;
  const double f = sv[c];
  double* col = y + c * L;
  for (std::int64_t i = threadIdx.x; i < L; i += blockDim.x) col[i] *= f;
}

// tau[b] = max_i sig[b, i] * L * FLT_EPSILON (NaN ignored), one block per matrix.
__global__ void __launch_bounds__(kThreads)
    threshold_kernel(const double* __restrict__ sig, std::int64_t s, std::int64_t L,
                     double* __restrict__ tau) {
  __shared__ double part[kThreads / 32];
  const std::int64_t b = blockIdx.x;
  double mx = 0.0;
  for (std::int64_t i = threadIdx.x; i < s; i += blockDim.x) mx = fmax(mx, sig[b * s + i]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmax(mx, __shfl_down_sync(0xffffffffu, mx, off));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = mx;
  __syncthreads();
  if (threadIdx.x == 0) {
    double m = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) m = fmax(m, part[w]);
    tau[b] = m * static_cast<double>(L) * static_cast<double>(FLT_EPSILON);
  }
}

// In place on C = X^T X (s x s, column-major, per matrix): the Newton-Schulz
// coefficients T = (3I - C) / 2 on the kept rows/columns (sigma > tau), the
// identity on the others. NaN sigma counts as not kept.
__global__ void __launch_bounds__(kThreads)
    newton_schulz_coeff_kernel(double* __restrict__ c, const double* __restrict__ sig,
                               const double* __restrict__ tau, std::int64_t s,
                               std::int64_t batch) {
  const std::int64_t ss = s * s;
  const std::int64_t total = batch * ss;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       idx < total; idx += stride) {
    const std::int64_t b = idx / ss;
    const std::int64_t rem = idx - b * ss;
    const std::int64_t j = rem / s;  // column
    const std::int64_t i = rem - j * s;  // row
    const double t = tau[b];
    const bool kept_i = sig[b * s + i] > t;
    const bool kept_j = sig[b * s + j] > t;
    double v;
    if (kept_i && kept_j) {
      v = (i == j ? 1.5 : 0.0) - 0.5 * c[idx];
    } else {
      v = (i == j) ? 1.0 : 0.0;
    }
    c[idx] = v;
  }
}

__device__ __forceinline__ double sort_key(double v) { return isnan(v) ? -1.0 : v; }

// perm[b, rank(i)] = i, rank(i) = #{j : key_j > key_i or (key_j == key_i and
// j > i)}: a strict total order, so the ranks are a permutation (descending
// sigma; among ties the larger internal index first, which undoes
// syevBatched's ascending order). Grid: x = blocks of i, y = matrix.
__global__ void __launch_bounds__(kThreads)
    rank_kernel(const double* __restrict__ sig, std::int64_t s, int* __restrict__ perm) {
  __shared__ double keys[kThreads];
  const std::int64_t b = blockIdx.y;
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const double* sb = sig + b * s;
  const double ki = i < s ? sort_key(sb[i]) : 0.0;
  std::int64_t rank = 0;
  for (std::int64_t j0 = 0; j0 < s; j0 += kThreads) {
    const std::int64_t jl = j0 + threadIdx.x;
    keys[threadIdx.x] = jl < s ? sort_key(sb[jl]) : 0.0;
    __syncthreads();
    const std::int64_t jn = (s - j0) < kThreads ? (s - j0) : kThreads;
    if (i < s) {
      for (std::int64_t t = 0; t < jn; ++t) {
        const double kj = keys[t];
        const std::int64_t j = j0 + t;
        rank += (kj > ki || (kj == ki && j > i)) ? 1 : 0;
      }
    }
    __syncthreads();
  }
  if (i < s) perm[b * s + rank] = static_cast<int>(i);
}

// out[b][i * k + j] = float(src[b][perm[b][j] * ld + i]) for i < rows, j < k:
// column-major fp64 source, permuted columns, row-major fp32 destination.
// 32 x 32 tiles through shared memory so that both the reads (along i) and
// the writes (along j) are coalesced. Grid: x = tiles of j, y = tiles of i,
// z = matrix; block (32, 8).
__global__ void __launch_bounds__(kTile* kTileRows)
    gather_transpose_kernel(const double* __restrict__ src, std::int64_t src_stride,
                            std::int64_t ld, const int* __restrict__ perm, std::int64_t k,
                            std::int64_t rows, float* __restrict__ out) {
  __shared__ double tile[kTile][kTile + 1];
  const std::int64_t b = blockIdx.z;
  const std::int64_t j0 = static_cast<std::int64_t>(blockIdx.x) * kTile;
  const std::int64_t i0 = static_cast<std::int64_t>(blockIdx.y) * kTile;
  const double* sb = src + b * src_stride;
  const int* pb = perm + b * k;
  float* ob = out + b * rows * k;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int r = ty; r < kTile; r += kTileRows) {  // r: column within the tile
    const std::int64_t j = j0 + r;
    const std::int64_t i = i0 + tx;
    if (j < k && i < rows) tile[r][tx] = sb[static_cast<std::int64_t>(pb[j]) * ld + i];
  }
  __syncthreads();
  for (int r = ty; r < kTile; r += kTileRows) {  // r: row within the tile
    const std::int64_t i = i0 + r;
    const std::int64_t j = j0 + tx;
    if (i < rows && j < k) ob[i * k + j] = static_cast<float>(tile[tx][r]);
  }
}

__global__ void __launch_bounds__(kThreads)
    gather_sigma_kernel(const double* __restrict__ sig, const int* __restrict__ perm,
                        std::int64_t s, std::int64_t total, float* __restrict__ out) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       idx < total; idx += stride) {
    const std::int64_t b = idx / s;
    out[idx] = static_cast<float>(sig[b * s + perm[idx]]);
  }
}

// ------------------------------------------------------------ host pieces

struct Buffers {
  double *x, *y, *g, *c, *lam, *sig, *tau;
  int* perm;
  void* blas;
  char* solver;
  std::size_t solver_bytes;  // what is left of the caller's workspace for the solver region
};

// C = op(A) op(B), all operands fp64, column-major, batched with strides.
void dgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, std::int64_t m,
           std::int64_t n, std::int64_t k, const double* a, std::int64_t lda,
           std::int64_t stride_a, const double* b, std::int64_t ldb, std::int64_t stride_b,
           double* c, std::int64_t ldc, std::int64_t stride_c, std::int64_t batch) {
  const double one = 1.0, zero = 0.0;
  OPCM_CUBLAS_CHECK(cublasDgemmStridedBatched(
      h, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &one, a,
      static_cast<int>(lda), static_cast<long long>(stride_a), b, static_cast<int>(ldb),
      static_cast<long long>(stride_b), &zero, c, static_cast<int>(ldc),
      static_cast<long long>(stride_c), static_cast<int>(batch)));
}

// Step 6: gesvdj for the matrices in `failed`, round-robin over the fallback
// slots' streams, forked from and joined back into `stream`.
void run_fallback(SolverContext& ctx, const Dims& d, const Buffers& buf,
                  const std::vector<std::int64_t>& failed, int* info, cudaStream_t stream) {
  const int nslots = static_cast<int>(
      failed.size() < static_cast<std::size_t>(kMaxFallbackStreams) ? failed.size()
                                                                      : kMaxFallbackStreams);
  ctx.ensure_slots(nslots);
  const GesvdjShape g = gesvdj_shape(d);
  const std::int64_t ls = d.L * d.s, ss = d.s * d.s;
  auto x_of = [&](std::int64_t b) { return buf.x + b * ls; };
  auto w_of = [&](std::int64_t b) { return buf.g + b * ss; };
  auto y_of = [&](std::int64_t b) { return buf.y + b * ls; };
  auto sv_of = [&](std::int64_t b) { return buf.lam + b * d.s; };
  auto u_of = [&](std::int64_t b) { return d.tall ? w_of(b) : y_of(b); };  // gesvdj's U
  auto v_of = [&](std::int64_t b) { return d.tall ? y_of(b) : w_of(b); };  // gesvdj's V

  const std::int64_t b0 = failed.front();
  const std::size_t per_slot = align_up(gesvdj_bytes(ctx.slots[0].solver, ctx.slots[0].gesvdj, d,
                                                     x_of(b0), sv_of(b0), u_of(b0), v_of(b0)));
  OPCM_CUDA_ARG_CHECK(checked_mul(per_slot, static_cast<std::size_t>(nslots), "fallback workspace") <=
                          buf.solver_bytes,
                      "work_bytes is too small for the gesvdj fallback ("
                          << per_slot * static_cast<std::size_t>(nslots) << " bytes needed, "
                          << buf.solver_bytes << " left); use svd_workspace_size()");
  const int lwork = static_cast<int>(per_slot / sizeof(double));

  OPCM_CUDA_CHECK(cudaEventRecord(ctx.fork, stream));
  for (int t = 0; t < nslots; ++t) OPCM_CUDA_CHECK(cudaStreamWaitEvent(ctx.slots[t].stream, ctx.fork, 0));
  std::exception_ptr error;
  try {
    for (std::size_t f = 0; f < failed.size(); ++f) {
      const FallbackSlot& slot = ctx.slots[f % static_cast<std::size_t>(nslots)];
      const std::int64_t b = failed[f];
      double* work = reinterpret_cast<double*>(buf.solver + (f % nslots) * per_slot);
      // Overwrites X_b (not needed after step 5), W_b, Y_b, lam_b and info[b].
      OPCM_CUSOLVER_CHECK(cusolverDnDgesvdj(slot.solver, CUSOLVER_EIG_MODE_VECTOR, /*econ=*/1,
                                            g.rows, g.cols, x_of(b), g.lda, sv_of(b), u_of(b),
                                            g.ldu, v_of(b), g.ldv, work, lwork, info + b,
                                            slot.gesvdj));
      scale_columns_kernel<<<static_cast<unsigned>(d.s), kThreads, 0, slot.stream>>>(
          y_of(b), d.L, sv_of(b));
      OPCM_CUDA_CHECK_LAUNCH();
    }
  } catch (...) {
    error = std::current_exception();
  }
  for (int t = 0; t < nslots; ++t) {
    // Always join, also after an error: the caller's allocator may reuse the
    // workspace as soon as its own stream has moved on.
    const cudaError_t rec = cudaEventRecord(ctx.slots[t].done, ctx.slots[t].stream);
    if (rec == cudaSuccess) {
      (void)cudaStreamWaitEvent(stream, ctx.slots[t].done, 0);
    } else {
      (void)cudaGetLastError();
      (void)cudaStreamSynchronize(ctx.slots[t].stream);
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

// ------------------------------------------------------------------ entries

std::size_t svd_workspace_size(std::int64_t batch, std::int64_t m, std::int64_t n) {
  const Dims d = make_dims(batch, m, n);
  if (d.batch == 0 || d.s == 0) return 0;
  SolverContextLease ctx;
  const Layout l = make_layout(d);
  return l.solver + solver_region_bytes(*ctx, d) + kAlign;  // kAlign: slack to align the start
}

void batched_thin_svd(std::uintptr_t a, std::int64_t batch, std::int64_t m, std::int64_t n,
                      std::uintptr_t u, std::uintptr_t s_out, std::uintptr_t v,
                      std::uintptr_t work, std::size_t work_bytes, std::uintptr_t info,
                      std::uintptr_t stream_handle) {
  const Dims d = make_dims(batch, m, n);
  if (d.batch == 0) return;
  OPCM_CUDA_ARG_CHECK(aligned_to(info, 4), "info_ptr must be 4-byte aligned (int32)");
  cudaStream_t stream = as_stream(stream_handle);
  if (d.s == 0) {  // empty factors; nothing can fail
    const NamedPtr ptrs[] = {{info, "info_ptr"}};
    DeviceGuard guard(common_device(ptrs));
    OPCM_CUDA_CHECK(cudaMemsetAsync(as_ptr<void>(info), 0, sizeof(int) * d.batch, stream));
    return;
  }
  OPCM_CUDA_ARG_CHECK(aligned_to(a, 4) && aligned_to(u, 4) && aligned_to(s_out, 4) &&
                          aligned_to(v, 4),
                      "a_ptr, u_ptr, s_ptr and v_ptr must be 4-byte aligned (float32)");
  const NamedPtr ptrs[] = {{a, "a_ptr"},       {u, "u_ptr"},       {s_out, "s_ptr"},
                           {v, "v_ptr"},       {work, "work_ptr"}, {info, "info_ptr"}};
  DeviceGuard guard(common_device(ptrs));
  SolverContextLease ctx;

  // ---- carve the workspace
  const Layout l = make_layout(d);
  const std::uintptr_t base = (work + kAlign - 1) / kAlign * kAlign;
  const std::size_t lead = static_cast<std::size_t>(base - work);
  OPCM_CUDA_ARG_CHECK(work_bytes >= lead + l.solver,
                      "work_bytes (" << work_bytes << ") is too small: at least "
                                     << lead + l.solver
                                     << " bytes before the solver workspace; use "
                                        "svd_workspace_size()");
  char* w = reinterpret_cast<char*>(base);
  Buffers buf{reinterpret_cast<double*>(w + l.x),   reinterpret_cast<double*>(w + l.y),
              reinterpret_cast<double*>(w + l.g),   reinterpret_cast<double*>(w + l.c),
              reinterpret_cast<double*>(w + l.lam), reinterpret_cast<double*>(w + l.sig),
              reinterpret_cast<double*>(w + l.tau), reinterpret_cast<int*>(w + l.perm),
              w + l.blas,                           w + l.solver,
              work_bytes - lead - l.solver};
  int* info_d = as_ptr<int>(info);
  const std::int64_t ls = d.L * d.s, ss = d.s * d.s;

  // cublasSetStream resets the workspace to cuBLAS's default pool, so the
  // workspace is set after the stream, on every call.
  OPCM_CUBLAS_CHECK(cublasSetStream(ctx->blas, stream));
  OPCM_CUBLAS_CHECK(cublasSetWorkspace(ctx->blas, buf.blas, kCublasWorkspaceBytes));
  OPCM_CUSOLVER_CHECK(cusolverDnSetStream(ctx->solver, stream));

  // ---- 1. X = fp64(A)
  {
    const std::int64_t total = d.batch * ls;
    to_f64_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(as_ptr<const float>(a), buf.x,
                                                                      total);
    OPCM_CUDA_CHECK_LAUNCH();
  }

  std::vector<std::int64_t> failed;
  const std::int64_t chunk = syev_chunk(d);
  if (chunk > 0) {
#if OPCM_HAVE_XSYEVBATCHED
    // ---- 2. G = P^T P (s x s).
    if (d.tall) {
      // X = P^T (s x L, ld s): G = X X^T -> gemm(N, T), M = N = s, K = L;
      // A = X (s x L, lda s), B = X stored N x K = s x L (ldb s).
      dgemm(ctx->blas, CUBLAS_OP_N, CUBLAS_OP_T, d.s, d.s, d.L, buf.x, d.s, ls, buf.x, d.s, ls,
            buf.g, d.s, ss, d.batch);
    } else {
      // X = P (L x s, ld L): G = X^T X -> gemm(T, N), M = N = s, K = L;
      // A stored K x M = L x s (lda L), B stored K x N = L x s (ldb L).
      dgemm(ctx->blas, CUBLAS_OP_T, CUBLAS_OP_N, d.s, d.s, d.L, buf.x, d.L, ls, buf.x, d.L, ls,
            buf.g, d.s, ss, d.batch);
    }
    // ---- 3. G = W diag(lam) W^T, in place, ascending eigenvalues.
    std::vector<char> ran(static_cast<std::size_t>(d.batch), 0);
    bool any_ran = false;
    for (std::int64_t c0 = 0; c0 < d.batch; c0 += chunk) {
      const std::int64_t cb = (d.batch - c0) < chunk ? (d.batch - c0) : chunk;
      double* g = buf.g + c0 * ss;
      double* lam = buf.lam + c0 * d.s;
      std::size_t dev_bytes = 0, host_bytes = 0;
      if (!syev_batched_bytes(*ctx, d, cb, g, lam, &dev_bytes, &host_bytes)) continue;
      OPCM_CUDA_ARG_CHECK(dev_bytes <= buf.solver_bytes,
                          "work_bytes is too small for cusolverDnXsyevBatched ("
                              << dev_bytes << " bytes needed, " << buf.solver_bytes
                              << " left); use svd_workspace_size()");
      if (ctx->host_work.size() < host_bytes) ctx->host_work.resize(host_bytes);
      const cusolverStatus_t st = cusolverDnXsyevBatched(
          ctx->solver, ctx->params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, d.s,
          CUDA_R_64F, g, /*lda=*/d.s, CUDA_R_64F, lam, CUDA_R_64F, buf.solver, dev_bytes,
          host_bytes ? ctx->host_work.data() : nullptr, host_bytes, info_d + c0, cb);
      if (syev_declined(st)) continue;
      if (st == CUSOLVER_STATUS_INVALID_VALUE) {
        // The routine reports the offending parameter as info[0] = -i.
        int bad = 0;
        (void)cudaMemcpy(&bad, info_d + c0, sizeof(int), cudaMemcpyDeviceToHost);
        throw_library_error(__FILE__, __LINE__, "cuSOLVER", cusolver_status_name(st),
                            "invalid parameter #" + std::to_string(-bad) + " (n=" +
                                std::to_string(d.s) + ", batch=" + std::to_string(cb) + ")",
                            "cusolverDnXsyevBatched(...)");
      }
      check_cusolver(st, __FILE__, __LINE__, "cusolverDnXsyevBatched(...)");
      for (std::int64_t b = c0; b < c0 + cb; ++b) ran[static_cast<std::size_t>(b)] = 1;
      any_ran = true;
    }
    // ---- 4. info, read once.
    std::vector<int> h_info(static_cast<std::size_t>(d.batch), 0);
    if (any_ran) {
      OPCM_CUDA_CHECK(cudaMemcpyAsync(h_info.data(), info_d, sizeof(int) * d.batch,
                                      cudaMemcpyDeviceToHost, stream));
      OPCM_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    for (std::int64_t b = 0; b < d.batch; ++b) {
      const std::size_t i = static_cast<std::size_t>(b);
      if (!ran[i] || h_info[i] != 0) failed.push_back(b);
    }
    // ---- 5. Y = P W (L x s), unless every matrix goes to the fallback anyway.
    if (failed.size() == static_cast<std::size_t>(d.batch)) {
      // nothing to do
    } else if (d.tall) {
      // P = X^T with X s x L (ld s): Y = X^T W -> gemm(T, N), M = L, N = s,
      // K = s; A stored K x M = s x L (lda s), B = W (s x s, ldb s).
      dgemm(ctx->blas, CUBLAS_OP_T, CUBLAS_OP_N, d.L, d.s, d.s, buf.x, d.s, ls, buf.g, d.s, ss,
            buf.y, d.L, ls, d.batch);
    } else {
      // P = X (L x s, ld L): Y = X W -> gemm(N, N), M = L, N = s, K = s.
      dgemm(ctx->blas, CUBLAS_OP_N, CUBLAS_OP_N, d.L, d.s, d.s, buf.x, d.L, ls, buf.g, d.s, ss,
            buf.y, d.L, ls, d.batch);
    }
#endif
  } else {
    for (std::int64_t b = 0; b < d.batch; ++b) failed.push_back(b);
  }

  // ---- 6. per-matrix fallback.
  if (!failed.empty()) run_fallback(*ctx, d, buf, failed, info_d, stream);

  // ---- 7. sigma and unit big-side vectors.
  normalize_columns_kernel<<<dim3(static_cast<unsigned>(d.s), static_cast<unsigned>(d.batch)),
                             kThreads, 0, stream>>>(buf.y, d.L, d.s, buf.sig);
  OPCM_CUDA_CHECK_LAUNCH();
  threshold_kernel<<<static_cast<unsigned>(d.batch), kThreads, 0, stream>>>(buf.sig, d.s, d.L,
                                                                            buf.tau);
  OPCM_CUDA_CHECK_LAUNCH();

  // ---- 8. Newton-Schulz on the kept columns; ping-pong between Y and X.
  double* cur = buf.y;
  double* nxt = buf.x;  // X_b is free now (gesvdj may have destroyed it, P W is done)
  for (int step = 0; step < kNewtonSchulzSteps; ++step) {
    // C = Z^T Z (s x s): gemm(T, N), M = N = s, K = L; Z is L x s (ld L).
    dgemm(ctx->blas, CUBLAS_OP_T, CUBLAS_OP_N, d.s, d.s, d.L, cur, d.L, ls, cur, d.L, ls, buf.c,
          d.s, ss, d.batch);
    const std::int64_t total = d.batch * ss;
    newton_schulz_coeff_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        buf.c, buf.sig, buf.tau, d.s, d.batch);
    OPCM_CUDA_CHECK_LAUNCH();
    // Z' = Z T (L x s): gemm(N, N), M = L, N = s, K = s.
    dgemm(ctx->blas, CUBLAS_OP_N, CUBLAS_OP_N, d.L, d.s, d.s, cur, d.L, ls, buf.c, d.s, ss, nxt,
          d.L, ls, d.batch);
    double* t = cur;
    cur = nxt;
    nxt = t;
  }
  // kNewtonSchulzSteps is even: the result is back in Y.
  static_assert(kNewtonSchulzSteps % 2 == 0, "the result must end in buf.y");

  // ---- 9. descending order and the fp32 row-major outputs.
  {
    const dim3 grid(static_cast<unsigned>((d.s + kThreads - 1) / kThreads),
                    static_cast<unsigned>(d.batch));
    rank_kernel<<<grid, kThreads, 0, stream>>>(buf.sig, d.s, buf.perm);
    OPCM_CUDA_CHECK_LAUNCH();
  }
  {
    const std::int64_t total = d.batch * d.s;
    gather_sigma_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(
        buf.sig, buf.perm, d.s, total, as_ptr<float>(s_out));
    OPCM_CUDA_CHECK_LAUNCH();
  }
  // Big side: Y (L x s, ld L). Small side: W (s x s, ld s).
  // tall: U (m = L rows) <- Y, V (n = s rows) <- W; wide: U (m = s) <- W, V (n = L) <- Y.
  auto gather = [&](const double* src, std::int64_t stride, std::int64_t ld, std::int64_t rows,
                    std::uintptr_t out) {
    const dim3 grid(static_cast<unsigned>((d.s + kTile - 1) / kTile),
                    static_cast<unsigned>((rows + kTile - 1) / kTile),
                    static_cast<unsigned>(d.batch));
    gather_transpose_kernel<<<grid, dim3(kTile, kTileRows), 0, stream>>>(
        src, stride, ld, buf.perm, d.s, rows, as_ptr<float>(out));
    OPCM_CUDA_CHECK_LAUNCH();
  };
  if (d.tall) {
    gather(buf.y, ls, d.L, d.m, u);
    gather(buf.g, ss, d.s, d.n, v);
  } else {
    gather(buf.g, ss, d.s, d.m, u);
    gather(buf.y, ls, d.L, d.n, v);
  }
}

void set_svd_force_fallback(bool enabled) {
  g_force_fallback.store(enabled, std::memory_order_relaxed);
}

BuildInfo build_info() {
  BuildInfo bi{};
  bi.cuda_runtime_version = CUDART_VERSION;
  bi.cusolver_version = CUSOLVER_VERSION;
  bi.cublas_version = CUBLAS_VERSION;
  bi.syev_batched = syev_batched_compiled();
  return bi;
}

}  // namespace opcm::cuda
