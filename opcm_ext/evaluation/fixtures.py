"""Tiny offline stand-ins for the real thing: a random CLIP model with a tokenizer, its fine-tuned
"copies", and ImageFolder test sets. Used by the tests and handy for a smoke run of
``opcm reproduce`` without the public checkpoints; nothing here is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["write_tiny_tokenizer", "make_tiny_clip", "make_tiny_finetuned", "make_image_folder"]


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer(folder: str | Path, merges: Sequence[tuple[str, str]] = (("t", "h"), ("th", "e</w>"))):
    """A byte-level CLIP tokenizer with a 514-token vocabulary (every byte, with and without ``</w>``)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=32)
    tok.save_pretrained(str(folder))
    return tok


def make_tiny_clip(folder: str | Path, *, image_size: int = 16, patch_size: int = 8, hidden: int = 32,
                   projection_dim: int = 16, layers: int = 2, seed: int = 0) -> Path:
    """A random full ``CLIPModel`` (text + vision) with tokenizer and image-processor config, saved as HF folder."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    tok = write_tiny_tokenizer(folder)
    torch.manual_seed(seed)
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                vocab_size=len(tok), max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size, num_channels=3)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    model.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True}, indent=1))
    return folder


def make_tiny_finetuned(clip_folder: str | Path, out: str | Path, *, seed: int, scale: float = 0.02,
                        legacy_prefix: bool = True) -> Path:
    """A ``CLIPVisionModel`` = the CLIP model's vision tower plus seeded noise, saved like the public checkpoints.

    ``legacy_prefix`` writes transformers-4 key names (``vision_model.*``), as the public checkpoints have.
    """
    from safetensors.torch import save_file

    from opcm_ext.evaluation.clip_eval import read_state_dict

    clip_folder, out = Path(clip_folder), Path(out)
    src = read_state_dict(clip_folder)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, v in src.items():
        if not k.startswith("vision_model."):
            continue
        name = k if legacy_prefix else k[len("vision_model."):]
        if v.is_floating_point():
            v = v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        tensors[name] = v.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((clip_folder / "config.json").read_text())
    vision = dict(cfg["vision_config"])
    vision.update({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"],
                   "projection_dim": cfg.get("projection_dim", 512)})
    (out / "config.json").write_text(json.dumps(vision, indent=1))
    return out


def make_image_folder(root: str | Path, classes: Sequence[str], *, per_class: int = 3, size: int = 20,
                      seed: int = 0, split: str | None = "test") -> Path:
    """``root[/split]/<class>/<i>.png``: small random RGB images, a different colour bias per class."""
    from PIL import Image

    root = Path(root)
    base = root / split if split else root
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        d = base / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size, size + 3, 3), dtype=np.uint8)
            arr[..., ci % 3] = np.clip(arr[..., ci % 3].astype(int) + 80, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return root
