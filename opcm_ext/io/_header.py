"""The safetensors header parser and the rules that find a model's weights in a folder.

Everything here validates before it allocates: a header is parsed only after its length was
checked against the file, every entry's dtype, shape and byte range is checked, and tensors
may not overlap. The reader (reader.py) builds on ``parse_shard`` and ``resolve_folder``.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import CheckpointError
from ._fs import CORRUPT_FIX as _CORRUPT_FIX
from ._fs import pread_exact as _pread_exact
from .dtypes import DTYPES, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, SUB_BYTE_CODES

MAX_HEADER_BYTES = 100 * 1000 * 1000  # the safetensors library's own limit
MAX_INDEX_BYTES = 100 * 1000 * 1000

_CONVERT_RECIPE = (
    "opcm-ext reads only safetensors (pickled .bin/.pt/.pth files can run code when "
    "loaded). Convert it once, e.g.\n"
    "    import torch; from safetensors.torch import save_file\n"
    "    sd = torch.load({src!r}, map_location='cpu', weights_only=True)\n"
    "    save_file({{k: v.detach().clone().contiguous() for k, v in sd.items()}}, "
    "{dst!r}, metadata={{'format': 'pt'}})\n"
    "or, for a transformers model folder:\n"
    "    AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def refuse_pickle(path: Path) -> CheckpointError:
    if path.is_dir():
        found = _pickle_files(path)
        src = str(path / (found[0] if found else "pytorch_model.bin"))
        dst = str(path / SAFE_WEIGHTS_NAME)
        what = f"{path} holds only pickled PyTorch weights ({', '.join(found[:4])})"
    else:
        src = str(path)
        dst = str(path.with_suffix(".safetensors"))
        what = f"{path} is a pickled PyTorch checkpoint"
    return CheckpointError(f"{what}. " + _CONVERT_RECIPE.format(src=src, dst=dst))


def _pickle_files(folder: Path) -> list[str]:
    try:
        return sorted(
            n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES) and not n.startswith(".")
        )
    except OSError:
        return []



@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: dtype, shape, file and absolute byte range."""

    name: str
    dtype: torch.dtype
    dtype_str: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Shard:
    __slots__ = ("path", "name", "fd", "size", "metadata", "infos")

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.name = path.name
        self.fd = fd
        self.size = size
        self.metadata: dict[str, str] = {}
        self.infos: list[TensorInfo] = []  # in data-offset order


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


class DuplicateKey(ValueError):
    pass


def is_int(x: Any) -> bool:
    return type(x) is int


