// Batched thin SVD of fp32 matrices (CUDA), through the Gram matrix in fp64.
// Contract: thin_svd.h. The eigensolvers and fallbacks: solvers.cuh.
//
// A: [batch, m, n] fp32 row-major. k = s = min(m, n), L = max(m, n).
//
// Algorithm, per matrix (all steps batched over the whole group):
//   1. X = fp64(A) in the workspace.
//   2. G = P^T P (s x s, fp64), where P is A if m >= n ("tall") and A^T
//      otherwise ("wide"): one cublasDgemmStridedBatched.
//   3. G = W diag(lambda) W^T (solvers.cuh: syevBatched, else Xsyevd per
//      matrix), info read back once. W holds the small-side singular vectors:
//      V if tall, U if wide.
//   4. Y = P W (L x s, fp64): one strided-batched GEMM. Y's columns are the
//      big-side vectors scaled by sigma: Y = U Sigma if tall, V Sigma if wide.
//   5. Matrices whose eigensolve failed or was declined are redone with gesvdj
//      on X (solvers.cuh), which leaves W and Y in the same form.
//   6. sigma_i = ||Y e_i|| (not sqrt(lambda_i): accurate down to ~eps32 *
//      sigma_1 instead of sqrt(eps64) * sigma_1), Y e_i /= sigma_i; a column
//      with sigma_i == 0 is exactly zero and stays zero (u_i = 0).
//   7. Re-orthonormalisation of the kept big-side columns in fp64: two
//      Newton-Schulz polar steps X <- X (3I - X^T X) / 2, each two GEMMs.
//      Only columns with sigma_i > tau = sigma_max * L * eps32 take part (the
//      triplets the caller keeps; the rest it drops): the coefficient matrix
//      is set to the identity on the other rows/columns, so those columns
//      pass through unchanged and do not disturb the kept ones. Their loss
//      of orthogonality after step 6 is ~eps64 sigma_1^2 / (sigma_i sigma_j)
//      <= ~1e-2 / L^2, so two steps bring it to rounding level.
//   8. Descending order: rank of each sigma (ties broken by index; NaN last),
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
#include "svd/thin_svd.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cusolverDn.h>
#include <library_types.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <vector>

#include "common/device.cuh"
#include "svd/solvers.cuh"

