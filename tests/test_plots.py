"""Figures from a report, and `opcm plot` on a saved report."""

from __future__ import annotations

import json

import pytest

from opcm_ext.cli import main
from opcm_ext.evaluation.metrics import acc, bwt, summarize_runs
from opcm_ext.evaluation.report import format_table, load_report, save_report
from opcm_ext.evaluation.runner import REPORT_FORMAT, REPORT_VERSION, make_orders
from opcm_ext.plots import plot_report

TASKS = ["t1", "t2", "t3", "t4"]


def synthetic_report(methods=("opcm", "task_arithmetic", "ties", "average"), n_orders=3):
    orders = make_orders(TASKS, n_orders, seed=1)
    rep = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "tasks": TASKS, "seed": 1, "orders": orders,
           "reference": {"pretrained": {t: 0.3 for t in TASKS}, "finetuned": {t: 0.9 for t in TASKS}},
           "methods": {}}
    for k, m in enumerate(methods):
        runs = []
        for order in orders:
            T = len(order)
            matrix = [[0.9 - 0.05 * (t - j) - 0.02 * k for j in range(t + 1)] + [None] * (T - t - 1) for t in range(T)]
            runs.append({"order": order, "matrix": matrix, "acc": acc(matrix), "bwt": bwt(matrix),
                         "lam": [(t + 1) ** 0.5 * 0.95 for t in range(T)] if m == "opcm" else None, "norms": [1.0] * T})
        rep["methods"][m] = {"method": m, "params": {}, "runs": runs, "summary": summarize_runs(runs, TASKS)}
    return rep


def test_plot_report_writes_three_pngs(tmp_path):
    files = plot_report(synthetic_report(), tmp_path)
    assert [f.name for f in files] == ["accuracy_matrices.png", "lambda.png", "acc_vs_tasks.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


def test_no_lambda_plot_without_opcm(tmp_path):
    files = plot_report(synthetic_report(methods=("average",), n_orders=1), tmp_path)
    assert [f.name for f in files] == ["accuracy_matrices.png", "acc_vs_tasks.png"]


def test_table_rows():
    text = format_table(synthetic_report())
    lines = text.splitlines()
    assert any(ln.startswith("Pre-trained") and "30.0" in ln for ln in lines)
    assert any(ln.startswith("Individual fine-tuned") and "90.0" in ln for ln in lines)
    assert any(ln.startswith("OPCM") and "±" in ln for ln in lines)


def test_plot_command_on_saved_report(tmp_path, capsys):
    save_report(synthetic_report(), tmp_path / "run" / "report.json")
    assert main(["plot", str(tmp_path / "run" / "report.json"), "--out", str(tmp_path / "figs"), "--table"]) == 0
    out = capsys.readouterr().out
    assert "OPCM" in out and "acc_vs_tasks.png" in out
    assert (tmp_path / "figs" / "lambda.png").exists()
    assert main(["plot", str(tmp_path / "run")]) == 0  # a folder holding report.json works too
    assert (tmp_path / "run" / "accuracy_matrices.png").exists()


def test_plot_command_rejects_other_json(tmp_path, capsys):
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    assert main(["plot", str(tmp_path / "x.json")]) == 2
    assert "not an opcm-ext continual-merge report" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.json")]) == 2
    with pytest.raises(Exception):
        load_report(tmp_path / "x.json")
