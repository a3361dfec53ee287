"""The safetensors dtype table and the file names Hugging Face uses for weights."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "dtype_to_str", "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _build_dtypes() -> dict[str, torch.dtype]:
    table = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
        "C64": "complex64",
    }
    out = {}
    for code, attr in table.items():
        dt = getattr(torch, attr, None)
        if dt is not None:
            out[code] = dt
    return out


DTYPES: dict[str, torch.dtype] = _build_dtypes()
"""safetensors dtype code -> torch dtype (those this torch build has)."""
_DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
SUB_BYTE_CODES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
"""Packed sub-byte dtype codes of the format, which opcm-ext refuses."""


def dtype_to_str(dtype: torch.dtype | str) -> str:
    """The safetensors code ('F32', 'BF16', ...) of a torch dtype (or a code, checked)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown safetensors dtype {dtype!r}; known: {', '.join(DTYPES)}")
        return dtype
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None
