"""Fuzzing our safetensors header parser: a mutated file gives a CheckpointError or correct tensors, never
another exception, a crash, or an allocation beyond what the file holds."""

from __future__ import annotations

import json
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from opcm_ext.errors import CheckpointError
from opcm_ext.io import DTYPES, CheckpointReader

BASE_TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.bias": torch.arange(5, dtype=torch.float16),
    "c.scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    "d.ids": torch.arange(3, dtype=torch.int64),
    "e.empty": torch.zeros(0, 2),
    "f.mask": torch.tensor([True, False, True]),
}
BASE = st_save(BASE_TENSORS, metadata={"format": "pt", "k": "v"})
(BASE_N,) = struct.unpack("<Q", BASE[:8])
BASE_HEADER = json.loads(BASE[8 : 8 + BASE_N])
BASE_DATA = BASE[8 + BASE_N :]

FUZZ = settings(
    max_examples=300,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=True,
    database=None,
)

_DIR = tempfile.TemporaryDirectory(prefix="opcm-fuzz-")
PATH = Path(_DIR.name) / "fuzz.safetensors"


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def check(blob: bytes) -> dict[str, bytes] | None:
    """Read ``blob`` as a file with our reader; only CheckpointError may come out."""
    PATH.write_bytes(blob)
    tracemalloc.start()
    try:
        try:
            with CheckpointReader(PATH) as r:
                got = {}
                total = 0
                for k in r.keys():
                    info = r.info(k)
                    t = r.read(k)
                    assert tuple(t.shape) == info.shape and t.dtype == info.dtype
                    assert t.numel() * t.element_size() == info.nbytes
                    assert 8 <= info.offset and info.offset + info.nbytes <= len(blob)
                    total += info.nbytes
                    got[k] = raw(t)
                assert total <= len(blob)  # what reading allocates is bounded by the file
        except CheckpointError as e:
            assert str(PATH) in str(e)  # every message names the file
            got = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Python-side allocations (header bytes, parsed JSON) stay proportional to the file, whatever
    # length the 8-byte prefix claims.
    assert peak <= 64 * len(blob) + (1 << 20), f"peak {peak} for a {len(blob)}-byte file"
    return got


def differential(blob: bytes) -> None:
    """Whatever the safetensors library accepts we accept too, with the same bytes."""
    ours = check(blob)
    try:
        ref = st_load(blob)
    except Exception:
        return
    if ours is None:
        # we are stricter in one documented way: a header naming a key twice (the library keeps the last)
        n = struct.unpack("<Q", blob[:8])[0]
        try:
            json.loads(blob[8 : 8 + n], object_pairs_hook=_dup_guard)
        except _Dup:
            return
        pytest.fail("the safetensors library reads this file but we refused it")
    assert sorted(ours) == sorted(ref)
    for k, t in ref.items():
        assert ours[k] == raw(t), k


class _Dup(Exception):
    pass


def _dup_guard(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _Dup
    return dict(pairs)


def build(header: object, data: bytes = BASE_DATA, length: int | None = None, pad: int = 0) -> bytes:
    hb = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(hb) if length is None else length) + hb + data


def test_base_file_reads():
    ours = check(BASE)
    assert ours == {k: raw(t) for k, t in BASE_TENSORS.items()}


# --------------------------------------------------------------------------------------
# raw byte mutations
# --------------------------------------------------------------------------------------

flips = st.lists(
    st.tuples(st.integers(0, len(BASE) - 1), st.integers(1, 255)), min_size=1, max_size=8
)
header_flips = st.lists(st.tuples(st.integers(0, 8 + BASE_N - 1), st.integers(1, 255)), min_size=1, max_size=4)


@FUZZ
@given(st.one_of(flips, header_flips))
def test_byte_flips(edits):
    blob = bytearray(BASE)
    for pos, x in edits:
        blob[pos] ^= x
    differential(bytes(blob))


@FUZZ
@given(st.integers(0, len(BASE) - 1))
def test_truncations(cut):
    differential(BASE[:cut])


@FUZZ
@given(st.data())
def test_splices(data):
    """Random bytes inserted or deleted anywhere (shifts everything after)."""
    blob = bytearray(BASE)
    pos = data.draw(st.integers(0, len(blob)))
    if data.draw(st.booleans()):
        blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        del blob[pos : pos + data.draw(st.integers(1, 16))]
    differential(bytes(blob))


LENGTHS = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2 * len(BASE)),
    st.sampled_from([0, 1, 2, BASE_N - 1, BASE_N + 1, len(BASE) - 8, len(BASE) - 7, 2**31, 2**32, 2**63, 2**64 - 1,
                     100_000_000, 100_000_001]),
)


@FUZZ
@given(LENGTHS)
def test_length_prefix(n):
    differential(struct.pack("<Q", n) + BASE[8:])


def test_huge_length_prefixes_allocate_nothing():
    for n in (2**64 - 1, 2**63, 2**40, 100_000_001, len(BASE)):
        blob = struct.pack("<Q", n) + BASE[8:]
        PATH.write_bytes(blob)
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError, match="larger than the rest of the file"):
                CheckpointReader(PATH)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024


# --------------------------------------------------------------------------------------
# structural JSON edits (re-serialised with a consistent length prefix)
# --------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
dims = st.one_of(st.integers(0, 6), st.integers(-3, 2**66), st.sampled_from([0, 1, 2**32, 2**62, 2**64]))
dtype_codes = st.one_of(st.sampled_from(sorted(DTYPES) + ["F4", "F6_E2M3", "X", "f32", ""]), st.text(max_size=6))
offsets = st.one_of(
    st.tuples(st.integers(0, len(BASE_DATA) + 8), st.integers(0, len(BASE_DATA) + 8)).map(list),
    st.lists(st.integers(-(2**65), 2**65), max_size=3),
    json_values,
)


@st.composite
def edited_header(draw):
    header = json.loads(json.dumps(BASE_HEADER))
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "drop-field", "entry", "metadata", "add", "remove",
                                   "extra-field"]))
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        if op == "dtype":
            entry["dtype"] = draw(st.one_of(dtype_codes, json_values))
        elif op == "shape":
            entry["shape"] = draw(st.one_of(st.lists(dims, max_size=4), json_values))
        elif op == "offsets":
            entry["data_offsets"] = draw(offsets)
        elif op == "drop-field":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == "entry":
            header[name] = draw(json_values)
        elif op == "metadata":
            header["__metadata__"] = draw(json_values)
        elif op == "add":
            header[draw(st.text(max_size=6))] = {
                "dtype": draw(dtype_codes),
                "shape": draw(st.lists(dims, max_size=3)),
                "data_offsets": draw(offsets),
            }
        elif op == "remove":
            header.pop(name)
        elif op == "extra-field":
            entry[draw(st.text(max_size=6))] = draw(json_values)
    return header


@FUZZ
@given(edited_header(), st.integers(0, 7), st.booleans())
def test_json_edits(header, pad, whole_doc_garbage):
    if whole_doc_garbage:
        header = [header]
    differential(build(header, pad=pad))


@FUZZ
@given(json_values, st.binary(max_size=64))
def test_arbitrary_json_documents(doc, data):
    differential(build(doc, data=data))


@FUZZ
@given(st.binary(max_size=256), st.binary(max_size=64))
def test_arbitrary_header_bytes(hb, data):
    differential(struct.pack("<Q", len(hb)) + hb + data)
