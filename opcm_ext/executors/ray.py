"""Run a pass on a Ray cluster: tasks process consecutive units; the driver plans, reduces and commits.

The driver (the process that called ``merge_stream``) keeps everything that makes a step a step:
the plan, the output transaction, the reduction of the pass's sums and the commit. Each Ray task
rebuilds a :class:`~opcm_ext.engine.Worker` in its own process from a picklable :class:`TaskSpec`
(the readers, which reopen their checkpoints by path; the device and backend; the plan; the method
with its current per-step state; where the output tensors go; the scratch file of kept tensors),
processes a run of consecutive units, writes its output tensors at their fixed offsets with
``io.write_into`` and keeps Σ in the scratch file. Both writes land at fixed places, so a task that
Ray retries after its worker died writes the same bytes again; the driver marks a tensor written
only once a task reports it. The driver copies the carried (integer) tensors itself, as locally.

Byte identity with the local executor: the local executor adds every contribution into one
running sum, in unit order. A task cannot know that running sum, so every floating field of its
sums is a :class:`_Tape` that records the addends in order, and the driver replays the tapes in
unit order (not completion order): the same float64 additions in the same order. Integer fields
(histograms) are summed directly: integer addition does not depend on the order.

Test-only hooks, read by the driver and shipped with each task (so they reach every node):
``OPCM_RAY_FAULT=PASS:UNIT[:FLAG]`` SIGKILLs the worker right after it processed unit UNIT of
pass PASS: every time, or with FLAG (a file path) only while that file exists (the task deletes
it first, so the retry runs through). ``OPCM_RAY_MAX_RETRIES`` (default 3) is how often Ray
reruns a task whose worker died.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from .. import _version
from ..errors import BackendError, CheckpointError, ConfigError, OpcmError
from ..methods.base import Method, ScanSums, Sums
from ..plan import Group, Plan, Streamed

__all__ = ["RayExecutor", "TaskSpec", "TaskResult", "run_task"]

#: Tasks per execution slot (CPU, or GPU with --device cuda): enough to balance uneven units.
TASKS_PER_SLOT = 4
#: Object store of a local instance started by the executor: tasks only exchange small sums.
LOCAL_OBJECT_STORE_BYTES = 256 << 20
DEFAULT_MAX_RETRIES = 3
#: Seconds to wait for a TCP connection to --ray-address before calling it unreachable.
PROBE_TIMEOUT_S = 10.0


class _Tape:
    """A floating field of a task's sums: the addends in order, replayed by the driver in unit order.

    Handlers add into a floating field with ``+``, ``+=`` or ``add_`` (as every method does); any
    other use of the field inside a task is an error.
    """

    __slots__ = ("addends",)

    def __init__(self) -> None:
        self.addends: list[Any] = []

    def __add__(self, x: Any) -> "_Tape":
        self.addends.append(x.detach() if isinstance(x, torch.Tensor) else x)
        return self

    __radd__ = __iadd__ = __add__

    def add_(self, x: Any) -> "_Tape":
        return self + x

    def to(self, *args: Any, **kwargs: Any) -> "_Tape":
        return self

    def host(self) -> "_Tape":
        self.addends = [a.cpu() if isinstance(a, torch.Tensor) else a for a in self.addends]
        return self


def _tensor_fields(s: Sums) -> list[str]:
    return [f.name for f in fields(s) if f.name != "timings"]


def _taped(s: Sums, device: torch.device) -> Sums:
    """``s`` with its floating fields as tapes and the others on ``device``."""
    for name in _tensor_fields(s):
        v = getattr(s, name)
        setattr(s, name, _Tape() if v.is_floating_point() else v.to(device))
    return s


def _host(s: Sums | None) -> Sums | None:
    if s is not None:
        for name in _tensor_fields(s):
            v = getattr(s, name)
            setattr(s, name, v.host() if isinstance(v, _Tape) else v.cpu())
    return s


def _replay(total: Sums, part: Sums) -> None:
    """Add a task's sums into ``total``: tapes addend by addend, the other fields at once."""
    for name in _tensor_fields(total):
        got, acc = getattr(part, name), getattr(total, name)
        if isinstance(got, _Tape):
            for a in got.addends:
                acc = acc + a
        else:
            acc = acc + got
        setattr(total, name, acc)
    for k, v in part.timings.items():
        total.timings[k] = total.timings.get(k, 0.0) + v


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task needs to rebuild the step's worker in another process (picklable)."""

    token: str  # one per pass: workers reopen the checkpoints once per pass
    readers: bytes  # pickled {role ("base", "merged", "new", "like"): reader}; readers reopen by path
    device: str  # "cpu" or "cuda" (the GPU Ray assigned to the task)
    native: bool  # the driver's backend choice, so that every node computes the same bytes
    method: Method  # with its per-step state as of this pass
    plan: Plan
    pass_index: int
    reads: tuple[str, ...]
    scan: bool
    units: tuple[Group | Streamed, ...]
    targets: Any = None  # io.WriteTargets of the output writer (output passes)
    part: Any = None  # io.ScratchPart of the kept tensors (passes that keep or read them)
    versions: tuple[str, str] = ("", "")  # opcm-ext and torch on the driver
    fault: tuple[str, int, str] | None = None  # OPCM_RAY_FAULT, parsed


