"""checkpoint.py: our safetensors reader and writer against the safetensors library and transformers."""

from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opcm_ext.checkpoint import (
    DTYPES,
    CheckpointReader,
    SafetensorsWriter,
    TensorHasher,
    TensorInfo,
    content_hash,
    dtype_to_str,
)
from opcm_ext.errors import CheckpointError, OutputError


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (works for every dtype, 0-d and empty tensors)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(raw(a), raw(b))


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


ALL_DTYPES = sorted(DTYPES.items())


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    ts = {}
    for i, (code, dt) in enumerate(ALL_DTYPES):
        ts[f"t.{code}.mat"] = sample_tensor(dt, (3, 5), seed=i)
        ts[f"t.{code}.scalar"] = sample_tensor(dt, (), seed=100 + i)
        ts[f"t.{code}.empty"] = torch.empty((0, 4), dtype=dt)
    ts["t.BOOL.mat"] = torch.rand(3, 5) > 0.5  # real booleans, not random bytes
    return ts


def write_raw(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


def write_ours(folder: Path, shards: dict[str, dict[str, torch.Tensor]], metadata=None) -> SafetensorsWriter:
    layout = [(f, [(k, t.dtype, tuple(t.shape)) for k, t in ts.items()]) for f, ts in shards.items()]
    with SafetensorsWriter(folder, layout, metadata) as w:
        for ts in shards.values():
            for k, t in ts.items():
                w.write(k, t)
    return w


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------


def test_reads_what_safetensors_writes_every_dtype(tmp_path):
    ts = all_dtype_tensors()
    f = tmp_path / "all.safetensors"
    save_file(ts, str(f), metadata={"format": "pt", "note": "hello"})
    with CheckpointReader(f) as r:
        assert r.keys() == sorted(ts)
        assert r.metadata == {"format": "pt", "note": "hello"}
        assert r.folder is None and not r.is_folder and r.config_path is None
        assert r.total_bytes == sum(t.numel() * t.element_size() for t in ts.values())
        data = f.read_bytes()
        for k, t in ts.items():
            got = r.read(k)
            assert same(got, t), k
            info = r.info(k)
            assert isinstance(info, TensorInfo)
            assert info.dtype == t.dtype and info.dtype_str == dtype_to_str(t.dtype)
            assert info.shape == tuple(t.shape) and info.file == f
            assert data[info.offset : info.offset + info.nbytes] == bytes(raw(t).numpy())


def test_safetensors_reads_what_we_write_every_dtype(tmp_path):
    ts = all_dtype_tensors()
    write_ours(tmp_path, {"model.safetensors": ts}, {"note": "x"})
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(loaded) == sorted(ts)
    for k, t in ts.items():
        assert same(loaded[k], t), k
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "x", "format": "pt"}


def test_writer_header_layout(tmp_path):
    ts = {"z": torch.ones(3), "a": torch.zeros(2, dtype=torch.float16)}
    write_ours(tmp_path, {"m.safetensors": ts}, {"format": "pt", "k": "v"})
    blob = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0
    header = blob[8 : 8 + n]
    assert header.rstrip(b" ") != header or len(header.rstrip(b" ")) == n
    doc = json.loads(header)
    assert list(doc) == ["__metadata__", "z", "a"]  # metadata first, then the given order
    assert doc["__metadata__"] == {"format": "pt", "k": "v"}
    assert doc["z"]["data_offsets"] == [0, 12] and doc["a"]["data_offsets"] == [12, 16]
    assert len(blob) == 8 + n + 16


def test_writer_any_order_from_threads_and_sharded_index(tmp_path):
    shards = {
        f"model-0000{i}-of-00003.safetensors": {f"s{i}.w{j}": torch.randn(17, 9 + j) for j in range(6)}
        for i in range(1, 4)
    }
    layout = [(f, [(k, t.dtype, tuple(t.shape)) for k, t in ts.items()]) for f, ts in shards.items()]
    items = [(k, t) for ts in shards.values() for k, t in ts.items()]
    items.reverse()
    w = SafetensorsWriter(tmp_path, layout, {})
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda kt: w.write(*kt), items))
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for _, t in items)
    assert index["weight_map"] == {k: f for f, ts in shards.items() for k in ts}
    assert w.files[-1] == tmp_path / "model.safetensors.index.json"
    with CheckpointReader(tmp_path) as r:
        assert r.is_folder and r.folder == tmp_path
        assert [f for f, _ in r.layout] == list(shards)
        assert r.layout == [(f, list(ts)) for f, ts in shards.items()]
        for k, t in items:
            assert same(r.read(k), t)
    for f, ts in shards.items():
        loaded = load_file(str(tmp_path / f))
        assert all(same(loaded[k], t) for k, t in ts.items())


