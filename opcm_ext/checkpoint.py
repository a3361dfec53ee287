"""Every byte the product reads or writes: safetensors reading, writing, and atomic output.

- ``CheckpointReader``: a Hugging Face folder, a bare ``.safetensors`` file or a shard
  index, validated up front by our own header parser, read tensor by tensor with
  ``pread`` (no mmap: no RSS inflation, no SIGBUS on a truncated file).
- ``TensorHasher`` / ``content_hash``: the content identity of a model, independent of
  sharding.
- ``SafetensorsWriter``: headers first, then tensor bytes at precomputed offsets with
  ``pwrite``, in any order, from any thread.
- ``OutputTransaction``: the only way anything lands in a user's directory: a lock, a
  marked temporary sibling, fsync, and an atomic swap (``renameat2(RENAME_EXCHANGE)``,
  else rename-aside with recovery on the next run).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import operator
import os
import re
import secrets
import shutil
import stat
import struct
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import _faults
from .errors import CheckpointError, OutputError

__all__ = [
    "CheckpointReader",
    "TensorInfo",
    "TensorHasher",
    "content_hash",
    "SafetensorsWriter",
    "OutputTransaction",
    "recover_output",
    "DTYPES",
    "dtype_to_str",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
]

_log = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1000 * 1000  # the safetensors library's own limit
MAX_INDEX_BYTES = 100 * 1000 * 1000

# ---------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------


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
_SUB_BYTE = {"F4", "F6_E2M3", "F6_E3M2"}


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
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_CORRUPT_FIX = (
    "the file is corrupt, truncated or not a safetensors file: re-download it or re-save "
    "the model with save_pretrained(..., safe_serialization=True)"
)


def _refuse_pickle(path: Path) -> CheckpointError:
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
            n for n in os.listdir(folder) if n.endswith(_PICKLE_SUFFIXES) and not n.startswith(".")
        )
    except OSError:
        return []


# ---------------------------------------------------------------------------------------
# low-level I/O
# ---------------------------------------------------------------------------------------


def _pread_exact(fd: int, n: int, offset: int, path: Path, what: str) -> bytes:
    """Read exactly ``n`` bytes at ``offset``; a short read at EOF is a truncation."""
    chunks = []
    done = 0
    while done < n:
        b = os.pread(fd, min(n - done, 1 << 30), offset + done)
        if not b:
            raise CheckpointError(
                f"{path}: truncated while reading {what} (wanted {n} bytes at offset {offset}, "
                f"the file ends after {offset + done}); {_CORRUPT_FIX}"
            )
        chunks.append(b)
        done += len(b)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def _pread_into(fd: int, mv: memoryview, offset: int, path: Path, what: str) -> None:
    """Fill ``mv`` from ``offset``, looping on short reads; EOF first is a truncation."""
    n = len(mv)
    done = 0
    while done < n:
        if _HAVE_PREADV:
            k = os.preadv(fd, [mv[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            b = os.pread(fd, min(n - done, 1 << 30), offset + done)
            k = len(b)
            mv[done : done + k] = b
        if k == 0:
            raise CheckpointError(
                f"{path}: truncated while reading {what} (wanted {n} bytes at offset {offset}, "
                f"the file ends after {offset + done}); {_CORRUPT_FIX}"
            )
        done += k


_HAVE_PREADV = hasattr(os, "preadv")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view (no copy) of a contiguous CPU tensor."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def _fsync_path(path: Path | str, directory: bool = False) -> None:
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if directory:
        flags |= getattr(os, "O_DIRECTORY", 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


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


class _Shard:
    __slots__ = ("path", "name", "fd", "size", "metadata", "infos")

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.name = path.name
        self.fd = fd
        self.size = size
        self.metadata: dict[str, str] = {}
        self.infos: list[TensorInfo] = []  # in data-offset order


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    pass


def _is_int(x: Any) -> bool:
    return type(x) is int


def _parse_shard(path: Path, fd: int) -> _Shard:
    """Parse and validate one safetensors header; allocates at most the header length."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file; pass a .safetensors file or a model folder")
    size = st.st_size
    shard = _Shard(path, fd, size)
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
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
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
        if code in _SUB_BYTE:
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
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(
                f"{where}: shape {_short(shape)} is not a list of non-negative integers; " + _CORRUPT_FIX
            )
        offs = entry["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
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


def _check_shard_name(name: Any, index: Path) -> str:
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


def _resolve_folder(folder: Path) -> tuple[str, Path]:
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
        raise _refuse_pickle(folder)
    raise CheckpointError(
        f"{folder} holds no model weights ({SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} "
        "or another .safetensors file); pass a model folder saved with save_pretrained"
    )


class CheckpointReader:
    """A safetensors checkpoint (HF folder, single file or shard index), validated up front."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if sys.byteorder != "little":  # pragma: no cover - no such host in CI
            raise CheckpointError("safetensors data is little-endian; big-endian hosts are not supported")
        p = Path(os.path.abspath(os.fspath(path)))
        self.path: Path = p
        self.folder: Path | None = None
        self.is_folder: bool = False
        self.config_path: Path | None = None
        self._shards: list[_Shard] = []
        self._infos: dict[str, TensorInfo] = {}
        self._fds: list[int] = []
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)
        try:
            self._open(p)
        except BaseException:
            self._finalizer()
            raise
        self._keys = sorted(self._infos)
        self._fd_of = {s.path: s.fd for s in self._shards}

    # -- construction --------------------------------------------------------------
    def _open(self, p: Path) -> None:
        if not os.path.exists(p):
            raise CheckpointError(f"{p} does not exist; pass a model folder, a .safetensors file or an index")
        if p.is_dir():
            self.folder, self.is_folder = p, True
            kind, target = _resolve_folder(p)
        elif p.name.endswith(_PICKLE_SUFFIXES):
            raise _refuse_pickle(p)
        elif p.name.endswith(".json"):
            self.folder = p.parent
            kind, target = "index", p
        else:
            kind, target = "file", p
        if kind == "file":
            self._add_shard(target)
        else:
            self._open_index(target)
        for shard in self._shards:
            for info in shard.infos:
                self._infos[info.name] = info
        if self.folder is not None:
            cfg = self.folder / "config.json"
            self.config_path = cfg if cfg.is_file() else None
        else:
            cfg = p.parent / "config.json"
            if cfg.is_file():
                try:
                    kind2, target2 = _resolve_folder(p.parent)
                except CheckpointError:
                    kind2, target2 = "", None
                if kind2 == "file" and target2 is not None and target2.name == p.name:
                    self.config_path = cfg

    def _open_fd(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist") from None
        except IsADirectoryError:
            raise CheckpointError(f"{path} is a folder, expected a .safetensors file") from None
        except OSError as e:
            raise CheckpointError(f"cannot open {path}: {e.strerror}") from None
        self._fds.append(fd)
        return fd

    def _add_shard(self, path: Path) -> _Shard:
        fd = self._open_fd(path)
        try:
            shard = _parse_shard(path, fd)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
        self._shards.append(shard)
        return shard

    def _open_index(self, index: Path) -> None:
        folder = index.parent
        try:
            with open(index, "rb") as f:
                raw = f.read(MAX_INDEX_BYTES + 1)
        except FileNotFoundError:
            raise CheckpointError(f"{index} does not exist") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {index}: {e.strerror}") from None
        if len(raw) > MAX_INDEX_BYTES:
            raise CheckpointError(f"{index} is larger than {MAX_INDEX_BYTES} bytes; not a shard index")
        try:
            doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as e:
            raise CheckpointError(f"{index}: the key {e.args[0]!r} appears twice; fix the index file") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(
                f"{index} is not valid JSON ({e}); re-download it or re-save the model"
            ) from None
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(
                f"{index} has no weight_map object mapping tensor names to shard files; "
                "it is not a Hugging Face shard index (re-save the model with save_pretrained)"
            )
        shard_of: dict[str, str] = {}
        for key, shard_name in wm.items():
            shard_of[key] = _check_shard_name(shard_name, index)
        for shard_name in sorted(set(shard_of.values())):
            sp = folder / shard_name
            if not sp.is_file():
                raise CheckpointError(
                    f"{index} names the shard {shard_name}, which is missing from {folder}; "
                    "the download is incomplete: re-download the model"
                )
            self._add_shard(sp)
        seen: dict[str, str] = {}
        extra: list[str] = []
        misplaced: list[str] = []
        for shard in self._shards:
            for info in shard.infos:
                if info.name in seen:
                    raise CheckpointError(
                        f"tensor {info.name!r} is stored in two shards, {seen[info.name]} and "
                        f"{shard.name} (in {folder}); re-save the model"
                    )
                seen[info.name] = shard.name
                want = shard_of.get(info.name)
                if want is None:
                    extra.append(f"{info.name} (in {shard.name})")
                elif want != shard.name:
                    misplaced.append(f"{info.name} (index says {want}, found in {shard.name})")
        missing = [f"{k} (index says {s})" for k, s in shard_of.items() if k not in seen]
        problems = []
        for label, items in (
            ("listed in the index but absent from their shard", missing),
            ("present in a shard but not in the index", extra),
            ("stored in a different shard than the index says", misplaced),
        ):
            if items:
                problems.append(f"{len(items)} tensor(s) {label}: {', '.join(items[:5])}" + (", ..." if len(items) > 5 else ""))
        if problems:
            raise CheckpointError(
                f"{index} does not match its shards: " + "; ".join(problems)
                + "; the index and the shards come from different saves: re-download or re-save the model"
            )

    # -- the API ---------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape, file and byte range of one tensor."""
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor named {name!r}") from None

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first shard ({} if none)."""
        return dict(self._shards[0].metadata) if self._shards else {}

    @property
    def shard_metadata(self) -> dict[str, dict[str, str]]:
        """Shard file name -> its ``__metadata__``."""
        return {s.name: dict(s.metadata) for s in self._shards}

    @property
    def layout(self) -> list[tuple[str, list[str]]]:
        """(shard file name, tensor names in data-offset order) for each shard, in order."""
        return [(s.name, [i.name for i in s.infos]) for s in self._shards]

    @property
    def files(self) -> list[Path]:
        """The shard files, in layout order."""
        return [s.path for s in self._shards]

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' byte sizes (the index's ``total_size``)."""
        return sum(i.nbytes for i in self._infos.values())

    def _fd(self, info: TensorInfo) -> int:
        with self._cond:
            if self._closed:
                raise ValueError(f"reading {info.name!r} from a closed CheckpointReader ({self.path})")
            self._active += 1
        return self._fd_of[info.file]

    def _release(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._cond.notify_all()

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor as stored (dtype, shape) on the CPU; into ``out`` (uint8) if given."""
        info = self.info(name)
        if out is None:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
        else:
            if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.device.type != "cpu":
                raise ValueError("out must be a CPU torch.uint8 tensor")
            if not out.is_contiguous():
                raise ValueError("out must be contiguous")
            if out.numel() < info.nbytes:
                raise ValueError(f"out holds {out.numel()} bytes, {name!r} needs {info.nbytes}")
            buf = out.view(-1)[: info.nbytes]
        if info.nbytes:
            fd = self._fd(info)
            try:
                _pread_into(fd, memoryview(buf.numpy()), info.offset, info.file, f"tensor {name!r}")
            except OSError as e:
                raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e.strerror}") from None
            finally:
                self._release()
        try:
            return buf.view(info.dtype).view(info.shape)
        except RuntimeError as e:
            raise ValueError(f"out cannot hold {info.dtype_str} data at its offset: {e}") from None

    def read_bytes(self, name: str, start: int, length: int) -> bytes:
        """``length`` raw bytes of tensor ``name`` starting ``start`` bytes into its data."""
        info = self.info(name)
        if not (_is_int(start) and _is_int(length)) or start < 0 or length < 0 or start + length > info.nbytes:
            raise ValueError(
                f"byte range [{start}, {start}+{length}) is outside tensor {name!r} ({info.nbytes} bytes)"
            )
        if length == 0:
            return b""
        fd = self._fd(info)
        try:
            return _pread_exact(fd, length, info.offset + start, info.file, f"tensor {name!r}")
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e.strerror}") from None
        finally:
            self._release()

    def read_sample(self, name: str, size: int = 4096) -> bytes:
        """At most ``size`` bytes of a tensor (head, middle and tail) for cheap fingerprints."""
        n = self.info(name).nbytes
        if n <= size:
            return self.read_bytes(name, 0, n)
        part = max(size // 3, 1)
        return b"".join(self.read_bytes(name, s, part) for s in (0, (n - part) // 2, n - part))

    def close(self) -> None:
        """Close the shard files (waits for reads in flight)."""
        with self._cond:
            self._closed = True
            while self._active:
                self._cond.wait()
        self._finalizer()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, tensors={len(self._keys)}, shards={len(self._shards)})"


def _close_fds(fds: list[int]) -> None:
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:
            pass



# ---------------------------------------------------------------------------------------
# content identity
# ---------------------------------------------------------------------------------------


class TensorHasher:
    """blake2b-128 over (name, dtype, shape, bytes) of tensors fed in sorted-name order."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self._last: str | None = None

    def update(self, name: str, tensor: torch.Tensor) -> None:
        """Add one tensor; names must come in strictly increasing order."""
        if tensor.device.type != "cpu":
            raise ValueError(f"TensorHasher.update({name!r}): the tensor must be on the CPU")
        t = tensor if tensor.is_contiguous() else tensor.contiguous()
        self._update_raw(name, dtype_to_str(t.dtype), tuple(t.shape), _tensor_bytes(t))

    def _update_raw(self, name: str, dtype_str: str, shape: tuple[int, ...], data: Any) -> None:
        if self._last is not None and not name > self._last:
            raise ValueError(
                f"TensorHasher: {name!r} after {self._last!r}; feed tensors in sorted name order"
            )
        self._last = name
        nb = name.encode("utf-8")
        ds = dtype_str.encode("ascii")
        h = self._h
        h.update(struct.pack("<Q", len(nb)) + nb + struct.pack("<Q", len(ds)) + ds)
        h.update(struct.pack(f"<Q{len(shape)}Q", len(shape), *shape))
        h.update(struct.pack("<Q", len(data)))
        h.update(data)

    def hexdigest(self) -> str:
        """32 hex characters."""
        return self._h.hexdigest()


def content_hash(reader: CheckpointReader) -> str:
    """The TensorHasher digest of every tensor of ``reader`` (one tensor in memory at a time)."""
    hasher = TensorHasher()
    keys = reader.keys()
    buf = torch.empty(max((reader.info(k).nbytes for k in keys), default=0), dtype=torch.uint8)
    for k in keys:
        info = reader.info(k)
        raw = reader.read(k, out=buf)
        hasher._update_raw(k, info.dtype_str, info.shape, _tensor_bytes(raw))
    return hasher.hexdigest()


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------

LayoutSpec = Sequence[tuple[str, Sequence[tuple[str, "torch.dtype | str", Sequence[int]]]]]


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _plain_name(name: Any, what: str) -> str:
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
    ):
        raise ValueError(f"{what} {name!r} must be a plain file name")
    return name


class _Spec:
    __slots__ = ("name", "code", "dtype", "shape", "begin", "nbytes", "shard")

    def __init__(self, name: str, code: str, shape: tuple[int, ...], begin: int, nbytes: int, shard: int):
        self.name, self.code, self.dtype = name, code, DTYPES[code]
        self.shape, self.begin, self.nbytes, self.shard = shape, begin, nbytes, shard


class SafetensorsWriter:
    """Writes safetensors shards: headers at creation, tensor bytes in any order with pwrite."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        layout: LayoutSpec,
        metadata: dict[str, str] | None = None,
        *,
        index_name: str = SAFE_WEIGHTS_INDEX_NAME,
        _disk_full_note: str = "",
    ) -> None:
        self.directory = Path(directory)
        md = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
            raise ValueError("metadata must map str to str")
        md.setdefault("format", "pt")
        self.metadata = md
        self._note = _disk_full_note
        self._lock = threading.Lock()
        self._specs: dict[str, _Spec] = {}
        self._paths: list[Path] = []
        self._fds: list[int] = []
        self._sizes: list[int] = []
        self._headers: list[bytes] = []
        self._started: set[str] = set()
        self._done: set[str] = set()
        self._closed = False
        self._index: Path | None = None
        self._created: list[Path] = []
        shard_names: list[str] = []
        for si, (shard_name, entries) in enumerate(layout):
            _plain_name(shard_name, "shard file name")
            if shard_name in shard_names:
                raise ValueError(f"shard file {shard_name!r} appears twice in the layout")
            shard_names.append(shard_name)
            header: dict[str, Any] = {"__metadata__": md}
            pos = 0
            for entry in entries:
                name, dtype, shape = entry
                if not isinstance(name, str) or name == "__metadata__":
                    raise ValueError(f"tensor name {name!r} is not allowed")
                if name in self._specs:
                    raise ValueError(f"tensor {name!r} appears twice in the layout")
                code = dtype_to_str(dtype)
                shp = tuple(int(d) for d in shape)
                if any(d < 0 for d in shp):
                    raise ValueError(f"tensor {name!r}: negative dimension in shape {shp}")
                nb = DTYPES[code].itemsize
                for d in shp:
                    nb *= d
                self._specs[name] = _Spec(name, code, shp, pos, nb, si)
                header[name] = {"dtype": code, "shape": list(shp), "data_offsets": [pos, pos + nb]}
                pos += nb
            hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            hb += b" " * (-len(hb) % 8)
            self._headers.append(struct.pack("<Q", len(hb)) + hb)
            self._sizes.append(8 + len(hb) + pos)
            self._paths.append(self.directory / shard_name)
        self._data_start = [len(h) for h in self._headers]
        if len(self._paths) > 1:
            self._index = self.directory / _plain_name(index_name, "index file name")
        if not self._paths:
            raise ValueError("the layout names no shard file")
        try:
            for si, path in enumerate(self._paths):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                except FileExistsError:
                    raise ValueError(f"{path} already exists; the writer only creates new files") from None
                self._fds.append(fd)
                self._created.append(path)
                self._pwrite_all(fd, memoryview(self._headers[si]), 0, path)
                _faults.point("writer.header")
        except BaseException:
            self._discard()
            raise

    @property
    def files(self) -> list[Path]:
        """The shard files (and the index, when there are several shards)."""
        return self._paths + ([self._index] if self._index is not None else [])

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' byte sizes."""
        return sum(s.nbytes for s in self._specs.values())

    def _io_error(self, path: Path, exc: OSError) -> OutputError:
        if _disk_full(exc):
            return OutputError(f"disk full while writing {path}: {exc.strerror}{self._note}")
        return OutputError(f"cannot write {path}: {exc.strerror or exc}{self._note}")

    def _pwrite_all(self, fd: int, mv: memoryview, offset: int, path: Path) -> None:
        done, n = 0, len(mv)
        try:
            while done < n:
                k = os.pwrite(fd, mv[done:], offset + done)
                if k <= 0:
                    raise OSError(errno.EIO, "write returned 0 bytes")
                done += k
        except OSError as e:
            raise self._io_error(path, e) from e

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes at its place (any order, any thread, exactly once)."""
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"tensor {name!r} is not in this writer's layout")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor {name!r}: must be on the CPU, is on {tensor.device}")
        if tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype}, the layout declares {spec.dtype}")
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)}, the layout declares {spec.shape}")
        if not tensor.is_contiguous():
            raise ValueError(f"tensor {name!r}: must be contiguous (call .contiguous())")
        with self._lock:
            if self._closed:
                raise ValueError(f"write({name!r}) on a closed writer")
            if name in self._started:
                raise ValueError(f"tensor {name!r} written twice")
            self._started.add(name)
        if spec.nbytes:
            fd = self._fds[spec.shard]
            self._pwrite_all(
                fd, _tensor_bytes(tensor), self._data_start[spec.shard] + spec.begin, self._paths[spec.shard]
            )
        with self._lock:
            self._done.add(name)
        _faults.point("writer.tensor")

    def close(self) -> None:
        """Check every tensor was written once, fsync, close; write the index if sharded."""
        with self._lock:
            if self._closed:
                return
            missing = [n for n in self._specs if n not in self._done]
            if missing:
                raise RuntimeError(
                    f"{len(missing)} tensor(s) of the layout were never written "
                    f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
                )
            self._closed = True
        try:
            for fd, path, size in zip(self._fds, self._paths, self._sizes):
                try:
                    got = os.fstat(fd).st_size
                    if got != size:
                        raise RuntimeError(f"{path} is {got} bytes, expected {size}")
                    os.fsync(fd)
                except OSError as e:
                    raise self._io_error(path, e) from e
            self._close_fds()
            if self._index is not None:
                doc = {
                    "metadata": {"total_size": self.total_bytes},
                    "weight_map": {
                        n: self._paths[self._specs[n].shard].name for n in sorted(self._specs)
                    },
                }
                data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
                try:
                    fd = os.open(self._index, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                    self._created.append(self._index)
                    try:
                        self._pwrite_all(fd, memoryview(data), 0, self._index)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError as e:
                    raise self._io_error(self._index, e) from e
        except BaseException:
            self._close_fds()
            raise

    def _close_fds(self) -> None:
        while self._fds:
            fd = self._fds.pop()
            try:
                os.close(fd)
            except OSError:
                pass

    def _discard(self) -> None:
        self._close_fds()
        while self._created:
            p = self._created.pop()
            try:
                os.unlink(p)
            except OSError:
                pass

    def abort(self) -> None:
        """Stop without checks and delete what was written."""
        with self._lock:
            self._closed = True
        self._discard()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------
# atomic output
# ---------------------------------------------------------------------------------------

_MARKER = ".opcm-tmp"
_SCRATCH = ".opcm-scratch"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


class _NoExchange(Exception):
    """renameat2(RENAME_EXCHANGE) is not available here."""


def _rename_exchange(a: Path, b: Path) -> None:
    """Atomically exchange two paths; _NoExchange where the kernel/filesystem cannot."""
    if _renameat2 is None:
        raise _NoExchange("libc has no renameat2")
    r = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if r != 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise _NoExchange(os.strerror(e))
        raise OSError(e, os.strerror(e), str(a), None, str(b))


def _is_weight_file(name: str) -> bool:
    if name.endswith(_WEIGHT_SUFFIXES):
        return True
    return name.endswith(".index.json") and name[: -len(".index.json")].endswith(_WEIGHT_SUFFIXES)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _rmtree(path: Path) -> None:
    shutil.rmtree(path)


def _marker_token(folder: Path) -> str | None:
    try:
        with open(folder / _MARKER, encoding="utf-8") as f:
            text = f.read(4096)
    except OSError:
        return None
    m = re.search(r"token=([0-9a-f]+)", text)
    return m.group(1) if m else ""


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.opcm.lock"


def _acquire_lock(out: Path) -> int:
    lock = _lock_path(out)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise OutputError(f"cannot create the lock file {lock}: {e.strerror}; check the folder's permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        except OSError:
            pid = "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputError(
                f"another merge into {out} is running (pid {pid}); wait for it to finish or stop it, "
                "or choose another output path"
            ) from None
        raise OutputError(f"cannot lock {lock}: {e.strerror}; put the output on a local filesystem") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the pid is only for the message
    return fd


def _recover(out: Path) -> list[str]:
    """Clean up after killed runs into ``out`` (caller holds the lock); returns what was done."""
    parent, name = out.parent, out.name
    tmp_re = re.compile(r"\." + re.escape(name) + r"\.opcm-tmp-\d+-([0-9a-f]+)")
    old_re = re.compile(r"\." + re.escape(name) + r"\.opcm-old-([0-9a-f]+)")
    done: list[str] = []
    entries = sorted(os.listdir(parent))
    out_is_dir = out.is_dir() and not out.is_symlink()
    out_token = _marker_token(out) if out_is_dir else None

    def is_real_dir(p: Path) -> bool:
        return p.is_dir() and not p.is_symlink()

    # 1. rename-aside leftovers: restore the previous output or drop it once the new one is in place
    for e in entries:
        m = old_re.fullmatch(e)
        if not m or not is_real_dir(parent / e):
            continue
        if not os.path.lexists(out):
            os.rename(parent / e, out)
            _fsync_path(parent, directory=True)
            done.append(f"restored the previous output {out} from {e}")
            out_is_dir, out_token = True, None
        elif out_token is not None and out_token == m.group(1):
            _rmtree(parent / e)
            done.append(f"removed the replaced output {e}")
        else:
            _log.warning("leaving %s alone: %s exists and was not written by the run that left it", parent / e, out)
    # 2. the output holds our marker: a run was killed after its swap; drop what it swapped out
    if out_token is not None:
        for e in entries:
            m = tmp_re.fullmatch(e)
            if m and m.group(1) == out_token and is_real_dir(parent / e):
                _rmtree(parent / e)
                done.append(f"removed the replaced output {e}")
        os.unlink(out / _MARKER)
        _fsync_path(out, directory=True)
        done.append(f"completed the interrupted commit of {out}")
    # 3. marked temporaries of killed runs (and empty ones created just before the marker)
    for e in entries:
        p = parent / e
        if not tmp_re.fullmatch(e) or not os.path.lexists(p) or not is_real_dir(p):
            continue
        if (p / _MARKER).is_file():
            _rmtree(p)
            done.append(f"removed the stale temporary {e}")
        elif not os.listdir(p):
            os.rmdir(p)
            done.append(f"removed the empty temporary {e}")
        else:
            _log.warning("leaving %s alone: it lacks the opcm-ext marker", p)
    for d in done:
        _log.info("%s", d)
    return done


def _abs_out(out_path: str | os.PathLike[str]) -> Path:
    p = Path(os.path.abspath(os.fspath(out_path)))
    if p.name in ("", ".", ".."):
        raise OutputError(f"{out_path!r} is not a usable output path; name a folder or file")
    parent = p.parent
    try:
        parent = parent.resolve(strict=True)
    except (OSError, RuntimeError):
        raise OutputError(
            f"the output's parent folder {parent} does not exist; create it first or choose another path"
        ) from None
    return parent / p.name


def recover_output(out_path: str | os.PathLike[str]) -> list[str]:
    """Under the output lock, clean up after killed runs into ``out_path``; returns what was done."""
    out = _abs_out(out_path)
    fd = _acquire_lock(out)
    try:
        return _recover(out)
    finally:
        os.close(fd)


class OutputTransaction:
    """Lock, temporary sibling, fsync and atomic swap: the only way output reaches the user.

    Use as ``with OutputTransaction(out) as tx: w = tx.writer(layout, md); ...; tx.commit()``.
    Leaving the block without ``commit()`` (or by an exception) discards everything.
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str],
        *,
        kind: str = "folder",
        like_folder: str | os.PathLike[str] | CheckpointReader | None = None,
        expected_bytes: int = 0,
    ) -> None:
        if kind not in ("folder", "file"):
            raise ValueError(f"kind must be 'folder' or 'file', got {kind!r}")
        if like_folder is not None and kind != "folder":
            raise ValueError("like_folder is only meaningful for a folder output")
        try:
            expected_bytes = operator.index(expected_bytes)
        except TypeError:
            raise ValueError(f"expected_bytes must be an int, got {expected_bytes!r}") from None
        if expected_bytes < 0:
            raise ValueError(f"expected_bytes must be >= 0, got {expected_bytes}")
        self.kind = kind
        self.out_path = Path(os.path.abspath(os.fspath(out_path)))
        self.like_folder = like_folder
        self.expected_bytes = expected_bytes
        self._state = "new"
        self._lock_fd: int | None = None
        self._tmp: Path | None = None
        self._token = ""
        self._writers: list[SafetensorsWriter] = []
        self.recovered: list[str] = []

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> OutputTransaction:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if self._state == "committed":
            return False
        self.abort()
        if isinstance(exc, OSError) and _disk_full(exc):
            raise OutputError(
                f"disk full while writing {exc.filename or self.out_path}: {exc.strerror}; "
                f"nothing was changed ({self.out_path} is as before). Free some disk space and retry."
            ) from exc
        return False

    def open(self) -> None:
        """Lock, recover, check, and create the temporary (``with`` calls this)."""
        if self._state != "new":
            raise RuntimeError("an OutputTransaction can be opened once")
        out = self.out_path = _abs_out(self.out_path)
        parent = out.parent
        if not parent.is_dir():
            raise OutputError(f"the output's parent {parent} is not a folder; choose another output path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"the output's parent folder {parent} is not writable; check its permissions")
        self._lock_fd = _acquire_lock(out)
        self._state = "open"
        try:
            try:
                self.recovered = _recover(out)
            except OSError as e:
                raise OutputError(
                    f"cannot clean up after an earlier interrupted run into {out}: {e}; "
                    "check the folder's permissions"
                ) from e
            self._check_target()
            self._check_space()
            self._make_tmp()
            if self.like_folder is not None:
                self.copy_aux(self.like_folder)
        except BaseException:
            self.abort()
            raise

    def _check_target(self) -> None:
        out = self.out_path
        if os.path.islink(out):
            raise OutputError(f"{out} is a symbolic link; pass the real path of the output")
        if not os.path.lexists(out):
            return
        if self.kind == "folder":
            if not out.is_dir():
                raise OutputError(
                    f"{out} exists and is a file, but the output is a model folder; "
                    "remove it or choose another path"
                )
            entries = [e for e in os.listdir(out) if e != _MARKER]
            if entries and not any(e.endswith(".safetensors") for e in entries):
                raise OutputError(
                    f"{out} is a non-empty folder that does not hold a safetensors checkpoint; "
                    "refusing to replace it: choose a new or empty output folder"
                )
        else:
            if out.is_dir():
                raise OutputError(
                    f"{out} exists and is a folder, but the output is a single .safetensors file; "
                    "choose another path"
                )
            if not out.name.endswith(".safetensors"):
                raise OutputError(
                    f"{out} exists and is not a .safetensors file; refusing to replace it: "
                    "choose another path"
                )

    def _check_space(self) -> None:
        parent = self.out_path.parent
        try:
            free = shutil.disk_usage(parent).free
        except OSError as e:
            raise OutputError(f"cannot query the free space of {parent}: {e.strerror}") from None
        need = self.expected_bytes + self.expected_bytes // 100 + 16 * 1024 * 1024
        if free < need:
            raise OutputError(
                f"not enough free disk space for {self.out_path}: need {_fmt_bytes(need)} "
                f"({self.expected_bytes} bytes of output + 1% + 16 MiB), {_fmt_bytes(free)} "
                f"({free} bytes) free on the filesystem of {parent}; free some space or choose "
                "another output location"
            )

    def _make_tmp(self) -> None:
        out = self.out_path
        self._token = secrets.token_hex(6)
        tmp = out.parent / f".{out.name}.opcm-tmp-{os.getpid()}-{self._token}"
        try:
            os.mkdir(tmp)
            self._tmp = tmp
            with open(tmp / _MARKER, "w", encoding="utf-8") as f:
                f.write(
                    "opcm-ext temporary output of an unfinished merge; safe to delete.\n"
                    f"pid={os.getpid()}\ntoken={self._token}\n"
                )
            os.mkdir(tmp / _SCRATCH)
        except OSError as e:
            raise self._os_error(e, str(tmp)) from e

    def _os_error(self, e: OSError, where: str) -> OutputError:
        if _disk_full(e):
            return OutputError(
                f"disk full while writing {where}: {e.strerror}; nothing was changed "
                f"({self.out_path} is as before). Free some disk space and retry."
            )
        return OutputError(f"cannot write {where}: {e.strerror or e}; nothing was changed")

    def _require_open(self) -> Path:
        if self._state != "open" or self._tmp is None:
            raise RuntimeError(f"the output transaction for {self.out_path} is not open ({self._state})")
        return self._tmp

    # -- what callers use ------------------------------------------------------------
    @property
    def out(self) -> Path:
        """The output path (absolute, parent resolved)."""
        return self.out_path

    @property
    def tmp(self) -> Path:
        """The temporary folder (for kind='file' it holds the file as ``tmp / out.name``)."""
        return self._require_open()

    @property
    def scratch_dir(self) -> Path:
        """A folder inside the temporary for method scratch files; deleted before the swap."""
        return self._require_open() / _SCRATCH

    def scratch_path(self, name: str) -> Path:
        """A path for a scratch file called ``name`` inside ``scratch_dir``."""
        return self.scratch_dir / _plain_name(name, "scratch file name")

    def writer(self, layout: LayoutSpec, metadata: dict[str, str] | None = None) -> SafetensorsWriter:
        """A SafetensorsWriter into the temporary (kind='file': one shard, named like the output)."""
        tmp = self._require_open()
        if self.kind == "file":
            if len(layout) != 1:
                raise ValueError(f"a single-file output takes a one-shard layout, got {len(layout)} shards")
            layout = [(self.out_path.name, layout[0][1])]
        w = SafetensorsWriter(
            tmp,
            layout,
            metadata,
            _disk_full_note=(
                f"; nothing was changed ({self.out_path} is as before, the temporary output is "
                "removed). Free some disk space and retry."
            ),
        )
        self._writers.append(w)
        return w

    def copy_aux(self, like_folder: str | os.PathLike[str] | CheckpointReader) -> list[str]:
        """Copy the non-weight top-level files (config, tokenizer, README, ...) of a model folder."""
        tmp = self._require_open()
        if self.kind != "folder":
            raise ValueError("copy_aux is only meaningful for a folder output")
        if isinstance(like_folder, CheckpointReader):
            src = like_folder.folder
            if src is None and like_folder.config_path is not None:
                src = like_folder.config_path.parent
            if src is None:
                return []
        else:
            src = Path(like_folder)
        try:
            names = sorted(os.listdir(src))
        except OSError as e:
            raise OutputError(f"cannot list {src} to copy its config and tokenizer files: {e.strerror}") from None
        copied = []
        for n in names:
            if n.startswith(".") or _is_weight_file(n):
                continue
            s = src / n
            if not s.is_file() or os.path.lexists(tmp / n):
                continue
            try:
                shutil.copyfile(s, tmp / n)
            except OSError as e:
                raise self._os_error(e, str(tmp / n)) from e
            copied.append(n)
        return copied

    def commit(self) -> None:
        """Finish the writers, fsync, and swap the temporary into place atomically."""
        tmp = self._require_open()
        out = self.out_path
        try:
            for w in self._writers:
                w.close()
            shutil.rmtree(tmp / _SCRATCH, ignore_errors=True)
            self._check_target()
            if self.kind == "folder":
                if not any(n.endswith(".safetensors") for n in os.listdir(tmp)):
                    raise RuntimeError("commit() without any safetensors written into the output")
            elif not (tmp / out.name).is_file():
                raise RuntimeError("commit() before the output file was written")
            for root, _dirs, files in os.walk(tmp):
                for f in files:
                    _fsync_path(Path(root) / f)
            _faults.point("commit.files_synced")
            for root, dirs, _files in os.walk(tmp, topdown=False):
                for d in dirs:
                    _fsync_path(Path(root) / d, directory=True)
            _fsync_path(tmp, directory=True)
            _faults.point("commit.dir_synced")
        except OSError as e:
            self.abort()
            raise self._os_error(e, getattr(e, "filename", None) or str(tmp)) from e
        except BaseException:
            self.abort()
            raise
        if self.kind == "file":
            self._swap_file(tmp, out)
        else:
            self._swap_folder(tmp, out)
        self._state = "committed"
        self._release_lock()

    def _swap_file(self, tmp: Path, out: Path) -> None:
        _faults.point("commit.before_swap")
        try:
            os.replace(tmp / out.name, out)
        except OSError as e:
            self.abort()
            raise self._os_error(e, str(out)) from e
        self._after_swap_cleanup(out.parent, tmp, marker_in=None)

    def _swap_folder(self, tmp: Path, out: Path) -> None:
        parent = out.parent
        _faults.point("commit.before_swap")
        old: Path | None = None
        try:
            if os.path.lexists(out):
                try:
                    _rename_exchange(tmp, out)
                    old = tmp  # the tmp path now holds the previous output
                except _NoExchange:
                    aside = parent / f".{out.name}.opcm-old-{self._token}"
                    os.rename(out, aside)
                    _faults.point("commit.renamed_aside")
                    try:
                        os.rename(tmp, out)
                    except BaseException:
                        os.rename(aside, out)
                        raise
                    old = aside
            else:
                os.rename(tmp, out)
        except OSError as e:
            self.abort()
            raise self._os_error(e, str(out)) from e
        self._after_swap_cleanup(parent, old, marker_in=out)

    def _after_swap_cleanup(self, parent: Path, old: Path | None, marker_in: Path | None) -> None:
        # the swap is done: from here on nothing may undo it; problems are only warnings
        try:
            _fsync_path(parent, directory=True)
        except OSError as e:  # pragma: no cover - fsync of a directory rarely fails
            _log.warning("fsync of %s failed after the swap: %s", parent, e)
        _faults.point("commit.after_swap")
        if old is not None:
            try:
                _rmtree(old)
            except OSError as e:
                _log.warning("could not remove %s after the swap: %s; the next run removes it", old, e)
        self._tmp = None
        _faults.point("commit.old_deleted")
        if marker_in is not None:
            try:
                os.unlink(marker_in / _MARKER)
                _fsync_path(marker_in, directory=True)
            except OSError as e:
                _log.warning("could not remove %s: %s; the next run removes it", marker_in / _MARKER, e)

    def abort(self) -> None:
        """Discard the temporary and release the lock; the output is untouched. Idempotent."""
        if self._state in ("aborted", "committed"):
            return
        for w in self._writers:
            try:
                w.abort()
            except Exception:  # pragma: no cover - best effort
                pass
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._state = "aborted"
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __repr__(self) -> str:
        return f"OutputTransaction({str(self.out_path)!r}, kind={self.kind!r}, state={self._state!r})"
