"""Side by side with FusionBench: the same checkpoints merged by `opcm merge` and by FusionBench's own code.

Run with the PROJECT's python; FusionBench runs in its own virtual environment (made by
``bench/peer/setup_env.sh``; ``$OPCM_PEER_VENV`` or ``<repo>/.venv-peer``):

    python bench/peer/parity.py                         # tiny shapes, 3 models, parity table
    python bench/peer/parity.py --shapes vit-b32        # ViT-B/32 shapes (~1.4 GB of checkpoints)
    python bench/peer/parity.py --shapes vit-b32 --repeat 3 --json bench/peer-cpu.json   # timings

It builds a base and N fine-tuned CLIP vision checkpoints saved with transformers 4 key names
(``vision_model.``...), merges them with ``opcm merge`` (one whole process per method) and with
``fusionbench_runner.py`` inside the peer venv (one whole process per method: FusionBench's OPCM,
``ContinualTaskArithmeticForCLIP``, ``ContinualTiesMergingForCLIP``), and compares every tensor:

- ``rel``: ‖ours − theirs‖ / ‖theirs‖ (the acceptance metric);
- ``tv``: ‖ours − theirs‖ / ‖theirs − θ0‖ (relative to the merged task vector: it shows an fp32
  rounding of a LayerNorm weight near 1 as ~1e-5, so read it with ``ulps``);
- ``ulps``: the largest elementwise difference in units of the fp32 spacing at FusionBench's value.

The python/ reference runs too, in each compat mode, so the table also shows which mode
FusionBench's output matches. ``--compat`` is passed to ``opcm merge`` only when its ``--help``
lists the option (``auto``: ``fusionbench`` if available, else the default).
Timings are whole processes (imports, loading, merging, saving). Do not record timings while
other work shares the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "tests"))   # helpers: checkpoint families
sys.path.insert(0, str(REPO / "python"))  # opcm_ref: the pure-torch oracle

METHODS = ("opcm", "task_arithmetic", "ties")
PREFIX = "vision_model."  # transformers 4 names of a saved CLIPVisionModel


def peer_python(venv: str | Path | None = None) -> Path:
    """The python of FusionBench's venv ($OPCM_PEER_VENV or <repo>/.venv-peer)."""
    root = Path(venv or os.environ.get("OPCM_PEER_VENV") or REPO / ".venv-peer")
    return root / "bin" / "python"


def _decaying_spectra(folder: Path, model, models: list[Path], seed: int) -> None:
    """Give every Linear weight's task vector evenly spaced singular values from 1 down to 0.1 (same Frobenius norm).

    Gaussian task vectors have some singular values closer than 1e-5 of each other; which directions
    fall in OPCM's zeroed ``P[:r, :r]`` block (and which diagonal entries are zeroed) then moves with
    the last bit of the inputs: a float32 rounding of θ(t−1) shifts such a 768x768 layer by ~1e-3.
    Evenly spaced values keep every gap >= 1.2e-3 of σ1 and the smallest one far above the
    rank-deficiency tolerance, so the comparison measures the algorithm, not the conditioning.
    """
    import helpers
    from safetensors.torch import load_file, save_file

    linear = helpers.projected_keys(model)
    base = load_file(str(folder / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 7)
    for path in models:
        sd = load_file(str(path / "model.safetensors"))
        for k in sorted(sd):
            if k[len(PREFIX):] not in linear:
                continue
            tau = (sd[k] - base[k]).double()
            m, n = tau.shape
            q = min(m, n)
            U = torch.linalg.qr(torch.randn(m, q, generator=g, dtype=torch.float64))[0]
            V = torch.linalg.qr(torch.randn(n, q, generator=g, dtype=torch.float64))[0]
            s = torch.linspace(1.0, 0.1, q, dtype=torch.float64)
            new = (U * s) @ V.mT
            sd[k] = (base[k].double() + new * (tau.norm() / new.norm())).float().contiguous()
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def make_checkpoints(root: Path, shapes: str, n: int, seed: int = 0, spectrum: str = "decaying"
                     ) -> tuple[Path, list[Path]]:
    """Base + n fine-tuned CLIP vision checkpoints with transformers-4 key names (reused if present).

    ``spectrum``: "random" keeps Gaussian task vectors (tests/helpers.make_family); "decaying" (default)
    gives the Linear weights' task vectors evenly spaced singular values 1 .. 0.1 (``_decaying_spectra``).
    """
    import helpers

    cfg = helpers.tiny_clip_vision_config() if shapes == "tiny" else helpers.vit_b32_config()
    folder = root / f"{shapes}-n{n}-s{seed}-{spectrum}"
    paths = [folder / "base"] + [folder / f"task{i}" for i in range(1, n + 1)]
    if not all((p / "model.safetensors").exists() for p in paths):
        _, model = helpers.make_family(folder, cfg, "CLIPVisionModel", n, seed=seed, prefix=PREFIX)
        if spectrum == "decaying":
            _decaying_spectra(folder, model, paths[1:], seed)
    return paths[0], paths[1:]


def _run(cmd: list[str], log: Path, timeout: int, cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=cwd,
                              env={**os.environ, "TQDM_DISABLE": "1"})
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}; log {log}:\n{tail}")
    return dt


