"""Scaling of one OPCM step with model width and with the number of Ray workers (issue 14).

Run (minutes; only on a quiet machine, the figures are wall times):

    pytest bench/test_bench_scaling.py -m slow_bench -s

It writes ``bench/results-scaling-<date>.json`` and ``bench/scaling.png`` (``OPCM_BENCH_OUT=DIR``
writes them elsewhere). Sizes come from the environment: ``OPCM_BENCH_WIDTHS`` (default
512,1024,2048,4096), ``OPCM_BENCH_DEPTH`` (2), ``OPCM_BENCH_WORKERS`` (1,2), ``OPCM_BENCH_BUDGET``
(2GiB: at width 4096 the SVDs stream block by block; a 4096 x 4096 matrix needs at least 1.3 GiB).

Model: a plain stack of DEPTH square linear layers (``layers.i.weight`` H x H and its bias), fp32,
one file per checkpoint, no config.json (the fallback rule projects every weight). The step
timed is OPCM at t = 2 (base, merged after one model, a new model -> output), the SVD-bound
step; Task Arithmetic's step on the same checkpoints (local) is the I/O and element-wise floor.
Each configuration runs in a fresh process (``python bench/test_bench_scaling.py child ...``) with
an empty hash cache (every step hashes its two inputs): ``local`` is the default executor (torch's
threads on every core); ``ray:N`` starts a local Ray instance with N CPUs (one single-threaded task
per CPU). Each child runs one warm-up step on the smallest width (the backend's self-test, Ray's
worker start and imports are not timed), reads the inputs once into the page cache, then times
one step.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("OPCM_BENCH_CACHE", "/tmp/opcm-bench-cache")) / "scaling"

pytestmark = pytest.mark.slow_bench


def _ints(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


def family(width: int, depth: int) -> dict[str, Path]:
    """base, task1, task2 and the OPCM merge after task1 (t = 1), cached per (width, depth)."""
    import torch
    from safetensors.torch import save_file

    import opcm_ext

    root = CACHE / f"w{width}-d{depth}"
    names = ("base", "task1", "task2", "merged")
    if not (root / "ready").exists():
        shutil.rmtree(root, ignore_errors=True)
        g = torch.Generator().manual_seed(width * 100 + depth)
        base = {}
        for i in range(depth):
            base[f"layers.{i}.weight"] = torch.randn(width, width, generator=g) * width**-0.5
            base[f"layers.{i}.bias"] = torch.randn(width, generator=g) * 0.02
        for name in names[:3]:
            sd = base if name == "base" else {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g)
                                              for k, v in base.items()}
            (root / name).mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(root / name / "model.safetensors"))
        opcm_ext.merge_stream(root / "base", None, root / "task1", root / "merged", device="cpu")
        (root / "ready").write_text("ok")
    return {n: root / n for n in names}


def _warm_page_cache(paths: list[Path]) -> None:
    for p in paths:
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def child(argv: list[str]) -> dict:
    """One configuration in this (fresh) process: ``child EXECUTOR METHOD WIDTH DEPTH BUDGET``."""
    executor, method, width, depth, budget = argv[0], argv[1], int(argv[2]), int(argv[3]), argv[4]
    import opcm_ext

    f = family(width, depth)
    # Task Arithmetic continues the OPCM merge (same reads and writes): allow the change of method.
    options: dict = dict(device="cpu", memory_budget=budget, method=method, allow_param_change=True)
    if executor.startswith("ray:"):
        from opcm_ext.executors.ray import init_ray

        init_ray(num_cpus=int(executor[4:]), include_dashboard=False, log_to_driver=False,
                 object_store_memory=128 << 20)
        options["executor"] = "ray"
    small = family(min(_ints("OPCM_BENCH_WIDTHS", "512,1024,2048,4096")), depth)
    out = CACHE / "out-warmup"  # one-time costs (backend self-test, Ray workers' start and imports) untimed
    opcm_ext.merge_stream(small["base"], small["merged"], small["task2"], out, overwrite=True, **options)
    _warm_page_cache([f["base"], f["merged"], f["task2"]])
    out = CACHE / f"out-{executor.replace(':', '')}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rep = opcm_ext.merge_stream(f["base"], f["merged"], f["task2"], out, **options)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return dict(executor=executor, method=method, width=width, depth=depth, budget=budget, wall_s=wall,
                groups=rep.groups, streamed=rep.streamed, timings=rep.timings)


def _run_child(*args: object) -> dict:
    with tempfile.TemporaryDirectory() as cache:  # every step hashes its inputs (no hash cache across runs)
        proc = subprocess.run([sys.executable, __file__, "child", *map(str, args)], capture_output=True, text=True,
                              cwd=str(REPO), timeout=3600, env=dict(os.environ, OPCM_CACHE_DIR=cache))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import ray
    import torch

    import opcm_ext

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return dict(date=date.today().isoformat(), cpu=cpu, cores=len(os.sched_getaffinity(0)),
                python=platform.python_version(), torch=torch.__version__, ray=ray.__version__,
                opcm_ext=opcm_ext.__version__)


def plot(results: list[dict], path: Path) -> None:
    """Step time against width per executor, and the speed-up of N Ray workers over one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    opcm = [r for r in results if r["method"] == "opcm"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ex in sorted({r["executor"] for r in opcm}):
        rows = sorted((r["width"], r["wall_s"]) for r in opcm if r["executor"] == ex)
        ax.plot(*zip(*rows), marker="o", label=f"OPCM step, {ex}")
    floor = sorted((r["width"], r["wall_s"]) for r in results if r["method"] == "task_arithmetic")
    if floor:
        ax.plot(*zip(*floor), "k--", marker=".", label="Task Arithmetic step, local (I/O floor)")
    ax.set(xscale="log", yscale="log", xlabel="hidden width H (depth fixed)", ylabel="step wall time (s)",
           title="One step against model width")
    ax.set_xticks(sorted({r["width"] for r in opcm}), [str(w) for w in sorted({r["width"] for r in opcm})])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=8)
    one = {r["width"]: r["wall_s"] for r in opcm if r["executor"] == "ray:1"}
    for ex in sorted({r["executor"] for r in opcm} - {"ray:1"}):
        rows = sorted((r["width"], one[r["width"]] / r["wall_s"]) for r in opcm
                      if r["executor"] == ex and r["width"] in one)
        if rows:
            ax2.plot(*zip(*rows), marker="o", label=ex)
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set(xscale="log", xlabel="hidden width H", ylabel="speed-up over ray:1", title="Ray workers")
    ax2.set_xticks(sorted(one), [str(w) for w in sorted(one)])
    ax2.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def test_scaling_with_width_and_workers():
    pytest.importorskip("ray")
    widths = _ints("OPCM_BENCH_WIDTHS", "512,1024,2048,4096")
    depth = _ints("OPCM_BENCH_DEPTH", "2")[0]
    workers = _ints("OPCM_BENCH_WORKERS", "1,2")
    budget = os.environ.get("OPCM_BENCH_BUDGET", "2GiB")
    out = Path(os.environ.get("OPCM_BENCH_OUT", REPO / "bench"))
    results = []
    for w in widths:
        family(w, depth)  # build outside the timed children
        results.append(_run_child("local", "task_arithmetic", w, depth, budget))
        for ex in ["local"] + [f"ray:{n}" for n in workers]:
            results.append(_run_child(ex, "opcm", w, depth, budget))
            print(json.dumps({k: results[-1][k] for k in ("executor", "width", "wall_s", "groups", "streamed")}))
    doc = dict(machine=_machine(), widths=widths, depth=depth, workers=workers, budget=budget, results=results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results-scaling-{doc['machine']['date']}.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(results, out / "scaling.png")
    assert all(r["wall_s"] > 0 for r in results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        print(json.dumps(child(sys.argv[2:])))
    else:
        sys.exit("usage: python bench/test_bench_scaling.py child EXECUTOR METHOD WIDTH DEPTH BUDGET "
                 "(the benchmark itself: pytest bench/test_bench_scaling.py -m slow_bench -s)")