def test_unaligned_layout_still_loads(tmp_path):
    ts = {"b": torch.tensor(1.5, dtype=torch.bfloat16), "a": torch.arange(3.0)}
    write_ours(tmp_path, {"x.safetensors": ts})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert same(loaded["a"], ts["a"]) and same(loaded["b"], ts["b"])


# --------------------------------------------------------------------------------------
# writer misuse
# --------------------------------------------------------------------------------------


@pytest.fixture
def one_writer(tmp_path):
    w = SafetensorsWriter(tmp_path, [("m.safetensors", [("a", torch.float32, (2, 3)), ("b", "I64", (4,))])])
    yield w
    w.abort()


@pytest.mark.parametrize(
    "name,tensor,match",
    [
        ("nope", torch.zeros(2, 3), "not in this writer's layout"),
        ("a", torch.zeros(2, 3, dtype=torch.float64), "dtype"),
        ("a", torch.zeros(3, 2), "shape"),
        ("a", torch.zeros(3, 2).t(), "contiguous"),
        ("a", torch.zeros(2, 3, device="meta"), "CPU"),
        ("a", [[0.0] * 3] * 2, "torch.Tensor"),
    ],
    ids=["unknown", "dtype", "shape", "noncontiguous", "device", "not-a-tensor"],
)
def test_writer_rejects_bad_tensors(one_writer, name, tensor, match):
    with pytest.raises(ValueError, match=match):
        one_writer.write(name, tensor)


def test_writer_exactly_once(one_writer, tmp_path):
    one_writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="twice"):
        one_writer.write("a", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="never written.*b"):
        one_writer.close()
    one_writer.abort()
    assert not (tmp_path / "m.safetensors").exists()  # abort deletes what it wrote


def test_writer_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        SafetensorsWriter(tmp_path, [("m.safetensors", [("a", torch.float32, (1,)), ("a", torch.float32, (1,))])])
    with pytest.raises(ValueError, match="plain file name"):
        SafetensorsWriter(tmp_path, [("../m.safetensors", [("a", torch.float32, (1,))])])
    with pytest.raises(ValueError, match="str to str"):
        SafetensorsWriter(tmp_path, [("m.safetensors", [])], {"a": 1})
    with pytest.raises(ValueError, match="cannot be stored"):
        SafetensorsWriter(tmp_path, [("m.safetensors", [("a", torch.complex128, (1,))])])
    (tmp_path / "e.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="already exists"):
        SafetensorsWriter(tmp_path, [("e.safetensors", [])])
    assert (tmp_path / "e.safetensors").read_bytes() == b"x"


def test_writer_disk_full_is_output_error(tmp_path, monkeypatch):
    import errno

    w = SafetensorsWriter(tmp_path, [("m.safetensors", [("a", torch.float32, (4,))])])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputError, match="disk full while writing .*m.safetensors"):
        w.write("a", torch.zeros(4))
    monkeypatch.undo()
    w.abort()


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real = os.pwrite

    def short(fd, data, off):
        return real(fd, bytes(memoryview(data)[:3]), off)  # at most 3 bytes per call

    monkeypatch.setattr(os, "pwrite", short)
    t = torch.randn(5, 7)
    write_ours(tmp_path, {"m.safetensors": {"a": t}})
    monkeypatch.undo()
    assert same(load_file(str(tmp_path / "m.safetensors"))["a"], t)


# --------------------------------------------------------------------------------------
# reading API
# --------------------------------------------------------------------------------------


