"""Continual merging of models held in memory: ``Merger(base).add(model)``.

The same step as ``merge_stream`` — one method object, one plan, one engine (``run_step``) — with
sources that are state dicts instead of files: :class:`MemorySource` gives a state dict the
reading interface the engine uses, a dict sink takes the output tensors on the compute device,
and the kept tensors (OPCM's Σ) live in a :class:`~opcm_ext.engine.DeviceStore`. Identity checks
(wrong base, duplicate model) and the merge state are ``merge_stream``'s (``api.prepare_step``),
and a model's identity is ``io.hash_tensors`` of its tensors: the same value as ``io.content_hash``
of the same tensors saved on disk, so ``save`` writes a checkpoint that ``opcm step`` continues
and ``load`` resumes from any opcm-ext output.

Classification: an ``nn.Module`` base gives it directly (the weight of every ``nn.Linear`` and
transformers ``Conv1D`` is projected); a state dict base uses its ``config=`` (a transformers
config, a dict, or a folder/config.json) like a checkpoint's config.json, else the fallback name
rule; ``projected=``/``averaged=`` regular expressions override either, as on the CLI.

Tensors that share storage in the base (tied embeddings) are merged once under the first name
and appear under every name in ``state_dict()``; ``save`` writes them once, as ``save_pretrained``
does.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch

from . import io, ops
from .api import (GPU_MEMORY_SHARE, MergeReport, check_identity, kept_shapes, prepare_step, resolve_method, state_of,
                  step_report)
from .engine import DeviceStore, StepJob, run_step
from .errors import ConfigError, MergeStateError, OutputError
from .memory import RssSampler
from .methods.base import ScanSums
from .plan import Classification, Kind, Streamed, classify, make_plan, parse_size, validate_inputs
from .state import MergeState

__all__ = ["Merger", "MemorySource"]

log = logging.getLogger(__name__)

#: Shard size of ``Merger.save`` (save_pretrained's default).
DEFAULT_MAX_SHARD_SIZE = "5GB"


class MemorySource:
    """A state dict seen through the reader interface the engine uses: keys, info, read(rows=), read_columns."""

    folder = None
    is_folder = False
    config_path = None

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str) -> None:
        self.name = name
        self._t = dict(tensors)
        self._keys = sorted(self._t)
        self._infos: dict[str, io.TensorInfo] = {}
        for k in self._keys:
            t = self._t[k]
            try:
                code = io.dtype_to_str(t.dtype)
            except (KeyError, ValueError):
                raise ConfigError(f"tensor {k} of {name} is {t.dtype}, which safetensors cannot store; convert it.") from None
            self._infos[k] = io.TensorInfo(k, t.dtype, code, tuple(t.shape), Path(f"<{name}>"), 0, t.numel() * t.element_size())
        self._identity: str | None = None

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return list(self._keys)

    def info(self, name: str) -> io.TensorInfo:
        """Dtype and shape of one tensor."""
        return self._infos[name]

    @property
    def layout(self) -> list[tuple[str, list[str]]]:
        return [(io.SAFE_WEIGHTS_NAME, list(self._keys))]

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def read(self, name: str, out: torch.Tensor | None = None, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows [r0, r1) of it) where it lives, without a copy; ``out`` is not needed in memory."""
        t = self._t[name]
        return (t if rows is None else t[rows[0]:rows[1]]).contiguous()

    def read_columns(self, name: str, c0: int, c1: int, out: torch.Tensor | None = None, *,
                     rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Columns [c0, c1) of a 2-D tensor (of rows [r0, r1) if given)."""
        t = self._t[name]
        return (t if rows is None else t[rows[0]:rows[1]])[:, c0:c1].contiguous()

    def content_identity(self) -> str:
        """``io.hash_tensors`` of the tensors: equal to ``io.content_hash`` of them saved as a checkpoint."""
        if self._identity is None:
            self._identity = io.hash_tensors(self._t)
        return self._identity

    def close(self) -> None:
        """Nothing to release (the tensors belong to the caller)."""

    def __repr__(self) -> str:
        return f"MemorySource({self.name!r}, tensors={len(self._keys)})"


class _DictWriter:
    """The output of a step as tensors on the merger's device, written whole or in row/column blocks."""

    def __init__(self, like: Any, device: torch.device) -> None:
        self.like, self.device = like, device
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor, *, rows: tuple[int, int] | None = None,
              cols: tuple[int, int] | None = None) -> None:
        info = self.like.info(name)
        if rows is None and cols is None:  # a copy: the engine may hand out views of inputs or reused buffers
            self.tensors[name] = tensor.to(self.device, info.dtype, copy=True).reshape(info.shape)
            return
        full = self.tensors.get(name)
        if full is None:
            full = self.tensors[name] = torch.empty(info.shape, dtype=info.dtype, device=self.device)
        region = full if rows is None else full[rows[0]:rows[1]]
        (region if cols is None else region[:, cols[0]:cols[1]]).copy_(tensor)


