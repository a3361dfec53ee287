"""GPU benchmarks (issue 6): one OPCM step on ViT-B/32 and ViT-L/14 fp32 checkpoints on CUDA.

Run on the GPU machine, from the repository root (one command):

    pip install --no-build-isolation . && pytest bench/test_bench_cuda.py -m benchmark -v -s --benchmark-json=$OUT/bench_cuda.json

Every test skips when torch sees no GPU or ``opcm_ext._cuda`` did not load (a skipif
marker on the module; the reason carries ``opcm_ext._native.available()['cuda_error']``).
``pip install .`` builds ``_cuda`` only when it finds nvcc and the cuSOLVER/cuBLAS headers
(OPCM_WITH_CUDA defaults to AUTO); prefix ``OPCM_WITH_CUDA=ON`` to make a missing piece a
build error instead of a skip. Check first with
``python -c "from opcm_ext import _native; print(_native.available())"`` (run outside the
repository root, so the installed package is imported).

Targets (issue 6 acceptance), all on page-cached fp32 checkpoints at step t=2:

- step time (``opcm_ext.merge_stream(..., device="cuda")``, min over rounds):
  ViT-B/32 <= 0.5 s, ViT-L/14 <= 2 s;
- >= 10x faster than the pure-torch reference (python/opcm_ref) on the same GPU;
- peak device memory of the step (``torch.cuda.max_memory_allocated()`` above what was
  allocated when the step started) within the memory budget: 1 GiB for B/32, 2 GiB for L/14;
- step time within 1.5x of pure I/O (bench/io_baseline.py: read the three inputs, copy
  them to the GPU, write one output of the same layout, fsync'd).

Tests, per model (ViT-B/32 88M parameters, ViT-L/14 303M parameters, CLIPVisionModel):

- ``test_io_baseline``: the pure-I/O floor, ``io_baseline.io_time(..., device="cuda")``.
- ``test_step_stream``: one step through ``merge_stream(device="cuda", memory_budget=...)``
  (1 warm-up round + 3); ``extra_info`` holds the report's ``timings``, the budget, the
  peak device memory and whether it is within the budget, the ratio step / I/O.
- ``test_step_reference``: the same step FusionBench-style with ``opcm_ref.OPCMRef`` on the
  GPU: load the three whole models onto the GPU, full fp32 SVD per projected weight, save
  (fsync'd); timing includes loading and saving. Records the speedup of the stream step
  and the largest relative difference between the two outputs (a GPU correctness check;
  the reference's fp32 full SVD is itself only ~1e-4 accurate).
- ``test_svd_phase[method]``: the SVD phase alone on the step's batches (M = merged - base
  of the projected weights, grouped by shape, stacked [B, m, n] fp32 on the GPU):
  ``opcm_ext.ops.thin_svd`` against ``torch.linalg.svd(full_matrices=False, driver=d)`` for
  d in (None, gesvd, gesvdj, gesvda) and ``torch.linalg.eigh`` of the Gram matrix of the
  small side (``B^T B`` for tall batches, ``B B^T`` for wide ones, i.e. what thin_svd
  decomposes). ``torch.cuda.synchronize()`` closes every timed call. The drivers that loop
  over the batch matrix by matrix (None = gesvdj, gesvd, gesvdj, and eigh) take seconds
  per pass on ViT-L/14, so their warm-up round runs one matrix per shape (it initialises
  cuSOLVER and its workspaces just the same) and they are timed over 1 round; thin_svd and
  gesvda (batched) warm up on the full batches and are timed over 3 rounds.

Each test prints one line ``BENCH_CUDA <model> <test>: ...`` (visible with ``-s``) and the
module prints ``BENCH_CUDA SUMMARY`` lines with the ratios at its end: paste them into
bench/RESULTS.md together with the GPU name and the date.

Generated checkpoints are cached in ``$OPCM_BENCH_CACHE/cuda_vit_b32`` and
``$OPCM_BENCH_CACHE/cuda_vit_l14`` (default /tmp/opcm-bench-cache; base, task1, task2 and
the step-1 merge of task1, made on the CPU: about 1.4 GB and 4.8 GB). ``OPCM_BENCH_MODELS=vit_b32``
(comma-separated) restricts the run to some models.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

def _cuda_missing() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    from opcm_ext import _native

    av = _native.available()
    if not av["cuda"]:
        return f"opcm_ext._cuda is not available ({av['cuda_error']})"
    return None


_MISSING = _cuda_missing()

# Skipped (not failed) without a GPU or without opcm_ext._cuda; deselected by default (-m benchmark runs them).
pytestmark = [
    pytest.mark.benchmark,
    pytest.mark.cuda,
    pytest.mark.skipif(_MISSING is not None, reason=f"CUDA benchmarks need a GPU and opcm_ext._cuda: {_MISSING}"),
]

from io_baseline import io_time, warm_page_cache  # noqa: E402
from opcm_ext.io import fsync_path  # noqa: E402

CACHE = Path(os.environ.get("OPCM_BENCH_CACHE", "/tmp/opcm-bench-cache"))
MiB = 2**20
GiB = 2**30
STEP_ROUNDS = 3
SPEEDUP_TARGET = 10.0
IO_RATIO_TARGET = 1.5


def vit_l14_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)


def _vit_b32_config():
    from helpers import vit_b32_config

    return vit_b32_config()


@dataclass(frozen=True)
class Spec:
    config: Callable[[], Any]
    budget: str
    budget_bytes: int
    target_step_s: float


SPECS = {
    "vit_b32": Spec(_vit_b32_config, "1GiB", 1 * GiB, 0.5),
    "vit_l14": Spec(vit_l14_config, "2GiB", 2 * GiB, 2.0),
}


def _selected_models() -> list[str]:
    names = [n.strip() for n in os.environ.get("OPCM_BENCH_MODELS", "").split(",") if n.strip()]
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        raise ValueError(f"OPCM_BENCH_MODELS: unknown model(s) {unknown}; known: {sorted(SPECS)}")
    return names or list(SPECS)


@dataclass(frozen=True)
class Family:
    name: str
    base: Path
    merged: Path  # theta(1) = task1, written by merge_stream (carries the merge state)
    new: Path  # task2: the model the benchmarked step folds in
    spec: Spec


# Figures shared between the tests of one model, for the ratios and the summary.
_RESULTS: dict[str, dict[str, Any]] = {}


def _make_family(name: str, root: Path) -> None:
    import opcm_ext
    from helpers import make_family

    root.mkdir(parents=True, exist_ok=True)
    make_family(root, SPECS[name].config(), "CLIPVisionModel", 2, seed=42)
    opcm_ext.merge_stream(root / "base", None, root / "task1", root / "merged", device="cpu", overwrite=True)
    (root / "ready").write_text("ok")


@pytest.fixture(scope="module", params=_selected_models())
def family(request) -> Family:
    name = request.param
    root = CACHE / f"cuda_{name}"
    if not (root / "ready").exists():
        _make_family(name, root)
    f = Family(name, root / "base", root / "merged", root / "task2", SPECS[name])
    warm_page_cache(f.base, f.merged, f.new)
    return f


@pytest.fixture(autouse=True)
def _clean_gpu():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    for line in _summary_lines():
        print(line, flush=True)


# ----------------------------------------------------------------------------- helpers
def _gpu() -> str:
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{p.name} ({p.total_memory / GiB:.0f} GiB)"


def _say(model: str, what: str, text: str) -> None:
    print(f"\nBENCH_CUDA {model} {what}: {text}", flush=True)


def _ok(flag: bool) -> str:
    return "ok" if flag else "MISSED"


def _measured(runs: list, warmup: int) -> list:
    """The rounds after the warm-up (all of them when --benchmark-disable ran the target once)."""
    return runs[warmup:] or runs


def _best_io(family: Family, out: Path) -> dict[str, float]:
    """The I/O floor of this model: from test_io_baseline, or measured here (warm-up + 1) if it did not run."""
    res = _RESULTS.setdefault(family.name, {})
    if "io" not in res:
        try:
            io_time(family.base, family.merged, family.new, out, "cuda")
            res["io"] = io_time(family.base, family.merged, family.new, out, "cuda")
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return res["io"]


def _max_rel_err(a_dir: Path, b_dir: Path) -> tuple[float, str | None]:
    """Largest ||a - b|| / ||b|| over the floating tensors of two checkpoints (float64, on the GPU)."""
    from helpers import load_folder

    a, b = load_folder(a_dir), load_folder(b_dir)
    worst: tuple[float, str | None] = (0.0, None)
    for k, vb in b.items():
        if not vb.is_floating_point():
            continue
        x = a[k].to("cuda", torch.float64)
        y = vb.to("cuda", torch.float64)
        den = float(y.norm())
        err = float((x - y).norm()) / den if den > 0 else float((x - y).norm())
        worst = max(worst, (err, k), key=lambda t: t[0])
    return worst


# ----------------------------------------------------------------------------- I/O floor

def _fresh_round(out: Path, runs: list) -> None:
    """Before a timed round: remove the last output, settle the GPU, restart the peak counter."""
    shutil.rmtree(out, ignore_errors=True)  # every round writes a fresh output
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runs.append({"start_alloc": torch.cuda.memory_allocated()})

def test_io_baseline(benchmark, family, tmp_path):
    """Pure I/O: read base, merged and new tensor by tensor, copy each to the GPU, write one output (fsync'd)."""
    benchmark.group = f"{family.name}:io"
    out = tmp_path / "io"
    warm_page_cache(family.base, family.merged, family.new)
    runs: list[dict[str, float]] = []

    def run():
        runs.append(io_time(family.base, family.merged, family.new, out, "cuda"))

    try:
        benchmark.pedantic(run, rounds=2, warmup_rounds=1, iterations=1)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    best = min(_measured(runs, 1), key=lambda r: r["total"])
    _RESULTS.setdefault(family.name, {})["io"] = best
    benchmark.extra_info.update(model=family.name, gpu=_gpu(), io=best)
    _say(family.name, "io_baseline",
         f"total {best['total']:.3f}s (read {best['read']:.3f}s, h2d {best['h2d']:.3f}s, d2h {best['d2h']:.3f}s, "
         f"write+fsync {best['write']:.3f}s; {best['bytes_read'] / GiB:.2f} GiB read, "
         f"{best['bytes_written'] / GiB:.2f} GiB written)")


# ----------------------------------------------------------------------------- the product's step
def test_step_stream(benchmark, family, tmp_path):
    """One OPCM step (t=2) through opcm_ext.merge_stream(device="cuda") within the model's memory budget."""
    import opcm_ext

    spec = family.spec
    benchmark.group = f"{family.name}:step"
    io = _best_io(family, tmp_path / "io")
    out = tmp_path / "stream"
    warm_page_cache(family.base, family.merged, family.new)
    runs: list[dict[str, Any]] = []

    def setup():
        _fresh_round(out, runs)

    def run():
        r = runs[-1]
        t0 = time.perf_counter()
        rep = opcm_ext.merge_stream(family.base, family.merged, family.new, out, device="cuda",
                                    memory_budget=spec.budget, overwrite=True)
        torch.cuda.synchronize()
        r["wall_s"] = time.perf_counter() - t0
        r["peak_alloc"] = torch.cuda.max_memory_allocated() - r["start_alloc"]
        r["peak_reserved"] = torch.cuda.max_memory_reserved()
        r["report"] = rep

    benchmark.pedantic(run, setup=setup, rounds=STEP_ROUNDS, warmup_rounds=1, iterations=1)
    measured = _measured(runs, 1)
    best = min(measured, key=lambda r: r["wall_s"])
    rep = best["report"]
    assert rep.device.startswith("cuda"), rep.device
    assert rep.step == 2, rep.step
    peak = max(r["peak_alloc"] for r in runs)  # the warm-up round included: the same allocations
    step_s = best["wall_s"]
    ratio = step_s / io["total"]
    info = {
        "model": family.name,
        "gpu": _gpu(),
        "budget": spec.budget,
        "budget_bytes": spec.budget_bytes,
        "peak_device_bytes": peak,
        "peak_device_mib": round(peak / MiB, 1),
        "peak_reserved_mib": round(max(r["peak_reserved"] for r in runs) / MiB, 1),
        "peak_within_budget": peak <= spec.budget_bytes,
        "step_s": step_s,
        "wall_s": [r["wall_s"] for r in measured],
        "timings": rep.timings,
        "groups": rep.groups,
        "lam": rep.lam,
        "norms": rep.norms,
        "host_peak_above_baseline_mib": round(rep.peak_above_baseline_bytes / MiB, 1),
        "target_step_s": spec.target_step_s,
        "meets_step_target": step_s <= spec.target_step_s,
        "io_total_s": io["total"],
        "io": io,
        "step_over_io": ratio,
        "meets_io_target": ratio <= IO_RATIO_TARGET,
    }
    benchmark.extra_info.update(info)
    # The last round's output stays for test_step_reference to compare against (it deletes it).
    _RESULTS.setdefault(family.name, {})["stream"] = {**{k: v for k, v in info.items() if k != "io"},
                                                      "out": str(out)}
    t = rep.timings
    _say(family.name, "step_stream",
         f"{step_s:.3f}s (target {spec.target_step_s}s: {_ok(info['meets_step_target'])}) | peak device "
         f"{peak / MiB:.0f} MiB (budget {spec.budget}: {_ok(info['peak_within_budget'])}) | step/io "
         f"{ratio:.2f} (io {io['total']:.3f}s, target <= {IO_RATIO_TARGET}: {_ok(info['meets_io_target'])}) | "
         f"read {t.get('read', 0):.3f} read_wait {t.get('read_wait', 0):.3f} compute {t.get('compute', 0):.3f} "
         f"svd {t.get('svd', 0):.3f} project {t.get('project', 0):.3f} write {t.get('write', 0):.3f} | "
         f"groups {rep.groups} | host +{rep.peak_above_baseline_bytes / MiB:.0f} MiB")


# ----------------------------------------------------------------------------- the reference on the GPU
def test_step_reference(benchmark, family, tmp_path):
    """The same step FusionBench-style on the GPU: whole models, opcm_ref full fp32 SVDs; load and save included."""
    import opcm_ext
    import opcm_ref
    from helpers import load_folder
    from opcm_ext.plan import Kind, classify
    from safetensors.torch import save_file

    benchmark.group = f"{family.name}:step"
    dev = torch.device("cuda", torch.cuda.current_device())
    out = tmp_path / "ref"
    # The merge state is header metadata: read outside the timing, as bench/measure.py does.
    state = opcm_ext.read_state(family.merged)
    assert state is not None and state.step == 1
    alpha = float(state.params.get("alpha", 0.5))
    # cuSOLVER handle and kernels of torch.linalg.svd, once, outside the timing.
    torch.linalg.svd(torch.randn(256, 1024, device=dev), full_matrices=True)
    torch.cuda.synchronize()
    warm_page_cache(family.base, family.merged, family.new)
    runs: list[dict[str, Any]] = []

    def setup():
        _fresh_round(out, runs)

    def run():
        r = runs[-1]
        t0 = time.perf_counter()
        base = {k: v.to(dev) for k, v in load_folder(family.base).items()}
        merged = {k: v.to(dev) for k, v in load_folder(family.merged).items()}
        new = {k: v.to(dev) for k, v in load_folder(family.new).items()}
        tensors = {k: (v.dtype, tuple(v.shape)) for k, v in base.items()}
        proj = set(classify(tensors, family.base).keys_of(Kind.PROJECTED))
        ref = opcm_ref.OPCMRef.from_state(merged, t=state.step, lam=state.lam, norms=state.norms, alpha=alpha,
                                          svd_dtype=torch.float32)
        result = ref.step(base, new, proj)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "model.safetensors"
        save_file({k: v.cpu() for k, v in result.items()}, str(path), metadata={"format": "pt"})
        fsync_path(path)
        r["wall_s"] = time.perf_counter() - t0
        r["peak_alloc"] = torch.cuda.max_memory_allocated() - r["start_alloc"]
        r["lam"] = ref.lam
        r["projected"] = len(proj)

    try:
        benchmark.pedantic(run, setup=setup, rounds=1, warmup_rounds=0, iterations=1)
        r = runs[-1]
        info: dict[str, Any] = {
            "model": family.name,
            "gpu": _gpu(),
            "ref_s": r["wall_s"],
            "peak_device_mib": round(r["peak_alloc"] / MiB, 1),
            "lam": r["lam"],
            "projected_tensors": r["projected"],
            "svd_dtype": "float32",
        }
        stream = _RESULTS.get(family.name, {}).get("stream")
        if stream is not None:
            speedup = r["wall_s"] / stream["step_s"]
            info.update(stream_step_s=stream["step_s"], speedup=speedup, meets_speedup_target=speedup >= SPEEDUP_TARGET,
                        lam_rel_diff=abs(stream["lam"] - r["lam"]) / abs(r["lam"]))
            if Path(stream["out"]).exists():
                err, key = _max_rel_err(Path(stream["out"]), out)
                info.update(max_rel_err_vs_stream=err, max_rel_err_key=key)
        benchmark.extra_info.update(info)
        _RESULTS.setdefault(family.name, {})["reference"] = info
    finally:
        shutil.rmtree(out, ignore_errors=True)
        stream = _RESULTS.get(family.name, {}).get("stream")
        if stream is not None:
            shutil.rmtree(stream["out"], ignore_errors=True)
    text = f"{info['ref_s']:.3f}s | peak device {info['peak_device_mib']:.0f} MiB | lam {info['lam']:.6g}"
    if "speedup" in info:
        text += (f" | stream step {info['stream_step_s']:.3f}s -> speedup {info['speedup']:.1f}x "
                 f"(target >= {SPEEDUP_TARGET:g}x: {_ok(info['meets_speedup_target'])}) | lam rel diff "
                 f"{info['lam_rel_diff']:.2e}")
    if "max_rel_err_vs_stream" in info:
        text += f" | max rel err vs stream {info['max_rel_err_vs_stream']:.2e} ({info['max_rel_err_key']})"
    _say(family.name, "step_reference", text)


# ----------------------------------------------------------------------------- the SVD phase alone
@pytest.fixture(scope="module")
def svd_batches(family) -> list[torch.Tensor]:
    """M = merged - base of the projected weights, fp32 on the CPU, stacked [B, m, n] per shape."""
    from opcm_ext.io import CheckpointReader
    from opcm_ext.plan import Kind, classify

    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    with CheckpointReader(family.base) as rb, CheckpointReader(family.merged) as rm:
        tensors = {k: (rb.info(k).dtype, tuple(rb.info(k).shape)) for k in rb.keys()}
        for k in classify(tensors, family.base).keys_of(Kind.PROJECTED):
            groups.setdefault(tensors[k][1], []).append(rm.read(k).float() - rb.read(k).float())
    return [torch.stack(v) for _, v in sorted(groups.items())]


def _thin_svd(b):
    from opcm_ext import ops

    return ops.thin_svd(b)


def _torch_svd(driver):
    def fn(b):
        U, S, Vh = torch.linalg.svd(b, full_matrices=False, driver=driver)
        return U, S, Vh.mT

    return fn


def _eigh_gram(b):
    # The small side's Gram matrix, as thin_svd forms it (in fp32 here).
    g = b.mT @ b if b.shape[-2] >= b.shape[-1] else b @ b.mT
    return torch.linalg.eigh(g)


# name -> (function returning (U, S, V) or eigh's result, light warm-up, measured rounds)
SVD_METHODS: dict[str, tuple[Callable, bool, int]] = {
    "thin_svd": (_thin_svd, False, 3),
    "svd_default": (_torch_svd(None), True, 1),
    "svd_gesvd": (_torch_svd("gesvd"), True, 1),
    "svd_gesvdj": (_torch_svd("gesvdj"), True, 1),
    "svd_gesvda": (_torch_svd("gesvda"), False, 3),
    "eigh_gram": (_eigh_gram, True, 1),
}


def _recon_err(a: torch.Tensor, usv) -> float:
    """max over the batch of ||A - U diag(S) V^T||_F / ||A||_F."""
    U, S, V = usv
    r = (U * S.unsqueeze(-2)) @ V.mT
    return float(((a - r).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-30)).max())


