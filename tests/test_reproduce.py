"""`opcm reproduce` end to end on tiny CLIP models and tiny ImageFolder test sets made here."""

from __future__ import annotations

import json

import pytest

from opcm_ext.cli import main
from opcm_ext.evaluation.fixtures import make_image_folder, make_tiny_clip, make_tiny_finetuned
from opcm_ext.evaluation.reproduce import MissingInputsError, PAPER_TASKS, TASK_SETS, find_inputs, resolve_tasks

MODEL = "clip-vit-tiny"
TASKS = {"mnist": ["0", "1", "2"], "stanford-cars": ["audi a4", "bmw x5"], "eurosat": ["forest", "river", "sea"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    ck, ds = root / "checkpoints", root / "datasets"
    clip = make_tiny_clip(ck / MODEL)
    for i, (task, classes) in enumerate(TASKS.items()):
        make_tiny_finetuned(clip, ck / f"{MODEL}_{task}", seed=10 + i, scale=0.05)
        # datasets may spell the task with '_' where the checkpoint uses '-'
        make_image_folder(ds / task.replace("-", "_"), [c.replace(" ", "_") for c in classes], per_class=3, seed=i)
    return ck, ds


def test_task_sets_follow_the_paper():
    assert TASK_SETS[8] == ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
    assert len(TASK_SETS[14]) == 14 and TASK_SETS[14][8:] == PAPER_TASKS[8:14]
    assert TASK_SETS[20][-6:] == ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2")
    assert resolve_tasks("14") == list(TASK_SETS[14])
    assert resolve_tasks("mnist, svhn") == ["mnist", "svhn"]


def test_reproduce_end_to_end(inputs, tmp_path, capsys):
    ck, ds = inputs
    out = tmp_path / "out"
    rc = main(["reproduce", "--checkpoints", str(ck), "--datasets", str(ds), "--tasks", ",".join(TASKS),
               "--orders", "2", "--out", str(out), "--device", "cpu", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    for row in ("Pre-trained", "Individual fine-tuned", "OPCM", "Continual Task Arithmetic",
                "Continual TIES-Merging", "Continual Averaging"):
        assert row in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["tasks"] == list(TASKS) and len(rep["orders"]) == 2
    assert set(rep["methods"]) == {"opcm", "task_arithmetic", "ties", "average"}
    for res in rep["methods"].values():
        for run in res["runs"]:
            assert len(run["matrix"]) == 3 and run["matrix"][0][1] is None
    assert rep["methods"]["opcm"]["runs"][0]["lam"][0] == pytest.approx(1.0)
    assert {p.name for p in out.iterdir()} >= {"report.json", "accuracy_matrices.png", "lambda.png", "acc_vs_tasks.png"}


def test_missing_inputs_are_listed_together(inputs, tmp_path, capsys):
    ck, ds = inputs
    with pytest.raises(MissingInputsError) as err:
        find_inputs(ck, ds, ["mnist", "svhn", "gtsrb"])
    msg = str(err.value)
    assert "4 input(s) missing" in msg
    for what in (f"{MODEL}_svhn", f"{MODEL}_gtsrb", "datasets/svhn", "datasets/gtsrb"):
        assert what in msg
    # through the CLI: exit code 2, the whole list on stderr, nothing on stdout
    rc = main(["reproduce", "--checkpoints", str(tmp_path / "none"), "--datasets", str(ds), "--tasks", "8",
               "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    assert "checkpoints folder" in cap.err and "pre-trained CLIP model" in cap.err
    for t in TASK_SETS[8]:
        assert t in cap.err


def test_cache_dir_is_reused(inputs, tmp_path):
    from opcm_ext.evaluation.reproduce import ClipTaskEvaluator

    ck, ds = inputs
    data = {"mnist": ds / "mnist"}
    ev = ClipTaskEvaluator(ck / MODEL, data, device="cpu", cache_dir=tmp_path / "cache", progress=False)
    first = ev.test_set("mnist")
    stamp = (tmp_path / "cache" / "mnist.npy").stat().st_mtime_ns
    again = ClipTaskEvaluator(ck / MODEL, data, device="cpu", cache_dir=tmp_path / "cache", progress=False)
    second = again.test_set("mnist")
    assert (tmp_path / "cache" / "mnist.npy").stat().st_mtime_ns == stamp  # read back, not rewritten
    assert (second.pixels == first.pixels).all() and list(second.labels) == list(first.labels)
    assert second.classnames == ["0", "1", "2"]
    acc = again.evaluate(ck / f"{MODEL}_mnist", ["mnist"])["mnist"]
    assert 0.0 <= acc <= 1.0


def test_eval_command_on_dataset_folders(inputs, capsys):
    ck, ds = inputs
    rc = main(["eval", str(ck / f"{MODEL}_eurosat"), "--clip-model", str(ck / MODEL), "--datasets", str(ds),
               "--tasks", "eurosat,stanford-cars", "--device", "cpu", "--json", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    acc = json.loads(out)
    assert set(acc) == {"eurosat", "stanford-cars"} and all(0 <= v <= 1 for v in acc.values())
    rc = main(["eval", str(ck / f"{MODEL}_eurosat"), "--clip-model", str(ck / MODEL), "--datasets", str(ds),
               "--tasks", "gtsrb", "--no-progress"])
    assert rc == 2 and "gtsrb" in capsys.readouterr().err
