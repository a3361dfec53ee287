"""The user's cache folder (model hashes, classifications): where it is, whether it is on, JSON entries.

``$OPCM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/opcm-ext``, else ``~/.cache/opcm-ext``.
Entries are JSON files written atomically; a missing, corrupt or unwritable cache is never an
error (the value is recomputed). ``OPCM_NO_CACHE=1`` turns every cache off.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["cache_root", "enabled", "cache_dir", "load", "store"]


def enabled() -> bool:
    """False when ``OPCM_NO_CACHE`` is set (to anything but 0)."""
    return os.environ.get("OPCM_NO_CACHE", "") in ("", "0")


def cache_root() -> Path:
    """The cache folder, whether or not caching is on."""
    if os.environ.get("OPCM_CACHE_DIR"):
        return Path(os.environ["OPCM_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(os.path.expanduser("~")) / ".cache"
    return base / "opcm-ext"


def cache_dir() -> Path | None:
    """The cache folder, or None when caching is off."""
    return cache_root() if enabled() else None


def load(name: str) -> Any:
    """The JSON value stored under ``name`` (a relative path), or None."""
    d = cache_dir()
    if d is None:
        return None
    try:
        return json.loads((d / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def store(name: str, value: Any) -> None:
    """Store ``value`` as JSON under ``name`` (best effort: failures are ignored)."""
    d = cache_dir()
    if d is None:
        return
    path = d / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)  # type: ignore[possibly-undefined]
        except (OSError, NameError):
            pass