@pytest.mark.parametrize("method", list(SVD_METHODS))
def test_svd_phase(benchmark, family, svd_batches, method):
    """SVD of the step's projected weights grouped by shape: ops.thin_svd vs torch.linalg.svd drivers vs eigh."""
    fn, light, rounds = SVD_METHODS[method]
    benchmark.group = f"{family.name}:svd"
    batches = [b.to("cuda") for b in svd_batches]
    warm = [b[:1] for b in batches] if light else batches
    calls: list[int] = []
    walls: list[dict[str, float]] = []

    def setup():
        torch.cuda.synchronize()
        calls.append(len(calls))
        return ((warm if len(calls) == 1 else batches),), {}

    def run(bs):
        per: dict[str, float] = {}
        outs = []
        t_all = time.perf_counter()
        for b in bs:
            t0 = time.perf_counter()
            outs.append(fn(b))
            torch.cuda.synchronize()
            per["x".join(map(str, b.shape))] = time.perf_counter() - t0
        per["total"] = time.perf_counter() - t_all
        walls.append(per)
        return outs

    result = benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    measured = _measured(walls, 1)
    best = min(measured, key=lambda w: w["total"])
    err = None
    if method != "eigh_gram" and len(calls) > 1:  # the last round ran the full batches
        err = max(_recon_err(b, usv) for b, usv in zip(batches, result))
    del result
    info = {
        "model": family.name,
        "gpu": _gpu(),
        "method": method,
        "batches": [list(b.shape) for b in batches],
        "svd_s": best["total"],
        "per_shape_s": {k: v for k, v in best.items() if k != "total"},
        "rounds": len(measured),
        "light_warmup": light,
        "max_recon_rel_err": err,
        "linalg_library": str(torch.backends.cuda.preferred_linalg_library()),
    }
    svd = _RESULTS.setdefault(family.name, {}).setdefault("svd", {})
    svd[method] = best["total"]
    if method != "thin_svd" and "thin_svd" in svd:
        info["slower_than_thin_svd"] = best["total"] / svd["thin_svd"]
    benchmark.extra_info.update(info)
    text = f"{method} {best['total']:.4f}s over {sum(b.shape[0] for b in batches)} matrices ("
    text += ", ".join(f"{k}: {v:.4f}s" for k, v in info["per_shape_s"].items()) + ")"
    if err is not None:
        text += f" | max recon rel err {err:.2e}"
    if "slower_than_thin_svd" in info:
        text += f" | {info['slower_than_thin_svd']:.1f}x thin_svd's time"
    _say(family.name, f"svd_phase[{method}]", text)


