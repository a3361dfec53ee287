"""Typed exceptions: every failure a user can cause or fix is an ``InputError``."""

from __future__ import annotations

__all__ = [
    "OpcmError",
    "InputError",
    "ConfigError",
    "CheckpointError",
    "IncompatibleCheckpointError",
    "NonFiniteError",
    "MergeStateError",
    "DuplicateModelError",
    "OutputError",
    "BackendError",
]


class OpcmError(Exception):
    """Base class of every error opcm-ext raises on purpose."""


class InputError(OpcmError):
    """Something the user gave us is wrong; the CLI exits with code 2."""


class ConfigError(InputError, ValueError):
    """An option has a bad value or an unknown name (alpha outside (0, 1], a bad budget, ...)."""


class CheckpointError(InputError):
    """A checkpoint file cannot be read: missing, unsupported format, corrupt or truncated."""


class IncompatibleCheckpointError(InputError):
    """Checkpoints do not fit together: keys, shapes or dtypes differ, or a different base."""


class NonFiniteError(InputError):
    """An input tensor holds NaN or Inf."""


class MergeStateError(InputError):
    """The merge state in a checkpoint is missing, inconsistent, or forbids this step."""


class DuplicateModelError(MergeStateError):
    """The new model is already in the merge (same content hash); merging it twice counts it twice."""

    @classmethod
    def at_step(cls, new: str, step: int, name: object) -> "DuplicateModelError":
        """The refusal of ``new``, recorded at ``step`` as ``name`` (one wording for every check that finds it)."""
        return cls(
            f"{new} was already merged at step {step} (as {name!r}, same content hash); "
            "merging it twice counts it twice. Pass --allow-duplicate (allow_duplicate=True) if you mean it."
        )


class OutputError(InputError):
    """The output cannot be written: not writable, too little disk, locked by another merge."""


class BackendError(OpcmError):
    """A compiled kernel is missing or failed (CUDA error, non-convergence); exit code 1."""
