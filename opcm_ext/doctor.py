"""``opcm doctor``: what opcm-ext finds on this machine and which backend each device would use, and why.

``report()`` collects it as a plain dict (JSON-ready); ``format_report()`` prints it for people.
Running it loads the compiled modules and runs their self-tests (a fraction of a second).
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from . import _cuda_wheels, _native, ops
from ._version import __version__
from .errors import OpcmError

__all__ = ["report", "format_report"]


def _cuda_version(v: int | None) -> str | None:
    """CUDA's encoding (major * 1000 + minor * 10) as 'major.minor'."""
    return None if v is None or v < 0 else f"{v // 1000}.{v % 1000 // 10}"


def _lib_version(v: int | None) -> str | None:
    """A library's encoding (major * 10000 + minor * 100 + patch) as 'major.minor.patch'."""
    return None if v is None or v < 0 else f"{v // 10000}.{v % 10000 // 100}.{v % 100}"


def _module(name: str) -> dict[str, Any]:
    loaded = _native.available()
    key = "cpu" if name == "_C" else "cuda"
    out: dict[str, Any] = {"loaded": loaded[key], "error": loaded[f"{key}_error"]}
    if loaded[key]:
        mod = _native.cpu() if name == "_C" else _native.cuda()
        out["file"] = mod.__file__
        out["build"] = dict(mod.build_info())
        if name == "_cuda":
            out["built_for_cuda"] = _native.module_cuda_family(mod.__file__)
            out["runtime"] = dict(mod.runtime_info())
    return out


def _backend(device: str) -> dict[str, Any]:
    try:
        chosen = ops.select(device)
    except OpcmError as e:  # e.g. device 'cuda' without a GPU
        return {"device": device, "usable": False, "native": False, "reason": str(e)}
    return {"device": str(chosen.device), "usable": True, "native": chosen.native, "reason": chosen.reason}


def report() -> dict[str, Any]:
    """Versions, GPUs, CUDA libraries (and where they were loaded from), compiled modules, backends."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    modules = {"_C": _module("_C"), "_cuda": _module("_cuda")}
    runtime = modules["_cuda"].get("runtime", {})
    libs = _native.loaded_library_paths()
    return {
        "opcm_ext": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_family": _native.cuda_family(torch.version.cuda),
        "gpus": gpus,
        "cuda_runtime": _cuda_version(runtime.get("cuda_runtime_version")),
        "cuda_driver": _cuda_version(runtime.get("cuda_driver_version")),
        "libraries": {
            "cusolver": {"version": _lib_version(runtime.get("cusolver_version")), "path": libs.get("libcusolver"),
                         "syev_batched": runtime.get("syev_batched")},
            "cublas": {"version": _lib_version(runtime.get("cublas_version")), "path": libs.get("libcublas")},
            "cudart": {"path": libs.get("libcudart")},
        },
        "preloaded": _native.available()["preloaded"],
        "nvidia_wheels": {str(f): [str(p) for p in _cuda_wheels.wheel_dirs(f)[1]] for f in _native.FAMILY_SONAMES},
        "modules": modules,
        "backends": {"cpu": _backend("cpu"), "cuda": _backend("cuda")},
    }


def _backend_line(b: dict[str, Any]) -> str:
    if not b["usable"]:
        return f"not usable: {b['reason']}"
    if b["native"]:
        return "native kernels (self-test passed)"
    return f"torch ops ({b['reason'] or 'asked for'})"


def format_report(d: dict[str, Any]) -> str:
    """The report as text, one fact per line."""
    torch_cuda = f"CUDA {d['torch_cuda']}" if d["torch_cuda"] else "CPU-only build"
    lines = [
        f"opcm-ext {d['opcm_ext']} (Python {d['python']})",
        f"torch {d['torch']} ({torch_cuda})",
        f"GPUs: {', '.join(d['gpus']) if d['gpus'] else 'none visible'}",
    ]
    if d["cuda_runtime"]:
        lines.append(f"CUDA runtime {d['cuda_runtime']}, driver {d['cuda_driver'] or 'not installed'}")
    for name in ("cusolver", "cublas", "cudart"):
        lib = d["libraries"][name]
        if lib.get("version") or lib.get("path"):
            text = " ".join(filter(None, [name, lib.get("version")])) + f": {lib.get('path') or 'path unknown'}"
            if name == "cusolver" and lib.get("syev_batched") is not None:
                text += "; syevBatched " + ("yes" if lib["syev_batched"] else "no (cuSOLVER < 11.7.2: Xsyevd per matrix)")
            lines.append(text)
    for family, dirs in d["nvidia_wheels"].items():
        if dirs:
            lines.append(f"NVIDIA wheels for CUDA {family}: {', '.join(dirs)}")
    for name, m in d["modules"].items():
        if m["loaded"]:
            built = f", built for CUDA {m['built_for_cuda']}" if m.get("built_for_cuda") else ""
            lines.append(f"opcm_ext.{name}: loaded from {m['file']}{built}")
        else:
            lines.append(f"opcm_ext.{name}: not loaded ({m['error']})")
    for dev, b in d["backends"].items():
        lines.append(f"backend on {dev}: {_backend_line(b)}")
    return "\n".join(lines)
