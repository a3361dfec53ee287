"""The order runner: seeded orders, evaluation only on the tasks merged so far, temporary checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from opcm_ext.errors import ConfigError
from opcm_ext.evaluation import runner
from opcm_ext.evaluation.runner import make_orders, run_experiment, run_method

TASKS = ["a", "b", "c", "d", "e"]


def test_orders_are_seeded_permutations():
    o1 = make_orders(TASKS, 6, seed=3)
    assert o1 == make_orders(TASKS, 6, seed=3)
    assert o1 != make_orders(TASKS, 6, seed=4)
    assert all(sorted(o) == sorted(TASKS) for o in o1)
    assert len({tuple(o) for o in o1}) > 1
    assert TASKS == ["a", "b", "c", "d", "e"]  # the input is not shuffled in place


def test_orders_reject_bad_input():
    with pytest.raises(ConfigError):
        make_orders(TASKS, 0)
    with pytest.raises(ConfigError):
        make_orders(["a", "a"], 2)


@dataclass
class FakeReport:
    output: Path
    lam: float | None
    norms: list


class FakeEngine:
    """Stands in for merge_stream: a checkpoint is a folder whose state.json lists the merged tasks."""

    def __init__(self):
        self.calls = []

    def __call__(self, base, merged, new, out=None, *, method="opcm", **params):
        self.calls.append((Path(base), merged and Path(merged), Path(new), out and Path(out), method, params))
        prev = json.loads((Path(merged) / "state.json").read_text())["tasks"] if merged else []
        target = Path(out) if out is not None else Path(merged)
        if out is not None and target.exists():
            raise AssertionError(f"merge_stream would refuse to overwrite {target}")
        target.mkdir(parents=True, exist_ok=True)
        tasks = prev + [Path(new).name]
        (target / "state.json").write_text(json.dumps({"tasks": tasks}))
        return FakeReport(target, float(len(tasks)) ** 0.5 if method == "opcm" else None, [1.0] * len(tasks))


class FakeEvaluator:
    def __init__(self):
        self.calls = []

    def evaluate(self, checkpoint, tasks):
        self.calls.append((Path(checkpoint), list(tasks)))
        state = Path(checkpoint) / "state.json"
        merged = json.loads(state.read_text())["tasks"] if state.exists() else []
        # accuracy 1 for the newest task, decaying with how long ago a task was merged
        return {t: 1.0 / (len(merged) - merged.index(t)) if t in merged else 0.1 for t in tasks}


@pytest.fixture
def fake_engine(monkeypatch):
    eng = FakeEngine()
    monkeypatch.setattr(runner, "_merge_stream", lambda: eng)
    return eng


def _models(tmp_path):
    return {t: tmp_path / "models" / t for t in TASKS}


def test_run_method_evaluates_only_merged_tasks(tmp_path, fake_engine):
    ev = FakeEvaluator()
    orders = make_orders(TASKS, 2, seed=0)
    res = run_method(tmp_path / "base", _models(tmp_path), ev, orders, method="opcm", params={"alpha": 0.5},
                     work_dir=tmp_path)
    assert len(ev.calls) == 2 * len(TASKS)
    for k, order in enumerate(orders):
        for t in range(len(TASKS)):
            _, asked = ev.calls[k * len(TASKS) + t]
            assert asked == order[: t + 1]
    for run, order in zip(res["runs"], orders):
        assert run["order"] == order
        m = run["matrix"]
        assert all(v is None for t, row in enumerate(m) for v in row[t + 1:])
        assert [m[t][t] for t in range(len(order))] == [1.0] * len(order)
        assert run["acc"] == pytest.approx(sum(1.0 / (len(order) - j) for j in range(len(order))) / len(order))
        assert run["lam"] == pytest.approx([(t + 1) ** 0.5 for t in range(len(order))])
        assert run["norms"] == [1.0] * len(order)
    # each order starts a new merge (merged=None) and then folds into the same checkpoint (out=None)
    starts = [c for c in fake_engine.calls if c[1] is None]
    assert len(starts) == 2 and all(c[3] is not None for c in starts)
    assert all(c[3] is None for c in fake_engine.calls if c[1] is not None)
    assert all(c[4] == "opcm" and c[5] == {"alpha": 0.5} for c in fake_engine.calls)
    # intermediate checkpoints were temporary
    assert not any(p.name.startswith("opcm-run-") for p in tmp_path.iterdir())


def test_run_method_keeps_checkpoints_when_asked(tmp_path, fake_engine):
    orders = [["b", "a", "c"]]
    models = {t: tmp_path / "models" / t for t in ["a", "b", "c"]}
    run_method(tmp_path / "base", models, FakeEvaluator(), orders, method="average", keep_dir=tmp_path / "keep")
    steps = sorted(p.name for p in (tmp_path / "keep" / "average" / "order0").iterdir())
    assert steps == ["step1", "step2", "step3"]
    assert json.loads((tmp_path / "keep/average/order0/step3/state.json").read_text())["tasks"] == ["b", "a", "c"]


def test_run_method_rejects_orders_that_are_not_permutations(tmp_path, fake_engine):
    with pytest.raises(ConfigError):
        run_method(tmp_path, _models(tmp_path), FakeEvaluator(), [["a", "b", "zz"]])
    with pytest.raises(ConfigError):
        run_method(tmp_path, _models(tmp_path), FakeEvaluator(), [["a", "a"]])


def test_run_experiment_same_orders_for_every_method(tmp_path, fake_engine):
    rep = run_experiment(tmp_path / "base", _models(tmp_path), FakeEvaluator(), methods=["opcm", "average"],
                         num_orders=3, seed=7, progress=False, work_dir=tmp_path)
    assert rep["orders"] == make_orders(TASKS, 3, seed=7)
    for m in ("opcm", "average"):
        assert [r["order"] for r in rep["methods"][m]["runs"]] == rep["orders"]
    assert rep["methods"]["average"]["runs"][0]["lam"] is None
    assert set(rep["reference"]) == {"pretrained", "finetuned"}
    assert rep["reference"]["pretrained"] == {t: 0.1 for t in TASKS}
    json.dumps(rep, allow_nan=False)  # JSON-serialisable as is
    with pytest.raises(ConfigError):
        run_experiment(tmp_path, _models(tmp_path), FakeEvaluator(), methods=["nope"], progress=False)
