"""An LLM-size acceptance run: a TinyLlama-1.1B-shaped sharded bf16 sequence merged within a small budget.

Builds random checkpoints with TinyLlama-1.1B's shapes (hidden 2048, intermediate 5632, 22
layers, 32 query / 4 key-value heads, vocabulary 32000, untied lm_head; bf16, sharded like the
hub's), merges base + 3 models with `opcm merge --memory-budget 512MB` for each method in a
fresh process, and checks every step's output against a tensor-by-tensor re-computation of the
reference math (python/opcm_ref's split rank and drop tolerance; the thin form of the projection
in float64, since a full SVD of the 32000 x 2048 lm_head needs a 32000 x 32000 U), chained in
bf16 like the merge. Records peak RSS above the interpreter's baseline, step times, the worst
relative error per method and that `LlamaForCausalLM.from_pretrained` loads the result.

    python bench/llm_scale.py --workdir /tmp/llm --json bench/results-llm-<date>.json [--layers 22]

It writes ~9 GB of checkpoints (plus ~2.2 GB per method and step) and takes about an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # a script: the reference beside it
import opcm_ref  # noqa: E402
from measure import emit_json  # noqa: E402  (bench/, this script's folder)

BF16_TOL = 1.6e-2  # the README's tolerance for bf16 checkpoints (rounding of the output dtype)


def llama_config(layers: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def shapes(cfg) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build(workdir: Path, cfg, n: int) -> list[Path]:
    """base and n fine-tunes (base + 1e-3-scale random task vectors), bf16, ~1 GB shards, with an index."""
    keys = shapes(cfg)
    paths = [workdir / "base"] + [workdir / f"ft{i}" for i in range(1, n + 1)]
    if all((p / "model.safetensors.index.json").exists() for p in paths):
        return paths
    order = sorted(keys)
    shards, cur, size = [], [], 0
    for k in order:
        cur.append(k)
        size += 2 * math.prod(keys[k])
        if size > 1 << 30:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    for i, p in enumerate(paths):
        p.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(p)
        wm = {}
        for j, part in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            sd = {}
            for k in part:
                g = torch.Generator().manual_seed(hash_key(k))
                base = torch.randn(keys[k], generator=g) * 0.02
                if "norm" in k:
                    base = base + 1.0
                if i:
                    gi = torch.Generator().manual_seed(hash_key(k) + 7919 * i)
                    base = base + 1e-3 * torch.randn(keys[k], generator=gi)
                sd[k] = base.to(torch.bfloat16)
                wm[k] = fname
            save_file(sd, str(p / fname), metadata={"format": "pt"})
        (p / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        print(f"built {p}", flush=True)
    return paths


def hash_key(k: str) -> int:
    return int.from_bytes(k.encode()[:8].ljust(8, b"\0"), "little") ^ len(k) * 1000003


class Folder:
    """Tensors of a sharded folder, one at a time, read with safetensors itself: the check does not
    trust opcm_ext's own reader (io.CheckpointReader) with the files it is checking."""

    def __init__(self, p: Path) -> None:
        index = p / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
        else:  # one shard: written without an index
            (f,) = [x.name for x in p.glob("*.safetensors")]
            with safe_open(str(p / f), "pt") as sf:
                wm = {k: f for k in sf.keys()}
        self.files = {k: str(p / f) for k, f in wm.items()}
        self.keys = sorted(wm)

    def get(self, k: str) -> torch.Tensor:
        with safe_open(self.files[k], "pt") as f:
            return f.get_tensor(k)