@dataclass
class TaskResult:
    """What one task sends back: its taped sums, and every tensor block it wrote."""

    first: int
    sums: Sums
    scan: ScanSums | None
    written: list[tuple[str, tuple[int, int] | None, tuple[int, int] | None]] = field(default_factory=list)


class _TaskWriter:
    """The output writer inside a task: ``write_into`` the driver's files, remember what was written."""

    def __init__(self, targets: Any) -> None:
        self.targets = targets
        self.written: list[tuple[str, tuple[int, int] | None, tuple[int, int] | None]] = []
        self._files: set[int] = set()

    def write(self, name: str, tensor: torch.Tensor, *, rows: tuple[int, int] | None = None,
              cols: tuple[int, int] | None = None) -> None:
        from ..io import write_into

        write_into(self.targets, name, tensor, rows=rows, cols=cols)
        self.written.append((name, rows, cols))
        self._files.add(self.targets.tensors[name].file)

    def sync(self) -> None:
        """fsync every file this task wrote into, before it reports (a shared filesystem sees them)."""
        from ..io import fsync_path

        for i in sorted(self._files):
            fsync_path(self.targets.files[i])


# -- the task side: one cached worker per pass and process ---------------------------------------

_cached: dict[str, Any] = {}


def _worker_for(spec: TaskSpec) -> Any:
    """The pass's Worker in this process (checkpoints reopened by path once per pass)."""
    if _cached.get("token") == spec.token:
        return _cached["worker"]
    _drop_cached()
    from .. import ops
    from ..engine import Worker

    if spec.versions != _versions():
        raise ConfigError(
            f"Ray node {socket.gethostname()} runs opcm-ext {_versions()[0]} with torch {_versions()[1]}, the "
            f"driver opcm-ext {spec.versions[0]} with torch {spec.versions[1]}; install the same versions on "
            "every node (the output must not depend on which node computed it)."
        )
    try:
        readers = pickle.loads(spec.readers)  # each reader reopens its files by path (a role and "like" share one)
    except OpcmError as e:
        raise CheckpointError(f"on Ray node {socket.gethostname()}: {e} (--executor ray needs the checkpoints and "
                              "the output folder on a filesystem every node sees at the same path)") from None
    opened = list({id(r): r for r in readers.values()}.values())
    like = readers.pop("like")
    sel = ops.select(spec.device, "native" if spec.native else "torch")
    worker = Worker(spec.method, readers, like, sel, spec.plan)
    _cached.update(token=spec.token, worker=worker, readers=opened, passes=spec.method.passes())
    return worker


def _drop_cached() -> None:
    for r in _cached.get("readers", []):
        r.close()
    _cached.clear()


def _versions() -> tuple[str, str]:
    return _version.__version__, torch.__version__


def run_task(spec: TaskSpec, first: int, last: int) -> TaskResult:
    """Process units [first, last) of the pass in this process; the body of every Ray task."""
    from ..io import ScratchFile

    worker = _worker_for(spec)
    p = _cached["passes"][spec.pass_index]
    sums = _taped(p.sums(), worker.device)
    scan = _taped(ScanSums(), worker.device) if spec.scan else None
    writer = _TaskWriter(spec.targets) if spec.targets is not None else None
    store = ScratchFile(spec.part) if spec.part is not None else None
    worker.writer, worker.store = writer, store
    t = sums.timings
    try:
        for i in range(first, last):
            u = spec.units[i]
            t0 = time.perf_counter()
            if isinstance(u, Streamed):
                worker.streamed(p, u, sums, scan)
            else:
                data = worker.fetch(spec.reads, u)
                t1 = time.perf_counter()
                t["read"] = t.get("read", 0.0) + t1 - t0
                data = worker.to_device(p, data)
                t0 = t1
                worker.process(p, u, data, sums, scan)
                del data
            t["compute"] = t.get("compute", 0.0) + time.perf_counter() - t0
            _maybe_fail(spec, p.name, i)
        if writer is not None:
            writer.sync()
    finally:
        worker.writer = worker.store = None
        if store is not None:
            store.close()  # close-to-open: the next pass's tasks on other nodes see Σ
    return TaskResult(first, _host(sums), _host(scan), writer.written if writer else [])  # type: ignore[arg-type]


