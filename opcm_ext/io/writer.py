"""Writing safetensors: headers first, then tensor bytes at fixed offsets, in any order, from anywhere.

``SafetensorsWriter`` lays out every shard at creation (headers written, offsets fixed), so
tensors (whole, as row blocks, or as column blocks of a 2-D tensor) can be written with
``pwrite`` in any order, from any thread, and, through ``targets()`` and ``write_into``,
from another process. ``close()`` checks that every tensor was covered exactly once.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import _faults
from ..errors import OutputError
from ._fs import (
    O_CLOEXEC,
    Block,
    block,
    close_all,
    disk_full,
    grid,
    plain_name,
    pwrite_all,
    pwrite_block,
    tensor_bytes,
)
from .dtypes import DTYPES, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, dtype_to_str

__all__ = ["SafetensorsWriter", "WriteTargets", "TensorTarget", "write_into", "LayoutSpec"]

LayoutSpec = Sequence[tuple[str, Sequence[tuple[str, "torch.dtype | str", Sequence[int]]]]]
"""[(shard file name, [(tensor name, dtype, shape), ...]), ...] in file order."""

Span = tuple[int, int]


@dataclass(frozen=True)
class TensorTarget:
    """Where one tensor's bytes go: the shard (index into ``WriteTargets.files``), data offset, dtype, shape."""

    file: int
    offset: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WriteTargets:
    """A picklable description of a writer's files, so another process can ``write_into`` them."""

    files: tuple[str, ...]
    tensors: dict[str, TensorTarget]
    note: str = ""


def _io_error(path: Path | str, exc: OSError, note: str) -> OutputError:
    if disk_full(exc):
        return OutputError(f"disk full while writing {path}: {exc.strerror}{note}")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}{note}")


def _describe(blk: Block, shape: tuple[int, ...]) -> str:
    n_rows, n_cols = grid(shape)
    parts = []
    if blk.rows != (0, n_rows):
        parts.append(f"rows [{blk.rows[0]}, {blk.rows[1]})")
    if blk.cols != (0, n_cols):
        parts.append(f"columns [{blk.cols[0]}, {blk.cols[1]})")
    return " x ".join(parts) or "the whole tensor"


