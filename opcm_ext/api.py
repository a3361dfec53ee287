"""The public API: merge_stream, merge_sequence, read_state."""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import CheckpointReader, OutputTransaction, recover_output
from .engine import like_reader, run_step
from .errors import ConfigError, MergeStateError, OutputError
from .methods import get_method
from .plan import Kind, classify, make_groups, parse_size, validate_inputs
from .state import MergeState

__all__ = ["merge_stream", "merge_sequence", "read_state", "MergeReport", "DEFAULT_MEMORY_BUDGET"]

log = logging.getLogger(__name__)

#: The default working-set bound: enough for every ViT-L/14 layer, small next to any training box.
DEFAULT_MEMORY_BUDGET = "1GiB"

PathLike = str | os.PathLike


@dataclass
class MergeReport:
    """What one merge step did and what it cost."""

    step: int
    method: str
    params: dict[str, float]
    lam: float | None
    norms: list[float]
    mean_norm: float
    output: Path
    device: str
    memory_budget_bytes: int
    peak_rss_bytes: int
    baseline_rss_bytes: int
    timings: dict[str, float]
    tensors: dict[str, int]
    classification: str
    groups: int
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # method scalars, e.g. TIES thresholds

    @property
    def peak_above_baseline_bytes(self) -> int:
        """Peak RSS during the step minus RSS when it started: what the step itself held."""
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        d["peak_above_baseline_bytes"] = self.peak_above_baseline_bytes
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def summary(self) -> str:
        lam = f" lambda={self.lam:.6g}" if self.lam is not None else ""
        return (
            f"step {self.step} [{self.method}]{lam} norm={self.norms[-1]:.6g} mean_norm={self.mean_norm:.6g} "
            f"time={self.timings.get('total', 0):.2f}s peak_mem=+{self.peak_above_baseline_bytes / 2**20:.0f}MiB "
            f"(budget {self.memory_budget_bytes / 2**20:.0f}MiB) -> {self.output}"
        )


def read_state(path: PathLike) -> MergeState | None:
    """The merge state stored in a checkpoint (None for a checkpoint opcm-ext did not write)."""
    with CheckpointReader(path) as r:
        return _state_of(r, str(path))


def _state_of(reader: CheckpointReader, where: str) -> MergeState | None:
    states = {}
    for fname, md in reader.shard_metadata.items():
        states[fname] = MergeState.from_metadata(md or {}, where=f"{where} ({fname})")
    values = list(states.values())
    if not values:
        return None
    first = values[0]
    if any((s is None) != (first is None) or (s is not None and s.to_metadata() != first.to_metadata()) for s in values):
        raise MergeStateError(
            f"{where}: its shards carry different merge states (mixed files from different merges?); "
            "restore the folder from one merge."
        )
    return first


