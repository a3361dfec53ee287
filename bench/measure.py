"""Run one merge step in a fresh process and report its wall time and peak memory.

Peak memory is the process's peak RSS during the step minus its RSS just before
the step (after torch, transformers and opcm_ext are imported): what the step
itself held. The peak is the kernel's VmHWM, reset to the current RSS right
before the step (``/proc/self/clear_refs``); ru_maxrss is not used because Linux
carries it over ``exec`` from the parent process (a child of a big pytest
process would report the parent's size). Usage (the benchmarks call it; it also works by hand):

    python bench/measure.py stream|reference|ties BASE MERGED NEW OUT [--budget 1GiB] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def emit_json(result: dict, path: str | None) -> None:
    """Print a benchmark's result as indented JSON, and write it to ``path`` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["stream", "reference", "ties"])
    p.add_argument("base")
    p.add_argument("merged")
    p.add_argument("new")
    p.add_argument("out")
    p.add_argument("--budget", default="1GiB")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    import torch
    import transformers  # noqa: F401

    import opcm_ext
    import opcm_ext.ops  # noqa: F401  (load the native module before the baseline is taken)
    from opcm_ext.memory import peak_rss as _peak_rss, reset_peak_rss as _reset_peak_rss, rss as _rss

    if a.mode == "reference":
        sys.path.insert(0, str(REPO / "python"))
        import opcm_ref
        from safetensors.torch import load_file, save_file

        from opcm_ext.plan import classify

        state = opcm_ext.read_state(a.merged)
    import gc

    gc.collect()
    if not _reset_peak_rss():
        raise SystemExit("measure.py needs Linux >= 4.0 (/proc/self/clear_refs) to measure the peak RSS")
    baseline = _rss()
    t0 = time.perf_counter()
    if a.mode == "reference":
        # FusionBench-style: whole models in memory, full SVDs, one output file.
        base = load_file(str(Path(a.base) / "model.safetensors"))
        merged = load_file(str(Path(a.merged) / "model.safetensors"))
        new = load_file(str(Path(a.new) / "model.safetensors"))
        tensors = {k: (v.dtype, tuple(v.shape)) for k, v in base.items()}
        proj = set(classify(tensors, Path(a.base)).keys_of(opcm_ext.plan.Kind.PROJECTED))
        ref = opcm_ref.OPCMRef.from_state(merged, t=state.step, lam=state.lam, norms=state.norms, alpha=0.5,
                                          svd_dtype=torch.float32)
        out = ref.step(base, new, proj)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        save_file(out, str(Path(a.out) / "model.safetensors"), metadata={"format": "pt"})
        extra = {}
    else:
        method = "opcm" if a.mode == "stream" else "ties"
        rep = opcm_ext.merge_stream(a.base, a.merged, a.new, a.out, method=method, memory_budget=a.budget,
                                    device=a.device, overwrite=True)
        extra = {"timings": rep.timings, "groups": rep.groups, "sampled_peak_above_baseline": rep.peak_above_baseline_bytes}
    wall = time.perf_counter() - t0
    peak = _peak_rss()
    result = {"mode": a.mode, "wall_s": wall, "baseline_rss": baseline, "peak_rss": peak,
              "peak_above_baseline": max(0, peak - baseline), **extra}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
