"""opcm-ext: continual model merging with OPCM, streaming checkpoints from disk.

The public API is ``merge_stream`` (fold one model into a merged checkpoint),
``merge_sequence`` (merge a list), ``read_state`` (the merge state stored in a
checkpoint), ``Merger`` (the same merge over models held in memory) and the
report and error types.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = [
    "__version__",
    "merge_stream",
    "merge_sequence",
    "read_state",
    "Merger",
    "MergeReport",
    "MergeState",
    "errors",
]

_LAZY = {
    "merge_stream": ("api", "merge_stream"),
    "merge_sequence": ("api", "merge_sequence"),
    "read_state": ("api", "read_state"),
    "Merger": ("merger", "Merger"),
    "MergeReport": ("api", "MergeReport"),
    "MergeState": ("state", "MergeState"),
}


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import opcm_ext` stays cheap (no transformers import).
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name == "errors":
        import importlib

        return importlib.import_module(".errors", __name__)
    raise AttributeError(f"module 'opcm_ext' has no attribute {name!r}")
