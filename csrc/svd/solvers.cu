// Eigensolvers and fallbacks of batched_thin_svd. See solvers.cuh.
#include "svd/solvers.cuh"

#include <cusolverDn.h>
#include <dlfcn.h>
#include <library_types.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <exception>

#include "common/check.h"
#include "common/cuda_check.cuh"

// cusolverDnXsyevBatched needs cuSOLVER >= 11.7.2, in the headers compiled
// against (for its declaration) and in the library loaded at run time. It is
// looked up at run time (dlsym), so the module also loads next to an older
// cuSOLVER of the same CUDA family and then uses Xsyevd per matrix.
#define OPCM_VERSION_CODE(major, minor, patch) (((major) * 100 + (minor)) * 100 + (patch))
#if OPCM_VERSION_CODE(CUSOLVER_VER_MAJOR, CUSOLVER_VER_MINOR, CUSOLVER_VER_PATCH) >= OPCM_VERSION_CODE(11, 7, 2)
#define OPCM_HAVE_XSYEVBATCHED 1
#else
#define OPCM_HAVE_XSYEVBATCHED 0
#endif

namespace opcm::cuda {
namespace {

constexpr const char* kFn = "opcm_ext._cuda.batched_thin_svd";
constexpr int kThreads = 256;
enum Path : int { kAuto = 0, kNoBatched = 1, kGesvdjOnly = 2 };

std::atomic<int> g_path{kAuto};

// A solver that cannot take this problem (size, device, version) says so with
// one of these; the matrices then go to the next path instead of failing.
bool declined(cusolverStatus_t st) {
  return st == CUSOLVER_STATUS_NOT_SUPPORTED || st == CUSOLVER_STATUS_ARCH_MISMATCH ||
         st == CUSOLVER_STATUS_INVALID_VALUE;
}

int slot_count(std::size_t items) {
  return static_cast<int>(std::min<std::size_t>(items, static_cast<std::size_t>(kMaxSlots)));
}

#if OPCM_HAVE_XSYEVBATCHED
using SyevBatchedFn = decltype(&cusolverDnXsyevBatched);
using SyevBatchedSizeFn = decltype(&cusolverDnXsyevBatched_bufferSize);
struct SyevBatchedApi {
  SyevBatchedFn run = nullptr;
  SyevBatchedSizeFn size = nullptr;
};

// `name` in the libcusolver this module is bound to (the file defining
// cusolverGetProperty), or nullptr.
void* cusolver_symbol(const char* name) {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&cusolverGetProperty), &info) == 0 || info.dli_fname == nullptr) {
    return nullptr;
  }
  void* lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
  if (lib == nullptr) return nullptr;
  void* sym = dlsym(lib, name);
  dlclose(lib);  // only drops the reference RTLD_NOLOAD took: the module links the library
  return sym;
}

const SyevBatchedApi& syev_batched_api() {
  static const SyevBatchedApi api = [] {
    SyevBatchedApi a;
    if (cusolver_loaded_version() < OPCM_VERSION_CODE(11, 7, 2)) return a;
    a.run = reinterpret_cast<SyevBatchedFn>(cusolver_symbol("cusolverDnXsyevBatched"));
    a.size = reinterpret_cast<SyevBatchedSizeFn>(cusolver_symbol("cusolverDnXsyevBatched_bufferSize"));
    if (a.run == nullptr || a.size == nullptr) a = SyevBatchedApi{};
    return a;
  }();
  return api;
}

// Matrices per syevBatched call (its limit: n * lda * batch <= INT32_MAX).
std::int64_t syev_chunk(const Dims& d) {
  const std::int64_t per = d.s * d.s > 0 ? d.s * d.s : 1;
  return std::min<std::int64_t>(d.batch, static_cast<std::int64_t>(INT32_MAX) / per);
}

// Device and host bytes of syevBatched for `chunk` matrices; false when declined.
bool syev_batched_bytes(SolverContext& ctx, const Dims& d, std::int64_t chunk, const void* g,
                        const void* w, std::size_t* dev, std::size_t* host) {
  const cusolverStatus_t st =
      syev_batched_api().size(ctx.solver, ctx.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, d.s,
                              CUDA_R_64F, g, d.s, CUDA_R_64F, w, CUDA_R_64F, dev, host, chunk);
  if (declined(st)) return false;
  check_cusolver(st, __FILE__, __LINE__, "cusolverDnXsyevBatched_bufferSize(...)");
  return true;
}
#endif

