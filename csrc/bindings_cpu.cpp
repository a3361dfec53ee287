// opcm_ext._C: Python bindings of the CPU kernels. Binding only: the kernels and
// their argument checks live in csrc/update/ and csrc/project/.
//
// Tensors cross as raw addresses (Python ints, e.g. tensor.data_ptr()) plus sizes
// and dtype codes (0 float32, 1 float16, 2 bfloat16). The CUDA module _cuda has
// the same functions with a trailing `stream` argument. Every call releases the
// GIL. Bad arguments raise ValueError. This module does not link libtorch.
#include <pybind11/pybind11.h>

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/parallel.h"
#include "project/project.h"
#include "update/update.h"

namespace py = pybind11;
namespace oc = opcm::cpu;

PYBIND11_MODULE(_C, m) {
  m.doc() = "opcm-ext CPU kernels (raw addresses, dtype codes; OpenMP; GIL released)";
  using release_gil = py::call_guard<py::gil_scoped_release>;

  m.attr("FLOAT32") = 0;
  m.attr("FLOAT16") = 1;
  m.attr("BFLOAT16") = 2;

  m.def("deltas", &oc::deltas, py::arg("base_ptr"), py::arg("base_dtype"), py::arg("merged_ptr"),
        py::arg("merged_dtype"), py::arg("new_ptr"), py::arg("new_dtype"), py::arg("out_m_ptr"),
        py::arg("out_t_ptr"), py::arg("n"), py::arg("sums_ptr"), release_gil(),
        "M = f32(merged) - f32(base), T = f32(new) - f32(base) (fp32 outputs); sums[0] += sum(M^2), "
        "sums[1] += sum(T^2) (float64). merged_ptr == 0: only T, sums[0] untouched.");

  m.def("sigma_update", &oc::sigma_update, py::arg("m_ptr"), py::arg("tp_ptr"), py::arg("lam_prev"),
        py::arg("out_ptr"), py::arg("n"), py::arg("sums_ptr"), release_gil(),
        "out = lam_prev * M + T' (fp32; out may alias M); sums[0] += sum(out^2).");

  m.def("finalize", &oc::finalize, py::arg("base_ptr"), py::arg("base_dtype"), py::arg("sigma_ptr"),
        py::arg("lam"), py::arg("out_ptr"), py::arg("out_dtype"), py::arg("n"), release_gil(),
        "out = cast(f32(base) + sigma / lam), round to nearest even.");

  m.def("mask_projection", &oc::mask_projection, py::arg("p_ptr"), py::arg("r_ptr"), py::arg("keep_ptr"),
        py::arg("batch"), py::arg("k"), py::arg("q_ptr"), release_gil(),
        "Q[i,j] = P[i,j] if i<r and j<r; Q[i,i] = P[i,i] if r<=i<keep; else 0 "
        "(P, Q [batch,k,k] fp32; r, keep int64[batch]).");

  m.def("sumsq", &oc::sumsq, py::arg("x_ptr"), py::arg("dtype"), py::arg("n"), py::arg("sums_ptr"),
        release_gil(), "sums[0] += sum(f32(x)^2).");

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
