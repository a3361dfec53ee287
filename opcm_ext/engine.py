"""One merge step: the method's passes over the planned groups — read, compute, keep or write.

``run_step`` reads as the data flow of a step. For every pass of the method, an executor walks
the plan's groups (``executors.local`` reads the next group on a one-worker thread pool while the
current one computes); a :class:`Worker` turns each group's stored tensors into a
:class:`~opcm_ext.methods.base.Batch` on the compute device, runs the pass's handler, and keeps
(for a later pass) or writes what it returns. The engine itself computes what every method needs
once: in the first pass the task vectors and their norms (‖τt‖, ‖θ(t−1) − θ0‖), and from those
sums the finiteness of every input. Carried (integer) tensors are copied by the writer step of
the output pass. Nothing reaches the user's folder before the output pass, whose writer lives
inside the caller's output transaction.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from . import _faults
from .errors import ConfigError, NonFiniteError
from .memory import tune_malloc
from .methods.base import Batch, BlockSource, Method, Pass, ScanSums, StepInfo, Sums
from .plan import Classification, Group, Kind, Plan, Streamed
from .state import MergeState

__all__ = ["StepJob", "StepResult", "Worker", "DeviceStore", "run_step", "PassRunner", "non_finite_error"]


class Writer(Protocol):
    """Where output tensors go: a safetensors writer in a transaction, or a dict in memory.

    A writer with a ``device`` attribute equal to the compute device takes the results there
    (no copy to the host).
    """

    def write(self, name: str, tensor: torch.Tensor, *, rows: tuple[int, int] | None = None,
              cols: tuple[int, int] | None = None) -> None: ...


class Sink(Protocol):
    """Opens the output writer once the new merge state is known (it goes into the header)."""

    def open(self, state: MergeState) -> Writer: ...


class Store(Protocol):
    """fp32 tensors one pass keeps for a later pass (OPCM's Σ)."""

    def put(self, key: str, tensor: torch.Tensor, *, rows: tuple[int, int] | None = None,
            cols: tuple[int, int] | None = None) -> None: ...

    def get(self, key: str, *, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
            pin: bool = False) -> torch.Tensor: ...

    def close(self) -> None: ...


class DeviceStore:
    """A Store in the compute device's memory (a GPU step whose Σ fits, or an in-memory merge)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device) -> None:
        self.shapes, self.device = shapes, device
        self._t: dict[str, torch.Tensor] = {}

    def put(self, key, tensor, *, rows=None, cols=None) -> None:
        if rows is None and cols is None:
            self._t[key] = tensor.to(self.device, torch.float32)
            return
        full = self._t.get(key)
        if full is None:
            full = self._t[key] = torch.empty(self.shapes[key], dtype=torch.float32, device=self.device)
        _region(full, rows, cols).copy_(tensor)

    def get(self, key, *, rows=None, cols=None, pin=False) -> torch.Tensor:
        return _region(self._t[key], rows, cols)

    def close(self) -> None:
        self._t.clear()


def _region(t: torch.Tensor, rows, cols) -> torch.Tensor:
    if rows is not None:
        t = t[rows[0]:rows[1]]
    if cols is not None:
        t = t[:, cols[0]:cols[1]]
    return t


@dataclass
class StepJob:
    """Everything one step needs, prepared and validated by the API layer."""

    method: Method
    info: StepInfo
    sources: dict[str, Any]  # role -> reader ("base", "merged" when continuing, "new")
    like: Any  # the reader whose layout, dtypes and carried tensors the output mirrors
    classification: Classification
    plan: Plan
    ops: Any  # ops.Ops: the backend chosen for the step
    sink: Sink
    make_store: Callable[[int], Store]  # allowance in bytes -> the store for kept tensors
    state: Callable[[], MergeState]  # the new state, once the passes before the output know λ(t)
    names: dict[str, str] = field(default_factory=dict)  # role -> path, for messages
    progress: bool = False
    executor: Any = None  # executors.local.LocalExecutor() when None


@dataclass
class StepResult:
    """What a step produced and what it cost."""

    state: MergeState
    timings: dict[str, float]
    groups: int
    streamed: int
    warnings: list[str]
    details: dict[str, Any]


class Worker:
    """Processes groups of one pass: fetch stored tensors, compute a Batch, keep or write the results.

    One Worker per process: the local executor has one, a cluster executor one per task, built
    from the same readers, writer and store (opened by path in the worker's process).
    """

    def __init__(self, method: Method, sources: dict[str, Any], like: Any, ops: Any, plan: Plan,
                 writer: Writer | None = None, store: Store | None = None) -> None:
        self.method, self.sources, self.like, self.ops, self.plan = method, sources, like, ops, plan
        self.writer, self.store = writer, store
        self.device: torch.device = ops.device
        self._pinned: dict[int, torch.Tensor] = {}
        self._events: dict[int, Any] = {}

    # -- reading ------------------------------------------------------------------------------
    def fetch(self, reads: tuple[str, ...], group: Group, slot: int = 0) -> dict[str, list[torch.Tensor]]:
        """The stored tensors of ``group`` for each role in ``reads`` (CPU; pinned staging on CUDA)."""
        pad = 64 * (len(reads) * len(group.keys) + 1)  # each view starts 64-byte aligned
        staging = self._staging(slot, group.input_bytes + pad) if self.device.type == "cuda" else None
        off = 0
        out: dict[str, list[torch.Tensor]] = {}
        for role in reads:
            if role == "kept":
                out[role] = [self.store.get(k, rows=group.rows) for k in group.keys]  # type: ignore[union-attr]
                continue
            src = self.sources[role]
            lst = []
            for k in group.keys:
                buf = None
                if staging is not None:
                    nbytes = _nbytes(src.info(k), group.rows)
                    buf = staging[off:off + nbytes]
                    off += -(-nbytes // 64) * 64  # keep every view aligned for any dtype
                lst.append(src.read(k, out=buf, rows=group.rows))
            out[role] = lst
        return out

    def _staging(self, slot: int, nbytes: int) -> torch.Tensor:
        """A reusable pinned buffer per prefetch slot (grown when a group needs more); waits until
        the device has finished copying out of it."""
        ev = self._events.pop(slot, None)
        if ev is not None:
            ev.synchronize()
        buf = self._pinned.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._pinned[slot] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf

    def to_device(self, p: Pass, data: dict[str, list[torch.Tensor]], slot: int = 0) -> dict[str, list[torch.Tensor]]:
        """Stored tensors on the compute device (asynchronous copies out of the pinned slot on CUDA)."""
        if self.device.type == "cpu" or p.copy is not None:
            return data
        moved = {r: [t.to(self.device, non_blocking=True) for t in ts] for r, ts in data.items()}
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._events[slot] = ev
        return moved

    # -- computing ----------------------------------------------------------------------------
    def process(self, p: Pass, group: Group, data: dict[str, list[torch.Tensor]], sums: Sums,
                scan: ScanSums | None) -> None:
        """Run pass ``p`` on one group; keep or write its results."""
        if p.copy is not None:  # the stored bytes, unchanged (θ(1) = θ1)
            for k, t in zip(group.keys, data[p.copy]):
                self._write(k, t, group.rows)
            return
        dtypes = tuple(self.like.info(k).dtype for k in group.keys)
        batch = Batch(group.kind, group.keys, data, dtypes, self.ops, scan=scan, rows=group.rows)
        if scan is not None:
            batch.deltas()  # the engine's scan: every first pass measures the task vectors
        outs = p.run(batch, sums) if p.run is not None else None
        del batch
        if outs is None:
            return
        if p.keep:
            for k, t in zip(group.keys, outs):
                self.store.put(k, t, rows=group.rows)  # type: ignore[union-attr]
        if p.output:
            on_device = getattr(self.writer, "device", None) == self.device  # an in-memory merge keeps them there
            for k, t in zip(group.keys, list(outs) if on_device else self._to_host(list(outs))):
                self._write(k, t, group.rows)

    def streamed(self, p: Pass, s: Streamed, sums: Sums, scan: ScanSums | None) -> None:
        """Run pass ``p``'s streamed handler on one matrix too large to hold whole."""
        src = _Blocks(self, s, scan)
        p.streamed(src, sums)  # type: ignore[misc]

    def _to_host(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return outs
        nbytes = sum(t.numel() * t.element_size() for t in outs)
        buf = self._pinned.get(-1)
        if buf is None or buf.numel() < nbytes:
            buf = self._pinned[-1] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        host, off = [], 0
        for t in outs:
            n = t.numel() * t.element_size()
            h = buf[off:off + n].view(t.dtype).view(t.shape)
            h.copy_(t, non_blocking=True)
            host.append(h)
            off += n
        torch.cuda.current_stream(self.device).synchronize()  # one wait per group
        return host

    def _write(self, key: str, t: torch.Tensor, rows: tuple[int, int] | None) -> None:
        self.writer.write(key, t.contiguous(), rows=rows)  # type: ignore[union-attr]
        _faults.point("engine.write")

    def copy_carried(self, keys: list[str], chunk_bytes: int) -> None:
        """Write the carried (non-floating) tensors from the like-checkpoint, in row blocks."""
        for k in keys:
            info = self.like.info(k)
            for rows in _row_chunks(info.shape, info.nbytes, chunk_bytes):
                self._write(k, self.like.read(k, rows=rows), rows)


def _nbytes(info: Any, rows: tuple[int, int] | None) -> int:
    if rows is None:
        return info.nbytes
    return info.nbytes // max(info.shape[0], 1) * (rows[1] - rows[0])


def _row_chunks(shape: tuple[int, ...], nbytes: int, chunk: int) -> list[tuple[int, int] | None]:
    if not shape or nbytes <= chunk or shape[0] <= 1:
        return [None]
    per = max(1, chunk // max(nbytes // shape[0], 1))
    return [(r, min(shape[0], r + per)) for r in range(0, shape[0], per)]


class _Blocks(BlockSource):
    """The BlockSource of one streamed matrix, over the worker's readers and store."""

    def __init__(self, worker: Worker, s: Streamed, scan: ScanSums | None) -> None:
        m, n = s.shape
        self.key, self.shape, self.ops = s.key, s.shape, worker.ops
        self.tall = m >= n
        self.block = max(s.block, 1)
        self.nblocks = math.ceil(max(m, n) / self.block)
        self._w, self._scan, self._scanned = worker, scan, set()

    def _range(self, i: int) -> tuple[int, int]:
        long = max(self.shape)
        return i * self.block, min(long, (i + 1) * self.block)

    def _read(self, role: str, i: int) -> torch.Tensor:
        src, r = self._w.sources[role], self._range(i)
        t = src.read(self.key, rows=r) if self.tall else src.read_columns(self.key, *r).mT
        return t.to(self._w.device)

    def deltas(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, m, nw = (self._read(role, i) for role in ("base", "merged", "new"))
        M, T, ss_m, ss_t = self.ops.deltas(b, m, nw)
        if self._scan is not None and i not in self._scanned:  # count each block once
            self._scanned.add(i)
            self._scan.tau_sq = self._scan.tau_sq + ss_t
            self._scan.m_sq = self._scan.m_sq + ss_m
        return M, T

    def keep(self, i: int, x: torch.Tensor) -> None:
        r = self._range(i)
        if self.tall:
            self._w.store.put(self.key, x, rows=r)  # type: ignore[union-attr]
        else:
            self._w.store.put(self.key, x.mT, cols=r)  # type: ignore[union-attr]


class PassRunner:
    """What an executor needs to run one pass: the worker, the pass, the roles to read, the scan."""

    def __init__(self, job: StepJob, worker: Worker, p: Pass, reads: tuple[str, ...], scan: bool) -> None:
        self.job, self.worker, self.p, self.reads = job, worker, p, reads
        self.scan = scan

    def units(self) -> list[Group | Streamed]:
        """The pass's units in order: groups, with a streamed matrix once in place of its row blocks."""
        streamed = self.job.plan.streamed if self.p.streamed is not None else {}
        out: list[Group | Streamed] = []
        done: set[str] = set()
        for g in self.job.plan.groups:
            k = g.keys[0]
            if g.rows is not None and k in streamed:
                if k not in done:
                    done.add(k)
                    out.append(streamed[k])
                continue
            out.append(g)
        return out


def run_step(job: StepJob) -> StepResult:
    """Run the method's passes; returns the new state and measurements (the caller commits the output)."""
    from .executors.local import LocalExecutor

    method, info = job.method, job.info
    executor = job.executor or LocalExecutor()
    passes = method.passes()
    carried = job.classification.keys_of(Kind.CARRIED)
    timings: dict[str, float] = {}
    # An executor whose workers are other processes (Ray) needs the kept tensors wholly in a file they share.
    shared = getattr(executor, "needs_shared_files", False)
    why = method.one_process()
    if shared and why:
        raise ConfigError(f"this executor runs the merge in several processes, but {why}; use --executor local.")
    allowance = 0 if shared else max(0, job.plan.budget - job.plan.peak)
    store = job.make_store(allowance) if any(p.keep for p in passes) else None
    worker = Worker(method, job.sources, job.like, job.ops, job.plan, store=store)
    state: MergeState | None = None
    total_start = time.perf_counter()
    with tune_malloc():
        try:
            for i, p in enumerate(passes):
                t_pass = time.perf_counter()
                reads = _reads(p, i == 0, job.sources)
                if p.output:
                    state = job.state()
                    worker.writer = job.sink.open(state)
                    worker.copy_carried(carried, max(job.plan.budget // 4, 1 << 20))
                runner = PassRunner(job, worker, p, reads, scan=i == 0)
                bar = _bar(job.progress, sum(_bytes(u) for u in runner.units()), f"step {info.step} {method.name}:{p.name}")
                sums, scan = executor.run_pass(runner, bar.update)
                bar.close()
                for k, v in sums.timings.items():
                    timings[k] = timings.get(k, 0.0) + v
                if scan is not None:
                    _finish_scan(scan, job)
                if p.reduce is not None:
                    p.reduce(sums)
                timings[f"pass:{p.name}"] = time.perf_counter() - t_pass
                _faults.point(f"engine.end_pass.{p.name}")
        finally:
            if store is not None:
                store.close()
    timings["total"] = time.perf_counter() - total_start
    assert state is not None, "a method's passes must include one output pass"
    details = {k: v for k, v in method.details().items() if _jsonable(v)}
    return StepResult(state=state, timings=timings, groups=len(job.plan.groups), streamed=len(job.plan.streamed), warnings=list(info.warnings),
                      details=details)


def _reads(p: Pass, first: bool, sources: dict[str, Any]) -> tuple[str, ...]:
    """The roles a pass reads; the first pass also reads base, new and merged (the engine's scan)."""
    roles = [p.copy] if p.copy else list(p.reads)
    if first:
        roles += [r for r in ("base", "merged", "new") if r in sources and r not in roles]
    return tuple(dict.fromkeys(roles))


def _finish_scan(scan: ScanSums, job: StepJob) -> None:
    """‖τt‖ and ‖θ(t−1) − θ0‖ for the state, or the first non-finite input named."""
    tau_sq, m_sq = float(scan.tau_sq), float(scan.m_sq)
    if not (math.isfinite(tau_sq) and math.isfinite(m_sq)):
        _raise_non_finite(job)
    job.info.tau_norm = math.sqrt(tau_sq)
    job.info.m_norm = math.sqrt(m_sq)


def _raise_non_finite(job: StepJob) -> None:
    """Find the tensor behind a non-finite sum (only on this error path: one more read)."""
    floating = [k for k, kind in job.classification.kinds.items() if kind is not Kind.CARRIED]
    for role in ("base", "merged", "new"):
        if role in job.sources:
            err = non_finite_error(job.sources[role], floating, role, job.names.get(role, role))
            if err is not None:
                raise err
    raise NonFiniteError(  # the inputs are finite but a difference overflowed float32
        "a task vector overflows float32 (an input holds values near ±3.4e38); nothing was written."
    )


def non_finite_error(src: Any, keys: list[str], role: str, where: str) -> NonFiniteError | None:
    """The error naming the first of ``keys`` in ``src`` that holds NaN or Inf, or None (reads in 64 MiB blocks)."""
    for k in keys:
        info = src.info(k)
        if not info.dtype.is_floating_point:
            continue
        for rows in _row_chunks(info.shape, info.nbytes, 64 << 20):
            if not bool(torch.isfinite(src.read(k, rows=rows)).all()):
                return NonFiniteError(
                    f"tensor {k} in the {role} checkpoint {where} holds NaN or Inf; "
                    "nothing was written. Re-export or re-download that checkpoint."
                )
    return None


def _bytes(u: Group | Streamed) -> int:
    return u.input_bytes if isinstance(u, Group) else 0


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or (
        isinstance(v, (tuple, list)) and all(isinstance(x, (int, float, str, bool)) for x in v)
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)