def _resolve_device(device: str | torch.device) -> torch.device:
    d = str(device)
    if d == "auto":
        if torch.cuda.is_available():
            from . import _native

            if _native.available().get("cuda"):
                return torch.device("cuda")
            warnings.warn(
                "a GPU is visible but opcm_ext._cuda is not built; merging on the CPU. Rebuild with "
                "OPCM_WITH_CUDA=ON pip install . to use the GPU.",
                RuntimeWarning,
                stacklevel=3,
            )
        return torch.device("cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but torch sees no GPU; use --device cpu or auto.")
        from . import _native

        if not _native.available().get("cuda"):
            raise ConfigError(
                "device 'cuda' was asked for but opcm_ext._cuda is not built; reinstall with "
                "OPCM_WITH_CUDA=ON pip install . (needs nvcc and the cuSOLVER/cuBLAS headers)."
            )
        return torch.device(d)
    raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda.")


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def merge_stream(
    base: PathLike,
    merged: PathLike | None,
    new: PathLike,
    out: PathLike | None = None,
    *,
    method: str | None = None,
    alpha: float | None = None,
    memory_budget: str | int = DEFAULT_MEMORY_BUDGET,
    device: str = "auto",
    progress: bool = False,
    allow_duplicate: bool = False,
    allow_param_change: bool = False,
    overwrite: bool = False,
    projected: Sequence[str] = (),
    averaged: Sequence[str] = (),
    **method_params: Any,
) -> MergeReport:
    """Fold the checkpoint ``new`` into ``merged`` (None starts a merge) and write ``out``.

    ``out=None`` replaces ``merged`` atomically. ``method`` and its parameters
    default to those recorded in ``merged`` (else OPCM with alpha=0.5);
    continuing with different ones needs ``allow_param_change=True``.
    """
    base_p, new_p = Path(base), Path(new)
    merged_p = Path(merged) if merged is not None else None
    if out is None:
        if merged_p is None:
            raise ConfigError("out is required when starting a merge (merged=None).")
        out_p = merged_p
    else:
        out_p = Path(out)
    budget = parse_size(memory_budget)
    dev = _resolve_device(device)
    _recover_interrupted(out_p)

    for role, p in (("base", base_p), ("new", new_p)):
        if _same_path(out_p, p):
            raise OutputError(f"the output {out_p} is the {role} checkpoint; writing there would destroy an input.")
    if merged_p is not None and _same_path(merged_p, new_p):
        raise ConfigError(f"merged and new are the same checkpoint ({new_p}).")
    if out_p.exists() and not overwrite and not (merged_p is not None and _same_path(out_p, merged_p)):
        raise OutputError(f"{out_p} already exists; pass overwrite=True (--overwrite) to replace it.")

    readers: dict[str, CheckpointReader] = {}
    try:
        readers["base"] = CheckpointReader(base_p)
        if merged_p is not None:
            readers["merged"] = CheckpointReader(merged_p)
        readers["new"] = CheckpointReader(new_p)
        paths = {r: str(p) for r, p in (("base", base_p), ("merged", merged_p), ("new", new_p)) if p is not None}

        prev = None
        if merged_p is not None:
            prev = _state_of(readers["merged"], str(merged_p))
            if prev is None:
                raise MergeStateError(
                    f"{merged_p} carries no opcm-ext merge state, so it cannot be continued. Start a merge "
                    "with merged=None (`opcm merge BASE MODEL... -o OUT`) and fold models in one at a time."
                )
        method_name = method or (prev.method if prev else "opcm")
        cls = get_method(method_name)
        params = dict(method_params)
        if alpha is not None:
            params["alpha"] = alpha
        if prev is not None:
            if prev.method != method_name and not allow_param_change:
                raise MergeStateError(
                    f"{merged_p} was merged with {prev.method!r}; continuing with {method_name!r} mixes methods. "
                    "Pass allow_param_change=True (--allow-param-change) if you mean it."
                )
            if prev.method == method_name:
                for k, v in prev.params.items():
                    params.setdefault(k, v)
        m = cls(**params)
        if prev is not None and prev.method == method_name and m.values != prev.params and not allow_param_change:
            raise MergeStateError(
                f"{merged_p} was merged with {prev.method} {json.dumps(prev.params, sort_keys=True)}; continuing "
                f"with {json.dumps(m.values, sort_keys=True)} changes the method's parameters. Pass "
                "allow_param_change=True (--allow-param-change) if you mean it."
            )
        step = 1 if prev is None else prev.step + 1

        validate_inputs(readers, paths)
        ref = readers["base"]
        tensors = {k: (ref.info(k).dtype, tuple(ref.info(k).shape)) for k in ref.keys()}
        config_dir = None
        for r in ("base", "new", "merged"):
            if r in readers and readers[r].config_path is not None:
                config_dir = readers[r].config_path.parent
                break
        classification = classify(tensors, config_dir, projected=projected, averaged=averaged)
        for note in classification.notes:
            log.info(note)
        infos = {
            k: (tuple(ref.info(k).shape), sum(readers[r].info(k).dtype.itemsize for r in readers))
            for k in ref.keys()
        }
        groups = make_groups(classification, infos, budget, lambda k, kind, shape, isz: m.cost(kind, shape, isz))

        like = like_reader(m, readers)
        floating = [k for k, v in classification.kinds.items() if v is not Kind.CARRIED]
        scratch_bytes = sum(4 * _numel(like.info(k).shape) for k in floating)
        kind = "file" if out_p.suffix == ".safetensors" else "folder"
        names = {"base": base_p.name, "new": new_p.name}
        with OutputTransaction(
            out_p, kind=kind, like_folder=like.folder if like.is_folder else None,
            expected_bytes=like.total_bytes + scratch_bytes,
        ) as tx:
            if prev is not None and _same_path(out_p, merged_p):
                _check_unchanged(merged_p, prev, new_p)
            result = run_step(
                m, step=step, prev=prev, readers=readers, paths=paths, names=names,
                classification=classification, groups=groups, tx=tx, device=dev, budget=budget,
                allow_duplicate=allow_duplicate, progress=progress,
            )
            tx.commit()  # config/tokenizer files were copied by OutputTransaction(like_folder=...)
    finally:
        for r in readers.values():
            r.close()

    st = result.state
    return MergeReport(
        step=st.step,
        method=st.method,
        params=dict(st.params),
        lam=st.lam if st.method == "opcm" else None,
        norms=list(st.norms),
        mean_norm=st.mean_norm,
        output=out_p,
        device=str(dev),
        memory_budget_bytes=budget,
        peak_rss_bytes=result.peak_rss_bytes,
        baseline_rss_bytes=result.baseline_rss_bytes,
        timings=result.timings,
        tensors=classification.counts(),
        classification=classification.source,
        groups=result.groups,
        warnings=result.warnings,
        details={k: v for k, v in result.scalars.items() if _jsonable(v)},
    )