@pytest.fixture
def small_file(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    ts = {f"w{i}": torch.randn(4 + i, 3) for i in range(8)}
    ts["h"] = torch.randn(2, 3).to(torch.bfloat16)
    f = tmp_path / "small.safetensors"
    save_file(ts, str(f))
    return f, ts


def test_read_into_preallocated_buffer(small_file):
    f, ts = small_file
    buf = torch.empty(1024, dtype=torch.uint8)
    with CheckpointReader(f) as r:
        for k, t in ts.items():
            got = r.read(k, out=buf)
            assert same(got, t)
            assert got.data_ptr() == buf.data_ptr()  # a view of the buffer, no copy
        with pytest.raises(ValueError, match="needs"):
            r.read("w7", out=torch.empty(3, dtype=torch.uint8))
        with pytest.raises(ValueError, match="uint8"):
            r.read("w0", out=torch.empty(100, dtype=torch.float32))
        with pytest.raises(ValueError, match="contiguous"):
            r.read("w0", out=torch.empty(100, 2, dtype=torch.uint8).t())


def test_read_bytes_and_sample(small_file):
    f, ts = small_file
    data = f.read_bytes()
    with CheckpointReader(f) as r:
        info = r.info("w3")
        assert r.read_bytes("w3", 4, 10) == data[info.offset + 4 : info.offset + 14]
        assert r.read_bytes("w3", 0, info.nbytes) == bytes(raw(ts["w3"]).numpy())
        with pytest.raises(ValueError):
            r.read_bytes("w3", info.nbytes - 2, 3)
        with pytest.raises(ValueError):
            r.read_bytes("w3", -1, 2)
        assert r.read_sample("w3") == bytes(raw(ts["w3"]).numpy())
        assert len(r.read_sample("w3", size=9)) == 9


def test_concurrent_reads(small_file):
    f, ts = small_file
    with CheckpointReader(f) as r:
        keys = list(ts) * 20
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(r.read, keys))
        assert all(same(got, ts[k]) for k, got in zip(keys, results))


def test_unknown_name_and_closed_reader(small_file):
    f, _ = small_file
    r = CheckpointReader(f)
    assert "w0" in r and "nope" not in r and len(r) == 9
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        r.read("nope")
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.read("w0")
    r.close()  # idempotent


def test_close_waits_for_reads_in_flight(small_file, monkeypatch):
    f, ts = small_file
    r = CheckpointReader(f)
    import opcm_ext.checkpoint as ck

    started, release = threading.Event(), threading.Event()
    real = ck._pread_into

    def slow(*a, **k):
        started.set()
        release.wait(5)
        return real(*a, **k)

    monkeypatch.setattr(ck, "_pread_into", slow)
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("t", r.read("w1")))
    th.start()
    started.wait(5)
    closer = threading.Thread(target=r.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # blocked until the read finishes
    release.set()
    th.join(5)
    closer.join(5)
    assert same(result["t"], ts["w1"])


def test_truncation_after_open_is_checkpoint_error(small_file):
    f, _ = small_file
    with CheckpointReader(f) as r:
        info = r.info("w7")
        os.truncate(f, info.offset + 5)
        with pytest.raises(CheckpointError, match="truncated"):
            r.read("w7")
        with pytest.raises(CheckpointError, match="truncated"):
            r.read_bytes("w7", 0, 8)


def test_truncated_file_is_caught_at_construction(small_file):
    f, _ = small_file
    os.truncate(f, f.stat().st_size - 1)
    with pytest.raises(CheckpointError, match="beyond the data section"):
        CheckpointReader(f)


# --------------------------------------------------------------------------------------
# content identity
# --------------------------------------------------------------------------------------


def test_content_hash_ignores_sharding_but_not_content(tmp_path):
    ts = {f"k{i}": torch.randn(3, 4) for i in range(6)}
    ts["ids"] = torch.arange(5)
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    save_file(ts, str(tmp_path / "one" / "model.safetensors"))
    keys = sorted(ts)
    write_ours(
        tmp_path / "many",
        {"a.safetensors": {k: ts[k] for k in keys[:3]}, "b.safetensors": {k: ts[k] for k in keys[3:]}},
    )
    with CheckpointReader(tmp_path / "one") as a, CheckpointReader(tmp_path / "many") as b:
        ha = content_hash(a)
        assert ha == content_hash(b)
        assert len(ha) == 32
    h = TensorHasher()
    for k in keys:
        h.update(k, ts[k])
    assert h.hexdigest() == ha

    def digest(d: dict[str, torch.Tensor]) -> str:
        h = TensorHasher()
        for k in sorted(d):
            h.update(k, d[k])
        return h.hexdigest()

    changed = dict(ts)
    changed["k0"] = ts["k0"].clone()
    changed["k0"][0, 0] += 1
    renamed = {("j0" if k == "k0" else k): v for k, v in ts.items()}
    retyped = dict(ts, k0=ts["k0"].view(torch.int32))
    reshaped = dict(ts, k0=ts["k0"].reshape(4, 3))
    noncontig = dict(ts, k0=ts["k0"].t().contiguous().t())
    assert digest(noncontig) == ha
    assert len({ha, digest(changed), digest(renamed), digest(retyped), digest(reshaped)}) == 5


def test_hasher_requires_sorted_order():
    h = TensorHasher()
    h.update("b", torch.zeros(1))
    with pytest.raises(ValueError, match="sorted"):
        h.update("a", torch.zeros(1))
    with pytest.raises(ValueError, match="sorted"):
        h.update("b", torch.zeros(1))


# --------------------------------------------------------------------------------------
# corrupt headers: each one a CheckpointError that names the file and the problem
# --------------------------------------------------------------------------------------

F4 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}

