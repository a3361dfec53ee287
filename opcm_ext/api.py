"""The public API: merge_stream, merge_sequence, read_state.

``merge_stream`` prepares one step and hands it to the engine: it opens and validates every
input, checks the inputs' identity against the merge state (wrong base, duplicate model) before
any real work, classifies and plans, opens the output transaction, runs the step and commits.
``prepare_step`` (method, validation, identity), ``StepSetup.state`` and ``step_report`` are the
part of that preparation that ``opcm_ext.Merger`` (models in memory) shares.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import io, ops
from .engine import DeviceStore, StepJob, StepResult, non_finite_error, run_step
from .memory import RssSampler
from .errors import (CheckpointError, ConfigError, DuplicateModelError, IncompatibleCheckpointError, MergeStateError,
                     OutputError)
from .methods import Method, StepInfo, get_method
from .plan import Classification, Kind, classify, make_plan, parse_size, validate_inputs
from .state import MergeState

__all__ = ["merge_stream", "merge_sequence", "read_state", "MergeReport", "DEFAULT_MEMORY_BUDGET", "StepSetup",
           "prepare_step", "resolve_method", "check_identity", "step_report", "kept_shapes", "state_of"]

log = logging.getLogger(__name__)

#: The default working-set bound: enough for every ViT-L/14 layer, small next to any training box.
DEFAULT_MEMORY_BUDGET = "1GiB"
#: Share of the GPU's free memory a step may use when --gpu-memory-budget is not given.
GPU_MEMORY_SHARE = 0.8

PathLike = str | os.PathLike


@dataclass
class MergeReport:
    """What one merge step did and what it cost."""

    step: int
    method: str
    params: dict[str, Any]
    lam: float | None
    norms: list[float]
    mean_norm: float
    output: Path | None  # None: the merge is in memory (opcm_ext.Merger)
    device: str
    memory_budget_bytes: int
    peak_rss_bytes: int
    baseline_rss_bytes: int
    timings: dict[str, float]
    tensors: dict[str, int]
    classification: str
    groups: int
    streamed: int = 0  # projected matrices whose SVD ran block by block (too large for the budget)
    backend: str = ""
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # method state, e.g. TIES thresholds

    @property
    def peak_above_baseline_bytes(self) -> int:
        """Peak RSS during the step minus RSS when it started: what the step itself held."""
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        d = asdict(self)
        d["output"] = str(self.output) if self.output is not None else None
        d["peak_above_baseline_bytes"] = self.peak_above_baseline_bytes
        return d

    def to_json(self) -> str:
        """``to_dict`` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def summary(self) -> str:
        """One line for humans."""
        lam = f" lambda={self.lam:.6g}" if self.lam is not None else ""
        return (
            f"step {self.step} [{self.method}]{lam} norm={self.norms[-1]:.6g} mean_norm={self.mean_norm:.6g} "
            f"time={self.timings.get('total', 0):.2f}s peak_mem=+{self.peak_above_baseline_bytes / 2**20:.0f}MiB "
            f"(budget {self.memory_budget_bytes / 2**20:.0f}MiB) -> {self.output or 'memory'}"
        )


def read_state(path: PathLike) -> MergeState | None:
    """The merge state stored in a checkpoint (None for a checkpoint opcm-ext did not write)."""
    with io.CheckpointReader(path) as r:
        return state_of(r, str(path))


def state_of(reader: io.CheckpointReader, where: str) -> MergeState | None:
    """The merge state of an open checkpoint; every shard must carry the same one."""
    states = [MergeState.from_metadata(md or {}, where=f"{where} ({f})") for f, md in reader.shard_metadata.items()]
    if not states:
        return None
    first = states[0]
    if any((s is None) != (first is None) or (s is not None and s.to_metadata() != first.to_metadata()) for s in states):
        raise MergeStateError(
            f"{where}: its shards carry different merge states (mixed files from different merges?); "
            "restore the folder from one merge."
        )
    return first


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def resolve_method(prev: MergeState | None, name: str | None, params: dict[str, Any], allow_change: bool,
            where: Path | None) -> Method:
    """The method and parameters of this step: given ones, else those recorded in the merge state."""
    name = name or (prev.method if prev else "opcm")
    cls = get_method(name)
    if prev is not None and prev.method != name and not allow_change:
        raise MergeStateError(
            f"{where} was merged with {prev.method!r}; continuing with {name!r} mixes methods. "
            "Pass allow_param_change=True (--allow-param-change) if you mean it."
        )
    if prev is not None and prev.method == name:
        for k, v in prev.params.items():
            params.setdefault(k, v)
    m = cls(**params)
    if prev is not None and prev.method == name and not allow_change:
        recorded = {k: prev.params.get(k, p.default) for k, p in cls.params.items()}  # older states lack new params
        if m.values != recorded:
            raise MergeStateError(
                f"{where} was merged with {prev.method} {json.dumps(prev.params, sort_keys=True)}; continuing "
                f"with {json.dumps(m.values, sort_keys=True)} changes the method's parameters. Pass "
                "allow_param_change=True (--allow-param-change) if you mean it."
            )
    return m