// Device and host bytes of Xsyevd for one matrix; false when declined.
bool syevd_bytes(cusolverDnHandle_t h, cusolverDnParams_t params, const Dims& d, const void* g, const void* w,
                 std::size_t* dev, std::size_t* host) {
  const cusolverStatus_t st = cusolverDnXsyevd_bufferSize(h, params, CUSOLVER_EIG_MODE_VECTOR,
                                                          CUBLAS_FILL_MODE_LOWER, d.s, CUDA_R_64F, g, d.s,
                                                          CUDA_R_64F, w, CUDA_R_64F, dev, host);
  if (declined(st)) return false;
  check_cusolver(st, __FILE__, __LINE__, "cusolverDnXsyevd_bufferSize(...)");
  return true;
}

// The gesvdj problem on X_b = A_b^T: tall -> X_b is s x L (ld s), wide -> L x s
// (ld L). Its SVD A^T = V Sigma U^T gives gesvdj's "U" = our V and its "V" =
// our U: the small-side factor (s x s) goes to W, the big-side one (L x s) to Y.
struct GesvdjShape {
  int rows, cols, lda, ldu, ldv;
};
GesvdjShape gesvdj_shape(const Dims& d) {
  const int rows = static_cast<int>(d.tall ? d.s : d.L);
  const int cols = static_cast<int>(d.tall ? d.L : d.s);
  return {rows, cols, rows, rows, cols};
}

std::size_t gesvdj_bytes(cusolverDnHandle_t h, gesvdjInfo_t params, const Dims& d, double* x, double* sv,
                         double* u, double* v) {
  const GesvdjShape g = gesvdj_shape(d);
  int lwork = 0;
  OPCM_CUSOLVER_CHECK(cusolverDnDgesvdj_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, /*econ=*/1, g.rows, g.cols, x,
                                                   g.lda, sv, u, g.ldu, v, g.ldv, &lwork, params));
  return static_cast<std::size_t>(lwork < 0 ? 0 : lwork) * sizeof(double);
}

void check_room(std::size_t needed, const Buffers& buf, const char* what) {
  OPCM_CHECK_ARG(needed <= buf.solver_bytes, kFn, "work_bytes", "is too small for ", what, " (", needed,
                 " bytes needed, ", buf.solver_bytes, " left); use svd_workspace_size()");
}

// Runs fn(slot, t, item) for every item, round-robin over slot_count(items)
// streams forked from `stream` by an event and joined back into it, also after
// an error: the caller's allocator may reuse the workspace as soon as its own
// stream has moved on.
template <typename Fn>
void on_slots(SolverContext& ctx, const std::vector<std::int64_t>& items, cudaStream_t stream, Fn&& fn) {
  const int n = slot_count(items.size());
  ctx.ensure_slots(n);
  OPCM_CUDA_CHECK(cudaEventRecord(ctx.fork, stream));
  for (int t = 0; t < n; ++t) OPCM_CUDA_CHECK(cudaStreamWaitEvent(ctx.slots[t].stream, ctx.fork, 0));
  std::exception_ptr error;
  try {
    for (std::size_t f = 0; f < items.size(); ++f) {
      const int t = static_cast<int>(f % static_cast<std::size_t>(n));
      fn(ctx.slots[t], t, items[f]);
    }
  } catch (...) {
    error = std::current_exception();
  }
  for (int t = 0; t < n; ++t) {
    if (cudaEventRecord(ctx.slots[t].done, ctx.slots[t].stream) == cudaSuccess) {
      (void)cudaStreamWaitEvent(stream, ctx.slots[t].done, 0);
    } else {
      (void)cudaGetLastError();
      (void)cudaStreamSynchronize(ctx.slots[t].stream);
    }
  }
  if (error) std::rethrow_exception(error);
}