CORRUPT = {
    "short-file": (b"", b"", 0, "shorter than the 8-byte"),
    "length-too-big": (json.dumps({"a": F4}).encode(), b"\0" * 4, 10_000, "larger than the rest of the file"),
    "length-huge": (b"{}", b"", 2**64 - 1, "larger than the rest of the file"),
    "truncated-header": (b'{"a": {"dtype": "F32", "sh', b"", 400, "larger than the rest"),
    "not-json": (b"{not json}", b"", None, "not valid UTF-8 JSON"),
    "not-utf8": (b'{"\xff\xfe": 1}', b"", None, "not valid UTF-8 JSON"),
    "empty-header": (b"", b"", None, "not valid UTF-8 JSON"),
    "json-array": (b"[1, 2]", b"", None, "JSON list, not an object"),
    "json-string": (b'"hi"', b"", None, "JSON str, not an object"),
    "deep-nesting": (b"[" * 200_000, b"", None, "not valid UTF-8 JSON"),
    "huge-int": (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', b"", None, "not valid"),
    "duplicate-key": (b'{"a": ' + json.dumps(F4).encode() + b', "a": ' + json.dumps(F4).encode() + b"}", b"\0" * 4, None, "twice"),
    "entry-not-object": ({"a": [1, 2]}, b"", None, "not an object"),
    "missing-field": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "lacks data_offsets"),
    "bad-dtype": ({"a": dict(F4, dtype="F31")}, b"\0" * 4, None, "unknown dtype 'F31'"),
    "dtype-not-str": ({"a": dict(F4, dtype=4)}, b"\0" * 4, None, "not a string"),
    "sub-byte-dtype": ({"a": dict(F4, dtype="F4")}, b"\0" * 4, None, "sub-byte"),
    "negative-shape": ({"a": dict(F4, shape=[-1])}, b"\0" * 4, None, "non-negative integers"),
    "float-shape": ({"a": dict(F4, shape=[1.0])}, b"\0" * 4, None, "non-negative integers"),
    "bool-shape": ({"a": dict(F4, shape=[True])}, b"\0" * 4, None, "non-negative integers"),
    "shape-not-list": ({"a": dict(F4, shape=1)}, b"\0" * 4, None, "non-negative integers"),
    "offsets-not-pair": ({"a": dict(F4, data_offsets=[0, 4, 8])}, b"\0" * 8, None, "pair of integers"),
    "offsets-reversed": ({"a": dict(F4, data_offsets=[4, 0])}, b"\0" * 4, None, "not ordered"),
    "offsets-negative": ({"a": dict(F4, data_offsets=[-4, 0])}, b"\0" * 4, None, "not ordered"),
    "offsets-mismatch-shape": ({"a": dict(F4, shape=[2])}, b"\0" * 8, None, "needs 8 bytes"),
    "huge-shape": ({"a": dict(F4, shape=[2**62, 2**62])}, b"\0" * 4, None, "needs more than"),
    "offsets-beyond-eof": ({"a": dict(F4, data_offsets=[4, 8])}, b"\0" * 4, None, "beyond the data section"),
    "truncated-data": ({"a": dict(F4, shape=[4], data_offsets=[0, 16])}, b"\0" * 8, None, "beyond the data section"),
    "overlap": (
        {"a": dict(F4, shape=[2], data_offsets=[0, 8]), "b": dict(F4, shape=[2], data_offsets=[4, 12])},
        b"\0" * 12,
        None,
        "overlap",
    ),
    "metadata-not-str": ({"__metadata__": {"a": 1}}, b"", None, "__metadata__ must map strings"),
    "metadata-list": ({"__metadata__": ["a"]}, b"", None, "__metadata__ must map strings"),
}


