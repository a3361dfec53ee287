"""The streaming engine: passes over tensor groups, prefetch, devices, scratch, output.

One step = the method's passes. Each pass walks the groups of the plan; a
background thread reads the next group from disk while the current one
computes (only when both fit the memory budget together). The first pass also
hashes the base and the new model (their identities in the merge state) and
checks every input value is finite. The output pass writes into an
``OutputTransaction`` that only replaces the target after everything is on
disk. Nothing is written into the user's directory before the output pass,
so every validation that needs a full pass (finiteness, base identity,
duplicate model, ‖Σ‖ = 0) fails with the previous checkpoint untouched.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import _faults
from .checkpoint import CheckpointReader, OutputTransaction
from .errors import (
    IncompatibleCheckpointError,
    MergeStateError,
    NonFiniteError,
    OpcmError,
)
from .methods.base import Method
from .plan import Classification, Group, Kind
from .state import MergeState

__all__ = ["StepContext", "StepResult", "run_step", "ScratchStore", "RssSampler"]

log = logging.getLogger(__name__)


class ScratchStore:
    """fp32 tensors kept between passes in one flat file inside the output's temporary folder.

    Living on disk (and in the page cache) rather than in RAM keeps the process
    memory within the budget whatever the model size.
    """

    def __init__(self, directory: Path, shapes: dict[str, tuple[int, ...]]) -> None:
        self.path = Path(directory) / "sigma.f32"
        self._offsets: dict[str, tuple[int, tuple[int, ...]]] = {}
        off = 0
        for k in sorted(shapes):
            self._offsets[k] = (off, tuple(shapes[k]))
            off += 4 * math.prod(shapes[k])
        self.nbytes = off
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def put(self, key: str, t: torch.Tensor) -> None:
        off, shape = self._offsets[key]
        data = t.detach().to("cpu", torch.float32).contiguous()
        if tuple(data.shape) != shape:
            raise ValueError(f"scratch {key}: shape {tuple(data.shape)} != {shape}")
        mv = memoryview(data.numpy()).cast("B")
        done = 0
        while done < len(mv):
            done += os.pwrite(self._fd, mv[done:], off + done)

    def get(self, key: str, pin: bool = False) -> torch.Tensor:
        off, shape = self._offsets[key]
        out = torch.empty(shape, dtype=torch.float32, pin_memory=pin)
        mv = memoryview(out.numpy()).cast("B")
        done = 0
        while done < len(mv):
            n = os.preadv(self._fd, [mv[done:]], off + done)
            if n == 0:
                raise OpcmError(f"scratch file {self.path} ended early at {key}")
            done += n
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _mallopt_mmap_threshold(nbytes: int) -> bool:
    if os.environ.get("OPCM_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        return mallopt is not None and bool(mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except OSError:  # pragma: no cover - no libc to talk to
        return False


class tune_malloc:
    """During a step, make glibc return freed large blocks to the system at once.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
    which tensors of a few MiB come from the heap and their freed pages stay resident: a
    ViT-B/32 step then held ~250 MiB more than its live tensors. A fixed 1 MiB threshold
    (mallopt M_MMAP_THRESHOLD) keeps every tensor-sized block in its own mapping, so the
    resident set follows what is alive and the memory budget holds. On exit the threshold
    goes to 32 MiB (glibc's own ceiling), so the caller's later work (e.g. evaluation, many
    mid-size activations) does not pay a page fault per allocation. glibc only;
    OPCM_MALLOC_TUNE=0 leaves malloc alone.
    """

    def __enter__(self) -> "tune_malloc":
        self.active = _mallopt_mmap_threshold(1 << 20)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            _mallopt_mmap_threshold(32 << 20)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the kernel's peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssSampler:
    """The peak resident set size of a step: the kernel's VmHWM, reset when the step starts
    (Linux), and samples every few milliseconds where that is not available."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self._hwm = _reset_peak_rss()
        self.baseline = _rss()
        self.peak = self.baseline
        self._stop = threading.Event()
        # Polling is only the fallback: with VmHWM the kernel tracks the peak exactly, for free.
        self._thread = None if self._hwm else threading.Thread(target=self._run, name="opcm-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> "RssSampler":
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss())
        hwm = _peak_rss() if self._hwm else None
        if hwm is not None:
            self.peak = max(self.peak, hwm)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_digest(name: str, t: torch.Tensor) -> bytes:
    """blake2b of one tensor's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(name.encode())
    h.update(str(t.dtype).encode())
    h.update(repr(tuple(t.shape)).encode())
    if t.numel():
        h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.digest()


def combine_digests(digests: dict[str, bytes]) -> str:
    """A model's content identity: independent of sharding and of the order tensors were read."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(digests):
        h.update(k.encode())
        h.update(digests[k])
    return h.hexdigest()


@dataclass
class StepContext:
    """What a method sees: the step, the previous state, devices, scalars, scratch."""

    step: int
    prev: MergeState | None
    device: torch.device
    readers: dict[str, CheckpointReader]
    paths: dict[str, str]
    like: CheckpointReader
    classification: Classification
    scratch: ScratchStore | None = None
    scalars: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    warnings: list[str] = field(default_factory=list)
    _acc: dict[str, torch.Tensor] = field(default_factory=dict)

    def accumulate(self, name: str, value: torch.Tensor) -> None:
        """Add a 0-d float64 device tensor into a named accumulator (no host sync)."""
        if name in self._acc:
            self._acc[name] += value
        else:
            self._acc[name] = value.to(torch.float64).clone()

    def value(self, name: str) -> float:
        """The accumulated value (one sync); 0.0 if nothing was added."""
        t = self._acc.get(name)
        return 0.0 if t is None else float(t.item())

    def out_dtype(self, key: str) -> torch.dtype:
        return self.like.info(key).dtype

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] += seconds

    def check_merged_norm(self, m_norm: float) -> None:
        """P2 says ‖θ(t−1) − θ0‖ = n̄(t−1): a large gap means the merged checkpoint was edited or mixed up."""
        if self.prev is None or not self.prev.norms:
            return
        expect = self.prev.mean_norm
        if expect > 0 and abs(m_norm - expect) > 1e-2 * expect:
            msg = (
                f"the merged checkpoint's distance from the base is {m_norm:.6g}, but its state records "
                f"{expect:.6g}: it was modified after merging, or belongs to another base"
            )
            self.warnings.append(msg)
            log.warning(msg)


