"""The one content identity of a model, and a cache of it keyed by the files' identity.

``content_hash`` is ``"blake3:"`` + 32 hex characters: BLAKE3 over every tensor in sorted
name order, each framed as length-prefixed name, dtype code, shape and raw bytes. It depends
only on the tensors, not on sharding, file layout or metadata, and ``hash_tensors`` gives the
same value for the same tensors held in memory.

Merge states written by opcm-ext 0.1 record a bare 32-hex blake2b identity (``legacy_hash``);
``same_model`` compares a recorded hash with a checkpoint in whichever scheme it was recorded.

A reader that is not a plain checkpoint (``io.adapters.AdapterReader``, the in-memory sources of
``opcm_ext.Merger``) has a ``content_identity()`` method; hashing returns that instead of
streaming the tensors (an adapter's identity is its own, not the model it stands for).

The cache (``HashCache``) maps (realpath, device, inode, size, mtime_ns) of every file of a
checkpoint to its hashes, so an unchanged base is hashed once, not every step. It lives in
``$OPCM_CACHE_DIR/hashes.json`` (else ``$XDG_CACHE_HOME/opcm-ext/`` or ``~/.cache/opcm-ext/``);
``OPCM_NO_CACHE=1`` turns the default cache off. A missing, corrupt or unwritable
cache only means hashing again: it never fails a caller.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from .. import _cache
from .._lightio import PREFIX as _PREFIX
from .._lightio import HashCache, default_cache_path, hash_algorithm
from .._lightio import frame as _frame
from .._lightio import new_blake3 as _new_blake3
from ._fs import tensor_bytes
from .dtypes import dtype_to_str
from .reader import CheckpointReader

__all__ = [
    "content_hash",
    "hash_tensors",
    "legacy_hash",
    "hash_algorithm",
    "same_model",
    "HashCache",
    "default_cache_path",
]

_CHUNK = 16 << 20  # bytes read and hashed at a time: bounds the memory of hashing (below the smallest budgets)


# ---------------------------------------------------------------------------------------
# the two schemes
# ---------------------------------------------------------------------------------------


def _bar(progress: bool, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=not progress, leave=False)


def _stream(reader: CheckpointReader, progress: bool, desc: str, start: Callable[[str], Any]) -> dict[str, Any]:
    """Feed every tensor's bytes (sorted names, in chunks of at most 64 MiB) to ``start(name)``'s hasher."""
    keys = reader.keys()
    largest = max((reader.info(k).nbytes for k in keys), default=0)
    buf = memoryview(bytearray(min(_CHUNK, largest)))
    hashers = {}
    with _bar(progress, reader.total_bytes, desc) as bar:
        for k in keys:
            h = hashers[k] = start(k)
            n = reader.info(k).nbytes
            for off in range(0, n, _CHUNK):
                part = buf[: min(_CHUNK, n - off)]
                reader.read_into(k, off, part)
                h.update(part)
                bar.update(len(part))
    return hashers


def _blake3_of(reader: CheckpointReader, progress: bool) -> str:
    h = _new_blake3()

    def start(k: str) -> Any:
        info = reader.info(k)
        h.update(_frame(k, info.dtype_str, info.shape, info.nbytes))
        return h

    _stream(reader, progress, f"hashing {reader.path.name}", start)
    return _PREFIX + h.hexdigest(length=16)


def _legacy_of(reader: CheckpointReader, progress: bool) -> str:
    # opcm-ext 0.1: blake2b-16 of (name, str(dtype), repr(shape), bytes) per tensor, then of the sorted (name, digest)
    def start(k: str) -> Any:
        info = reader.info(k)
        t = hashlib.blake2b(digest_size=16)
        t.update(k.encode())
        t.update(str(info.dtype).encode())
        t.update(repr(tuple(info.shape)).encode())
        return t

    per_tensor = _stream(reader, progress, f"hashing {reader.path.name} (0.1 scheme)", start)
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(per_tensor):
        h.update(k.encode())
        h.update(per_tensor[k].digest())
    return h.hexdigest()


_SCHEMES: dict[str, Callable[[CheckpointReader, bool], str]] = {"blake3": _blake3_of, "legacy": _legacy_of}


# ---------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------


def content_hash(reader: CheckpointReader, *, progress: bool = False, cache: bool | HashCache | None = True) -> str:
    """The model's content identity, ``blake3:<32 hex>`` (cached by file identity unless ``cache=False``)."""
    return _hash(reader, "blake3", progress, cache)


def legacy_hash(reader: CheckpointReader, *, progress: bool = False, cache: bool | HashCache | None = True) -> str:
    """The bare 32-hex identity opcm-ext 0.1 recorded in merge states (blake2b-16 per tensor, then combined)."""
    return _hash(reader, "legacy", progress, cache)


def same_model(recorded: str, reader: CheckpointReader, cache: bool | HashCache | None = True) -> bool:
    """Whether ``reader`` holds the model a state recorded as ``recorded`` (compared in that hash's scheme)."""
    algo = hash_algorithm(recorded)
    if algo != "blake3" and hasattr(reader, "content_identity"):
        return False  # opcm-ext 0.1 recorded checkpoints only: an adapter or in-memory model is never one of them
    return _hash(reader, algo, False, cache) == recorded


def hash_tensors(items: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]) -> str:
    """``content_hash`` of tensors in memory (a state dict or (name, tensor) pairs, in any order)."""
    pairs = list(items.items() if isinstance(items, Mapping) else items)
    pairs.sort(key=lambda kv: kv[0])
    h = _new_blake3()
    last = None
    for name, t in pairs:
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"hash_tensors takes (str, torch.Tensor) pairs, got ({name!r}, {type(t).__name__})")
        if name == last:
            raise ValueError(f"hash_tensors: the name {name!r} appears twice")
        last = name
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        data = tensor_bytes(t.contiguous())
        h.update(_frame(name, dtype_to_str(t.dtype), tuple(t.shape), len(data)))
        h.update(data)
    return _PREFIX + h.hexdigest(length=16)


def _hash(reader: CheckpointReader, algo: str, progress: bool, cache: bool | HashCache | None) -> str:
    own = getattr(reader, "content_identity", None)
    if own is not None:  # a model that is not a checkpoint (a LoRA adapter, tensors in memory) names its own identity
        if algo != "blake3":
            raise ValueError(f"{reader!r} has no identity in the {algo} scheme (opcm-ext 0.1 only hashed checkpoints)")
        return own()
    store = _cache_of(cache)
    ident = _identity(reader) if store is not None else None
    if store is not None and ident is not None:
        hit = store.get(ident, algo)
        if hit is not None:
            return hit
    value = _SCHEMES[algo](reader, progress)
    if store is not None and ident is not None and _identity(reader) == ident:  # unchanged while hashing
        store.put(ident, algo, value)
    return value


def _identity(reader: CheckpointReader) -> tuple | None:
    try:
        return reader.file_identity()
    except (OSError, ValueError):
        return None


def _cache_of(cache: bool | HashCache | None) -> HashCache | None:
    if isinstance(cache, HashCache):
        return cache
    if not cache or not _cache.enabled():
        return None
    return HashCache()
