"""Every bad input of issue 4, through the CLI (exit 2, one line) and the API (typed error), merged untouched.

ONE table (``CASES``): each case builds its bad input in a fresh copy of a small
family (base, task1..task3, ``merged`` = OPCM of task1 and task2) and returns the
call to make. Every case is run three times, each on its own fresh copy:

- API: ``merge_stream`` raises exactly the listed ``opcm_ext.errors`` type, whose
  message matches the case's key phrase;
- CLI: exit code 2, exactly one line on stderr (``opcm: error: ...`` with the
  key phrase), no traceback;
- CLI with ``-v``: exit code 2, the same line plus the detail (the traceback
  naming the exception type).

Each time the guarded checkpoint folders (the merged one, and every input the
case touched) keep their bytes, and no ``.opcm-tmp``/``.opcm-old`` temporary is
left beside or inside them. An internal failure (exit 1 with the hint) and a
merge that finishes while another one is starting close the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import opcm_ext
import opcm_ext.errors as errors  # (`from opcm_ext import errors` recurses in the lazy __getattr__)
from helpers import make_family, snapshot, temporaries, tiny_clip_vision_config
from zygote import Zygote  # the fork server that runs `opcm` without paying its imports each time

# ----------------------------------------------------------------------------------------------
# the fixture family and the checks shared by every case
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """base, task1..task3 (HF folders) and merged = OPCM(task1, task2), built once."""
    root = tmp_path_factory.mktemp("bad_inputs_family")
    make_family(root, tiny_clip_vision_config(), "CLIPVisionModel", 3, seed=11)
    opcm_ext.merge_sequence(root / "base", [root / "task1", root / "task2"], root / "merged")
    return root


class Fam:
    """A fresh, private copy of the family: ``fam.base``, ``fam.task3``, ``fam.merged``, ..."""

    def __init__(self, pristine: Path, where: Path) -> None:
        self.root = where
        shutil.copytree(pristine, where, symlinks=True)
        self.guards: list[Path] = []
        self.stack = contextlib.ExitStack()

    def __getattr__(self, name: str) -> Path:
        return self.root / name

    def st(self, name: str) -> Path:
        return self.root / name / "model.safetensors"


# ----------------------------------------------------------------------------------------------
# building bad inputs
# ----------------------------------------------------------------------------------------------


def rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load a safetensors file, edit its tensors in place, save it back keeping its metadata."""
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata=md)


def first_weight(path: Path, ndim: int = 2) -> str:
    """The first (sorted) floating tensor of ``ndim`` dimensions: the victim of an edit."""
    sd = load_file(str(path))
    return next(k for k in sorted(sd) if sd[k].is_floating_point() and sd[k].dim() == ndim)


def raw_parts(path: Path) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors file, read by hand."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(path: Path, header: dict, data: bytes) -> None:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, data = raw_parts(path)
    edit(header)
    write_raw(path, header, data)


def same_size_pair(header: dict) -> tuple[str, str]:
    """Two tensors with the same byte length (so one can be pointed at the other's bytes)."""
    seen: dict[int, str] = {}
    for k in sorted(header):
        if k == "__metadata__":
            continue
        b, e = header[k]["data_offsets"]
        if e - b > 0 and e - b in seen:
            return seen[e - b], k
        seen.setdefault(e - b, k)
    raise AssertionError("no two tensors of equal size")


@dataclass
class Call:
    """One merge to attempt: ``opcm step BASE MERGED NEW [-o OUT] ARGS`` == merge_stream(..., **kwargs)."""

    base: Path
    merged: Path
    new: Path
    out: Path | None = None
    cli_args: list[str] = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    cli_skip: str | None = None  # why the CLI side cannot run here (the API side still does)

    def argv(self, verbose: bool) -> list[str]:
        a = (["-v"] if verbose else []) + ["step", str(self.base), str(self.merged), str(self.new)]
        if self.out is not None:
            a += ["-o", str(self.out)]
        return a + ["--no-progress"] + self.cli_args

    def api(self):
        return opcm_ext.merge_stream(self.base, self.merged, self.new, self.out, **self.kwargs)


def _guard(fam: Fam, *paths: Path) -> None:
    fam.guards.extend(paths)


# -- incompatible checkpoints -------------------------------------------------------------------


