"""Process memory during a step: malloc tuning (freed tensors leave the resident set) and peak RSS."""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["tune_malloc", "RssSampler", "rss", "peak_rss", "reset_peak_rss"]


def _mallopt_mmap_threshold(nbytes: int) -> bool:
    if os.environ.get("OPCM_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        return mallopt is not None and bool(mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except OSError:  # pragma: no cover - no libc to talk to
        return False


class tune_malloc:
    """During a step, make glibc return freed large blocks to the system at once.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
    which tensors of a few MiB come from the heap and their freed pages stay resident: a
    ViT-B/32 step then held ~250 MiB more than its live tensors. A fixed 1 MiB threshold
    (mallopt M_MMAP_THRESHOLD) keeps every tensor-sized block in its own mapping, so the
    resident set follows what is alive and the memory budget holds. On exit the threshold
    goes to 32 MiB (glibc's own ceiling), so the caller's later work (e.g. evaluation, many
    mid-size activations) does not pay a page fault per allocation. glibc only;
    OPCM_MALLOC_TUNE=0 leaves malloc alone.
    """

    def __enter__(self) -> "tune_malloc":
        self.active = _mallopt_mmap_threshold(1 << 20)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            _mallopt_mmap_threshold(32 << 20)


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the kernel's peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssSampler:
    """The peak resident set size since this object was made: the kernel's VmHWM, reset at
    creation (Linux), and samples every few milliseconds where that is not available."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self._hwm = reset_peak_rss()
        self.baseline = rss()
        self.peak = self.baseline
        self._stop = threading.Event()
        # Polling is only the fallback: with VmHWM the kernel tracks the peak exactly, for free.
        self._thread = None if self._hwm else threading.Thread(target=self._run, name="opcm-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> "RssSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "RssSampler":
        """Start sampling (only where the kernel does not track the peak)."""
        if self._thread is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and record the peak."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss())
        hwm = peak_rss() if self._hwm else None
        if hwm is not None:
            self.peak = max(self.peak, hwm)


def rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
