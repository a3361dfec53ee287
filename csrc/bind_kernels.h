// The kernels _C and _cuda share, bound once: the same names, argument names and
// docstrings in both modules; `tail` adds the CUDA launchers' trailing
// py::arg("stream"). Every call releases the GIL. Contracts: update/update.h,
// project/project.h.
#pragma once

#include <pybind11/pybind11.h>

namespace opcm {

template <typename Deltas, typename SigmaUpdate, typename Finalize, typename Sumsq, typename Mask,
          typename... Tail>
void bind_kernels(pybind11::module_& m, Deltas deltas, SigmaUpdate sigma_update, Finalize finalize, Sumsq sumsq,
                  Mask mask_projection, Tail... tail) {
  namespace py = pybind11;
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.attr("FLOAT32") = 0;
  m.attr("FLOAT16") = 1;
  m.attr("BFLOAT16") = 2;
  m.def("deltas", deltas, py::arg("base_ptr"), py::arg("base_dtype"), py::arg("merged_ptr"),
        py::arg("merged_dtype"), py::arg("new_ptr"), py::arg("new_dtype"), py::arg("out_m_ptr"),
        py::arg("out_t_ptr"), py::arg("n"), py::arg("sums_ptr"), tail..., release_gil(),
        "M, T = merged - base, new - base in fp32; sums += their sums of squares (csrc/update/update.h).");
  m.def("sigma_update", sigma_update, py::arg("m_ptr"), py::arg("tp_ptr"), py::arg("lam_prev"),
        py::arg("out_ptr"), py::arg("n"), py::arg("sums_ptr"), tail..., release_gil(),
        "out = lam_prev * M + T' in fp32; sums[0] += sum(out^2) (csrc/update/update.h).");
  m.def("finalize", finalize, py::arg("base_ptr"), py::arg("base_dtype"), py::arg("sigma_ptr"), py::arg("lam"),
        py::arg("out_ptr"), py::arg("out_dtype"), py::arg("n"), tail..., release_gil(),
        "out = cast(base + sigma / lam), round to nearest even (csrc/update/update.h).");
  m.def("sumsq", sumsq, py::arg("x_ptr"), py::arg("dtype"), py::arg("n"), py::arg("sums_ptr"), tail...,
        release_gil(), "sums[0] += sum(x^2) in float64 (csrc/update/update.h).");
  m.def("mask_projection", mask_projection, py::arg("p_ptr"), py::arg("r_ptr"), py::arg("keep_ptr"),
        py::arg("batch"), py::arg("k"), py::arg("q_ptr"), tail..., release_gil(),
        "Q = P masked to its leading r x r block and its diagonal r <= i < keep (csrc/project/project.h).");
}

}  // namespace opcm
