"""Build tiny Hugging Face checkpoints for tests: a base and fine-tunes = base + random task vectors."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]

import opcm_ref  # noqa: F401  (the pure-torch oracle, on pytest's pythonpath; tests import it from here)


def tiny_clip_vision_config(hidden=32, layers=2, inter=64, heads=4, image=32, patch=8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image, patch_size=patch)


def vit_b32_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512)


def tiny_clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=128, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, max_position_embeddings=32, tie_word_embeddings=False)


def build_model(config, cls_name: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    model.eval()
    return model


def projected_keys(model) -> set[str]:
    """Linear weights found by module type (independent of opcm_ext.plan)."""
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def make_family(root: Path, config, cls_name: str, n: int, *, seed: int = 0, scale: float = 0.02,
                dtype=torch.float32, prefix: str = "", max_shard_size=None):
    """Save a base and n fine-tunes (base + random task vectors) as HF folders; return paths and state dicts.

    ``prefix`` renames every key (e.g. "vision_model." as transformers 4 saved CLIPVisionModel).
    """
    root = Path(root)
    base_model = build_model(config, cls_name, seed)
    base_sd = {k: v.detach().clone().contiguous() for k, v in base_model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1000)
    sds = [base_sd]
    for i in range(n):
        sd = {}
        for k, v in base_sd.items():
            if v.is_floating_point():
                spread = max(float(v.std()) if v.numel() > 1 else 1.0, 0.1)
                sd[k] = (v + scale * spread * torch.randn(v.shape, generator=g)).contiguous()
            else:
                sd[k] = v.clone()
        sds.append(sd)
    paths = []
    for i, sd in enumerate(sds):
        name = "base" if i == 0 else f"task{i}"
        d = root / name
        save_hf(d, base_model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()},
                prefix=prefix, max_shard_size=max_shard_size)
        paths.append(d)
    return paths, base_model


def save_hf(folder: Path, model, sd: dict, *, prefix: str = "", max_shard_size=None) -> None:
    folder = Path(folder)
    if max_shard_size is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=False)
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        return
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_dicts(got: dict, want: dict, tol: float) -> None:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:5]
    worst = max(((rel_err(got[k], want[k]), k) for k in want if want[k].is_floating_point()), default=(0.0, None))
    assert worst[0] <= tol, f"max relative error {worst[0]:.3g} at {worst[1]} > {tol}"
    for k in want:
        if not want[k].is_floating_point():
            assert torch.equal(got[k], want[k]), k
        assert got[k].dtype == want[k].dtype, (k, got[k].dtype, want[k].dtype)


def run_cli(*args: str, check: bool = True, env=None) -> subprocess.CompletedProcess:
    # cwd outside the repository: `-m` puts the cwd on sys.path, and the installed package (with its
    # compiled modules) must be the one imported, not the source folder.
    proc = subprocess.run([sys.executable, "-m", "opcm_ext", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tempfile.gettempdir())
    if check and proc.returncode != 0:
        raise AssertionError(f"opcm {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr}")
    return proc


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too): byte identity of a checkpoint."""
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


_TEMP = re.compile(r"\.opcm-(tmp|old|scratch)")


def temporaries(folder: Path) -> list[str]:
    """Our temporaries beside ``folder`` or inside it (the lock file is not one)."""
    found = [n for n in os.listdir(folder.parent) if _TEMP.search(n)]
    if folder.is_dir():
        found += [f"{folder.name}/{n}" for n in os.listdir(folder) if _TEMP.search(n)]
    return sorted(found)


# -- safetensors test data (tests of opcm_ext.io) ----------------------------------------------------


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (every dtype, 0-d and empty tensors too)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(raw_bytes(a), raw_bytes(b))


def bytes_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random (any bit pattern, NaNs included)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    """For every safetensors dtype this torch has: a 3x5 matrix, a 0-d scalar and an empty tensor."""
    from opcm_ext.io import DTYPES

    ts = {}
    for i, (code, dt) in enumerate(sorted(DTYPES.items())):
        ts[f"t.{code}.mat"] = bytes_tensor(dt, (3, 5), seed=i)
        ts[f"t.{code}.scalar"] = bytes_tensor(dt, (), seed=100 + i)
        ts[f"t.{code}.empty"] = torch.empty((0, 4), dtype=dt)
    ts["t.BOOL.mat"] = torch.arange(15).reshape(3, 5) % 3 == 0  # real booleans, not random bytes
    return ts


def write_shards(folder: Path, shards: dict[str, dict[str, torch.Tensor]], metadata=None):
    """Write {shard file: {name: tensor}} with opcm_ext's SafetensorsWriter (an index when several shards)."""
    from opcm_ext.io import SafetensorsWriter

    layout = [(f, [(k, t.dtype, tuple(t.shape)) for k, t in ts.items()]) for f, ts in shards.items()]
    with SafetensorsWriter(folder, layout, metadata) as w:
        for ts in shards.values():
            for k, t in ts.items():
                w.write(k, t)
    return w