// Xsyevd on G_b for every listed matrix; marks ran[b] where it was accepted.
void syevd_each(SolverContext& ctx, const Dims& d, const Buffers& buf, const std::vector<std::int64_t>& todo,
                std::vector<char>& ran, cudaStream_t stream) {
  const std::int64_t ss = d.s * d.s;
  std::size_t dev = 0, host = 0;
  if (!syevd_bytes(ctx.solver, ctx.params, d, buf.g + todo.front() * ss, buf.lam + todo.front() * d.s, &dev,
                   &host)) {
    return;  // declined: gesvdj
  }
  const std::size_t per_slot = align_up(dev);
  check_room(per_slot * static_cast<std::size_t>(slot_count(todo.size())), buf, "cusolverDnXsyevd");
  on_slots(ctx, todo, stream, [&](FallbackSlot& slot, int t, std::int64_t b) {
    if (slot.host_work.size() < host) slot.host_work.resize(host);
    const cusolverStatus_t st = cusolverDnXsyevd(
        slot.solver, slot.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, d.s, CUDA_R_64F,
        buf.g + b * ss, d.s, CUDA_R_64F, buf.lam + b * d.s, CUDA_R_64F, buf.solver + t * per_slot, dev,
        host ? slot.host_work.data() : nullptr, host, buf.info + b);
    if (declined(st)) return;
    check_cusolver(st, __FILE__, __LINE__, "cusolverDnXsyevd(...)");
    ran[static_cast<std::size_t>(b)] = 1;
  });
}

// Fallback: Y's columns (unit big-side vectors from gesvdj) times sigma, so
// that the normalisation after it treats both paths alike. One matrix.
__global__ void __launch_bounds__(kThreads)
    scale_columns_kernel(double* __restrict__ y, std::int64_t L, const double* __restrict__ sv) {
  const std::int64_t c = blockIdx.x;
  const double f = sv[c];
  double* col = y + c * L;
  for (std::int64_t i = threadIdx.x; i < L; i += blockDim.x) col[i] *= f;
}

}  // namespace

int cusolver_loaded_version() {
  int major = 0, minor = 0, patch = 0;
  if (cusolverGetProperty(MAJOR_VERSION, &major) != CUSOLVER_STATUS_SUCCESS ||
      cusolverGetProperty(MINOR_VERSION, &minor) != CUSOLVER_STATUS_SUCCESS ||
      cusolverGetProperty(PATCH_LEVEL, &patch) != CUSOLVER_STATUS_SUCCESS) {
    return -1;
  }
  return OPCM_VERSION_CODE(major, minor, patch);
}

bool syev_batched_compiled() { return OPCM_HAVE_XSYEVBATCHED != 0; }

bool syev_batched_usable() {
#if OPCM_HAVE_XSYEVBATCHED
  return syev_batched_api().run != nullptr;
#else
  return false;
#endif
}

void set_solver_path(int path) { g_path.store(path, std::memory_order_relaxed); }

std::size_t solver_workspace_bytes(SolverContext& ctx, const Dims& d) {
  // The queries get a small valid device buffer for A and W: some cuSOLVER
  // versions answer INVALID_VALUE to null pointers. They ignore the test hook,
  // so that toggling it cannot shrink the workspace below what a call needs.
  double* dummy = static_cast<double*>(ctx.dummy);
  const std::size_t slots = static_cast<std::size_t>(slot_count(static_cast<std::size_t>(d.batch)));
  std::size_t bytes = 0, dev = 0, host = 0;
#if OPCM_HAVE_XSYEVBATCHED
  if (syev_batched_usable() && syev_batched_bytes(ctx, d, syev_chunk(d), dummy, dummy, &dev, &host)) bytes = dev;
#endif
  if (syevd_bytes(ctx.solver, ctx.params, d, dummy, dummy, &dev, &host)) {
    bytes = std::max(bytes, slots * align_up(dev));
  }
  return std::max(bytes, slots * align_up(gesvdj_bytes(ctx.solver, ctx.gesvdj, d, dummy, dummy, dummy, dummy)));
}