def ours_supports_compat(src: Path | None = None) -> bool:
    """Whether `opcm merge` (of this checkout, or of ``src``) has --compat."""
    out = subprocess.run([sys.executable, "-m", "opcm_ext", "merge", "--help"], capture_output=True, text=True,
                         cwd=src)
    return "--compat" in out.stdout


def run_ours(method: str, base: Path, models: list[Path], out: Path, *, lam: float, compat: str | None,
             timeout: int, src: Path | None = None) -> float:
    """`opcm merge` in a fresh process (``python -m opcm_ext`` run from ``src`` when given); its wall time."""
    cmd = [sys.executable, "-m", "opcm_ext", "merge", str(base), *map(str, models), "-o", str(out),
           "--method", method, "--overwrite", "--no-progress"]
    if method in ("task_arithmetic", "ties"):
        cmd += ["--lam", str(lam)]
    if compat and method == "opcm":
        cmd += ["--compat", compat]
    return _run(cmd, out.with_suffix(".log"), timeout, cwd=src)


def run_peer(method: str, base: Path, models: list[Path], out: Path, *, lam: float, timeout: int,
             venv: str | None = None, emulate_release: bool = False, dtype: str = "float32") -> tuple[float, dict]:
    """FusionBench in its venv, a fresh process; returns (wall time, the runner's own timings)."""
    js = out.with_suffix(".json")
    cmd = [str(peer_python(venv)), str(HERE / "fusionbench_runner.py"), "--method", method, "--base", str(base),
           "--models", *map(str, models), "--out", str(out), "--json", str(js), "--lam", str(lam), "--dtype", dtype]
    if emulate_release:
        cmd.append("--emulate-release")
    dt = _run(cmd, out.with_suffix(".log"), timeout)
    return dt, json.loads(js.read_text())


def _load(path: Path) -> dict[str, torch.Tensor]:
    import helpers
    from safetensors.torch import load_file

    return helpers.load_folder(path) if path.is_dir() else load_file(str(path))


def compare(ours: dict, theirs: dict, base: dict) -> dict:
    """Per-tensor differences (see the module docstring) and the worst of each."""
    if set(ours) != set(theirs):
        raise RuntimeError(f"key sets differ: only ours {sorted(set(ours) - set(theirs))[:5]}, "
                           f"only theirs {sorted(set(theirs) - set(ours))[:5]}")
    rows = {}
    eps = torch.finfo(torch.float32).eps
    for k in sorted(theirs):
        if not theirs[k].is_floating_point():
            rows[k] = {"rel": 0.0 if torch.equal(ours[k], theirs[k]) else float("inf"), "tv": 0.0, "ulps": 0.0,
                       "equal": torch.equal(ours[k], theirs[k])}
            continue
        a, b, b0 = ours[k].double(), theirs[k].double(), base[k].double()
        d = a - b
        tvn = float((b - b0).norm())
        rows[k] = {"rel": float(d.norm()) / max(float(b.norm()), 1e-30),
                   "tv": float(d.norm()) / tvn if tvn > 0 else (0.0 if float(d.norm()) == 0 else float("inf")),
                   "ulps": float((d.abs() / (eps * b.abs()).clamp_min(1e-38)).max()),
                   "equal": torch.equal(ours[k], theirs[k])}
    worst = max(rows, key=lambda k: rows[k]["rel"])
    return {"worst_rel": rows[worst]["rel"], "worst_key": worst, "worst_tv": max(r["tv"] for r in rows.values()),
            "identical": sum(r["equal"] for r in rows.values()), "tensors": len(rows), "per_tensor": rows}


