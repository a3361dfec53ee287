"""A small on-disk cache (content hashes, classifications) in the user's cache folder.

``$OPCM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/opcm-ext``, else ``~/.cache/opcm-ext``.
Entries are JSON files written atomically; a missing, corrupt or unwritable cache is never an
error (the value is recomputed). ``OPCM_NO_CACHE=1`` turns the cache off.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "load", "store"]


def cache_dir() -> Path | None:
    """The cache folder, or None when caching is off."""
    if os.environ.get("OPCM_NO_CACHE", "") not in ("", "0"):
        return None
    if os.environ.get("OPCM_CACHE_DIR"):
        return Path(os.environ["OPCM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "opcm-ext"


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