def _maybe_fail(spec: TaskSpec, pass_name: str, unit: int) -> None:
    """The test-only OPCM_RAY_FAULT hook: SIGKILL this worker after the chosen unit."""
    if spec.fault is None or spec.fault[:2] != (pass_name, unit):
        return
    flag = spec.fault[2]
    if flag:
        try:
            os.unlink(flag)  # claim the fault: the retried task runs through
        except FileNotFoundError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def _parse_fault(value: str | None) -> tuple[str, int, str] | None:
    if not value:
        return None
    parts = value.split(":", 2)
    try:
        return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else ""
    except (IndexError, ValueError):
        raise ConfigError(f"OPCM_RAY_FAULT must be PASS:UNIT[:FLAG_FILE], got {value!r}") from None


# -- the driver side -------------------------------------------------------------------------------


def _chunks(units: list[Group | Streamed], slots: int) -> list[tuple[int, int]]:
    """Runs of consecutive units of about equal input bytes, ~TASKS_PER_SLOT per slot; a streamed
    matrix (one whole SVD) is a task of its own."""
    target = max(sum(u.input_bytes for u in units if isinstance(u, Group)) / max(1, slots * TASKS_PER_SLOT), 1)
    out: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, u in enumerate(units):
        if isinstance(u, Streamed):
            if start < i:
                out.append((start, i))
            out.append((i, i + 1))
            start, acc = i + 1, 0
            continue
        acc += u.input_bytes
        if acc >= target:
            out.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(units):
        out.append((start, len(units)))
    return out


def init_ray(**options: Any) -> Any:
    """``ray.init(**options)``, started so that Ray's workers import the package this process imported.

    Ray puts the driver's current directory at the front of every worker's ``sys.path``. Run from a
    source checkout while the package is installed elsewhere (``pip install .``), the workers would
    import the checkout's ``opcm_ext`` folder, which has no compiled modules. Ray is therefore
    initialised from the folder that holds the imported package: the workers find the same one.
    """
    ray = _ray()
    here = os.getcwd()
    os.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # above opcm_ext/
    try:
        return ray.init(**options)
    finally:
        os.chdir(here)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'opcm-ext[ray]' (or pip install ray)") from None
    return ray


