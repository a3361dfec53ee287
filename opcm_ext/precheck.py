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
from pathlib import Path

from . import _cache
from ._lightio import PREFIX, HashCache, Layout, frame, hash_algorithm, needs_recovery, new_blake3, plain_layout, read_header
from .errors import DuplicateModelError, MergeStateError
from .state import MergeState

__all__ = ["duplicate_error", "content_hash_of"]

_CHUNK = 16 << 20


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
    cache = HashCache() if _cache.enabled() else None
    ident = layout.identity()
    if cache is not None:
        hit = cache.get(ident, "blake3")
        if hit is not None:
            return hit
    value = _blake3(layout, progress)
    if cache is not None and layout.identity() == ident:  # unchanged while hashing
        cache.put(ident, "blake3", value)
    return value


def _blake3(layout: Layout, progress: bool) -> str:
    fds = [os.open(p, os.O_RDONLY) for p in layout.shards]
    try:
        tensors: dict[str, tuple[int, str, tuple[int, ...], int, int]] = {}
        for fd in fds:
            start, header = read_header(fd)
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                if name in tensors:
                    raise ValueError(f"tensor {name} in two shards")
                b, end = e["data_offsets"]
                tensors[name] = (fd, str(e["dtype"]), tuple(int(d) for d in e["shape"]), start + int(b), int(end) - int(b))
        h = new_blake3()
        from tqdm.auto import tqdm

        total = sum(t[4] for t in tensors.values())
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"hashing {Path(layout.shards[0]).parent.name}",
                  disable=not progress, leave=False) as bar:
            for name in sorted(tensors):
                fd, dtype, shape, off, n = tensors[name]
                h.update(frame(name, dtype, shape, n))
                done = 0
                while done < n:
                    part = os.pread(fd, min(_CHUNK, n - done), off + done)
                    if not part:
                        raise ValueError(f"{name}: the file ends inside the tensor")
                    h.update(part)
                    done += len(part)
                    bar.update(len(part))
        return PREFIX + h.hexdigest(length=16)
    finally:
        for fd in fds:
            os.close(fd)
