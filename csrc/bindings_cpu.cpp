// opcm_ext._C: Python bindings of the CPU kernels (binding only; the kernels and
// their contracts live in csrc/update/ and csrc/project/). Tensors cross as raw
// addresses and dtype codes; this module does not link libtorch.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bind_kernels.h"
#include "common/parallel.h"
#include "project/project.h"
#include "update/update.h"

namespace py = pybind11;
namespace oc = opcm::cpu;

PYBIND11_MODULE(_C, m) {
  m.doc() = "opcm-ext CPU kernels (raw addresses, dtype codes; OpenMP; GIL released)";
  opcm::bind_kernels(m, &oc::deltas, &oc::sigma_update, &oc::finalize, &oc::sumsq, &oc::mask_projection);
  m.def("build_info", []() {
    py::dict d;
#if defined(__clang__)
    d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = "gcc " __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
#ifdef _OPENMP
    d["openmp"] = static_cast<int>(_OPENMP);
    d["max_threads"] = omp_get_max_threads();
#else
    d["openmp"] = 0;
    d["max_threads"] = 1;
#endif
    d["block_elements"] = opcm::kBlock;
    return d;
  }, "Compiler, OpenMP version, this thread's OpenMP max threads and the reduction block size.");
}