def missing_tensor(fam):
    k = first_weight(fam.st("task3"))
    rewrite(fam.st("task3"), lambda sd: sd.pop(k))
    return Call(fam.base, fam.merged, fam.task3)


def extra_tensor(fam):
    rewrite(fam.st("task3"), lambda sd: sd.update({"extra_head.weight": torch.zeros(3, 4)}))
    return Call(fam.base, fam.merged, fam.task3)


def shape_mismatch(fam):
    k = first_weight(fam.st("task3"))
    rewrite(fam.st("task3"), lambda sd: sd.update({k: sd[k][:-1].contiguous()}))
    return Call(fam.base, fam.merged, fam.task3)


def dtype_float_vs_int(fam):
    k = first_weight(fam.st("task3"))
    rewrite(fam.st("task3"), lambda sd: sd.update({k: sd[k].to(torch.int32)}))
    return Call(fam.base, fam.merged, fam.task3)


def dtype_float64(fam):
    k = first_weight(fam.st("task3"))
    rewrite(fam.st("task3"), lambda sd: sd.update({k: sd[k].double()}))
    return Call(fam.base, fam.merged, fam.task3)


# -- non-finite values --------------------------------------------------------------------------


def _poison(value: float):
    def edit(sd):
        k = sorted(k for k in sd if sd[k].is_floating_point())[-1]
        sd[k].view(-1)[0] = value

    return edit


def nan_in_new(fam):
    rewrite(fam.st("task3"), _poison(math.nan))
    return Call(fam.base, fam.merged, fam.task3)


def inf_in_base(fam):
    rewrite(fam.st("base"), _poison(math.inf))
    _guard(fam, fam.base)
    return Call(fam.base, fam.merged, fam.task3)


def nan_in_merged(fam):
    rewrite(fam.st("merged"), _poison(math.nan))
    return Call(fam.base, fam.merged, fam.task3)


# -- identity and state -------------------------------------------------------------------------


def wrong_base(fam):
    """Another base of the same architecture: every floating tensor nudged (a different model)."""

    def nudge(sd):
        g = torch.Generator().manual_seed(5)
        for k, v in sd.items():
            if v.is_floating_point():
                sd[k] = v + 0.01 * torch.randn(v.shape, generator=g)

    shutil.copytree(fam.base, fam.root / "other_base")
    rewrite(fam.st("other_base"), nudge)
    return Call(fam.other_base, fam.merged, fam.task3)


def duplicate_model(fam):
    shutil.copytree(fam.task1, fam.root / "task1_again")  # same content, another name
    return Call(fam.base, fam.merged, fam.task1_again)


def merged_without_state(fam):
    _guard(fam, fam.task2)
    return Call(fam.base, fam.task2, fam.task3)


# -- unsupported or corrupt files ---------------------------------------------------------------


def bad_header_length(fam):
    p = fam.st("task3")
    blob = bytearray(p.read_bytes())
    blob[:8] = struct.pack("<Q", 1 << 40)
    p.write_bytes(bytes(blob))
    return Call(fam.base, fam.merged, fam.task3)


def header_not_json(fam):
    p = fam.st("task3")
    blob = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    blob[8 : 8 + n] = b"{not json" + b" " * (n - 9)
    p.write_bytes(bytes(blob))
    return Call(fam.base, fam.merged, fam.task3)


def truncated_data(fam):
    p = fam.st("task3")
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 100)
    return Call(fam.base, fam.merged, fam.task3)


def offsets_outside_file(fam):
    def edit(h):
        k = same_size_pair(h)[0]
        b, e = h[k]["data_offsets"]
        h[k]["data_offsets"] = [b + 10**6, e + 10**6]

    edit_header(fam.st("task3"), edit)
    return Call(fam.base, fam.merged, fam.task3)


def overlapping_tensors(fam):
    def edit(h):
        a, b = same_size_pair(h)
        h[b]["data_offsets"] = list(h[a]["data_offsets"])

    edit_header(fam.st("task3"), edit)
    return Call(fam.base, fam.merged, fam.task3)


def unknown_dtype(fam):
    def edit(h):
        k = next(k for k in sorted(h) if k != "__metadata__" and h[k]["dtype"] == "F32")
        h[k]["dtype"] = "F7"

    edit_header(fam.st("task3"), edit)
    return Call(fam.base, fam.merged, fam.task3)