def _payload(name: str, tensor: Any, dtype: torch.dtype, shape: tuple[int, ...], blk: Block) -> memoryview:
    """The bytes of ``tensor`` once it is checked to be the block ``blk`` of a tensor of ``dtype``/``shape``."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"tensor {name!r}: must be on the CPU, is on {tensor.device}")
    if tensor.dtype != dtype:
        raise ValueError(f"tensor {name!r}: dtype {tensor.dtype}, the layout declares {dtype}")
    if tuple(tensor.shape) != blk.shape:
        if blk.shape == shape:
            raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)}, the layout declares {shape}")
        raise ValueError(
            f"tensor {name!r}: shape {tuple(tensor.shape)}, but {_describe(blk, shape)} of the "
            f"layout's {shape} has shape {blk.shape}"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"tensor {name!r}: must be contiguous (call .contiguous())")
    return tensor_bytes(tensor)


class _Coverage:
    """Which blocks of one tensor are reserved and written; blocks may not overlap."""

    __slots__ = ("shape", "cells", "blocks", "done", "done_bytes")

    def __init__(self, shape: tuple[int, ...]) -> None:
        n_rows, n_cols = grid(shape)
        self.shape = shape
        self.cells = n_rows * n_cols
        self.blocks: list[Block] = []
        self.done = 0  # cells
        self.done_bytes = 0

    def reserve(self, name: str, blk: Block) -> None:
        (r0, r1), (c0, c1) = blk.rows, blk.cols
        for old in self.blocks:
            if r0 < old.rows[1] and old.rows[0] < r1 and c0 < old.cols[1] and old.cols[0] < c1:
                if old.rows == blk.rows and old.cols == blk.cols and blk.shape == self.shape:
                    raise ValueError(f"tensor {name!r} written twice")
                raise ValueError(
                    f"tensor {name!r}: {_describe(blk, self.shape)} overlaps {_describe(old, self.shape)}, "
                    "written before (part of it would be written twice); blocks must tile the tensor"
                )
        self.blocks.append(blk)

    def finish(self, blk: Block) -> None:
        self.done += (blk.rows[1] - blk.rows[0]) * (blk.cols[1] - blk.cols[0])
        self.done_bytes += blk.nbytes


class SafetensorsWriter:
    """Writes safetensors shards: headers at creation, tensor bytes in any order with pwrite."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        layout: LayoutSpec,
        metadata: dict[str, str] | None = None,
        *,
        index_name: str = SAFE_WEIGHTS_INDEX_NAME,
        index: bool | None = None,
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
        self._targets: dict[str, TensorTarget] = {}
        self._cover: dict[str, _Coverage] = {}
        self._paths: list[Path] = []
        self._fds: list[int] = []
        self._sizes: list[int] = []
        self._closed = False
        self._index: Path | None = None
        self._created: list[Path] = []
        headers = self._lay_out(layout, md)
        # An index when there are several shards, or one not called model.safetensors (from_pretrained
        # finds it only through an index); index=False: never (a bare .safetensors output).
        if index is None:
            index = len(self._paths) > 1 or (len(self._paths) == 1 and self._paths[0].name != SAFE_WEIGHTS_NAME)
        if index:
            self._index = self.directory / plain_name(index_name, "index file name")
        if not self._paths:
            raise ValueError("the layout names no shard file")
        try:
            for path, header in zip(self._paths, headers):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o644)
                except FileExistsError:
                    raise ValueError(f"{path} already exists; the writer only creates new files") from None
                self._fds.append(fd)
                self._created.append(path)
                self._pwrite_all(fd, memoryview(header), 0, path)
                _faults.point("writer.header")
        except BaseException:
            self._discard()
            raise

    def _lay_out(self, layout: LayoutSpec, md: dict[str, str]) -> list[bytes]:
        """Check the layout, fix every tensor's offset; returns each shard's header bytes."""
        headers: list[bytes] = []
        shard_names: list[str] = []
        for si, (shard_name, entries) in enumerate(layout):
            plain_name(shard_name, "shard file name")
            if shard_name in shard_names:
                raise ValueError(f"shard file {shard_name!r} appears twice in the layout")
            shard_names.append(shard_name)
            header: dict[str, Any] = {"__metadata__": md}
            pos = 0
            placed: list[tuple[str, str, tuple[int, ...], int]] = []
            for entry in entries:
                name, dtype, shape = entry
                if not isinstance(name, str) or name == "__metadata__":
                    raise ValueError(f"tensor name {name!r} is not allowed")
                if name in self._targets or any(p[0] == name for p in placed):
                    raise ValueError(f"tensor {name!r} appears twice in the layout")
                code = dtype_to_str(dtype)
                shp = tuple(int(d) for d in shape)
                if any(d < 0 for d in shp):
                    raise ValueError(f"tensor {name!r}: negative dimension in shape {shp}")
                nb = DTYPES[code].itemsize
                for d in shp:
                    nb *= d
                placed.append((name, code, shp, pos))
                header[name] = {"dtype": code, "shape": list(shp), "data_offsets": [pos, pos + nb]}
                pos += nb
            hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            hb += b" " * (-len(hb) % 8)
            headers.append(struct.pack("<Q", len(hb)) + hb)
            data_start = 8 + len(hb)
            for name, code, shp, begin in placed:
                self._targets[name] = TensorTarget(si, data_start + begin, code, shp)
                self._cover[name] = _Coverage(shp)
            self._sizes.append(data_start + pos)
            self._paths.append(self.directory / shard_name)
        return headers

    @property
    def files(self) -> list[Path]:
        """The shard files (and the index, when there is one)."""
        return self._paths + ([self._index] if self._index is not None else [])

    @property
    def total_bytes(self) -> int:
        """Sum of the tensors' byte sizes."""
        return sum(self._size_of(t) for t in self._targets.values())

    @staticmethod
    def _size_of(t: TensorTarget) -> int:
        n = DTYPES[t.dtype].itemsize
        for d in t.shape:
            n *= d
        return n

    def targets(self) -> WriteTargets:
        """Where every tensor goes, picklable: hand it to another process for ``write_into``."""
        return WriteTargets(tuple(str(p) for p in self._paths), dict(self._targets), self._note)

    def _pwrite_all(self, fd: int, mv: memoryview, offset: int, path: Path) -> None:
        try:
            pwrite_all(fd, mv, offset)
        except OSError as e:
            raise _io_error(path, e, self._note) from e

    def _locate(self, name: str, rows: Span | None, cols: Span | None) -> tuple[TensorTarget, Block]:
        target = self._targets.get(name)
        if target is None:
            raise ValueError(f"tensor {name!r} is not in this writer's layout")
        return target, block(name, target.shape, DTYPES[target.dtype].itemsize, rows, cols)

    def _claim(self, name: str, blk: Block, what: str) -> None:
        with self._lock:
            if self._closed:
                raise ValueError(f"{what}({name!r}) on a closed writer")
            self._cover[name].reserve(name, blk)

    def _finish(self, name: str, blk: Block) -> None:
        with self._lock:
            self._cover[name].finish(blk)

    def write(
        self, name: str, tensor: torch.Tensor, *, rows: Span | None = None, cols: Span | None = None
    ) -> None:
        """Write a tensor, rows [r0, r1) of it, or (2-D) columns [c0, c1), at its place; each part exactly once."""
        target, blk = self._locate(name, rows, cols)
        mv = _payload(name, tensor, DTYPES[target.dtype], target.shape, blk)
        self._claim(name, blk, "write")
        if blk.nbytes:
            path = self._paths[target.file]
            try:
                pwrite_block(self._fds[target.file], mv, target.offset, blk)
            except OSError as e:
                raise _io_error(path, e, self._note) from e
        self._finish(name, blk)
        _faults.point("writer.tensor")

    def mark_written(self, name: str, rows: Span | None = None, cols: Span | None = None) -> None:
        """Record that another process wrote this tensor (or block) with ``write_into``."""
        _, blk = self._locate(name, rows, cols)
        self._claim(name, blk, "mark_written")
        self._finish(name, blk)

    def _coverage_problems(self) -> str | None:
        never = [n for n, c in self._cover.items() if not c.blocks]
        if never:
            return (
                f"{len(never)} tensor(s) of the layout were never written "
                f"({', '.join(never[:5])}{', ...' if len(never) > 5 else ''})"
            )
        partial = [
            f"{n}: {c.done_bytes} of {self._size_of(self._targets[n])} bytes"
            for n, c in self._cover.items()
            if c.done != c.cells
        ]
        if partial:
            return (
                f"{len(partial)} tensor(s) of the layout were only partly written, their blocks leave a gap "
                f"or a write failed ({'; '.join(partial[:5])}{'; ...' if len(partial) > 5 else ''})"
            )
        return None

    def close(self) -> None:
        """Check every tensor was written once, fsync, close; write the index if sharded."""
        with self._lock:
            if self._closed:
                return
            problem = self._coverage_problems()
            if problem:
                raise RuntimeError(problem)
            self._closed = True
        try:
            for fd, path, size in zip(self._fds, self._paths, self._sizes):
                try:
                    got = os.fstat(fd).st_size
                    if got != size:
                        raise RuntimeError(f"{path} is {got} bytes, expected {size}")
                    os.fsync(fd)
                except OSError as e:
                    raise _io_error(path, e, self._note) from e
            close_all(self._fds)
            if self._index is not None:
                self._write_index(self._index)
        except BaseException:
            close_all(self._fds)
            raise

    def _write_index(self, index: Path) -> None:
        doc = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {n: self._paths[self._targets[n].file].name for n in sorted(self._targets)},
        }
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        try:
            fd = os.open(index, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o644)
            self._created.append(index)
            try:
                self._pwrite_all(fd, memoryview(data), 0, index)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _io_error(index, e, self._note) from e

    def _discard(self) -> None:
        close_all(self._fds)
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


def write_into(
    targets: WriteTargets, name: str, tensor: torch.Tensor, *, rows: Span | None = None, cols: Span | None = None
) -> None:
    """From any process: pwrite a tensor (or a block) into a writer's files; the driver then calls mark_written."""
    target = targets.tensors.get(name)
    if target is None:
        raise ValueError(f"tensor {name!r} is not in the writer's layout")
    dtype = DTYPES[target.dtype]
    blk = block(name, target.shape, dtype.itemsize, rows, cols)
    mv = _payload(name, tensor, dtype, target.shape, blk)
    if not blk.nbytes:
        return
    path = targets.files[target.file]
    try:
        fd = os.open(path, os.O_WRONLY | O_CLOEXEC)  # the writer created it: no O_CREAT, no truncation
        try:
            pwrite_block(fd, mv, target.offset, blk)
        finally:
            os.close(fd)
    except OSError as e:
        raise _io_error(path, e, targets.note) from e
