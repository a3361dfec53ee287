"""opcm_ext.io.hashing: the one content identity of a model, its cache, and opcm-ext 0.1's identity."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import all_dtype_tensors, write_shards
from safetensors.torch import save_file

import opcm_ext._lightio as _lightio
import opcm_ext.io.hashing as hashing
from opcm_ext.io import DTYPES, CheckpointReader, content_hash, hash_tensors, legacy_hash, same_model
from opcm_ext.io.hashing import HashCache, default_cache_path, hash_algorithm

MODEL = {
    "enc.w": torch.randn(6, 5),
    "enc.b": torch.randn(5).to(torch.bfloat16),
    "ids": torch.arange(7),
    "scale": torch.tensor(2.5),
    "empty": torch.empty(0, 3, dtype=torch.float16),
}


@pytest.fixture
def one_file(tmp_path) -> Path:
    f = tmp_path / "one" / "model.safetensors"
    f.parent.mkdir()
    save_file(MODEL, str(f), metadata={"format": "pt"})
    return f


def chash(path, **kw) -> str:
    with CheckpointReader(path) as r:
        return content_hash(r, cache=False, **kw)


# --------------------------------------------------------------------------------------
# what the identity depends on
# --------------------------------------------------------------------------------------


def test_format_and_independence_from_sharding_and_metadata(tmp_path, one_file):
    h = chash(one_file)
    assert re.fullmatch(r"blake3:[0-9a-f]{32}", h) and hash_algorithm(h) == "blake3"
    keys = sorted(MODEL)
    many = tmp_path / "many"
    many.mkdir()
    write_shards(many, {"b.safetensors": {k: MODEL[k] for k in keys[2:]},  # other order, other files
                        "a.safetensors": {k: MODEL[k] for k in reversed(keys[:2])}}, {"note": "other metadata"})
    assert chash(many) == h
    assert hash_tensors(MODEL) == h
    assert hash_tensors(reversed(list(MODEL.items()))) == h  # pairs in any order
    noncontig = dict(MODEL, **{"enc.w": MODEL["enc.w"].t().contiguous().t()})
    assert not noncontig["enc.w"].is_contiguous() and hash_tensors(noncontig) == h


def test_every_dtype_file_and_memory_agree(tmp_path):
    ts = all_dtype_tensors()
    f = tmp_path / "all.safetensors"
    save_file(ts, str(f))
    assert chash(f) == hash_tensors(ts)


def _flip_one_bit(t: torch.Tensor) -> torch.Tensor:
    b = t.contiguous().clone().reshape(-1).view(torch.uint8)
    b[3] ^= 0x10
    return b.view(t.dtype).reshape(t.shape)


def test_sensitive_to_every_part_of_a_tensor(tmp_path, one_file):
    variants = {
        "original": MODEL,
        "one bit": dict(MODEL, **{"enc.w": _flip_one_bit(MODEL["enc.w"])}),
        "renamed": {("enc.W" if k == "enc.w" else k): v for k, v in MODEL.items()},
        "dtype": dict(MODEL, **{"enc.w": MODEL["enc.w"].view(torch.int32)}),
        "shape": dict(MODEL, **{"enc.w": MODEL["enc.w"].reshape(5, 6)}),
        "empty shape": dict(MODEL, empty=torch.empty(3, 0, dtype=torch.float16)),
        "missing": {k: v for k, v in MODEL.items() if k != "scale"},
        "extra": dict(MODEL, more=torch.zeros(1)),
        "0-d vs 1-d": dict(MODEL, scale=MODEL["scale"].reshape(1)),
    }
    hashes = {name: hash_tensors(sd) for name, sd in variants.items()}
    assert len(set(hashes.values())) == len(hashes), hashes
    for name in ("one bit", "renamed", "dtype"):  # and the same from files
        f = tmp_path / f"{name}.safetensors"
        save_file(variants[name], str(f))
        assert chash(f) == hashes[name]


def test_framing_is_unambiguous():
    # without length prefixes these would hash the same byte stream
    a = {"ab": torch.tensor([1], dtype=torch.uint8)}
    b = {"a": torch.tensor([ord("b"), 1], dtype=torch.uint8)}
    c = {"a": torch.tensor([], dtype=torch.uint8), "b": torch.tensor([1], dtype=torch.uint8)}
    assert len({hash_tensors(a), hash_tensors(b), hash_tensors(c)}) == 3


def test_streaming_in_small_chunks_changes_nothing(one_file, monkeypatch):
    want = chash(one_file)
    monkeypatch.setattr(_lightio, "CHUNK", 7)  # the chunking io.hashing and the CLI's precheck share
    assert chash(one_file) == want
    with CheckpointReader(one_file) as r:
        monkeypatch.setattr(_lightio, "CHUNK", 5)
        assert content_hash(r, cache=False, progress=True) == want


def test_hash_tensors_errors():
    with pytest.raises(ValueError, match="appears twice"):
        hash_tensors([("a", torch.zeros(1)), ("a", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"\(str, torch.Tensor\) pairs"):
        hash_tensors([("a", [0.0])])
    with pytest.raises(ValueError, match="cannot be stored in safetensors"):
        hash_tensors([("a", torch.zeros(1, dtype=torch.complex128))])


# --------------------------------------------------------------------------------------
# opcm-ext 0.1's identity (bare hex, as its merge states recorded it)
# --------------------------------------------------------------------------------------


def _legacy_fixture() -> dict[str, torch.Tensor]:
    """Tensors whose bytes are a fixed pattern (no random generator), for a constant of opcm-ext 0.1."""

    def pattern(dt, shape, seed):
        n = 1
        for d in shape:
            n *= d
        b = (torch.arange(n * dt.itemsize, dtype=torch.int64) * 37 + seed * 11) % 251
        return b.to(torch.uint8).view(dt).reshape(shape)

    ts = {}
    for i, code in enumerate(["BF16", "BOOL", "F16", "F32", "F64", "I16", "I32", "I64", "I8", "U8"]):
        dt = DTYPES[code]
        ts[f"t.{code}.mat"] = pattern(dt, (3, 5), i)
        ts[f"t.{code}.scalar"] = pattern(dt, (), 100 + i)
        ts[f"t.{code}.empty"] = torch.empty((0, 4), dtype=dt)
    ts["t.BOOL.mat"] = torch.arange(15).reshape(3, 5) % 3 == 0
    ts["w.\u00fcn\u00ef"] = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    return ts


# computed by opcm-ext 0.1's engine.tensor_digest/combine_digests on _legacy_fixture()
LEGACY_FIXTURE_HASH = "b5ea1456dd8ef83a623cd7426e4c91e7"


def _legacy_oracle(ts: dict[str, torch.Tensor]) -> str:
    """opcm-ext 0.1's scheme, written out: blake2b-16 per tensor, then over the sorted (name, digest)."""
    digests = {}
    for k, t in ts.items():
        h = hashlib.blake2b(digest_size=16)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests[k] = h.digest()
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(digests):
        h.update(k.encode())
        h.update(digests[k])
    return h.hexdigest()


