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
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from .. import _cache
from .._lightio import PREFIX as _PREFIX
from .._lightio import HashCache, cached_hash, content_blake3, default_cache_path, feed, hash_algorithm
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

# ---------------------------------------------------------------------------------------
# the two schemes
# ---------------------------------------------------------------------------------------


def _sizes(reader: CheckpointReader) -> dict[str, int]:
    return {k: reader.info(k).nbytes for k in reader.keys()}


def _blake3_of(reader: CheckpointReader, progress: bool) -> str:
    tensors = {k: (i.dtype_str, i.shape, i.nbytes) for k, i in ((k, reader.info(k)) for k in reader.keys())}
    return content_blake3(tensors, reader.read_into, progress, f"hashing {reader.path.name}")


def _legacy_of(reader: CheckpointReader, progress: bool) -> str:
    # opcm-ext 0.1: blake2b-16 of (name, str(dtype), repr(shape), bytes) per tensor, then of the sorted (name, digest)
    def start(k: str) -> Any:
        info = reader.info(k)
        t = hashlib.blake2b(digest_size=16)
        t.update(k.encode())
        t.update(str(info.dtype).encode())
        t.update(repr(tuple(info.shape)).encode())
        return t

    per_tensor = feed(_sizes(reader), reader.read_into, start, progress, f"hashing {reader.path.name} (0.1 scheme)")
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
    return cached_hash(_cache_of(cache), lambda: _identity(reader), algo, lambda: _SCHEMES[algo](reader, progress))


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
