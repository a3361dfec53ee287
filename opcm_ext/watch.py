"""`opcm watch`: merge each checkpoint that lands in an inbox folder, one step at a time.

An inbox entry is an input when it is a model folder (``config.json`` + ``model.safetensors``), a
sharded one (``config.json`` + ``model.safetensors.index.json`` + every shard the index lists), a
PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) or a bare
``.safetensors`` file. It is complete when all of that is present and none of its files changed for
the settle time (by size and mtime), or when a ``READY`` marker is in the folder (``NAME.READY``
beside a bare file). Complete inputs are merged in arrival order: the time each became complete
(its newest file's mtime plus the settle time, or its marker's mtime), ties by name.

A rejected input (the input's own fault: corrupt, incompatible with BASE, non-finite, already merged
under another name) is moved to ``INBOX/.rejected/`` with ``NAME.reason.txt`` beside it, and the
watcher goes on; any other failure stops it and leaves the input in place. What was merged is
in MERGED's merge state (an input is recognised there by name and content hash); the ledger
``INBOX/.opcm-watch.jsonl`` remembers, across restarts, each input the watcher finished with
(merged, rejected, recognised) under the fingerprint of its files.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from .errors import (
    CheckpointError,
    ConfigError,
    DuplicateModelError,
    IncompatibleCheckpointError,
    InputError,
    MergeStateError,
    NonFiniteError,
)
from .state import MergeState

__all__ = ["Watcher", "Entry", "scan_inbox", "add_arguments", "main", "READY", "REJECTED", "LEDGER"]

log = logging.getLogger(__name__)

#: The marker a producer may write to say "complete now" without waiting for the settle time.
READY = "READY"
#: Where rejected inputs go, inside the inbox.
REJECTED = ".rejected"
#: The watcher's record of finished inputs, inside the inbox.
LEDGER = ".opcm-watch.jsonl"
_LOCK = ".opcm-watch.lock"
_INDEX = "model.safetensors.index.json"
_NAP = 0.2  # seconds: how often a polling watcher checks for a stop request while it sleeps


@dataclass(frozen=True)
class Entry:
    """One inbox entry as the watcher sees it now."""

    name: str
    path: Path
    kind: str  # "folder", "sharded", "adapter", "file" or "unknown" (not a checkpoint layout)
    missing: tuple[str, ...]  # required files not there yet (empty: structurally complete)
    ready: bool  # a READY marker says it is complete
    fingerprint: str  # of every file's (path, size, mtime)
    changed_at: float  # newest mtime of its files (or the marker's mtime when ready)

    def arrival(self, now: float, settle: float) -> float | None:
        """When it became complete, or None while it is not."""
        if self.ready:
            return min(self.changed_at, now)
        if self.missing or self.kind == "unknown":
            return None
        done = min(self.changed_at, now) + settle  # an mtime in the future (clock skew) counts as now
        return done if done <= now else None

    def waiting_for(self, now: float, settle: float) -> str:
        """Why it is not complete yet (for -v)."""
        if self.missing:
            return "missing " + ", ".join(self.missing)
        return f"its files changed {max(0.0, now - self.changed_at):.0f}s ago (settle time {settle:g}s)"


def _layout(path: Path) -> tuple[str, tuple[str, ...]]:
    """The input kind of a folder and the required files it still lacks."""

    def lacking(*names: str) -> tuple[str, ...]:
        return tuple(n for n in names if not (path / n).is_file())

    if (path / "model.safetensors").is_file():
        return "folder", lacking("config.json")
    if (path / _INDEX).is_file():
        try:
            shards = sorted(set(json.loads((path / _INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "sharded", (f"a valid {_INDEX} (it is not complete JSON with a weight_map yet)",)
        if not all(isinstance(s, str) for s in shards):
            return "sharded", (f"a valid {_INDEX} (its weight_map names are not all strings)",)
        return "sharded", lacking("config.json", *shards)
    if (path / "adapter_config.json").is_file() or (path / "adapter_model.safetensors").is_file():
        return "adapter", lacking("adapter_config.json", "adapter_model.safetensors")
    return "unknown", ()


def _files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if not (root == str(path) and f == READY)]
    return found


def inspect_entry(path: Path) -> Entry | None:
    """The entry at ``path``, or None when it is not an input (hidden, a marker, not safetensors)."""
    name = path.name
    if name.startswith(".") or name.endswith("." + READY):
        return None
    if path.is_dir():
        kind, missing = _layout(path)
        marker = path / READY
    elif path.is_file() and name.endswith(".safetensors"):
        kind, missing = "file", ()
        marker = path.with_name(f"{name}.{READY}")
    else:
        return None
    h = hashlib.sha256()
    newest = 0.0
    for f in _files_of(path):
        try:
            st = f.stat()
        except OSError:  # removed while we looked: the next scan sees the new state
            continue
        h.update(f"{f.relative_to(path) if f != path else name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        newest = max(newest, st.st_mtime_ns / 1e9)
    ready = marker.is_file()
    if ready:
        newest = marker.stat().st_mtime_ns / 1e9
    return Entry(name, path, kind, missing, ready, h.hexdigest()[:32], newest)


def scan_inbox(inbox: Path) -> list[Entry]:
    """Every input-like entry of ``inbox``, by name."""
    entries = []
    for name in sorted(os.listdir(inbox)):
        e = inspect_entry(inbox / name)
        if e is not None:
            entries.append(e)
    return entries


def same_content(recorded_hash: str, path: Path) -> bool:
    """Whether ``path`` holds the model a merge state recorded as ``recorded_hash`` (in that hash's scheme).

    The hash is cached by file identity, so the step that follows does not hash the input again.
    """
    from . import io

    try:
        io.hash_algorithm(recorded_hash)
    except ValueError as e:
        raise MergeStateError(f"the merge state of the output records a malformed model hash: {e}") from None
    with io.CheckpointReader(path) as r:
        return io.same_model(recorded_hash, r)


def input_at_fault(exc: InputError) -> bool:
    """Whether merge_stream refused the new input itself (reject it) rather than BASE, MERGED or the setup (stop).

    BASE and MERGED were opened before watching and MERGED is written only by merge_stream, so an
    unreadable, incompatible, non-finite or already merged checkpoint is the input.
    """
    return isinstance(exc, (CheckpointError, IncompatibleCheckpointError, NonFiniteError, DuplicateModelError))


class _Ledger:
    """INBOX/.opcm-watch.jsonl: one JSON line per input the watcher finished with, for one MERGED."""

    def __init__(self, path: Path, out: Path) -> None:
        self.path, self.out = path, str(out)
        self._last: dict[str, dict[str, Any]] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        for i, line in enumerate(lines, start=1):
            try:
                rec = json.loads(line)
                if rec["out"] == self.out:
                    self._last[rec["input"]] = rec
            except (ValueError, KeyError, TypeError):  # a line torn by a crash: that input is looked at again
                log.warning("%s:%d is not a ledger record; ignoring it", path, i)

    def done(self, entry: Entry) -> bool:
        """Whether the watcher already finished with this input as it is now."""
        rec = self._last.get(entry.name)
        return rec is not None and rec.get("fingerprint") == entry.fingerprint

    def add(self, entry: Entry, outcome: str, when: str) -> None:
        """Record (durably) that the watcher finished with ``entry``."""
        rec = {"input": entry.name, "fingerprint": entry.fingerprint, "outcome": outcome, "out": self.out, "time": when}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._last[entry.name] = rec


def _inside(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


def _finish_interrupted(out: Path) -> None:
    """Finish or undo what a step killed mid-swap left beside MERGED, so MERGED is seen as merge_stream sees it."""
    from . import io

    if io.needs_recovery(out):
        for note in io.recover_output(out):
            log.info(note)


class Watcher:
    """Merges the complete inputs of ``inbox`` into ``out`` with ``merge_stream``, one step at a time.

    ``options`` are merge_stream's keyword options (method, alpha, lam, memory_budget, ...);
    ``clock`` (seconds, same epoch as file mtimes) and ``sleep`` are injectable for tests. Use it
    as a context manager: it holds a lock on the inbox so that two watchers never share one.
    """

    def __init__(
        self,
        inbox: str | os.PathLike,
        base: str | os.PathLike,
        out: str | os.PathLike,
        options: dict[str, Any] | None = None,
        *,
        settle: float = 30.0,
        poll: float = 5.0,
        log_to: TextIO | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inbox = Path(os.path.abspath(inbox))
        self.base = Path(os.path.abspath(base))
        self.out = Path(os.path.abspath(out))
        self.options = dict(options or {})
        self.settle, self.poll = float(settle), float(poll)
        self.clock, self.sleep = clock, sleep
        self._log = log_to if log_to is not None else sys.stdout
        self._stop = False
        self._waiting: dict[str, str] = {}
        self._once: set[str] | None = None  # with run(once=True): the inputs handled in this run
        self.steps = 0
        if not self.settle >= 0 or not self.poll > 0:
            raise ConfigError(f"--settle must be >= 0 and --poll > 0 seconds (got {settle} and {poll}).")
        for opt in ("overwrite", "out", "merged"):
            if opt in self.options:
                raise ConfigError(f"the watcher always continues {self.out} in place; drop the {opt!r} option.")
        if not self.inbox.is_dir():
            raise ConfigError(f"the inbox {self.inbox} is not a folder; create it (mkdir -p) or fix the path.")
        for what, p in (("--out", self.out), ("--base", self.base)):
            if _inside(p, self.inbox):
                raise ConfigError(
                    f"{what} {p} is inside the inbox {self.inbox}, where it would be taken for a new model; "
                    "put it outside the inbox."
                )
        self._lock_fd = self._lock()
        try:
            self._check_setup()
            self.ledger = _Ledger(self.inbox / LEDGER, self.out)
        except BaseException:
            self.close()
            raise

    # -- setup -----------------------------------------------------------------------
    def _lock(self) -> int:
        path = self.inbox / _LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another opcm watch is already watching {self.inbox} (it holds {path}); stop it first, or let "
                "it merge what arrives."
            ) from None
        return fd

    def _check_setup(self) -> None:
        """BASE opens, and MERGED (when it exists) carries an opcm merge state: before any input is judged."""
        from .api import read_state

        read_state(self.base)  # raises CheckpointError naming BASE when it is unreadable
        state = self._state()
        if state is None:
            return
        recorded = state.base.get("name")
        if recorded != self.base.name:
            log.warning("%s was started from a base named %r; --base is %s (the merge checks their hashes)",
                        self.out, recorded, self.base)
        if not same_content(state.base["hash"], self.base):
            raise IncompatibleCheckpointError(
                f"{self.out} was merged from base {recorded!r} ({state.base['hash']}), not from {self.base}; "
                "pass the base that started this merge."
            )

    def _state(self) -> MergeState | None:
        """MERGED's merge state, or None when MERGED does not exist yet."""
        from .api import read_state

        _finish_interrupted(self.out)
        if not self.out.exists():
            return None
        state = read_state(self.out)
        if state is None:
            raise MergeStateError(
                f"{self.out} exists but carries no opcm-ext merge state, so the watcher cannot continue it; "
                "choose a new --out (it is created by the first input) or an output of opcm merge."
            )
        return state

    def close(self) -> None:
        """Release the inbox lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- one step ------------------------------------------------------------------
    def pending(self) -> list[Entry]:
        """Complete inputs the watcher has not finished with, in arrival order."""
        now = self.clock()
        ready = []
        for e in scan_inbox(self.inbox):
            if self.ledger.done(e) or (self._once is not None and e.name in self._once):
                continue
            t = e.arrival(now, self.settle)
            if t is None:
                why = e.waiting_for(now, self.settle) if e.kind != "unknown" else (
                    "not a checkpoint: no config.json + model.safetensors, shard index or adapter (write READY "
                    "to have it tried anyway)"
                )
                if self._waiting.get(e.name) != why:
                    log.info("waiting for %s: %s", e.name, why)
                    self._waiting[e.name] = why
                continue
            self._waiting.pop(e.name, None)
            ready.append((t, e.name, e))
        return [e for _, _, e in sorted(ready, key=lambda x: (x[0], x[1]))]

    def step(self) -> dict[str, Any] | None:
        """Merge, recognise or reject the first pending input; its log record, or None when none is pending."""
        pending = self.pending()
        if not pending:
            return None
        entry = pending[0]
        if self._once is not None:  # --once ends: each input at most once, even one rewritten under us
            self._once.add(entry.name)
        state = self._state()
        from .api import merge_stream

        started = time.perf_counter()
        exists = state is not None
        try:
            known = self._recorded_step(state, entry) if exists else None
            if known is None:
                report = merge_stream(self.base, self.out if exists else None, entry.path,
                                      None if exists else self.out, **self.options)
        except InputError as exc:
            if not input_at_fault(exc):
                self._record(entry, "stopped", error=f"{type(exc).__name__}: {exc}", seconds=_since(started))
                raise
            return self._reject(entry, exc, state, _since(started))
        except KeyboardInterrupt:
            self._record(entry, "abandoned", seconds=_since(started), note="MERGED is unchanged")
            raise
        except Exception as exc:
            self._record(entry, "failed", error=f"{type(exc).__name__}: {exc}", seconds=_since(started),
                         note="stopping; the input is left in place")
            raise
        if known is not None:
            rec = self._record(entry, "already-merged", step=known, method=state.method,
                               note=f"{self.out.name} records {entry.name!r} at step {known} (same content); "
                                    "not merged again")
            self.ledger.add(entry, "already-merged", rec["time"])
            return rec
        self.steps += 1
        extra = {}
        if inspect_entry(entry.path) != entry:
            extra["warning"] = (f"{entry.name} changed while it was merged; check it, and restart the merge "
                                "without it if it was not complete")
        rec = self._record(entry, "merged", step=report.step, method=report.method, **{"lambda": report.lam},
                           norm=report.norms[-1], mean_norm=report.mean_norm, seconds=report.timings.get("total"),
                           **extra)
        self.ledger.add(entry, "merged", rec["time"])
        return rec

    def _recorded_step(self, state: MergeState, entry: Entry) -> int | None:
        """The step at which MERGED's state records this input: same name and same content hash.

        Only a name match is hashed here; the same content under another name is merge_stream's
        duplicate refusal (a rejection), since the watcher did not merge it under that name.
        """
        for i, m in reversed(list(enumerate(state.models, start=1))):
            if m.get("name") == entry.name and same_content(m["hash"], entry.path):
                return i
        return None

    def _reject(self, entry: Entry, exc: InputError, state: MergeState | None, seconds: float) -> dict[str, Any]:
        if not entry.path.exists() and not entry.path.is_symlink():
            return self._record(entry, "vanished", error=str(exc), seconds=seconds)
        folder = self.inbox / REJECTED
        folder.mkdir(exist_ok=True)
        dest = folder / entry.name
        n = 1
        while dest.exists() or dest.is_symlink() or dest.with_name(dest.name + ".reason.txt").exists():
            n += 1
            dest = folder / f"{entry.name}.{n}"
        when = _iso(self.clock())
        reason = f"{type(exc).__name__}: {exc}"
        dest.with_name(dest.name + ".reason.txt").write_text(
            f"opcm watch rejected {entry.name} at {when} (merging into {self.out}):\n{reason}\n", encoding="utf-8"
        )
        self.ledger.add(entry, "rejected", when)  # first: a failed move must not mean trying it again
        moved: str | None = str(dest)
        try:
            os.rename(entry.path, dest)
            marker = entry.path.with_name(f"{entry.name}.{READY}")
            if entry.kind == "file" and marker.exists():
                os.rename(marker, dest.with_name(f"{dest.name}.{READY}"))
        except OSError as e:
            moved = None
            log.warning("could not move %s to %s (%s); it stays, recorded as rejected in %s",
                        entry.path, dest, e, self.ledger.path)
        method = self.options.get("method") or (state.method if state is not None else "opcm")
        return self._record(entry, "rejected", method=method, error=reason, moved_to=moved, seconds=seconds)

    def _record(self, entry: Entry, outcome: str, **fields: Any) -> dict[str, Any]:
        rec = {"event": "step", "time": _iso(self.clock()), "input": entry.name, "kind": entry.kind,
               "outcome": outcome, **fields}
        self.log_line(rec)
        return rec

    def log_line(self, rec: dict[str, Any]) -> None:
        """Write one JSON line to the log."""
        self._log.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
        self._log.flush()

    # -- the loop --------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the watcher to stop once the step in progress is done."""
        self._stop = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop:  # a second signal abandons the step in progress (merge_stream leaves MERGED intact)
            raise KeyboardInterrupt
        self._stop = True
        log.warning("%s: stopping after the current step (send it again to abandon the step)",
                    signal.Signals(signum).name)

    def run(self, once: bool = False) -> int:
        """Merge inputs as they complete until stopped (SIGTERM/SIGINT), or, with ``once``, until none is pending."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.log_line({"event": "start", "time": _iso(self.clock()), "inbox": str(self.inbox), "base": str(self.base),
                       "out": str(self.out), "once": once, "settle": self.settle})
        reason = "error"
        self._once = set() if once else None
        try:
            while not self._stop:
                if self.step() is None:
                    if once:
                        break
                    self._nap()
            reason = "signal" if self._stop else "done"
            return 0
        except KeyboardInterrupt:
            reason = "interrupted"
            raise
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.log_line({"event": "stop", "time": _iso(self.clock()), "reason": reason, "steps": self.steps})

    def _nap(self) -> None:
        left = self.poll
        while left > 0 and not self._stop:
            self.sleep(min(_NAP, left))
            left -= _NAP


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `opcm watch` other than the merge options (cli.py adds those)."""
    p.add_argument("inbox", help="the folder to watch for new fine-tuned checkpoints (folders or .safetensors files)")
    p.add_argument("--base", required=True, help="the pre-trained checkpoint every input was fine-tuned from")
    p.add_argument("-o", "--out", required=True,
                   help="the merged checkpoint: created by the first input, then continued")
    p.add_argument("--settle", type=float, default=30.0, metavar="SECONDS",
                   help="an input is complete when its files have not changed for this long (default 30); "
                        "a READY file in it says so at once")
    p.add_argument("--poll", type=float, default=5.0, metavar="SECONDS", help="how often to look (default 5)")
    p.add_argument("--once", action="store_true", help="merge what is complete now, then exit (for cron)")
    p.add_argument("--log", default=None, metavar="FILE", help="append the JSON-lines log to FILE (default stdout)")


def main(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """Run `opcm watch` with its parsed arguments and the merge options the CLI built."""
    sink = open(args.log, "a", encoding="utf-8") if args.log else None
    try:
        with Watcher(args.inbox, args.base, args.out, options, settle=args.settle, poll=args.poll,
                     log_to=sink) as w:
            return w.run(once=args.once)
    finally:
        if sink is not None:
            sink.close()
