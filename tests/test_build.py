"""The build: where the compiled modules live, what they link, and the CMake CUDA switch."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import opcm_ext
from opcm_ext import _native

REPO = Path(__file__).resolve().parents[1]


def _needed(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def test_cpu_module_lives_in_the_package():
    C = _native.cpu()
    assert Path(C.__file__).parent == Path(opcm_ext.__file__).parent
    assert C.__name__ == "opcm_ext._C"
    info = C.build_info()
    assert info["openmp"] > 0 and info["block_elements"] == 32768


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_modules_do_not_link_libtorch():
    mods = [_native.cpu()] + ([_native.cuda()] if _native.has_cuda() else [])
    for mod in mods:
        needed = _needed(mod.__file__)
        assert not [lib for lib in needed if "torch" in lib or "c10" in lib], (mod.__file__, needed)


def test_stub_lists_the_module_functions():
    tree = ast.parse((REPO / "opcm_ext" / "_C.pyi").read_text())
    stub = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    C = _native.cpu()
    real = {name for name in dir(C) if not name.startswith("_") and callable(getattr(C, name))}
    assert stub == real


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


def test_cmake_cuda_on_without_libraries_is_a_clear_error(tmp_path):
    # nvcc may exist, but cuSOLVER/cuBLAS cannot be found in an empty hint folder with
    # the toolkit and the wheels hidden.
    res = _configure(
        tmp_path, "-DOPCM_WITH_CUDA=ON", "-DCMAKE_CUDA_COMPILER=/nonexistent/nvcc",
        f"-DOPCM_CUDA_LIB_HINTS={tmp_path}", f"-DOPCM_CUDA_INCLUDE_HINTS={tmp_path}",
        env={"CUDACXX": "/nonexistent/nvcc", "CUDA_HOME": "", "CUDA_PATH": ""},
    )
    assert res.returncode != 0
    assert "OPCM_WITH_CUDA=ON but the CUDA build cannot be configured" in res.stderr
    assert "OPCM_WITH_CUDA=OFF" in res.stderr


def test_cmake_cuda_off_builds_only_the_cpu_module(tmp_path):
    res = _configure(tmp_path, "-DOPCM_WITH_CUDA=OFF")
    assert res.returncode == 0, res.stderr
    assert "_cuda: OFF" in res.stdout
