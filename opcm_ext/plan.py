"""Plan a merge step: classify tensors, validate the inputs, group tensors under the memory budget.

Classification (docs/algorithm.md, "Tensor classes") comes from module types:
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
import hashlib
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import torch

from . import _cache
from .errors import ConfigError, IncompatibleCheckpointError

__all__ = [
    "Kind",
    "Classification",
    "Group",
    "Streamed",
    "Plan",
    "CostModel",
    "classify",
    "fallback_kind",
    "validate_inputs",
    "make_plan",
    "parse_size",
    "FLOAT_DTYPES",
]

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when _module_types' result changes meaning

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
    #: floating tensors owned directly by a module that has child modules (CLIP's class_embedding)
    nonleaf: set[str] = field(default_factory=set)

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


def _module_types(config_dir: Path) -> dict[str, Any]:
    """Linear weights, all parameter/buffer names, the class name and the parameters owned by
    non-leaf modules, from the architecture built on the meta device (cached per config)."""
    cfg_path = config_dir / "config.json"
    try:
        raw_bytes = cfg_path.read_bytes()
        raw = json.loads(raw_bytes)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: cannot read config.json ({exc}).") from exc
    import importlib.metadata

    try:
        tf_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        tf_version = "?"
    key = hashlib.sha256(raw_bytes + f"\0{tf_version}\0{torch.__version__}\0{_CACHE_FORMAT}".encode()).hexdigest()
    cached = _cache.load(f"classify/{key}.json")
    if isinstance(cached, dict) and set(cached) == {"linear", "names", "cls", "nonleaf"}:
        return cached
    result = _build_on_meta(config_dir, raw)
    _cache.store(f"classify/{key}.json", result)
    return result


def _build_on_meta(config_dir: Path, raw: dict) -> dict[str, Any]:
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    cls = None
    for arch in raw.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        linear_types = linear_types + (Conv1D,)
    except ImportError:  # pragma: no cover - very old transformers
        pass
    linear: list[str] = []
    nonleaf: list[str] = []
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, linear_types):
            linear.append(f"{prefix}weight")
        if next(module.children(), None) is not None:  # parameters owned directly by a non-leaf module
            nonleaf += [prefix + n for n, _ in module.named_parameters(recurse=False)]
    names = set(model.state_dict().keys())
    names.update(n for n, _ in model.named_parameters(remove_duplicate=False))
    return {"linear": sorted(linear), "names": sorted(names), "cls": type(model).__name__, "nonleaf": sorted(nonleaf)}


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
    nonleaf: set[str] = set()
    if config_dir is not None and (config_dir / "config.json").is_file():
        try:
            found = _module_types(config_dir)
            linear, names, cls_name = set(found["linear"]), set(found["names"]), found["cls"]
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
        nonleaf = {k for k, name in mapping.items() if name in set(found["nonleaf"])}
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
    nonleaf = {k for k in nonleaf if kinds[k] is not Kind.CARRIED}
    return Classification(kinds=kinds, source=source, notes=notes, nonleaf=nonleaf)


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


class CostModel(Protocol):
    """What the planner needs from a merge method (``methods.base.Method`` implements it)."""

    @property
    def projects(self) -> bool: ...

    def cost(self, kind: Kind, shape: tuple[int, ...], itemsize_sum: int) -> int: ...

    def stream_cost(self, shape: tuple[int, int], itemsize_sum: int, rows: int) -> int: ...

    @property
    def streams(self) -> bool: ...

    def reserved(self) -> tuple[int, str]: ...


@dataclass(frozen=True)
class Group:
    """Tensors processed together: whole tensors of one kind (projected ones share one shape:
    one batched SVD), or one row block ``rows`` of one tensor too large to process whole."""

    kind: Kind
    keys: tuple[str, ...]
    cost: int  # estimated working-set bytes while the group is computed (inputs included)
    input_bytes: int  # bytes of the stored inputs, what a prefetch of this group holds
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Streamed:
    """A projected matrix whose SVD pass runs block by block along its long side."""

    key: str
    shape: tuple[int, int]
    block: int  # long-side rows per block
    cost: int


@dataclass
class Plan:
    """The groups of a step, in order, and the matrices whose SVD pass is streamed."""

    groups: list[Group]
    streamed: dict[str, Streamed]
    budget: int

    @property
    def peak(self) -> int:
        """The largest working set: a group computing plus the next one's inputs prefetched."""
        peak = max((s.cost for s in self.streamed.values()), default=0)
        for a, b in zip(self.groups, self.groups[1:] + [None]):
            nxt = b.input_bytes if b is not None and a.cost + b.input_bytes <= self.budget else 0
            peak = max(peak, a.cost + nxt)
        return peak


#: Fewest long-side rows a streamed block may have (below it the per-block overhead dominates).
MIN_STREAM_ROWS = 16