def test_legacy_hash_equals_what_0_1_recorded(tmp_path):
    ts = _legacy_fixture()
    assert _legacy_oracle(ts) == LEGACY_FIXTURE_HASH
    keys = sorted(ts)
    write_shards(tmp_path, {"s1.safetensors": {k: ts[k] for k in keys[::2]},
                            "s2.safetensors": {k: ts[k] for k in keys[1::2]}})
    with CheckpointReader(tmp_path) as r:
        assert legacy_hash(r, cache=False) == LEGACY_FIXTURE_HASH
        assert hash_algorithm(LEGACY_FIXTURE_HASH) == "legacy"


def test_legacy_hash_of_every_dtype_in_small_chunks(tmp_path, monkeypatch):
    ts = all_dtype_tensors()
    f = tmp_path / "all.safetensors"
    save_file(ts, str(f))
    monkeypatch.setattr(_lightio, "CHUNK", 3)
    with CheckpointReader(f) as r:
        assert legacy_hash(r, cache=False) == _legacy_oracle(ts)


def test_same_model_in_the_recorded_scheme(tmp_path, one_file):
    with CheckpointReader(one_file) as r:
        new, old = content_hash(r, cache=False), legacy_hash(r, cache=False)
        assert same_model(new, r, cache=False) and same_model(old, r, cache=False)
    other = tmp_path / "other.safetensors"
    save_file(dict(MODEL, scale=torch.tensor(2.0)), str(other))
    with CheckpointReader(other) as r:
        assert not same_model(new, r, cache=False) and not same_model(old, r, cache=False)
        for bad in ("", "blake3:" + "0" * 31, "BLAKE3:" + "0" * 32, "0" * 33, "g" * 32, None):
            with pytest.raises(ValueError, match="not a model hash opcm-ext knows"):
                same_model(bad, r, cache=False)


# --------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------


@pytest.fixture
def computed(monkeypatch) -> list[str]:
    """The schemes actually computed (not answered from a cache), in order."""
    calls: list[str] = []
    for name, fn in dict(hashing._SCHEMES).items():
        def spy(reader, progress, fn=fn, name=name):
            calls.append(name)
            return fn(reader, progress)

        monkeypatch.setitem(hashing._SCHEMES, name, spy)
    return calls


