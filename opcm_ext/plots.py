"""Figures from a continual-merge report (matplotlib, Agg backend; PNG files).

- ``accuracy_matrices.png``: each method's accuracy matrix for one order (rows = step, columns =
  tasks in merge order), as in the paper's Figure 12;
- ``lambda.png``: OPCM's λ(t) per order against √t (Figure 7);
- ``acc_vs_tasks.png``: mean accuracy over the tasks merged so far against the number of merged
  tasks, mean ± std over orders (Figure 5).
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["plot_report", "plot_accuracy_matrices", "plot_lambda", "plot_acc_vs_tasks"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _label(method: str) -> str:
    from opcm_ext.evaluation.runner import METHOD_LABELS

    return METHOD_LABELS.get(method, method)


_COLORS = {"opcm": "#d62728", "task_arithmetic": "#1f77b4", "ties": "#2ca02c", "average": "#7f7f7f"}


def plot_accuracy_matrices(report: dict, path: str | Path, *, order_index: int = 0) -> Path:
    """One heat map per method for the same order: rows = step, columns = tasks in merge order."""
    plt = _plt()
    import numpy as np

    methods = list(report["methods"])
    order = report["orders"][order_index]
    T = len(order)
    cell = 0.42 if T <= 10 else 0.3
    ncols = len(methods) if len(methods) <= 3 else 2
    nrows = -(-len(methods) // ncols)
    side = cell * T + 1.4
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols + 0.8, (side + 1.1) * nrows + 0.3),
                             squeeze=False, layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(methods):]:
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = None
    for ax, m in zip(flat, methods):
        run = report["methods"][m]["runs"][order_index]
        A = np.array([[np.nan if v is None else 100 * v for v in row] for row in run["matrix"]], dtype=float)
        im = ax.imshow(A, vmin=0, vmax=100, cmap=cmap)
        if T <= 12:
            for i in range(T):
                for j in range(i + 1):
                    ax.text(j, i, f"{A[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if A[i, j] < 60 else "black")
        ax.set_xticks(range(T))
        ax.set_xticklabels(run["order"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(T))
        ax.set_yticklabels([str(t + 1) for t in range(T)], fontsize=7)
        ax.set_ylabel("step (tasks merged)", fontsize=8)
        ax.set_xlabel("task, in merge order", fontsize=8)
        ax.set_title(f"{_label(m)}\nACC {100 * run['acc']:.1f}  BWT {100 * run['bwt']:+.1f}", fontsize=9)
    fig.colorbar(im, ax=flat[: len(methods)], shrink=0.6, label="accuracy (%)", pad=0.02)
    fig.suptitle(f"Accuracy after each merge step (order {order_index + 1})", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_lambda(report: dict, path: str | Path) -> Path | None:
    """OPCM's λ(t) for each order, with √t for reference; None when the report has no OPCM run."""
    res = report["methods"].get("opcm")
    if not res or not any(r.get("lam") for r in res["runs"]):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    T = len(report["tasks"])
    ts = list(range(1, T + 1))
    lams = [r["lam"] for r in res["runs"] if r.get("lam")]
    for i, lam in enumerate(lams):
        ax.plot(ts, lam, color=_COLORS["opcm"], alpha=0.35, lw=1, marker="o", ms=2.5,
                label="λ(t), each order" if i == 0 else None)
    mean = [sum(l[t] for l in lams) / len(lams) for t in range(T)]
    ax.plot(ts, mean, color=_COLORS["opcm"], lw=2.2, label="λ(t), mean over orders")
    fine = [1 + (T - 1) * k / 200 for k in range(201)]
    ax.plot(fine, [math.sqrt(t) for t in fine], "k--", lw=1.2, label="√t")
    ax.set_xlabel("t (number of merged models)")
    ax.set_ylabel("λ(t)")
    ax.set_xticks(ts)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("OPCM scaling factor λ(t) vs √t", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_acc_vs_tasks(report: dict, path: str | Path) -> Path:
    """Mean accuracy on the tasks merged so far vs the number of merged tasks, mean ± std over orders."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    T = len(report["tasks"])
    ts = list(range(1, T + 1))
    for m, res in report["methods"].items():
        mu = [100 * v for v in res["summary"]["seen_acc_mean"]]
        sd = [100 * v for v in res["summary"]["seen_acc_std"]]
        c = _COLORS.get(m)
        ax.plot(ts, mu, marker="o", ms=3, lw=1.8, color=c, label=_label(m))
        ax.fill_between(ts, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], color=c, alpha=0.15)
    ref = report.get("reference")
    if ref:
        ft = 100 * sum(ref["finetuned"].values()) / T
        pre = 100 * sum(ref["pretrained"].values()) / T
        ax.axhline(ft, color="k", ls=":", lw=1, label="individual fine-tuned (mean)")
        ax.axhline(pre, color="k", ls="--", lw=1, label="pre-trained (mean)")
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("mean accuracy on merged tasks (%)")
    ax.set_xticks(ts)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    n = len(report["orders"])
    ax.set_title(f"Accuracy on the merged tasks as tasks arrive (mean ± std, {n} order{'s' if n != 1 else ''})",
                 fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write every figure of a report into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [plot_accuracy_matrices(report, out / "accuracy_matrices.png")]
    lam = plot_lambda(report, out / "lambda.png")
    if lam is not None:
        files.append(lam)
    files.append(plot_acc_vs_tasks(report, out / "acc_vs_tasks.png"))
    return files
