"""Build opcm_ext._C (and opcm_ext._cuda where CUDA is found) with CMake + Ninja.

The pybind11 cmake_example pattern: one CMake configure and build per ``build_ext``, the
modules written straight into the package folder of the build tree. Environment:
  OPCM_WITH_CUDA              ON | OFF | AUTO (default): build opcm_ext._cuda (CMakeLists.txt).
  CMAKE_ARGS                  extra CMake configure arguments (they come last, so they win).
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs.
No GPU and no torch are needed to build.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """A module built by CMakeLists.txt; `optional` ones (opcm_ext._cuda) may not be built."""

    def __init__(self, name: str, optional: bool = False) -> None:
        super().__init__(name, sources=[], optional=optional)


class CMakeBuild(build_ext):
    """One CMake configure + build emits every module into the package folder."""

    def build_extension(self, ext: Extension) -> None:
        if ext is not self.extensions[0]:
            return  # the first extension's build made them all
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A CUDA module left in the build tree by an earlier build must not outlive a build without it.
        (extdir / Path(self.get_ext_filename("opcm_ext._cuda")).name).unlink(missing_ok=True)
        build_temp = Path(self.build_temp) / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DOPCM_WITH_CUDA={os.environ.get('OPCM_WITH_CUDA', 'AUTO')}",
        ]
        if "CMAKE_GENERATOR" not in os.environ:
            cmake_args.append("-GNinja")
        cmake_args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        build_args = []
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ and self.parallel:
            build_args.append(f"-j{self.parallel}")
        # --fresh: pip builds in the source tree, where an earlier build's cache may name the
        # tools of a build environment that no longer exists.
        subprocess.run(["cmake", "--fresh", "-S", str(ROOT), "-B", str(build_temp), *cmake_args], check=True)
        subprocess.run(["cmake", "--build", str(build_temp), *build_args], check=True)


setup(
    ext_modules=[CMakeExtension("opcm_ext._C"), CMakeExtension("opcm_ext._cuda", optional=True)],
    cmdclass={"build_ext": CMakeBuild},
)
