"""ACC, BWT and their aggregation, against matrices computed by hand."""

from __future__ import annotations

import math

import pytest

from opcm_ext.errors import ConfigError
from opcm_ext.evaluation.metrics import acc, bwt, check_matrix, mean_std, seen_acc, summarize_runs

# Three tasks merged in order (a, b, c). Row t = after t+1 merges; None above the diagonal.
M3 = [
    [0.90, None, None],
    [0.80, 0.70, None],
    [0.60, 0.65, 0.50],
]


def test_acc_is_mean_of_final_row():
    assert acc(M3) == pytest.approx((0.60 + 0.65 + 0.50) / 3)


def test_bwt_hand_computed():
    # (A[2][0] - A[0][0] + A[2][1] - A[1][1]) / 2 = ((0.60 - 0.90) + (0.65 - 0.70)) / 2
    assert bwt(M3) == pytest.approx(-0.175)


def test_bwt_positive_when_later_merges_help():
    m = [[0.5, None], [0.7, 0.9]]
    assert bwt(m) == pytest.approx(0.2)
    assert acc(m) == pytest.approx(0.8)


def test_single_task():
    assert acc([[0.42]]) == pytest.approx(0.42)
    assert bwt([[0.42]]) == 0.0


def test_nan_above_diagonal_is_accepted():
    m = [[0.9, math.nan], [0.8, 0.7]]
    assert acc(m) == pytest.approx(0.75)
    assert bwt(m) == pytest.approx(-0.1)


def test_seen_acc_curve():
    assert seen_acc(M3) == pytest.approx([0.90, 0.75, (0.60 + 0.65 + 0.50) / 3])


@pytest.mark.parametrize("bad", [[], [[0.5, None]], [[0.5, None], [None, 0.4]], [[0.5], [0.4, 0.3]]],
                         ids=["empty", "not-square", "missing-below-diagonal", "ragged"])
def test_malformed_matrices_are_errors(bad):
    with pytest.raises(ConfigError):
        check_matrix(bad)


def test_mean_std_population():
    m, s = mean_std([0.7, 0.8, 0.9])
    assert m == pytest.approx(0.8)
    assert s == pytest.approx(math.sqrt(((0.1) ** 2 * 2) / 3))
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ConfigError):
        mean_std([])


def test_summarize_runs_maps_final_accuracies_back_to_tasks():
    runs = [
        {"order": ["a", "b", "c"], "matrix": M3},
        {"order": ["c", "a", "b"], "matrix": [[1.0, None, None], [0.8, 0.6, None], [0.7, 0.5, 0.4]]},
    ]
    s = summarize_runs(runs, ["a", "b", "c"])
    acc2 = (0.7 + 0.5 + 0.4) / 3
    assert s["acc_mean"] == pytest.approx((acc(M3) + acc2) / 2)
    assert s["acc_std"] == pytest.approx(abs(acc(M3) - acc2) / 2)
    bwt2 = ((0.7 - 1.0) + (0.5 - 0.6)) / 2
    assert s["bwt_mean"] == pytest.approx((-0.175 + bwt2) / 2)
    # order 2 ends with c=0.7, a=0.5, b=0.4
    assert s["final_mean"] == pytest.approx({"a": (0.60 + 0.5) / 2, "b": (0.65 + 0.4) / 2, "c": (0.50 + 0.7) / 2})
    assert s["seen_acc_mean"][0] == pytest.approx((0.9 + 1.0) / 2)
    assert len(s["seen_acc_std"]) == 3
