"""Where the NVIDIA pip wheels (nvidia-cusolver, nvidia-cublas, ...) keep a CUDA family's headers and libraries.

The one place that knows their layout: CUDA 13 wheels install everything under
``site-packages/nvidia/cu13/{include,lib}``; CUDA 12 wheels (``nvidia-*-cu12``) one folder per
library, ``site-packages/nvidia/<lib>/{include,lib}`` (newer ones ``nvidia/cu12``). Used at run
time by ``opcm_ext._native`` (which libraries to preload) and at build time by CMakeLists.txt,
which runs this file as a script (standard library only, no package import)::

    python -I opcm_ext/_cuda_wheels.py --cmake 13   # CMake set() lines for CUDA 13
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

__all__ = ["family_subdirs", "nvidia_roots", "wheel_dirs"]

_CU12_LIBS = ("cuda_runtime", "nvjitlink", "cusparse", "cublas", "cusolver")


def family_subdirs(family: int) -> list[str]:
    """Folders (relative to site-packages) of one CUDA family's wheels, whether installed or not."""
    if family >= 13:
        return [f"nvidia/cu{family}"]
    return ["nvidia/cu12"] + [f"nvidia/{lib}" for lib in _CU12_LIBS]


def nvidia_roots() -> list[Path]:
    """Every site-packages folder this interpreter installs into or imports ``nvidia`` from."""
    roots = [Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")]
    try:  # the wheels' namespace package, when importable (build isolation hides it)
        import nvidia  # type: ignore[import-not-found]

        roots = [Path(p).parent for p in getattr(nvidia, "__path__", [])] + roots
    except ImportError:
        pass
    return list(dict.fromkeys(r.resolve() for r in roots if (r / "nvidia").is_dir()))


def wheel_dirs(family: int, roots: list[Path] | None = None) -> tuple[list[Path], list[Path]]:
    """(include folders, library folders) of the installed wheels of one CUDA family."""
    homes = [root / sub for root in (nvidia_roots() if roots is None else roots) for sub in family_subdirs(family)]
    return [h / "include" for h in homes if (h / "include").is_dir()], [h / "lib" for h in homes if (h / "lib").is_dir()]


def _cmake(family: int) -> str:
    inc, lib = wheel_dirs(family)
    rpath = ["$ORIGIN/../" + sub + "/lib" for sub in family_subdirs(family)]
    lines = [("OPCM_WHEEL_INCLUDE_DIRS", inc), ("OPCM_WHEEL_LIBRARY_DIRS", lib), ("OPCM_WHEEL_RPATH", rpath)]
    return "".join(f'set({name} "{";".join(map(str, values))}")\n' for name, values in lines)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--cmake" or not sys.argv[2].isdigit():
        sys.exit("usage: python -I _cuda_wheels.py --cmake <CUDA major version>")
    sys.stdout.write(_cmake(int(sys.argv[2])))
