"""docs/algorithm.md, "Metrics": ACC and BWT from an accuracy matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["acc", "bwt"]


def _matrix(acc_matrix: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    a = np.asarray(acc_matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(
            "acc_matrix must be square T x T with A[i][j] = accuracy on task j "
            f"after i+1 tasks, got shape {a.shape}"
        )
    return a


def acc(acc_matrix: Sequence[Sequence[float]] | np.ndarray) -> float:
    """ACC = mean over all T tasks of acc_j(theta(T)) = mean_j A[T-1][j]."""
    a = _matrix(acc_matrix)
    return float(np.mean(a[-1, :]))


def bwt(acc_matrix: Sequence[Sequence[float]] | np.ndarray) -> float:
    """BWT = mean over i < T of acc_i(theta(T)) - acc_i(theta(i)); NaN when T = 1."""
    # 1-based `i < T` is 0-based i < T-1; A[i][i] is task i right after it
    # was merged. With T = 1 the mean is over an empty set: NaN (undefined).
    a = _matrix(acc_matrix)
    T = a.shape[0]
    if T == 1:
        return float("nan")
    diffs = [a[T - 1, i] - a[i, i] for i in range(T - 1)]
    return float(np.mean(diffs))
