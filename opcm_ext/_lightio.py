"""The parts of opcm_ext.io that work without torch: what `opcm step` checks before importing it.

- the content identity: framing, chunked feeding and BLAKE3 digest (``io.hashing`` hashes a reader with
  them, ``precheck`` a file it opened itself),
- the hash cache keyed by the files' identity (realpath, device, inode, size, mtime) and the one
  get-compute-put rule both use (``cached_hash``),
- whether a killed run left an output to recover (``io.transaction`` recovers it),
- a minimal safetensors layout reader (shards, header JSON) for plain checkpoints.

Standard library and blake3 only: importing this module must not import torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import blake3

from . import _cache

__all__ = ["PREFIX", "SCHEMES", "CHUNK", "frame", "new_blake3", "feed", "content_blake3", "cached_hash",
           "hash_algorithm", "HashCache", "default_cache_path",
           "file_identity", "needs_recovery", "MARKER", "Layout", "plain_layout", "read_header"]

_log = logging.getLogger(__name__)

PREFIX = "blake3:"
TAG = b"opcm-ext content v1\x00"  # domain separation: a future framing gets a new tag
SCHEMES = ("blake3", "legacy")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_CACHE_ENTRIES = 1000
#: The marker file of an output folder being replaced (``io.transaction``).
MARKER = ".opcm-tmp"

FileIdentity = tuple[str, int, int, int, int]


# -- the content identity ------------------------------------------------------------------------


def frame(name: str, dtype_str: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """What precedes a tensor's bytes in the content hash: length-prefixed name, dtype code, shape, size."""
    nb = name.encode("utf-8")
    ds = dtype_str.encode("ascii")
    return b"".join(
        (
            struct.pack("<Q", len(nb)),
            nb,
            struct.pack("<Q", len(ds)),
            ds,
            struct.pack(f"<Q{len(shape)}Q", len(shape), *shape),
            struct.pack("<Q", nbytes),
        )
    )


def new_blake3() -> Any:
    return blake3.blake3(TAG, max_threads=blake3.blake3.AUTO)


def hash_algorithm(h: str) -> str:
    """The scheme of a recorded hash: 'blake3' (``blake3:`` + 32 hex) or 'legacy' (32 hex, opcm-ext 0.1)."""
    if isinstance(h, str):
        if h.startswith(PREFIX) and _HEX32.fullmatch(h[len(PREFIX):]):
            return "blake3"
        if _HEX32.fullmatch(h):
            return "legacy"
    raise ValueError(
        f"{h!r} is not a model hash opcm-ext knows: expected 'blake3:' followed by 32 hex digits, "
        "or 32 hex digits as opcm-ext 0.1 recorded them"
    )


#: Bytes read and hashed at a time: bounds the memory of hashing (below the smallest budgets).
CHUNK = 16 << 20


def feed(sizes: Mapping[str, int], read_into: Callable[[str, int, memoryview], None], start: Callable[[str], Any],
         progress: bool, desc: str) -> dict[str, Any]:
    """Feed every tensor's bytes (sorted names, in chunks of at most ``CHUNK``) to ``start(name)``'s hasher.

    ``sizes``: name -> byte count; ``read_into(name, offset, buffer)`` fills ``buffer`` from that offset.
    """
    from tqdm.auto import tqdm

    buf = memoryview(bytearray(min(CHUNK, max(sizes.values(), default=0))))
    hashers = {}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for k in sorted(sizes):
            h = hashers[k] = start(k)
            n = sizes[k]
            for off in range(0, n, CHUNK):
                part = buf[: min(CHUNK, n - off)]
                read_into(k, off, part)
                h.update(part)
                bar.update(len(part))
    return hashers


def content_blake3(tensors: Mapping[str, tuple[str, tuple[int, ...], int]],
                   read_into: Callable[[str, int, memoryview], None], progress: bool, desc: str) -> str:
    """The ``blake3:`` content identity of tensors given as name -> (dtype code, shape, byte count)."""
    h = new_blake3()

    def start(k: str) -> Any:
        h.update(frame(k, *tensors[k]))
        return h

    feed({k: t[2] for k, t in tensors.items()}, read_into, start, progress, desc)
    return PREFIX + h.hexdigest(length=16)


def cached_hash(cache: "HashCache | None", identity: Callable[[], tuple | None], algo: str,
                compute: Callable[[], str]) -> str:
    """``compute()``, through ``cache`` keyed by the files' ``identity()`` (stored only if unchanged while hashing)."""
    ident = identity() if cache is not None else None
    if cache is None or ident is None:
        return compute()
    hit = cache.get(ident, algo)
    if hit is not None:
        return hit
    value = compute()
    if identity() == ident:
        cache.put(ident, algo, value)
    return value


