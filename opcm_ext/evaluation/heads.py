"""CLIP zero-shot classification heads: class-name prompts through a full CLIP model's text tower.

For each class, every template is filled with the class name, embedded by the text encoder and
its projection, L2-normalised; the per-template embeddings are averaged and the mean normalised
again (CLIP's zero-shot recipe). The head is the (num_classes, projection_dim) matrix of those
class embeddings: fixed, never trained, the same for every merged checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from opcm_ext.errors import CheckpointError, ConfigError

__all__ = ["GENERIC_TEMPLATES", "TEMPLATES", "templates_for", "canonical_task", "ZeroShotHeadBuilder",
           "zeroshot_head"]

GENERIC_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def _photo_variants(*adjectives: str) -> tuple[str, ...]:
    """'a photo of a {}.' with each adjective ('' for none), with 'a' then with 'the'."""
    out = []
    for article in ("a", "the"):
        for adj in adjectives:
            out.append(f"a {adj + ' ' if adj else ''}photo of {article} {{}}.")
    return tuple(out)


_CIFAR = tuple(
    t for article in ("a", "the") for t in (
        f"a photo of {article} {{}}.", f"a blurry photo of {article} {{}}.",
        f"a black and white photo of {article} {{}}.", f"a low contrast photo of {article} {{}}.",
        f"a high contrast photo of {article} {{}}.", f"a bad photo of {article} {{}}.",
        f"a good photo of {article} {{}}.", f"a photo of {article} small {{}}.", f"a photo of {article} big {{}}.")
)
_RESISC = tuple(f"{kind} {what} of {article}{{}}." for article in ("", "a ", "the ")
                for what in ("imagery", "photo", "view") for kind in ("satellite", "aerial"))

# The prompt templates the paper's evaluation uses (CLIP's published prompts), keyed by the
# task names of the public checkpoints (``tanganke/clip-vit-base-patch32_<task>``), in the
# canonical form of ``canonical_task`` (lower case, '-' -> '_').
TEMPLATES: dict[str, tuple[str, ...]] = {
    "sun397": ("a photo of a {}.", "a photo of the {}."),
    "stanford_cars": ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
                      "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
                      "a photo of my old {}."),
    "resisc45": _RESISC,
    "eurosat": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "svhn": ('a photo of the number: "{}".',),
    "gtsrb": ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'),
    "mnist": ('a photo of the number: "{}".',),
    "dtd": tuple(f"a photo of {a} {{}} {w}." for a in ("a", "the") for w in ("texture", "pattern", "thing", "object")),
    "oxford_flowers102": ("a photo of a {}, a type of flower.",),
    "pcam": ("this is a photo of {}",),
    "fer2013": ("a photo of a {} looking face.", "a photo of a face showing the emotion: {}.",
                "a photo of a face looking {}.", "a face that looks {}.", "they look {}.", "look at how {} they are."),
    "oxford_iiit_pet": ("a photo of a {}, a type of pet.",),
    "stl10": ("a photo of a {}.", "a photo of the {}."),
    "cifar100": _CIFAR,
    "cifar10": _CIFAR,
    "food101": ("a photo of {}, a type of food.",),
    "fashion_mnist": ("a photo of a {}.", "a photo of the {}."),
    "emnist_letters": ('a photo of the digit character: "{}".',),
    "kmnist": ("a photo of the character {}.",),
    "rendered_sst2": ("a {} review of a movie.",),
}
_ALIASES = {"cars": "stanford_cars", "flowers102": "oxford_flowers102", "oxford_pets": "oxford_iiit_pet",
            "oxfordiiitpet": "oxford_iiit_pet", "emnist": "emnist_letters", "fashionmnist": "fashion_mnist",
            "renderedsst2": "rendered_sst2", "sst2": "rendered_sst2"}


def canonical_task(name: str) -> str:
    """Lower case, '-' and ' ' -> '_', known aliases resolved ('stanford-cars' -> 'stanford_cars')."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return _ALIASES.get(key, key)


def templates_for(task: str) -> tuple[str, ...]:
    """The paper's templates for a task name, or the generic ``'a photo of a {}.'``."""
    return TEMPLATES.get(canonical_task(task), GENERIC_TEMPLATES)


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
