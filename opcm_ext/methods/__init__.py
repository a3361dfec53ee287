"""Merge methods: one module per method, all driven by the one streaming engine."""

from __future__ import annotations

from ..errors import ConfigError
from .average import Average
from .base import Batch, BlockSource, Choice, Method, Param, Pass, StepInfo, Sums
from .opcm import OPCM
from .task_arithmetic import TaskArithmetic
from .ties import TIES

__all__ = ["Method", "Param", "Choice", "Pass", "Sums", "Batch", "BlockSource", "StepInfo", "METHODS", "get_method"]

#: name -> Method subclass. Adding a method = one module + one line here.
METHODS: dict[str, type[Method]] = {m.name: m for m in (OPCM, TaskArithmetic, TIES, Average)}


def get_method(name: str) -> type[Method]:
    """The Method class registered under ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