std::vector<std::int64_t> eigendecompose(SolverContext& ctx, const Dims& d, const Buffers& buf,
                                         cudaStream_t stream) {
  const int path = g_path.load(std::memory_order_relaxed);
  std::vector<char> ran(static_cast<std::size_t>(d.batch), 0);
#if OPCM_HAVE_XSYEVBATCHED
  if (path == kAuto && syev_batched_usable()) {
    const std::int64_t chunk = syev_chunk(d), ss = d.s * d.s;
    for (std::int64_t c0 = 0; c0 < d.batch; c0 += chunk) {
      const std::int64_t cb = std::min(chunk, d.batch - c0);
      double* g = buf.g + c0 * ss;
      double* lam = buf.lam + c0 * d.s;
      std::size_t dev = 0, host = 0;
      if (!syev_batched_bytes(ctx, d, cb, g, lam, &dev, &host)) continue;
      check_room(dev, buf, "cusolverDnXsyevBatched");
      if (ctx.host_work.size() < host) ctx.host_work.resize(host);
      const cusolverStatus_t st = syev_batched_api().run(
          ctx.solver, ctx.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, d.s, CUDA_R_64F, g, d.s,
          CUDA_R_64F, lam, CUDA_R_64F, buf.solver, dev, host ? ctx.host_work.data() : nullptr, host,
          buf.info + c0, cb);
      if (declined(st)) continue;
      check_cusolver(st, __FILE__, __LINE__, "cusolverDnXsyevBatched(...)");
      std::fill(ran.begin() + c0, ran.begin() + c0 + cb, 1);
    }
  }
#endif
  std::vector<std::int64_t> todo;
  for (std::int64_t b = 0; b < d.batch; ++b) {
    if (!ran[static_cast<std::size_t>(b)]) todo.push_back(b);
  }
  if (path != kGesvdjOnly && !todo.empty()) syevd_each(ctx, d, buf, todo, ran, stream);

  // info, read once.
  std::vector<int> info(static_cast<std::size_t>(d.batch), 0);
  if (std::find(ran.begin(), ran.end(), 1) != ran.end()) {
    OPCM_CUDA_CHECK(cudaMemcpyAsync(info.data(), buf.info, sizeof(int) * d.batch, cudaMemcpyDeviceToHost, stream));
    OPCM_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  std::vector<std::int64_t> failed;
  for (std::int64_t b = 0; b < d.batch; ++b) {
    const std::size_t i = static_cast<std::size_t>(b);
    if (!ran[i] || info[i] != 0) failed.push_back(b);
  }
  return failed;
}

void gesvdj_fallback(SolverContext& ctx, const Dims& d, const Buffers& buf,
                     const std::vector<std::int64_t>& failed, cudaStream_t stream) {
  const GesvdjShape g = gesvdj_shape(d);
  const std::int64_t ls = d.L * d.s, ss = d.s * d.s;
  auto x_of = [&](std::int64_t b) { return buf.x + b * ls; };
  auto w_of = [&](std::int64_t b) { return buf.g + b * ss; };
  auto y_of = [&](std::int64_t b) { return buf.y + b * ls; };
  auto sv_of = [&](std::int64_t b) { return buf.lam + b * d.s; };
  auto u_of = [&](std::int64_t b) { return d.tall ? w_of(b) : y_of(b); };  // gesvdj's U
  auto v_of = [&](std::int64_t b) { return d.tall ? y_of(b) : w_of(b); };  // gesvdj's V

  const std::int64_t b0 = failed.front();
  const std::size_t per_slot =
      align_up(gesvdj_bytes(ctx.solver, ctx.gesvdj, d, x_of(b0), sv_of(b0), u_of(b0), v_of(b0)));
  check_room(per_slot * static_cast<std::size_t>(slot_count(failed.size())), buf, "the gesvdj fallback");
  const int lwork = static_cast<int>(per_slot / sizeof(double));
  on_slots(ctx, failed, stream, [&](FallbackSlot& slot, int t, std::int64_t b) {
    double* work = reinterpret_cast<double*>(buf.solver + t * per_slot);
    // Overwrites X_b (not needed after Y = P W), W_b, Y_b, lam_b and info[b].
    OPCM_CUSOLVER_CHECK(cusolverDnDgesvdj(slot.solver, CUSOLVER_EIG_MODE_VECTOR, /*econ=*/1, g.rows, g.cols,
                                          x_of(b), g.lda, sv_of(b), u_of(b), g.ldu, v_of(b), g.ldv, work, lwork,
                                          buf.info + b, slot.gesvdj));
    scale_columns_kernel<<<static_cast<unsigned>(d.s), kThreads, 0, slot.stream>>>(y_of(b), d.L, sv_of(b));
    OPCM_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace opcm::cuda
