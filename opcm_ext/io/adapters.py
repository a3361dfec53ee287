"""A PEFT LoRA adapter folder seen as the fine-tuned model it describes, one block at a time.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) holds, for each
targeted module, two small matrices A (r x in) and B (out x r). :class:`AdapterReader` has the
reading interface of :class:`~opcm_ext.io.CheckpointReader` and returns, for every tensor of the
base, ``base + scaling · B @ A`` on the targeted modules and the base tensor elsewhere, computed
in float32 for exactly the rows (or columns) asked for and rounded once to the base's dtype. No
full-size tensor of the adapted model is ever written anywhere.

PEFT's conventions (peft 0.21): ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), with per-module ``r`` and ``lora_alpha`` from ``rank_pattern``/``alpha_pattern``;
with ``fan_in_fan_out`` (GPT-2's ``Conv1D`` stores weights as in x out) and for embeddings the
delta is ``(B @ A)ᵀ``; ``lora_B.bias`` (``lora_bias``) adds ``scaling · bias``. Other tensors in
the file (``modules_to_save``, biases trained with ``bias="all"``, saved embedding layers) replace
the base's tensor of that name. Keys are ``base_model.model.<module>.lora_A.weight`` (also with an
adapter name, ``lora_A.default.weight``), matched to the base's keys when one name is a dotted
suffix of the other (transformers 4 saved CLIP vision towers under ``vision_model.``).

Refused with a CheckpointError naming the type: every ``peft_type`` but LORA (prompt tuning,
IA3, LoHa, LoKr, AdaLoRA, ...), LoRA variants whose merge is not ``scaling · B @ A`` (DoRA,
QALoRA, aLoRA, ...), initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoftQ:
re-save those with PEFT's ``path_initial_model_for_weight_conversion``), convolution LoRA, and
unknown config keys that are set.

Checked against the base: every targeted module and replaced tensor must exist there with the
right shape (an IncompatibleCheckpointError otherwise). The base named in ``base_model_name_or_path``
is compared by name with the base folder, its Hugging Face cache path and its config's
``_name_or_path``; a mismatch of names is a *warning* (``reader.warnings``), not an error: local
copies and hub snapshots rarely keep the hub name, while the shapes are checked exactly.

The identity (``content_identity``) is the adapter's own: its tensors' content hash and the
scaling of each module, never the materialised model.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, IncompatibleCheckpointError
from .dtypes import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from .hashing import content_hash, hash_tensors
from .reader import CheckpointReader, TensorInfo

__all__ = ["AdapterReader", "LoraTarget", "is_adapter", "open_model", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_IDENTITY_FORMAT = 1  # bump when what content_identity covers changes

#: Config keys that do not change the task vector the tensors describe (or are checked below).
_KNOWN_KEYS = frozenset({
    "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "auto_mapping",
    "inference_mode", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "bias",
    "lora_bias", "lora_dropout", "init_lora_weights", "eva_config", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "loftq_config", "corda_config", "lora_ga_config", "use_dora", "use_qalora",
    "alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config", "monteclora_config", "kasa_config",
    "layer_replication", "target_parameters", "trainable_token_indices", "megatron_config",
})
#: Set config keys whose adapters are not ``base + scaling · B @ A``: key -> what to call it.
_REFUSED = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "megatron_config": "Megatron-parallel LoRA (megatron_config)",
    "loftq_config": "LoftQ (loftq_config), which changes the base weights",
    "lora_ga_config": "LoRA-GA (lora_ga_config), which changes the base weights",
}
#: init_lora_weights values that leave the base weights as they are (the others rewrite them: PiSSA, OLoRA, ...).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")

_LORA_KEY = re.compile(r"(?P<mod>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.(?P<param>weight|bias)")
_EMBED_KEY = re.compile(r"(?P<mod>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<name>[^.]+))?")
_PREFIX = "base_model.model."


def _has_full_weights(folder: Path) -> bool:
    return (folder / SAFE_WEIGHTS_NAME).is_file() or (folder / SAFE_WEIGHTS_INDEX_NAME).is_file()


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PEFT adapter: a folder with adapter_config.json (and no full model), or its weights file."""
    p = Path(path)
    if p.is_dir():
        return (p / ADAPTER_CONFIG_NAME).is_file() and not _has_full_weights(p)
    return p.name == ADAPTER_WEIGHTS_NAME and (p.parent / ADAPTER_CONFIG_NAME).is_file()


