"""CPU benchmarks on ViT-B/32-shaped checkpoints (88M parameters, fp32, in the page cache).

Run with:  pytest bench -m benchmark -p no:randomly --benchmark-columns=min,mean,max,rounds
Each step benchmark also runs the step once in a fresh process to measure its peak memory
(ru_maxrss minus the RSS before the step), stored in the benchmark's extra_info.
Record the figures in bench/RESULTS.md (machine, date, ratios from one run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.benchmark

CACHE = Path(os.environ.get("OPCM_BENCH_CACHE", "/tmp/opcm-bench-cache"))


def _family() -> dict[str, Path]:
    """base, task1, task2 with ViT-B/32 vision shapes, plus step-1 merges for OPCM and TIES (cached)."""
    import opcm_ext
    from helpers import make_family, vit_b32_config

    root = CACHE / "vit_b32"
    done = root / "ready"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        make_family(root, vit_b32_config(), "CLIPVisionModel", 2, seed=42)
        opcm_ext.merge_stream(root / "base", None, root / "task1", root / "merged_opcm", overwrite=True)
        opcm_ext.merge_stream(root / "base", None, root / "task1", root / "merged_ties", method="ties", overwrite=True)
        done.write_text("ok")
    return {n: root / n for n in ("base", "task1", "task2", "merged_opcm", "merged_ties")}


@pytest.fixture(scope="module")
def family():
    return _family()


def _measure(mode: str, f: dict, out: Path, budget: str = "1GiB") -> dict:
    merged = f["merged_ties"] if mode == "ties" else f["merged_opcm"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "measure.py"), mode, str(f["base"]), str(merged), str(f["task2"]),
         str(out), "--budget", budget],
        capture_output=True, text=True, check=True, cwd=str(REPO),
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def test_step_reference(benchmark, family, tmp_path):
    """FusionBench-style: load three whole models, full SVD per layer, save."""
    out = tmp_path / "ref"
    mem = _measure("reference", family, out)
    benchmark.extra_info.update(peak_above_baseline_mib=_mib(mem["peak_above_baseline"]), subprocess_wall_s=mem["wall_s"])
    benchmark.pedantic(lambda: _measure_inprocess("reference", family, out), rounds=1, iterations=1)


@pytest.mark.parametrize("budget", ["256MiB", "1GiB"])
def test_step_stream(benchmark, family, tmp_path, budget):
    out = tmp_path / "stream"
    mem = _measure("stream", family, out, budget)
    benchmark.extra_info.update(budget=budget, peak_above_baseline_mib=_mib(mem["peak_above_baseline"]),
                                subprocess_wall_s=mem["wall_s"], timings=mem["timings"])
    benchmark.pedantic(lambda: _measure_inprocess("stream", family, out, budget), rounds=2, iterations=1)


def test_step_ties(benchmark, family, tmp_path):
    out = tmp_path / "ties"
    mem = _measure("ties", family, out, "512MiB")
    benchmark.extra_info.update(budget="512MiB", peak_above_baseline_mib=_mib(mem["peak_above_baseline"]),
                                subprocess_wall_s=mem["wall_s"], timings=mem["timings"])
    benchmark.pedantic(lambda: _measure_inprocess("ties", family, out, "512MiB"), rounds=1, iterations=1)


def _measure_inprocess(mode, f, out, budget="1GiB"):
    import measure

    merged = f["merged_ties"] if mode == "ties" else f["merged_opcm"]
    return measure.main([mode, str(f["base"]), str(merged), str(f["task2"]), str(out), "--budget", budget])


def _vit_b32_weights():
    g = torch.Generator().manual_seed(0)
    shapes = [(768, 768)] * 48 + [(3072, 768)] * 12 + [(768, 3072)] * 12
    return [torch.randn(s, generator=g) * 0.02 for s in shapes]


@pytest.fixture(scope="module")
def weights():
    return _vit_b32_weights()


def _grouped(ws):
    groups: dict[tuple, list] = {}
    for w in ws:
        groups.setdefault(tuple(w.shape), []).append(w)
    return [torch.stack(v) for v in groups.values()]


def test_svd_thin_ops(benchmark, weights):
    """The product's SVD phase: ops.thin_svd on same-shape batches of the 72 ViT-B/32 linear weights."""
    from opcm_ext import ops

    batches = _grouped(weights)
    benchmark.pedantic(lambda: [ops.thin_svd(b) for b in batches], rounds=1, iterations=1)


@pytest.mark.parametrize("full", [True, False], ids=["full-loop", "thin-loop"])
def test_svd_torch_loop(benchmark, weights, full):
    """FusionBench's way: torch.linalg.svd per matrix (full U and V), or the thin SVD per matrix."""
    benchmark.pedantic(lambda: [torch.linalg.svd(w, full_matrices=full) for w in weights], rounds=1, iterations=1)


def test_projection_full_reference(benchmark, weights):
    """The reference's projection (full SVD, m x m U) of all 72 weights, for the ratio to the thin form."""
    import opcm_ref

    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(w.shape, generator=g) * 0.02 for w in weights]
    benchmark.pedantic(lambda: [opcm_ref.project(w, t, 0.5, torch.float32) for w, t in zip(weights, ts)],
                       rounds=1, iterations=1)


