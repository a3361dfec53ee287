"""fp32 tensors kept between the passes of a step (OPCM's Σ): in RAM within a limit, else in one flat file.

``ScratchStore`` decides once, at creation, where each tensor lives: in the order of
``shapes``, tensors stay in RAM while their total stays within ``memory_limit`` bytes; the
rest get fixed offsets in one file (sparse until written). ``file_part()`` describes that
file, picklable, so another process can ``put``/``get`` its tensors through ``ScratchFile``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, OpcmError
from ._fs import O_CLOEXEC, block, pread_block, pwrite_block, tensor_bytes

__all__ = ["ScratchStore", "ScratchFile", "ScratchPart"]

Span = tuple[int, int]
_F32 = torch.float32


@dataclass(frozen=True)
class ScratchPart:
    """A scratch file and where each of its tensors lies: key -> (byte offset, shape)."""

    path: str
    slots: dict[str, tuple[int, tuple[int, ...]]]


def _fp32(key: str, tensor: torch.Tensor, want: tuple[int, ...], copy: bool) -> torch.Tensor:
    data = tensor.detach().to("cpu", _F32, copy=copy).contiguous()
    if tuple(data.shape) != want:
        raise ValueError(f"scratch {key}: shape {tuple(data.shape)} != {want}")
    return data


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class ScratchFile:
    """The file half of a scratch store: put/get fp32 tensors (whole, row or column blocks) with pread/pwrite."""

    def __init__(self, part: ScratchPart, *, create: bool = False) -> None:
        self.part = part
        self.path = Path(part.path)
        flags = os.O_RDWR | O_CLOEXEC | ((os.O_CREAT | os.O_TRUNC) if create else 0)
        self._fd = os.open(self.path, flags, 0o600)

    def _slot(self, key: str) -> tuple[int, tuple[int, ...]]:
        if self._fd < 0:
            raise ValueError(f"scratch {key}: the scratch file {self.path} is closed")
        try:
            return self.part.slots[key]
        except KeyError:
            raise ValueError(f"scratch {key!r} has no place in the scratch file {self.path}") from None

    def put(self, key: str, tensor: torch.Tensor, *, rows: Span | None = None, cols: Span | None = None) -> None:
        """Store ``tensor`` as fp32: the whole tensor, rows [r0, r1), or (2-D) columns [c0, c1)."""
        off, shape = self._slot(key)
        blk = block(key, shape, 4, rows, cols)
        data = _fp32(key, tensor, blk.shape, copy=False)
        pwrite_block(self._fd, tensor_bytes(data), off, blk)

    def get(
        self, key: str, *, rows: Span | None = None, cols: Span | None = None, pin: bool = False
    ) -> torch.Tensor:
        """A new fp32 CPU tensor (pinned if asked) with the stored tensor or block."""
        off, shape = self._slot(key)
        blk = block(key, shape, 4, rows, cols)
        out = torch.empty(blk.shape, dtype=_F32, pin_memory=pin)
        try:
            pread_block(self._fd, memoryview(out.numpy()).cast("B"), off, blk, self.path, f"scratch {key!r}")
        except CheckpointError:
            raise OpcmError(f"scratch file {self.path} ended early at {key}") from None
        return out

    def close(self) -> None:
        """Close the file (it stays on disk)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ScratchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScratchStore:
    """fp32 tensors between passes: in RAM within ``memory_limit`` bytes (0: never), the rest in one file."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        shapes: dict[str, tuple[int, ...]],
        *,
        memory_limit: int = 0,
        name: str = "scratch.f32",
    ) -> None:
        if memory_limit < 0:
            raise ValueError(f"memory_limit must be >= 0 bytes, got {memory_limit}")
        self.shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        self.memory_limit = memory_limit
        kept = 0
        self._in_ram: set[str] = set()
        for k, s in self.shapes.items():  # the caller's order is the priority for RAM
            nb = 4 * _numel(s)
            if memory_limit and kept + nb <= memory_limit:
                self._in_ram.add(k)
                kept += nb
        slots: dict[str, tuple[int, tuple[int, ...]]] = {}
        off = 0
        for k in sorted(set(self.shapes) - self._in_ram):
            slots[k] = (off, self.shapes[k])
            off += 4 * _numel(self.shapes[k])
        self.nbytes = off  # the file's size once every tensor kept there is stored
        self.path = Path(directory) / name
        self._file = ScratchFile(ScratchPart(str(self.path), slots), create=True)
        self._ram: dict[str, torch.Tensor] = {}

    @property
    def resident_bytes(self) -> int:
        """Bytes of tensors held in RAM now."""
        return sum(4 * t.numel() for t in self._ram.values())

    def in_memory(self, key: str) -> bool:
        """Whether ``key`` is kept in RAM (else in the file)."""
        self._shape(key)
        return key in self._in_ram

    def file_part(self) -> ScratchPart:
        """The file and the offsets of the tensors that live in it, for ``ScratchFile`` in another process."""
        return self._file.part

    def _shape(self, key: str) -> tuple[int, ...]:
        try:
            return self.shapes[key]
        except KeyError:
            raise ValueError(f"scratch {key!r} is not one of this store's tensors") from None

    @staticmethod
    def _view(t: torch.Tensor, rows: Span | None, cols: Span | None) -> torch.Tensor:
        if rows is not None:
            t = t[rows[0] : rows[1]]
        return t if cols is None else t[:, cols[0] : cols[1]]

    def put(self, key: str, tensor: torch.Tensor, *, rows: Span | None = None, cols: Span | None = None) -> None:
        """Store ``tensor`` as fp32: the whole tensor, rows [r0, r1), or (2-D) columns [c0, c1)."""
        shape = self._shape(key)
        if key not in self._in_ram:
            self._file.put(key, tensor, rows=rows, cols=cols)
            return
        blk = block(key, shape, 4, rows, cols)
        whole = rows is None and cols is None
        data = _fp32(key, tensor, blk.shape, copy=whole)
        if whole:
            self._ram[key] = data
            return
        dst = self._ram.get(key)
        if dst is None:
            dst = self._ram[key] = torch.zeros(shape, dtype=_F32)
        self._view(dst, rows, cols).copy_(data)

    def get(
        self, key: str, *, rows: Span | None = None, cols: Span | None = None, pin: bool = False
    ) -> torch.Tensor:
        """The stored fp32 CPU tensor or block (from RAM: the kept tensor or a view of it, not a copy)."""
        shape = self._shape(key)
        if key not in self._in_ram:
            return self._file.get(key, rows=rows, cols=cols, pin=pin)
        block(key, shape, 4, rows, cols)  # validates the block
        kept = self._ram.get(key)
        if kept is None:
            raise OpcmError(f"scratch {key} was read before it was stored")
        out = self._view(kept, rows, cols)
        if pin:
            return out.pin_memory()
        return out if out.is_contiguous() else out.contiguous()

    def close(self) -> None:
        """Drop the tensors in RAM and close the file (it stays on disk, inside the caller's temporary folder)."""
        self._ram.clear()
        self._file.close()

    def __enter__(self) -> ScratchStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
