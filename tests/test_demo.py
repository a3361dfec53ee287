"""`opcm demo` on a reduced setting: the table, report.json and the PNG plots through the streaming engine."""

from __future__ import annotations

import io
import json

from opcm_ext.cli import main
from opcm_ext.demo import run_demo
from opcm_ext.zoo import Zoo


def test_run_demo_reduced(tmp_path):
    tasks = Zoo().tasks[:3]
    buf = io.StringIO()
    rep = run_demo(tmp_path, orders=2, methods=["opcm", "average"], tasks=tasks, progress=False, stream=buf)
    text = buf.getvalue()
    assert "OPCM" in text and "Continual Averaging" in text and "Pre-trained" in text
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["tasks"] == tasks and len(saved["orders"]) == 2
    assert set(saved["methods"]) == {"opcm", "average"}
    lam = saved["methods"]["opcm"]["runs"][0]["lam"]
    assert lam[0] == 1.0 and 1.0 < lam[1] < 2.0 and lam[2] > lam[1]
    norms = saved["methods"]["opcm"]["runs"][0]["norms"]
    assert len(norms) == 3 and all(n > 0 for n in norms)
    for f in ("accuracy_matrices.png", "lambda.png", "acc_vs_tasks.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
    # the first merge step is the first model itself (OPCM and averaging), so the diagonal starts at
    # the individual fine-tuned accuracy of the first task of each order
    for m in ("opcm", "average"):
        for run in saved["methods"][m]["runs"]:
            first = run["order"][0]
            assert run["matrix"][0][0] == rep["reference"]["finetuned"][first]


def test_demo_command(tmp_path, capsys):
    tasks = ",".join(Zoo().tasks[:2])
    rc = main(["demo", "--out", str(tmp_path / "d"), "--orders", "1", "--methods", "task_arithmetic,ties",
               "--tasks", tasks, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Continual Task Arithmetic" in out and "Continual TIES-Merging" in out
    assert (tmp_path / "d" / "report.json").exists() and (tmp_path / "d" / "acc_vs_tasks.png").exists()
    assert not (tmp_path / "d" / "lambda.png").exists()  # no OPCM run, no λ(t) plot


def test_eval_command_on_zoo(capsys):
    z = Zoo()
    t = z.tasks[0]
    assert main(["eval", str(z.model(t)), "--zoo-tasks", t, "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert acc[t] == z.info["accuracy"]["finetuned"][t]
    assert main(["eval", str(z.base), "--zoo-tasks", "nope"]) == 2
    assert "has no task" in capsys.readouterr().err
    assert main(["eval", str(z.base)]) == 2
