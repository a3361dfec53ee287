"""`opcm step`'s first check, before torch is imported: refuse a model that is already merged.

Importing torch and the engine takes longer than the rest of a refusal, so the CLI asks this module
first. It reads the merged checkpoint's state from its safetensors header, hashes the new model
(the same content identity as ``io.content_hash``, through the same cache, so the step that follows
finds it there) and, on a match, the base, and refuses only when the new model is one of the
recorded models and the base is the recorded base — exactly when the full step would refuse it as a
duplicate. Anything it cannot settle (no state, an opcm-ext 0.1 hash, a LoRA adapter, an unusual
layout, an output a killed run left to recover, any read or parse error) answers None, and the step
runs its own checks as always. Standard library, blake3 and tqdm only.
"""

from __future__ import annotations

import os

from . import _cache
from ._lightio import HashCache, Layout, cached_hash, content_blake3, hash_algorithm, needs_recovery, plain_layout, read_header
from .errors import DuplicateModelError, MergeStateError
from .state import MergeState

__all__ = ["duplicate_error", "content_hash_of"]


def duplicate_error(base: str | os.PathLike[str], merged: str | os.PathLike[str], new: str | os.PathLike[str], *,
                    out: str | os.PathLike[str] | None = None, progress: bool = False) -> DuplicateModelError | None:
    """The DuplicateModelError the step would raise for ``new``, or None when there is none or it is not sure."""
    try:
        if needs_recovery(merged) or (out is not None and needs_recovery(out)):
            return None
        if os.path.realpath(merged) == os.path.realpath(new):
            return None  # the step says that these are the same checkpoint
        layouts = [plain_layout(p) for p in (base, merged, new)]
        if any(lay is None for lay in layouts):
            return None
        lb, lm, ln = layouts
        state = _state(lm)  # type: ignore[arg-type]
        if state is None:
            return None
        recorded = [m["hash"] for m in state.models] + [state.base["hash"]]
        if any(hash_algorithm(h) != "blake3" for h in recorded):
            return None
        h_new = content_hash_of(ln, progress=progress)  # type: ignore[arg-type]
        step = next((i for i, m in enumerate(state.models, start=1) if m["hash"] == h_new), None)
        if step is None or content_hash_of(lb, progress=progress) != state.base["hash"]:  # type: ignore[arg-type]
            return None
        return DuplicateModelError.at_step(str(new), step, state.models[step - 1].get("name"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, MergeStateError):
        return None


def _state(layout: Layout) -> MergeState | None:
    fd = os.open(layout.shards[0], os.O_RDONLY)
    try:
        _, header = read_header(fd)
    finally:
        os.close(fd)
    md = header.get("__metadata__") or {}
    return MergeState.from_metadata(md, str(layout.shards[0])) if isinstance(md, dict) else None


def content_hash_of(layout: Layout, *, progress: bool = False) -> str:
    """``io.content_hash`` of a plain checkpoint without torch: from the cache, else hashed and cached."""
    return cached_hash(HashCache() if _cache.enabled() else None, layout.identity, "blake3",
                       lambda: _blake3(layout, progress))


def _blake3(layout: Layout, progress: bool) -> str:
    fds = [os.open(p, os.O_RDONLY) for p in layout.shards]
    try:
        tensors: dict[str, tuple[str, tuple[int, ...], int]] = {}
        where: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute offset)
        for fd in fds:
            start, header = read_header(fd)
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                if name in tensors:
                    raise ValueError(f"tensor {name} in two shards")
                b, end = (int(x) for x in e["data_offsets"])
                tensors[name] = (str(e["dtype"]), tuple(int(d) for d in e["shape"]), end - b)
                where[name] = (fd, start + b)

        def read_into(name: str, off: int, buf: memoryview) -> None:
            fd, base = where[name]
            got = 0
            while got < len(buf):
                n = os.preadv(fd, [buf[got:]], base + off + got)
                if n == 0:
                    raise ValueError(f"{name}: the file ends inside the tensor")
                got += n

        return content_blake3(tensors, read_into, progress, f"hashing {layout.shards[0].parent.name}")
    finally:
        for fd in fds:
            os.close(fd)