@pytest.mark.parametrize("case", list(CORRUPT), ids=list(CORRUPT))
def test_corrupt_headers(tmp_path, case):
    header, data, length, match = CORRUPT[case]
    f = tmp_path / "bad.safetensors"
    if case == "short-file":
        f.write_bytes(b"\x01\x02\x03")
    else:
        write_raw(f, header, data, length)
    with pytest.raises(CheckpointError, match=match) as ei:
        CheckpointReader(f)
    assert str(f) in str(ei.value)


def test_header_over_100mb_refused_before_reading(tmp_path):
    f = tmp_path / "huge.safetensors"
    n = 100_000_001
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", n))
        fh.truncate(8 + n + 16)  # sparse: the length is "plausible" for the file size
    with pytest.raises(CheckpointError, match="limit"):
        CheckpointReader(f)


def test_zero_length_tensors_do_not_count_as_overlap(tmp_path):
    f = write_raw(
        tmp_path / "z.safetensors",
        {"a": dict(F4, shape=[2], data_offsets=[0, 8]), "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}},
        b"\0" * 8,
    )
    with CheckpointReader(f) as r:
        assert r.read("e").shape == (0,)


def test_null_metadata_is_empty(tmp_path):
    f = write_raw(tmp_path / "n.safetensors", {"__metadata__": None, "a": F4}, b"\0" * 4)
    with CheckpointReader(f) as r:
        assert r.metadata == {}


# --------------------------------------------------------------------------------------
# folders, indexes and refused formats
# --------------------------------------------------------------------------------------


def make_sharded(folder: Path) -> dict[str, torch.Tensor]:
    ts = {"a": torch.randn(3), "b": torch.randn(2, 2), "c": torch.arange(4), "d": torch.randn(5)}
    write_ours(folder, {"s1.safetensors": {"a": ts["a"], "b": ts["b"]}, "s2.safetensors": {"c": ts["c"], "d": ts["d"]}})
    return ts


def edit_index(folder: Path, fn) -> None:
    p = folder / "model.safetensors.index.json"
    doc = json.loads(p.read_text())
    fn(doc["weight_map"])
    p.write_text(json.dumps(doc))


def test_index_path_and_folder(tmp_path):
    ts = make_sharded(tmp_path)
    for p in (tmp_path, tmp_path / "model.safetensors.index.json"):
        with CheckpointReader(p) as r:
            assert r.folder == tmp_path
            assert r.keys() == ["a", "b", "c", "d"]
            assert r.layout == [("s1.safetensors", ["a", "b"]), ("s2.safetensors", ["c", "d"])]
            assert set(r.shard_metadata) == {"s1.safetensors", "s2.safetensors"}
            assert r.metadata == {"format": "pt"}
            assert all(same(r.read(k), t) for k, t in ts.items())


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda wm: wm.update(a="gone.safetensors"), "missing from"),
        (lambda wm: wm.update(a="../s1.safetensors"), "refusing shard name"),
        (lambda wm: wm.update(a="/etc/passwd"), "refusing shard name"),
        (lambda wm: wm.update(a="sub/s1.safetensors"), "refusing shard name"),
        (lambda wm: wm.update(a=".."), "refusing shard name"),
        (lambda wm: wm.update(a=7), "not a file name"),
        (lambda wm: wm.pop("a"), "present in a shard but not in the index"),
        (lambda wm: wm.update(zzz="s1.safetensors"), "listed in the index but absent"),
        (lambda wm: wm.update(a="s2.safetensors"), "different shard than the index says"),
        (lambda wm: wm.clear(), "no weight_map"),
    ],
    ids=["missing-shard", "dotdot", "absolute", "subdir", "bare-dotdot", "not-str", "extra-key",
         "missing-key", "misplaced", "empty"],
)
def test_bad_index(tmp_path, edit, match):
    make_sharded(tmp_path)
    edit_index(tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        CheckpointReader(tmp_path)


def test_hub_cache_symlinked_shards(tmp_path):
    """A Hugging Face cache snapshot: shard names are symlinks into ../blobs, which is fine."""
    src = tmp_path / "src"
    src.mkdir()
    ts = make_sharded(src)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (blobs / f"h-{f.name}").write_bytes(f.read_bytes())
        os.symlink(Path("..") / ".." / "blobs" / f"h-{f.name}", snap / f.name)
    with CheckpointReader(snap) as r:
        assert all(same(r.read(k), t) for k, t in ts.items())


def test_duplicate_key_across_shards(tmp_path):
    write_ours(tmp_path, {"s1.safetensors": {"a": torch.zeros(1)}, "s2.safetensors": {"a2": torch.zeros(1)}})
    (tmp_path / "s2.safetensors").unlink()
    write_ours(tmp_path, {"s2.safetensors": {"a": torch.zeros(1)}})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="stored in two shards"):
        CheckpointReader(tmp_path)


