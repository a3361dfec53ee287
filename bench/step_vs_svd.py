"""A whole `opcm step` process against its SVD floor, and the cost of refusing a duplicate, in one run.

On ViT-B/32-shaped checkpoints (tests/helpers.py make_family, transformers-4 key names, fp32):

1. `opcm step BASE MERGED NEW -o OUT` as a whole process (imports, hashing, classification,
   both passes, fsync, swap), minimum of --repeat runs;
2. the SVD phase alone, in a fresh process: `ops.thin_svd` of the merged task vector's 72 linear
   weights, batched by shape (what pass 1 decomposes), minimum of --repeat runs;
3. `opcm step BASE MERGED MODEL` where MODEL is already merged: the duplicate is refused (exit 2).

    python bench/step_vs_svd.py --workdir /tmp/b32 --json bench/results-step-svd-<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from measure import emit_json  # bench/, this script's folder

REPO = Path(__file__).resolve().parents[1]

SVD_ALONE = r"""
import json, sys, time, torch
from safetensors.torch import load_file
from opcm_ext import ops
from opcm_ext.plan import Kind, classify
base = load_file(sys.argv[1] + "/model.safetensors"); merged = load_file(sys.argv[2] + "/model.safetensors")
kinds = classify({k: (v.dtype, tuple(v.shape)) for k, v in base.items()}, __import__("pathlib").Path(sys.argv[1])).kinds
by_shape = {}
for k, kind in sorted(kinds.items()):
    if kind is Kind.PROJECTED:
        by_shape.setdefault(tuple(base[k].shape), []).append((merged[k].float() - base[k].float()))
batches = [torch.stack(v) for v in by_shape.values()]
sel = ops.select("cpu")
best = None
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    for b in batches:
        sel.thin_svd(b)
    dt = time.perf_counter() - t0
    best = dt if best is None else min(best, dt)
print(json.dumps({"svd_s": best, "matrices": sum(len(b) for b in batches)}))
"""


def run(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp")
    return time.perf_counter() - t0, r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/opcm-b32")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    work = Path(a.workdir)
    if not (work / "task3").exists():
        sys.path.insert(0, str(REPO / "tests"))
        sys.path.insert(0, str(REPO / "python"))
        from helpers import make_family, vit_b32_config

        make_family(work, vit_b32_config(), "CLIPVisionModel", 3, seed=0, prefix="vision_model.")
    opcm = [sys.executable, "-m", "opcm_ext"]
    merged = work / "merged-2"
    if not merged.exists():
        subprocess.run(opcm + ["merge", str(work / "base"), str(work / "task1"), str(work / "task2"), "-o", str(merged),
                               "--no-progress"], check=True, cwd="/tmp")
    steps = []
    for _ in range(a.repeat):
        wall, r = run(opcm + ["step", str(work / "base"), str(merged), str(work / "task3"), "-o", str(work / "out"),
                              "--overwrite", "--no-progress", "--json"])
        if r.returncode:
            raise SystemExit(r.stderr)
        rep = json.loads(r.stdout)
        steps.append({"process_s": wall, "step_total_s": rep["timings"]["total"], "svd_in_step_s": rep["timings"]["svd"],
                      "project_in_step_s": rep["timings"]["project"],
                      "peak_above_baseline_mib": rep["peak_above_baseline_bytes"] / 2**20})
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    r = subprocess.run([sys.executable, "-c", SVD_ALONE, str(work / "base"), str(merged), str(a.repeat)],
                       capture_output=True, text=True, env=env, cwd="/tmp", check=True)
    svd = json.loads(r.stdout.strip().splitlines()[-1])
    dup_wall, r = run(opcm + ["step", str(work / "base"), str(merged), str(work / "task1"), "-o", str(work / "dup"),
                              "--overwrite", "--no-progress"])
    assert r.returncode == 2 and "already merged" in r.stderr, r.stderr
    best = min(steps, key=lambda s: s["process_s"])
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "steps": steps,
        "svd_alone": svd, "duplicate_refused_process_s": dup_wall,
        "ratio_step_process_to_svd_alone": best["process_s"] / svd["svd_s"],
        "ratio_duplicate_to_step_process": dup_wall / best["process_s"],
    }
    emit_json(result, a.json)


if __name__ == "__main__":
    main()
