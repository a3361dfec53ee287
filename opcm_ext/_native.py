"""Loads the compiled kernels (``opcm_ext._C``, ``opcm_ext._cuda``) and says what is available.

Importing this module never fails: a module that cannot be loaded is recorded with the
reason, and ``cpu()`` / ``cuda()`` raise :class:`~opcm_ext.errors.BackendError` naming the
fix only when a missing kernel is actually called.

``_cuda`` is loaded at import when torch sees a GPU, else on first use. Before it is
imported, torch is imported and the NVIDIA pip wheels' shared
libraries (``site-packages/nvidia/cu13/lib``, or ``nvidia/<lib>/lib`` for CUDA 12 wheels)
are preloaded with ``RTLD_GLOBAL``, so ``_cuda`` resolves libcudart / libcusolver /
libcublas / libcusparse / libnvJitLink from the same files torch uses.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import re
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import BackendError

__all__ = ["available", "cpu", "cuda", "has_cpu", "has_cuda"]

# Load order matters: each library's dependencies come before it.
_NVIDIA_LIBS = (
    ("cuda_runtime", "libcudart"),
    ("nvjitlink", "libnvJitLink"),
    ("cusparse", "libcusparse"),
    ("cublas", "libcublasLt"),
    ("cublas", "libcublas"),
    ("cusolver", "libcusolver"),
)

_CPU_FIX = (
    "reinstall with `pip install .` (in a checkout: `pip install -e . --no-build-isolation`) so the "
    "CPU kernels are compiled, or run with OPCM_BACKEND=torch to use the plain torch ops"
)
_CUDA_FIX = (
    "reinstall on a machine with nvcc and the CUDA libraries: `OPCM_WITH_CUDA=ON pip install .` "
    "(`pip install nvidia-cusolver nvidia-cublas` provides cuSOLVER/cuBLAS), or merge with --device cpu"
)


def _nvidia_lib_dirs() -> list[Path]:
    """Library folders of the NVIDIA pip wheels visible to this interpreter."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return []
    dirs: list[Path] = []
    for root in map(Path, getattr(nvidia, "__path__", [])):
        dirs += sorted(p / "lib" for p in root.glob("cu[0-9]*"))
        dirs += [root / pkg / "lib" for pkg, _ in _NVIDIA_LIBS]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def _preload_nvidia_libs() -> list[str]:
    """dlopen the wheels' CUDA libraries with RTLD_GLOBAL; returns the paths loaded."""
    loaded: list[str] = []
    dirs = _nvidia_lib_dirs()
    for _, stem in _NVIDIA_LIBS:
        pattern = re.compile(re.escape(stem) + r"\.so(\.\d+)*$")
        for d in dirs:
            hits = sorted(p for p in d.iterdir() if pattern.match(p.name))
            if not hits:
                continue
            try:
                ctypes.CDLL(str(hits[0]), mode=ctypes.RTLD_GLOBAL)
                loaded.append(str(hits[0]))
            except OSError:
                continue
            break
    return loaded


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"{__package__}.{name}"), None
    except ImportError as e:  # absent, or present but a library it needs is missing
        return None, f"{type(e).__name__}: {e}"


_C, _C_error = _load("_C")

# _cuda is loaded on first use: preloading the CUDA libraries costs ~0.1 s and ~200 MB
# of mapped memory, which a CPU-only merge should not pay.
_cuda: ModuleType | None = None
_cuda_error: str | None = None
_cuda_tried = False
_preloaded: list[str] = []


_cuda_lock = threading.Lock()


def _load_cuda() -> ModuleType | None:
    global _cuda, _cuda_error, _cuda_tried, _preloaded
    with _cuda_lock:
        if not _cuda_tried:
            _cuda_tried = True
            _cuda, _cuda_error, _preloaded = _try_cuda()
    return _cuda


def _try_cuda() -> tuple[ModuleType | None, str | None, list[str]]:
    if importlib.util.find_spec(f"{__package__}._cuda") is None:
        return None, "opcm_ext._cuda was not built (no CUDA toolkit at install time, or OPCM_WITH_CUDA=OFF)", []
    if os.environ.get("OPCM_DISABLE_CUDA", "") not in ("", "0"):
        return None, "disabled by OPCM_DISABLE_CUDA", []
    import torch  # noqa: F401  (its CUDA wheels load libcudart & co. first)

    preloaded = _preload_nvidia_libs()
    mod, err = _load("_cuda")
    return mod, err, preloaded


# With a GPU visible, load _cuda now (so `import opcm_ext._cuda` after this module works
# too); on CPU-only machines only when a CUDA kernel or available() is asked for.
import torch as _torch  # noqa: E402

if _torch.cuda.is_available():
    _load_cuda()


def available() -> dict[str, Any]:
    """What loaded: ``{"cpu": bool, "cuda": bool, "cpu_error": str|None, "cuda_error": str|None, "preloaded": [...]}``."""
    _load_cuda()
    return {
        "cpu": _C is not None,
        "cuda": _cuda is not None,
        "cpu_error": _C_error,
        "cuda_error": _cuda_error,
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
    """The CUDA kernel module; BackendError with the fix when it is missing."""
    if _load_cuda() is None:
        raise BackendError(f"the CUDA kernels (opcm_ext._cuda) are not available ({_cuda_error}); fix: {_CUDA_FIX}.")
    return _cuda