def test_index_not_json(tmp_path):
    make_sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointReader(tmp_path)


def test_folder_resolution(tmp_path):
    t = {"a": torch.zeros(2)}
    one = tmp_path / "one"
    one.mkdir()
    save_file(t, str(one / "weights.safetensors"))
    with CheckpointReader(one) as r:
        assert r.files == [one / "weights.safetensors"] and r.config_path is None
    save_file(t, str(one / "other.safetensors"))
    with pytest.raises(CheckpointError, match="several .safetensors"):
        CheckpointReader(one)
    (one / "config.json").write_text("{}")
    save_file(t, str(one / "model.safetensors"))
    with CheckpointReader(one) as r:  # model.safetensors wins, like transformers
        assert r.files == [one / "model.safetensors"] and r.config_path == one / "config.json"
    with CheckpointReader(one / "model.safetensors") as r:  # the folder's own weights: its config applies
        assert r.folder is None and r.config_path == one / "config.json"
    with CheckpointReader(one / "other.safetensors") as r:  # a side file: no config
        assert r.config_path is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no model weights"):
        CheckpointReader(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_checkpoints_refused_with_recipe(tmp_path, name):
    torch.save({"a": torch.zeros(2)}, tmp_path / name)
    for p in (tmp_path, tmp_path / name):
        with pytest.raises(CheckpointError) as ei:
            CheckpointReader(p)
        msg = str(ei.value)
        assert "save_file" in msg and "safe_serialization=True" in msg and name in msg


def test_pickle_recipe_works(tmp_path):
    """The conversion snippet in the message actually produces a readable checkpoint."""
    sd = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    sd["tied"] = sd["a"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(tmp_path)
    msg = str(ei.value)
    code = "\n".join(
        line.strip() for line in msg.splitlines() if line.startswith("    ") and "from_pretrained" not in line
    )
    exec(code, {})
    with CheckpointReader(tmp_path) as r:
        assert r.keys() == ["a", "b", "tied"] and same(r.read("b"), sd["b"])


# --------------------------------------------------------------------------------------
# transformers: sharded save_pretrained folders in, from_pretrained-loadable folders out
# --------------------------------------------------------------------------------------


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def tiny_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=8, patch_size=4, projection_dim=8,
    )
    return CLIPVisionModel(cfg)


@pytest.fixture(scope="module", params=["llama", "clip-vision"])
def hf_model(request, tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_llama() if request.param == "llama" else tiny_clip_vision()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, max_shard_size="8KB")
    return request.param, model, folder


def test_reads_sharded_save_pretrained(hf_model):
    _, model, folder = hf_model
    sd = model.state_dict()
    with CheckpointReader(folder) as r:
        assert len(r.layout) > 2 and r.config_path == folder / "config.json"
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert r.total_bytes == index["metadata"]["total_size"]
        assert set(r.keys()) <= set(sd)
        for k in r.keys():
            assert same(r.read(k), sd[k].contiguous()), k


def test_writer_output_loads_with_from_pretrained(hf_model, tmp_path):
    from opcm_ext.checkpoint import OutputTransaction

    kind, model, folder = hf_model
    cls = type(model)
    out = tmp_path / "out"
    with CheckpointReader(folder) as r:
        layout = [(f, [(k, r.info(k).dtype, r.info(k).shape) for k in keys]) for f, keys in r.layout]
        if kind == "clip-vision":  # re-shard into a single file
            layout = [("model.safetensors", [e for _, es in layout for e in es])]
        with OutputTransaction(out, like_folder=r, expected_bytes=r.total_bytes) as tx:
            w = tx.writer(layout, {"opcm_ext.state": "{}"})
            for k in reversed(r.keys()):
                w.write(k, r.read(k))
            tx.commit()
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    loaded = cls.from_pretrained(out)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert same(got[k].contiguous(), want[k].contiguous()), k
    with CheckpointReader(out) as r2, CheckpointReader(folder) as r1:
        assert content_hash(r1) == content_hash(r2)
        assert r2.metadata["opcm_ext.state"] == "{}" and r2.metadata["format"] == "pt"
