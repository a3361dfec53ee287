"""File primitives shared by the reader, the writer, the scratch store and the transaction.

pread/pwrite loops that finish short transfers, fsync of a path, and the arithmetic of a
block of a tensor (a row range, a column range of a 2-D tensor, or both) as runs of bytes.
"""

from __future__ import annotations

import errno
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["fsync_path"]

CORRUPT_FIX = (
    "the file is corrupt, truncated or not a safetensors file: re-download it or re-save "
    "the model with save_pretrained(..., safe_serialization=True)"
)
_HAVE_PREADV = hasattr(os, "preadv")
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_path(path: Path | str, directory: bool = False) -> None:
    """fsync a file (or, with ``directory=True``, a folder's entries) by its path."""
    flags = os.O_RDONLY | O_CLOEXEC
    if directory:
        flags |= getattr(os, "O_DIRECTORY", 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def close_all(fds: list[int]) -> None:
    """Close and remove every descriptor in ``fds``, ignoring errors (cleanup paths)."""
    while fds:
        fd = fds.pop()
        try:
            os.close(fd)
        except OSError:
            pass


def disk_full(exc: OSError) -> bool:
    """Whether an OSError means the disk (or the user's quota) is full."""
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def plain_name(name: Any, what: str) -> str:
    """``name`` if it is a plain file name (no folder part, not '.' or '..'), else ValueError."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
    ):
        raise ValueError(f"{what} {name!r} must be a plain file name")
    return name


def _truncated(path: Path, what: str, n: int, offset: int, done: int) -> CheckpointError:
    return CheckpointError(
        f"{path}: truncated while reading {what} (wanted {n} bytes at offset {offset}, "
        f"the file ends after {offset + done}); {CORRUPT_FIX}"
    )


def pread_exact(fd: int, n: int, offset: int, path: Path, what: str) -> bytes:
    """Read exactly ``n`` bytes at ``offset``; a short read at EOF is a truncation."""
    chunks = []
    done = 0
    while done < n:
        b = os.pread(fd, min(n - done, 1 << 30), offset + done)
        if not b:
            raise _truncated(path, what, n, offset, done)
        chunks.append(b)
        done += len(b)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def pread_into(fd: int, mv: memoryview, offset: int, path: Path, what: str) -> None:
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
            raise _truncated(path, what, n, offset, done)
        done += k


def pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    """Write all of ``mv`` at ``offset``, looping on short writes (OSError on failure)."""
    done, n = 0, len(mv)
    while done < n:
        k = os.pwrite(fd, mv[done:], offset + done)
        if k <= 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        done += k


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view (no copy) of a contiguous CPU tensor."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------
# blocks of a tensor
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A block of a tensor and where its bytes lie: ``count`` runs of ``width`` bytes, ``stride`` apart.

    ``rows``/``cols`` are the block's extent in the tensor's (rows, columns) index space, where a
    tensor that is not 2-D has one column per row, a 0-d tensor one row, and an empty dimension
    counts as one (so every tensor, even an empty one, is one cell to cover).
    """

    shape: tuple[int, ...]
    rows: tuple[int, int]
    cols: tuple[int, int]
    start: int
    width: int
    stride: int
    count: int

    @property
    def nbytes(self) -> int:
        """Bytes the block holds."""
        return self.width * self.count


def _index(x: Any) -> int:
    if isinstance(x, bool):
        raise TypeError("a bool is not an index")
    return operator.index(x)


def _span(rng: Any, size: int, what: str, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    try:
        a, b = (_index(v) for v in rng)
    except (TypeError, ValueError):
        a, b = -1, -1
    if not 0 <= a < b <= size:
        raise ValueError(
            f"{what}={rng!r} for tensor {name!r} of shape {shape}: need a pair of integers "
            f"(start, stop) with 0 <= start < stop <= {size}"
        )
    return a, b


def grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, columns) cell grid of a tensor used for coverage (see Block)."""
    rows = shape[0] if shape else 1
    cols = shape[1] if len(shape) == 2 else 1
    return max(rows, 1), max(cols, 1)


def block(name: str, shape: tuple[int, ...], itemsize: int, rows: Any = None, cols: Any = None) -> Block:
    """The Block for ``rows=(r0, r1)`` and/or ``cols=(c0, c1)`` (2-D only) of a tensor; None means all."""
    shape = tuple(shape)
    n_rows, n_cols = grid(shape)
    row_items = 1
    for d in shape[1:]:
        row_items *= d
    row_bytes = row_items * itemsize
    total = (shape[0] if shape else 1) * row_bytes
    r0, r1 = 0, n_rows  # coverage rows
    rr0, rr1 = 0, (shape[0] if shape else 1)  # rows of data
    if rows is not None:
        if not shape:
            raise ValueError(f"rows={rows!r} for tensor {name!r}: it is 0-d (a scalar); read or write it whole")
        r0, r1 = rr0, rr1 = _span(rows, shape[0], "rows", name, shape)
    if cols is None:
        if rows is None:
            return Block(shape, (0, n_rows), (0, n_cols), 0, total, total, 1)
        bshape = (r1 - r0, *shape[1:])
        return Block(bshape, (r0, r1), (0, n_cols), r0 * row_bytes, (r1 - r0) * row_bytes, row_bytes, 1)
    if len(shape) != 2:
        raise ValueError(f"cols={cols!r} for tensor {name!r} of shape {shape}: column blocks need a 2-D tensor")
    c0, c1 = _span(cols, shape[1], "cols", name, shape)
    m = rr1 - rr0
    return Block((m, c1 - c0), (r0, r1), (c0, c1), rr0 * row_bytes + c0 * itemsize, (c1 - c0) * itemsize, row_bytes, m)


def pread_block(fd: int, mv: memoryview, base: int, blk: Block, path: Path, what: str) -> None:
    """Fill ``mv`` (``blk.nbytes``) with the block of the tensor whose data starts at ``base``: one pread per run."""
    w = blk.width
    for i in range(blk.count):
        pread_into(fd, mv[i * w : (i + 1) * w], base + blk.start + i * blk.stride, path, what)


def pwrite_block(fd: int, mv: memoryview, base: int, blk: Block) -> None:
    """Write ``mv`` (``blk.nbytes``) as the block of the tensor whose data starts at ``base``: one pwrite per run."""
    w = blk.width
    for i in range(blk.count):
        pwrite_all(fd, mv[i * w : (i + 1) * w], base + blk.start + i * blk.stride)