def pickle_file(fam):
    pt = fam.task3 / "pytorch_model.bin"
    torch.save(load_file(str(fam.st("task3"))), pt)
    return Call(fam.base, fam.merged, pt)


def pickle_folder(fam):
    torch.save(load_file(str(fam.st("task3"))), fam.task3 / "pytorch_model.bin")
    fam.st("task3").unlink()
    return Call(fam.base, fam.merged, fam.task3)


def missing_path(fam):
    return Call(fam.base, fam.merged, fam.root / "no_such_model")


# -- options ------------------------------------------------------------------------------------


def alpha(value: float):
    def build(fam):
        return Call(fam.base, fam.merged, fam.task3, cli_args=[f"--alpha={value}"], kwargs={"alpha": value})

    return build


def memory_budget(value: str):
    def build(fam):
        return Call(fam.base, fam.merged, fam.task3, cli_args=[f"--memory-budget={value}"],
                    kwargs={"memory_budget": value})

    return build


# -- the output ---------------------------------------------------------------------------------


def output_is_base(fam):
    _guard(fam, fam.base)
    return Call(fam.base, fam.merged, fam.task3, out=fam.base)


def output_unwritable(fam):
    """-o into a folder nobody may write: chmod 0o500, or a read-only bind mount when root ignores modes."""
    ro = fam.root / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    fam.stack.callback(ro.chmod, 0o700)
    if os.access(ro, os.W_OK):  # root: permission bits do not apply
        r = subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"running as root and a read-only bind mount is not permitted: {r.stderr.decode().strip()}")
        fam.stack.callback(subprocess.run, ["umount", "-l", str(ro)], check=True)
        assert not os.access(ro, os.W_OK)
    return Call(fam.base, fam.merged, fam.task3, out=ro / "out")


def disk_too_small(fam):
    """Up-front free-space check. API: a patched shutil.disk_usage. CLI: merged lives on a 4 MiB tmpfs."""
    tmpfs = _mount_tmpfs(fam, fam.root / "small_disk", "4m")
    merged = fam.merged
    cli_skip = None
    if tmpfs is None:
        cli_skip = "no tmpfs can be mounted here (not root), and a patch cannot reach another process"
        usage = namedtuple("usage", "total used free")
        fam.stack.enter_context(_patched(shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 4096, 4096)))
    else:
        merged = tmpfs / "merged"
        shutil.copytree(fam.merged, merged)
    _guard(fam, merged)
    return Call(fam.base, merged, fam.task3, cli_skip=cli_skip)


def lock_held(fam):
    """Another process holds the output's lock (the lock file is ``.<name>.opcm.lock`` beside it)."""
    lock = fam.merged.parent / f".{fam.merged.name}.opcm.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fam.stack.callback(os.close, fd)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    return Call(fam.base, fam.merged, fam.task3)


def _mount_tmpfs(fam: Fam, where: Path, size: str) -> Path | None:
    where.mkdir()
    if os.geteuid() != 0:
        return None
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        return None
    fam.stack.callback(subprocess.run, ["umount", "-l", str(where)], check=True)
    return where


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ----------------------------------------------------------------------------------------------
# THE table
# ----------------------------------------------------------------------------------------------

E = errors
Case = namedtuple("Case", "build error phrase one_line", defaults=(True,))

