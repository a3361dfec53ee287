"""Reading safetensors checkpoints: a Hugging Face folder, a bare file, or a shard index.

Validated up front by our own header parser (_header.py), then read tensor by tensor, row
block by row block or column block by column block with ``pread``: no mmap, so no RSS
inflation and no SIGBUS on a file truncated under us.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch

from .._lightio import FileIdentity
from .._lightio import file_identity as _identity
from ..errors import CheckpointError
from ._fs import O_CLOEXEC, Block, block, close_all, pread_block, pread_exact
from ._header import (
    MAX_INDEX_BYTES,
    PICKLE_SUFFIXES,
    DuplicateKey,
    Shard,
    TensorInfo,
    check_shard_name,
    is_int,
    no_duplicate_keys,
    parse_shard,
    refuse_pickle,
    resolve_folder,
)

__all__ = ["CheckpointReader", "TensorInfo"]



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
        self._shards: list[Shard] = []
        self._infos: dict[str, TensorInfo] = {}
        self._fds: list[int] = []
        self._index_id: tuple[str, int, int, int, int] | None = None
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, close_all, self._fds)
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
            kind, target = resolve_folder(p)
        elif p.name.endswith(PICKLE_SUFFIXES):
            raise refuse_pickle(p)
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
                    kind2, target2 = resolve_folder(p.parent)
                except CheckpointError:
                    kind2, target2 = "", None
                if kind2 == "file" and target2 is not None and target2.name == p.name:
                    self.config_path = cfg

    def _open_fd(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist") from None
        except IsADirectoryError:
            raise CheckpointError(f"{path} is a folder, expected a .safetensors file") from None
        except OSError as e:
            raise CheckpointError(f"cannot open {path}: {e.strerror}") from None
        self._fds.append(fd)
        return fd

    def _add_shard(self, path: Path) -> Shard:
        fd = self._open_fd(path)
        try:
            shard = parse_shard(path, fd)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
        self._shards.append(shard)
        return shard

    def _open_index(self, index: Path) -> None:
        folder = index.parent
        try:
            with open(index, "rb") as f:
                raw = f.read(MAX_INDEX_BYTES + 1)
                self._index_id = _identity(index, os.fstat(f.fileno()))
        except FileNotFoundError:
            raise CheckpointError(f"{index} does not exist") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {index}: {e.strerror}") from None
        if len(raw) > MAX_INDEX_BYTES:
            raise CheckpointError(f"{index} is larger than {MAX_INDEX_BYTES} bytes; not a shard index")
        try:
            doc = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
        except DuplicateKey as e:
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
            shard_of[key] = check_shard_name(shard_name, index)
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
                more = ", ..." if len(items) > 5 else ""
                problems.append(f"{len(items)} tensor(s) {label}: {', '.join(items[:5])}{more}")
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

    def file_identity(self) -> tuple[FileIdentity, ...]:
        """(realpath, st_dev, st_ino, st_size, st_mtime_ns) of each shard this reader reads, then the index."""
        with self._cond:
            if self._closed:
                raise ValueError(f"file_identity() of a closed CheckpointReader ({self.path})")
            ids = [_identity(s.path, os.fstat(s.fd)) for s in self._shards]
        return tuple(ids) + ((self._index_id,) if self._index_id is not None else ())

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

    def _read_block(self, info: TensorInfo, blk: Block, out: torch.Tensor | None) -> torch.Tensor:
        """The block's bytes in ``out`` (or a new buffer), viewed with the tensor's dtype and the block's shape."""
        n = blk.nbytes
        if out is None:
            buf = torch.empty(n, dtype=torch.uint8)
        else:
            if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.device.type != "cpu":
                raise ValueError("out must be a CPU torch.uint8 tensor")
            if not out.is_contiguous():
                raise ValueError("out must be contiguous")
            if out.numel() < n:
                raise ValueError(f"out holds {out.numel()} bytes, {info.name!r} needs {n}")
            buf = out.view(-1)[:n]
        if n:
            fd = self._fd(info)
            try:
                pread_block(fd, memoryview(buf.numpy()), info.offset, blk, info.file, f"tensor {info.name!r}")
            except OSError as e:
                raise CheckpointError(f"cannot read tensor {info.name!r} from {info.file}: {e.strerror}") from None
            finally:
                self._release()
        try:
            return buf.view(info.dtype).view(blk.shape)
        except RuntimeError as e:
            raise ValueError(f"out cannot hold {info.dtype_str} data at its offset: {e}") from None

    def read(
        self, name: str, out: torch.Tensor | None = None, *, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The tensor as stored (dtype, shape) on the CPU, or rows [r0, r1) of it; into ``out`` (uint8) if given."""
        info = self.info(name)
        return self._read_block(info, block(name, info.shape, info.dtype.itemsize, rows), out)

    def read_columns(
        self, name: str, c0: int, c1: int, out: torch.Tensor | None = None, *, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Columns [c0, c1) of a 2-D tensor (of rows [r0, r1) if given) as an [m, c1-c0] tensor: one pread per row."""
        info = self.info(name)
        return self._read_block(info, block(name, info.shape, info.dtype.itemsize, rows, (c0, c1)), out)

    def _check_range(self, info: TensorInfo, start: Any, length: Any) -> None:
        if not (is_int(start) and is_int(length)) or start < 0 or length < 0 or start + length > info.nbytes:
            raise ValueError(
                f"byte range [{start}, {start}+{length}) is outside tensor {info.name!r} ({info.nbytes} bytes)"
            )

    def read_bytes(self, name: str, start: int, length: int) -> bytes:
        """``length`` raw bytes of tensor ``name`` starting ``start`` bytes into its data."""
        info = self.info(name)
        self._check_range(info, start, length)
        if length == 0:
            return b""
        fd = self._fd(info)
        try:
            return pread_exact(fd, length, info.offset + start, info.file, f"tensor {name!r}")
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e.strerror}") from None
        finally:
            self._release()

    def read_into(self, name: str, start: int, out: memoryview | bytearray | torch.Tensor) -> None:
        """Fill ``out`` (a writable buffer or a contiguous CPU uint8 tensor) with tensor bytes from ``start`` on."""
        info = self.info(name)
        if isinstance(out, torch.Tensor):
            if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous():
                raise ValueError("out must be a contiguous CPU torch.uint8 tensor")
            mv = memoryview(out.view(-1).numpy())
        else:
            mv = memoryview(out).cast("B")
        self._check_range(info, start, len(mv))
        if len(mv):
            blk = Block((len(mv),), (0, 1), (0, 1), start, len(mv), len(mv), 1)
            fd = self._fd(info)
            try:
                pread_block(fd, mv, info.offset, blk, info.file, f"tensor {name!r}")
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

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # another process (a Ray worker) re-opens the checkpoint from its path
        return (type(self), (str(self.path),))

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, tensors={len(self._keys)}, shards={len(self._shards)})"
