"""Loads the compiled kernels (``opcm_ext._C``, ``opcm_ext._cuda``) and the CUDA libraries that match torch.

Importing this module never fails and never imports torch: a module that cannot be loaded is
recorded with the reason, and ``cpu()`` / ``cuda()`` raise :class:`~opcm_ext.errors.BackendError`
naming the fix only when a kernel is actually asked for.

``_cuda`` is loaded on first use, and only for a CUDA build of torch. The CUDA family (the major
version) follows ``torch.version.cuda``: ``_cuda`` must have been built for it (its ``libcudart``
soname says so), and the NVIDIA pip wheels' libraries of that family alone
(``site-packages/nvidia/cu13/lib`` for CUDA 13, ``nvidia/<lib>/lib`` for CUDA 12;
:mod:`opcm_ext._cuda_wheels`) are preloaded with ``RTLD_GLOBAL`` before the import, so ``_cuda``
binds cuSOLVER/cuBLAS to the same cuSPARSE/nvJitLink/cudart as torch. A library of another
major version is refused with an error, never loaded in its place.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import re
import struct
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from . import _cuda_wheels
from .errors import BackendError

__all__ = [
    "FAMILY_SONAMES",
    "available",
    "cpu",
    "cuda",
    "cuda_family",
    "has_cpu",
    "has_cuda",
    "loaded_library_paths",
    "module_cuda_family",
    "preload",
]

#: Per CUDA family, the soname major version of each library _cuda needs, in load order
#: (dependencies first). cuSOLVER and cuSPARSE do not follow the CUDA major version.
FAMILY_SONAMES: dict[int, dict[str, int]] = {
    12: {"libcudart": 12, "libnvJitLink": 12, "libcusparse": 12, "libcublasLt": 12, "libcublas": 12,
         "libcusolver": 11},
    13: {"libcudart": 13, "libnvJitLink": 13, "libcusparse": 12, "libcublasLt": 13, "libcublas": 13,
         "libcusolver": 12},
}
_WHEELS = {12: "nvidia-cusolver-cu12 nvidia-cublas-cu12", 13: "nvidia-cusolver nvidia-cublas"}

_CPU_FIX = (
    "reinstall so the CPU kernels are compiled: `pip install .` (in a checkout: "
    "`pip install -e . --no-build-isolation`), or choose backend='torch'"
)


def _rebuild_fix(family: int | None) -> str:
    cuda = f"CUDA {family}" if family else "torch's CUDA version"
    return (f"fix: reinstall on a machine with nvcc for {cuda}: `OPCM_WITH_CUDA=ON pip install "
            f"--no-build-isolation .` (`pip install {_WHEELS.get(family or 13, _WHEELS[13])}` provides "
            "cuSOLVER/cuBLAS), or merge with device='cpu' or backend='torch'")


def cuda_family(torch_cuda: str | None) -> int | None:
    """The CUDA major version of a torch build ('12.4' -> 12); None for a CPU-only torch."""
    if not torch_cuda:
        return None
    m = re.match(r"(\d+)\.", str(torch_cuda) + ".")
    return int(m.group(1)) if m else None


def module_cuda_family(path: str | Path) -> int | None:
    """The CUDA major version a compiled module was linked for, from its ``libcudart.so.N`` (ELF)."""
    for name in _elf_needed(Path(path)):
        m = re.fullmatch(r"libcudart\.so\.(\d+)", name)
        if m:
            return int(m.group(1))
    return None


def _elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object ([] when it is not one)."""
    try:
        data = path.read_bytes()
        if data[:6] != b"\x7fELF\x02\x01":
            return []
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQII", data, shoff + i * shentsize) for i in range(shnum)]
        out: list[str] = []
        for _, kind, _, _, off, size, link, _ in sections:
            if kind != 6:  # SHT_DYNAMIC
                continue
            strtab = sections[link][4]
            for i in range(off, off + size, 16):
                tag, val = struct.unpack_from("<qQ", data, i)
                if tag == 1:  # DT_NEEDED
                    out.append(data[strtab + val:data.index(b"\0", strtab + val)].decode())
        return out
    except (OSError, struct.error, IndexError, ValueError):
        return []


