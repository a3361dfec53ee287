"""opcm_ext.io.reader: our safetensors reader against the safetensors library and transformers.

Validation of every header field, folders and shard indexes, refused formats, whole reads,
row blocks and column blocks (against torch slicing, every dtype), file identity, pickling.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import all_dtype_tensors, bytes_tensor, raw_bytes, same_tensor, write_shards
from safetensors.torch import save_file

from opcm_ext.errors import CheckpointError
from opcm_ext.io import DTYPES, CheckpointReader, OutputTransaction, TensorInfo, content_hash, dtype_to_str

ALL_DTYPES = sorted(DTYPES.items())


def write_raw(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


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
            assert same_tensor(got, t), k
            info = r.info(k)
            assert isinstance(info, TensorInfo)
            assert info.dtype == t.dtype and info.dtype_str == dtype_to_str(t.dtype)
            assert info.shape == tuple(t.shape) and info.file == f
            assert data[info.offset : info.offset + info.nbytes] == bytes(raw_bytes(t).numpy())

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
            assert same_tensor(got, t)
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
        assert r.read_bytes("w3", 0, info.nbytes) == bytes(raw_bytes(ts["w3"]).numpy())
        with pytest.raises(ValueError):
            r.read_bytes("w3", info.nbytes - 2, 3)
        with pytest.raises(ValueError):
            r.read_bytes("w3", -1, 2)
        assert r.read_sample("w3") == bytes(raw_bytes(ts["w3"]).numpy())
        assert len(r.read_sample("w3", size=9)) == 9


def test_concurrent_reads(small_file):
    f, ts = small_file
    with CheckpointReader(f) as r:
        keys = list(ts) * 20
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(r.read, keys))
        assert all(same_tensor(got, ts[k]) for k, got in zip(keys, results))


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
    import opcm_ext.io._fs as fs

    started, release = threading.Event(), threading.Event()
    real = fs.pread_into

    def slow(*a, **k):
        started.set()
        release.wait(5)
        return real(*a, **k)

    monkeypatch.setattr(fs, "pread_into", slow)
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
    assert same_tensor(result["t"], ts["w1"])


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
    write_shards(folder, {"s1.safetensors": {"a": ts["a"], "b": ts["b"]}, "s2.safetensors": {"c": ts["c"], "d": ts["d"]}})
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
            assert all(same_tensor(r.read(k), t) for k, t in ts.items())


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
        assert all(same_tensor(r.read(k), t) for k, t in ts.items())


def test_duplicate_key_across_shards(tmp_path):
    write_shards(tmp_path, {"s1.safetensors": {"a": torch.zeros(1)}, "s2.safetensors": {"a2": torch.zeros(1)}})
    (tmp_path / "s2.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").unlink()  # the writer indexes s2 alone too; replaced below
    write_shards(tmp_path, {"s2.safetensors": {"a": torch.zeros(1)}})
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
        assert r.keys() == ["a", "b", "tied"] and same_tensor(r.read("b"), sd["b"])

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
            assert same_tensor(r.read(k), sd[k].contiguous()), k


def test_writer_output_loads_with_from_pretrained(hf_model, tmp_path):
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
        assert same_tensor(got[k].contiguous(), want[k].contiguous()), k
    with CheckpointReader(out) as r2, CheckpointReader(folder) as r1:
        assert content_hash(r1) == content_hash(r2)
        assert r2.metadata["opcm_ext.state"] == "{}" and r2.metadata["format"] == "pt"


# --------------------------------------------------------------------------------------
# row blocks and column blocks: the same bytes as torch slicing, for every dtype
# --------------------------------------------------------------------------------------

BLOCK_SHAPE = (7, 5)
ROW_CASES = [(0, 7), (0, 1), (6, 7), (2, 5), (3, 4)]
COL_CASES = [(0, 5), (0, 1), (4, 5), (1, 4), (2, 3)]


@pytest.fixture(scope="module")
def blocks_file(tmp_path_factory):
    ts = {f"m.{code}": bytes_tensor(dt, BLOCK_SHAPE, seed=i) for i, (code, dt) in enumerate(ALL_DTYPES)}
    ts["m.BOOL"] = bytes_tensor(torch.uint8, BLOCK_SHAPE, seed=97) % 2 == 1  # copies of bools normalise bytes
    ts["cube"] = bytes_tensor(torch.float32, (4, 3, 2), seed=99)
    ts["vec"] = bytes_tensor(torch.bfloat16, (9,), seed=98)
    ts["scalar"] = torch.tensor(1.5)
    ts["wide0"] = torch.empty((3, 0), dtype=torch.float16)
    f = tmp_path_factory.mktemp("blocks") / "b.safetensors"
    save_file(ts, str(f))
    return f, ts


@pytest.mark.parametrize("code", [c for c, _ in ALL_DTYPES])
def test_row_and_column_blocks_match_torch_slicing(blocks_file, code):
    f, ts = blocks_file
    t = ts[f"m.{code}"]
    with CheckpointReader(f) as r:
        for r0, r1 in ROW_CASES:
            assert same_tensor(r.read(f"m.{code}", rows=(r0, r1)), t[r0:r1]), (r0, r1)
        for c0, c1 in COL_CASES:
            got = r.read_columns(f"m.{code}", c0, c1)
            assert got.is_contiguous() and same_tensor(got, t[:, c0:c1].contiguous()), (c0, c1)
        got = r.read_columns(f"m.{code}", 1, 4, rows=(2, 6))
        assert same_tensor(got, t[2:6, 1:4].contiguous())


def test_row_blocks_of_other_ranks(blocks_file):
    f, ts = blocks_file
    with CheckpointReader(f) as r:
        assert same_tensor(r.read("cube", rows=(1, 3)), ts["cube"][1:3])
        assert same_tensor(r.read("vec", rows=(8, 9)), ts["vec"][8:9])
        assert same_tensor(r.read("wide0", rows=(1, 2)), ts["wide0"][1:2])


def test_blocks_into_a_buffer(blocks_file):
    f, ts = blocks_file
    buf = torch.empty(4096, dtype=torch.uint8)
    with CheckpointReader(f) as r:
        got = r.read("m.F32", buf, rows=(3, 6))
        assert got.data_ptr() == buf.data_ptr() and same_tensor(got, ts["m.F32"][3:6])
        got = r.read_columns("m.BF16", 2, 5, out=buf)
        assert got.data_ptr() == buf.data_ptr() and same_tensor(got, ts["m.BF16"][:, 2:5].contiguous())
        with pytest.raises(ValueError, match="holds 7 bytes, .m.F32. needs 8"):
            r.read_columns("m.F32", 0, 1, out=torch.empty(7, dtype=torch.uint8), rows=(0, 2))


def test_column_block_is_one_pread_per_row(blocks_file, monkeypatch):
    import opcm_ext.io._fs as fs

    f, ts = blocks_file
    calls = []
    real = fs.pread_into

    def spy(fd, mv, offset, path, what):
        calls.append((offset, len(mv)))
        return real(fd, mv, offset, path, what)

    monkeypatch.setattr(fs, "pread_into", spy)
    with CheckpointReader(f) as r:
        info = r.info("m.F16")
        r.read_columns("m.F16", 1, 3)
        assert calls == [(info.offset + i * 10 + 2, 4) for i in range(7)]
        calls.clear()
        r.read("m.F16", rows=(2, 4))
        assert calls == [(info.offset + 20, 20)]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda r: r.read("m.F32", rows=(3, 3)), r"rows=\(3, 3\) for tensor 'm.F32' of shape \(7, 5\): need a pair"),
        (lambda r: r.read("m.F32", rows=(4, 2)), "0 <= start < stop <= 7"),
        (lambda r: r.read("m.F32", rows=(0, 8)), "0 <= start < stop <= 7"),
        (lambda r: r.read("m.F32", rows=(-1, 2)), "0 <= start < stop"),
        (lambda r: r.read("m.F32", rows=(0.0, 2)), "pair of integers"),
        (lambda r: r.read("m.F32", rows=(True, 2)), "pair of integers"),
        (lambda r: r.read("m.F32", rows=(1, 2, 3)), "pair of integers"),
        (lambda r: r.read("m.F32", rows=5), "pair of integers"),
        (lambda r: r.read("scalar", rows=(0, 1)), "0-d"),
        (lambda r: r.read_columns("m.F32", 2, 2), r"cols=\(2, 2\)"),
        (lambda r: r.read_columns("m.F32", 0, 6), "<= 5"),
        (lambda r: r.read_columns("cube", 0, 1), "need a 2-D tensor"),
        (lambda r: r.read_columns("vec", 0, 1), "need a 2-D tensor"),
        (lambda r: r.read_columns("wide0", 0, 1), "<= 0"),
    ],
    ids=["empty-rows", "reversed-rows", "rows-past-end", "negative-row", "float-row", "bool-row", "triple",
         "not-a-pair", "scalar-rows", "empty-cols", "cols-past-end", "cols-of-3d", "cols-of-1d", "no-columns"],
)
def test_block_argument_errors(blocks_file, call, match):
    f, _ = blocks_file
    with CheckpointReader(f) as r:
        with pytest.raises(ValueError, match=match):
            call(r)


def test_numpy_integers_are_accepted(blocks_file):
    import numpy as np

    f, ts = blocks_file
    with CheckpointReader(f) as r:
        assert same_tensor(r.read("m.I32", rows=(np.int64(1), np.int32(3))), ts["m.I32"][1:3])


def test_truncation_under_a_block_read(small_file):
    f, _ = small_file
    with CheckpointReader(f) as r:
        info = r.info("w7")
        os.truncate(f, info.offset + 13)
        assert r.read("w7", rows=(0, 1)).shape == (1, 3)
        with pytest.raises(CheckpointError, match="truncated"):
            r.read("w7", rows=(1, 2))
        with pytest.raises(CheckpointError, match="truncated"):
            r.read_columns("w7", 0, 1)


def test_read_into(small_file):
    f, ts = small_file
    want = bytes(raw_bytes(ts["w3"]).numpy())
    with CheckpointReader(f) as r:
        buf = bytearray(10)
        r.read_into("w3", 4, buf)
        assert bytes(buf) == want[4:14]
        t = torch.empty(len(want), dtype=torch.uint8)
        r.read_into("w3", 0, t)
        assert bytes(t.numpy()) == want
        with pytest.raises(ValueError, match="outside tensor"):
            r.read_into("w3", 1, bytearray(len(want)))
        with pytest.raises(ValueError, match="uint8"):
            r.read_into("w3", 0, torch.empty(2))


# --------------------------------------------------------------------------------------
# file identity and other processes
# --------------------------------------------------------------------------------------


def test_file_identity_of_a_file_and_of_shards(tmp_path, small_file):
    f, _ = small_file
    with CheckpointReader(f) as r:
        (ident,) = r.file_identity()
        st = os.stat(f)
        assert ident == (os.path.realpath(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    make_sharded(sharded)
    with CheckpointReader(sharded) as r:
        ids = r.file_identity()
        names = [os.path.basename(i[0]) for i in ids]
        assert names == ["s1.safetensors", "s2.safetensors", "model.safetensors.index.json"]
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.file_identity()


def test_file_identity_follows_changes(tmp_path):
    make_sharded(tmp_path)
    with CheckpointReader(tmp_path) as r:
        before = r.file_identity()
        assert r.file_identity() == before
        idx = tmp_path / "model.safetensors.index.json"
        with open(tmp_path / "s2.safetensors", "r+b") as fh:  # edited in place: size and mtime move
            fh.seek(0, 2)
            fh.write(b"\0" * 8)
        after = r.file_identity()
        assert after[0] == before[0] and after[1] != before[1] and after[2] == before[2]
    os.utime(idx, ns=(1, 1))
    with CheckpointReader(tmp_path) as r2:
        assert r2.file_identity()[2][4] == 1


def test_symlinked_file_identity_is_the_target(tmp_path, small_file):
    f, _ = small_file
    link = tmp_path / "link.safetensors"
    os.symlink(f, link)
    with CheckpointReader(link) as a, CheckpointReader(f) as b:
        assert a.file_identity() == b.file_identity()


def _keys_and_row(reader):
    return reader.keys(), reader.read("w2", rows=(1, 3)).clone()


def test_reader_travels_to_another_process(small_file):
    import multiprocessing as mp

    f, ts = small_file
    with CheckpointReader(f) as r:
        clone = pickle.loads(pickle.dumps(r))
        assert clone.path == r.path and clone.keys() == r.keys()
        clone.close()
        with mp.get_context("spawn").Pool(1) as pool:
            keys, rows = pool.apply(_keys_and_row, (r,))
    assert keys == sorted(ts) and same_tensor(rows, ts["w2"][1:3])
