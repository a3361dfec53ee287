"""The protocol every merge method implements; the engine does everything else.

A method is a list of :class:`Pass` es over the tensors of a step. Each pass carries its own
handler (``run``), the type of the partial sums it accumulates (``sums``) and the function that
turns the summed partials into the method's typed per-step state (``reduce``). The engine reads
the tensors, computes what every method needs once (the task vectors of the first pass, their
norms, the finiteness check), moves data to the compute device, runs the handlers, keeps or
writes what they return, and adds up the partial sums — locally or on a cluster: a handler only
sees one :class:`Batch` and its own :class:`Sums`, so it runs unchanged wherever the engine
puts it.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch

from ..errors import ConfigError
from ..plan import Kind
from ..state import MergeState

__all__ = ["Param", "Choice", "Pass", "Sums", "Batch", "BlockSource", "StepInfo", "Method"]


@dataclass(frozen=True)
class Param:
    """A numeric hyper-parameter: default and open/closed bounds."""

    default: float
    low: float
    high: float
    low_open: bool = True
    high_open: bool = False
    help: str = ""

    def check(self, method: str, name: str, value: Any) -> float:
        """The value as a float, or a ConfigError naming the allowed interval."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{method}: {name} must be a number, got {value!r}")
        v = float(value)
        lo_ok = v > self.low if self.low_open else v >= self.low
        hi_ok = v < self.high if self.high_open else v <= self.high
        if not (math.isfinite(v) and lo_ok and hi_ok):
            lo = "(" if self.low_open else "["
            hi = ")" if self.high_open else "]"
            raise ConfigError(f"{method}: {name} must be in {lo}{self.low:g}, {self.high:g}{hi}, got {value!r}")
        return v


@dataclass(frozen=True)
class Choice:
    """A hyper-parameter that takes one of a few names."""

    default: str
    choices: tuple[str, ...]
    help: str = ""

    def check(self, method: str, name: str, value: Any) -> str:
        """The value, or a ConfigError listing the choices."""
        if value not in self.choices:
            raise ConfigError(f"{method}: {name} must be one of {', '.join(self.choices)}, got {value!r}")
        return str(value)


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


@dataclass
class Sums:
    """Additive partial results of one pass: every tensor field is summed over all batches.

    Subclasses add tensor fields (float64 scalars, int64 histograms) with defaults; the engine
    creates one instance per worker, moves it to the compute device (``to``), lets the handlers
    add into it, and merges the workers' instances (``merge``) before the pass's ``reduce``.
    ``timings`` (seconds per phase) are summed the same way.

    Handlers only add into their sums (``+``, ``+=``, ``add_``) and never change the method's
    state: under the Ray executor each task's additions are replayed in the local order, so the
    float64 reductions (and the output bytes) are the same wherever the groups ran.
    """

    timings: dict[str, float] = field(default_factory=dict)

    def _tensor_fields(self) -> Iterator[str]:
        for f in fields(self):
            if f.name != "timings":
                yield f.name

    def to(self, device: torch.device | str) -> "Sums":
        """Move every tensor field to ``device`` (in place; returns self)."""
        for name in self._tensor_fields():
            setattr(self, name, getattr(self, name).to(device))
        return self

    def merge(self, other: "Sums") -> None:
        """Add ``other``'s fields into this one."""
        for name in self._tensor_fields():
            mine = getattr(self, name)
            setattr(self, name, mine + getattr(other, name).to(mine.device))
        self.add_times(other.timings)

    def add_times(self, seconds: dict[str, float]) -> None:
        """Add seconds per phase into ``timings``."""
        for k, v in seconds.items():
            self.timings[k] = self.timings.get(k, 0.0) + v

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[phase]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_times({phase: time.perf_counter() - t0})


@dataclass
class ScanSums(Sums):
    """What the engine adds up in every step's first pass: ‖τt‖² and ‖θ(t−1) − θ0‖²."""

    tau_sq: torch.Tensor = field(default_factory=_zero)
    m_sq: torch.Tensor = field(default_factory=_zero)


@dataclass
class Batch:
    """One unit of work: whole tensors of one kind, or one row block of one large tensor.

    ``stored`` maps a role ("base", "merged", "new", "kept") to the tensors in ``keys`` order, in
    their stored dtype, on the compute device. ``ops`` is the backend chosen for the step.
    """

    kind: Kind
    keys: tuple[str, ...]
    stored: dict[str, list[torch.Tensor]]
    out_dtypes: tuple[torch.dtype, ...]
    ops: Any
    scan: ScanSums | None = None  # set by the engine in a step's first pass: deltas() adds ‖τ‖², ‖M‖² into it
    rows: tuple[int, int] | None = None  # the row block of a one-tensor group (None: whole tensors)
    deltas_cache: tuple[list[torch.Tensor] | None, list[torch.Tensor]] | None = None

    def __getitem__(self, role: str) -> list[torch.Tensor]:
        return self.stored[role]

    def deltas(self) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
        """fp32 task vectors: M = merged − base (None before the first merge) and T = new − base."""
        if self.deltas_cache is None:
            ms: list[torch.Tensor] = []
            ts: list[torch.Tensor] = []
            merged = self.stored.get("merged")
            for i, (b, nw) in enumerate(zip(self.stored["base"], self.stored["new"])):
                M, T, ss_m, ss_t = self.ops.deltas(b, merged[i] if merged is not None else None, nw)
                if self.scan is not None:
                    self.scan.tau_sq = self.scan.tau_sq + ss_t
                    if ss_m is not None:
                        self.scan.m_sq = self.scan.m_sq + ss_m
                if M is not None:
                    ms.append(M)
                ts.append(T)
            self.deltas_cache = (ms if merged is not None else None, ts)
        return self.deltas_cache


