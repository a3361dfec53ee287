"""Continual-merging metrics (paper, section 6): the accuracy matrix, ACC and BWT.

An accuracy matrix ``A`` of one merge order has one row per step and one column per task in
merge order: ``A[t][j]`` is the accuracy on the ``j``-th merged task of the checkpoint after
``t + 1`` merges; entries above the diagonal (tasks not merged yet) are ``None`` (or NaN).
"""

from __future__ import annotations

import math
from typing import Sequence

from opcm_ext.errors import ConfigError

__all__ = ["Matrix", "check_matrix", "acc", "bwt", "seen_acc", "mean_std", "summarize_runs"]

Matrix = Sequence[Sequence["float | None"]]


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def check_matrix(matrix: Matrix) -> int:
    """Validate a lower-triangular T x T accuracy matrix; returns T."""
    T = len(matrix)
    if T == 0:
        raise ConfigError("empty accuracy matrix")
    for t, row in enumerate(matrix):
        if len(row) != T:
            raise ConfigError(f"accuracy matrix row {t} has {len(row)} entries, expected {T}")
        for j, v in enumerate(row):
            if j <= t and _missing(v):
                raise ConfigError(f"accuracy matrix entry [{t}][{j}] (on or below the diagonal) is missing")
    return T


def acc(matrix: Matrix) -> float:
    """ACC: mean accuracy of the final checkpoint over all T tasks."""
    T = check_matrix(matrix)
    return sum(matrix[T - 1]) / T


def bwt(matrix: Matrix) -> float:
    """BWT: mean over tasks i < T of A[T-1][i] - A[i][i] (0 for a single task)."""
    T = check_matrix(matrix)
    if T == 1:
        return 0.0
    return sum(matrix[T - 1][i] - matrix[i][i] for i in range(T - 1)) / (T - 1)


def seen_acc(matrix: Matrix) -> list[float]:
    """Mean accuracy over the tasks merged so far, after each step (Figure 5's curve)."""
    check_matrix(matrix)
    return [sum(row[: t + 1]) / (t + 1) for t, row in enumerate(matrix)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0, as numpy's default)."""
    if not values:
        raise ConfigError("mean_std of no values")
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def summarize_runs(runs: Sequence[dict], tasks: Sequence[str]) -> dict:
    """Aggregate per-order runs (each with ``order`` and ``matrix``) into mean ± std figures."""
    accs = [acc(r["matrix"]) for r in runs]
    bwts = [bwt(r["matrix"]) for r in runs]
    finals = {t: [] for t in tasks}
    for r in runs:
        for t, a in zip(r["order"], r["matrix"][-1]):
            finals[t].append(a)
    curves = [seen_acc(r["matrix"]) for r in runs]
    steps = len(curves[0])
    by_step = [mean_std([c[s] for c in curves]) for s in range(steps)]
    acc_m, acc_s = mean_std(accs)
    bwt_m, bwt_s = mean_std(bwts)
    return {
        "acc_mean": acc_m, "acc_std": acc_s, "bwt_mean": bwt_m, "bwt_std": bwt_s,
        "final_mean": {t: mean_std(v)[0] for t, v in finals.items() if v},
        "final_std": {t: mean_std(v)[1] for t, v in finals.items() if v},
        "seen_acc_mean": [m for m, _ in by_step], "seen_acc_std": [s for _, s in by_step],
    }
