"""MergeState: everything needed to continue a merge, stored in safetensors metadata."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from ._version import __version__
from .errors import MergeStateError

__all__ = ["MergeState", "STATE_KEY", "FORMAT_VERSION"]

#: The metadata key under which every output shard stores the state (JSON).
STATE_KEY = "opcm_ext.state"
#: Bumped when the stored layout changes incompatibly.
FORMAT_VERSION = 1


@dataclass
class MergeState:
    """The state of a continual merge after ``step`` models.

    ``lam`` is OPCM's λ(t) (1.0 for methods without a scale); ``norms`` are the
    task-vector norms ‖τ1‖ … ‖τt‖; ``base`` and ``models`` identify the inputs
    by name and content hash.
    """

    method: str
    params: dict[str, Any]
    step: int
    lam: float
    norms: list[float]
    base: dict[str, str]
    models: list[dict[str, str]] = field(default_factory=list)
    version: str = __version__
    format: int = FORMAT_VERSION

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata entries (str -> str) that carry this state."""
        return {STATE_KEY: json.dumps(asdict(self), sort_keys=True, allow_nan=False)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], where: str = "checkpoint") -> "MergeState | None":
        """Parse the state from metadata; None if the checkpoint carries none."""
        raw = metadata.get(STATE_KEY)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise MergeStateError(f"{where}: the merge state in its metadata is not valid JSON ({exc}).") from exc
        if not isinstance(data, dict):
            raise MergeStateError(f"{where}: the merge state in its metadata is not a JSON object.")
        expected = {"method", "params", "step", "lam", "norms", "base", "models", "version", "format"}
        missing = expected - data.keys()
        unknown = data.keys() - expected
        if missing or unknown:
            raise MergeStateError(
                f"{where}: malformed merge state (missing {sorted(missing)}, unknown {sorted(unknown)})."
            )
        if data["format"] != FORMAT_VERSION:
            raise MergeStateError(
                f"{where}: merge state format {data['format']} is not supported by opcm-ext "
                f"{__version__} (expects {FORMAT_VERSION}); upgrade opcm-ext."
            )
        state = cls(**data)
        state._check(where)
        return state

    def _check(self, where: str) -> None:
        ok = (
            isinstance(self.method, str)
            and isinstance(self.params, dict)
            and isinstance(self.step, int)
            and self.step >= 1
            and isinstance(self.lam, (int, float))
            and math.isfinite(self.lam)
            and self.lam > 0
            and isinstance(self.norms, list)
            and len(self.norms) == self.step
            and all(isinstance(n, (int, float)) and math.isfinite(n) and n >= 0 for n in self.norms)
            and isinstance(self.base, dict)
            and isinstance(self.base.get("hash"), str)
            and isinstance(self.models, list)
            and len(self.models) == self.step
            and all(isinstance(m, dict) and isinstance(m.get("hash"), str) for m in self.models)
        )
        if not ok:
            raise MergeStateError(f"{where}: the merge state is inconsistent: {self.summary()}")

    @property
    def mean_norm(self) -> float:
        """n̄t, the mean task-vector norm."""
        return sum(self.norms) / len(self.norms)

    def summary(self) -> str:
        """One line for humans."""
        return (
            f"method={self.method} params={json.dumps(self.params, sort_keys=True)} step={self.step} "
            f"lambda={self.lam:.6g} mean_norm={(self.mean_norm if self.norms else float('nan')):.6g}"
        )
