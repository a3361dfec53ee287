"""Run a pass in this process: read the next group on a one-worker thread pool while this one computes."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from ..methods.base import ScanSums, Sums
from ..plan import Group, Streamed

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """One process, one device: prefetch one group ahead when both fit the memory budget."""

    def run_pass(self, runner, advance: Callable[[int], None]) -> tuple[Sums, ScanSums | None]:
        """Run ``runner.p`` over every unit; returns the pass's sums and, in a first pass, the scan."""
        worker, p, reads = runner.worker, runner.p, runner.reads
        budget = runner.job.plan.budget
        sums = p.sums().to(worker.device)
        scan = ScanSums().to(worker.device) if runner.scan else None
        units = runner.units()
        timings = sums.timings
        with ThreadPoolExecutor(1, thread_name_prefix="opcm-read") as pool:

            def read(i: int) -> Future | None:
                u = units[i] if i < len(units) else None
                return pool.submit(_timed_fetch, worker, reads, u, i % 2) if isinstance(u, Group) else None

            pending = read(0)
            for i, u in enumerate(units):
                if isinstance(u, Streamed):
                    t0 = time.perf_counter()
                    worker.streamed(p, u, sums, scan)
                    timings["compute"] = timings.get("compute", 0.0) + time.perf_counter() - t0
                    pending = read(i + 1)
                    continue
                t0 = time.perf_counter()
                data, took = pending.result()  # type: ignore[union-attr]
                timings["read_wait"] = timings.get("read_wait", 0.0) + time.perf_counter() - t0
                timings["read"] = timings.get("read", 0.0) + took
                data = worker.to_device(p, data, i % 2)
                nxt = units[i + 1] if i + 1 < len(units) else None
                early = isinstance(nxt, Group) and u.cost + nxt.input_bytes <= budget
                pending = read(i + 1) if early else None
                t0 = time.perf_counter()
                worker.process(p, u, data, sums, scan)
                del data
                timings["compute"] = timings.get("compute", 0.0) + time.perf_counter() - t0
                if not early:
                    pending = read(i + 1)
                advance(u.input_bytes)
        return sums, scan


def _timed_fetch(worker, reads, group: Group, slot: int):
    t0 = time.perf_counter()
    data = worker.fetch(reads, group, slot)
    return data, time.perf_counter() - t0