def preload(family: int, lib_dirs: list[Path] | None = None,
            dlopen: Callable[[str], Any] | None = None) -> list[str]:
    """dlopen (RTLD_GLOBAL) the libraries of one CUDA family found in its wheel folders; their paths.

    A library found only with another soname major (another CUDA family) is a BackendError, as is
    one that fails to load; one found nowhere is left to the dynamic linker (a toolkit install).
    """
    if family not in FAMILY_SONAMES:
        raise BackendError(f"CUDA {family} is not supported (torch's CUDA family); opcm_ext._cuda builds for "
                           f"CUDA {' and '.join(map(str, FAMILY_SONAMES))}.")
    dirs = _cuda_wheels.wheel_dirs(family)[1] if lib_dirs is None else lib_dirs
    load = dlopen or (lambda p: ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL))
    loaded: list[str] = []
    for stem, major in FAMILY_SONAMES[family].items():
        want = f"{stem}.so.{major}"
        hits = [d / want for d in dirs if (d / want).exists()]
        if not hits:
            others = sorted(p.name for d in dirs for p in d.glob(f"{stem}.so.*"))
            if others:
                raise BackendError(
                    f"torch uses CUDA {family}, which needs {want}, but {', '.join(map(str, dirs))} hold(s) only "
                    f"{', '.join(others)} (another CUDA major version); fix: `pip install {_WHEELS[family]}`.")
            continue
        try:
            load(str(hits[0]))
        except OSError as e:
            raise BackendError(f"cannot load {hits[0]} ({e}); fix: reinstall it (`pip install --force-reinstall "
                               f"{_WHEELS[family]}`).") from e
        loaded.append(str(hits[0]))
    return loaded


def loaded_library_paths(stems: tuple[str, ...] = ("libcudart", "libcusolver", "libcublas")) -> dict[str, str]:
    """Where each named shared library mapped in this process comes from (Linux /proc/self/maps)."""
    found: dict[str, str] = {}
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return found
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        for stem in stems:
            if stem not in found and re.search(re.escape(stem) + r"\.so[.\d]*$", path):
                found[stem] = path
    return found


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"{__package__}.{name}"), None
    except ImportError as e:  # absent, or present but a library it needs is missing
        return None, f"{type(e).__name__}: {e}"


_C, _C_error = _load("_C")

_cuda: ModuleType | None = None
_cuda_error: str | None = None
_cuda_tried = False
_cuda_family: int | None = None
_preloaded: list[str] = []
_cuda_lock = threading.Lock()


def _load_cuda() -> ModuleType | None:
    global _cuda, _cuda_error, _cuda_tried
    with _cuda_lock:
        if not _cuda_tried:
            _cuda_tried = True
            _cuda, _cuda_error = _try_cuda()
    return _cuda


def _try_cuda() -> tuple[ModuleType | None, str | None]:
    global _cuda_family, _preloaded
    spec = importlib.util.find_spec(f"{__package__}._cuda")
    if spec is None or spec.origin is None:
        return None, ("opcm_ext._cuda was not built (no CUDA toolkit at install time, or OPCM_WITH_CUDA=OFF); "
                      + _rebuild_fix(None))
    import torch  # its CUDA libraries load first

    _cuda_family = family = cuda_family(torch.version.cuda)
    if family is None:
        return None, (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); fix: install "
                      "a CUDA build of torch to use a GPU, or merge with device='cpu'")
    built = module_cuda_family(spec.origin)
    if built is not None and built != family:
        return None, (f"opcm_ext._cuda was built for CUDA {built} but torch {torch.__version__} uses CUDA "
                      f"{torch.version.cuda}; " + _rebuild_fix(family))
    try:
        _preloaded = preload(family)
    except BackendError as e:
        return None, str(e).rstrip(".")
    mod, err = _load("_cuda")
    return mod, (err and f"{err}; {_rebuild_fix(family)}")


def available() -> dict[str, Any]:
    """What loaded: cpu/cuda (bool), cpu_error/cuda_error (str|None), cuda_family, preloaded (paths)."""
    _load_cuda()
    return {
        "cpu": _C is not None,
        "cuda": _cuda is not None,
        "cpu_error": _C_error,
        "cuda_error": _cuda_error,
        "cuda_family": _cuda_family,
        "preloaded": list(_preloaded),
    }


def has_cpu() -> bool:
    """True when the CPU kernels ``opcm_ext._C`` loaded."""
    return _C is not None


def has_cuda() -> bool:
    """True when the CUDA kernels ``opcm_ext._cuda`` load (a GPU may still be absent)."""
    return _load_cuda() is not None


def cpu() -> ModuleType:
    """The CPU kernel module; BackendError with the fix when it is missing."""
    if _C is None:
        raise BackendError(f"the CPU kernels (opcm_ext._C) are not available ({_C_error}); fix: {_CPU_FIX}.")
    return _C


def cuda() -> ModuleType:
    """The CUDA kernel module; BackendError with the cause and the fix when it cannot be loaded."""
    if _load_cuda() is None:
        raise BackendError(f"the CUDA kernels (opcm_ext._cuda) are not available: {_cuda_error}.")
    return _cuda  # type: ignore[return-value]