def check_identity(prev: MergeState | None, readers: dict[str, Any], paths: dict[str, str],
                    hashes: dict[str, str], allow_duplicate: bool) -> None:
    """Refuse a wrong base or an already merged model, before any SVD work."""
    if prev is None:
        return
    if not _matches(prev.base["hash"], readers["base"], hashes["base"]):
        err = non_finite_error(readers["base"], readers["base"].keys(), "base", paths["base"])
        if err is not None:  # a base that changed because it holds NaN/Inf: say that
            raise err
        raise IncompatibleCheckpointError(
            f"the merged checkpoint {paths['merged']} was made from base {prev.base.get('name')!r} "
            f"(hash {prev.base.get('hash')}), but the given base {paths['base']} has hash {hashes['base']}; "
            "pass the same base model that started this merge."
        )
    if allow_duplicate:
        return
    for i, m in enumerate(prev.models, start=1):
        if _matches(m["hash"], readers["new"], hashes["new"]):
            raise DuplicateModelError.at_step(paths["new"], i, m.get("name"))


def _matches(recorded: str, reader: Any, known: str) -> bool:
    """Whether a hash recorded in a state is this checkpoint's (in the recorded hash's scheme)."""
    try:
        scheme = io.hash_algorithm(recorded)
    except ValueError as e:
        raise MergeStateError(f"the merge state records a malformed model hash: {e}") from None
    if scheme == io.hash_algorithm(known):
        return recorded == known
    return io.same_model(recorded, reader)  # a state written by opcm-ext 0.1: its legacy scheme


@dataclass
class StepSetup:
    """A step whose inputs passed every check: its method, StepInfo, the inputs' hashes, the model the output mirrors."""

    method: Method
    info: StepInfo
    hashes: dict[str, str]  # role ("base", "new") -> content identity
    like: Any  # the reader whose layout, dtypes and carried tensors the output mirrors

    def state(self, base_name: str, new_name: str) -> MergeState:
        """The merge state after this step (once the passes before the output know λ(t))."""
        m, info, prev = self.method, self.info, self.info.prev
        models = (list(prev.models) if prev else []) + [{"name": new_name, "hash": self.hashes["new"]}]
        return MergeState(method=m.name, params=dict(m.values), step=info.step, lam=float(m.lam()), norms=info.norms,
                          base={"name": base_name, "hash": self.hashes["base"]}, models=models)


def prepare_step(readers: dict[str, Any], paths: dict[str, str], prev: MergeState | None, *, method: str | None,
                 params: dict[str, Any], allow_param_change: bool = False, allow_duplicate: bool = False,
                 where: Path | None = None, progress: bool = False) -> StepSetup:
    """Resolve the method, validate the inputs and check their identity against ``prev``, before any real work."""
    m = resolve_method(prev, method, params, allow_param_change, where)
    info = StepInfo(step=1 if prev is None else prev.step + 1, prev=prev)
    m.begin(info)
    validate_inputs(readers, paths)
    hashes = {r: io.content_hash(readers[r], progress=progress) for r in ("base", "new")}
    check_identity(prev, readers, paths, hashes, allow_duplicate)
    info.warnings.extend(getattr(readers["new"], "warnings", ()))  # e.g. a LoRA adapter trained on another name
    like = readers["merged"] if "merged" in readers else readers["new" if m.copies_first else "base"]
    return StepSetup(m, info, hashes, like)