def test_cache_hit_and_invalidation(tmp_path, one_file, computed):
    cache = HashCache(tmp_path / "c" / "hashes.json")
    with CheckpointReader(one_file) as r:
        h = content_hash(r, cache=cache)
        assert content_hash(r, cache=cache) == h and computed == ["blake3"]
        assert legacy_hash(r, cache=cache) == legacy_hash(r, cache=cache) and computed == ["blake3", "legacy"]
        assert same_model(h, r, cache) and computed == ["blake3", "legacy"]
    with CheckpointReader(one_file) as r:  # another reader of the same file: a hit
        assert content_hash(r, cache=cache) == h and computed == ["blake3", "legacy"]
    st = os.stat(one_file)
    os.utime(one_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # touched: the same bytes, hashed again
    with CheckpointReader(one_file) as r:
        assert content_hash(r, cache=cache) == h and computed == ["blake3", "legacy", "blake3"]
    save_file(dict(MODEL, more=torch.zeros(2)), str(one_file))  # replaced: new inode, size and mtime
    with CheckpointReader(one_file) as r:
        h2 = content_hash(r, cache=cache)
    assert h2 != h and computed[-1] == "blake3" and len(computed) == 4
    doc = json.loads(cache.path.read_text())
    assert doc["version"] == 1 and len(doc["entries"]) == 3


def test_cache_size_change_in_place(tmp_path, computed):
    f = tmp_path / "m.safetensors"
    save_file(MODEL, str(f))
    cache = HashCache(tmp_path / "hashes.json")
    with CheckpointReader(f) as r:
        content_hash(r, cache=cache)
    st = os.stat(f)
    with open(f, "ab") as fh:  # trailing bytes, the mtime put back: only the size tells
        fh.write(b"\0" * 8)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with CheckpointReader(f) as r:
        content_hash(r, cache=cache)
    assert computed == ["blake3", "blake3"]


def test_sharded_cache_follows_every_file(tmp_path, computed):
    keys = sorted(MODEL)
    write_shards(tmp_path, {"a.safetensors": {k: MODEL[k] for k in keys[:2]},
                            "b.safetensors": {k: MODEL[k] for k in keys[2:]}})
    cache = HashCache(tmp_path / "c.json")
    with CheckpointReader(tmp_path) as r:
        content_hash(r, cache=cache)
        content_hash(r, cache=cache)
    assert computed == ["blake3"]
    idx = tmp_path / "model.safetensors.index.json"
    st = os.stat(idx)
    os.utime(idx, ns=(st.st_atime_ns, st.st_mtime_ns + 10))
    with CheckpointReader(tmp_path) as r:
        content_hash(r, cache=cache)
    assert computed == ["blake3", "blake3"]


@pytest.mark.parametrize("junk", [b"", b"{not json", b"[1, 2]", b'{"version": 1, "entries": 7}',
                                  b'{"version": 1, "entries": {"x": {"hashes": 3}}}', b"\xff\xfe",
                                  b'{"version": 2, "entries": {}}'],
                         ids=["empty", "not-json", "list", "entries-int", "bad-entry", "binary", "future"])
def test_corrupt_cache_is_a_miss_and_is_replaced(tmp_path, one_file, computed, junk):
    cache = HashCache(tmp_path / "hashes.json")
    cache.path.write_bytes(junk)
    with CheckpointReader(one_file) as r:
        h = content_hash(r, cache=cache)
        assert content_hash(r, cache=cache) == h == chash(one_file)
    assert computed == ["blake3", "blake3"]  # computed once for the corrupt cache, then a hit (chash: no cache)


def test_wrong_value_in_cache_is_ignored(tmp_path, one_file, computed):
    cache = HashCache(tmp_path / "hashes.json")
    with CheckpointReader(one_file) as r:
        cache.put(r.file_identity(), "blake3", "not-a-hash")
        cache.put(r.file_identity(), "legacy", "blake3:" + "0" * 32)
        content_hash(r, cache=cache)
        legacy_hash(r, cache=cache)
    assert computed == ["blake3", "legacy"]


def test_unwritable_cache_never_fails(tmp_path, one_file, computed):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    cache = HashCache(blocker / "sub" / "hashes.json")
    with CheckpointReader(one_file) as r:
        h = content_hash(r, cache=cache)
        assert content_hash(r, cache=cache) == h
    assert computed == ["blake3", "blake3"] and blocker.read_text().startswith("a file")


def test_cache_keeps_the_newest_entries(tmp_path):
    cache = HashCache(tmp_path / "hashes.json", max_entries=3)
    for i in range(5):
        cache.put(((f"/m{i}", 1, i, 10, 5),), "blake3", "blake3:" + f"{i:032x}")
    assert [cache.get(((f"/m{i}", 1, i, 10, 5),), "blake3") for i in range(5)] == [None, None] + [
        "blake3:" + f"{i:032x}" for i in (2, 3, 4)
    ]
    assert not [p for p in tmp_path.iterdir() if p.name != "hashes.json"]  # no temporaries left


def test_default_cache_location_and_switch(tmp_path, monkeypatch, one_file, computed):
    monkeypatch.setenv("OPCM_CACHE_DIR", str(tmp_path / "opcm"))
    assert default_cache_path() == tmp_path / "opcm" / "hashes.json"
    monkeypatch.delenv("OPCM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "opcm-ext" / "hashes.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "opcm-ext" / "hashes.json"
    monkeypatch.setenv("OPCM_CACHE_DIR", str(tmp_path / "opcm"))
    with CheckpointReader(one_file) as r:
        content_hash(r)
        content_hash(r)
        assert computed == ["blake3"] and (tmp_path / "opcm" / "hashes.json").is_file()
        monkeypatch.setenv("OPCM_NO_CACHE", "1")
        content_hash(r)
        assert computed == ["blake3", "blake3"]
        content_hash(r, cache=False)
        assert computed == ["blake3", "blake3", "blake3"]