def reference(method: str, base_sd: dict, model_sds: list[dict], compat: str, lam: float, model) -> dict:
    """The python/ oracle's result (transformers-4 keys); ``model`` gives the module tree (classes, non-leaf)."""
    import opcm_ref

    if method == "task_arithmetic":
        return opcm_ref.task_arithmetic_merge(base_sd, model_sds, lam)
    if method == "ties":
        return opcm_ref.ties_merge(base_sd, model_sds, lam, 0.2)
    kinds = opcm_ref.classify_by_module(model, base_sd)
    projected = {k for k, v in kinds.items() if v == opcm_ref.PROJECTED}
    unmerged = opcm_ref.nonleaf_parameter_keys(model, base_sd)
    return opcm_ref.opcm_merge(base_sd, model_sds, projected, 0.5, compat=compat, unmerged=unmerged)[0]


def _group(rows: dict, kinds: dict) -> dict:
    out = {}
    ce = PREFIX + "embeddings.class_embedding"
    for kind in ("projected", "averaged"):  # class_embedding has its own column
        ks = [k for k in rows if kinds.get(k) == kind and k != ce]
        if ks:
            out[kind] = max(rows[k]["rel"] for k in ks)
    if ce in rows:
        out["class_embedding"] = rows[ce]["rel"]
    return out


