// Argument checks at the entry of every kernel: a failed check throws
// std::invalid_argument (a Python ValueError through pybind11) whose message names
// the function and the argument, e.g.
//   "opcm_ext._C.deltas: argument 'n' must be >= 0 (got -3)".
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace opcm {

template <typename... Parts>
[[noreturn]] inline void throw_argument_error(const char* fn, const char* arg, const Parts&... parts) {
  std::ostringstream os;
  os << fn << ": argument '" << arg << "' ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

template <typename... Parts>
[[noreturn]] inline void throw_runtime_error(const char* fn, const Parts&... parts) {
  std::ostringstream os;
  os << fn << ": ";
  (os << ... << parts);
  throw std::runtime_error(os.str());
}

// Raw addresses cross the binding as Python ints.
using addr_t = std::uintptr_t;

template <typename T>
inline T* as_ptr(addr_t a) { return reinterpret_cast<T*>(a); }

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
