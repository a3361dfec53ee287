// opcm_ext._cuda: Python bindings of the CUDA kernels (binding only; the kernels
// and their contracts live in csrc/update/, csrc/project/ and csrc/svd/).
// Tensors cross as raw device addresses and dtype codes; the CUDA stream is the
// last argument (an int, e.g. torch.cuda.current_stream().cuda_stream). Bad
// arguments raise ValueError; CUDA, cuBLAS and cuSOLVER failures RuntimeError
// naming file:line and the library's error string. No libtorch, no CUDA header.
#include <pybind11/pybind11.h>

#include "bind_kernels.h"
#include "project/project.h"
#include "svd/thin_svd.h"
#include "update/update.h"

namespace py = pybind11;
namespace oc = opcm::cuda;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "opcm-ext CUDA kernels (raw device pointers; stream last; GIL released)";
  using release_gil = py::call_guard<py::gil_scoped_release>;
  opcm::bind_kernels(m, &oc::deltas, &oc::sigma_update, &oc::finalize, &oc::sumsq, &oc::mask_projection,
                     py::arg("stream"));

  m.def("svd_workspace_size", &oc::svd_workspace_size, py::arg("batch"), py::arg("m"), py::arg("n"),
        release_gil(), "Device bytes batched_thin_svd needs on the current device (csrc/svd/thin_svd.h).");
  m.def("batched_thin_svd", &oc::batched_thin_svd, py::arg("a_ptr"), py::arg("batch"), py::arg("m"),
        py::arg("n"), py::arg("u_ptr"), py::arg("s_ptr"), py::arg("v_ptr"), py::arg("work_ptr"),
        py::arg("work_bytes"), py::arg("info_ptr"), py::arg("stream"), release_gil(),
        "Thin SVD of A [batch, m, n] fp32 into U, S, V and info (csrc/svd/thin_svd.h).");
  m.def("init_handles", &oc::init_handles, release_gil(),
        "Create the current device's cuBLAS/cuSOLVER handles (csrc/svd/thin_svd.h).");
  m.def("build_info", []() {
    const oc::BuildInfo bi = oc::build_info();
    py::dict d;
    d["cuda_runtime_version"] = bi.cuda_runtime_version;
    d["cusolver_version"] = bi.cusolver_version;
    d["cublas_version"] = bi.cublas_version;
    d["syev_batched"] = bi.syev_batched;
    return d;
  }, "Versions compiled against; whether syevBatched is compiled in (csrc/svd/thin_svd.h).");
  m.def("runtime_info", []() {
    const oc::RuntimeInfo ri = oc::runtime_info();
    py::dict d;
    d["cuda_runtime_version"] = ri.cuda_runtime_version;
    d["cuda_driver_version"] = ri.cuda_driver_version;
    d["cusolver_version"] = ri.cusolver_version;
    d["cublas_version"] = ri.cublas_version;
    d["device_count"] = ri.device_count;
    d["syev_batched"] = ri.syev_batched;
    return d;
  }, "Versions loaded in this process, device count, syevBatched usable (csrc/svd/thin_svd.h).");
  m.def("_set_svd_path", &oc::set_svd_path, py::arg("path"),
        "Test hook: 0 automatic, 1 Xsyevd per matrix, 2 gesvdj only (csrc/svd/thin_svd.h).");
}
