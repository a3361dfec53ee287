"""CLIP zero-shot classification heads: class-name prompts through a full CLIP model's text tower.

For each class, every template is filled with the class name, embedded by the text encoder and
its projection, L2-normalised; the per-template embeddings are averaged and the mean normalised
again (CLIP's zero-shot recipe). The head is the (num_classes, projection_dim) matrix of those
class embeddings: fixed, never trained, the same for every merged checkpoint. This is also how
FusionBench builds its heads (``HFCLIPClassifier.set_classification_task``). Class names and
templates of the paper's tasks come from ``prompts`` (FusionBench's curated lists, shipped as data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from opcm_ext.errors import CheckpointError, ConfigError
from opcm_ext.evaluation.prompts import GENERIC_TEMPLATES, canonical_task, prompts_for, templates_for

__all__ = ["GENERIC_TEMPLATES", "templates_for", "canonical_task", "ZeroShotHeadBuilder", "zeroshot_head",
           "build_task_heads"]


class ZeroShotHeadBuilder:
    """Holds a full CLIP model's text tower and tokenizer; ``head(classnames, templates)`` builds heads."""

    def __init__(self, clip_model: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 256):
        from transformers import AutoTokenizer, CLIPModel

        path = Path(clip_model)
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}: not a CLIP model folder (no config.json); zero-shot heads need the "
                                  "full pre-trained CLIP model (text encoder and tokenizer), e.g. "
                                  "openai/clip-vit-base-patch32 saved locally")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot load the CLIP tokenizer ({exc}); the folder needs the "
                                  "tokenizer files (vocab.json, merges.txt or tokenizer.json)") from exc
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot load a full CLIPModel ({exc}); zero-shot heads need the text "
                                  "tower, which fine-tuned vision-only checkpoints do not have") from exc
        self.device = torch.device(device)
        self.text_model = model.text_model.to(self.device).eval()
        self.text_projection = model.text_projection.to(self.device).eval()
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.batch_size = batch_size
        del model

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings, (len(texts), projection_dim)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            pooled = self.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
            out.append(F.normalize(self.text_projection(pooled).float(), dim=-1))
        return torch.cat(out)

    def head(self, classnames: Sequence[str], templates: Sequence[str] = GENERIC_TEMPLATES) -> torch.Tensor:
        """(num_classes, projection_dim): per class, the normalised mean of normalised template embeddings."""
        if not classnames:
            raise ConfigError("a zero-shot head needs at least one class name")
        if not templates or any("{}" not in t for t in templates):
            raise ConfigError(f"every template needs a '{{}}' for the class name: {list(templates)}")
        texts = [t.format(c) for c in classnames for t in templates]
        emb = self.embed_texts(texts).view(len(classnames), len(templates), -1)
        return F.normalize(emb.mean(dim=1), dim=-1).cpu()


def zeroshot_head(clip_model: str | Path, classnames: Sequence[str], templates: Sequence[str] = GENERIC_TEMPLATES,
                  *, device: str | torch.device = "cpu") -> torch.Tensor:
    """One-shot convenience around ``ZeroShotHeadBuilder``."""
    return ZeroShotHeadBuilder(clip_model, device=device).head(classnames, templates)


def build_task_heads(clip_model: str | Path, tasks: Sequence[str], *, device: str | torch.device = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """Heads of known tasks from their curated class names and templates alone (no test set needed)."""
    unknown = [t for t in tasks if prompts_for(t) is None]
    if unknown:
        raise ConfigError(f"no curated class names for task(s) {unknown}; a head for another task needs its test "
                          "set's class names (opcm eval / opcm reproduce build those from the dataset)")
    builder = ZeroShotHeadBuilder(clip_model, device=device)
    out = {}
    for t in tasks:
        p = prompts_for(t)
        assert p is not None
        out[canonical_task(t)] = builder.head(p.classnames, p.templates)
    return out
