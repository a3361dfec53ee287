"""A full disk during a merge: a clear error, the merged checkpoint unchanged, no temporaries left.

- In-process: ``os.pwrite`` (or ``os.fsync``) starts failing with ENOSPC after N bytes, at
  several moments of ``merge_stream`` (pass-1 scratch, the output's header, its tensors,
  the commit's fsync), on a one-file and a sharded merged checkpoint.
- For real (root only, skipped otherwise): the merged checkpoint lives on a small tmpfs
  mounted by the test; at a chosen fault point of a running ``opcm step`` a filler file
  takes all the free space (as another program writing there would), the kernel answers
  ENOSPC, the CLI exits 2 with one line. Nothing in opcm_ext is patched for this.
- The up-front free-space check refuses before anything is created.
After each failure, freeing the space and rerunning gives exactly the uninterrupted result.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import struct
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

import opcm_ext
import opcm_ext.errors as errors  # (`from opcm_ext import errors` recurses in the lazy __getattr__)
from helpers import make_family, snapshot, temporaries, tiny_clip_vision_config
from zygote import Zygote  # the fork server that runs `opcm` without paying its imports each time

# A budget small enough that Σ goes to the scratch file between the passes (the file under test);
# with the default budget a model this small keeps Σ in memory.
BUDGET = "200KB"
DISK_FULL = r"disk full while writing .*: No space left on device; nothing was changed \(.*merged is as before"


@pytest.fixture(scope="module", params=[None, "40KB"], ids=["one-file", "sharded"])
def family(request, tmp_path_factory) -> dict:
    """base, task1..3, merged = OPCM(task1, task2) and want = OPCM(task1..3) (uninterrupted)."""
    root = tmp_path_factory.mktemp("disk_full_family")
    make_family(root, tiny_clip_vision_config(), "CLIPVisionModel", 3, seed=21, max_shard_size=request.param)
    opcm_ext.merge_sequence(root / "base", [root / "task1", root / "task2"], root / "merged", memory_budget=BUDGET)
    shutil.copytree(root / "merged", root / "want")
    spilled = []  # bytes of Σ that went to the scratch file (the rest stayed in memory)
    real_pwrite = os.pwrite

    def counting_pwrite(fd, data, offset):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "scratch.f32":
            spilled.append(len(memoryview(data).cast("B")))
        return real_pwrite(fd, data, offset)

    os.pwrite = counting_pwrite
    try:
        opcm_ext.merge_stream(root / "base", root / "want", root / "task3", memory_budget=BUDGET)
    finally:
        os.pwrite = real_pwrite
    assert sum(spilled) > 1000, "the budget must be small enough that part of Σ goes to the scratch file"
    shards = [n for n in os.listdir(root / "merged") if n.endswith(".safetensors")]
    assert len(shards) == (1 if request.param is None else 3), shards
    return {
        "root": root,
        "want": snapshot(root / "want"),
        # bytes written by pass 1 (the part of Σ beyond the memory budget) and by pass 2 (the shards)
        "scratch": sum(spilled),
        "output": sum((root / "want" / n).stat().st_size for n in shards),
    }


def fresh_merged(family: dict, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    m = where / "merged"
    shutil.copytree(family["root"] / "merged", m)
    return m


class DiskFull:
    """Let ``budget`` more bytes through ``os.pwrite``, then fail like a full disk (short write, then ENOSPC)."""

    def __init__(self, budget: int) -> None:
        self.left = budget
        self.real = os.pwrite
        self.hits = 0
        self.failed: list[tuple[str, int]] = []  # (file name, offset) of each refused write

    def __call__(self, fd, data, offset):
        n = len(memoryview(data).cast("B"))
        if n <= self.left:
            self.left -= n
            return self.real(fd, data, offset)
        if self.left > 0:  # what still fits is written, as a real filesystem does
            k = self.real(fd, memoryview(data).cast("B")[: self.left], offset)
            self.left = 0
            return k
        self.hits += 1
        self.failed.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# moment: (bytes let through before the disk is full, the file whose write then fails, where in it)
# pass 1 writes the fp32 scratch (scratch.f32), pass 2 the shards' headers first, then tensor data.
MOMENTS = [
    pytest.param(lambda scratch, output: 1000, r"scratch\.f32", "any", id="pass1-scratch"),
    pytest.param(lambda scratch, output: scratch + 100, r".*\.safetensors", "header", id="pass2-header"),
    pytest.param(lambda scratch, output: scratch + output // 2, r".*\.safetensors", "data", id="pass2-tensors"),
    pytest.param(lambda scratch, output: scratch + output - 100, r".*\.safetensors", "data", id="pass2-last-bytes"),
]


@pytest.mark.parametrize("moment, fails_in, part", MOMENTS)
def test_enospc_mid_write_changes_nothing(family, moment, fails_in, part, tmp_path, monkeypatch):
    root = family["root"]
    merged = fresh_merged(family, tmp_path)
    before = snapshot(merged)
    full = DiskFull(moment(family["scratch"], family["output"]))
    monkeypatch.setattr(os, "pwrite", full)

    with pytest.raises(errors.OpcmError) as info:
        opcm_ext.merge_stream(root / "base", merged, root / "task3", memory_budget=BUDGET)
    assert type(info.value) is errors.OutputError, repr(info.value)
    assert re.search(DISK_FULL, str(info.value)), str(info.value)
    assert "Free some disk space and retry" in str(info.value)
    assert full.hits == 1, full.failed  # the first refused write ends the merge
    name, offset = full.failed[0]
    assert re.fullmatch(fails_in, name), full.failed
    if part != "any":  # the shard's header is its first 8 + n bytes (as in the uninterrupted output)
        with open(root / "want" / name, "rb") as f:
            header_end = 8 + struct.unpack("<Q", f.read(8))[0]
        assert (offset < header_end) == (part == "header"), (full.failed, header_end)
    assert snapshot(merged) == before
    assert temporaries(merged) == []

    monkeypatch.undo()  # space freed: the rerun gives exactly the uninterrupted result
    opcm_ext.merge_stream(root / "base", merged, root / "task3", memory_budget=BUDGET)
    assert snapshot(merged) == family["want"]
    assert temporaries(merged) == []


def test_enospc_at_commit_fsync_changes_nothing(family, tmp_path, monkeypatch):
    """Filesystems with delayed allocation report a full disk at fsync: still before the swap."""
    root = family["root"]
    merged = fresh_merged(family, tmp_path)
    before = snapshot(merged)
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(errors.OutputError, match=r"disk full while writing .*: No space left on device"):
        opcm_ext.merge_stream(root / "base", merged, root / "task3", memory_budget=BUDGET)
    assert snapshot(merged) == before
    assert temporaries(merged) == []


def test_free_space_is_checked_up_front(family, tmp_path, monkeypatch):
    root = family["root"]
    merged = fresh_merged(family, tmp_path)
    before = snapshot(merged)
    usage = namedtuple("usage", "total used free")
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        assert temporaries(merged) == [], "the check must come before the temporary is created"
        return usage(1 << 40, (1 << 40) - (15 << 20), 15 << 20)  # 15 MiB free: below the 16 MiB reserve

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(errors.OutputError) as info:
        opcm_ext.merge_stream(root / "base", merged, root / "task3", memory_budget=BUDGET)
    msg = str(info.value)
    assert re.search(r"not enough free disk space for .*merged: need [\d.]+ MiB \(\d+ bytes of output \+ 1% \+ 16 MiB\), "
                     r"15\.0 MiB \(15728640 bytes\) free on the filesystem of .*; free some space", msg), msg
    assert asked == [merged.parent]
    assert snapshot(merged) == before
    assert temporaries(merged) == []


# ----------------------------------------------------------------------------------------------
# for real: a small tmpfs, filled by another writer while `opcm step` runs
# ----------------------------------------------------------------------------------------------

Result = namedtuple("Result", "returncode stdout stderr")


@pytest.fixture(scope="module")
def zygote():
    """Forks a fresh ``opcm`` (``opcm_ext.cli.main``) per run without ~6 s of imports each (see test_crash)."""
    z = Zygote()
    yield z
    z.close()


def run_opcm(zygote: Zygote, where: Path, argv: list[str], **job) -> list[Result]:
    where.mkdir(parents=True, exist_ok=True)
    (code,) = zygote.run([dict(argv=argv, log=str(where / "stdout"), err=str(where / "stderr"), **job)])
    return [Result(code, (where / "stdout").read_text(), (where / "stderr").read_text())]


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (room for the up-front check's 16 MiB reserve, not much more)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.parametrize("fill_at", ["engine.end_pass.sigma", "writer.header", "engine.write"])
def test_real_full_disk_through_the_cli(family, small_disk, fill_at, zygote, tmp_path):
    root = family["root"]
    merged = small_disk / "merged"
    shutil.copytree(root / "merged", merged)
    before = snapshot(merged)
    filler = small_disk / "filler"
    argv = ["step", str(root / "base"), str(merged), str(root / "task3"), "--no-progress", "--memory-budget", BUDGET]
    (r,) = run_opcm(zygote, tmp_path, argv, fill=(fill_at, str(filler)))

    assert filler.exists() and filler.stat().st_size > (20 << 20), "the disk was not filled"
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("opcm: error: "), r.stderr
    assert re.search(DISK_FULL, lines[0]), lines[0]
    assert snapshot(merged) == before
    assert temporaries(merged) == []

    filler.unlink()
    (r,) = run_opcm(zygote, tmp_path / "rerun", argv)
    assert r.returncode == 0, r.stderr
    assert snapshot(merged) == family["want"]
    assert temporaries(merged) == []
