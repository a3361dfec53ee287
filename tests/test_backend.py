"""Which backend runs where: ops.select's self-test and fallback, and the CUDA libraries that _native loads.

No GPU is needed: the loader and the self-test are replaced by fakes where a test needs them to
fail, and the CUDA library choice is checked on fake wheel folders.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opcm_ext import _native, doctor, ops
from opcm_ext.errors import BackendError, ConfigError


@pytest.fixture
def fresh(monkeypatch):
    """Forget the cached self-test verdicts and warnings for the test's duration."""
    monkeypatch.setattr(ops, "_verdicts", {})
    monkeypatch.setattr(ops, "_warned", set())


def _fail_compare(monkeypatch, message: str = "deltas (T) differs from its torch twin on cpu") -> None:
    def boom(dev):
        raise RuntimeError(message)

    monkeypatch.setattr(ops, "_compare_with_twins", boom)


# ----------------------------------------------------------------------------- ops.select
def test_cpu_uses_the_native_kernels_after_the_self_test(fresh):
    chosen = ops.select("cpu")
    assert chosen == ops.Ops(torch.device("cpu"), True, None)
    assert ops._verdicts == {"cpu": None}  # cached: the self-test ran once


def test_auto_device_is_the_gpu_when_torch_sees_one(fresh):
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert ops.select().device.type == want


def test_torch_backend_is_the_twins_without_a_reason(fresh, monkeypatch):
    _fail_compare(monkeypatch)
    assert ops.select("cpu", "torch") == ops.Ops(torch.device("cpu"), False, None)
    assert ops._verdicts == {}  # no self-test needed


def test_self_test_failure_falls_back_to_the_twins_with_one_reason(fresh, monkeypatch):
    _fail_compare(monkeypatch)
    chosen = ops.select("cpu")
    assert not chosen.native
    assert "deltas (T) differs from its torch twin" in chosen.reason and "torch ops" in chosen.reason
    x = torch.randn(100)
    assert torch.equal(chosen.sumsq(x), ops.sumsq(x, backend="torch"))
    # the module functions' automatic choice warns once, then runs the twins quietly
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _, T, _, _ = ops.deltas(x, None, x + 1)
    assert [str(w.message) for w in caught] == [f"opcm: {chosen.reason}"]
    assert torch.equal(T, (x + 1) - x)


def test_native_backend_with_a_failing_self_test_names_the_cause(fresh, monkeypatch):
    _fail_compare(monkeypatch, "finalize differs from its torch twin on cpu (relative error 0.5 > 0.0078)")
    with pytest.raises(BackendError, match=r"backend='native' cannot run on cpu: .*finalize differs"):
        ops.select("cpu", "native")


