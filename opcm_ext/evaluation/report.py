"""Run reports: saving, loading (with validation) and the Table-1-style text table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from opcm_ext.errors import InputError

__all__ = ["ReportError", "save_report", "load_report", "format_table", "format_final_accuracies"]


class ReportError(InputError):
    """A report file is missing or is not an opcm-ext continual-merge report."""


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def save_report(report: dict, path: str | Path) -> Path:
    """Write the report as JSON (NaN written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(report), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def load_report(path: str | Path) -> dict:
    """Read a report written by ``opcm demo``/``opcm reproduce`` (or ``run_experiment`` + ``save_report``)."""
    from opcm_ext.evaluation.runner import REPORT_FORMAT

    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.exists():
        raise ReportError(f"{path}: no such report")
    try:
        rep = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(rep, dict) or rep.get("format") != REPORT_FORMAT:
        raise ReportError(f"{path}: not an opcm-ext continual-merge report (format {REPORT_FORMAT!r} expected)")
    for key in ("tasks", "orders", "methods"):
        if key not in rep:
            raise ReportError(f"{path}: report has no {key!r}")
    return rep


def _pct(m, s=None) -> str:
    return f"{100 * m:5.1f}" + (f" ± {100 * s:4.1f}" if s is not None else "")


def format_table(report: dict, *, title: str | None = None) -> str:
    """Table 1's rows: pre-trained, individual fine-tuned, then each method's ACC and BWT (mean ± std over orders)."""
    from opcm_ext.evaluation.runner import METHOD_LABELS

    tasks = report["tasks"]
    n_orders = len(report["orders"])
    lines = []
    head = title or f"{len(tasks)} tasks, {n_orders} order{'s' if n_orders != 1 else ''} (seed {report.get('seed', 0)})"
    lines.append(head)
    width = max([len("Individual fine-tuned")] + [len(METHOD_LABELS.get(m, m)) for m in report["methods"]])
    lines.append(f"{'Method':<{width}}  {'ACC (%)':>13}  {'BWT (%)':>13}")
    lines.append("-" * (width + 32))
    ref = report.get("reference")
    if ref:
        pre = sum(ref["pretrained"].values()) / len(ref["pretrained"])
        ft = sum(ref["finetuned"].values()) / len(ref["finetuned"])
        lines.append(f"{'Pre-trained':<{width}}  {_pct(pre):>13}  {'-':>13}")
        lines.append(f"{'Individual fine-tuned':<{width}}  {_pct(ft):>13}  {'-':>13}")
    for name, res in report["methods"].items():
        s = res["summary"]
        lines.append(f"{METHOD_LABELS.get(name, name):<{width}}  {_pct(s['acc_mean'], s['acc_std']):>13}  "
                     f"{_pct(s['bwt_mean'], s['bwt_std']):>13}")
    return "\n".join(lines)


def format_final_accuracies(report: dict) -> str:
    """Per-task accuracy of the final merged model (mean over orders), with the reference rows."""
    tasks = report["tasks"]
    w = max(8, *(len(t) for t in tasks))
    cols = []
    ref = report.get("reference")
    if ref:
        cols += [("pre", ref["pretrained"]), ("ft", ref["finetuned"])]
    cols += [(m, r["summary"]["final_mean"]) for m, r in report["methods"].items()]
    cw = max(6, *(len(c) for c, _ in cols))
    lines = [f"{'task':<{w}} " + " ".join(f"{c:>{cw}}" for c, _ in cols)]
    for t in tasks:
        lines.append(f"{t:<{w}} " + " ".join(f"{100 * v[t]:{cw}.1f}" if t in v else f"{'-':>{cw}}" for _, v in cols))
    return "\n".join(lines)

