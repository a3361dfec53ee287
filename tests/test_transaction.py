"""OutputTransaction: locking, stale cleanup, atomic swap, and crash safety (SIGKILL at every fault point)."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import opcm_ext.io.transaction as transaction
from opcm_ext import _faults
from opcm_ext.errors import OutputError
from opcm_ext.io import CheckpointReader, OutputTransaction, needs_recovery, recover_output

FORK = mp.get_context("fork")

MODEL_A = {"w": torch.full((4, 4), 1.0), "b": torch.zeros(4), "ids": torch.arange(3)}
MODEL_B = {"w": torch.full((4, 4), 2.0), "b": torch.ones(4), "ids": torch.arange(3)}


def write_model(tx: OutputTransaction, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    keys = sorted(tensors)
    if shards == 1:
        layout = [("model.safetensors", [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in keys])]
    else:
        parts = [keys[i::shards] for i in range(shards)]
        layout = [
            (f"model-{i + 1:05d}-of-{shards:05d}.safetensors", [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in p])
            for i, p in enumerate(parts)
        ]
    w = tx.writer(layout, {"which": str(float(tensors["w"][0, 0]))})
    for k in keys:
        w.write(k, tensors[k])


def make_output(out: Path, tensors: dict[str, torch.Tensor], shards: int = 1, kind: str = "folder") -> None:
    with OutputTransaction(out, kind=kind) as tx:
        write_model(tx, tensors, shards)
        tx.commit()


def snapshot(p: Path) -> dict[str, bytes]:
    """Every file under ``p`` (or ``p`` itself) with its bytes; {} if absent."""
    if p.is_file():
        return {"": p.read_bytes()}
    if not p.exists():
        return {}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def leftovers(out: Path) -> list[str]:
    """Siblings of ``out`` that belong to us, other than the output and its lock file."""
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.") and not n.endswith(".opcm.lock"))


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "merged"


# --------------------------------------------------------------------------------------
# the happy paths
# --------------------------------------------------------------------------------------


def test_commit_new_folder(out):
    like = out.parent / "like"
    like.mkdir()
    (like / "config.json").write_text('{"model_type": "x"}')
    with OutputTransaction(out, like_folder=like, expected_bytes=1000) as tx:
        assert tx.tmp.parent == out.parent and tx.tmp.name.startswith(".merged.opcm-tmp-")
        assert tx.scratch_dir.is_dir() and tx.scratch_path("sigma.bin").parent == tx.scratch_dir
        tx.scratch_path("sigma.bin").write_bytes(b"scratch")
        write_model(tx, MODEL_A)
        assert not out.exists()
        tx.commit()
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert leftovers(out) == []
    assert (out.parent / ".merged.opcm.lock").read_text().strip() == str(os.getpid())
    with CheckpointReader(out) as r:
        assert torch.equal(r.read("w"), MODEL_A["w"])


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_commit_replaces_existing(out, monkeypatch, exchange):
    make_output(out, MODEL_A, shards=2)
    calls = []
    real = transaction._rename_exchange

    def spy(a, b):
        calls.append((a, b))
        if not exchange:
            raise transaction._NoExchange("test")
        return real(a, b)

    monkeypatch.setattr(transaction, "_rename_exchange", spy)
    make_output(out, MODEL_B)
    assert len(calls) == 1
    assert sorted(os.listdir(out)) == ["model.safetensors"]  # old shards and index are gone
    assert leftovers(out) == []
    with CheckpointReader(out) as r:
        assert torch.equal(r.read("w"), MODEL_B["w"])


def test_commit_file_output(tmp_path):
    f = tmp_path / "merged.safetensors"
    make_output(f, MODEL_A, kind="file")
    make_output(f, MODEL_B, kind="file")
    assert leftovers(f) == []
    with CheckpointReader(f) as r:
        assert torch.equal(r.read("b"), MODEL_B["b"])
    with OutputTransaction(f, kind="file") as tx:
        with pytest.raises(ValueError, match="one-shard"):
            tx.writer([("a.safetensors", []), ("b.safetensors", [])], {})
    with pytest.raises(ValueError, match="like_folder"):
        OutputTransaction(f, kind="file", like_folder=tmp_path)


def test_copy_aux_skips_weights_and_hidden(out):
    like = out.parent / "like"
    like.mkdir()
    for n in ["config.json", "generation_config.json", "tokenizer.json", "README.md", "preprocessor_config.json"]:
        (like / n).write_text(n)
    for n in ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
              "x.pt", "y.pth", ".hidden", ".merged.opcm.lock"]:
        (like / n).write_text("no")
    (like / "sub").mkdir()
    (like / "sub" / "f.txt").write_text("no")
    os.symlink(like / "config.json", like / "linked.json")
    with OutputTransaction(out) as tx:
        copied = tx.copy_aux(like)
        assert tx.copy_aux(like) == []  # idempotent, never overwrites
        write_model(tx, MODEL_A)
        tx.commit()
    assert copied == ["README.md", "config.json", "generation_config.json", "linked.json",
                      "preprocessor_config.json", "tokenizer.json"]
    assert (out / "linked.json").read_text() == "config.json" and not (out / "linked.json").is_symlink()
    assert sorted(os.listdir(out)) == sorted(copied + ["model.safetensors"])


# --------------------------------------------------------------------------------------
# failures leave the previous output byte-identical and no temporaries
# --------------------------------------------------------------------------------------


def test_exception_inside_leaves_previous_output(out):
    make_output(out, MODEL_A, shards=2)
    before = snapshot(out)
    with pytest.raises(KeyError):
        with OutputTransaction(out) as tx:
            write_model(tx, MODEL_B)
            raise KeyError("boom")
    assert snapshot(out) == before and leftovers(out) == []
    with OutputTransaction(out) as tx:  # the lock was released
        pass


def test_leaving_without_commit_discards(out):
    make_output(out, MODEL_A)
    before = snapshot(out)
    with OutputTransaction(out) as tx:
        write_model(tx, MODEL_B)
    assert snapshot(out) == before and leftovers(out) == []
    with pytest.raises(RuntimeError, match="not open"):
        tx.commit()


def test_errors_after_commit_keep_the_new_output(out):
    with pytest.raises(OSError) as ei:
        with OutputTransaction(out) as tx:
            write_model(tx, MODEL_B)
            tx.commit()
            raise OSError(errno.ENOSPC, "later, unrelated")
    assert not isinstance(ei.value, OutputError)
    with CheckpointReader(out) as r:
        assert torch.equal(r.read("w"), MODEL_B["w"])
    assert leftovers(out) == []


def test_incomplete_writer_fails_commit(out):
    make_output(out, MODEL_A)
    before = snapshot(out)
    with OutputTransaction(out) as tx:
        w = tx.writer([("model.safetensors", [("w", torch.float32, (4, 4)), ("x", torch.float32, (1,))])], {})
        w.write("w", MODEL_B["w"])
        with pytest.raises(RuntimeError, match="never written"):
            tx.commit()
    assert snapshot(out) == before and leftovers(out) == []


def test_commit_with_nothing_written(out):
    with OutputTransaction(out) as tx:
        with pytest.raises(RuntimeError, match="without any safetensors"):
            tx.commit()
    assert not out.exists() and leftovers(out) == []


def test_disk_full_while_writing(out, monkeypatch):
    make_output(out, MODEL_A)
    before = snapshot(out)
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 2:  # the header and one tensor fit, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    with pytest.raises(OutputError, match=r"disk full while writing .*model\.safetensors.*nothing was changed"):
        with OutputTransaction(out) as tx:
            monkeypatch.setattr(os, "pwrite", pwrite)
            write_model(tx, MODEL_B)
            tx.commit()
    monkeypatch.undo()
    assert snapshot(out) == before and leftovers(out) == []


def test_disk_full_from_caller_code_is_output_error(out):
    with pytest.raises(OutputError, match="disk full while writing .*scratch.*nothing was changed"):
        with OutputTransaction(out) as tx:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tx.scratch_path("s")))
    assert not out.exists() and leftovers(out) == []


def test_disk_full_at_fsync(out, monkeypatch):
    make_output(out, MODEL_A)
    before = snapshot(out)

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError, match="disk full"):
        with OutputTransaction(out) as tx:
            write_model(tx, MODEL_B)
            monkeypatch.setattr(os, "fsync", fsync)
            tx.commit()
    monkeypatch.undo()
    assert snapshot(out) == before and leftovers(out) == []


def test_free_space_checked_up_front(out, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 50 * 2**20, 50 * 2**20))
    need = 40 * 2**20  # 40 MiB + 1% + 16 MiB > 50 MiB
    with pytest.raises(OutputError, match=r"not enough free disk space.*41943040 bytes of output.*52428800 bytes"):
        OutputTransaction(out, expected_bytes=need).open()
    assert leftovers(out) == []
    with OutputTransaction(out, expected_bytes=30 * 2**20):  # fits; and the lock was released
        pass


# --------------------------------------------------------------------------------------
# what may be replaced
# --------------------------------------------------------------------------------------


def test_refuses_unrelated_folder(out):
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    with pytest.raises(OutputError, match="does not hold a safetensors checkpoint"):
        OutputTransaction(out).open()
    assert (out / "notes.txt").read_text() == "my thesis" and leftovers(out) == []


def test_replaces_empty_folder(out):
    out.mkdir()
    make_output(out, MODEL_A)
    assert sorted(os.listdir(out)) == ["model.safetensors"]


def test_kind_mismatch(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(OutputError, match="is a file, but the output is a model folder"):
        OutputTransaction(f).open()
    d = tmp_path / "d.safetensors"
    d.mkdir()
    with pytest.raises(OutputError, match="is a folder, but the output is a single"):
        OutputTransaction(d, kind="file").open()
    other = tmp_path / "report.pdf"
    other.write_bytes(b"%PDF")
    with pytest.raises(OutputError, match="not a .safetensors file"):
        OutputTransaction(other, kind="file").open()
    assert f.read_bytes() == b"x" and other.read_bytes() == b"%PDF"


def test_parent_problems(tmp_path, monkeypatch):
    with pytest.raises(OutputError, match="does not exist"):
        OutputTransaction(tmp_path / "no" / "out").open()
    monkeypatch.setattr(os, "access", lambda p, m: False)
    with pytest.raises(OutputError, match="not writable"):
        OutputTransaction(tmp_path / "out").open()


def test_symlink_output_refused(tmp_path):
    real = tmp_path / "real"
    make_output(real, MODEL_A)
    os.symlink(real, tmp_path / "link")
    with pytest.raises(OutputError, match="symbolic link"):
        OutputTransaction(tmp_path / "link").open()


# --------------------------------------------------------------------------------------
# locking
# --------------------------------------------------------------------------------------


def _hold_lock(out: str, ready, release) -> None:
    with OutputTransaction(out):
        ready.set()
        release.wait(30)


def test_lock_conflict_with_another_process(out):
    ready, release = FORK.Event(), FORK.Event()
    child = FORK.Process(target=_hold_lock, args=(str(out), ready, release))
    child.start()
    try:
        assert ready.wait(30)
        with pytest.raises(OutputError, match=rf"another merge into .*merged is running \(pid {child.pid}\)"):
            OutputTransaction(out).open()
        with pytest.raises(OutputError, match="another merge"):
            recover_output(out)
        assert leftovers(out) != []  # the child's temporary is not touched by us
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0 and leftovers(out) == []
    make_output(out, MODEL_A)


def test_lock_conflict_in_one_process(out):
    with OutputTransaction(out):
        with pytest.raises(OutputError, match="another merge"):
            OutputTransaction(out).open()


# --------------------------------------------------------------------------------------
# recovery after killed runs
# --------------------------------------------------------------------------------------


def fake_tmp(parent: Path, name: str, token: str, marker: bool, files=("model.safetensors",)) -> Path:
    p = parent / f".{name}.opcm-tmp-123-{token}"
    p.mkdir()
    for f in files:
        (p / f).write_bytes(b"partial")
    if marker:
        (p / ".opcm-tmp").write_text(f"opcm-ext temporary\ntoken={token}\n")
    return p


def test_stale_temporaries(out):
    parent = out.parent
    stale = fake_tmp(parent, "merged", "aa11", marker=True)
    users = fake_tmp(parent, "merged", "bb22", marker=False, files=("my_notes.txt",))
    empty = fake_tmp(parent, "merged", "cc33", marker=False, files=())
    other_name = fake_tmp(parent, "other", "dd44", marker=True)
    lookalike = parent / ".merged.opcm-tmp-mine"
    lookalike.mkdir()
    (lookalike / ".opcm-tmp").write_text("token=ee55")
    with OutputTransaction(out) as tx:
        assert sorted(tx.recovered) == sorted([f"removed the stale temporary {stale.name}",
                                               f"removed the empty temporary {empty.name}"])
    assert not stale.exists() and not empty.exists()
    assert (users / "my_notes.txt").read_bytes() == b"partial"
    assert other_name.exists() and lookalike.exists()


def test_rename_aside_recovery_restores_previous(out):
    make_output(out, MODEL_A)
    before = snapshot(out)
    # killed between "rename out -> old" and "rename tmp -> out"
    old = out.parent / ".merged.opcm-old-abc123"
    os.rename(out, old)
    fake_tmp(out.parent, "merged", "abc123", marker=True)
    actions = recover_output(out)
    assert any("restored the previous output" in a for a in actions)
    assert snapshot(out) == before and leftovers(out) == []


def test_rename_aside_recovery_drops_replaced(out):
    make_output(out, MODEL_B)
    after = snapshot(out)
    # killed after "rename tmp -> out" (the new output still holds its marker), before deleting old
    (out / ".opcm-tmp").write_text("token=abc123\n")
    old = out.parent / ".merged.opcm-old-abc123"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"previous")
    recover_output(out)
    assert snapshot(out) == after and leftovers(out) == []


def test_rename_aside_leftover_of_unknown_origin_kept(out):
    make_output(out, MODEL_B)
    old = out.parent / ".merged.opcm-old-abc123"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"previous")
    recover_output(out)
    assert (old / "model.safetensors").read_bytes() == b"previous"


def test_exchange_recovery(out):
    make_output(out, MODEL_B)
    after = snapshot(out)
    # killed right after renameat2 exchanged: the tmp path holds the previous output (no marker)
    (out / ".opcm-tmp").write_text("token=feed42\n")
    fake_tmp(out.parent, "merged", "feed42", marker=False, files=("model.safetensors", "config.json"))
    recover_output(out)
    assert snapshot(out) == after and leftovers(out) == []


def test_needs_recovery(out):
    parent = out.parent
    assert not needs_recovery(out) and not needs_recovery(str(out))
    make_output(out, MODEL_A)
    assert (parent / ".merged.opcm.lock").exists() and not needs_recovery(out)  # the lock file is not a leftover
    fake_tmp(parent, "other", "aa11", marker=True)
    assert not needs_recovery(out)
    tmp = fake_tmp(parent, "merged", "bb22", marker=True)
    assert needs_recovery(out)
    recover_output(out)
    assert not tmp.exists() and not needs_recovery(out)
    (parent / ".merged.opcm-old-cc33").mkdir()
    assert needs_recovery(out)
    os.rmdir(parent / ".merged.opcm-old-cc33")
    (out / ".opcm-tmp").write_text("token=dd44\n")
    assert needs_recovery(out)
    recover_output(out)
    assert not needs_recovery(out) and not (out / ".opcm-tmp").exists()
    assert not needs_recovery(parent / "missing-parent" / "x")


# --------------------------------------------------------------------------------------
# SIGKILL at every fault point: afterwards (and after recovery) the output is old or new, whole
# --------------------------------------------------------------------------------------


def _child_merge(out: str, kind: str, fault: str, log: str | None, no_exchange: bool) -> None:
    if no_exchange:
        def refuse(a, b):
            raise transaction._NoExchange("test")

        transaction._rename_exchange = refuse
    _faults._configure(fault, log)
    with OutputTransaction(out, kind=kind) as tx:
        write_model(tx, MODEL_B, shards=1 if kind == "file" else 2)
        tx.scratch_path("s.bin").write_bytes(b"x" * 100)
        tx.commit()


def _run_child(*args) -> int:
    p = FORK.Process(target=_child_merge, args=args)
    p.start()
    p.join(60)
    return p.exitcode


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario", ["replace-exchange", "replace-rename-aside", "new-folder", "replace-file"]
)
def test_sigkill_at_every_fault_point(tmp_path, scenario):
    kind = "file" if scenario == "replace-file" else "folder"
    name = "merged.safetensors" if kind == "file" else "merged"
    exists = scenario != "new-folder"
    no_exchange = scenario == "replace-rename-aside"

    def fresh(i: int) -> Path:
        d = tmp_path / str(i)
        d.mkdir()
        o = d / name
        if exists:
            make_output(o, MODEL_A, shards=1 if kind == "file" else 3, kind=kind)
        return o

    # the points one full run passes, in order
    ref = fresh(0)
    log = tmp_path / "points.log"
    assert _run_child(str(ref), kind, "list", str(log), no_exchange) == 0
    points = log.read_text().split()
    tail = ["commit.files_synced", "commit.dir_synced", "commit.before_swap"]
    tail += ["commit.renamed_aside"] if no_exchange else []
    tail += ["commit.after_swap", "commit.old_deleted"]
    assert points[-len(tail):] == tail and points[0] == "writer.header" and "writer.tensor" in points
    new = snapshot(ref)
    old = snapshot(fresh(-1)) if exists else {}
    swap_at = points.index("commit.after_swap") + 1  # the first kill that happens after the swap

    for n in range(1, len(points) + 1):
        o = fresh(n)
        code = _run_child(str(o), kind, str(n), None, no_exchange)
        assert code == -9, f"kill at point {n} ({points[n - 1]}): exit code {code}"
        pending = needs_recovery(o)
        actions = recover_output(o)
        assert pending or not actions, f"kill at point {n}: needs_recovery said no, recovery did {actions}"
        assert not needs_recovery(o)
        got = snapshot(o)
        want = new if n >= swap_at else old
        assert got == want, f"after a kill at point {n} ({points[n - 1]}) the output is neither whole nor right"
        assert leftovers(o) == [], f"kill at point {n} ({points[n - 1]}) left {leftovers(o)}"
        if n >= swap_at:
            # a later merge into the same place just works
            make_output(o, MODEL_A, kind=kind)


# --------------------------------------------------------------------------------------
# the fault-injection switch itself (read from the environment once, at import)
# --------------------------------------------------------------------------------------

_POINTS = "from opcm_ext import _faults\nfor n in ('a', 'b', 'c'):\n    _faults.point(n)\nprint('survived')\n"


def _run_points(env_extra: dict[str, str]):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("OPCM_FAULT")}
    env.update(env_extra, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-c", _POINTS], env=env, capture_output=True, text=True, timeout=60)


def test_faults_from_environment(tmp_path):
    r = _run_points({})
    assert r.returncode == 0 and "survived" in r.stdout
    log = tmp_path / "log"
    r = _run_points({"OPCM_FAULT_AT": "list", "OPCM_FAULT_LOG": str(log)})
    assert r.returncode == 0 and log.read_text().split() == ["a", "b", "c"]
    r = _run_points({"OPCM_FAULT_AT": "2"})
    assert r.returncode == -9 and "survived" not in r.stdout
    r = _run_points({"OPCM_FAULT_AT": "soon"})
    assert r.returncode == 1 and "positive integer or 'list'" in r.stderr


def test_fault_point_is_free_when_off():
    import timeit

    assert not _faults._active
    per_call = min(timeit.repeat(lambda: _faults.point("x"), number=20000, repeat=3)) / 20000
    assert per_call < 2e-6
