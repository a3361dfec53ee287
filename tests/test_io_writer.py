"""opcm_ext.io.writer: headers first, tensors (whole, row or column blocks) at fixed offsets, from any
thread or process; coverage checked at close; output that safetensors and transformers load."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import all_dtype_tensors, same_tensor, write_shards
from safetensors.torch import load_file

from opcm_ext.errors import OutputError
from opcm_ext.io import CheckpointReader, SafetensorsWriter

# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------


def test_safetensors_reads_what_we_write_every_dtype(tmp_path):
    ts = all_dtype_tensors()
    write_shards(tmp_path, {"model.safetensors": ts}, {"note": "x"})
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(loaded) == sorted(ts)
    for k, t in ts.items():
        assert same_tensor(loaded[k], t), k
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "x", "format": "pt"}


def test_writer_header_layout(tmp_path):
    ts = {"z": torch.ones(3), "a": torch.zeros(2, dtype=torch.float16)}
    write_shards(tmp_path, {"m.safetensors": ts}, {"format": "pt", "k": "v"})
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
            assert same_tensor(r.read(k), t)
    for f, ts in shards.items():
        loaded = load_file(str(tmp_path / f))
        assert all(same_tensor(loaded[k], t) for k, t in ts.items())


def test_unaligned_layout_still_loads(tmp_path):
    ts = {"b": torch.tensor(1.5, dtype=torch.bfloat16), "a": torch.arange(3.0)}
    write_shards(tmp_path, {"x.safetensors": ts})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert same_tensor(loaded["a"], ts["a"]) and same_tensor(loaded["b"], ts["b"])

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
    write_shards(tmp_path, {"m.safetensors": {"a": t}})
    monkeypatch.undo()
    assert same_tensor(load_file(str(tmp_path / "m.safetensors"))["a"], t)


# --------------------------------------------------------------------------------------
# row and column blocks, and the coverage check at close
# --------------------------------------------------------------------------------------

BLOCKS = {
    "m": torch.arange(42, dtype=torch.float32).reshape(7, 6),
    "h": torch.randn(5, 4).to(torch.bfloat16),
    "c": torch.arange(24, dtype=torch.int16).reshape(4, 3, 2),
    "s": torch.tensor(3.0, dtype=torch.float16),
    "e": torch.empty((0, 3)),
}


def blocks_layout(ts=BLOCKS):
    return [("model.safetensors", [(k, t.dtype, tuple(t.shape)) for k, t in ts.items()])]


def test_blocks_tile_tensors_in_any_order(tmp_path):
    w = SafetensorsWriter(tmp_path, blocks_layout())
    m, h, c = BLOCKS["m"], BLOCKS["h"], BLOCKS["c"]
    w.write("m", m[:, 4:6].contiguous(), cols=(4, 6))
    w.write("m", m[5:7, 0:4].contiguous(), rows=(5, 7), cols=(0, 4))
    w.write("m", m[0:5, 0:1].contiguous(), rows=(0, 5), cols=(0, 1))
    w.write("m", m[0:5, 1:4].contiguous(), rows=(0, 5), cols=(1, 4))
    w.write("h", h[3:5], rows=(3, 5))
    w.write("h", h[0:3], rows=(0, 3))
    w.write("c", c[2:4], rows=(2, 4))
    w.write("c", c[0:2], rows=(0, 2))
    w.write("s", BLOCKS["s"])
    w.write("e", BLOCKS["e"])
    w.close()
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(same_tensor(loaded[k], t) for k, t in BLOCKS.items())


def test_column_block_is_one_pwrite_per_row(tmp_path, monkeypatch):
    w = SafetensorsWriter(tmp_path, blocks_layout())
    calls = []
    real = os.pwrite

    def spy(fd, data, off):
        calls.append((off, len(data)))
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", spy)
    w.write("m", BLOCKS["m"][:, 2:5].contiguous(), cols=(2, 5))
    start = w.targets().tensors["m"].offset
    assert calls == [(start + i * 24 + 8, 12) for i in range(7)]
    calls.clear()
    w.write("m", BLOCKS["m"][:, 0:2].contiguous(), cols=(0, 2))
    w.write("m", BLOCKS["m"][:, 5:6].contiguous(), cols=(5, 6))
    w.abort()


@pytest.mark.parametrize(
    "first,second,match",
    [
        (dict(), dict(), "'m' written twice"),
        (dict(rows=(0, 4)), dict(rows=(3, 7)), r"rows \[3, 7\) overlaps rows \[0, 4\), written before"),
        (dict(rows=(0, 7)), dict(), "'m' written twice"),
        (dict(rows=(0, 3)), dict(), r"the whole tensor overlaps rows \[0, 3\)"),
        (dict(cols=(0, 3)), dict(rows=(2, 3)), r"rows \[2, 3\) overlaps columns \[0, 3\)"),
        (dict(rows=(1, 2), cols=(1, 2)), dict(cols=(0, 6)), "overlaps rows"),
    ],
    ids=["double", "row-overlap", "all-rows-twice", "whole-after-rows", "rows-over-cols", "tile-under-cols"],
)
def test_overlapping_blocks_refused(tmp_path, first, second, match):
    m = BLOCKS["m"]

    def part(rows=None, cols=None):
        t = m if rows is None else m[rows[0] : rows[1]]
        return (t if cols is None else t[:, cols[0] : cols[1]]).contiguous()

    w = SafetensorsWriter(tmp_path, blocks_layout())
    w.write("m", part(**first), **first)
    with pytest.raises(ValueError, match=match):
        w.write("m", part(**second), **second)
    w.abort()


def test_gaps_are_found_at_close(tmp_path):
    w = SafetensorsWriter(tmp_path, blocks_layout())
    w.write("m", BLOCKS["m"][0:3], rows=(0, 3))
    w.write("m", BLOCKS["m"][4:7], rows=(4, 7))
    w.write("h", BLOCKS["h"][:, 0:3].contiguous(), cols=(0, 3))
    for k in ("c", "s"):
        w.write(k, BLOCKS[k])
    with pytest.raises(RuntimeError, match=r"1 tensor\(s\) of the layout were never written \(e\)"):
        w.close()
    w.write("e", BLOCKS["e"])
    with pytest.raises(RuntimeError, match=r"2 tensor\(s\) .* only partly written.*m: 144 of 168 bytes; h: 30 of 40 bytes"):
        w.close()
    w.write("m", BLOCKS["m"][3:4], rows=(3, 4))
    w.write("h", BLOCKS["h"][:, 3:4].contiguous(), cols=(3, 4))
    w.close()
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(same_tensor(loaded[k], t) for k, t in BLOCKS.items())


def test_a_failed_block_write_is_a_gap(tmp_path, monkeypatch):
    import errno

    w = SafetensorsWriter(tmp_path, blocks_layout())
    for k in ("h", "c", "s", "e"):
        w.write(k, BLOCKS[k])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputError, match="disk full"):
        w.write("m", BLOCKS["m"][0:2], rows=(0, 2))
    monkeypatch.undo()
    w.write("m", BLOCKS["m"][2:7], rows=(2, 7))
    with pytest.raises(RuntimeError, match="only partly written.*a write failed"):
        w.close()
    w.abort()


@pytest.mark.parametrize(
    "name,tensor,kw,match",
    [
        ("m", torch.zeros(2, 6), dict(rows=(0, 3)), r"shape \(2, 6\), but rows \[0, 3\) of the layout's \(7, 6\) has shape \(3, 6\)"),
        ("m", torch.zeros(7, 2), dict(cols=(0, 3)), r"columns \[0, 3\) of the layout's \(7, 6\) has shape \(7, 3\)"),
        ("m", torch.zeros(7, 6)[:, 0:2], dict(cols=(0, 2)), "contiguous"),
        ("m", torch.zeros(0, 6), dict(rows=(2, 2)), "0 <= start < stop <= 7"),
        ("c", torch.zeros(4, 3, 1, dtype=torch.int16), dict(cols=(0, 1)), "need a 2-D tensor"),
        ("s", torch.zeros((), dtype=torch.float16), dict(rows=(0, 1)), "0-d"),
        ("e", torch.zeros(0, 3), dict(rows=(0, 1)), "<= 0"),
        ("m", torch.zeros(2, 6, dtype=torch.float64), dict(rows=(0, 2)), "dtype"),
    ],
    ids=["row-shape", "col-shape", "noncontiguous-block", "empty-range", "cols-of-3d", "rows-of-scalar",
         "rows-of-empty", "dtype"],
)
def test_block_errors(tmp_path, name, tensor, kw, match):
    w = SafetensorsWriter(tmp_path, blocks_layout())
    with pytest.raises(ValueError, match=match):
        w.write(name, tensor, **kw)
    w.abort()


# --------------------------------------------------------------------------------------
# another process writes into the writer's files
# --------------------------------------------------------------------------------------


def _remote_writes(targets, jobs):
    from opcm_ext.io import write_into

    for name, tensor, kw in jobs:
        write_into(targets, name, tensor, **kw)
    return [(name, kw) for name, _, kw in jobs]


def test_write_into_from_spawned_processes_then_commit(tmp_path):
    from opcm_ext.io import OutputTransaction

    ts = dict(BLOCKS)
    ts["big"] = torch.randn(64, 48)
    layout = [
        ("model-00001-of-00002.safetensors", [(k, ts[k].dtype, tuple(ts[k].shape)) for k in ("m", "big")]),
        ("model-00002-of-00002.safetensors", [(k, ts[k].dtype, tuple(ts[k].shape)) for k in ("h", "c", "s", "e")]),
    ]
    out = tmp_path / "out"
    jobs_a = [
        ("big", ts["big"][:, 0:20].contiguous(), dict(cols=(0, 20))),
        ("big", ts["big"][:, 20:48].contiguous(), dict(cols=(20, 48))),
        ("h", ts["h"], {}),
        ("e", ts["e"], {}),
    ]
    jobs_b = [
        ("m", ts["m"][0:4], dict(rows=(0, 4))),
        ("c", ts["c"][1:4], dict(rows=(1, 4))),
    ]
    with OutputTransaction(out) as tx:
        w = tx.writer(layout, {"k": "v"})
        targets = w.targets()
        assert pickle_roundtrip(targets) == targets
        with mp.get_context("spawn").Pool(2) as pool:
            done = pool.starmap(_remote_writes, [(targets, jobs_a), (targets, jobs_b)])
        for reported in done:
            for name, kw in reported:
                w.mark_written(name, **kw)
        w.write("m", ts["m"][4:7], rows=(4, 7))
        w.write("c", ts["c"][0:1], rows=(0, 1))
        with pytest.raises(ValueError, match="written twice"):
            w.mark_written("h")
        w.write("s", ts["s"])
        tx.commit()
    loaded = {}
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        loaded.update(load_file(str(out / f)))
    assert sorted(loaded) == sorted(ts) and all(same_tensor(loaded[k], t) for k, t in ts.items())
    with CheckpointReader(out) as r:
        assert r.metadata == {"k": "v", "format": "pt"}


def pickle_roundtrip(x):
    import pickle

    return pickle.loads(pickle.dumps(x))


def test_mark_written_keeps_the_completeness_check(tmp_path):
    w = SafetensorsWriter(tmp_path, blocks_layout())
    for k in ("h", "c", "s", "e"):
        w.write(k, BLOCKS[k])
    w.mark_written("m", rows=(0, 3))
    with pytest.raises(RuntimeError, match="only partly written"):
        w.close()
    with pytest.raises(ValueError, match="overlaps"):
        w.mark_written("m", rows=(2, 4))
    with pytest.raises(ValueError, match="not in this writer's layout"):
        w.mark_written("nope")
    w.abort()
    with pytest.raises(ValueError, match="closed writer"):
        w.mark_written("m", rows=(3, 7))


def test_write_into_errors(tmp_path):
    from opcm_ext.io import write_into

    w = SafetensorsWriter(tmp_path, blocks_layout())
    t = w.targets()
    with pytest.raises(ValueError, match="not in the writer's layout"):
        write_into(t, "nope", torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        write_into(t, "m", torch.zeros(3, 6), rows=(0, 2))
    w.abort()  # the files are gone: a late remote write is an OutputError, and creates nothing
    with pytest.raises(OutputError, match="cannot write .*model.safetensors"):
        write_into(t, "m", torch.zeros(2, 6), rows=(0, 2))
    assert not (tmp_path / "model.safetensors").exists()