namespace opcm::cuda {
namespace {

constexpr int kNewtonSchulzSteps = 2;
constexpr int kThreads = 256;
constexpr int kTile = 32;      // gather/transpose tile
constexpr int kTileRows = 8;   // threads in y per tile (each does kTile / kTileRows rows)
constexpr std::int64_t kMaxGridYZ = 65535;

// ------------------------------------------------------------- small utils

std::size_t checked_mul(std::size_t a, std::size_t b, const char* fn, const char* what) {
  std::size_t r = 0;
  OPCM_CHECK_ARG(!__builtin_mul_overflow(a, b, &r), fn, what, "overflows size_t");
  return r;
}

Dims make_dims(const char* fn, std::int64_t batch, std::int64_t m, std::int64_t n) {
  OPCM_CHECK_SIZE(batch, fn, "batch");
  OPCM_CHECK_SIZE(m, fn, "m");
  OPCM_CHECK_SIZE(n, fn, "n");
  OPCM_CHECK_ARG(m <= INT_MAX && n <= INT_MAX, fn, "m",
                 "and n must fit in int32 (cuBLAS/cuSOLVER sizes), got ", m, " x ", n);
  OPCM_CHECK_ARG((m + kTile - 1) / kTile <= kMaxGridYZ && (n + kTile - 1) / kTile <= kMaxGridYZ, fn, "m",
                 "and n must be <= ", kMaxGridYZ * kTile, ", got ", m, " x ", n);
  OPCM_CHECK_ARG(batch <= kMaxGridYZ, fn, "batch", "must be <= ", kMaxGridYZ, " per call (got ", batch,
                 "); split the group");
  Dims d{batch, m, n, m < n ? m : n, m < n ? n : m, m >= n};
  // Every per-matrix region is indexed with int64 and handed to cuBLAS with
  // int leading dimensions; L * s itself must fit an int64 byte count.
  (void)checked_mul(checked_mul(static_cast<std::size_t>(d.L), static_cast<std::size_t>(d.s), fn, "m * n"),
                    8 * static_cast<std::size_t>(batch ? batch : 1), fn, "batch * m * n * 8");
  return d;
}

// cuBLAS asks for a 32 MiB workspace on Hopper (sm_90) and newer, 4 MiB before.
std::size_t cublas_workspace_bytes() {
  int dev = 0, major = 0;
  OPCM_CUDA_CHECK(cudaGetDevice(&dev));
  OPCM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return (major >= 9 ? std::size_t{32} : std::size_t{4}) << 20;
}

// Offsets (bytes, from the 256-aligned start of the workspace) of the fixed
// regions; the solver region comes last.
struct Layout {
  std::size_t x, y, g, c, lam, sig, tau, perm, blas, blas_bytes, solver;
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
  l.blas_bytes = cublas_workspace_bytes();
  l.blas = take(l.blas_bytes);            // cuBLAS workspace (cublasSetWorkspace)
  l.solver = off;
  return l;
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

int encode_version(int major, int minor, int patch) { return (major * 100 + minor) * 100 + patch; }

}  // namespace

// ------------------------------------------------------------------ entries

std::size_t svd_workspace_size(std::int64_t batch, std::int64_t m, std::int64_t n) {
  const Dims d = make_dims("opcm_ext._cuda.svd_workspace_size", batch, m, n);
  if (d.batch == 0 || d.s == 0) return 0;
  SolverContextLease ctx;
  const Layout l = make_layout(d);
  return l.solver + solver_workspace_bytes(*ctx, d) + kAlign;  // kAlign: slack to align the start
}

void batched_thin_svd(addr_t a, std::int64_t batch, std::int64_t m, std::int64_t n, addr_t u, addr_t s_out,
                      addr_t v, addr_t work, std::size_t work_bytes, addr_t info, addr_t stream_handle) {
  constexpr const char* fn = "opcm_ext._cuda.batched_thin_svd";
  const Dims d = make_dims(fn, batch, m, n);
  if (d.batch == 0) return;
  OPCM_CHECK_ALIGNED(info, 4, fn, "info_ptr");
  cudaStream_t stream = as_stream(stream_handle);
  if (d.s == 0) {  // empty factors; nothing can fail
    const NamedPtr ptrs[] = {{info, "info_ptr"}};
    DeviceGuard guard(common_device(fn, ptrs));
    OPCM_CUDA_CHECK(cudaMemsetAsync(as_ptr<void>(info), 0, sizeof(int) * d.batch, stream));
    return;
  }
  OPCM_CHECK_ALIGNED(a, 4, fn, "a_ptr");
  OPCM_CHECK_ALIGNED(u, 4, fn, "u_ptr");
  OPCM_CHECK_ALIGNED(s_out, 4, fn, "s_ptr");
  OPCM_CHECK_ALIGNED(v, 4, fn, "v_ptr");
  const NamedPtr ptrs[] = {{a, "a_ptr"},       {u, "u_ptr"},       {s_out, "s_ptr"},
                           {v, "v_ptr"},       {work, "work_ptr"}, {info, "info_ptr"}};
  DeviceGuard guard(common_device(fn, ptrs));
  SolverContextLease ctx;

  // ---- carve the workspace
  const Layout l = make_layout(d);
  const addr_t base = (work + kAlign - 1) / kAlign * kAlign;
  const std::size_t lead = static_cast<std::size_t>(base - work);
  OPCM_CHECK_ARG(work_bytes >= lead + l.solver, fn, "work_bytes", "(", work_bytes, ") is too small: at least ",
                 lead + l.solver, " bytes before the solver workspace; use svd_workspace_size()");
  char* w = reinterpret_cast<char*>(base);
  const Buffers buf{reinterpret_cast<double*>(w + l.x),   reinterpret_cast<double*>(w + l.y),
                    reinterpret_cast<double*>(w + l.g),   reinterpret_cast<double*>(w + l.c),
                    reinterpret_cast<double*>(w + l.lam), reinterpret_cast<double*>(w + l.sig),
                    reinterpret_cast<double*>(w + l.tau), reinterpret_cast<int*>(w + l.perm),
                    w + l.blas,                           w + l.solver,
                    work_bytes - lead - l.solver,         as_ptr<int>(info)};
  const std::int64_t ls = d.L * d.s, ss = d.s * d.s;

  // cublasSetStream resets the workspace to cuBLAS's default pool, so the
  // workspace is set after the stream, on every call.
  OPCM_CUBLAS_CHECK(cublasSetStream(ctx->blas, stream));
  OPCM_CUBLAS_CHECK(cublasSetWorkspace(ctx->blas, buf.blas, l.blas_bytes));
  OPCM_CUSOLVER_CHECK(cusolverDnSetStream(ctx->solver, stream));

  // ---- 1. X = fp64(A)
  {
    const std::int64_t total = d.batch * ls;
    to_f64_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(as_ptr<const float>(a), buf.x, total);
    OPCM_CUDA_CHECK_LAUNCH();
  }
  // ---- 2. G = P^T P (s x s).
  if (d.tall) {
    // X = P^T (s x L, ld s): G = X X^T -> gemm(N, T), M = N = s, K = L;
    // A = X (s x L, lda s), B = X stored N x K = s x L (ldb s).
    dgemm(ctx->blas, CUBLAS_OP_N, CUBLAS_OP_T, d.s, d.s, d.L, buf.x, d.s, ls, buf.x, d.s, ls, buf.g, d.s, ss,
          d.batch);
  } else {
    // X = P (L x s, ld L): G = X^T X -> gemm(T, N), M = N = s, K = L;
    // A stored K x M = L x s (lda L), B stored K x N = L x s (ldb L).
    dgemm(ctx->blas, CUBLAS_OP_T, CUBLAS_OP_N, d.s, d.s, d.L, buf.x, d.L, ls, buf.x, d.L, ls, buf.g, d.s, ss,
          d.batch);
  }
  // ---- 3. G = W diag(lam) W^T, in place, ascending eigenvalues; info read once.
  const std::vector<std::int64_t> failed = eigendecompose(*ctx, d, buf, stream);
  // ---- 4. Y = P W (L x s), unless every matrix goes to gesvdj anyway.
  if (failed.size() == static_cast<std::size_t>(d.batch)) {
    // nothing to do
  } else if (d.tall) {
    // P = X^T with X s x L (ld s): Y = X^T W -> gemm(T, N), M = L, N = s,
    // K = s; A stored K x M = s x L (lda s), B = W (s x s, ldb s).
    dgemm(ctx->blas, CUBLAS_OP_T, CUBLAS_OP_N, d.L, d.s, d.s, buf.x, d.s, ls, buf.g, d.s, ss, buf.y, d.L, ls,
          d.batch);
  } else {
    // P = X (L x s, ld L): Y = X W -> gemm(N, N), M = L, N = s, K = s.
    dgemm(ctx->blas, CUBLAS_OP_N, CUBLAS_OP_N, d.L, d.s, d.s, buf.x, d.L, ls, buf.g, d.s, ss, buf.y, d.L, ls,
          d.batch);
  }
  // ---- 5. gesvdj, the last resort.
  if (!failed.empty()) gesvdj_fallback(*ctx, d, buf, failed, stream);

  // ---- 6. sigma and unit big-side vectors.
  normalize_columns_kernel<<<dim3(static_cast<unsigned>(d.s), static_cast<unsigned>(d.batch)),
                             kThreads, 0, stream>>>(buf.y, d.L, d.s, buf.sig);
  OPCM_CUDA_CHECK_LAUNCH();
  threshold_kernel<<<static_cast<unsigned>(d.batch), kThreads, 0, stream>>>(buf.sig, d.s, d.L,
                                                                            buf.tau);
  OPCM_CUDA_CHECK_LAUNCH();

  // ---- 7. Newton-Schulz on the kept columns; ping-pong between Y and X.
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

  // ---- 8. descending order and the fp32 row-major outputs.
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
                    addr_t out) {
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

void set_svd_path(int path) { set_solver_path(path); }

void init_handles() {
  SolverContextLease ctx;  // creates the current device's cuBLAS/cuSOLVER handles on first use
}

BuildInfo build_info() {
  BuildInfo bi{};
  bi.cuda_runtime_version = CUDART_VERSION;
  bi.cusolver_version = encode_version(CUSOLVER_VER_MAJOR, CUSOLVER_VER_MINOR, CUSOLVER_VER_PATCH);
  bi.cublas_version = encode_version(CUBLAS_VER_MAJOR, CUBLAS_VER_MINOR, CUBLAS_VER_PATCH);
  bi.syev_batched = syev_batched_compiled();
  return bi;
}

RuntimeInfo runtime_info() {
  RuntimeInfo ri{-1, -1, cusolver_loaded_version(), -1, 0, syev_batched_usable()};
  if (cudaRuntimeGetVersion(&ri.cuda_runtime_version) != cudaSuccess) ri.cuda_runtime_version = -1;
  if (cudaDriverGetVersion(&ri.cuda_driver_version) != cudaSuccess) ri.cuda_driver_version = -1;
  if (cudaGetDeviceCount(&ri.device_count) != cudaSuccess) ri.device_count = 0;
  (void)cudaGetLastError();  // no GPU or no driver is an answer here, not a pending error
  int major = 0, minor = 0, patch = 0;
  if (cublasGetProperty(MAJOR_VERSION, &major) == CUBLAS_STATUS_SUCCESS &&
      cublasGetProperty(MINOR_VERSION, &minor) == CUBLAS_STATUS_SUCCESS &&
      cublasGetProperty(PATCH_LEVEL, &patch) == CUBLAS_STATUS_SUCCESS) {
    ri.cublas_version = encode_version(major, minor, patch);
  }
  return ri;
}

}  // namespace opcm::cuda
