// Argument checks and scalar helpers shared by the CPU (_C) and CUDA (_cuda) kernels.
//
// One message format for every bad argument, a std::invalid_argument (a Python
// ValueError through pybind11) naming the function and the argument:
//   "opcm_ext._C.deltas: argument 'n' must be >= 0 (got -3)"
// Library failures (CUDA, cuBLAS, cuSOLVER) are std::runtime_error, see cuda_check.cuh.
#pragma once

#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace opcm {

// Raw addresses cross the binding as Python ints (tensor.data_ptr()).
using addr_t = std::uintptr_t;

template <typename T>
inline T* as_ptr(addr_t a) { return reinterpret_cast<T*>(a); }

inline bool aligned_to(addr_t p, addr_t bytes) { return p % bytes == 0; }

template <typename... Parts>
[[noreturn]] inline void throw_argument_error(const char* fn, const char* arg, const Parts&... parts) {
  std::ostringstream os;
  os << fn << ": argument '" << arg << "' ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

// A scale factor as the float32 the kernels compute with: finite, and non-zero
// when it divides.
inline float checked_scale(double v, const char* fn, const char* arg, bool nonzero) {
  const float f = static_cast<float>(v);
  if (!std::isfinite(f) || (nonzero && f == 0.0f)) {
    throw_argument_error(fn, arg, nonzero ? "must be finite and non-zero in float32 (got "
                                          : "must be finite in float32 (got ",
                         v, ")");
  }
  return f;
}

}  // namespace opcm

// OPCM_CHECK_ARG(cond, fn, "arg", "message parts", value, ...)
#define OPCM_CHECK_ARG(cond, fn, arg, ...)                              \
  do {                                                                  \
    if (!(cond)) ::opcm::throw_argument_error((fn), (arg), __VA_ARGS__); \
  } while (0)

// A pointer argument must be non-null whenever there is something to read/write.
#define OPCM_CHECK_PTR(ptr, n, fn, arg) \
  OPCM_CHECK_ARG((ptr) != 0 || (n) == 0, fn, arg, "is a null address but n = ", (n), " elements are needed")

#define OPCM_CHECK_SIZE(n, fn, arg) OPCM_CHECK_ARG((n) >= 0, fn, arg, "must be >= 0 (got ", (n), ")")

// An address aligned to `bytes` (the element size, or 8 for float64 sums).
#define OPCM_CHECK_ALIGNED(ptr, bytes, fn, arg) \
  OPCM_CHECK_ARG(::opcm::aligned_to((ptr), (bytes)), fn, arg, "is not aligned to ", (bytes), " bytes")