def open_model(path: str | os.PathLike[str], base_reader: CheckpointReader | None = None) -> Any:
    """A reader of the model at ``path``: a checkpoint, or a PEFT LoRA adapter applied to ``base_reader``."""
    if is_adapter(path):
        if base_reader is None:
            raise ConfigError(f"{path} is a LoRA adapter; open it with the base model it was trained on.")
        return AdapterReader(path, base_reader)
    return CheckpointReader(path)


@dataclass(frozen=True)
class LoraTarget:
    """One targeted weight: delta = scaling · B @ A, transposed for fan_in_fan_out and embeddings."""

    module: str  # the module's name in the adapter (for messages and the identity)
    a: str  # tensor names in the adapter file
    b: str
    scaling: float
    transposed: bool


@dataclass
class _Edit:
    """What the adapter does to one base tensor."""

    replace: str | None = None  # an adapter tensor that replaces the base's (modules_to_save, trained biases)
    lora: LoraTarget | None = None  # a low-rank delta on a weight
    bias: tuple[str, float] | None = None  # lora_B.bias and its scaling, added to a bias


class AdapterReader:
    """A PEFT LoRA adapter over an open base checkpoint, read like the checkpoint it stands for.

    ``keys``/``info`` are the base's (same names, shapes and dtypes); ``read``/``read_columns``
    compute the adapted rows or columns on demand; ``layout``/``folder``/``config_path`` are the
    base's, so an output mirroring this model looks like the base. The base reader stays the
    caller's (``close`` closes only the adapter's file).
    """

    def __init__(self, path: str | os.PathLike[str], base: CheckpointReader, *, own_base: bool = False) -> None:
        p = Path(os.path.abspath(os.fspath(path)))
        folder = p if p.is_dir() else p.parent
        self.path: Path = folder
        self.base = base
        self._own_base = own_base
        self.warnings: list[str] = []
        self.config = _read_config(folder)
        _check_config(self.config, folder)
        weights = folder / ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(
                f"{folder} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}"
                + (" (only a pickled adapter_model.bin, which opcm-ext does not load; re-save it with "
                   "safe_serialization=True)" if (folder / "adapter_model.bin").exists() else "")
                + "; the adapter is incomplete."
            )
        self._inner = CheckpointReader(weights)
        try:
            self._edits = _plan_edits(self.config, self._inner, base, folder)
            note = _base_name_mismatch(self.config.get("base_model_name_or_path"), base)
            if note:
                self.warnings.append(f"the adapter {folder} was trained on {note}; its shapes match this base, so it "
                                     "is merged: check that it is the same model")
        except BaseException:
            self._inner.close()
            raise
        self._identity: str | None = None

    # -- what the engine and the API read --------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names: the base's."""
        return self.base.keys()

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def info(self, name: str) -> TensorInfo:
        """The base tensor's dtype and shape (the adapted tensor is stored like it)."""
        return replace(self.base.info(name), file=self._inner.path)

    @property
    def folder(self) -> Path | None:
        """The base's folder: an output laid out like this model copies the base's config and tokenizer."""
        return self.base.folder

    @property
    def is_folder(self) -> bool:
        return self.base.is_folder

    @property
    def config_path(self) -> Path | None:
        return self.base.config_path

    @property
    def layout(self) -> list[tuple[str, list[str]]]:
        return self.base.layout

    @property
    def total_bytes(self) -> int:
        """Bytes of the model this adapter stands for (the base's size)."""
        return self.base.total_bytes

    @property
    def targets(self) -> dict[str, str]:
        """Base tensor name -> what the adapter does to it ("lora", "replace", "replace+lora", "bias")."""
        out = {}
        for k, e in self._edits.items():
            parts = [n for n, v in (("replace", e.replace), ("lora", e.lora), ("bias", e.bias)) if v is not None]
            out[k] = "+".join(parts)
        return out

    @property
    def loras(self) -> dict[str, LoraTarget]:
        """Base tensor name -> the low-rank delta on it (adapter tensors, scaling, orientation)."""
        return {k: e.lora for k, e in self._edits.items() if e.lora is not None}

    def read(self, name: str, out: torch.Tensor | None = None, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The adapted tensor (or rows [r0, r1) of it) in the base's dtype; into ``out`` (uint8) if given."""
        return self._block(name, rows, None, out)

    def read_columns(self, name: str, c0: int, c1: int, out: torch.Tensor | None = None, *,
                     rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Columns [c0, c1) of an adapted 2-D tensor (of rows [r0, r1) if given)."""
        return self._block(name, rows, (c0, c1), out)

    def content_identity(self) -> str:
        """The adapter's identity: its tensors' content hash and each module's scaling (not the adapted model)."""
        if self._identity is None:
            scalings = {e.lora.module: [e.lora.scaling, e.lora.transposed] for e in self._edits.values() if e.lora}
            scalings.update({f"{k}#bias": [e.bias[1]] for k, e in self._edits.items() if e.bias})
            doc = json.dumps({"format": _IDENTITY_FORMAT, "tensors": content_hash(self._inner), "scaling": scalings},
                             sort_keys=True).encode()
            self._identity = hash_tensors({"opcm-ext/peft-lora-adapter": torch.frombuffer(bytearray(doc), dtype=torch.uint8)})
        return self._identity

    def close(self) -> None:
        """Close the adapter's file (and the base when this reader opened it)."""
        self._inner.close()
        if self._own_base:
            self.base.close()

    def __enter__(self) -> AdapterReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # another process (a Ray worker) re-opens the adapter and its base from their paths
        return (_reopen, (str(self.path), str(self.base.path)))

    def __repr__(self) -> str:
        return f"AdapterReader({str(self.path)!r}, base={str(self.base.path)!r}, targets={len(self._edits)})"

    # -- computing blocks -----------------------------------------------------------------------
    def _block(self, name: str, rows: tuple[int, int] | None, cols: tuple[int, int] | None,
               out: torch.Tensor | None) -> torch.Tensor:
        edit = self._edits.get(name)
        if edit is None:  # untouched by the adapter: the base's bytes, as they are
            if cols is None:
                return self.base.read(name, out=out, rows=rows)
            return self.base.read_columns(name, *cols, out=out, rows=rows)
        dtype = self.base.info(name).dtype
        src, key = (self._inner, edit.replace) if edit.replace is not None else (self.base, name)
        x = src.read(key, rows=rows) if cols is None else src.read_columns(key, *cols, rows=rows)
        if edit.lora is not None or edit.bias is not None:
            y = x.to(torch.float32)
            if edit.lora is not None:
                left, right = self._factors(edit.lora, rows, cols)
                y = torch.addmm(y, left, right, alpha=edit.lora.scaling)  # y + scaling · left @ right, one pass
            if edit.bias is not None:
                y = y + edit.bias[1] * self._inner.read(edit.bias[0], rows=rows).to(torch.float32)
            x = y
        x = x.to(dtype)
        if out is None:
            return x
        nbytes = x.numel() * x.element_size()
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < nbytes:
            raise ValueError(f"out must be a contiguous CPU torch.uint8 tensor of at least {nbytes} bytes")
        view = out.view(-1)[:nbytes].view(dtype).view(x.shape)
        view.copy_(x)
        return view

    def _factors(self, lora: LoraTarget, rows: tuple[int, int] | None,
                 cols: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (left, right) with left @ right = (B @ A, or its transpose) restricted to ``rows`` x ``cols``."""
        r = self._inner
        if not lora.transposed:  # B @ A: rows of B, columns of A
            left = r.read(lora.b, rows=rows)
            right = r.read(lora.a) if cols is None else r.read_columns(lora.a, *cols)
        else:  # (B @ A)ᵀ = Aᵀ @ Bᵀ: columns of A, rows of B
            left = (r.read(lora.a) if rows is None else r.read_columns(lora.a, *rows)).mT
            right = (r.read(lora.b) if cols is None else r.read(lora.b, rows=cols)).mT
        return left.to(torch.float32), right.to(torch.float32)


def _reopen(path: str, base_path: str) -> AdapterReader:
    return AdapterReader(path, CheckpointReader(base_path), own_base=True)


# ---------------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG_NAME
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {ADAPTER_CONFIG_NAME}; it is not a PEFT adapter folder.") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e}); re-save the adapter with save_pretrained.") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-save the adapter with save_pretrained.")
    return cfg


def _check_config(cfg: dict[str, Any], folder: Path) -> None:
    """Refuse every adapter whose merge is not base + scaling · B @ A, naming what it is."""
    where = folder / ADAPTER_CONFIG_NAME
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(
            f"{folder} is a PEFT {kind or 'adapter of unknown type'} adapter (peft_type in {ADAPTER_CONFIG_NAME}); "
            "opcm-ext merges LoRA adapters (peft_type LORA) only. Merge it into the base with PEFT "
            "(merge_and_unload) and pass the saved model instead."
        )
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise CheckpointError(
                f"{folder} is a LoRA adapter with {what}, which is not base + scaling · B @ A; opcm-ext does not "
                "merge it. Merge it into the base with PEFT (merge_and_unload) and pass the saved model instead."
            )
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise CheckpointError(
            f"{folder} was initialised with init_lora_weights={init!r}, which rewrites the base weights (or is a "
            "variant), so it does not apply to the original base; re-save it with PEFT's "
            "path_initial_model_for_weight_conversion, or merge it with merge_and_unload and pass the saved model."
        )
    unknown = sorted(k for k, v in cfg.items() if k not in _KNOWN_KEYS and v not in (None, False, [], {}, ""))
    if unknown:
        raise CheckpointError(
            f"{where} sets {', '.join(f'{k}={cfg[k]!r}' for k in unknown)}, which opcm-ext does not know and which "
            "may change how the adapter applies; merge it with PEFT (merge_and_unload) and pass the saved model."
        )
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {v!r}.")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise CheckpointError(f"{where}: {key} must be an object mapping module patterns to numbers.")


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """PEFT's rule: the first pattern p with ``re.match(rf"(.*\\.)?({p})$", module)`` wins."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return float(v)
    return default


def _scaling(cfg: dict[str, Any], module: str) -> tuple[int, float]:
    """(r, scaling) of one module as PEFT computes it."""
    r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
    return int(r), alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


# ---------------------------------------------------------------------------------------------
# adapter tensors -> edits of base tensors
# ---------------------------------------------------------------------------------------------


def _strip(name: str) -> str:
    name = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
    return name.replace(".base_layer.", ".")


class _KeyMatch:
    """Adapter names -> base keys: equal, or one a dotted suffix of the other, and unique."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = set(keys)
        self.ending: dict[str, set[str]] = {}  # "a.b" -> base keys that end with ".a.b"
        for k in keys:
            parts = k.split(".")
            for i in range(1, len(parts)):
                self.ending.setdefault(".".join(parts[i:]), set()).add(k)

    def find(self, name: str) -> str | None:
        """The one base key that matches ``name``, else None (absent or ambiguous)."""
        if name in self.keys:
            return name
        parts = name.split(".")
        hits = set(self.ending.get(name, ())) | {s for s in (".".join(parts[i:]) for i in range(1, len(parts))) if s in self.keys}
        return hits.pop() if len(hits) == 1 else None


def _plan_edits(cfg: dict[str, Any], inner: CheckpointReader, base: CheckpointReader, folder: Path) -> dict[str, _Edit]:
    """Base key -> its edit, with every shape checked against the base."""
    match = _KeyMatch(base.keys())
    names: set[str] = set()
    pairs: dict[str, dict[str, str]] = {}  # module -> {"A"/"B"/"B.bias"/"embedding": adapter key}
    edits: dict[str, _Edit] = {}

    def target(t: str, what: str) -> str:
        k = match.find(t)
        if k is None:
            raise IncompatibleCheckpointError(
                f"the adapter {folder} {what} {t}, which the base {base.path} does not have (or has more than once); "
                "the adapter was trained on another architecture: pass the base it was trained on."
            )
        return k

    for key in inner.keys():
        m = _LORA_KEY.fullmatch(key) or _EMBED_KEY.fullmatch(key)
        if m is None:  # a full tensor: modules_to_save, a trained bias, a saved embedding layer
            k = target(_strip(key), "saves the tensor")
            e = edits.setdefault(k, _Edit())
            if e.replace is not None:
                raise CheckpointError(f"{folder}: {e.replace} and {key} both replace the base's {k}; re-save the adapter.")
            e.replace = key
            continue
        if m["name"]:
            names.add(m["name"])
        part = m["part"].replace("lora_embedding_", "embedding_").replace("lora_", "")
        if m.groupdict().get("param") == "bias":
            part += ".bias"
        pairs.setdefault(_strip(m["mod"]), {})[part] = key
    if len(names) > 1:
        raise CheckpointError(f"{folder} holds several adapters ({', '.join(sorted(names))}); save each one on its own.")
    if not pairs and not edits:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS_NAME} holds no LoRA tensors.")
    for module, parts in sorted(pairs.items()):
        emb = "embedding_A" in parts or "embedding_B" in parts
        a, b = (parts.get("embedding_A"), parts.get("embedding_B")) if emb else (parts.get("A"), parts.get("B"))
        if a is None or b is None:
            raise CheckpointError(f"{folder}: module {module} has lora_{'A' if a is None else 'B'} missing; the adapter file is incomplete.")
        r, scaling = _scaling(cfg, module)
        ia, ib = inner.info(a), inner.info(b)
        if len(ia.shape) != 2 or len(ib.shape) != 2:
            raise CheckpointError(f"{folder}: module {module} is a convolution LoRA ({list(ia.shape)}); opcm-ext merges "
                                  "LoRA on linear and embedding layers only.")
        if ia.shape[0] != r or ib.shape[1] != r:
            raise CheckpointError(f"{folder}: module {module} has rank {ia.shape[0]} x {ib.shape[1]} in its tensors but "
                                  f"r={r} in {ADAPTER_CONFIG_NAME} (rank_pattern); the adapter is inconsistent.")
        transposed = emb or bool(cfg.get("fan_in_fan_out"))
        k = target(f"{module}.weight", "targets")
        want = (ia.shape[1], ib.shape[0]) if transposed else (ib.shape[0], ia.shape[1])
        if tuple(base.info(k).shape) != want:
            raise IncompatibleCheckpointError(
                f"the adapter {folder} changes {k} by a {list(want)} matrix (module {module}), but the base {base.path} "
                f"holds it as {list(base.info(k).shape)}; the adapter belongs to another base model."
            )
        edits.setdefault(k, _Edit()).lora = LoraTarget(module, a, b, scaling, transposed)
        if "B.bias" in parts:
            kb = target(f"{module}.bias", "adds a lora_B bias to")
            edits.setdefault(kb, _Edit()).bias = (parts["B.bias"], scaling)
    for k, e in edits.items():
        for src in (e.replace, e.bias[0] if e.bias else None):
            if src is not None and tuple(inner.info(src).shape) != tuple(base.info(k).shape):
                raise IncompatibleCheckpointError(
                    f"the adapter {folder} holds {src} of shape {list(inner.info(src).shape)}, but the base's {k} is "
                    f"{list(base.info(k).shape)}; the adapter belongs to another base model (or resized it)."
                )
        if e.replace is not None and not inner.info(e.replace).dtype.is_floating_point:
            raise CheckpointError(f"{folder}: {e.replace} is not floating point; only weights can be replaced.")
    return edits


def _base_name_mismatch(recorded: Any, base: CheckpointReader) -> str | None:
    """None when the adapter's recorded base name fits ``base`` (or none is recorded), else how it differs."""
    if not isinstance(recorded, str) or not recorded.strip():
        return None
    recorded = recorded.strip().rstrip("/")
    folder = base.folder or base.path.parent
    if os.path.exists(recorded):
        try:
            if os.path.samefile(recorded, folder) or os.path.samefile(recorded, base.path):
                return None
        except OSError:
            pass
    names = {folder.name, base.path.name, base.path.stem}
    names |= {part.split("--", 1)[1].replace("--", "/") for part in folder.parts if part.startswith("models--")}
    if base.config_path is not None:
        try:
            own = json.loads(base.config_path.read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            own = None
        if isinstance(own, str) and own:
            names |= {own.rstrip("/"), Path(own.rstrip("/")).name}
    if recorded in names or Path(recorded).name in {Path(n).name for n in names}:
        return None
    return f"{recorded!r} (base_model_name_or_path), while the base given is {folder}"