def test_projection_thin_ops(benchmark, weights):
    """Batched thin SVD + projection of all 72 weights, one op after the other (the GPU path's order)."""
    from opcm_ext import ops

    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(w.shape, generator=g) * 0.02 for w in weights]
    batches = _grouped(weights)
    tbatches = _grouped(ts)

    def run():
        for M, T in zip(batches, tbatches):
            U, S, V = ops.thin_svd(M)
            ops.project(T, U, S, V, 0.5)

    benchmark.pedantic(run, rounds=1, iterations=1)


def test_projection_svd_project(benchmark, weights):
    """What OPCM's pass runs: ops.svd_project per same-shape group (CPU: each matrix decomposed and
    projected on one single-threaded worker, float64 buffers reused)."""
    from opcm_ext import ops

    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(w.shape, generator=g) * 0.02 for w in weights]
    groups: dict[tuple, tuple[list, list]] = {}
    for w, t in zip(weights, ts):
        ms_, ts_ = groups.setdefault(tuple(w.shape), ([], []))
        ms_.append(w)
        ts_.append(t)
    benchmark.pedantic(lambda: [ops.svd_project(m, t, 0.5) for m, t in groups.values()], rounds=1, iterations=1)


@pytest.mark.parametrize("form", ["masked", "cheap"])
def test_projection_form(benchmark, weights, form):
    """The projection alone, given the SVDs, for all 72 weights: the masked form (P = U^T T V, the
    C++ mask kernel, T - (U Q) V^T with batched GEMMs, as the CUDA path does) against the cheap
    form the CPU uses (T - Y V^T, skipping Q's zero blocks)."""
    from opcm_ext import _native, ops

    C = _native.cpu()
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(w.shape, generator=g) * 0.02 for w in weights]
    batches, tbatches = _grouped(weights), _grouped(ts)
    svds = [ops.thin_svd(M) for M in batches]
    prepared = []
    for T, (U, S, V) in zip(tbatches, svds):
        B, m, n = T.shape
        keep = ops.keep_count(S, m, n)
        r = ops.split_rank(torch.where(torch.arange(S.shape[1]) < keep[:, None], S, 0.0), 0.5)
        prepared.append((T, U, V, r.contiguous(), keep.contiguous()))

    def masked():
        for T, U, V, r, keep in prepared:
            B, m, n = T.shape
            P = (torch.bmm(torch.bmm(U.mT, T), V) if m >= n else torch.bmm(U.mT, torch.bmm(T, V))).contiguous()
            C.mask_projection(P.data_ptr(), r.data_ptr(), keep.data_ptr(), B, P.shape[-1], P.data_ptr())
            if m <= n:
                torch.baddbmm(T, torch.bmm(U, P), V.mT, beta=1.0, alpha=-1.0)
            else:
                torch.baddbmm(T, U, torch.bmm(P, V.mT), beta=1.0, alpha=-1.0)

    def cheap():
        for T, U, V, r, keep in prepared:
            ops._project_torch(T, U, V, r, keep)

    benchmark.pedantic(masked if form == "masked" else cheap, rounds=3, iterations=1)


_N = 87_849_216  # ViT-B/32 vision parameters, fp32


@pytest.fixture(scope="module")
def flat():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(_N, generator=g)
    return base, base + 0.01 * torch.randn(_N, generator=g), base + 0.01 * torch.randn(_N, generator=g)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("op", ["deltas", "sigma_update", "sumsq", "finalize"])
def test_elementwise(benchmark, flat, op, backend):
    """The fused elementwise passes over a whole ViT-B/32 (88M fp32): the C++/OpenMP kernels vs their torch twins."""
    from opcm_ext import ops

    base, merged, new = flat
    M, T = merged - base, new - base
    calls = {
        "deltas": lambda: ops.deltas(base, merged, new, backend=backend),
        "sigma_update": lambda: ops.sigma_update(M, T, 1.4, backend=backend),
        "sumsq": lambda: ops.sumsq(M, backend=backend),
        "finalize": lambda: ops.finalize(base, M, 1.7, torch.float32, backend=backend),
    }
    benchmark.pedantic(calls[op], rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_projection_mask(benchmark, backend):
    """The projection mask of 12 ViT-B/32 768x768 P matrices: the C++ kernel vs its torch twin (torch.where)."""
    from opcm_ext import _native, ops

    g = torch.Generator().manual_seed(3)
    P = torch.randn(12, 768, 768, generator=g)
    r, keep = torch.full((12,), 256, dtype=torch.int64), torch.full((12,), 760, dtype=torch.int64)
    Q = torch.empty_like(P)
    C = _native.cpu()
    calls = {
        "native": lambda: C.mask_projection(P.data_ptr(), r.data_ptr(), keep.data_ptr(), 12, 768, Q.data_ptr()),
        "torch": lambda: ops._mask_torch(P, r, keep),
    }
    benchmark.pedantic(calls[backend], rounds=5, iterations=1, warmup_rounds=1)