class BlockSource:
    """One projected matrix too large to hold whole, seen as blocks along its long side.

    Blocks are in the *tall* orientation (long side first): row blocks of an m x n matrix with
    m >= n, transposed column blocks of a wide one. ``deltas(i)`` gives block i of M and T (fp32,
    on the compute device); ``keep(i, x)`` stores block i of the pass's result (tall orientation).
    The engine implements it over its readers and stores.
    """

    key: str
    shape: tuple[int, int]
    nblocks: int
    ops: Any

    def deltas(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def keep(self, i: int, x: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


Handler = Callable[[Batch, Any], "Sequence[torch.Tensor] | None"]


@dataclass(frozen=True)
class Pass:
    """One streaming pass over the tensors of a step.

    ``reads``: the roles read for every batch ("base", "merged", "new", and "kept" for what an
    earlier pass kept). ``run(batch, sums)``: the handler; it returns the batch's tensors (in
    ``batch.keys`` order) when the pass ``keep`` s or ``output`` s them, else None. ``streamed``:
    the handler for a projected matrix processed in blocks (only passes that need a whole matrix
    at once, i.e. the SVD, have one; every other pass is element-wise and runs on row blocks
    through ``run``). ``copy``: the pass writes the stored bytes of that role unchanged (no
    compute). ``reduce(sums)`` runs once after all batches, with the summed partials.
    """

    name: str
    reads: tuple[str, ...]
    run: Handler | None = None
    sums: type[Sums] = Sums
    reduce: Callable[[Any], None] | None = None
    output: bool = False
    keep: bool = False
    copy: str | None = None
    streamed: Callable[[BlockSource, Any], None] | None = None


@dataclass
class StepInfo:
    """What a method knows about the step before it runs: t, the previous state, and the first pass's norms."""

    step: int
    prev: MergeState | None
    tau_norm: float = math.nan  # ‖τt‖, set by the engine after the first pass
    m_norm: float = math.nan  # ‖θ(t−1) − θ0‖ (0 at t = 1)
    nonleaf: frozenset[str] = frozenset()  # floating tensors owned directly by a module with children
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every tensor of the checkpoint (set with nonleaf)
    warnings: list[str] = field(default_factory=list)

    @property
    def norms(self) -> list[float]:
        """n1 … nt, the task-vector norms including this step's."""
        return (list(self.prev.norms) if self.prev else []) + [self.tau_norm]


class Method:
    """A continual merge method: typed parameters, a typed per-step state and its passes.

    Subclasses set ``name`` and ``params`` and implement ``passes``; ``begin`` receives the
    step before planning, ``lam`` gives λ(t) for the state (1.0 for methods without a scale).
    """

    name: ClassVar[str]
    params: ClassVar[Mapping[str, Param | Choice]] = {}
    #: θ(1) is the first model itself, byte for byte (the output then mirrors that checkpoint).
    copies_first: ClassVar[bool] = False

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise ConfigError(f"{self.name}: unknown parameter(s) {', '.join(unknown)} (known: {known})")
        self.values: dict[str, Any] = {k: p.check(self.name, k, values.get(k, p.default)) for k, p in self.params.items()}
        self.info = StepInfo(step=0, prev=None)

    def begin(self, info: StepInfo) -> None:
        """Start a step (called before planning: the cost model may depend on t).

        Methods with per-step state set ``self.step_state`` to their own dataclass here.
        """
        self.info = info
        self.step_state: Any = None

    def details(self) -> dict[str, Any]:
        """The per-step state as plain values, for the step report (e.g. TIES's thresholds)."""
        st = self.step_state
        return {} if st is None else {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(st).items()}

    def passes(self) -> list[Pass]:  # pragma: no cover - interface
        """The passes of the current step; the first one must read base and new."""
        raise NotImplementedError

    def lam(self) -> float:
        """λ(t) to record in the state."""
        return 1.0

    @property
    def projects(self) -> bool:
        """Whether a pass of this step needs whole projected matrices (an SVD)."""
        return False

    def cost(self, kind: Kind, shape: tuple[int, ...], itemsize_sum: int) -> int:
        """Working-set bytes of one tensor in one batch: its stored inputs + fp32 temporaries."""
        return math.prod(shape) * (itemsize_sum + 4 * 4)

    def stream_cost(self, shape: tuple[int, int], itemsize_sum: int, rows: int) -> int:
        """Working-set bytes of a projected matrix streamed in blocks of ``rows`` (long side)."""
        raise NotImplementedError(f"{self.name} does not stream projected matrices")

    #: Whether a projected matrix too large to hold whole may be streamed in blocks (else the budget must fit it).
    streams: ClassVar[bool] = True

    def reserved(self) -> tuple[int, str]:
        """Bytes the step holds for its whole duration besides the groups' working sets, and what for."""
        return 0, ""

    def one_process(self) -> str:
        """Why this step cannot run its handlers in other processes ('' when it can)."""
        return ""
