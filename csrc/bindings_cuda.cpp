// opcm_ext._cuda: Python bindings of the CUDA kernels. Binding only: the
// kernels, their argument checks and their error handling live in
// csrc/{update,project,svd}/*.cu behind csrc/cuda_common/ops.h.
//
// Tensors cross as raw device addresses (Python ints, e.g. tensor.data_ptr())
// plus sizes and dtype codes (0 float32, 1 float16, 2 bfloat16); the CUDA
// stream is the last argument (an int, e.g.
// torch.cuda.current_stream().cuda_stream; 0 = legacy default stream). Every
// call releases the GIL. Bad arguments raise ValueError; CUDA, cuBLAS and
// cuSOLVER failures raise RuntimeError naming file:line and the library's
// error string. This module does not link libtorch.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda_common/ops.h"

namespace py = pybind11;
namespace oc = opcm::cuda;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "opcm-ext CUDA kernels (raw device pointers; stream last; GIL released)";
  using release_gil = py::call_guard<py::gil_scoped_release>;

  m.attr("FLOAT32") = static_cast<int>(oc::kFloat32);
  m.attr("FLOAT16") = static_cast<int>(oc::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(oc::kBFloat16);

  m.def("deltas", &oc::deltas, py::arg("base_ptr"), py::arg("base_dtype"), py::arg("merged_ptr"),
        py::arg("merged_dtype"), py::arg("new_ptr"), py::arg("new_dtype"), py::arg("out_m_ptr"),
        py::arg("out_t_ptr"), py::arg("n"), py::arg("sums_ptr"), py::arg("stream"), release_gil(),
        "M = f32(merged) - f32(base), T = f32(new) - f32(base); sums[0] += sum(M^2), "
        "sums[1] += sum(T^2) (float64). merged_ptr == 0: only T, sums[0] untouched.");

  m.def("sigma_update", &oc::sigma_update, py::arg("m_ptr"), py::arg("tp_ptr"),
        py::arg("lam_prev"), py::arg("out_ptr"), py::arg("n"), py::arg("sums_ptr"),
        py::arg("stream"), release_gil(),
        "out = lam_prev * M + T' (fp32; out may alias M); sums[0] += sum(out^2).");

  m.def("finalize", &oc::finalize, py::arg("base_ptr"), py::arg("base_dtype"),
        py::arg("sigma_ptr"), py::arg("lam"), py::arg("out_ptr"), py::arg("out_dtype"),
        py::arg("n"), py::arg("stream"), release_gil(),
        "out = cast(f32(base) + sigma / lam), round to nearest even.");

  m.def("mask_projection", &oc::mask_projection, py::arg("p_ptr"), py::arg("r_ptr"),
        py::arg("keep_ptr"), py::arg("batch"), py::arg("k"), py::arg("q_ptr"), py::arg("stream"),
        release_gil(),
        "Q[i,j] = P[i,j] if i<r and j<r; Q[i,i] = P[i,i] if r<=i<keep; else 0 "
        "(P, Q [batch,k,k] fp32; r, keep int64[batch] on the device).");

  m.def("sumsq", &oc::sumsq, py::arg("x_ptr"), py::arg("dtype"), py::arg("n"),
        py::arg("sums_ptr"), py::arg("stream"), release_gil(), "sums[0] += sum(f32(x)^2).");

  m.def("svd_workspace_size", &oc::svd_workspace_size, py::arg("batch"), py::arg("m"),
        py::arg("n"), release_gil(),
        "Bytes of device workspace batched_thin_svd needs for [batch, m, n] on the current "
        "device.");

  m.def("batched_thin_svd", &oc::batched_thin_svd, py::arg("a_ptr"), py::arg("batch"),
        py::arg("m"), py::arg("n"), py::arg("u_ptr"), py::arg("s_ptr"), py::arg("v_ptr"),
        py::arg("work_ptr"), py::arg("work_bytes"), py::arg("info_ptr"), py::arg("stream"),
        release_gil(),
        "Thin SVD of A [batch,m,n] fp32: U [batch,m,k], S [batch,k] descending, V [batch,n,k] "
        "(k = min(m,n), fp32 row-major); info int32[batch], 0 = success. Synchronises the "
        "stream once to read the eigensolver's info.");

  m.def("build_info", []() {
    const oc::BuildInfo bi = oc::build_info();
    py::dict d;
    d["cuda_runtime_version"] = bi.cuda_runtime_version;
    d["cusolver_version"] = bi.cusolver_version;
    d["cublas_version"] = bi.cublas_version;
    d["syev_batched"] = bi.syev_batched;
    return d;
  }, "Versions compiled against and whether cusolverDnXsyevBatched is used.");

  m.def("_force_svd_fallback", &oc::set_svd_force_fallback, py::arg("enabled"),
        "Test hook: route every batched_thin_svd matrix through the gesvdj fallback.");
}