# ----------------------------------------------------------------------------- the module's summary
def _summary_lines() -> list[str]:
    if not _RESULTS:
        return []
    lines = ["", f"BENCH_CUDA SUMMARY gpu {_gpu()} | torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        from opcm_ext import _native

        lines.append(f"BENCH_CUDA SUMMARY opcm_ext._cuda build_info {_native.cuda().build_info()} "
                     f"runtime_info {_native.cuda().runtime_info()}")
    except Exception as e:  # noqa: BLE001 - the summary must not fail the run
        lines.append(f"BENCH_CUDA SUMMARY opcm_ext._cuda build_info unavailable: {e}")
    for name, res in _RESULTS.items():
        parts = [f"BENCH_CUDA SUMMARY {name}"]
        st, ref, io = res.get("stream"), res.get("reference"), res.get("io")
        if st is not None:
            parts.append(f"step {st['step_s']:.3f}s (target {st['target_step_s']}s: {_ok(st['meets_step_target'])})")
            parts.append(f"peak device {st['peak_device_mib']:.0f} MiB / {st['budget']} "
                         f"({_ok(st['peak_within_budget'])})")
        if ref is not None:
            part = f"reference {ref['ref_s']:.2f}s"
            if "speedup" in ref:
                part += f" -> {ref['speedup']:.1f}x (target >= {SPEEDUP_TARGET:g}x: {_ok(ref['meets_speedup_target'])})"
            if "max_rel_err_vs_stream" in ref:
                part += f", max rel err {ref['max_rel_err_vs_stream']:.1e}"
            parts.append(part)
        if io is not None:
            part = f"io {io['total']:.3f}s"
            if st is not None:
                part += (f" -> step/io {st['step_s'] / io['total']:.2f} "
                         f"(target <= {IO_RATIO_TARGET}: {_ok(st['step_s'] / io['total'] <= IO_RATIO_TARGET)})")
            parts.append(part)
        svd = res.get("svd", {})
        if svd:
            ts = svd.get("thin_svd")
            parts.append("svd " + ", ".join(
                f"{m} {s:.4f}s" + (f" ({s / ts:.1f}x)" if ts and m != "thin_svd" else "") for m, s in svd.items()))
        lines.append(" | ".join(parts))
    return lines
