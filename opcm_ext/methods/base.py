"""The protocol every merge method implements; the engine does everything else."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import StepContext
    from ..plan import Group

__all__ = ["Pass", "Method", "Param"]


@dataclass(frozen=True)
class Pass:
    """One streaming pass over the tensor groups.

    ``inputs`` are the roles read for every group ("base", "merged", "new",
    "scratch"); ``output`` marks the pass that writes the merged checkpoint;
    ``on_device`` moves the inputs to the compute device (False for passes that
    only copy stored bytes).
    """

    name: str
    inputs: tuple[str, ...]
    output: bool = False
    on_device: bool = True


@dataclass(frozen=True)
class Param:
    """A validated hyper-parameter: default and open/closed bounds."""

    default: float
    low: float
    high: float
    low_open: bool = True
    high_open: bool = False
    help: str = ""

    def check(self, method: str, name: str, value: Any) -> float:
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


class Method:
    """A continual merge method: a few dozen lines of math per pass.

    Subclasses set ``name`` and ``params`` and implement ``passes``,
    ``process`` and ``end_pass``; ``finish`` returns λ(t) for the state.
    """

    name: ClassVar[str]
    params: ClassVar[Mapping[str, Param]] = {}
    #: Whether the method's step 1 copies the first model byte for byte.
    copies_first: ClassVar[bool] = False

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise ConfigError(f"{self.name}: unknown parameter(s) {', '.join(unknown)} (known: {known})")
        self.values = {k: p.check(self.name, k, values.get(k, p.default)) for k, p in self.params.items()}

    # -- the protocol -----------------------------------------------------
    def passes(self, ctx: "StepContext") -> list[Pass]:
        raise NotImplementedError

    def process(self, p: Pass, group: "Group", tensors: dict[str, list[torch.Tensor]], ctx: "StepContext"):
        """Handle one group in pass ``p``; in the output pass return the output tensors in ``group.keys`` order."""
        raise NotImplementedError

    def end_pass(self, p: Pass, ctx: "StepContext") -> None:
        """Reduce the scalars of pass ``p`` (one device sync per pass)."""

    def finish(self, ctx: "StepContext") -> float:
        """λ(t) to record in the state (1.0 for methods without a scale)."""
        return 1.0

    # -- helpers ----------------------------------------------------------
    def cost(self, kind, shape: tuple[int, ...], itemsize_sum: int) -> int:
        """Working-set bytes of one tensor while computed: stored inputs + fp32 temporaries."""
        n = math.prod(shape)
        return n * (itemsize_sum + 4 * 4)