def run(shapes: str = "tiny", n: int = 3, *, workdir: Path, compat: str = "auto", lam: float = 0.3,
        repeat: int = 1, venv: str | None = None, timeout: int = 1800,
        reference_modes=("paper", "fusionbench", "release"), methods=METHODS, ours_src: Path | None = None,
        peer_dtype: str = "float32", spectrum: str = "decaying") -> dict:
    """Merge with both, compare, time; returns a JSON-able result."""
    import opcm_ref

    if not peer_python(venv).exists():
        raise SystemExit(f"no FusionBench venv at {peer_python(venv).parent.parent}; run bench/peer/setup_env.sh")
    workdir.mkdir(parents=True, exist_ok=True)
    base, models = make_checkpoints(workdir, shapes, n, spectrum=spectrum)
    has_compat = ours_supports_compat(ours_src)
    used_compat = ("fusionbench" if has_compat else None) if compat == "auto" else compat
    if used_compat and not has_compat:
        raise SystemExit(f"--compat {used_compat}: this checkout's `opcm merge` has no --compat option yet")
    base_sd = _load(base)
    model_sds = [_load(m) for m in models]
    import helpers

    with torch.device("meta"):
        model = helpers.build_model(helpers.tiny_clip_vision_config() if shapes == "tiny"
                                    else helpers.vit_b32_config(), "CLIPVisionModel", 0)
    kinds = opcm_ref.classify_by_module(model, base_sd)
    result = {"shapes": shapes, "models": n, "lam": lam, "alpha": 0.5, "keep": 0.2, "peer_dtype": peer_dtype,
              "spectrum": spectrum,
              "compat_ours": used_compat or "default", "ours_src": str(ours_src) if ours_src else None, "methods": {},
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "cpu_count": os.cpu_count(), "platform": platform.platform()}}
    out_dir = workdir / f"out-{shapes}-n{n}-{spectrum}-{peer_dtype}"
    out_dir.mkdir(exist_ok=True)
    for method in methods:
        ours_t, peer_t, peer_inner = [], [], []
        for r in range(repeat):
            ours_out = out_dir / f"ours-{method}"
            peer_out = out_dir / f"fusionbench-{method}.safetensors"
            ours_t.append(run_ours(method, base, models, ours_out, lam=lam, compat=used_compat, timeout=timeout,
                                   src=ours_src))
            # --compat release is the code behind the paper's Table 1: compare it with FusionBench before its 2025-03 fix
            dt, inner = run_peer(method, base, models, peer_out, lam=lam, timeout=timeout, venv=venv, dtype=peer_dtype,
                                 emulate_release=method == "opcm" and used_compat == "release")
            peer_t.append(dt)
            peer_inner.append(inner)
        theirs = _load(peer_out)
        ours = _load(ours_out)
        cmp_ours = compare(ours, theirs, base_sd)
        entry = {"ours_vs_fusionbench": {**{k: v for k, v in cmp_ours.items() if k != "per_tensor"},
                                         "by_kind": _group(cmp_ours["per_tensor"], kinds),
                                         "per_tensor": cmp_ours["per_tensor"]},
                 "timing": {"ours_process_s": ours_t, "fusionbench_process_s": peer_t,
                            "fusionbench_merge_s": [p["merge_s"] for p in peer_inner],
                            "fusionbench_versions": peer_inner[-1]["versions"]}}
        if method == "opcm":
            # docs/algorithm.md, constant distance: ‖θ(T) − θ0‖ = mean of the task-vector norms. FusionBench's float32 whole-model
            # norms (torch.linalg.norm on CPU) miss it by ~1e-3 at ViT-B/32 size; this shows by how much.
            mean_norm = sum(opcm_ref.flat_norm(opcm_ref.task_vector(base_sd, m)) for m in model_sds) / n
            entry["norm_vs_mean_task_norm"] = {
                "fusionbench": opcm_ref.flat_norm(opcm_ref.task_vector(base_sd, theirs)) / mean_norm - 1.0,
                "ours": opcm_ref.flat_norm(opcm_ref.task_vector(base_sd, ours)) / mean_norm - 1.0}
        if reference_modes:
            modes = tuple(reference_modes) if method == "opcm" else ("paper",)
            entry["reference_vs_fusionbench"] = {}
            for mode in modes:
                c = compare(reference(method, base_sd, model_sds, mode, lam, model), theirs, base_sd)
                entry["reference_vs_fusionbench"][mode] = {"worst_rel": c["worst_rel"], "worst_key": c["worst_key"],
                                                           "by_kind": _group(c["per_tensor"], kinds),
                                                           "identical": c["identical"], "tensors": c["tensors"]}
        if method == "opcm" and "release" in reference_modes:
            peer_rel = out_dir / "fusionbench-opcm-release.safetensors"
            run_peer("opcm", base, models, peer_rel, lam=lam, timeout=timeout, venv=venv, emulate_release=True,
                     dtype=peer_dtype)
            c = compare(reference("opcm", base_sd, model_sds, "release", lam, model), _load(peer_rel), base_sd)
            entry["reference_release_vs_fusionbench_before_fix"] = {"worst_rel": c["worst_rel"],
                                                                    "worst_key": c["worst_key"],
                                                                    "by_kind": _group(c["per_tensor"], kinds)}
        result["methods"][method] = entry
    return result