def file_identity(path: str | os.PathLike[str], st: os.stat_result) -> FileIdentity:
    """(realpath, st_dev, st_ino, st_size, st_mtime_ns): a file whose identity is unchanged has unchanged bytes."""
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# -- the cache -------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``hashes.json`` in the user's cache folder (``opcm_ext._cache.cache_root``)."""
    return _cache.cache_root() / "hashes.json"


class HashCache:
    """File identity -> model hashes in one JSON file, replaced atomically; any failure means a miss."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, max_entries: int = _CACHE_ENTRIES) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.max_entries = max_entries

    @staticmethod
    def _key(identity: tuple) -> str:
        return json.dumps([list(f) for f in identity], separators=(",", ":"))

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read(64 << 20))
            entries = doc["entries"] if doc.get("version") == 1 else {}
            return {
                k: {"hashes": {a: h for a, h in e["hashes"].items() if a in SCHEMES and isinstance(h, str)},
                    "at": float(e["at"])}
                for k, e in entries.items()
                if isinstance(e, dict) and isinstance(e.get("hashes"), dict)
            }
        except FileNotFoundError:
            return {}
        except Exception as e:  # a corrupt or unreadable cache is an empty one
            _log.debug("ignoring the hash cache %s: %s", self.path, e)
            return {}

    def get(self, identity: tuple, algo: str) -> str | None:
        """The cached ``algo`` hash of the files with this identity, or None."""
        entry = self._load().get(self._key(identity))
        h = entry["hashes"].get(algo) if entry else None
        try:
            return h if h is not None and hash_algorithm(h) == algo else None
        except ValueError:
            return None

    def put(self, identity: tuple, algo: str, value: str) -> None:
        """Remember a hash (keeps the newest ``max_entries`` identities); failures are only logged."""
        entries = self._load()
        key = self._key(identity)
        entry = entries.pop(key, {"hashes": {}})
        entry["hashes"][algo] = value
        entry["at"] = time.time()
        entries[key] = entry
        if len(entries) > self.max_entries:
            keep = sorted(entries, key=lambda k: entries[k]["at"])[-self.max_entries:]
            entries = {k: entries[k] for k in keep}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "entries": entries}, f, separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError as e:
            _log.debug("could not write the hash cache %s: %s", self.path, e)
            try:
                os.unlink(tmp)
            except OSError:
                pass


# -- outputs -----------------------------------------------------------------------------------------


def needs_recovery(out: str | os.PathLike[str]) -> bool:
    """Whether a killed run into ``out`` left a temporary, a renamed-aside output or a marker behind."""
    p = Path(os.path.abspath(os.fspath(out)))
    try:
        names = os.listdir(p.parent)
    except OSError:
        return False  # an unusable output folder is reported by the transaction
    prefix = f".{p.name}.opcm-"  # .NAME.opcm-tmp-PID-TOKEN and .NAME.opcm-old-TOKEN (not the .opcm.lock)
    return any(n.startswith(prefix) for n in names) or (p / MARKER).is_file()


# -- plain checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The files of a plain safetensors checkpoint: shards in sorted name order, then the index (if any)."""

    shards: tuple[Path, ...]
    index: Path | None

    def identity(self) -> tuple[FileIdentity, ...]:
        """As ``io.CheckpointReader.file_identity``: each shard's, then the index's."""
        files = self.shards + ((self.index,) if self.index is not None else ())
        return tuple(file_identity(f, os.stat(f)) for f in files)


def plain_layout(path: str | os.PathLike[str]) -> Layout | None:
    """The layout of a model folder (``model.safetensors`` or ``model.safetensors.index.json``), a
    ``.safetensors`` file or an index; None for anything else (a LoRA adapter, other names)."""
    p = Path(os.path.abspath(os.fspath(path)))
    if p.is_dir():
        if (p / "adapter_config.json").exists():
            return None
        if (p / "model.safetensors").is_file():
            return Layout((p / "model.safetensors",), None)
        p = p / "model.safetensors.index.json"
    if p.name.endswith(".safetensors.index.json") and p.is_file():
        with open(p, "rb") as f:
            doc = json.loads(f.read(100_000_000))
        names = sorted(set(doc["weight_map"].values()))
        if not names or not all(isinstance(n, str) and "/" not in n and n not in (".", "..") for n in names):
            return None
        return Layout(tuple(p.parent / n for n in names), p)
    if p.name.endswith(".safetensors") and p.is_file():
        return Layout((p,), None)
    return None


def read_header(fd: int) -> tuple[int, dict[str, Any]]:
    """(start of the data section, the header JSON) of an open safetensors file."""
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > 100_000_000:
        raise ValueError("safetensors header too large")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise ValueError("truncated safetensors header")
    return 8 + n, json.loads(raw)
