"""Tensor classes of docs/algorithm.md, "Tensor classes": projected, averaged, carried."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .tensors import StateDict, is_floating

__all__ = ["PROJECTED", "AVERAGED", "CARRIED", "classify", "classify_by_module", "nonleaf_parameter_keys"]

PROJECTED = "projected"
AVERAGED = "averaged"
CARRIED = "carried"


def classify(state_dict: StateDict, projected_keys: Iterable[str]) -> dict[str, str]:
    """Kinds from an explicit projected set: projected / other floating / non-floating."""
    projected_keys = set(projected_keys)
    unknown = sorted(projected_keys - set(state_dict))
    if unknown:
        raise ValueError(f"projected keys not in the state dict: {unknown[:5]}")
    kinds: dict[str, str] = {}
    for k in sorted(state_dict):
        v = state_dict[k]
        if not is_floating(v):
            # 3. carried: non-floating tensors (integer buffers such as
            #    `position_ids`).
            if k in projected_keys:
                raise ValueError(f"{k!r} is {v.dtype}; only floating tensors can be projected")
            kinds[k] = CARRIED
        elif k in projected_keys:
            # 1. projected: the 2-D `weight` of every `torch.nn.Linear` module.
            if v.dim() != 2:
                raise ValueError(f"{k!r} has shape {tuple(v.shape)}; projected tensors must be 2-D")
            kinds[k] = PROJECTED
        else:
            # 2. averaged: every other floating-point tensor.
            kinds[k] = AVERAGED
    return kinds


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [torch.nn.Linear]
    try:  # transformers' GPT-2 style Conv1D is a Linear with a transposed weight
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except Exception:  # pragma: no cover - transformers absent or changed
        pass
    return tuple(types)


def _matching_names(key: str, names: Iterable[str]) -> list[str]:
    """Model tensor names a checkpoint key stands for: itself, else by dotted suffix either way."""
    names = list(names)
    if key in names:
        return [key]
    return [n for n in names if key.endswith("." + n) or n.endswith("." + key)]


def classify_by_module(
    model: torch.nn.Module, state_dict_keys: Iterable[str] | StateDict
) -> dict[str, str]:
    """Kinds of checkpoint keys from the module types of `model` (meta device is fine).

    `state_dict_keys` may be a list of keys (floating-ness then comes from the
    model's own tensors) or a state dict (floating-ness from its tensors).
    Keys are matched to the model's parameter/buffer names exactly, else by
    dotted suffix (either side may carry an extra prefix such as
    `vision_model.`); an ambiguous match must agree on the kind.
    """
    # docs/algorithm.md, "Tensor classes": the class comes from the module types, not from
    # names. A model tensor is projected iff it is the 2-D `weight` of a
    # torch.nn.Linear (transformers' Conv1D counts as a Linear).
    linear = _linear_types()
    model_kind: dict[str, tuple[bool, bool]] = {}  # name -> (projected, floating)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        tensors = list(mod.named_parameters(recurse=False)) + list(
            mod.named_buffers(recurse=False)
        )
        for t_name, t in tensors:
            if t is None:
                continue
            name = prefix + t_name
            proj = isinstance(mod, linear) and t_name == "weight" and t.dim() == 2
            prev = model_kind.get(name)
            model_kind[name] = (proj or (prev[0] if prev else False), is_floating(t))

    given_dtypes = state_dict_keys if isinstance(state_dict_keys, Mapping) else None
    kinds: dict[str, str] = {}
    for key in sorted(state_dict_keys):
        cands = [model_kind[n] for n in _matching_names(key, model_kind)]
        if not cands:
            raise ValueError(
                f"checkpoint key {key!r} matches no parameter or buffer of "
                f"{type(model).__name__}; is this the right architecture?"
            )
        floating = (
            is_floating(given_dtypes[key]) if given_dtypes is not None else cands[0][1]
        )
        found = {
            CARRIED if not floating else (PROJECTED if proj else AVERAGED)
            for proj, _ in cands
        }
        if len(found) != 1:
            raise ValueError(
                f"checkpoint key {key!r} matches several model tensors of different "
                f"kinds {sorted(found)}; pass explicit projected keys to classify()"
            )
        kinds[key] = found.pop()
    return kinds


def nonleaf_parameter_keys(
    model: torch.nn.Module, state_dict_keys: Iterable[str] | None = None
) -> set[str]:
    """Parameters registered directly on a module that has child modules (meta device is fine).

    FusionBench's OPCM merges leaf modules only, so these are the tensors it never
    merges (CLIP vision: ``embeddings.class_embedding``). Buffers are not included.
    With ``state_dict_keys`` the result is given as those checkpoint keys (matched
    exactly, else by dotted suffix as in ``classify_by_module``, the longest model
    name winning: ``model.head.bias`` is ``head.bias``, not a top-level ``bias``);
    otherwise as the model's own parameter names.
    """
    found: set[str] = set()
    names: set[str] = set()
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = mod_name + "." if mod_name else ""
        own = [prefix + n for n, _ in mod.named_parameters(recurse=False)]
        names.update(own)
        names.update(prefix + n for n, _ in mod.named_buffers(recurse=False))
        if next(mod.children(), None) is not None:
            found.update(own)  # not a leaf: FusionBench never merges these
    if state_dict_keys is None:
        return found
    out = set()
    for key in state_dict_keys:
        cands = _matching_names(key, names)
        if cands and max(cands, key=len) in found:
            out.add(key)
    return out
