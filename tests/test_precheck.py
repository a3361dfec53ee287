"""`opcm step` refuses an already merged model before importing torch (opcm_ext.precheck).

The early check must agree with the step's own: the same content identity as ``io.content_hash``
(every layout and dtype), a refusal only when the full step would refuse the same model as a
duplicate, and None (the step decides) whenever it cannot be sure.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile

import pytest
import torch
from helpers import make_family, run_cli, snapshot, tiny_clip_vision_config, write_shards

import opcm_ext
from opcm_ext import io
from opcm_ext._lightio import HashCache, plain_layout
from opcm_ext.errors import DuplicateModelError
from opcm_ext.precheck import content_hash_of, duplicate_error


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """base, task1..4 and a merge of task1, task2 (OPCM)."""
    root = tmp_path_factory.mktemp("precheck")
    paths, _ = make_family(root, tiny_clip_vision_config(), "CLIPVisionModel", 4, seed=3)
    out = root / "merged"
    opcm_ext.merge_sequence(paths[0], paths[1:3], out)
    return paths, out


def _no_cache(monkeypatch):
    monkeypatch.setenv("OPCM_NO_CACHE", "1")


@pytest.mark.parametrize("layout", ["folder", "file", "sharded", "index-file"])
def test_content_hash_without_torch_equals_the_readers(tmp_path, monkeypatch, layout):
    _no_cache(monkeypatch)
    tensors = {
        "a.weight": torch.randn(5, 7),
        "b.bias": torch.randn(3).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, 2).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.flag": torch.tensor([True, False]),
        "f.empty": torch.zeros(0, 4),
        "g.scalar": torch.tensor(2.5),
    }
    if layout == "sharded" or layout == "index-file":
        names = sorted(tensors)
        write_shards(tmp_path, {"model-00001-of-00002.safetensors": {k: tensors[k] for k in names[:4]},
                                "model-00002-of-00002.safetensors": {k: tensors[k] for k in names[4:]}})
        target = tmp_path if layout == "sharded" else tmp_path / "model.safetensors.index.json"
    else:
        write_shards(tmp_path, {"model.safetensors": tensors})
        target = tmp_path if layout == "folder" else tmp_path / "model.safetensors"
    lay = plain_layout(target)
    assert lay is not None
    with io.CheckpointReader(target) as r:
        assert content_hash_of(lay) == io.content_hash(r, cache=False) == io.hash_tensors(tensors)
        assert lay.identity() == r.file_identity()  # the same cache key as the step's reader


def test_the_hash_it_caches_is_the_one_the_step_finds(merged, tmp_path, monkeypatch):
    monkeypatch.setenv("OPCM_CACHE_DIR", str(tmp_path / "cache"))
    paths, _ = merged
    lay = plain_layout(paths[3])
    h = content_hash_of(lay)
    assert HashCache().get(lay.identity(), "blake3") == h
    with io.CheckpointReader(paths[3]) as r:
        assert io.content_hash(r) == h == io.content_hash(r, cache=False)


def test_a_duplicate_is_refused_before_torch_is_imported(merged, tmp_path):
    """The CLI's refusal: exit 2, the step's own message, nothing written, and torch never imported."""
    paths, out = merged
    before = snapshot(out)
    code = ("import sys\nfrom opcm_ext.cli import main\n"
            f"rc = main(['step', {str(paths[0])!r}, {str(out)!r}, {str(paths[1])!r}, '--no-progress'])\n"
            "print('RESULT', rc, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir())
    assert "RESULT 2 False" in proc.stdout, proc.stdout + proc.stderr
    assert f"{paths[1]} was already merged at step 1 (as 'task1', same content hash)" in proc.stderr
    assert snapshot(out) == before
    with pytest.raises(DuplicateModelError) as full:  # the step's own check says the same
        opcm_ext.merge_stream(paths[0], out, paths[1])
    assert str(full.value) in proc.stderr


def test_it_refuses_exactly_what_the_step_refuses(merged, tmp_path):
    paths, out = merged
    err = duplicate_error(paths[0], out, paths[2])
    assert isinstance(err, DuplicateModelError) and "at step 2 (as 'task2'" in str(err)
    assert duplicate_error(paths[0], out, paths[3]) is None  # not merged yet
    assert duplicate_error(paths[4], out, paths[1]) is None  # wrong base: the step reports that instead
    r = run_cli("step", paths[4], out, paths[1], check=False)
    assert r.returncode == 2 and "made from base" in r.stderr
    assert duplicate_error(paths[0], out, out) is None  # the same checkpoint twice: the step says so
    assert duplicate_error(paths[0], paths[1], paths[2]) is None  # no merge state
    assert duplicate_error(paths[0], tmp_path / "missing", paths[1]) is None


def test_undecidable_cases_leave_it_to_the_step(merged, tmp_path):
    paths, out = merged
    # an opcm-ext 0.1 state (blake2b hashes): the step knows that scheme, the early check does not
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    st = opcm_ext.read_state(out)
    st.models = [dict(m, hash="0" * 32) for m in st.models]
    write_shards(legacy, {"model.safetensors": {"x": torch.zeros(1)}}, metadata=st.to_metadata())
    assert duplicate_error(paths[0], legacy, paths[1]) is None
    # a LoRA adapter is never a plain checkpoint
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    write_shards(adapter, {"adapter_model.safetensors": {"x": torch.zeros(1)}})
    assert plain_layout(adapter) is None and duplicate_error(paths[0], out, adapter) is None
    # a merged checkpoint a killed run left to recover
    marker = out.parent / f".{out.name}.opcm-old-0123abcd"
    marker.mkdir()
    try:
        assert duplicate_error(paths[0], out, paths[1]) is None
    finally:
        marker.rmdir()
    # a corrupt header
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json")
    assert duplicate_error(paths[0], bad, paths[1]) is None
    # an index naming a shard outside its folder
    esc = tmp_path / "escape"
    esc.mkdir()
    (esc / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../merged/model.safetensors"}}))
    assert plain_layout(esc) is None
    assert os.path.exists(out / "model.safetensors")
