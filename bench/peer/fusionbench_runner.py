"""Run FusionBench's own continual merges on checkpoints from disk (executed INSIDE the peer venv).

This script imports fusion_bench (0.2.33, transformers 4) and nothing of opcm_ext, so it runs in the
virtual environment that bench/peer/setup_env.sh creates, never in the project's. It loads the
checkpoints as ``transformers.CLIPVisionModel``s into a ``fusion_bench.BaseModelPool`` (no dataset,
no task pool), runs one method over the given order and saves the final merged state dict as
safetensors with the keys as transformers 4 names them (``vision_model.``...).

    .venv-peer/bin/python bench/peer/fusionbench_runner.py --method opcm --alpha 0.5 \
        --base BASE --models T1 T2 T3 --out merged.safetensors --json timing.json

Methods: ``opcm`` (fusion_bench.method.opcm.opcm_general.OPCM, the general class; ``opcm_clip``
selects OPCMForCLIP, the same math), ``task_arithmetic`` (ContinualTaskArithmeticForCLIP),
``ties`` (ContinualTiesMergingForCLIP). Timings: ``load_s`` (building the pool object),
``merge_s`` (the algorithm's ``run``: it loads every model itself, as FusionBench does),
``save_s``, and ``process_s`` measured by the driver from outside.

``--emulate-release`` reproduces, for OPCM, the code before FusionBench's 2025-03-18 fix (and the
release behind the paper's Table 1): there ``P.diag().fill_(0)`` filled a copy, so the diagonal of
``P`` was never zeroed. The runner gets the same effect by making ``Tensor.diagonal`` return a copy
while ``merge_linear_weights`` runs (its only ``diagonal`` call is that line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def load_model(path: str, dtype: str):
    """``CLIPVisionModel.from_pretrained`` converted to ``dtype`` (the pool's factory for --dtype float64)."""
    import torch
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(path).to(getattr(torch, dtype))


def _pool(base: str, models: list[str], dtype: str = "float32"):
    from fusion_bench import BaseModelPool
    from omegaconf import DictConfig

    def cfg(path: str) -> DictConfig:
        if dtype == "float32":  # as FusionBench's own CLIP configs load models
            return DictConfig({"_target_": "transformers.CLIPVisionModel.from_pretrained",
                               "pretrained_model_name_or_path": str(path)})
        return DictConfig({"_target_": "fusionbench_runner.load_model", "path": str(path), "dtype": dtype})

    entries = {"_pretrained_": cfg(base)}
    for i, m in enumerate(models):
        entries[f"model_{i:03d}"] = cfg(m)  # sorted names keep the given order
    return BaseModelPool(DictConfig(entries))


def _algorithm(method: str, alpha: float, lam: float, keep: float):
    common = dict(shuffle_order=False, seed=None, save_on_every_step=False, evaluate_on_every_step=False)
    if method == "opcm":
        from fusion_bench.method.opcm.opcm_general import OPCM

        algo = OPCM(alpha=alpha, **common)
    elif method == "opcm_clip":
        from fusion_bench.method.opcm import OPCMForCLIP

        algo = OPCMForCLIP(alpha=alpha, **common)
    elif method == "task_arithmetic":
        from fusion_bench.method.opcm import ContinualTaskArithmeticForCLIP

        algo = ContinualTaskArithmeticForCLIP(scaling_factor=lam, **common)
    elif method == "ties":
        from fusion_bench.method.opcm import ContinualTiesMergingForCLIP

        # FusionBench's `threshold` is the percentage of entries KEPT (top-k), as our keep-fraction k.
        algo = ContinualTiesMergingForCLIP(scaling_factor=lam, threshold=round(100.0 * keep, 9), merge_func="sum", **common)
    else:
        raise SystemExit(f"unknown method {method!r}")
    # The CLIP classes read `self._program.taskpool._test_datasets` at the start of `run`, even when
    # they never evaluate; a stand-in with no test sets is enough.
    algo._program = SimpleNamespace(taskpool=SimpleNamespace(_test_datasets={}))
    return algo


def _emulate_release(algo) -> None:
    """Inside ``merge_linear_weights``, ``x.diagonal()`` returns a copy (as ``x.diag()`` did)."""
    import torch

    inner = algo.merge_linear_weights
    original = torch.Tensor.diagonal

    def merge_linear_weights(*args, **kwargs):
        torch.Tensor.diagonal = lambda self, *a, **k: original(self, *a, **k).clone()
        try:
            return inner(*args, **kwargs)
        finally:
            torch.Tensor.diagonal = original

    algo.merge_linear_weights = merge_linear_weights


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, merge with FusionBench, save the result and the timings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=["opcm", "opcm_clip", "task_arithmetic", "ties"])
    p.add_argument("--base", required=True)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--out", required=True, help="merged state dict (.safetensors)")
    p.add_argument("--json", default=None, help="write timings and versions here")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--lam", type=float, default=0.3)
    p.add_argument("--keep", type=float, default=0.2, help="TIES keep-fraction (FusionBench threshold = 100*keep)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64 runs FusionBench's code in double precision: its SVDs and its whole-model "
                        "float32 norms (torch.linalg.norm over ~1e8 entries loses ~1%% on CPU) become exact, "
                        "which isolates the semantic differences from its rounding")
    p.add_argument("--emulate-release", action="store_true",
                   help="OPCM as before FusionBench's 2025-03-18 fix: the diagonal of P is never zeroed")
    a = p.parse_args(argv)
    if a.emulate_release and not a.method.startswith("opcm"):
        p.error("--emulate-release applies to opcm and opcm_clip only")

    t0 = time.perf_counter()
    import torch
    from safetensors.torch import save_file

    if a.threads:
        torch.set_num_threads(a.threads)
    t1 = time.perf_counter()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # hydra imports `fusionbench_runner.load_model`
    pool = _pool(a.base, a.models, a.dtype)
    algo = _algorithm(a.method, a.alpha, a.lam, a.keep)
    if a.emulate_release:
        _emulate_release(algo)
    t2 = time.perf_counter()
    merged = algo.run(pool)
    t3 = time.perf_counter()
    sd = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    save_file(sd, a.out, metadata={"format": "pt"})
    t4 = time.perf_counter()
    if a.json:
        import fusion_bench
        import transformers

        try:
            from importlib.metadata import version

            fb_version = version("fusion-bench")
        except Exception:  # pragma: no cover - metadata missing
            fb_version = getattr(fusion_bench, "__version__", None)
        Path(a.json).write_text(json.dumps({
            "method": a.method, "dtype": a.dtype, "emulate_release": a.emulate_release, "alpha": a.alpha, "lam": a.lam, "keep": a.keep, "models": len(a.models),
            "import_s": round(t1 - t0, 4), "setup_s": round(t2 - t1, 4), "merge_s": round(t3 - t2, 4),
            "save_s": round(t4 - t3, 4), "torch_threads": torch.get_num_threads(),
            "versions": {"fusion_bench": fb_version, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": sys.version.split()[0]},
            "pid": os.getpid(),
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
