"""Fault injection for crash tests: ``point(name)`` is a no-op unless ``OPCM_FAULT_AT`` is set.

``OPCM_FAULT_AT=N`` (a positive integer): SIGKILL this process at the N-th call of
``point()`` (every call counts, whatever its name).
``OPCM_FAULT_AT=list``: append each point's name, one per line, to the file named by
``OPCM_FAULT_LOG``.

The environment is read once, at import; with the variable unset ``point`` is a
function that returns immediately. Tests that fork a child after import call
``_configure()`` in the child instead of setting the environment.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["point"]

_lock = threading.Lock()
_kill_at: int | None = None
_log_path: str | None = None
_count = 0
_active = False


def _configure(at: str | None, log: str | None = None) -> None:
    """Set the fault mode (``None`` switches injection off); resets the call counter."""
    global _kill_at, _log_path, _count, _active
    _kill_at, _log_path, _count, _active = None, None, 0, False
    if at is None or at == "":
        return
    if at == "list":
        if not log:
            raise RuntimeError("OPCM_FAULT_AT=list needs OPCM_FAULT_LOG=<file> to append point names to")
        _log_path = log
    else:
        try:
            n = int(at)
        except ValueError:
            raise RuntimeError(f"OPCM_FAULT_AT must be a positive integer or 'list', got {at!r}") from None
        if n < 1:
            raise RuntimeError(f"OPCM_FAULT_AT must be a positive integer or 'list', got {at!r}")
        _kill_at = n
    _active = True


def point(name: str) -> None:
    """A named place where a crash test may kill the process (no-op unless configured)."""
    if not _active:
        return
    _hit(name)


def _hit(name: str) -> None:
    global _count
    with _lock:
        _count += 1
        if _log_path is not None:
            with open(_log_path, "a", encoding="utf-8") as f:
                f.write(name + "\n")
            return
        if _count == _kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


_configure(os.environ.get("OPCM_FAULT_AT"), os.environ.get("OPCM_FAULT_LOG"))
