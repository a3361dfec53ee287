// Error checks for the CUDA backend: every CUDA runtime, cuBLAS and cuSOLVER
// call and every kernel launch goes through one of these macros. A failure
// throws std::runtime_error("<file>:<line>: <library> error <NAME>: <text> in
// `<expression>`"), which the pybind11 binding turns into a Python
// RuntimeError. Bad arguments use OPCM_CHECK_ARG (common/check.h).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cusolverDn.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace opcm::cuda {

inline const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_MAPPING_ERROR: return "CUSOLVER_STATUS_MAPPING_ERROR";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    case CUSOLVER_STATUS_ZERO_PIVOT: return "CUSOLVER_STATUS_ZERO_PIVOT";
    case CUSOLVER_STATUS_INVALID_LICENSE: return "CUSOLVER_STATUS_INVALID_LICENSE";
    default: return "CUSOLVER_STATUS_<other>";
  }
}

// cuSOLVER has no status-to-text function; these are the meanings its
// documentation gives for the codes a dense routine can return.
inline const char* cusolver_status_text(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "success";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "resource allocation failed inside cuSOLVER";
    case CUSOLVER_STATUS_INVALID_VALUE: return "an unsupported value or parameter was passed";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "the device does not support this feature";
    case CUSOLVER_STATUS_MAPPING_ERROR: return "access to GPU memory space failed";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "an internal cuSOLVER operation failed";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "the matrix type is not supported";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "the operation is not supported";
    case CUSOLVER_STATUS_INVALID_WORKSPACE: return "the workspace is invalid";
    default: return "unknown cuSOLVER status";
  }
}

[[noreturn]] inline void throw_library_error(const char* file, int line, const char* library,
                                             const std::string& name, const std::string& text,
                                             const char* expr) {
  // Report paths from the repository root (csrc/...), not the build machine's.
  const std::string path(file);
  const std::string::size_type at = path.rfind("csrc/");
  std::ostringstream os;
  os << (at == std::string::npos ? path : path.substr(at)) << ":" << line << ": " << library << " error " << name << ": " << text << " in `"
     << expr << "`";
  throw std::runtime_error(os.str());
}

inline void check_cuda(cudaError_t err, const char* file, int line, const char* expr) {
  if (err != cudaSuccess) {
    // Clear the (non-sticky) per-thread error state so that a later,
    // unrelated launch check does not report this error a second time.
    (void)cudaGetLastError();
    throw_library_error(file, line, "CUDA", cudaGetErrorName(err), cudaGetErrorString(err), expr);
  }
}

inline void check_cublas(cublasStatus_t st, const char* file, int line, const char* expr) {
  if (st != CUBLAS_STATUS_SUCCESS) {
    throw_library_error(file, line, "cuBLAS", cublasGetStatusName(st), cublasGetStatusString(st),
                        expr);
  }
}

inline void check_cusolver(cusolverStatus_t st, const char* file, int line, const char* expr) {
  if (st != CUSOLVER_STATUS_SUCCESS) {
    throw_library_error(file, line, "cuSOLVER", cusolver_status_name(st), cusolver_status_text(st),
                        expr);
  }
}

}  // namespace opcm::cuda

#define OPCM_CUDA_CHECK(expr) ::opcm::cuda::check_cuda((expr), __FILE__, __LINE__, #expr)
#define OPCM_CUBLAS_CHECK(expr) ::opcm::cuda::check_cublas((expr), __FILE__, __LINE__, #expr)
#define OPCM_CUSOLVER_CHECK(expr) ::opcm::cuda::check_cusolver((expr), __FILE__, __LINE__, #expr)

// After every <<<...>>> launch: configuration errors surface here, errors
// inside the kernel surface at the next synchronising call.
#define OPCM_CUDA_CHECK_LAUNCH() \
  ::opcm::cuda::check_cuda(cudaGetLastError(), __FILE__, __LINE__, "kernel launch")