@dataclass
class StepResult:
    state: MergeState
    timings: dict[str, float]
    peak_rss_bytes: int
    baseline_rss_bytes: int
    groups: int
    warnings: list[str]
    scalars: dict[str, Any]


class _Prefetcher:
    """Reads group i+1 on a thread while group i computes, within the memory budget."""

    def __init__(self, groups: list[Group], fetch, budget: int, timings) -> None:
        self.groups = groups
        self.fetch = fetch
        self.budget = budget
        self.timings = timings
        self._permits = [threading.Event() for _ in groups]
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opcm-prefetch", daemon=True)

    def _run(self) -> None:
        for i, g in enumerate(self.groups):
            while not self._permits[i].wait(0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            try:
                t0 = time.perf_counter()
                item = (g, self.fetch(g), None)
                self.timings["read"] += time.perf_counter() - t0
            except BaseException as exc:  # handed to the main thread
                item = (g, None, exc)
            while True:
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    if self._stop.is_set():
                        return
            if item[2] is not None:
                return

    def __iter__(self) -> Iterator[tuple[Group, dict]]:
        if not self.groups:
            return
        self._permits[0].set()
        self._thread.start()
        try:
            for i in range(len(self.groups)):
                t0 = time.perf_counter()
                g, data, exc = self._q.get()
                self.timings["read_wait"] += time.perf_counter() - t0
                if exc is not None:
                    raise exc
                nxt = i + 1
                early = nxt < len(self.groups) and g.cost + self.groups[nxt].input_bytes <= self.budget
                if early:
                    self._permits[nxt].set()
                yield g, data
                del data
                if nxt < len(self.groups) and not early:
                    self._permits[nxt].set()
        finally:
            self._stop.set()
            for p in self._permits:
                p.set()
            self._thread.join()


def run_step(
    method: Method,
    *,
    step: int,
    prev: MergeState | None,
    readers: dict[str, CheckpointReader],
    paths: dict[str, str],
    names: dict[str, str],
    classification: Classification,
    groups: list[Group],
    tx: OutputTransaction,
    device: torch.device,
    budget: int,
    allow_duplicate: bool,
    progress: bool,
) -> StepResult:
    """Run one merge step through ``tx``; returns the new state and measurements (tx is committed by the caller)."""
    like = like_reader(method, readers)
    ctx = StepContext(step=step, prev=prev, device=device, readers=readers, paths=paths, like=like,
                      classification=classification)
    carried = classification.keys_of(Kind.CARRIED)
    passes = method.passes(ctx)
    floating_shapes = {k: like.info(k).shape for k, v in classification.kinds.items() if v is not Kind.CARRIED}
    if any("scratch" in p.inputs for p in passes):
        ctx.scratch = ScratchStore(tx.scratch_dir, floating_shapes)
    digests: dict[str, dict[str, bytes]] = {"base": {}, "new": {}}
    pin = device.type == "cuda"
    total_start = time.perf_counter()

    with tune_malloc(), RssSampler() as rss:
        try:
            for pi, p in enumerate(passes):
                first = pi == 0
                t_pass = time.perf_counter()
                roles = [r for r in p.inputs if r != "scratch"]
                if first:  # hash base and new in full and check every input is finite
                    roles = sorted(set(roles) | {"base", "new"} | ({"merged"} if "merged" in readers else set()))
                pass_groups = list(groups)
                if carried and (first or p.output):
                    pass_groups.append(Group(Kind.CARRIED, carried, None, 0, sum(like.info(k).nbytes for k in carried)))

                def fetch(g: Group, roles=roles, p=p, first=first) -> dict[str, list[torch.Tensor]]:
                    out: dict[str, list[torch.Tensor]] = {}
                    use = roles if g.kind is not Kind.CARRIED else (roles if first else [])
                    for role in use:
                        lst = []
                        for k in g.keys:
                            t = readers[role].read(k)
                            if first:
                                if role in digests:
                                    digests[role][k] = tensor_digest(k, t)
                                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                                    raise NonFiniteError(
                                        f"tensor {k} in the {role} checkpoint {paths[role]} holds NaN or Inf; "
                                        "nothing was written. Re-export or re-download that checkpoint."
                                    )
                            if pin and p.on_device and g.kind is not Kind.CARRIED:
                                t = t.pin_memory()
                            lst.append(t)
                        out[role] = lst
                    if "scratch" in p.inputs and g.kind is not Kind.CARRIED:
                        out["scratch"] = [ctx.scratch.get(k, pin=pin and p.on_device) for k in g.keys]
                    return out

                writer = None
                if p.output:
                    state = _new_state(method, ctx, names, digests, prev)
                    meta = dict(state.to_metadata())
                    meta["format"] = "pt"
                    writer = tx.writer(_layout(like, tx), meta)
                    ctx.scalars["state"] = state
                bar = _bar(progress, sum(g.input_bytes for g in pass_groups), f"step {step} {method.name}:{p.name}")
                for g, data in _Prefetcher(pass_groups, fetch, budget, ctx.timings):
                    if g.kind is Kind.CARRIED:
                        if p.output:
                            for k in g.keys:
                                writer.write(k, like.read(k))
                                _faults.point("engine.write")
                        bar.update(g.input_bytes)
                        continue
                    t0 = time.perf_counter()
                    if p.on_device and device.type != "cpu":
                        data = {r: [t.to(device, non_blocking=True) for t in ts] for r, ts in data.items()}
                    outs = method.process(p, g, data, ctx)
                    ctx.timings["compute"] += time.perf_counter() - t0
                    if p.output:
                        t0 = time.perf_counter()
                        for k, t in zip(g.keys, outs):
                            writer.write(k, t.to("cpu").contiguous())
                            _faults.point("engine.write")
                        ctx.timings["write"] += time.perf_counter() - t0
                    bar.update(g.input_bytes)
                bar.close()
                if first:
                    _check_identity(prev, digests, names, paths, allow_duplicate)
                method.end_pass(p, ctx)
                ctx.timings[f"pass:{p.name}"] = time.perf_counter() - t_pass
                _faults.point(f"engine.end_pass.{p.name}")
        finally:
            if ctx.scratch is not None:
                ctx.scratch.close()
    ctx.timings["total"] = time.perf_counter() - total_start
    return StepResult(
        state=ctx.scalars["state"],
        timings=dict(ctx.timings),
        peak_rss_bytes=rss.peak,
        baseline_rss_bytes=rss.baseline,
        groups=len(groups),
        warnings=ctx.warnings,
        scalars={k: v for k, v in ctx.scalars.items() if k != "state"},
    )


def like_reader(method: Method, readers: dict[str, CheckpointReader]) -> CheckpointReader:
    """The checkpoint the output mirrors (shards, dtypes, carried tensors, aux files): the current merged one.

    Before the first step that is θ0, except for methods whose θ(1) is the first model itself.
    """
    if "merged" in readers:
        return readers["merged"]
    return readers["new"] if method.copies_first else readers["base"]


def _layout(like: CheckpointReader, tx: OutputTransaction):
    """The output mirrors the like-checkpoint's shards (one file when writing a bare .safetensors)."""
    entries = []
    for fname, keys in like.layout:
        entries.append((fname, [(k, like.info(k).dtype, tuple(like.info(k).shape)) for k in keys]))
    if tx.kind == "file":
        merged = [e for _, lst in entries for e in lst]
        return [(tx.out.name, merged)]
    return entries


def _new_state(method: Method, ctx: StepContext, names, digests, prev: MergeState | None) -> MergeState:
    base_hash = combine_digests(digests["base"])
    new_hash = combine_digests(digests["new"])
    norms = (list(prev.norms) if prev else []) + [float(ctx.scalars["norm"])]
    models = (list(prev.models) if prev else []) + [{"name": names["new"], "hash": new_hash}]
    return MergeState(
        method=method.name,
        params=dict(method.values),
        step=ctx.step,
        lam=float(method.finish(ctx)),
        norms=norms,
        base={"name": names["base"], "hash": base_hash},
        models=models,
    )


def _check_identity(prev, digests, names, paths, allow_duplicate: bool) -> None:
    if prev is None:
        return
    base_hash = combine_digests(digests["base"])
    if base_hash != prev.base.get("hash"):
        raise IncompatibleCheckpointError(
            f"the merged checkpoint {paths['merged']} was made from base {prev.base.get('name')!r} "
            f"(hash {prev.base.get('hash')}), but the given base {paths['base']} has hash {base_hash}; "
            "pass the same base model that started this merge."
        )
    new_hash = combine_digests(digests["new"])
    for i, m in enumerate(prev.models, start=1):
        if m.get("hash") == new_hash and not allow_duplicate:
            raise MergeStateError(
                f"{paths['new']} was already merged at step {i} (as {m.get('name')!r}, same content hash); "
                "merging it twice counts it twice. Pass --allow-duplicate (allow_duplicate=True) if you mean it."
            )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)