def format_table(result: dict) -> str:
    """The parity table and the timings as text."""
    lines = [f"FusionBench parity: {result['shapes']} shapes, base + {result['models']} models, "
             f"{result.get('spectrum', 'random')} task-vector spectra, λ = {result['lam']}, α = {result['alpha']}; "
             f"opcm merge --compat {result['compat_ours']}; "
             f"FusionBench in {result.get('peer_dtype', 'float32')}"
             + (" (OPCM as before its 2025-03 fix)" if result["compat_ours"] == "release" else ""),
             f"{'comparison':<50} {'worst rel':>10} {'projected':>10} {'averaged':>10} {'class_emb':>10} "
             f"{'identical':>10}  worst tensor"]

    def row(label, c):
        bk = c.get("by_kind", {})
        f = (lambda k: f"{bk[k]:10.1e}" if k in bk else f"{'-':>10}")
        ident = f"{c['identical']}/{c['tensors']}" if "identical" in c else "-"
        lines.append(f"{label:<50} {c['worst_rel']:10.1e} {f('projected')} {f('averaged')} {f('class_embedding')} "
                     f"{ident:>10}  {c['worst_key']}")

    for m, e in result["methods"].items():
        row(f"{m}: opcm merge vs FusionBench", e["ours_vs_fusionbench"])
        for mode, c in e.get("reference_vs_fusionbench", {}).items():
            row(f"{m}: python ref ({mode}) vs FusionBench", c)
        if "reference_release_vs_fusionbench_before_fix" in e:
            row(f"{m}: ref (release) vs FB before 2025-03 fix", e["reference_release_vs_fusionbench_before_fix"])
    for m, e in result["methods"].items():
        if "norm_vs_mean_task_norm" in e:
            d = e["norm_vs_mean_task_norm"]
            lines.append(f"{m}: ‖θ(T) − θ0‖ / mean task-vector norm − 1 (constant distance, docs/algorithm.md: 0): FusionBench "
                         f"{d['fusionbench']:+.1e}, opcm merge {d['ours']:+.1e}")
    lines.append("")
    lines.append(f"{'timing (whole processes, s)':<50} {'opcm merge':>12} {'FusionBench':>12} {'FB run() only':>14}")
    for m, e in result["methods"].items():
        t = e["timing"]
        lines.append(f"{m:<50} {min(t['ours_process_s']):12.2f} {min(t['fusionbench_process_s']):12.2f} "
                     f"{min(t['fusionbench_merge_s']):14.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: build checkpoints, merge with both, print the table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=["tiny", "vit-b32"], default="tiny")
    p.add_argument("--models", type=int, default=3, help="fine-tuned models after the base (default 3)")
    p.add_argument("--workdir", default=None, help="checkpoints and outputs (default: /tmp/opcm-peer)")
    p.add_argument("--compat", choices=["auto", "paper", "fusionbench", "release"], default="auto")
    p.add_argument("--lam", type=float, default=0.3)
    p.add_argument("--repeat", type=int, default=1, help="runs per method and side (timings: the minimum)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reference-modes", default="paper,fusionbench,release",
                   help="compat modes of the python/ reference to compare too ('' for none; each is a float64 "
                        "full-SVD merge: minutes at ViT-B/32 shapes)")
    p.add_argument("--venv", default=None, help="FusionBench's venv (default $OPCM_PEER_VENV or .venv-peer)")
    p.add_argument("--json", default=None, help="write the full result (per-tensor rows too) here")
    p.add_argument("--spectrum", choices=["decaying", "random"], default="decaying",
                   help="task vectors of the Linear weights: evenly spaced singular values 1 .. 0.1 (default; well "
                        "conditioned) or Gaussian (near-equal singular values: ~1e-3 on a few layers)")
    p.add_argument("--peer-dtype", choices=["float32", "float64"], default="float32",
                   help="FusionBench's precision: float32 is what it runs; float64 removes its rounding (fp32 "
                        "SVDs, fp32 whole-model norms) and leaves only the semantic differences")
    p.add_argument("--ours-src", default=None,
                   help="run `python -m opcm_ext` from this folder (e.g. a `git archive` of a commit with the built "
                        "_C/_cuda modules copied into its opcm_ext/) instead of the installed package")
    a = p.parse_args(argv)
    result = run(a.shapes, a.models, workdir=Path(a.workdir or "/tmp/opcm-peer"), compat=a.compat, lam=a.lam,
                 repeat=a.repeat, venv=a.venv,
                 reference_modes=[m.strip() for m in a.reference_modes.split(",") if m.strip()],
                 methods=[m.strip() for m in a.methods.split(",") if m.strip()],
                 ours_src=Path(a.ours_src).resolve() if a.ours_src else None, peer_dtype=a.peer_dtype,
                 spectrum=a.spectrum)
    print(format_table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
