"""Plan a merge step: classify tensors, validate the inputs, group tensors under the memory budget.

Classification (../shared/SPEC.md, "Tensor classes") comes from module types:
the architecture named in ``config.json`` is built on the ``meta`` device (no
memory), the ``weight`` of every ``torch.nn.Linear`` (and transformers'
GPT-2-style ``Conv1D``, a linear layer stored transposed) is *projected*, every
other floating tensor is *averaged*, and non-floating tensors are *carried*.

Checkpoint keys are matched to the model's parameter names by dotted suffix, so
both naming styles of CLIP checkpoints work (transformers 4 saved
``vision_model.encoder...`` for ``CLIPVisionModel``, transformers 5 saves
``encoder...``).

Without a usable config the fallback rule applies: a 2-D floating tensor whose
name ends in ``.weight`` is projected unless a dotted part of its name contains
``embed`` or ``norm``, or is an ``ln``-style LayerNorm (``ln``, ``ln_1``,
``ln_f``...) or GPT-2's ``wte``/``wpe``. Users override either rule with
regular expressions (``projected=``/``averaged=``, CLI ``--project``/``--average``).
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .errors import ConfigError, IncompatibleCheckpointError

__all__ = [
    "Kind",
    "Classification",
    "Group",
    "classify",
    "fallback_kind",
    "validate_inputs",
    "make_groups",
    "parse_size",
    "FLOAT_DTYPES",
]

log = logging.getLogger(__name__)

#: Floating dtypes the kernels read and write.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Kind(str, enum.Enum):
    PROJECTED = "projected"
    AVERAGED = "averaged"
    CARRIED = "carried"


@dataclass
class Classification:
    """The kind of every tensor and how it was decided."""

    kinds: dict[str, Kind]
    source: str  # "module types (<Class>)" or "fallback name rule"
    notes: list[str] = field(default_factory=list)

    def keys_of(self, kind: Kind) -> list[str]:
        return sorted(k for k, v in self.kinds.items() if v is kind)

    def counts(self) -> dict[str, int]:
        out = {k.value: 0 for k in Kind}
        for v in self.kinds.values():
            out[v.value] += 1
        return out


_FALLBACK_EXCLUDE = re.compile(r"(embed|norm)|^(ln(_\w+|\d+)?|wte|wpe)$", re.IGNORECASE)


def fallback_kind(name: str, dtype: torch.dtype, shape: Sequence[int]) -> Kind:
    """The documented name/shape rule used when no config.json describes the model."""
    if not dtype.is_floating_point:
        return Kind.CARRIED
    if len(shape) == 2 and name.endswith(".weight"):
        parts = name.split(".")[:-1]
        if not any(_FALLBACK_EXCLUDE.search(p) for p in parts):
            return Kind.PROJECTED
    return Kind.AVERAGED


def _linear_param_names(config_dir: Path) -> tuple[set[str], set[str], str]:
    """Build the architecture on the meta device; return (linear weights, all params/buffers, class name)."""
    import transformers

    cfg_path = config_dir / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: cannot read config.json ({exc}).") from exc
    config = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    archs = raw.get("architectures") or []
    cls = None
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls is not None:
            model = cls(config)
        else:
            model = transformers.AutoModel.from_config(config)
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        linear_types = linear_types + (Conv1D,)
    except ImportError:  # pragma: no cover - very old transformers
        pass
    linear: set[str] = set()
    for mname, module in model.named_modules():
        if isinstance(module, linear_types):
            linear.add(f"{mname}.weight" if mname else "weight")
    names = set(model.state_dict().keys())
    names.update(n for n, _ in model.named_parameters(remove_duplicate=False))
    return linear, names, type(model).__name__


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _match_keys(keys: Iterable[str], model_names: set[str]) -> dict[str, str]:
    """Map checkpoint keys to model names by the longest shared dotted suffix that is unique."""
    by_suffix: dict[str, set[str]] = {}
    for n in model_names:
        for s in _suffixes(n):
            by_suffix.setdefault(s, set()).add(n)
    out: dict[str, str] = {}
    for k in keys:
        if k in model_names:
            out[k] = k
            continue
        for s in _suffixes(k):  # longest first
            cands = by_suffix.get(s)
            if cands and len(cands) == 1:
                out[k] = next(iter(cands))
                break
    return out


def classify(
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    config_dir: Path | None,
    *,
    projected: Sequence[str] = (),
    averaged: Sequence[str] = (),
) -> Classification:
    """Classify every tensor as projected, averaged or carried.

    ``tensors`` maps key -> (dtype, shape). ``projected``/``averaged`` are
    regular expressions (``re.search``) that override the decision.
    """
    kinds: dict[str, Kind] = {}
    notes: list[str] = []
    source = "fallback name rule"
    linear: set[str] | None = None
    if config_dir is not None and (config_dir / "config.json").is_file():
        try:
            linear, names, cls_name = _linear_param_names(config_dir)
            source = f"module types ({cls_name})"
        except ConfigError:
            raise
        except Exception as exc:  # unknown architecture, custom code, broken config
            notes.append(f"could not build the architecture from {config_dir / 'config.json'} ({exc}); used the fallback rule")
            linear = None
    if linear is not None:
        mapping = _match_keys(tensors.keys(), names)
        unmatched = sorted(set(tensors) - set(mapping))
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
            notes.append(f"{len(unmatched)} tensor(s) not found in the architecture, classified by the fallback rule: {shown}")
        for k, (dtype, shape) in tensors.items():
            if not dtype.is_floating_point:
                kinds[k] = Kind.CARRIED
            elif k in mapping:
                kinds[k] = Kind.PROJECTED if (mapping[k] in linear and len(shape) == 2) else Kind.AVERAGED
            else:
                kinds[k] = fallback_kind(k, dtype, shape)
    else:
        for k, (dtype, shape) in tensors.items():
            kinds[k] = fallback_kind(k, dtype, shape)

    for pattern_list, kind in ((averaged, Kind.AVERAGED), (projected, Kind.PROJECTED)):
        for pat in pattern_list:
            try:
                rx = re.compile(pat)
            except re.error as exc:
                raise ConfigError(f"bad override pattern {pat!r}: {exc}") from exc
            hits = [k for k in tensors if rx.search(k)]
            if not hits:
                raise ConfigError(f"override pattern {pat!r} matches no tensor; check the tensor names with `opcm info`.")
            for k in hits:
                dtype, shape = tensors[k]
                if not dtype.is_floating_point:
                    raise ConfigError(f"override {pat!r} matches {k}, which is not floating point and is always carried.")
                if kind is Kind.PROJECTED and len(shape) != 2:
                    raise ConfigError(f"override {pat!r} matches {k} of shape {list(shape)}; only 2-D tensors can be projected.")
                kinds[k] = kind
            notes.append(f"override {pat!r} -> {kind.value}: {len(hits)} tensor(s)")
    return Classification(kinds=kinds, source=source, notes=notes)


def validate_inputs(readers: dict, where: dict[str, str]) -> None:
    """Same keys, shapes and compatible dtypes in every input (before any output byte).

    ``readers`` maps a role ("base", "merged", "new") to a CheckpointReader,
    ``where`` the role to the path shown in messages.
    """
    roles = list(readers)
    ref_role = roles[0]
    ref = readers[ref_role]
    ref_keys = set(ref.keys())
    for role in roles[1:]:
        keys = set(readers[role].keys())
        missing = sorted(ref_keys - keys)
        extra = sorted(keys - ref_keys)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s) that {ref_role} has (e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) that {ref_role} lacks (e.g. {', '.join(extra[:3])})")
            raise IncompatibleCheckpointError(
                f"{role} checkpoint {where[role]} " + " and ".join(parts)
                + f"; all checkpoints must share one architecture with {ref_role} ({where[ref_role]})."
            )
    for k in sorted(ref_keys):
        infos = {role: readers[role].info(k) for role in roles}
        shapes = {role: tuple(i.shape) for role, i in infos.items()}
        if len(set(shapes.values())) != 1:
            desc = ", ".join(f"{r}={list(s)}" for r, s in shapes.items())
            raise IncompatibleCheckpointError(f"tensor {k}: shapes differ ({desc}); the checkpoints are different architectures.")
        dtypes = {role: i.dtype for role, i in infos.items()}
        floating = [d.is_floating_point for d in dtypes.values()]
        if any(floating) and not all(floating):
            desc = ", ".join(f"{r}={str(d).replace('torch.', '')}" for r, d in dtypes.items())
            raise IncompatibleCheckpointError(f"tensor {k}: dtypes are incompatible ({desc}).")
        if all(floating):
            for role, d in dtypes.items():
                if d not in FLOAT_DTYPES:
                    raise IncompatibleCheckpointError(
                        f"tensor {k} in {role} ({where[role]}) is {str(d).replace('torch.', '')}; opcm-ext merges "
                        "float32, float16 and bfloat16 tensors. Convert the checkpoint, e.g. "
                        "`model.to(torch.float32).save_pretrained(dir)`."
                    )
        elif len(set(dtypes.values())) != 1:
            desc = ", ".join(f"{r}={str(d).replace('torch.', '')}" for r, d in dtypes.items())
            raise IncompatibleCheckpointError(f"tensor {k}: non-floating tensors must have one dtype ({desc}).")


_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(value: str | int | float) -> int:
    """Parse a byte size: an int, or a string like '512MB', '2GiB', '1.5g'."""
    if isinstance(value, bool):
        raise ConfigError(f"memory budget must be a size, not {value!r}")
    if isinstance(value, (int, float)):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"cannot read the size {value!r}; use e.g. 512MB, 2GiB or a number of bytes.")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(n) or n <= 0:
        raise ConfigError(f"memory budget must be positive, got {value!r}")
    return int(n)


@dataclass
class Group:
    """Tensors processed together: projected groups share one shape (one batched SVD)."""

    kind: Kind
    keys: list[str]
    shape: tuple[int, ...] | None  # the common shape of a projected group
    cost: int  # estimated working-set bytes while the group is computed (inputs included)
    input_bytes: int  # bytes of the stored inputs, what a prefetch of this group holds


def make_groups(
    classification: Classification,
    infos: dict[str, tuple[tuple[int, ...], int]],
    budget: int,
    cost: Callable[[str, Kind, tuple[int, ...], int], int],
) -> list[Group]:
    """Group the non-carried tensors so that each group's working set fits the budget.

    ``infos`` maps key -> (shape, summed input itemsize); ``cost`` estimates the
    working-set bytes of one tensor, its inputs included. Same-shape projected
    weights are batched. Groups are packed to half the budget so that one group
    computing plus the next one prefetched fit; a tensor above half the budget
    gets a group of its own and the engine does not prefetch beside it. A tensor
    whose cost alone exceeds the budget is a ConfigError naming the smallest
    budget that works.
    """
    worst_key, worst = None, 0
    costs: dict[str, int] = {}
    for k, kind in classification.kinds.items():
        if kind is Kind.CARRIED:
            continue
        shape, itemsize = infos[k]
        c = cost(k, kind, shape, itemsize)
        costs[k] = c
        if c > worst:
            worst_key, worst = k, c
    if worst > budget:
        raise ConfigError(
            f"the memory budget {_fmt(budget)} is below what the largest tensor needs ({worst_key}: "
            f"{_fmt(worst)}); use --memory-budget {_fmt_up(worst)} or more."
        )
    groups: list[Group] = []
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for k in classification.keys_of(Kind.PROJECTED):
        by_shape.setdefault(tuple(infos[k][0]), []).append(k)
    inputs = {k: math.prod(infos[k][0]) * infos[k][1] for k in costs}
    limit = max(budget // 2, 1)
    for shape, keys in sorted(by_shape.items(), key=lambda kv: kv[1][0]):
        _pack(groups, Kind.PROJECTED, keys, costs, inputs, limit, shape)
    _pack(groups, Kind.AVERAGED, classification.keys_of(Kind.AVERAGED), costs, inputs, limit, None)
    return groups


def _pack(groups, kind: Kind, keys: list[str], costs: dict[str, int], inputs: dict[str, int], limit: int, shape) -> None:
    cur: list[str] = []
    cur_cost = 0
    for k in keys:
        if cur and cur_cost + costs[k] > limit:
            groups.append(Group(kind, cur, shape, cur_cost, sum(inputs[x] for x in cur)))
            cur, cur_cost = [], 0
        cur.append(k)
        cur_cost += costs[k]
    if cur:
        groups.append(Group(kind, cur, shape, cur_cost, sum(inputs[x] for x in cur)))


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _fmt_up(n: int) -> str:
    return f"{math.ceil(n / 1024**2)}MiB"