def kept_shapes(classification: Classification, like: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of the floating tensors: what a pass may keep for a later one (OPCM's Σ)."""
    return {k: tuple(like.info(k).shape) for k, v in classification.kinds.items() if v is not Kind.CARRIED}


def step_report(result: StepResult, classification: Classification, *, output: Path | None, device: Any,
                native: bool, budget: int, rss: RssSampler) -> MergeReport:
    """The MergeReport of a finished step."""
    st = result.state
    return MergeReport(
        step=st.step, method=st.method, params=dict(st.params), lam=st.lam if st.method == "opcm" else None,
        norms=list(st.norms), mean_norm=st.mean_norm, output=output, device=str(device),
        memory_budget_bytes=budget, peak_rss_bytes=rss.peak, baseline_rss_bytes=rss.baseline,
        timings=result.timings, tensors=classification.counts(), classification=classification.source,
        groups=result.groups, streamed=result.streamed, backend="native" if native else "torch", warnings=result.warnings,
        details=result.details,
    )


def _open_checkpoint(role: str, path: str) -> io.CheckpointReader:
    if io.is_adapter(path):
        raise CheckpointError(
            f"the {role} checkpoint {path} is a LoRA adapter; pass the full model as {role.upper()} and adapters "
            "only as models to merge (they are applied to BASE)."
        )
    return io.CheckpointReader(path)


class _FileSink:
    """The output writer inside the transaction, laid out like the like-checkpoint."""

    def __init__(self, tx: io.OutputTransaction, like: io.CheckpointReader) -> None:
        self.tx, self.like = tx, like

    def open(self, state: MergeState) -> io.SafetensorsWriter:
        meta = dict(state.to_metadata())
        meta["format"] = "pt"
        entries = [(f, [(k, self.like.info(k).dtype, tuple(self.like.info(k).shape)) for k in keys])
                   for f, keys in self.like.layout]
        if self.tx.kind == "file":  # a bare .safetensors output: one file
            entries = [(self.tx.out.name, [e for _, lst in entries for e in lst])]
        return self.tx.writer(entries, meta)


def _config_dir(readers: dict[str, Any]) -> Path | None:
    for r in ("base", "new", "merged"):
        if r in readers and getattr(readers[r], "config_path", None) is not None:
            return readers[r].config_path.parent
    return None


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
    backend: str = "auto",
    gpu_memory_budget: str | int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    progress: bool = False,
    allow_duplicate: bool = False,
    allow_param_change: bool = False,
    overwrite: bool = False,
    projected: Sequence[str] = (),
    averaged: Sequence[str] = (),
    **method_params: Any,
) -> MergeReport:
    """Fold the checkpoint ``new`` into ``merged`` (None starts a merge) and write ``out``.

    ``out=None`` replaces ``merged`` atomically. ``method`` and its parameters default to those
    recorded in ``merged`` (else OPCM with alpha=0.5); continuing with different ones needs
    ``allow_param_change=True``.
    """
    base_p, new_p = Path(base), Path(new)
    merged_p = Path(merged) if merged is not None else None
    if out is None and merged_p is None:
        raise ConfigError("out is required when starting a merge (merged=None).")
    out_p = Path(out) if out is not None else merged_p
    assert out_p is not None
    budget = parse_size(memory_budget)
    sel = ops.select(device, backend)
    if sel.reason:
        log.warning("%s", sel.reason)
    if io.needs_recovery(out_p):
        for note in io.recover_output(out_p):  # before out is read or checked: a killed run may hold it
            log.info(note)
    for role, p in (("base", base_p), ("new", new_p)):
        if _same_path(out_p, p):
            raise OutputError(f"the output {out_p} is the {role} checkpoint; writing there would destroy an input.")
    if merged_p is not None and _same_path(merged_p, new_p):
        raise ConfigError(f"merged and new are the same checkpoint ({new_p}).")
    if out_p.exists() and not overwrite and not (merged_p is not None and _same_path(out_p, merged_p)):
        raise OutputError(f"{out_p} already exists; pass overwrite=True (--overwrite) to replace it.")

    paths = {r: str(p) for r, p in (("base", base_p), ("merged", merged_p), ("new", new_p)) if p is not None}
    readers: dict[str, Any] = {}
    rss = RssSampler().start()  # the whole step: hashing, classification, planning, the passes, the commit
    try:
        for role in ("base", "merged"):
            if role in paths:
                readers[role] = _open_checkpoint(role, paths[role])
        readers["new"] = io.open_model(paths["new"], readers["base"])  # a checkpoint, or a LoRA adapter on BASE
        prev = None
        if merged_p is not None:
            prev = state_of(readers["merged"], str(merged_p))
            if prev is None:
                raise MergeStateError(
                    f"{merged_p} carries no opcm-ext merge state, so it cannot be continued. Start a merge "
                    "with merged=None (`opcm merge BASE MODEL... -o OUT`) and fold models in one at a time."
                )
        params = dict(method_params)
        if alpha is not None:
            params["alpha"] = alpha
        setup = prepare_step(readers, paths, prev, method=method, params=params, allow_param_change=allow_param_change,
                             allow_duplicate=allow_duplicate, where=merged_p, progress=progress)
        m, like = setup.method, setup.like

        ref = readers["base"]
        tensors = {k: (ref.info(k).dtype, tuple(ref.info(k).shape)) for k in ref.keys()}
        classification = classify(tensors, _config_dir(readers), projected=projected, averaged=averaged)
        for note in classification.notes:
            log.info(note)
        setup.info.nonleaf = frozenset(classification.nonleaf)
        infos = {k: (tuple(ref.info(k).shape), sum(r.info(k).dtype.itemsize for r in readers.values())) for k in ref.keys()}
        setup.info.shapes = {k: shape for k, (shape, _) in infos.items()}
        stage = None
        work_budget = budget
        if sel.device.type == "cuda":
            work_budget = _gpu_budget(gpu_memory_budget, sel.device)
            stage = budget
        plan = make_plan(classification, infos, work_budget, m, stage_budget=stage,
                         batch_multiple=ops.svd_parallelism(sel.device) if sel.native else 1)

        floating = kept_shapes(classification, like)
        keep_bytes = 4 * sum(_numel(s) for s in floating.values()) if any(p.keep for p in m.passes()) else 0
        spill = max(0, keep_bytes - max(0, budget - plan.peak)) if sel.device.type == "cpu" else keep_bytes
        kind = "file" if out_p.suffix == ".safetensors" else "folder"
        with io.OutputTransaction(out_p, kind=kind, like_folder=like.folder if like.is_folder else None,
                                  expected_bytes=like.total_bytes + spill) as tx:
            if prev is not None and _same_path(out_p, merged_p):  # type: ignore[arg-type]
                _check_unchanged(merged_p, prev, new_p)  # type: ignore[arg-type]

            def make_store(allowance: int):  # allowance: the plan's budget minus its peak (0 under Ray)
                if sel.device.type == "cuda" and keep_bytes <= allowance:
                    return DeviceStore(floating, sel.device)
                return io.ScratchStore(tx.scratch_dir, floating, memory_limit=allowance if sel.device.type == "cpu" else 0)

            job = StepJob(method=m, info=setup.info, sources=readers, like=like, classification=classification,
                          plan=plan, ops=sel, sink=_FileSink(tx, like), make_store=make_store,
                          state=lambda: setup.state(base_p.name, new_p.name), names=paths, progress=progress,
                          executor=_executor(executor, ray_address))
            result = run_step(job)
            tx.commit()  # config/tokenizer files were copied by OutputTransaction(like_folder=...)
    finally:
        rss.stop()
        for r in readers.values():
            r.close()

    return step_report(result, classification, output=out_p, device=sel.device, native=sel.native, budget=budget, rss=rss)


def _executor(name: str, address: str | None) -> Any:
    from .executors import make_executor

    return make_executor(name, address=address) if name == "ray" else make_executor(name)


def _gpu_budget(value: str | int | None, device: torch.device) -> int:
    """The device-memory bound of a GPU step: the given size, else a share of the free memory."""
    if value is not None:
        return parse_size(value)
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * GPU_MEMORY_SHARE)


def _check_unchanged(merged_p: Path, prev: MergeState, new_p: Path) -> None:
    """Under the output lock: the merged checkpoint still holds the state this step was planned from.

    The lock is taken after ``merged`` was read, so another merge into the same folder may have
    committed in between; continuing would write a step from the stale state and drop its model.
    """
    with io.CheckpointReader(merged_p) as again:
        now = state_of(again, str(merged_p))
    if now is None or now.to_metadata() != prev.to_metadata():
        raise OutputError(
            f"another merge into {merged_p} finished while this one was starting (it is now at step "
            f"{now.step if now else '?'}, this merge read step {prev.step}); nothing was written. Rerun the "
            f"command to fold {new_p} into the new state."
        )


def _numel(shape: Sequence[int]) -> int:
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
        reports.append(merge_stream(base, None if i == 0 else out, model, out, overwrite=overwrite, **options))
    return reports