def parse_shard(path: Path, fd: int) -> Shard:
    """Parse and validate one safetensors header; allocates at most the header length."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file; pass a .safetensors file or a model folder")
    size = st.st_size
    shard = Shard(path, fd, size)
    if size < 8:
        raise CheckpointError(
            f"{path}: file is {size} bytes, shorter than the 8-byte safetensors header length; "
            + _CORRUPT_FIX
        )
    (n,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, path, "the header length"))
    if n > size - 8:
        raise CheckpointError(
            f"{path}: header length {n} is larger than the rest of the file ({size - 8} bytes); "
            + _CORRUPT_FIX
        )
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit of the "
            f"safetensors format; " + _CORRUPT_FIX
        )
    raw = _pread_exact(fd, n, 8, path, "the header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except DuplicateKey as e:
        raise CheckpointError(f"{path}: header lists the key {e.args[0]!r} twice; " + _CORRUPT_FIX) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({e}); " + _CORRUPT_FIX) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: header is a JSON {type(header).__name__}, not an object; " + _CORRUPT_FIX
        )
    data_size = size - 8 - n
    data_start = 8 + n
    md = header.pop("__metadata__", None)
    if md is not None:
        if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
            raise CheckpointError(
                f"{path}: __metadata__ must map strings to strings; "
                "re-save the file with metadata={'key': 'string value', ...}"
            )
        shard.metadata = dict(md)
    spans: list[tuple[int, int, str]] = []
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object; " + _CORRUPT_FIX)
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise CheckpointError(f"{where}: header entry lacks {', '.join(missing)}; " + _CORRUPT_FIX)
        code = entry["dtype"]
        if not isinstance(code, str):
            raise CheckpointError(f"{where}: dtype {code!r} is not a string; " + _CORRUPT_FIX)
        if code in SUB_BYTE_CODES:
            raise CheckpointError(
                f"{where}: dtype {code} (packed sub-byte) is not supported; "
                "dequantize the model to F32/F16/BF16 first"
            )
        if code not in DTYPES:
            raise CheckpointError(
                f"{where}: unknown dtype {code!r} (known: {', '.join(DTYPES)}); "
                "upgrade opcm-ext/torch or convert the tensor to a supported dtype"
            )
        dtype = DTYPES[code]
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(
                f"{where}: shape {_short(shape)} is not a list of non-negative integers; " + _CORRUPT_FIX
            )
        offs = entry["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(is_int(o) for o in offs)):
            raise CheckpointError(
                f"{where}: data_offsets {_short(offs)} is not a pair of integers; " + _CORRUPT_FIX
            )
        begin, end = offs
        if begin < 0 or begin > end:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] are not ordered; " + _CORRUPT_FIX)
        if end > data_size:
            raise CheckpointError(
                f"{where}: data_offsets end {end} lies beyond the data section ({data_size} bytes) "
                "(the file is truncated or the header is wrong); " + _CORRUPT_FIX
            )
        want = _nbytes(shape, dtype.itemsize, cap=data_size)
        if want != end - begin:
            raise CheckpointError(
                f"{where}: shape {shape} of {code} needs "
                f"{want if want <= data_size else 'more than ' + str(data_size)} bytes but "
                f"data_offsets [{begin}, {end}] hold {end - begin}; " + _CORRUPT_FIX
            )
        info = TensorInfo(name, dtype, code, tuple(shape), path, data_start + begin, end - begin)
        infos.append(info)
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    reach, reach_name = 0, None
    for begin, end, name in spans:
        if begin < reach:
            raise CheckpointError(
                f"{path}: tensors {reach_name!r} and {name!r} overlap in the data section; " + _CORRUPT_FIX
            )
        if end > reach:
            reach, reach_name = end, name
    infos.sort(key=lambda i: (i.offset, i.name))
    shard.infos = infos
    return shard


def _nbytes(shape: Sequence[int], itemsize: int, cap: int) -> int:
    """prod(shape) * itemsize in Python ints, stopping early once it exceeds ``cap``."""
    if any(d == 0 for d in shape):
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > cap:
            return cap + 1
    return n


def _short(x: Any, limit: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def check_shard_name(name: Any, index: Path) -> str:
    if not isinstance(name, str):
        raise CheckpointError(f"{index}: weight_map value {_short(name)} is not a file name; " + _CORRUPT_FIX)
    if (
        name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
    ):
        raise CheckpointError(
            f"{index}: refusing shard name {name!r}: shards must be plain file names inside "
            f"{index.parent} (no folders, '..' or absolute paths); fix the index file"
        )
    return name


def _safetensors_in(folder: Path) -> tuple[list[str], list[str]]:
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    files = [n for n in names if n.endswith(".safetensors") and (folder / n).is_file()]
    indexes = [n for n in names if n.endswith(".safetensors.index.json") and (folder / n).is_file()]
    return files, indexes


def resolve_folder(folder: Path) -> tuple[str, Path]:
    """('file'|'index', path) of the weights a Hugging Face folder holds."""
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return "file", folder / SAFE_WEIGHTS_NAME
    if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return "index", folder / SAFE_WEIGHTS_INDEX_NAME
    try:
        files, indexes = _safetensors_in(folder)
    except OSError as e:
        raise CheckpointError(f"cannot list {folder}: {e.strerror}") from None
    if len(indexes) == 1:
        return "index", folder / indexes[0]
    if len(indexes) > 1:
        raise CheckpointError(
            f"{folder} holds several shard indexes ({', '.join(indexes)}); pass the one to use"
        )
    if len(files) == 1:
        return "file", folder / files[0]
    if len(files) > 1:
        raise CheckpointError(
            f"{folder} holds several .safetensors files and no {SAFE_WEIGHTS_NAME} or shard index "
            f"({', '.join(files[:6])}{', ...' if len(files) > 6 else ''}); pass the file to use"
        )
    if _pickle_files(folder):
        raise refuse_pickle(folder)
    raise CheckpointError(
        f"{folder} holds no model weights ({SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} "
        "or another .safetensors file); pass a model folder saved with save_pretrained"
    )
