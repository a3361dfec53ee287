"""`opcm watch`: completeness, arrival order, rejection, restarts and signals.

The in-process tests drive a Watcher with a fake clock in the epoch of file mtimes and set each
dropped file's mtime to that clock, so "settled" is decided by the test, not by how fast it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import opcm_ext
from opcm_ext.errors import ConfigError, IncompatibleCheckpointError
from opcm_ext.watch import LEDGER, READY, REJECTED, Watcher

from helpers import make_family, run_cli, snapshot, temporaries, tiny_clip_vision_config

T0 = 1_700_000_000.0  # the fake clock's start: a real epoch time, like the mtimes it is compared with
SETTLE = 10.0


class FakeClock:
    """time.time and time.sleep for a Watcher, advanced by the test."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        assert self.t < T0 + 3600, "the watcher slept an hour of fake time: it did not stop"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny CLIP vision base and three fine-tunes, as HF folders."""
    paths, _ = make_family(tmp_path_factory.mktemp("family"), tiny_clip_vision_config(), "CLIPVisionModel", 3)
    return paths[0], paths[1:]


def set_mtime(path: Path, t: float) -> None:
    """Give ``path`` (every file under it, for a folder) the modification time ``t``."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    for f in files:
        os.utime(f, ns=(int(t * 1e9), int(t * 1e9)))


def drop(src: Path, dst: Path, t: float) -> Path:
    """Copy a checkpoint (folder or file) into the inbox as if it finished arriving at ``t``."""
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    set_mtime(dst, t)
    return dst


def reference(base: Path, models: list[Path], out: Path) -> dict[str, str]:
    """Bytes of what `opcm merge BASE MODEL...` writes (the same merge_sequence call, in process)."""
    opcm_ext.merge_sequence(base, models, out)
    return snapshot(out)


def watcher(inbox: Path, base: Path, out: Path, clock: FakeClock, log_to, **kw) -> Watcher:
    return Watcher(inbox, base, out, {}, settle=SETTLE, poll=1.0, log_to=log_to, clock=clock, sleep=clock.sleep, **kw)


def records(text: str, event: str = "step") -> list[dict]:
    return [r for r in (json.loads(line) for line in text.splitlines() if line.strip()) if r["event"] == event]


def merged_names(out: Path) -> list[str]:
    return [m["name"] for m in opcm_ext.read_state(out).models]


def test_once_merges_complete_inputs_in_arrival_order_and_rejects_a_corrupt_one(family, tmp_path):
    base, (t1, t2, _) = family
    inbox, out = tmp_path / "inbox", tmp_path / "merged"
    inbox.mkdir()
    now = time.time()
    # arrival order is not name order: zeta arrived first, alpha last
    drop(t1, inbox / "zeta", now - 300)
    broken = inbox / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    set_mtime(broken, now - 200)
    drop(t2 / "model.safetensors", inbox / "alpha.safetensors", now - 100)

    proc = run_cli("watch", inbox, "--base", base, "--out", out, "--once", "--settle", "30", "--no-progress")

    steps = records(proc.stdout)
    assert [(r["input"], r["outcome"]) for r in steps] == [
        ("zeta", "merged"), ("broken.safetensors", "rejected"), ("alpha.safetensors", "merged")
    ]
    assert [r["step"] for r in steps if r["outcome"] == "merged"] == [1, 2]
    assert records(proc.stdout, "stop")[0]["reason"] == "done"
    assert merged_names(out) == ["zeta", "alpha.safetensors"]
    # moved aside with its reason beside it; the merged inputs stay where they are
    assert not broken.exists() and (inbox / REJECTED / "broken.safetensors").is_file()
    reason = (inbox / REJECTED / "broken.safetensors.reason.txt").read_text()
    assert "CheckpointError" in reason and "broken.safetensors" in reason
    assert (inbox / "zeta").is_dir() and (inbox / "alpha.safetensors").is_file()
    assert snapshot(out) == reference(base, [inbox / "zeta", inbox / "alpha.safetensors"], tmp_path / "ref")


def write_sharded(src: Path, dst: Path, n: int = 3) -> list[str]:
    """``src``'s weights as ``n`` shards plus an index in ``dst``; the shard names in order."""
    sd = load_file(str(src / "model.safetensors"))
    keys = sorted(sd)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for i, name in enumerate(names):
        part = keys[i::n]
        save_file({k: sd[k] for k in part}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copyfile(src / "config.json", dst / "config.json")
    return names


def test_a_checkpoint_dropped_shard_by_shard_is_merged_only_once_complete_and_settled(family, tmp_path):
    base, (t1, _, _) = family
    staging, inbox, out = tmp_path / "staging", tmp_path / "inbox", tmp_path / "merged"
    staging.mkdir()
    inbox.mkdir()
    shards = write_sharded(t1, staging)
    clock = FakeClock()
    target = inbox / "sharded"
    target.mkdir()
    log = tempfile.TemporaryFile("w+")

    def arrive(name: str, text: str | None = None) -> None:
        if text is None:
            shutil.copyfile(staging / name, target / name)
        else:
            (target / name).write_text(text)
        set_mtime(target / name, clock())

    with watcher(inbox, base, out, clock, log) as w:
        index = (staging / "model.safetensors.index.json").read_text()
        arrive("config.json")
        arrive("model.safetensors.index.json", index[: len(index) // 2])  # the index half written
        assert w.step() is None
        clock.sleep(SETTLE / 2)
        arrive("model.safetensors.index.json", index)
        for i, shard in enumerate(shards):
            # the pauses are shorter than the settle time, but for a stalled download before the last shard
            clock.sleep(2 * SETTLE if i == len(shards) - 1 else SETTLE / 2)
            assert w.step() is None and w.pending() == []
            arrive(shard)
        assert w.step() is None  # complete, but the last shard only just arrived
        clock.sleep(SETTLE - 1)
        assert w.step() is None and not out.exists()
        clock.sleep(1)
        rec = w.step()
    assert rec["outcome"] == "merged" and rec["input"] == "sharded" and rec["kind"] == "sharded"
    assert merged_names(out) == ["sharded"]
    assert snapshot(out) == reference(base, [target], tmp_path / "ref")


def test_a_ready_marker_means_complete_now(family, tmp_path):
    base, (t1, t2, _) = family
    inbox, out = tmp_path / "inbox", tmp_path / "merged"
    inbox.mkdir()
    clock = FakeClock()
    drop(t1, inbox / "fresh", clock())
    (inbox / "fresh" / "config.json").unlink()  # not a complete layout: only READY makes it an input
    drop(t2 / "model.safetensors", inbox / "bare.safetensors", clock())
    with watcher(inbox, base, out, clock, tempfile.TemporaryFile("w+")) as w:
        assert w.pending() == []
        (inbox / "fresh" / READY).touch()
        set_mtime(inbox / "fresh" / READY, clock() - 5)  # the markers' times are the arrival order
        (inbox / f"bare.safetensors.{READY}").touch()
        set_mtime(inbox / f"bare.safetensors.{READY}", clock() - 2)
        assert [e.name for e in w.pending()] == ["fresh", "bare.safetensors"]
        assert w.run(once=True) == 0
    assert merged_names(out) == ["fresh", "bare.safetensors"]


@pytest.mark.parametrize("ledger", ["kept", "lost"], ids=["ledger-kept", "ledger-lost"])
def test_a_restart_mid_inbox_merges_nothing_twice(family, tmp_path, ledger):
    base, tasks = family
    inbox, out = tmp_path / "inbox", tmp_path / "merged"
    inbox.mkdir()
    clock = FakeClock()
    names = ["c", "a", "b"]  # arrival order
    for i, (name, src) in enumerate(zip(names, tasks)):
        drop(src, inbox / name, clock() - 100 + 10 * i)
    log = tempfile.TemporaryFile("w+")
    with watcher(inbox, base, out, clock, log) as w:
        assert w.step()["input"] == "c"  # then the watcher stops (or is killed after its commit)
    if ledger == "lost":  # a crash between MERGED's commit and the ledger write looks like this
        (inbox / LEDGER).unlink()
    with watcher(inbox, base, out, clock, log) as w:
        assert w.run(once=True) == 0
    log.seek(0)
    outcomes = [(r["input"], r["outcome"]) for r in records(log.read())]
    recognised = [("c", "already-merged")] if ledger == "lost" else []
    assert outcomes == [("c", "merged")] + recognised + [("a", "merged"), ("b", "merged")]
    assert merged_names(out) == names
    assert snapshot(out) == reference(base, [inbox / n for n in names], tmp_path / "ref")


def test_the_same_model_under_another_name_is_rejected_as_a_duplicate(family, tmp_path):
    base, (t1, t2, _) = family
    inbox, out = tmp_path / "inbox", tmp_path / "merged"
    inbox.mkdir()
    clock = FakeClock()
    drop(t1, inbox / "first", clock() - 100)
    drop(t1, inbox / "again", clock() - 90)
    drop(t2, inbox / "second", clock() - 80)
    log = tempfile.TemporaryFile("w+")
    with watcher(inbox, base, out, clock, log) as w:
        assert w.run(once=True) == 0
    assert merged_names(out) == ["first", "second"]
    assert "already merged" in (inbox / REJECTED / "again.reason.txt").read_text()
    with watcher(inbox, base, out, clock, log) as w:  # a restart finds nothing left to do
        assert w.step() is None


def test_an_input_rewritten_under_its_name_is_merged_again_only_if_its_content_changed(family, tmp_path):
    base, (t1, t2, t3) = family
    inbox, out = tmp_path / "inbox", tmp_path / "merged"
    inbox.mkdir()
    clock = FakeClock()
    log = tempfile.TemporaryFile("w+")
    drop(t1, inbox / "m", clock() - 100)
    with watcher(inbox, base, out, clock, log) as w:
        assert w.step()["outcome"] == "merged"
        set_mtime(inbox / "m", clock() - 50)  # touched: the same content
        assert w.step()["outcome"] == "already-merged"
        shutil.rmtree(inbox / "m")
        drop(t2, inbox / "m", clock() - 40)  # a new model under the old name
        assert w.step()["outcome"] == "merged"
        assert w.step() is None
    assert merged_names(out) == ["m", "m"]
    with pytest.raises(IncompatibleCheckpointError, match="pass the base that started this merge"):
        watcher(inbox, t3, out, clock, log)  # not the base MERGED was started from


def test_an_internal_error_stops_the_watcher_and_leaves_the_input(family, tmp_path, monkeypatch):
    base, (t1, _, _) = family
    inbox, out = tmp_path / "inbox", tmp_path / "merged"
    inbox.mkdir()
    clock = FakeClock()
    drop(t1, inbox / "m", clock() - 100)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr("opcm_ext.api.merge_stream", broken)
    log = tempfile.TemporaryFile("w+")
    with watcher(inbox, base, out, clock, log) as w, pytest.raises(RuntimeError, match="kernel exploded"):
        w.run(once=True)
    log.seek(0)
    text = log.read()
    assert [r["outcome"] for r in records(text)] == ["failed"]
    assert records(text, "stop")[0]["reason"] == "error"
    assert (inbox / "m").is_dir() and not (inbox / REJECTED).exists() and not (inbox / LEDGER).exists()


def test_sigterm_during_a_step_finishes_the_step_then_stops(family, tmp_path, monkeypatch):
    base, tasks = family
    inbox, out = tmp_path / "inbox", tmp_path / "merged"
    inbox.mkdir()
    clock = FakeClock()
    for i, src in enumerate(tasks):
        drop(src, inbox / f"m{i}", clock() - 100 + i)
    real = opcm_ext.merge_stream

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step runs
        return real(*args, **kwargs)

    monkeypatch.setattr("opcm_ext.api.merge_stream", signalled)
    before = signal.getsignal(signal.SIGTERM)
    log = tempfile.TemporaryFile("w+")
    with watcher(inbox, base, out, clock, log) as w:
        assert w.run() == 0  # not --once: only the signal ends it
    log.seek(0)
    text = log.read()
    assert [r["outcome"] for r in records(text)] == ["merged"]
    assert records(text, "stop")[0]["reason"] == "signal"
    assert merged_names(out) == ["m0"] and temporaries(out) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the handler was put back


def test_one_watcher_per_inbox_and_out_outside_it(family, tmp_path):
    base, _ = family
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with watcher(inbox, base, tmp_path / "merged", FakeClock(), sys.stdout):
        with pytest.raises(ConfigError, match="already watching"):
            watcher(inbox, base, tmp_path / "merged", FakeClock(), sys.stdout)
    with pytest.raises(ConfigError, match="inside the inbox"):
        watcher(inbox, base, inbox / "merged", FakeClock(), sys.stdout)


def test_sigterm_between_steps_exits_0_and_a_restart_finishes_the_inbox(family, tmp_path):
    base, tasks = family
    inbox, out, log = tmp_path / "inbox", tmp_path / "merged", tmp_path / "watch.jsonl"
    inbox.mkdir()
    now = time.time()
    names = [f"m{i}" for i in range(len(tasks))]
    for i, (name, src) in enumerate(zip(names, tasks)):
        drop(src, inbox / name, now - 100 + i)
    cmd = [sys.executable, "-m", "opcm_ext", "watch", str(inbox), "--base", str(base), "--out", str(out),
           "--settle", "0", "--poll", "0.1", "--log", str(log), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    try:
        deadline = time.monotonic() + 300
        while not (log.exists() and any(r["outcome"] == "merged" for r in records(log.read_text()))):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step was logged"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert records(log.read_text(), "stop")[-1]["reason"] == "signal"
    done = merged_names(out)  # MERGED is complete: a readable state, no temporaries
    assert 1 <= len(done) <= len(names) and done == names[: len(done)] and temporaries(out) == []

    run_cli("watch", inbox, "--base", base, "--out", out, "--once", "--settle", "0", "--log", log, "--no-progress")
    assert merged_names(out) == names
    outcomes = [r["outcome"] for r in records(log.read_text())]
    assert outcomes.count("merged") == len(names) and "rejected" not in outcomes
    assert snapshot(out) == reference(base, [inbox / n for n in names], tmp_path / "ref")