def _recover_interrupted(out_p: Path) -> None:
    """Finish or undo what a killed run into ``out_p`` left behind, before ``out_p`` is read or checked.

    OutputTransaction recovers too, but only after the inputs are read: too late when the kill fell
    between the two renames of the rename-aside swap (MERGED is then only in ``.NAME.opcm-old-*``
    and reading it fails), or when the output is complete but still marked and the step is refused
    before any transaction opens (``-o OUT`` already exists).
    """
    try:
        names = os.listdir(out_p.parent)
    except OSError:
        return  # an unusable output folder is reported by the transaction
    prefix = f".{out_p.name}.opcm-"
    if any(n.startswith(prefix) for n in names) or (out_p / ".opcm-tmp").is_file():
        try:
            notes = recover_output(out_p)  # under the output's lock: refuses while another merge runs
        except OSError as e:
            raise OutputError(
                f"cannot clean up after an earlier interrupted run into {out_p}: {e}; check the folder's permissions"
            ) from e
        for note in notes:
            log.info(note)


def _check_unchanged(merged_p: Path, prev: MergeState, new_p: Path) -> None:
    """Under the output lock: the merged checkpoint still holds the state this step was planned from.

    The lock is taken after ``merged`` was read, so another merge into the same folder may have
    committed in between; continuing would write a step from the stale state and drop its model.
    """
    with CheckpointReader(merged_p) as again:
        now = _state_of(again, str(merged_p))
    if now is None or now.to_metadata() != prev.to_metadata():
        raise OutputError(
            f"another merge into {merged_p} finished while this one was starting (it is now at step "
            f"{now.step if now else '?'}, this merge read step {prev.step}); nothing was written. Rerun the "
            f"command to fold {new_p} into the new state."
        )


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def merge_sequence(
    base: PathLike,
    models: Sequence[PathLike],
    out: PathLike,
    *,
    overwrite: bool = False,
    **options: Any,
) -> list[MergeReport]:
    """Merge ``models`` in order into ``out`` (step 1 starts a new merge); one report per step."""
    if not models:
        raise ConfigError("merge_sequence needs at least one model.")
    reports = []
    for i, model in enumerate(models):
        reports.append(
            merge_stream(base, None if i == 0 else out, model, out, overwrite=overwrite, **options)
        )
    return reports
