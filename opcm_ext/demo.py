"""``opcm demo``: merge the shipped zoo with OPCM and the three baselines, print Table 1, draw the figures."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from opcm_ext.evaluation.report import format_final_accuracies, format_table, save_report
from opcm_ext.evaluation.runner import DEFAULT_METHODS, run_experiment

__all__ = ["run_demo", "DEMO_ORDERS"]

DEMO_ORDERS = 3


def idle_cores() -> int:
    """CPU cores not busy right now: the CPU count minus the rounded 1-minute load average (>= 1)."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(n, n - busy))


def run_demo(out_dir: str | Path, *, orders: int = DEMO_ORDERS, methods: Sequence[str] | None = None, seed: int = 0,
             zoo: str | Path | None = None, tasks: Sequence[str] | None = None, progress: bool = True,
             plots: bool = True, device: str = "cpu", threads: int | str | None = "idle", keep_dir: str | Path | None = None,
             stream=None) -> dict:
    """Run the demo; writes ``report.json`` and the PNG figures into ``out_dir`` and returns the report.

    ``tasks`` restricts the zoo's tasks (all by default); ``device`` is where both merging and
    evaluation run; ``threads`` sets torch's CPU threads for the run (restored afterwards; None
    leaves torch's default); ``keep_dir`` keeps every intermediate merged checkpoint
    (``keep_dir/<method>/order<k>/step<t>``) instead of a temporary folder. ``threads="idle"``
    (the default) uses the cores that are idle now (the CPU count minus the 1-minute load
    average, at least 1): on an idle two-core VM two threads ran a one-order demo in 48 s
    against 64 s for one, but on the same machine with another job running two threads
    were 2.5x slower than one (oversubscription).
    """
    import torch

    previous_threads = torch.get_num_threads()
    if threads == "idle":
        threads = idle_cores()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(out_dir, orders, methods, seed, zoo, tasks, progress, plots, device, keep_dir,
                    stream or sys.stdout)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out_dir, orders, methods, seed, zoo, tasks, progress, plots, device, keep_dir, stream) -> dict:
    from opcm_ext.zoo import Zoo

    t0 = time.perf_counter()
    z = Zoo(zoo)
    names = list(tasks) if tasks is not None else z.tasks
    models = {t: z.model(t) for t in names}
    method_params = {m: DEFAULT_METHODS[m] for m in (methods or DEFAULT_METHODS)}
    report = run_experiment(z.base, models, z.evaluator(device=device), methods=method_params, num_orders=orders,
                            seed=seed, progress=progress, merge_kwargs={"device": device}, keep_dir=keep_dir,
                            meta={"kind": "demo", "zoo": str(z.root)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["runtime_s"] = round(time.perf_counter() - t0, 2)
    save_report(report, out / "report.json")
    files = []
    if plots:
        from opcm_ext.plots import plot_report

        files = plot_report(report, out)
    print(format_table(report, title=f"opcm demo: the example zoo, {len(names)} tasks, "
                                     f"{orders} order{'s' if orders != 1 else ''} (seed {seed})"), file=stream)
    print("", file=stream)
    print("Final accuracy per task (%), mean over orders:", file=stream)
    print(format_final_accuracies(report), file=stream)
    print("", file=stream)
    print(f"wrote {out / 'report.json'}" + "".join(f", {f.name}" for f in files) +
          f" in {report['runtime_s']:.0f}s", file=stream)
    return report