class _DictSink:
    def __init__(self, like: Any, device: torch.device) -> None:
        self.writer = _DictWriter(like, device)

    def open(self, state: MergeState) -> _DictWriter:
        return self.writer


class _InMemory:
    """Runs a pass over sources already in memory: no prefetch thread and no host staging buffers."""

    def run_pass(self, runner: Any, advance: Any) -> tuple[Any, ScanSums | None]:
        w, p = runner.worker, runner.p
        sums = p.sums().to(w.device)
        scan = ScanSums().to(w.device) if runner.scan else None
        for u in runner.units():
            if isinstance(u, Streamed):
                w.streamed(p, u, sums, scan)
                continue
            data = {role: [w.store.get(k, rows=u.rows) if role == "kept" else
                           w.sources[role].read(k, rows=u.rows).to(w.device) for k in u.keys]
                    for role in runner.reads}
            w.process(p, u, data, sums, scan)
            advance(u.input_bytes)
        return sums, scan


class Merger:
    """Continual merging in memory: ``add`` folds one model (nn.Module or state dict) into the merge.

    ``base``: an ``nn.Module`` or a state dict. ``method`` and ``params``: as ``merge_stream``
    (``opcm`` with ``alpha``, ``task_arithmetic``/``ties`` with ``lam``, ...). ``device``: where
    to compute and keep the merged weights (default: the base's device). ``memory_budget``: the
    working set of one group (default: half the available memory, or 80% of the GPU's free
    memory less the step's own tensors): larger groups batch more same-shape SVDs.
    """

    def __init__(self, base: torch.nn.Module | Mapping[str, torch.Tensor], method: str = "opcm", *,
                 device: str | torch.device | None = None, backend: str = "auto", projected: Sequence[str] = (),
                 averaged: Sequence[str] = (), config: Any = None, memory_budget: str | int | None = None,
                 **params: Any) -> None:
        tensors, self._aliases, self._order, module = _tensors_of(base, "base")
        self._config_json = _config_json(config if config is not None else getattr(module, "config", None))
        self.device = torch.device(device) if device is not None else _device_of(tensors)
        self.ops = ops.select(self.device, backend)
        self.device = self.ops.device
        if self.ops.reason:
            log.warning("%s", self.ops.reason)
        self.method, self.params = method, dict(params)
        resolve_method(None, method, dict(params), False, None)  # unknown method or parameter: fail here, not at add()
        self.classification = _classify(module, self._config_json, tensors, projected, averaged)
        self.memory_budget = parse_size(memory_budget) if memory_budget is not None else None
        self._base = MemorySource(tensors, "base")
        self._base_name = _name_of(module) or "base"
        self._merged: dict[str, torch.Tensor] | None = None
        self._allow_param_change = False
        #: The merge state after the last ``add`` (None before the first).
        self.state: MergeState | None = None

    # -- merging ----------------------------------------------------------------------------------
    def add(self, model: torch.nn.Module | Mapping[str, torch.Tensor], name: str | None = None, *,
            allow_duplicate: bool = False) -> MergeReport:
        """Fold ``model`` into the merge (one step); returns the step's report."""
        tensors, _, _, module = _tensors_of(model, "model")
        step = (self.state.step if self.state else 0) + 1
        new_name = name or _name_of(module) or f"model-{step}"
        readers: dict[str, Any] = {"base": self._base}
        if self._merged is not None:
            readers["merged"] = MemorySource(self._merged, "merged")
        readers["new"] = MemorySource(tensors, new_name)
        paths = {"base": "(in memory)", "merged": f"the merger (step {step - 1})", "new": repr(new_name)}
        rss = RssSampler().start()
        try:
            setup = prepare_step(readers, paths, self.state, method=self.method, params=dict(self.params),
                                 allow_param_change=self._allow_param_change, allow_duplicate=allow_duplicate,
                                 where=Path(paths["merged"]))
            setup.info.nonleaf = frozenset(self.classification.nonleaf)
            infos = {k: (tuple(i.shape), sum(r.info(k).dtype.itemsize for r in readers.values()))
                     for k, i in ((k, self._base.info(k)) for k in self._base.keys())}
            setup.info.shapes = {k: shape for k, (shape, _) in infos.items()}
            floating = kept_shapes(self.classification, setup.like)
            budget = self._budget(floating, setup.like)
            plan = make_plan(self.classification, infos, budget, setup.method)
            sink = _DictSink(setup.like, self.device)
            job = StepJob(method=setup.method, info=setup.info, sources=readers, like=setup.like,
                          classification=self.classification, plan=plan, ops=self.ops, sink=sink,
                          make_store=lambda _allowance: DeviceStore(floating, self.device),
                          state=lambda: setup.state(self._base_name, new_name), names=paths, executor=_InMemory())
            result = run_step(job)
        finally:
            rss.stop()
        missing = set(self._base.keys()) - set(sink.writer.tensors)
        assert not missing, f"the step wrote no output for {sorted(missing)[:5]}"
        self._merged, self.state = sink.writer.tensors, result.state
        self.params = dict(result.state.params)
        return step_report(result, self.classification, output=None, device=self.device, native=self.ops.native,
                           budget=budget, rss=rss)

    def _budget(self, floating: dict[str, tuple[int, ...]], like: Any) -> int:
        """The given budget, else what the device has free less Σ and the output this step allocates."""
        if self.memory_budget is not None:
            return self.memory_budget
        reserve = 4 * sum(_numel(s) for s in floating.values()) + like.total_bytes
        if self.device.type == "cuda":
            free = int(torch.cuda.mem_get_info(self.device)[0] * GPU_MEMORY_SHARE)
        else:
            free = _available_ram() // 2
        return max(free - reserve, 256 << 20)

    # -- results ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged weights (the inputs' stored dtypes, on the merger's device), under every name of the base."""
        merged = self._require_merged()
        return {k: merged[self._aliases.get(k, k)] for k in self._order}

    def _require_merged(self) -> dict[str, torch.Tensor]:
        if self._merged is None:
            raise MergeStateError("nothing is merged yet: call merger.add(model) first.")
        return self._merged

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False,
             max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
        """Write the merge as a safetensors folder (state in the metadata, config.json when known) that ``opcm step`` continues."""
        merged = self._require_merged()
        assert self.state is not None
        out = Path(path)
        if out.exists() and not overwrite:
            raise OutputError(f"{out} already exists; pass overwrite=True to replace it.")
        keys = [k for k in self._order if k not in self._aliases]
        layout = _shards(keys, merged, parse_size(max_shard_size))
        total = sum(merged[k].numel() * merged[k].element_size() for k in keys)
        with io.OutputTransaction(out, kind="folder", expected_bytes=total) as tx:
            writer = tx.writer(layout, dict(self.state.to_metadata()))
            for k in keys:
                writer.write(k, merged[k].detach().to("cpu").contiguous())
            if self._config_json is not None:
                (tx.tmp / "config.json").write_text(self._config_json, encoding="utf-8")
            tx.commit()
        return out

    @classmethod
    def load(cls, base: torch.nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike[str], *,
             method: str | None = None, device: str | torch.device | None = None, backend: str = "auto",
             projected: Sequence[str] = (), averaged: Sequence[str] = (), config: Any = None,
             memory_budget: str | int | None = None, allow_param_change: bool = False, **params: Any) -> "Merger":
        """Resume a merge saved by ``Merger.save`` or written by ``opcm merge``/``opcm step`` (any opcm-ext output)."""
        with io.CheckpointReader(path) as r:
            state = state_of(r, str(path))
            if state is None:
                raise MergeStateError(f"{path} carries no opcm-ext merge state, so it cannot be resumed; start a "
                                      "Merger from the base and add the models instead.")
            m = resolve_method(state, method, dict(params), allow_param_change, Path(path))
            if config is None and not isinstance(base, torch.nn.Module) and r.config_path is not None:
                config = r.config_path
            merger = cls(base, m.name, device=device, backend=backend, projected=projected, averaged=averaged,
                         config=config, memory_budget=memory_budget, **m.values)
            src = merger._base
            where = {"base": "(in memory)", "merged": str(path)}
            check_identity(state, {"base": src}, where, {"base": src.content_identity()}, True)
            validate_inputs({"base": src, "merged": r}, where)
            merger._merged = {k: r.read(k).to(merger.device) for k in r.keys()}
        merger.state, merger._allow_param_change = state, allow_param_change
        return merger

    def __repr__(self) -> str:
        step = self.state.step if self.state else 0
        return f"Merger(method={self.method!r}, params={self.params}, step={step}, device={str(self.device)!r})"


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def _tensors_of(obj: Any, role: str) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], torch.nn.Module | None]:
    """(tensors under their first name, alias -> first name for shared storage, every name in order, the module)."""
    module = obj if isinstance(obj, torch.nn.Module) else None
    if module is not None:
        sd: Mapping[str, Any] = module.state_dict()
    elif isinstance(obj, Mapping):
        sd = obj
    else:
        raise ConfigError(f"the {role} must be a torch.nn.Module or a state dict (name -> tensor), got {type(obj).__name__}.")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, t in sd.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise ConfigError(f"the {role}'s state dict maps {k!r} to a {type(t).__name__}; it must map names to tensors.")
        if t.is_meta:
            raise ConfigError(f"tensor {k} of the {role} is on the meta device (no data); load the weights first.")
        t = t.detach()
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            aliases[k] = seen[ident]
            continue
        seen.setdefault(ident, k)
        tensors[k] = t
    if not tensors:
        raise ConfigError(f"the {role} has no tensors.")
    return tensors, aliases, list(sd.keys()), module


