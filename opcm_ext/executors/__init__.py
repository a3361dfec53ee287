"""Where the groups of a pass run: ``local`` (this process, one device) or ``ray`` (tasks on a cluster)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

__all__ = ["make_executor", "EXECUTORS"]

EXECUTORS = ("local", "ray")


def make_executor(name: str = "local", **options: Any) -> Any:
    """The executor called ``name`` (``ray`` takes ``address=``)."""
    if name == "local":
        from .local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from .ray import RayExecutor

        return RayExecutor(**options)
    raise ConfigError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")
