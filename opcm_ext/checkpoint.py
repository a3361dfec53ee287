"""Compatibility alias: the checkpoint I/O now lives in ``opcm_ext.io`` (this module goes once every caller imports that)."""

from .io import *  # noqa: F401,F403
from .io import __all__ as _io_all
from .io._fs import fsync_path as _fsync_path  # noqa: F401  (the old private name)

__all__ = list(_io_all)