def _device_of(tensors: dict[str, torch.Tensor]) -> torch.device:
    floating = [t.device for t in tensors.values() if t.is_floating_point()]
    devices = set(floating or [t.device for t in tensors.values()])
    if len(devices) > 1:
        raise ConfigError(f"the base's tensors are on several devices ({', '.join(sorted(map(str, devices)))}); "
                          "pass device= to say where to merge.")
    return devices.pop()


def _name_of(module: torch.nn.Module | None) -> str | None:
    name = getattr(getattr(module, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def _config_json(config: Any) -> str | None:
    """config.json's text from a transformers config, a dict, a folder or a config.json path (None: unknown)."""
    if config is None:
        return None
    if hasattr(config, "to_json_string"):
        return config.to_json_string()
    if isinstance(config, Mapping):
        return json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        p = p / "config.json" if p.is_dir() else p
        try:
            text = p.read_text(encoding="utf-8")
            json.loads(text)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config={config!r}: cannot read {p} as JSON ({e}).") from None
        return text
    raise ConfigError(f"config must be a transformers config, a dict or a path to config.json, got {type(config).__name__}.")


def _classify(module: torch.nn.Module | None, config_json: str | None, tensors: dict[str, torch.Tensor],
              projected: Sequence[str], averaged: Sequence[str]) -> Classification:
    infos = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    if module is not None:
        return _module_kinds(module, infos, projected, averaged)
    if config_json is None:
        return classify(infos, None, projected=projected, averaged=averaged)
    with tempfile.TemporaryDirectory(prefix="opcm-config-") as d:  # plan.classify reads a config.json from a folder
        (Path(d) / "config.json").write_text(config_json, encoding="utf-8")
        return classify(infos, Path(d), projected=projected, averaged=averaged)


def _module_kinds(module: torch.nn.Module, infos: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                  projected: Sequence[str], averaged: Sequence[str]) -> Classification:
    """The module's own types decide (Linear/Conv1D weights projected); overrides as ``plan.classify`` applies them."""
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)  # loaded if the model uses it
    if isinstance(conv1d, type):
        linear_types += (conv1d,)
    linear, nonleaf = set(), set()
    for mname, mod in module.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, linear_types):
            linear.add(f"{prefix}weight")
        if next(mod.children(), None) is not None:
            nonleaf.update(prefix + n for n, _ in mod.named_parameters(recurse=False))
    over = classify(infos, None, projected=projected, averaged=averaged)  # validates and applies the overrides
    touched = {k for k in infos if any(re.search(p, k) for p in (*projected, *averaged))}
    kinds = {}
    for k, (dtype, shape) in infos.items():
        if k in touched:
            kinds[k] = over.kinds[k]
        elif not dtype.is_floating_point:
            kinds[k] = Kind.CARRIED
        else:
            kinds[k] = Kind.PROJECTED if k in linear and len(shape) == 2 else Kind.AVERAGED
    return Classification(kinds=kinds, source=f"module types ({type(module).__name__})", notes=over.notes,
                          nonleaf={k for k in nonleaf if k in kinds and kinds[k] is not Kind.CARRIED})


def _shards(keys: list[str], tensors: dict[str, torch.Tensor], limit: int) -> list[tuple[str, list[tuple[str, Any, Any]]]]:
    """save_pretrained's layout: model.safetensors, or model-0000i-of-0000n.safetensors shards of at most ``limit`` bytes."""
    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = tensors[k].numel() * tensors[k].element_size()
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    entries = [[(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in g] for g in groups]
    if len(entries) == 1:
        return [(io.SAFE_WEIGHTS_NAME, entries[0])]
    n = len(entries)
    return [(f"model-{i:05d}-of-{n:05d}.safetensors", e) for i, e in enumerate(entries, start=1)]
