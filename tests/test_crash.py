"""SIGKILL a running `opcm step` at many moments: the merged checkpoint is never damaged.

The hardest case is the in-place step (``opcm step BASE MERGED NEW``, the output replaces
MERGED). For a one-file and a sharded (3 shards) merged checkpoint we list the fault points
of an uninterrupted step (~125), choose 40 (one file) and 24 (sharded) of them: every point
that is not per tensor (ends of the passes, each shard's header, all five commit points) and
per-tensor ones spread evenly over pass 1 (Σ into the scratch file) and pass 2 (the new
checkpoint's tensors). For each one:

1. run the step with the kill switch on that point: it dies by SIGKILL (-9);
2. MERGED holds exactly its old bytes, or (only for a kill after the swap) exactly the
   uninterrupted run's bytes plus the transaction's marker file;
3. rerun the same command without the switch: before the swap it succeeds, after the swap it
   is refused as a duplicate (exit 2: task3 is already in MERGED). Either way MERGED is then
   exactly the uninterrupted run's output (tensors and the merge-state metadata: byte for byte)
   and no `.opcm-tmp`/`.opcm-old` leftover remains beside or inside it.

Also: an output in another folder (``-o OUT``: OUT is absent or complete), the rename-aside
swap used where the filesystem lacks renameat2(RENAME_EXCHANGE), and the real
``python -m opcm_ext`` with ``OPCM_FAULT_AT`` in its environment.

Speed: ``python -m opcm_ext`` spends ~6 s importing torch and transformers before a 0.3 s
step. So the kill runs are forked from a "zygote": one Python process that imported
``opcm_ext.cli`` and transformers (and ran no torch compute, so forking is safe), then forks
one child per run, which calls ``opcm_ext.cli.main(argv)`` exactly as ``python -m opcm_ext``
does, with the fault switch configured by ``_faults._configure`` (its documented way for
forked children). The zygote also adds one fault point after each tensor pass 1 puts into
the scratch file (``pass1.scratch_put``): the engine has no point inside pass 1.
test_bad_inputs.py and test_disk_full.py use the same zygote for their CLI runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import opcm_ext
from helpers import make_family, snapshot, tiny_clip_vision_config
from zygote import Zygote
from helpers import temporaries as leftovers

pytestmark = pytest.mark.slow

MARKER = ".opcm-tmp"  # the transaction's marker file, inside the output until the commit has finished

# fault point name -> phase of the step
PHASES = {
    "pass1.scratch_put": "pass1",  # added by the zygote (see the module docstring)
    "engine.end_pass.sigma": "pass1",
    "writer.header": "pass2",
    "writer.tensor": "pass2",
    "engine.write": "pass2",
    "engine.end_pass.write": "pass2",
    "commit.files_synced": "commit",
    "commit.dir_synced": "commit",
    "commit.before_swap": "commit",
    "commit.renamed_aside": "swap",  # rename-aside only: the old output moved aside, the new one not yet in
    "commit.after_swap": "swapped",
    "commit.old_deleted": "swapped",
}
PER_TENSOR = {"pass1.scratch_put", "writer.tensor", "engine.write"}


# ----------------------------------------------------------------------------------------------
# the zygote: fork a fresh `opcm` per run without paying the imports each time
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zygote():
    z = Zygote()  # imports while the families are built
    yield z
    z.close()


# ----------------------------------------------------------------------------------------------
# the family and what an uninterrupted step gives
# ----------------------------------------------------------------------------------------------


@dataclass
class Family:
    root: Path
    old: dict[str, str]  # MERGED = OPCM(task1, task2)
    want: dict[str, str]  # after an uninterrupted `opcm step BASE MERGED task3`
    points: list[str]  # the fault points of that step, in order (1-based kill index = position + 1)

    def argv(self, merged: Path, *extra: str) -> list[str]:
        return ["step", str(self.root / "base"), str(merged), str(self.root / "task3"), "--no-progress", *extra]


def build_family(root: Path, zygote: Zygote, max_shard_size) -> Family:
    make_family(root, tiny_clip_vision_config(), "CLIPVisionModel", 3, seed=7, max_shard_size=max_shard_size)
    merged = root / "merged"
    opcm_ext.merge_sequence(root / "base", [root / "task1", root / "task2"], merged)
    # the uninterrupted step, through opcm (listing its fault points) and through the API
    listed, api = root / "listed" / "merged", root / "api" / "merged"
    shutil.copytree(merged, listed)
    shutil.copytree(merged, api)
    log = root / "points.log"
    fam = Family(root, snapshot(merged), {}, [])
    assert zygote.run([dict(argv=fam.argv(listed), log=str(root / "listed.log"), fault="list",
                            fault_log=str(log))]) == [0], (root / "listed.log").read_text()
    opcm_ext.merge_stream(root / "base", api, root / "task3")
    fam.want = snapshot(api)
    assert snapshot(listed) == fam.want, "opcm and merge_stream disagree"
    assert leftovers(listed) == []
    fam.points = log.read_text().split()
    assert set(fam.points) <= set(PHASES), sorted(set(fam.points) - set(PHASES))
    st = opcm_ext.read_state(api)
    assert st.step == 3 and [m["name"] for m in st.models] == ["task1", "task2", "task3"]
    return fam


@pytest.fixture(scope="module")
def one_file(tmp_path_factory, zygote) -> Family:
    fam = build_family(tmp_path_factory.mktemp("crash_one_file"), zygote, None)
    assert [n for n in fam.want if n.endswith(".safetensors")] == ["model.safetensors"]
    return fam


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, zygote) -> Family:
    fam = build_family(tmp_path_factory.mktemp("crash_sharded"), zygote, "40KB")
    shards = [n for n in fam.want if n.endswith(".safetensors")]
    assert len(shards) == 3 and "model.safetensors.index.json" in fam.want, sorted(fam.want)
    return fam


def choose(points: list[str], n: int) -> list[int]:
    """>= n kill indices (1-based): every point that is not per-tensor, plus per-tensor ones spread evenly."""
    chosen = {i for i, p in enumerate(points, 1) if p not in PER_TENSOR}
    pools = [[i for i, p in enumerate(points, 1) if p == "pass1.scratch_put"],
             [i for i, p in enumerate(points, 1) if p in ("writer.tensor", "engine.write")]]
    extra = max(0, n - len(chosen))
    for pool, k in zip(pools, (extra // 3, extra - extra // 3)):  # pass 2 has twice the points of pass 1
        k = max(2, min(k, len(pool)))
        chosen |= {pool[round(j * (len(pool) - 1) / (k - 1))] for j in range(k)}
    return sorted(chosen)


# ----------------------------------------------------------------------------------------------
# the kill loop
# ----------------------------------------------------------------------------------------------


def kill_loop(fam: Family, zygote: Zygote, work: Path, kills: list[int], *, out: bool = False,
              no_exchange: bool = False) -> dict[str, int]:
    """Kill `opcm step` at each index, check what is on disk, rerun, check again; phase -> kills."""
    names = [fam.points[i - 1] for i in kills]
    jobs, dirs = [], []
    for i in kills:
        d = work / f"kill{i:03d}"
        d.mkdir(parents=True)
        shutil.copytree(fam.root / "merged", d / "merged")
        target = d / "out" if out else d / "merged"
        argv = fam.argv(d / "merged", *(["-o", str(target)] if out else []))
        jobs.append(dict(argv=argv, log=str(d / "kill.log"), fault=str(i), no_exchange=no_exchange))
        dirs.append((d, target))

    codes = zygote.run(jobs)
    for i, name, code, (d, target) in zip(kills, names, codes, dirs):
        where = f"kill at #{i} {name}: "
        assert code == -9, where + f"exit {code}\n" + (d / "kill.log").read_text()
        phase = PHASES[name]
        if out:
            assert snapshot(d / "merged") == fam.old, where + "MERGED changed"
        if phase == "swapped":  # the new checkpoint is in place; the marker says the commit did not finish
            got = snapshot(target)
            assert MARKER in got, where + "no marker"
            del got[MARKER]
            assert got == fam.want, where + "not the uninterrupted output"
        elif phase == "swap":  # rename-aside, between its two renames: the old output waits beside
            assert not target.exists(), where
            aside = [n for n in os.listdir(d) if re.fullmatch(rf"\.{target.name}\.opcm-old-[0-9a-f]+", n)]
            assert len(aside) == 1 and snapshot(d / aside[0]) == fam.old, where + str(os.listdir(d))
        elif out:
            assert not target.exists(), where + "OUT exists before the swap"
        else:
            assert snapshot(target) == fam.old, where + "MERGED changed before the swap"

    reruns = [dict(argv=j["argv"], log=str(d / "rerun.log"), no_exchange=no_exchange) for j, (d, _) in zip(jobs, dirs)]
    codes = zygote.run(reruns)
    for i, name, code, (d, target) in zip(kills, names, codes, dirs):
        where = f"rerun after a kill at #{i} {name}: "
        log = (d / "rerun.log").read_text()
        if PHASES[name] == "swapped":  # the step is done: a rerun must not fold task3 in twice
            already = "already exists; pass overwrite" if out else "was already merged at step 3"
            assert code == 2 and already in log, where + f"exit {code}\n{log}"
        else:
            assert code == 0, where + f"exit {code}\n{log}"
        assert snapshot(target) == fam.want, where + "differs from the uninterrupted run"
        assert leftovers(target) == [], where + str(leftovers(target))
        if out:
            assert snapshot(d / "merged") == fam.old
    phases: dict[str, int] = {}
    for name in names:
        phases[PHASES[name]] = phases.get(PHASES[name], 0) + 1
    return phases


def test_kill_in_place_one_file(one_file, zygote, tmp_path):
    kills = choose(one_file.points, 40)
    covered = {one_file.points[i - 1] for i in kills}
    assert len(kills) >= 20
    assert {"pass1.scratch_put", "engine.end_pass.sigma"} <= covered
    assert {"writer.header", "writer.tensor", "engine.write", "engine.end_pass.write"} <= covered
    assert {"commit.files_synced", "commit.dir_synced", "commit.before_swap", "commit.after_swap",
            "commit.old_deleted"} <= covered
    phases = kill_loop(one_file, zygote, tmp_path, kills)
    assert phases["pass1"] >= 10 and phases["pass2"] >= 20 and phases["commit"] == 3 and phases["swapped"] == 2, phases


def test_kill_in_place_sharded(sharded, zygote, tmp_path):
    kills = choose(sharded.points, 24)
    covered = [sharded.points[i - 1] for i in kills]
    assert covered.count("writer.header") == 3  # one per shard: the new shards are written side by side
    assert {"pass1.scratch_put", "writer.tensor", "commit.before_swap", "commit.after_swap"} <= set(covered)
    phases = kill_loop(sharded, zygote, tmp_path, kills)
    assert phases["swapped"] == 2 and phases["commit"] == 3, phases


def test_kill_with_separate_output(one_file, zygote, tmp_path):
    """``-o OUT``: MERGED is only read; OUT is absent until the swap and complete after it."""
    p = one_file.points
    kills = sorted({p.index("pass1.scratch_put") + 1, p.index("writer.header") + 1, p.index("engine.write") + 1,
                    *(p.index(n) + 1 for n in ("commit.before_swap", "commit.after_swap", "commit.old_deleted"))})
    kill_loop(one_file, zygote, tmp_path, kills, out=True)


def test_kill_during_rename_aside_swap(one_file, zygote, tmp_path):
    """Without RENAME_EXCHANGE the swap is two renames; a kill between them leaves MERGED aside, not lost."""
    listing = tmp_path / "list"
    shutil.copytree(one_file.root / "merged", listing / "merged")
    assert zygote.run([dict(argv=one_file.argv(listing / "merged"), log=str(tmp_path / "list.log"), fault="list",
                            fault_log=str(tmp_path / "points"), no_exchange=True)]) == [0]
    points = (tmp_path / "points").read_text().split()
    assert snapshot(listing / "merged") == one_file.want
    fam = Family(one_file.root, one_file.old, one_file.want, points)
    names = ("engine.end_pass.write", "commit.before_swap", "commit.renamed_aside", "commit.after_swap",
             "commit.old_deleted")
    phases = kill_loop(fam, zygote, tmp_path / "kills", [points.index(n) + 1 for n in names], no_exchange=True)
    assert phases == {"pass2": 1, "commit": 1, "swap": 1, "swapped": 2}


def test_env_switch_kills_the_real_cli(one_file, zygote, tmp_path):
    """`python -m opcm_ext` itself, with OPCM_FAULT_AT in its environment: the same points, the same outcome."""
    real = [p for p in one_file.points if p != "pass1.scratch_put"]  # the zygote's extra points are not here
    runs = {}
    for what, at in (("list", "list"), ("before_swap", real.index("commit.before_swap") + 1),
                     ("after_swap", real.index("commit.after_swap") + 1)):
        d = tmp_path / what
        shutil.copytree(one_file.root / "merged", d / "merged")
        env = dict(os.environ, OPCM_FAULT_AT=str(at), OPCM_FAULT_LOG=str(d / "points"))
        runs[what] = (d, subprocess.Popen([sys.executable, "-m", "opcm_ext", *one_file.argv(d / "merged")], env=env,
                                          cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    codes = {w: p.wait(timeout=300) for w, (d, p) in runs.items()}
    assert codes == {"list": 0, "before_swap": -9, "after_swap": -9}, {w: p.stderr.read() for w, (d, p) in runs.items()}
    assert (runs["list"][0] / "points").read_text().split() == real
    assert snapshot(runs["list"][0] / "merged") == one_file.want
    assert snapshot(runs["before_swap"][0] / "merged") == one_file.old
    after = snapshot(runs["after_swap"][0] / "merged")
    assert after.pop(MARKER) and after == one_file.want
    # the next run cleans up (a rerun of the finished step is refused as a duplicate)
    codes = zygote.run([dict(argv=one_file.argv(runs[w][0] / "merged"), log=str(runs[w][0] / "rerun.log"))
                        for w in ("before_swap", "after_swap")])
    assert codes == [0, 2]
    for w in ("before_swap", "after_swap"):
        assert snapshot(runs[w][0] / "merged") == one_file.want and leftovers(runs[w][0] / "merged") == []