def make_plan(
    classification: Classification,
    infos: dict[str, tuple[tuple[int, ...], int]],
    budget: int,
    model: CostModel,
    *,
    stage_budget: int | None = None,
    batch_multiple: int = 1,
) -> Plan:
    """Group the non-carried tensors so that each group's working set fits half the budget.

    ``infos`` maps key -> (shape, summed stored itemsize of the inputs). Same-shape projected
    weights are batched (when the method projects). A tensor that does not fit whole is split
    into row blocks for the element-wise passes, and a projected matrix is streamed in blocks
    along its long side for the SVD pass (working set O(min(m, n)²) plus a block). Half the
    budget per group leaves room for the next group's prefetch. ``stage_budget`` also bounds
    each group's stored inputs (the pinned staging buffers of a GPU step). ``batch_multiple``:
    a projected group the budget cuts short holds a multiple of this many matrices (the SVD
    workers that decompose a batch side by side), so no worker idles at the end of a batch. A
    budget too small for some tensor is a ConfigError naming the smallest budget that works.
    """
    reserve, reserved_for = getattr(model, "reserved", lambda: (0, ""))()
    streams = getattr(model, "streams", True)
    limit = max((budget - reserve) // 2, 1)
    in_limit = max(stage_budget // 2, 1) if stage_budget else None
    need: tuple[int, str] = (0, "")
    groups: list[Group] = []
    streamed: dict[str, Streamed] = {}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    whole: list[str] = []
    costs: dict[str, int] = {}
    inputs: dict[str, int] = {}
    split: list[str] = []
    for k in sorted(classification.kinds):
        kind = classification.kinds[k]
        if kind is Kind.CARRIED:
            continue
        shape, isz = infos[k]
        inputs[k] = math.prod(shape) * isz
        costs[k] = model.cost(kind, shape, isz)
        fits = costs[k] <= limit and (in_limit is None or inputs[k] <= in_limit)
        if kind is Kind.PROJECTED and fits:
            by_shape.setdefault(tuple(shape), []).append(k)
        elif kind is Kind.PROJECTED and model.projects and not streams:
            need = max(need, (2 * costs[k], k))
        elif kind is Kind.PROJECTED and model.projects:
            s = _stream(k, tuple(shape), isz, limit, model)
            if s.block < min(MIN_STREAM_ROWS, max(shape)):
                need = max(need, (2 * model.stream_cost(tuple(shape), isz, min(MIN_STREAM_ROWS, max(shape))), k))
            streamed[k] = s
            split.append(k)
        elif fits:
            whole.append(k)
        else:
            split.append(k)
    rest: list[Group] = []
    for k in split:
        shape, isz = infos[k]
        row_shape = tuple(shape[1:]) if len(shape) > 1 else ()
        row_cost = model.cost(Kind.AVERAGED, row_shape, isz)
        row_in = math.prod(row_shape) * isz
        rows = limit // max(row_cost, 1)
        if in_limit is not None:
            rows = min(rows, in_limit // max(row_in, 1))
        if rows < 1 or not shape:
            need = max(need, (2 * row_cost, k))
            rows = 1
        n = shape[0] if shape else 1
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            rest.append(Group(classification.kinds[k], (k,), row_cost * (r1 - r0), row_in * (r1 - r0), (r0, r1)))
    if need[0] + reserve > budget or reserve >= budget:
        if not reserve:
            least = _fmt_up(need[0])
            raise ConfigError(
                f"the memory budget {_fmt(budget)} is below what the largest tensor needs ({need[1]}: "
                f"{least}); use --memory-budget {least} or more."
            )
        # need counts every tensor that did not fit what the reserve left (all of them when it took everything)
        least = _fmt_up(need[0] + reserve)
        raise ConfigError(
            f"the memory budget {_fmt(budget)} is below what this step needs: {_fmt(reserve)} held for the whole "
            f"step ({reserved_for}) plus {_fmt_up(need[0])} for the largest tensor ({need[1]}); "
            f"use --memory-budget {least} or more."
        )
    for shape, keys in sorted(by_shape.items(), key=lambda kv: kv[1][0]):
        _pack(groups, Kind.PROJECTED, keys, costs, inputs, limit, in_limit, batch_multiple if model.projects else 1)
    _pack(groups, Kind.AVERAGED, whole, costs, inputs, limit, in_limit)
    return Plan(groups=groups + rest, streamed=streamed, budget=budget - reserve)


def _stream(key: str, shape: tuple[int, ...], isz: int, limit: int, model: CostModel) -> Streamed:
    long = max(shape)
    fixed = model.stream_cost(shape, isz, 0)  # type: ignore[arg-type]
    per_row = max(model.stream_cost(shape, isz, 1) - fixed, 1)  # type: ignore[arg-type]
    rows = max(0, min(long, (limit - fixed) // per_row))
    return Streamed(key, (shape[0], shape[1]), int(rows), model.stream_cost(shape, isz, max(int(rows), 1)))  # type: ignore[arg-type]


def _pack(groups: list[Group], kind: Kind, keys: list[str], costs: dict[str, int], inputs: dict[str, int],
          limit: int, in_limit: int | None, multiple: int = 1) -> None:
    todo = list(keys)
    while todo:
        n = cost = inp = 0
        while n < len(todo) and (n == 0 or (cost + costs[todo[n]] <= limit and
                                           (in_limit is None or inp + inputs[todo[n]] <= in_limit))):
            cost += costs[todo[n]]
            inp += inputs[todo[n]]
            n += 1
        if n < len(todo) and n >= multiple:  # cut short by the budget: a whole number of rounds per worker
            n -= n % multiple
        cur, todo = todo[:n], todo[n:]
        groups.append(Group(kind, tuple(cur), sum(costs[k] for k in cur), sum(inputs[k] for k in cur)))


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _fmt_up(n: int) -> str:
    """A size at least n, rounded up to whole KiB below 10 MiB, else to whole MiB."""
    return f"{math.ceil(n / 1024)}KiB" if n < 10 << 20 else f"{math.ceil(n / 1024**2)}MiB"