class RayExecutor:
    """Run the units of every pass as Ray tasks (CPU tasks, or one GPU each on a CUDA step)."""

    #: run_step gives this executor a store of kept tensors that lives wholly in a file.
    needs_shared_files = True

    def __init__(self, address: str | None = None, *, max_retries: int | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        env = os.environ.get("OPCM_RAY_MAX_RETRIES")
        try:
            self.max_retries = int(env) if max_retries is None and env else (
                DEFAULT_MAX_RETRIES if max_retries is None else max_retries)
        except ValueError:
            raise ConfigError(f"OPCM_RAY_MAX_RETRIES must be an integer, got {env!r}") from None
        self._remote: Any = None

    def connect(self) -> Any:
        """The ``ray`` module, connected: the running instance, the cluster at ``address``, or a local one."""
        ray = _ray()
        if not ray.is_initialized():
            opts: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
            try:
                if self.address:
                    _probe(self.address)
                    init_ray(address=self.address, **opts)
                else:
                    init_ray(num_cpus=len(os.sched_getaffinity(0)), object_store_memory=LOCAL_OBJECT_STORE_BYTES, **opts)
            except (OSError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise ConfigError(f"cannot start or join {where}: {e}. Start a cluster with `ray start --head` "
                                  "and pass its address (--ray-address or RAY_ADDRESS).") from None
        if self._remote is None:
            self._remote = ray.remote(run_task)
        return ray

    def run_pass(self, runner: Any, advance: Callable[[int], None]) -> tuple[Sums, ScanSums | None]:
        """Run ``runner.p`` over every unit as Ray tasks; returns the sums replayed in unit order."""
        ray = self.connect()
        p, worker = runner.p, runner.worker
        units = runner.units()
        sums: Sums = p.sums()
        scan = ScanSums() if runner.scan else None
        if not units:
            return sums, scan
        spec = self._spec(runner, units)
        gpu = spec.device == "cuda"
        slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 0))
        if slots < 1:
            raise ConfigError(f"--device {spec.device} with --executor ray needs {'GPUs' if gpu else 'CPUs'} in the "
                              "Ray cluster, and it has none; start the workers with `ray start --num-gpus N`.")
        chunks = _chunks(units, slots)
        task = self._remote.options(num_cpus=1, num_gpus=1 if gpu else 0, memory=_memory(ray, runner.job.plan.peak),
                                    max_retries=self.max_retries, retry_exceptions=False, name=f"opcm:{p.name}")
        ref = ray.put(spec)
        pending = {task.remote(ref, a, b): (a, b) for a, b in chunks}
        results: dict[int, TaskResult] = {}
        nxt, t0 = 0, time.perf_counter()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for r in ready:
                    a, b = pending.pop(r)
                    res = self._result(ray, r, p.name, units[a:b], a)
                    for name, rows, cols in res.written:
                        worker.writer.mark_written(name, rows=rows, cols=cols)
                    results[a] = res
                    advance(sum(u.input_bytes for u in units[a:b] if isinstance(u, Group)))
                while nxt < len(chunks) and chunks[nxt][0] in results:  # unit order, not completion order
                    res = results.pop(chunks[nxt][0])
                    _replay(sums, res.sums)
                    if scan is not None:
                        _replay(scan, res.scan)  # type: ignore[arg-type]
                    nxt += 1
        except BaseException:
            _cancel(ray, list(pending))
            raise
        sums.timings["ray_tasks"] = sums.timings.get("ray_tasks", 0.0) + time.perf_counter() - t0  # the pass's wall time
        return sums, scan

    def _spec(self, runner: Any, units: list[Group | Streamed]) -> TaskSpec:
        job, worker, p = runner.job, runner.worker, runner.p
        part = None
        if p.keep or "kept" in runner.reads:
            file_part = getattr(worker.store, "file_part", None)
            if file_part is None or any(worker.store.in_memory(k) for k in worker.store.shapes):
                raise ConfigError(
                    "--executor ray keeps the tensors between passes in a scratch file its workers share, but this "
                    "step holds them in memory; run it with --executor local, or on the CPU."
                )
            part = file_part()
        index = job.method.passes().index(p)  # the task rebuilds the pass from its copy of the method
        readers = pickle.dumps({**job.sources, "like": job.like})  # unpickled once per pass in each worker
        return TaskSpec(
            token=uuid.uuid4().hex, readers=readers, device=worker.device.type, native=bool(job.ops.native),
            method=job.method, plan=job.plan, pass_index=index, reads=runner.reads, scan=runner.scan,
            units=tuple(units), targets=worker.writer.targets() if p.output else None, part=part,
            versions=_versions(), fault=_parse_fault(os.environ.get("OPCM_RAY_FAULT")),
        )

    def _result(self, ray: Any, ref: Any, pass_name: str, units: list[Group | Streamed], first: int) -> TaskResult:
        """The task's result, or the typed error that ends the step (the transaction then aborts)."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, OpcmError):
                raise cause from None
            raise
        except ray.exceptions.RayError as e:
            keys = [u.key if isinstance(u, Streamed) else ", ".join(u.keys) for u in units]
            shown = "; ".join(keys)[:200]
            tries = f"after {self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}" if self.max_retries else \
                "(retries are off)"
            reason = (str(e).strip().splitlines() or [""])[0].rstrip(". ") or "no details"
            raise BackendError(
                f"a Ray task of pass {pass_name!r} (units {first}-{first + len(units) - 1}: {shown}) failed {tries}: "
                f"{type(e).__name__}: {reason}. The step was abandoned before its commit: the previous checkpoint is "
                "intact. Rerun the command; if workers keep dying, check the workers' memory (a smaller "
                "--memory-budget shrinks each task's working set) or raise OPCM_RAY_MAX_RETRIES."
            ) from e


def _memory(ray: Any, peak: int) -> int:
    """Memory a task reserves: the plan's working set (so a node runs no more tasks at once than its memory
    holds), at most the largest node's memory (a larger request could never be scheduled)."""
    nodes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    return int(min(peak, max(nodes, default=0)))


def _probe(address: str) -> None:
    """Fail fast on a HOST:PORT where nothing listens (Ray itself would retry for minutes)."""
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", address)
    if m is not None:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=PROBE_TIMEOUT_S).close()


def _cancel(ray: Any, refs: list[Any]) -> None:
    """Stop every task still queued or running (force: kill its worker), and wait until they have stopped,
    so that none writes into the transaction's files after the step gave up."""
    for r in refs:
        try:
            ray.cancel(r, force=True)
        except Exception:  # pragma: no cover - already finished or lost
            pass
    if refs:
        try:
            ray.wait(refs, num_returns=len(refs), timeout=60)
        except Exception:  # pragma: no cover
            pass