CASES = [
    # incompatible checkpoints (named tensor, named file)
    pytest.param(Case(missing_tensor, E.IncompatibleCheckpointError, r"new checkpoint .*task3 missing 1 tensor"), id="missing-tensor"),
    pytest.param(Case(extra_tensor, E.IncompatibleCheckpointError, r"task3 has 1 tensor\(s\) that base lacks \(e\.g\. extra_head\.weight\)"), id="extra-tensor"),
    pytest.param(Case(shape_mismatch, E.IncompatibleCheckpointError, r"tensor \S+: shapes differ .*new="), id="shape-mismatch"),
    pytest.param(Case(dtype_float_vs_int, E.IncompatibleCheckpointError, r"tensor \S+: dtypes are incompatible .*new=int32"), id="dtype-float-vs-int"),
    pytest.param(Case(dtype_float64, E.IncompatibleCheckpointError, r"tensor \S+ in new .*task3\) is float64; opcm-ext merges float32, float16 and bfloat16"), id="dtype-float64"),
    # non-finite values, in each of the three inputs
    pytest.param(Case(nan_in_new, E.NonFiniteError, r"tensor \S+ in the new checkpoint .*task3 holds NaN or Inf; nothing was written"), id="nan-in-new"),
    pytest.param(Case(inf_in_base, E.NonFiniteError, r"tensor \S+ in the base checkpoint .*base holds NaN or Inf"), id="inf-in-base"),
    pytest.param(Case(nan_in_merged, E.NonFiniteError, r"tensor \S+ in the merged checkpoint .*merged holds NaN or Inf"), id="nan-in-merged"),
    # identity and merge state
    pytest.param(Case(wrong_base, E.IncompatibleCheckpointError, r"merged was made from base 'base' \(hash blake3:[0-9a-f]+\), but the given base .*other_base has hash"), id="wrong-base"),
    pytest.param(Case(duplicate_model, E.DuplicateModelError, r"task1_again was already merged at step 1 \(as 'task1', same content hash\).*--allow-duplicate"), id="duplicate-model"),
    pytest.param(Case(merged_without_state, E.MergeStateError, r"task2 carries no opcm-ext merge state"), id="merged-without-state"),
    # unsupported or corrupt files
    pytest.param(Case(bad_header_length, E.CheckpointError, r"task3/model\.safetensors: header length 1099511627776 is larger than the rest of the file.*re-download"), id="corrupt-header-length"),
    pytest.param(Case(header_not_json, E.CheckpointError, r"task3/model\.safetensors: header is not valid UTF-8 JSON"), id="corrupt-header-not-json"),
    pytest.param(Case(truncated_data, E.CheckpointError, r"task3/model\.safetensors: tensor '\S+': data_offsets end \d+ lies beyond the data section .*truncated"), id="corrupt-truncated"),
    pytest.param(Case(offsets_outside_file, E.CheckpointError, r"task3/model\.safetensors: tensor '\S+': data_offsets end \d+ lies beyond the data section"), id="corrupt-offsets-outside"),
    pytest.param(Case(overlapping_tensors, E.CheckpointError, r"task3/model\.safetensors: tensors '\S+' and '\S+' overlap in the data section"), id="corrupt-overlap"),
    pytest.param(Case(unknown_dtype, E.CheckpointError, r"task3/model\.safetensors: tensor '\S+': unknown dtype 'F7'"), id="corrupt-unknown-dtype"),
    # the conversion recipe is a few lines of code after the one error line (see the test)
    pytest.param(Case(pickle_file, E.CheckpointError, r"pytorch_model\.bin is a pickled PyTorch checkpoint\. opcm-ext reads only safetensors.*Convert it once", one_line=False), id="pickle-bin-file"),
    pytest.param(Case(pickle_folder, E.CheckpointError, r"task3 holds only pickled PyTorch weights \(pytorch_model\.bin\).*Convert it once", one_line=False), id="pickle-bin-folder"),
    pytest.param(Case(missing_path, E.CheckpointError, r"no_such_model does not exist"), id="missing-path"),
    # options
    pytest.param(Case(alpha(0.0), E.ConfigError, r"opcm: alpha must be in \(0, 1\], got 0\.0"), id="alpha-0"),
    pytest.param(Case(alpha(1.5), E.ConfigError, r"opcm: alpha must be in \(0, 1\], got 1\.5"), id="alpha-1.5"),
    pytest.param(Case(memory_budget("lots"), E.ConfigError, r"cannot read the size 'lots'"), id="budget-words"),
    pytest.param(Case(memory_budget("0"), E.ConfigError, r"memory budget must be positive"), id="budget-zero"),
    pytest.param(Case(memory_budget("-1GB"), E.ConfigError, r"cannot read the size '-1GB'"), id="budget-negative"),
    pytest.param(Case(memory_budget("2XB"), E.ConfigError, r"cannot read the size '2XB'"), id="budget-bad-unit"),
    # the output
    pytest.param(Case(output_is_base, E.OutputError, r"the output .*base is the base checkpoint; writing there would destroy an input"), id="output-is-base"),
    pytest.param(Case(output_unwritable, E.OutputError, r"the output's parent folder .*readonly is not writable"), id="output-unwritable"),
    pytest.param(Case(disk_too_small, E.OutputError, r"not enough free disk space for .*merged: need .* free on the filesystem"), id="disk-too-small"),
    pytest.param(Case(lock_held, E.OutputError, r"another merge into .*merged is running \(pid 4242\)"), id="lock-held"),
]


