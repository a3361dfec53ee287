"""The pure-I/O floor of one merge step: read the inputs, move them to the device, write one output.

``io_time(base, merged, new, out_dir, device)`` reads every tensor of the three input
checkpoints with ``opcm_ext.io.CheckpointReader`` (one tensor at a time, as the
engine does), copies each to ``device``, and writes an output with the layout of the
checkpoint a step would mirror (``merged``, else ``base``) through the package's
``SafetensorsWriter`` (fsync'd on close, like a committed step). No arithmetic: a merge
step cannot be faster than this, so ``step_time / io_time(...)["total"]`` says how much
the step adds on top of moving its bytes.

Returned seconds: ``read`` (disk or page cache -> host tensors), ``h2d`` (host -> device,
synchronised per tensor; 0 on the CPU), ``d2h`` (the output's tensors back to the host;
0 on the CPU), ``write`` (pwrite + fsync of the output) and ``total`` (wall time of all
of it). Also ``bytes_read`` and ``bytes_written``. Call ``warm_page_cache`` first to time
the page-cache case (the benchmarks do).

Used by bench/test_bench_cuda.py; the CPU benchmarks can reuse it with ``device="cpu"``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from opcm_ext.io import CheckpointReader, SafetensorsWriter, fsync_path

__all__ = ["io_time", "warm_page_cache"]


def warm_page_cache(*checkpoints: str | os.PathLike[str] | None) -> int:
    """Read every weight file of the given checkpoints once (None entries are skipped); returns the bytes read."""
    total = 0
    buf = bytearray(16 << 20)
    mv = memoryview(buf)
    for ckpt in checkpoints:
        if ckpt is None:
            continue
        with CheckpointReader(ckpt) as r:
            files = list(r.files)
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(mv)
                    if not n:
                        break
                    total += n
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def io_time(
    base: str | os.PathLike[str],
    merged: str | os.PathLike[str] | None,
    new: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    pin: bool = False,
) -> dict[str, float]:
    """Seconds to read ``base``, ``merged`` (None at step 1) and ``new``, copy them to ``device`` and write one output.

    The output (in ``out_dir``, created if needed; weight files of the same names there
    are replaced) has the layout, dtypes and bytes of ``merged`` (else ``base``); its
    tensors make the round trip host -> device -> host before they are written.
    ``pin=True`` pins each host tensor before the copy (the pinning is counted in ``h2d``),
    as the engine does on CUDA.
    """
    device = torch.device(device)
    on_device = device.type != "cpu"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    roles = [(r, p) for r, p in (("base", base), ("merged", merged), ("new", new)) if p is not None]
    readers = {r: CheckpointReader(p) for r, p in roles}
    try:
        like_role = "merged" if "merged" in readers else "base"
        like = readers[like_role]
        layout = [
            (fname, [(k, like.info(k).dtype, tuple(like.info(k).shape)) for k in keys])
            for fname, keys in like.layout
        ]
        for fname, _ in layout:  # the writer only creates new files
            (out_dir / fname).unlink(missing_ok=True)
        (out_dir / "model.safetensors.index.json").unlink(missing_ok=True)
        _sync(device)

        t_read = t_h2d = t_d2h = t_write = 0.0
        n_read = 0
        start = time.perf_counter()
        t0 = time.perf_counter()
        writer = SafetensorsWriter(out_dir, layout, {"format": "pt"})
        t_write += time.perf_counter() - t0
        try:
            for role, reader in readers.items():
                for k in reader.keys():
                    t0 = time.perf_counter()
                    t = reader.read(k)
                    t_read += time.perf_counter() - t0
                    n_read += reader.info(k).nbytes
                    if on_device:
                        t0 = time.perf_counter()
                        src = t.pin_memory() if pin else t
                        d = src.to(device, non_blocking=pin)
                        _sync(device)
                        t_h2d += time.perf_counter() - t0
                    if role == like_role:
                        if on_device:
                            t0 = time.perf_counter()
                            t = d.to("cpu")
                            t_d2h += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        writer.write(k, t.contiguous())
                        t_write += time.perf_counter() - t0
                    del t
                    if on_device:
                        del d
            t0 = time.perf_counter()
            writer.close()  # fsyncs every shard (and writes the index when sharded)
            fsync_path(out_dir, directory=True)
            t_write += time.perf_counter() - t0
        except BaseException:
            writer.abort()
            raise
        total = time.perf_counter() - start
        return {
            "read": t_read,
            "h2d": t_h2d,
            "d2h": t_d2h,
            "write": t_write,
            "total": total,
            "bytes_read": n_read,
            "bytes_written": like.total_bytes,
        }
    finally:
        for r in readers.values():
            r.close()