def test_missing_cpu_module_falls_back_or_raises(fresh, monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_C_error", "ImportError: libgomp.so.1: cannot open shared object file")
    chosen = ops.select("cpu")
    assert not chosen.native and "opcm_ext._C" in chosen.reason and "libgomp" in chosen.reason
    with pytest.raises(BackendError, match="opcm_ext._C.*libgomp.*pip install"):
        ops.select("cpu", "native")


def test_bad_backend_and_device_are_config_errors(fresh):
    with pytest.raises(ConfigError, match="backend"):
        ops.select("cpu", "numpy")
    with pytest.raises(ConfigError, match="device"):
        ops.select("tpu:x")
    with pytest.raises(ConfigError, match="backend"):
        ops.sumsq(torch.zeros(3), backend="numpy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_config_error_with_the_fix(fresh):
    for backend in ("auto", "native", "torch"):
        with pytest.raises(ConfigError, match="fix: use device 'cpu' or 'auto'"):
            ops.select("cuda", backend)


def test_ops_methods_match_the_module_functions(fresh):
    chosen = ops.select("cpu")
    g = torch.Generator().manual_seed(5)
    base, merged, new = (torch.randn(3, 20, 12, generator=g) for _ in range(3))
    M, T, sm, st = chosen.deltas(base, merged, new)
    U, S, V = chosen.thin_svd(M)
    Tp = chosen.project(T, U, S, V, 0.5)
    assert torch.equal(Tp, ops.project(T, *ops.thin_svd(M, backend="native"), 0.5, backend="native"))
    sig, ss = chosen.sigma_update(M, Tp, 1.5)
    assert torch.equal(chosen.finalize(base, sig, 2.0, torch.bfloat16),
                       ops.finalize(base, sig, 2.0, torch.bfloat16, backend="native"))
    assert float(chosen.sumsq(sig)) == float(ss)
    assert chosen.split_rank(S, 1.0).tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------- the CUDA self-test, faked
class _FakeCuda:
    def __init__(self, driver: int = 13000, runtime: int = 13000, handles_error: str | None = None) -> None:
        self.info = dict(cuda_driver_version=driver, cuda_runtime_version=runtime)
        self.handles_error = handles_error

    def runtime_info(self) -> dict:
        return self.info

    def init_handles(self) -> None:
        if self.handles_error:
            raise RuntimeError(self.handles_error)


def test_cuda_self_test_refuses_an_old_driver(monkeypatch):
    monkeypatch.setattr(_native, "cuda", lambda: _FakeCuda(driver=12080, runtime=13000))
    why = ops._self_test(torch.device("cuda", 0))
    assert "driver supports CUDA 12.8" in why and "CUDA 13.0 runtime" in why and "update the driver" in why


def test_cuda_self_test_reports_a_handle_failure(monkeypatch):
    monkeypatch.setattr(_native, "cuda", lambda: _FakeCuda(handles_error="cuSOLVER error CUSOLVER_STATUS_NOT_INITIALIZED"))
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    why = ops._self_test(torch.device("cuda", 0))
    assert "cuBLAS/cuSOLVER handles" in why and "CUSOLVER_STATUS_NOT_INITIALIZED" in why


def test_cuda_self_test_reports_a_missing_module(monkeypatch):
    def missing():
        raise BackendError("the CUDA kernels (opcm_ext._cuda) are not available (not built); fix: reinstall.")

    monkeypatch.setattr(_native, "cuda", missing)
    assert "opcm_ext._cuda" in ops._self_test(torch.device("cuda", 0))


# ----------------------------------------------------------------------------- CUDA libraries
@pytest.mark.parametrize("version, family", [("12.4", 12), ("12.8", 12), ("13.0", 13), ("13", 13), (None, None)])
def test_library_family_follows_torch_version_cuda(version, family):
    assert _native.cuda_family(version) == family


def _fake_libs(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


CU13 = ["libcudart.so.13", "libnvJitLink.so.13", "libcusparse.so.12", "libcublasLt.so.13", "libcublas.so.13",
        "libcusolver.so.12"]


def test_preload_loads_the_family_in_dependency_order(tmp_path):
    lib = _fake_libs(tmp_path / "nvidia" / "cu13" / "lib", CU13)
    calls: list[str] = []
    assert _native.preload(13, [lib], dlopen=calls.append) == calls
    assert [Path(c).name for c in calls] == CU13


def test_preload_refuses_another_major_version(tmp_path):
    """A CUDA 12 torch with only CUDA 13 libraries at hand: an error, nothing loaded in their place."""
    lib = _fake_libs(tmp_path / "lib", CU13)
    calls: list[str] = []
    with pytest.raises(BackendError, match=r"CUDA 12, which needs libcudart\.so\.12.*libcudart\.so\.13.*another "
                                           r"CUDA major version.*nvidia-cusolver-cu12"):
        _native.preload(12, [lib], dlopen=calls.append)
    assert calls == []


def test_preload_reports_a_library_that_fails_to_load(tmp_path):
    lib = _fake_libs(tmp_path / "lib", CU13)

    def dlopen(path: str) -> None:
        if "cusolver" in path:
            raise OSError("undefined symbol: cusparseSpSV_bufferSize")

    with pytest.raises(BackendError, match=r"cannot load .*libcusolver\.so\.12 .*undefined symbol"):
        _native.preload(13, [lib], dlopen=dlopen)


def test_preload_leaves_absent_libraries_to_the_dynamic_linker(tmp_path):
    assert _native.preload(12, [tmp_path], dlopen=pytest.fail) == []
    with pytest.raises(BackendError, match="CUDA 11 is not supported"):
        _native.preload(11, [tmp_path])


def _try_cuda_with(monkeypatch, torch_cuda: str | None, built: int | None):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(_native, "module_cuda_family", lambda path: built)
    monkeypatch.setattr(_native, "preload", lambda family: pytest.fail("must not preload"))
    monkeypatch.setattr(_native.importlib.util, "find_spec", lambda name: SimpleNamespace(origin="/x/_cuda.so"))
    monkeypatch.setattr(_native, "_cuda_family", None)
    return _native._try_cuda()


def test_cuda_module_of_another_family_is_not_loaded(monkeypatch):
    mod, why = _try_cuda_with(monkeypatch, "12.4", built=13)
    assert mod is None and "built for CUDA 13" in why and "uses CUDA 12.4" in why


def test_cpu_only_torch_loads_no_cuda_module(monkeypatch):
    mod, why = _try_cuda_with(monkeypatch, None, built=13)
    assert mod is None and "CPU-only build" in why


# ----------------------------------------------------------------------------- opcm doctor
def test_doctor_report_and_text(fresh):
    d = doctor.report()
    json.dumps(d)  # JSON-ready
    assert d["torch"] == torch.__version__ and d["torch_cuda"] == torch.version.cuda
    assert d["modules"]["_C"]["loaded"] and d["modules"]["_C"]["build"]["block_elements"] == 32768
    assert d["backends"]["cpu"] == {"device": "cpu", "usable": True, "native": True, "reason": None}
    text = doctor.format_report(d)
    assert f"torch {torch.__version__}" in text
    assert "backend on cpu: native kernels (self-test passed)" in text
    if not torch.cuda.is_available():
        assert "backend on cuda: not usable: device 'cuda' was asked for" in text


def test_doctor_says_why_the_native_kernels_are_not_used(fresh, monkeypatch):
    _fail_compare(monkeypatch)
    text = doctor.format_report(doctor.report())
    assert "backend on cpu: torch ops (native kernels not used on cpu: the self-test failed: deltas (T) differs" in text


def test_doctor_formats_the_cuda_libraries(fresh):
    d = doctor.report()
    d.update(cuda_runtime=doctor._cuda_version(13000), cuda_driver=doctor._cuda_version(13010))
    d["libraries"]["cusolver"] = {"version": doctor._lib_version(110605), "path": "/sp/nvidia/cusolver/lib/libcusolver.so.11",
                                  "syev_batched": False}
    d["modules"]["_cuda"] = {"loaded": True, "error": None, "file": "/sp/opcm_ext/_cuda.so", "built_for_cuda": 12}
    d["backends"]["cuda"] = {"device": "cuda:0", "usable": True, "native": True, "reason": None}
    text = doctor.format_report(d)
    assert "CUDA runtime 13.0, driver 13.1" in text
    assert "cusolver 11.6.5: /sp/nvidia/cusolver/lib/libcusolver.so.11; syevBatched no (cuSOLVER < 11.7.2" in text
    assert "opcm_ext._cuda: loaded from /sp/opcm_ext/_cuda.so, built for CUDA 12" in text
    assert "backend on cuda: native kernels (self-test passed)" in text


def test_device_svd_workspace_bytes():
    assert ops.device_svd_workspace_bytes(768, 3072, 0) == 0
    one, twelve = ops.device_svd_workspace_bytes(768, 3072, 1), ops.device_svd_workspace_bytes(768, 3072, 12)
    assert twelve > one > 2 * 8 * 768 * 3072  # at least the fp64 copy of A and Y = P W
    assert twelve - one >= 11 * 2 * 8 * 768 * 3072
