"""Evaluation of continual merges: metrics, the order runner, CLIP zero-shot heads, dataset folders.

Modules (imported lazily so that the CLI stays fast to start):
- ``metrics``: ACC, BWT, per-step seen-task accuracy, mean ± std.
- ``runner``: ``make_orders``, ``run_method``, ``run_experiment`` (merges via ``opcm_ext.merge_stream``).
- ``prompts``: FusionBench's curated class names and templates of the paper's 20 tasks (shipped
  as data, checked against each test set's class count), precomputed head files.
- ``heads``: zero-shot heads from a full CLIP model's text tower.
- ``datasets``: ImageFolder / ``save_to_disk`` test sets, CLIP preprocessing.
- ``clip_eval``: batched accuracy of a CLIP vision checkpoint with a fixed head.
- ``reproduce``: the paper's Table 1 from local public checkpoints and test sets.
- ``report``: save/load reports, the Table-1-style text table.
- ``cli``: the ``demo``, ``eval``, ``reproduce``, ``heads`` and ``plot`` subcommands.
"""

from __future__ import annotations

from typing import Any

__all__ = ["acc", "bwt", "mean_std", "make_orders", "run_method", "run_experiment", "zeroshot_head",
           "load_report", "save_report", "format_table"]

_LAZY = {
    "acc": "metrics", "bwt": "metrics", "mean_std": "metrics",
    "make_orders": "runner", "run_method": "runner", "run_experiment": "runner",
    "zeroshot_head": "heads",
    "load_report": "report", "save_report": "report", "format_table": "report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'opcm_ext.evaluation' has no attribute {name!r}")
