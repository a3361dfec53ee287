"""Accuracy of a CLIP vision checkpoint with a fixed head: batched, on CPU or GPU.

A checkpoint is an HF folder (``config.json`` + ``model.safetensors`` or a sharded index) or a
bare ``.safetensors`` file next to a ``config.json``. Accepted layouts: ``CLIPVisionModel``
(transformers 4 ``vision_model.*`` keys or transformers 5 unprefixed keys),
``CLIPVisionModelWithProjection`` and a full ``CLIPModel`` (its text tower is ignored). A
checkpoint without ``visual_projection.weight`` (the public fine-tuned CLIPVisionModels) takes the
projection from the pre-trained CLIP model, exactly as the paper's evaluation does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from opcm_ext.errors import CheckpointError, ConfigError

__all__ = [
    "resolve_device",
    "read_state_dict",
    "read_vision_config",
    "VisionEncoder",
    "EncoderLoader",
    "accuracy_from_tensors",
    "accuracy_from_batches",
]

_IGNORED_PREFIXES = ("text_model.", "text_projection.", "logit_scale")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as torch understands it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors" and not path.name.endswith(".safetensors.index.json"):
            raise CheckpointError(f"{path}: not a .safetensors file or an HF model folder")
        if path.name.endswith(".index.json"):
            idx = json.loads(path.read_text())
            return [path.parent / f for f in dict.fromkeys(idx["weight_map"].values())]
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint (expected an HF model folder or a .safetensors file)")
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        return _weight_files(index)
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json in this folder")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (single or sharded safetensors) as CPU tensors."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(path)):
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in the index is missing")
        out.update(load_file(str(f)))
    return out


def read_vision_config(path: str | Path):
    """The CLIPVisionConfig of a checkpoint (CLIP vision model, or the vision part of a CLIPModel)."""
    from transformers import CLIPVisionConfig

    path = Path(path)
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: missing; evaluation needs the model's config.json")
    raw = json.loads(cfg_file.read_text())
    model_type = raw.get("model_type")
    if model_type == "clip":
        vision = dict(raw.get("vision_config") or {})
        vision["projection_dim"] = raw.get("projection_dim", vision.get("projection_dim", 512))
        return CLIPVisionConfig(**vision)
    if model_type == "clip_vision_model":
        return CLIPVisionConfig.from_dict(raw)
    raise CheckpointError(f"{cfg_file}: model_type {model_type!r} is not a CLIP model (clip or clip_vision_model)")


class VisionEncoder(torch.nn.Module):
    """CLIP vision tower + visual projection: pixel_values -> unit image embeddings."""

    def __init__(self, config):
        super().__init__()
        from transformers import CLIPVisionModel

        self.config = config
        self.vision = CLIPVisionModel(config)
        self.projection = torch.nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision(pixel_values=pixel_values).pooler_output
        return F.normalize(self.projection(pooled), dim=-1)

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], source: str,
                                projection: torch.Tensor | None = None) -> None:
        """Copy a checkpoint's tensors in, whatever its key layout (see the module docstring)."""
        own = self.vision.state_dict()
        found: dict[str, torch.Tensor] = {}
        proj = None
        for key, t in tensors.items():
            if key.startswith(_IGNORED_PREFIXES):
                continue
            if key == "visual_projection.weight":
                proj = t
                continue
            k = key[len("vision_model."):] if key.startswith("vision_model.") else key
            if k in own:
                found[k] = t
            elif not k.endswith("position_ids"):
                raise CheckpointError(f"{source}: unexpected tensor {key!r} for a CLIP vision model")
        missing = sorted(set(own) - set(found) - {k for k in own if k.endswith("position_ids")})
        if missing:
            raise CheckpointError(f"{source}: missing tensors for a CLIP vision model: {', '.join(missing[:5])}"
                                  + (" ..." if len(missing) > 5 else ""))
        if proj is None:
            proj = projection
        if proj is None:
            raise CheckpointError(f"{source}: no visual_projection.weight; give the pre-trained CLIP model "
                                  "to take the projection from")
        with torch.no_grad():
            for k, t in found.items():
                if own[k].shape != t.shape:
                    raise CheckpointError(f"{source}: tensor {k} has shape {tuple(t.shape)}, "
                                          f"config says {tuple(own[k].shape)}")
                own[k].copy_(t)
            if proj.ndim != 2 or proj.shape[1] != self.config.hidden_size:
                raise CheckpointError(f"{source}: visual projection has shape {tuple(proj.shape)}, "
                                      f"expected (projection_dim, {self.config.hidden_size})")
            if self.projection.weight.shape != proj.shape:  # projection_dim not in the vision config
                w = self.projection.weight
                self.projection = torch.nn.Linear(proj.shape[1], proj.shape[0], bias=False).to(w.device, w.dtype)
            self.projection.weight.copy_(proj)


class EncoderLoader:
    """Loads checkpoints into one reused VisionEncoder per architecture (fp32 compute)."""

    def __init__(self, *, device: str | torch.device = "cpu", projection_from: str | Path | None = None):
        self.device = resolve_device(device)
        self._encoders: dict[str, VisionEncoder] = {}
        self._projection_from = projection_from
        self._projection: torch.Tensor | None = None

    def _fallback_projection(self) -> torch.Tensor | None:
        if self._projection is None and self._projection_from is not None:
            tensors = read_state_dict(self._projection_from)
            if "visual_projection.weight" not in tensors:
                raise CheckpointError(f"{self._projection_from}: has no visual_projection.weight")
            self._projection = tensors["visual_projection.weight"]
        return self._projection

    def load(self, checkpoint: str | Path) -> VisionEncoder:
        config = read_vision_config(checkpoint)
        key = config.to_json_string()
        enc = self._encoders.get(key)
        if enc is None:
            enc = VisionEncoder(config).to(self.device).eval()
            self._encoders = {key: enc}  # keep one architecture alive at a time
        tensors = read_state_dict(checkpoint)
        proj = None if "visual_projection.weight" in tensors else self._fallback_projection()
        enc.load_checkpoint_tensors({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
                                    str(checkpoint), proj.float() if proj is not None else None)
        return enc


@torch.inference_mode()
def accuracy_from_batches(encoder: VisionEncoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          head: torch.Tensor, *, device: str | torch.device = "cpu", progress=None) -> float:
    """Top-1 accuracy of ``argmax(normalize(embed(x)) @ head.T)`` over (pixel_values, labels) batches."""
    device = torch.device(device)
    head = head.to(device=device, dtype=torch.float32)
    correct = total = 0
    for x, y in batches:
        pred = (encoder(x.to(device, torch.float32, non_blocking=True)) @ head.T).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += int(y.numel())
        if progress is not None:
            progress.update(int(y.numel()))
    if total == 0:
        raise ConfigError("cannot measure accuracy on an empty test set")
    return correct / total


def accuracy_from_tensors(encoder: VisionEncoder, pixels: torch.Tensor, labels: torch.Tensor,
                          head: torch.Tensor, *, batch_size: int = 256,
                          device: str | torch.device = "cpu") -> float:
    """Accuracy over preprocessed pixel tensors held in memory."""
    batches = ((pixels[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(labels), batch_size))
    return accuracy_from_batches(encoder, batches, head, device=device)
