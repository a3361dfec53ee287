#include "svd/solver_context.cuh"

#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common/cuda_check.cuh"

namespace opcm::cuda {
namespace {

struct Pool {
  std::mutex mu;
  std::unordered_map<int, std::vector<SolverContext*>> idle;  // by device
};

Pool& pool() {
  static Pool* p = new Pool();  // intentionally leaked, see solver_context.cuh
  return *p;
}

std::unique_ptr<SolverContext> create_context(int device) {
  auto ctx = std::make_unique<SolverContext>();
  ctx->device = device;
  OPCM_CUBLAS_CHECK(cublasCreate(&ctx->blas));
  OPCM_CUSOLVER_CHECK(cusolverDnCreate(&ctx->solver));
  OPCM_CUSOLVER_CHECK(cusolverDnCreateParams(&ctx->params));
  OPCM_CUSOLVER_CHECK(cusolverDnCreateGesvdjInfo(&ctx->gesvdj));
  OPCM_CUDA_CHECK(cudaMalloc(&ctx->dummy, kDummyBytes));
  OPCM_CUDA_CHECK(cudaEventCreateWithFlags(&ctx->fork, cudaEventDisableTiming));
  return ctx;
}

}  // namespace

void SolverContext::ensure_slots(int n) {
  while (static_cast<int>(slots.size()) < n) {
    FallbackSlot s;
    OPCM_CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
    OPCM_CUSOLVER_CHECK(cusolverDnCreate(&s.solver));
    OPCM_CUSOLVER_CHECK(cusolverDnSetStream(s.solver, s.stream));
    OPCM_CUSOLVER_CHECK(cusolverDnCreateParams(&s.params));
    OPCM_CUSOLVER_CHECK(cusolverDnCreateGesvdjInfo(&s.gesvdj));
    OPCM_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
    slots.push_back(s);
  }
}

SolverContextLease::SolverContextLease() {
  int device = 0;
  OPCM_CUDA_CHECK(cudaGetDevice(&device));
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    std::vector<SolverContext*>& idle = p.idle[device];
    if (!idle.empty()) {
      ctx_ = idle.back();
      idle.pop_back();
      return;
    }
  }
  // Created outside the lock: handle creation can take milliseconds.
  ctx_ = create_context(device).release();
}

SolverContextLease::~SolverContextLease() {
  if (ctx_ == nullptr) return;
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  p.idle[ctx_->device].push_back(ctx_);
}

}  // namespace opcm::cuda
