"""Model hashing throughput: BLAKE3 (opcm_ext.io.content_hash) against opcm-ext 0.1's blake2b.

Builds a ViT-B/32-shaped fp32 checkpoint (CLIP vision tower, 87.8 M parameters, 351 MB),
reads it once so it is in the page cache, then times, best of ``--repeat``:

- ``read``: every tensor read with pread into a reused buffer (the floor under any hash);
- ``content_hash``: the product's identity (BLAKE3, multi-threaded, 64 MiB chunks), no cache;
- ``legacy_hash``: opcm-ext 0.1's identity (blake2b-16 per tensor, then combined), no cache;
- the bare hash functions over 64 MiB already in memory: blake2b, BLAKE3 on one thread, BLAKE3 AUTO.

Wall seconds and CPU seconds (all threads) are printed with GB/s. Run it on an idle machine:

    python bench/hash_throughput.py [--repeat 5] [--dir /tmp/opcm-hash-bench] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import blake3

from opcm_ext.io import CheckpointReader, content_hash, legacy_hash


def build(root: Path) -> Path:
    """A ViT-B/32 CLIP vision checkpoint under ``root`` (tests/helpers.py's vit_b32_config; built once)."""
    base = root / "base"
    if not (base / "model.safetensors").is_file():
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512)
        torch.manual_seed(0)
        CLIPVisionModel(cfg).save_pretrained(base)
    return base


def timed(fn, repeat: int) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run) of ``fn()``."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        best = min(best, (w, c))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/opcm-hash-bench")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = build(Path(args.dir))
    results = {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    with CheckpointReader(base) as r:
        n = r.total_bytes
        results["bytes"] = n
        results["params"] = sum(r.info(k).numel for k in r.keys())
        buf = memoryview(bytearray(max(r.info(k).nbytes for k in r.keys())))

        def read_all() -> None:
            for k in r.keys():
                r.read_into(k, 0, buf[: r.info(k).nbytes])

        read_all()  # into the page cache
        runs = {
            "read": read_all,
            "content_hash (blake3)": lambda: content_hash(r, cache=False),
            "legacy_hash (blake2b)": lambda: legacy_hash(r, cache=False),
        }
        for name, fn in runs.items():
            results[name] = timed(fn, args.repeat)
    data = os.urandom(64 << 20)
    mem = {
        "blake2b-16, 64 MiB in memory": lambda: hashlib.blake2b(data, digest_size=16).digest(),
        "blake3 1 thread, 64 MiB in memory": lambda: blake3.blake3(data).digest(),
        "blake3 AUTO, 64 MiB in memory": lambda: blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest(),
    }
    for name, fn in mem.items():
        results[name] = timed(fn, args.repeat)
    results["load_after"] = os.getloadavg()[0]
    print(f"{results['params'] / 1e6:.1f} M parameters, {n / 1e6:.0f} MB, {results['cpus']} CPUs, "
          f"load {results['load_before']:.1f} -> {results['load_after']:.1f}")
    for name, v in results.items():
        if isinstance(v, tuple):
            size = len(data) if "in memory" in name else n
            print(f"  {name:36s} {v[0]:7.3f} s wall ({size / v[0] / 1e9:5.2f} GB/s)   {v[1]:7.3f} s CPU "
                  f"({size / max(v[1], 1e-9) / 1e9:5.2f} GB/CPU-s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