def merge(paths: list[Path], out: Path, method: str, budget: str) -> list[dict]:
    cmd = [sys.executable, "-m", "opcm_ext", "merge", *map(str, paths), "-o", str(out), "--method", method,
           "--memory-budget", budget, "--json", "--no-progress", "--device", "cpu", "--overwrite"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp")
    if r.returncode:
        raise SystemExit(f"opcm merge failed:\n{r.stderr}")
    reps = json.loads(r.stdout)
    reps = reps if isinstance(reps, list) else [reps]
    for rep in reps:
        rep["process_wall_s"] = time.perf_counter() - t0
    return reps


def thin_project(M: torch.Tensor, T: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference's projection in its thin form, float64 (equal to the full form in exact arithmetic)."""
    M, T = M.double(), T.double()
    m, n = M.shape
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    V = Vh.mT
    q = int((S > opcm_ref.drop_tolerance(S, m, n)).sum())
    if q == 0:
        return T.float()
    S_kept = S.clone()
    S_kept[q:] = 0
    r = opcm_ref.split_rank(S_kept, alpha)
    out = T - U[:, :r] @ (U[:, :r].mT @ T @ V[:, :r]) @ V[:, :r].mT
    Ud, Vd = U[:, r:q], V[:, r:q]
    d = (Ud * (T @ Vd)).sum(0)
    return (out - (Ud * d) @ Vd.mT).float()


def check(paths: list[Path], outs: list[Path], method: str, projected: set[str], scratch: Path) -> dict:
    """Worst relative error per step of ``outs`` (one folder per step) against the reference chain."""
    base, news = Folder(paths[0]), [Folder(p) for p in paths[1:]]
    keys = [k for k in base.keys]
    prev: dict[str, torch.Tensor] | None = None  # the reference's θ(t−1) (bf16), held tensor by tensor on disk
    norms: list[float] = []
    lam_prev = 1.0
    worst = []
    for t, (new, out) in enumerate(zip(news, outs), start=1):
        ours = Folder(out)
        tau_sq = sum(float((new.get(k).float() - base.get(k).float()).double().square().sum()) for k in keys)
        norms.append(math.sqrt(tau_sq))
        if t == 1:
            want = {k: (new.get(k) if method in ("opcm", "average") else
                        (base.get(k).float() + 0.3 * (new.get(k).float() - base.get(k).float())).to(torch.bfloat16))
                    for k in keys}
        elif method == "task_arithmetic":
            want = {k: (prev[k].float() + 0.3 * (new.get(k).float() - base.get(k).float())).to(torch.bfloat16) for k in keys}
        elif method == "opcm":
            sigma_sq = 0.0
            for k in keys:
                M = prev[k].float() - base.get(k).float()
                T = new.get(k).float() - base.get(k).float()
                Tp = thin_project(M, T, 0.5) if k in projected else T
                s = lam_prev * M + Tp
                sigma_sq += float(s.double().square().sum())
                save_file({"s": s}, str(scratch / f"{k}.st"))
            lam = math.sqrt(sigma_sq) / (sum(norms) / len(norms))
            want = {}
            for k in keys:
                with safe_open(str(scratch / f"{k}.st"), "pt") as f:
                    want[k] = (base.get(k).float() + f.get_tensor("s") / lam).to(torch.bfloat16)
            lam_prev = lam
        else:  # ties
            want = ties_step(base, prev, new, keys)
        errs = {k: float((ours.get(k).double() - want[k].double()).norm() / max(want[k].double().norm(), 1e-30)) for k in keys}
        k_worst = max(errs, key=errs.get)
        worst.append({"step": t, "worst_rel_err": errs[k_worst], "tensor": k_worst})
        print(f"{method} step {t}: worst relative error {errs[k_worst]:.3g} ({k_worst})", flush=True)
        prev = want
    return {"steps": worst, "max": max(w["worst_rel_err"] for w in worst)}


def ties_step(base: Folder, prev: dict, new: Folder, keys: list[str], lam: float = 0.3, keep: float = 0.2) -> dict:
    """The reference TIES step, with the global k-th magnitude found row by row with numpy.partition."""
    thr = []
    for r in range(2):
        flat = np.concatenate([
            ((prev[k].float() if r == 0 else new.get(k).float()) - base.get(k).float()).abs().reshape(-1).numpy()
            for k in keys])
        d = flat.size
        kth = d - math.floor(d * keep)
        thr.append(float(np.partition(flat, kth - 1)[kth - 1]))
        del flat
    def trimmed(k: str) -> tuple[torch.Tensor, torch.Tensor]:
        M = prev[k].float() - base.get(k).float()
        T = new.get(k).float() - base.get(k).float()
        return torch.stack([torch.where(M.abs() >= thr[0], M, 0.0), torch.where(T.abs() >= thr[1], T, 0.0)]), M

    sign_total = sum(float(torch.sign(trimmed(k)[0].sum(0)).sum(dtype=torch.float64)) for k in keys)
    majority = math.copysign(1.0, sign_total) if sign_total else 0.0
    out = {}
    for k in keys:
        tr, _ = trimmed(k)
        sign = torch.sign(tr.sum(0))
        sign = torch.where(sign == 0, torch.full_like(sign, majority), sign)
        agree = torch.where(sign > 0, tr > 0, tr < 0)
        out[k] = (prev[k].float() + lam * (tr * agree).sum(0)).to(torch.bfloat16)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/opcm-llm")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--methods", default="opcm,task_arithmetic,ties")
    p.add_argument("--budget", default="512MB")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    work = Path(a.workdir)
    cfg = llama_config(a.layers)
    paths = build(work, cfg, 3)
    from opcm_ext.io import CheckpointReader
    from opcm_ext.plan import Kind, classify

    with CheckpointReader(paths[0]) as r:
        tensors = {k: (r.info(k).dtype, tuple(r.info(k).shape)) for k in r.keys()}
    cls = classify(tensors, paths[0])
    projected = set(cls.keys_of(Kind.PROJECTED))
    result = {"machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d"), "layers": a.layers,
              "budget": a.budget, "parameters": sum(math.prod(s) for _, s in tensors.values()), "methods": {}}
    for method in a.methods.split(","):
        steps = []
        outs = []
        for t in range(1, len(paths)):
            out = work / f"out-{method}-{t}"
            reps = merge(paths[: t + 1], out, method, a.budget) if t == 1 else None
            if reps is None:  # continue from the previous step's folder, as a user would
                shutil.copytree(outs[-1], out, dirs_exist_ok=True)
                cmd = [sys.executable, "-m", "opcm_ext", "step", str(paths[0]), str(out), str(paths[t]),
                       "--memory-budget", a.budget, "--json", "--no-progress", "--device", "cpu"]
                t0 = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp")
                if r.returncode:
                    raise SystemExit(r.stderr)
                reps = [json.loads(r.stdout)]
                reps[0]["process_wall_s"] = time.perf_counter() - t0
            steps.append({k: reps[-1][k] for k in ("step", "timings", "peak_above_baseline_bytes", "groups", "streamed",
                                                   "memory_budget_bytes", "process_wall_s")})
            print(f"{method} step {t}: {reps[-1]['timings'].get('total', 0):.1f} s, peak +"
                  f"{reps[-1]['peak_above_baseline_bytes'] / 2**20:.0f} MiB, {reps[-1]['streamed']} streamed", flush=True)
            outs.append(out)
        scratch = work / "scratch"
        scratch.mkdir(exist_ok=True)
        chk = check(paths, outs, method, projected, scratch)
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(outs[-1], torch_dtype=torch.bfloat16)
        loaded = sum(p.numel() for p in model.parameters())
        del model
        result["methods"][method] = {"steps": steps, "check": chk, "from_pretrained_parameters": loaded,
                                     "within_tolerance": chk["max"] <= BF16_TOL}
        for old in outs[:-1]:
            shutil.rmtree(old, ignore_errors=True)
    emit_json(result, a.json)


if __name__ == "__main__":
    main()
