// Cached cuBLAS/cuSOLVER state for the batched SVD.
//
// A SolverContext holds one cuBLAS handle, one cuSOLVER handle with its
// params object, a small device buffer whose address the workspace queries
// receive (some cuSOLVER versions reject null A/W there), and (created on
// first need) a few extra streams, each with its own cuSOLVER handle, params
// and gesvdj info, for the per-matrix paths (Xsyevd, gesvdj).
// Contexts live in a per-device pool: a call leases one for its duration, so
// concurrent calls from several threads never share a handle (a handle's
// stream and workspace are per-handle state), and handles are created once
// per device and thread-concurrency level, not per call. Contexts are never
// destroyed: destroying handles during interpreter shutdown races the CUDA
// runtime's own teardown (PyTorch leaks its handles for the same reason).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cusolverDn.h>

#include <vector>

namespace opcm::cuda {

struct FallbackSlot {
  cudaStream_t stream = nullptr;        // non-blocking, forked from the caller's stream by event
  cusolverDnHandle_t solver = nullptr;  // bound to `stream`
  cusolverDnParams_t params = nullptr;  // for Xsyevd on this slot
  gesvdjInfo_t gesvdj = nullptr;        // per slot: gesvdj records its residual/sweeps here
  cudaEvent_t done = nullptr;           // joins the slot back into the caller's stream
  std::vector<char> host_work;          // Xsyevd's host workspace
};

constexpr std::size_t kDummyBytes = 256;

struct SolverContext {
  int device = -1;
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  cusolverDnParams_t params = nullptr;
  gesvdjInfo_t gesvdj = nullptr;  // for workspace queries on `solver`
  void* dummy = nullptr;          // kDummyBytes of device memory: the queries' A, W, U, V
  cudaEvent_t fork = nullptr;
  std::vector<FallbackSlot> slots;
  std::vector<char> host_work;  // cuSOLVER host workspace (syevBatched)

  // Creates fallback slots until there are at least `n` (current device must
  // be `device`).
  void ensure_slots(int n);
};

// RAII lease of a pooled context for the current device.
class SolverContextLease {
 public:
  SolverContextLease();
  ~SolverContextLease();
  SolverContextLease(const SolverContextLease&) = delete;
  SolverContextLease& operator=(const SolverContextLease&) = delete;
  SolverContext& operator*() const { return *ctx_; }
  SolverContext* operator->() const { return ctx_; }

 private:
  SolverContext* ctx_ = nullptr;
};

}  // namespace opcm::cuda
