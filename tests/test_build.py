"""The build: where the compiled modules live, what they link, their stubs, and the CMake CUDA switch."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import opcm_ext
from opcm_ext import _cuda_wheels, _native

REPO = Path(__file__).resolve().parents[1]
PKG = Path(opcm_ext.__file__).parent


def _needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def _built(name: str) -> Path | None:
    return next(iter(sorted(PKG.glob(f"{name}.*.so"))), None)


def _load_file(path: Path) -> ModuleType:
    """The compiled module at `path`, imported as is (opcm_ext._cuda needs no GPU to import)."""
    spec = importlib.util.spec_from_file_location(path.name.split(".")[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_module_lives_in_the_package():
    C = _native.cpu()
    assert Path(C.__file__).parent == PKG
    assert C.__name__ == "opcm_ext._C"
    info = C.build_info()
    assert info["openmp"] > 0 and info["block_elements"] == 32768


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_modules_do_not_link_libtorch():
    mods = [p for p in (_built("_C"), _built("_cuda")) if p is not None]
    assert mods, "no compiled module in the package"
    for path in mods:
        needed = _needed(path)
        assert not [lib for lib in needed if "torch" in lib or "c10" in lib], (path, needed)


@pytest.mark.parametrize("name", ["_C", "_cuda"])
def test_stub_lists_the_module_functions(name):
    path = _built(name)
    if path is None:
        pytest.skip(f"opcm_ext.{name} is not built")
    tree = ast.parse((PKG / f"{name}.pyi").read_text())
    stub = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    mod = _load_file(path)
    real = {n for n in dir(mod) if not n.startswith("__") and callable(getattr(mod, n))}
    assert stub == real


def test_cuda_module_reports_its_family_and_versions_without_a_gpu():
    path = _built("_cuda")
    if path is None:
        pytest.skip("opcm_ext._cuda is not built")
    family = _native.module_cuda_family(path)
    mod = _load_file(path)
    build, run = mod.build_info(), mod.runtime_info()
    assert family == build["cuda_runtime_version"] // 1000
    assert run["cusolver_version"] > 0 and run["cublas_version"] > 0
    # syevBatched is usable only from cuSOLVER 11.7.2 on (looked up at run time)
    assert run["syev_batched"] == (build["syev_batched"] and run["cusolver_version"] >= 110702)
    assert _native.module_cuda_family(_built("_C")) is None


def test_wheel_layout_per_cuda_family(tmp_path):
    for sub in ("nvidia/cu13/include", "nvidia/cu13/lib", "nvidia/cusolver/lib", "nvidia/cusolver/include",
                "nvidia/cublas/lib"):
        (tmp_path / sub).mkdir(parents=True)
    inc13, lib13 = _cuda_wheels.wheel_dirs(13, roots=[tmp_path])
    assert inc13 == [tmp_path / "nvidia/cu13/include"] and lib13 == [tmp_path / "nvidia/cu13/lib"]
    inc12, lib12 = _cuda_wheels.wheel_dirs(12, roots=[tmp_path])
    assert inc12 == [tmp_path / "nvidia/cusolver/include"]
    assert lib12 == [tmp_path / "nvidia/cublas/lib", tmp_path / "nvidia/cusolver/lib"]


def test_wheel_layout_as_cmake_reads_it():
    out = subprocess.run([sys.executable, "-I", str(REPO / "opcm_ext" / "_cuda_wheels.py"), "--cmake", "12"],
                         capture_output=True, text=True, check=True).stdout
    rpath = next(line for line in out.splitlines() if line.startswith("set(OPCM_WHEEL_RPATH "))
    assert "$ORIGIN/../nvidia/cusolver/lib" in rpath and "cu13" not in rpath


def _configure(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    pybind11 = pytest.importorskip("pybind11")
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("needs cmake")
    return subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(tmp_path / "b"), f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300,
    )


def test_cmake_rejects_a_bad_cuda_switch(tmp_path):
    res = _configure(tmp_path, "-DOPCM_WITH_CUDA=maybe")
    assert res.returncode != 0
    assert "OPCM_WITH_CUDA must be ON, OFF or AUTO" in res.stderr


def test_cmake_cuda_on_without_a_compiler_is_a_clear_error(tmp_path):
    res = _configure(tmp_path, "-DOPCM_WITH_CUDA=ON", env={"CUDACXX": "/nonexistent/nvcc"})
    assert res.returncode != 0
    assert "OPCM_WITH_CUDA=ON but the CUDA build cannot be configured" in res.stderr
    assert "OPCM_WITH_CUDA=OFF" in res.stderr


def test_cmake_cuda_auto_without_a_compiler_builds_the_cpu_module(tmp_path):
    res = _configure(tmp_path, env={"CUDACXX": "/nonexistent/nvcc"})
    assert res.returncode == 0, res.stderr
    assert "CUDA module skipped" in res.stdout and "_cuda: OFF" in res.stdout


def test_cmake_cuda_off_builds_only_the_cpu_module(tmp_path):
    res = _configure(tmp_path, "-DOPCM_WITH_CUDA=OFF")
    assert res.returncode == 0, res.stderr
    assert "_cuda: OFF" in res.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cmake_links_the_wheel_of_nvccs_cuda_family(tmp_path):
    res = _configure(tmp_path, "-DOPCM_WITH_CUDA=ON")
    if res.returncode != 0 and "missing" in res.stderr:
        pytest.skip("no cuSOLVER/cuBLAS for this nvcc")
    assert res.returncode == 0, res.stderr
    line = next(line for line in res.stdout.splitlines() if line.startswith("-- opcm_ext: CUDA "))
    major = int(re.match(r"-- opcm_ext: CUDA (\d+)\.", line).group(1))
    wheel_libs = [str(d) for d in _cuda_wheels.wheel_dirs(major)[1]]
    if wheel_libs:  # the wheel (its versioned soname) wins over the toolkit
        assert any(f"{d}/libcusolver.so." in line for d in wheel_libs), line
        assert any(f"{d}/libcublas.so." in line for d in wheel_libs), line
    else:
        assert "CUDA::cusolver" in line and "CUDA::cublas" in line, line
