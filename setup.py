"""Build opcm_ext's native modules with CMake + Ninja (the pybind11 cmake_example pattern).

Environment:
  OPCM_WITH_CUDA              ON | OFF | AUTO (default AUTO): build opcm_ext._cuda.
  CMAKE_ARGS                  extra arguments for the CMake configure step (win over the above).
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (Ninja's default otherwise).
  OPCM_CMAKE_BUILD_TYPE       Release (default) | RelWithDebInfo | Debug.

No GPU is needed to build. The modules do not link libtorch, so the build works under
pip's build isolation (torch is not a build requirement).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = "opcm_ext"
# Libraries of the NVIDIA pip wheels that the CUDA module needs (headers + shared objects).
_NVIDIA_LIBS = ("cusolver", "cublas", "cusparse", "nvjitlink", "cuda_runtime", "cuda_nvrtc")


class CMakeExtension(Extension):
    """An extension built by the top-level CMakeLists.txt rather than by setuptools."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _nvidia_roots() -> list[Path]:
    """Every site-packages/nvidia directory visible to this interpreter, even under build isolation."""
    roots: list[Path] = []
    try:  # the namespace package of the nvidia-* wheels, if importable here
        import nvidia  # type: ignore[import-not-found]

        roots += [Path(p) for p in getattr(nvidia, "__path__", [])]
    except ImportError:
        pass
    # Build isolation hides the real site-packages from sys.path, but not from sysconfig.
    for key in ("purelib", "platlib"):
        roots.append(Path(sysconfig.get_paths()[key]) / "nvidia")
    try:
        import site

        roots += [Path(p) / "nvidia" for p in site.getsitepackages()]
        roots.append(Path(site.getusersitepackages()) / "nvidia")
    except (AttributeError, ImportError):
        pass
    seen: list[Path] = []
    for r in roots:
        if r.is_dir() and r.resolve() not in seen:
            seen.append(r.resolve())
    return seen


def _cuda_hints() -> tuple[list[str], list[str]]:
    """(library dirs, include dirs) of the NVIDIA pip wheels: nvidia/cu13/lib, nvidia/<lib>/lib, ..."""
    libs: list[str] = []
    incs: list[str] = []
    for root in _nvidia_roots():
        subdirs = sorted(p for p in root.glob("cu[0-9]*") if p.is_dir())
        subdirs += [root / name for name in _NVIDIA_LIBS]
        for d in subdirs:
            if (d / "lib").is_dir():
                libs.append(str(d / "lib"))
            if (d / "include").is_dir():
                incs.append(str(d / "include"))
    return libs, incs


class CMakeBuild(build_ext):
    """Configure and build the whole CMake project once; it emits every module into the package dir."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        self._opcm_extdir = extdir
        build_type = os.environ.get("OPCM_CMAKE_BUILD_TYPE", "Debug" if self.debug else "Release")
        cmake = _cmake_executable()
        try:
            import pybind11

            pybind11_dir = pybind11.get_cmake_dir()
        except ImportError:
            pybind11_dir = ""
        # A stable build folder per toolchain in the source tree (editable installs otherwise
        # get a fresh temporary one each time), so rebuilds are incremental; builds under
        # pip's isolation (a temporary toolchain) get their own folder, removed by a later
        # build once that toolchain is gone.
        toolchain = [sys.executable, cmake, pybind11_dir, os.environ.get("CMAKE_ARGS", "")]
        key = hashlib.sha1("\n".join(toolchain).encode()).hexdigest()[:10]
        build_root = ROOT / "build"
        _remove_stale_build_dirs(build_root)
        build_temp = build_root / f"cmake-{sys.implementation.cache_tag}-{build_type}-{key}"
        build_temp.mkdir(parents=True, exist_ok=True)
        (build_temp / _STAMP).write_text("\n".join(toolchain))

        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DOPCM_WITH_CUDA={os.environ.get('OPCM_WITH_CUDA', 'AUTO')}",
        ]
        try:
            import pybind11

            cmake_args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass  # CMakeLists.txt falls back to `python -m pybind11 --cmakedir`
        cmake_args.append(f"-DOPCM_MODULE_OUTPUT_DIR={extdir}")

        if os.environ.get("OPCM_WITH_CUDA", "AUTO").upper() not in ("OFF", "0", "FALSE", "NO"):
            lib_hints, inc_hints = _cuda_hints()
            if lib_hints:
                cmake_args.append("-DOPCM_CUDA_LIB_HINTS=" + ";".join(lib_hints))
            if inc_hints:
                cmake_args.append("-DOPCM_CUDA_INCLUDE_HINTS=" + ";".join(inc_hints))

        if "CMAKE_GENERATOR" not in os.environ and not (build_temp / "CMakeCache.txt").exists():
            cmake_args.append("-GNinja")
            try:
                import ninja  # type: ignore[import-not-found]

                ninja_exe = Path(ninja.BIN_DIR) / "ninja"
                if ninja_exe.exists():
                    cmake_args.append(f"-DCMAKE_MAKE_PROGRAM:FILEPATH={ninja_exe}")
            except ImportError:
                if shutil.which("ninja") is None:
                    cmake_args.pop()  # no Ninja anywhere: let CMake pick its default generator
        # User arguments last, so they override ours.
        cmake_args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        build_args = ["--config", build_type]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ and getattr(self, "parallel", None):
            build_args.append(f"-j{self.parallel}")

        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_temp), *cmake_args], check=True)
        subprocess.run([cmake, "--build", str(build_temp), *build_args], check=True)

    def _extra_modules(self) -> list[Path]:
        """Modules CMake built besides the declared one (opcm_ext._cuda when the CUDA branch is on)."""
        extdir = getattr(self, "_opcm_extdir", None)
        if extdir is None:  # not built in this run: where the build would have put it
            extdir = Path(self.build_lib) / PACKAGE
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        return [p for p in [extdir / f"_cuda{suffix}"] if p.exists()]

    def get_outputs(self) -> list[str]:
        return super().get_outputs() + [str(p) for p in self._extra_modules()]

    def copy_extensions_to_source(self) -> None:
        # Editable installs (and `build_ext --inplace`) copy the declared module into the
        # source tree; copy the CUDA module too, so `pytest` from the repo root sees both.
        super().copy_extensions_to_source()
        for module in self._extra_modules():
            self.copy_file(str(module), str(ROOT / PACKAGE / module.name), level=self.verbose)


_STAMP = "opcm-toolchain.txt"


def _remove_stale_build_dirs(build_root: Path) -> None:
    """Delete CMake folders of toolchains that no longer exist (finished build-isolation envs)."""
    for d in build_root.glob("cmake-*"):
        stamp = d / _STAMP
        if not stamp.is_file():
            continue
        paths = [p for p in stamp.read_text().splitlines()[:3] if p]
        if any(not Path(p).exists() for p in paths):
            shutil.rmtree(d, ignore_errors=True)


def _cmake_executable() -> str:
    try:
        import cmake  # type: ignore[import-not-found]  # the `cmake` wheel from build-system.requires

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("CMake >= 3.26 is required to build opcm_ext: `pip install cmake ninja`")
    return exe


setup(
    ext_modules=[CMakeExtension(f"{PACKAGE}._C")],
    cmdclass={"build_ext": CMakeBuild},
)