@contextlib.contextmanager
def prepared(pristine: Path, where: Path, case: Case):
    """A fresh family copy holding the case's bad input; afterwards the guards are checked."""
    fam = Fam(pristine, where)
    with fam.stack:
        call = case.build(fam)
        guards = [call.merged, *fam.guards]
        before = {g: snapshot(g) for g in guards}
        yield call
        for g in guards:
            assert snapshot(g) == before[g], f"{g} changed"
            assert temporaries(g) == [], f"temporaries left around {g}"
        if call.out is not None and call.out.parent.exists():
            assert temporaries(call.out) == []


# ----------------------------------------------------------------------------------------------
# the two ways in
# ----------------------------------------------------------------------------------------------


Result = namedtuple("Result", "returncode stdout stderr")


def cli(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m opcm_ext ARGV`` from outside the repository (the installed package is imported)."""
    return subprocess.run([sys.executable, "-m", "opcm_ext", *argv], capture_output=True, text=True,
                          timeout=300, cwd=tempfile.gettempdir())


@pytest.fixture(scope="module")
def zygote():
    """Forks a fresh ``opcm`` (``opcm_ext.cli.main``) per run without ~6 s of imports each (see test_crash)."""
    z = Zygote()
    yield z
    z.close()


def zygote_cli(zygote: Zygote, runs: list[tuple[list[str], Path]]) -> list[Result]:
    """Run ``opcm ARGV`` for each (argv, scratch folder) at once; exit code, stdout, stderr of each."""
    jobs = [dict(argv=argv, log=str(d / "stdout"), err=str(d / "stderr")) for argv, d in runs]
    codes = zygote.run(jobs)
    return [Result(c, (d / "stdout").read_text(), (d / "stderr").read_text()) for c, (_, d) in zip(codes, runs)]


def check_one_line(case: Case, r) -> None:
    """Exit 2, nothing on stdout, one readable `opcm: error:` line with the key phrase, no traceback."""
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines and lines[0].startswith("opcm: error: "), r.stderr
    if case.one_line:
        assert len(lines) == 1, r.stderr
    else:  # a code recipe follows the error line: indented code or an "or, ..." alternative
        assert all(ln.startswith(("    ", "or,")) for ln in lines[1:]), r.stderr
    assert re.search(case.phrase, r.stderr, re.S), r.stderr


@pytest.mark.parametrize("case", CASES)
def test_api_raises_the_typed_error(case: Case, pristine, tmp_path):
    with prepared(pristine, tmp_path / "f", case) as call:
        with pytest.raises(errors.OpcmError) as info:
            call.api()
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    assert isinstance(info.value, errors.InputError)
    assert re.search(case.phrase, str(info.value), re.S), str(info.value)


@pytest.mark.parametrize("case", CASES)
def test_cli_exits_2_with_one_line(case: Case, pristine, tmp_path, zygote):
    # the plain run and the -v run are independent processes on independent copies: run them together
    with prepared(pristine, tmp_path / "plain", case) as call, \
            prepared(pristine, tmp_path / "verbose", case) as call_v:
        if call.cli_skip:
            pytest.skip(call.cli_skip)
        plain, verbose = zygote_cli(zygote, [(call.argv(False), tmp_path / "plain"),
                                             (call_v.argv(True), tmp_path / "verbose")])
    check_one_line(case, plain)
    assert verbose.returncode == 2, verbose.stderr
    assert re.search(case.phrase, verbose.stderr, re.S), verbose.stderr
    # the detail: where it was raised and the error's type
    assert "Traceback (most recent call last)" in verbose.stderr, verbose.stderr
    assert f"opcm_ext.errors.{case.error.__name__}" in verbose.stderr, verbose.stderr


REAL_ENTRY = ["corrupt-truncated", "nan-in-new", "lock-held"]


def test_real_entry_point_exits_2_with_one_line(pristine, tmp_path):
    """A few cases through ``python -m opcm_ext`` itself (its own start-up, ``sys.exit`` of the code)."""
    cases = {p.id: p.values[0] for p in CASES if p.id in REAL_ENTRY}
    assert sorted(cases) == sorted(REAL_ENTRY)
    with contextlib.ExitStack() as stack:
        calls = {i: stack.enter_context(prepared(pristine, tmp_path / i, c)) for i, c in cases.items()}
        with ThreadPoolExecutor(len(calls)) as pool:
            results = dict(zip(calls, pool.map(cli, [c.argv(False) for c in calls.values()])))
    for i, r in results.items():
        check_one_line(cases[i], r)


# ----------------------------------------------------------------------------------------------
# allowed with the flag, internal failures, a merge finishing while another starts
# ----------------------------------------------------------------------------------------------


def test_duplicate_is_allowed_with_the_flag(pristine, tmp_path, zygote):
    fam = Fam(pristine, tmp_path / "f")
    shutil.copytree(fam.task1, fam.root / "task1_again")
    (r,) = zygote_cli(zygote, [(["step", str(fam.base), str(fam.merged), str(fam.task1_again), "-o",
                                 str(fam.root / "cli_out"), "--no-progress", "--allow-duplicate"], tmp_path)])
    assert r.returncode == 0, r.stderr
    rep = opcm_ext.merge_stream(fam.base, fam.merged, fam.task1_again, fam.root / "api_out", allow_duplicate=True)
    assert rep.step == 3
    for out in ("cli_out", "api_out"):
        st = opcm_ext.read_state(fam.root / out)
        assert [m["name"] for m in st.models] == ["task1", "task2", "task1_again"]
        assert st.models[0]["hash"] == st.models[2]["hash"]
    assert snapshot(fam.root / "cli_out") == snapshot(fam.root / "api_out")


def test_internal_failure_exits_1_with_a_hint(pristine, tmp_path, monkeypatch, capsys):
    from opcm_ext import api, cli as cli_mod

    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(api, "run_step", broken)
    fam = Fam(pristine, tmp_path / "f")
    before = snapshot(fam.merged)
    argv = ["step", str(fam.base), str(fam.merged), str(fam.task3), "--no-progress"]

    assert cli_mod.main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "opcm: internal error: RuntimeError: kernel exploded",
        "opcm: this is a bug or an environment problem; rerun with -v and report the output at the project's "
        "issue tracker. The previous output is unchanged.",
    ]
    assert cli_mod.main(["-v", *argv]) == 1
    err = capsys.readouterr().err
    assert "opcm: internal error: RuntimeError: kernel exploded" in err
    assert "Traceback (most recent call last)" in err and "kernel exploded" in err
    assert snapshot(fam.merged) == before and temporaries(fam.merged) == []


def test_merge_finishing_while_another_starts_is_not_lost(pristine, tmp_path, monkeypatch):
    """Two `opcm step` into one merged folder: the second read the merged state before the first committed.

    The lock alone only serialises the writes; without a second look under the lock the second
    merge would write step 3 from the stale step-2 state and silently drop the first one's model.
    """
    from opcm_ext.io import OutputTransaction

    fam = Fam(pristine, tmp_path / "f")
    shutil.copytree(fam.task3, fam.root / "task4")
    rewrite(fam.st("task4"), _poison(0.5))  # another fine-tune (different content)
    open_lock = OutputTransaction.open
    first: list = []

    def other_merge_commits_first(self):
        if not first:  # the other merge takes the lock, commits step 3 and releases the lock
            first.append(None)
            first[0] = opcm_ext.merge_stream(fam.base, fam.merged, fam.task3)
        return open_lock(self)

    monkeypatch.setattr(OutputTransaction, "open", other_merge_commits_first)
    after_first = None
    with pytest.raises(errors.OutputError, match=r"another merge into .*merged finished while this one was starting"):
        try:
            opcm_ext.merge_stream(fam.base, fam.merged, fam.task4)
        finally:
            after_first = snapshot(fam.merged)
    st = opcm_ext.read_state(fam.merged)
    assert first[0].step == 3 and st.step == 3
    assert [m["name"] for m in st.models] == ["task1", "task2", "task3"]
    assert temporaries(fam.merged) == []
    monkeypatch.undo()
    opcm_ext.merge_stream(fam.base, fam.merged, fam.task4)  # a rerun folds task4 into the new state
    assert [m["name"] for m in opcm_ext.read_state(fam.merged).models] == ["task1", "task2", "task3", "task4"]
    assert after_first is not None
