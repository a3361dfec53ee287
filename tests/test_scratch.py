"""opcm_ext.io.scratch: fp32 tensors between passes, in RAM within a limit, else in one file."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle

import pytest
import torch

from opcm_ext.errors import OpcmError
from opcm_ext.io import ScratchFile, ScratchStore

SHAPES = {"b": (6, 4), "a": (3, 5), "v": (7,), "s": (), "c": (2, 3, 2)}
NBYTES = {k: 4 * torch.Size(s).numel() for k, s in SHAPES.items()}  # b 96, a 60, v 28, s 4, c 48


def values(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def roundtrip(store: ScratchStore, ts: dict[str, torch.Tensor]) -> None:
    for k, t in ts.items():
        store.put(k, t)
    for k, t in ts.items():
        got = store.get(k)
        assert got.dtype == torch.float32 and got.device.type == "cpu" and tuple(got.shape) == SHAPES[k]
        assert torch.equal(got, t.float()), k


def test_memory_limit_zero_never_holds_tensors(tmp_path):
    with ScratchStore(tmp_path, SHAPES) as store:
        roundtrip(store, values())
        assert store.resident_bytes == 0 and not any(store.in_memory(k) for k in SHAPES)
        assert os.path.getsize(store.path) == store.nbytes == sum(NBYTES.values())


def test_within_the_limit_all_in_ram(tmp_path):
    with ScratchStore(tmp_path, SHAPES, memory_limit=10**6) as store:
        ts = values()
        roundtrip(store, ts)
        assert store.resident_bytes == sum(NBYTES.values()) and store.nbytes == 0
        assert os.path.getsize(store.path) == 0
        ts["b"][0, 0] = 99.0  # the store kept a copy, not the caller's tensor
        assert store.get("b")[0, 0] != 99.0
    assert store.resident_bytes == 0  # close drops them


def test_spill_beyond_the_limit_in_the_callers_order(tmp_path):
    # in the given order: b (96 bytes) fits; a (+60), v (+28) and c (+48) would pass 120; s (+4) fits
    with ScratchStore(tmp_path, SHAPES, memory_limit=120) as store:
        placed = {k: store.in_memory(k) for k in SHAPES}
        assert placed == {"b": True, "a": False, "v": False, "s": True, "c": False}
        ts = values(1)
        roundtrip(store, ts)
        assert store.resident_bytes == 100 and store.resident_bytes <= store.memory_limit
        assert store.nbytes == 60 + 28 + 48 and sorted(store.file_part().slots) == ["a", "c", "v"]


@pytest.mark.parametrize("limit", [0, 10**6], ids=["file", "ram"])
def test_row_and_column_blocks(tmp_path, limit):
    ts = values(2)
    b, a, c = ts["b"].float(), ts["a"].float(), ts["c"].float()
    with ScratchStore(tmp_path, SHAPES, memory_limit=limit) as store:
        store.put("b", b[0:2], rows=(0, 2))
        store.put("b", b[2:6, 0:1], rows=(2, 6), cols=(0, 1))
        store.put("b", b[2:6, 1:4].contiguous(), rows=(2, 6), cols=(1, 4))
        store.put("a", a[:, 3:5].double(), cols=(3, 5))  # converted to fp32
        store.put("a", a[:, 0:3], cols=(0, 3))
        store.put("c", c[1:2], rows=(1, 2))
        store.put("c", c[0:1], rows=(0, 1))
        assert torch.equal(store.get("b"), b) and torch.equal(store.get("a"), a) and torch.equal(store.get("c"), c)
        assert torch.equal(store.get("b", rows=(5, 6)), b[5:6])
        got = store.get("a", cols=(1, 4))
        assert got.is_contiguous() and torch.equal(got, a[:, 1:4])
        assert torch.equal(store.get("b", rows=(1, 5), cols=(2, 4)), b[1:5, 2:4])
        assert torch.equal(store.get("c", rows=(0, 1)), c[0:1])


@pytest.mark.parametrize("limit", [0, 10**6], ids=["file", "ram"])
def test_errors(tmp_path, limit):
    with ScratchStore(tmp_path, SHAPES, memory_limit=limit) as store:
        with pytest.raises(ValueError, match=r"scratch b: shape \(2, 4\) != \(3, 4\)"):
            store.put("b", torch.zeros(2, 4), rows=(0, 3))
        with pytest.raises(ValueError, match="not one of this store's tensors"):
            store.put("nope", torch.zeros(1))
        with pytest.raises(ValueError, match="need a 2-D tensor"):
            store.get("c", cols=(0, 1))
        with pytest.raises(ValueError, match="0 <= start < stop <= 6"):
            store.get("b", rows=(4, 4))
        with pytest.raises(ValueError, match="0-d"):
            store.put("s", torch.zeros(()), rows=(0, 1))
        with pytest.raises(OpcmError, match="(ended early|before it was stored)"):
            store.get("b")
    with pytest.raises(ValueError):
        ScratchStore(tmp_path / "x", SHAPES, memory_limit=-1)


def _remote(part, jobs):
    with ScratchFile(part) as f:
        for key, tensor, rows in jobs:
            f.put(key, tensor, rows=rows)
        return f.get("c", rows=(0, 1)), f.get("a")


def test_another_process_puts_and_gets_through_the_file(tmp_path):
    ts = {k: t.float() for k, t in values(3).items()}
    with ScratchStore(tmp_path, SHAPES, memory_limit=120) as store:
        part = store.file_part()
        assert pickle.loads(pickle.dumps(part)) == part
        store.put("c", ts["c"][0:1], rows=(0, 1))
        jobs = [("a", ts["a"], None), ("v", ts["v"], None), ("c", ts["c"][1:2], (1, 2))]
        with mp.get_context("spawn").Pool(1) as pool:
            c0, a = pool.apply(_remote, (part, jobs))
        assert torch.equal(c0, ts["c"][0:1]) and torch.equal(a, ts["a"])
        assert torch.equal(store.get("c"), ts["c"]) and torch.equal(store.get("v"), ts["v"])
        with ScratchFile(part) as f, pytest.raises(ValueError, match="no place in the scratch file"):
            f.put("b", ts["b"])  # kept in this process's RAM, not in the file


def test_closed_file_refuses(tmp_path):
    store = ScratchStore(tmp_path, SHAPES)
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.put("a", torch.zeros(3, 5))
    store.close()  # idempotent
