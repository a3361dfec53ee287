"""`opcm reproduce` end to end on tiny CLIP models and tiny ImageFolder test sets made here."""

from __future__ import annotations

import json

import pytest
import torch

from opcm_ext.cli import main
from opcm_ext.errors import ConfigError
from opcm_ext.evaluation.fixtures import make_image_folder, make_tiny_clip, make_tiny_finetuned
from opcm_ext.evaluation.prompts import ClassNamesMismatchError, load_heads, prompts_for
from opcm_ext.evaluation.reproduce import (MissingInputsError, PAPER_TASKS, TASK_SETS, ClipTaskEvaluator, find_inputs,
                                           paper_lambda, paper_methods, resolve_tasks)

MODEL = "clip-vit-tiny"
# Paper tasks with few classes, so the curated class-name lists fit tiny test sets; the folder names
# differ from the curated names on purpose (heads must use the curated ones).
TASKS = {"mnist": [f"digit{i}" for i in range(10)], "pcam": ["normal", "tumor"],
         "rendered-sst2": ["neg", "pos"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    ck, ds = root / "checkpoints", root / "datasets"
    clip = make_tiny_clip(ck / MODEL)
    for i, (task, classes) in enumerate(TASKS.items()):
        make_tiny_finetuned(clip, ck / f"{MODEL}_{task}", seed=10 + i, scale=0.05)
        # datasets may spell the task with '_' where the checkpoint uses '-'
        make_image_folder(ds / task.replace("-", "_"), [c.replace(" ", "_") for c in classes], per_class=2, seed=i)
    # a "gtsrb" test set with the wrong number of classes (the curated list has 43)
    make_image_folder(ds / "gtsrb", ["stop", "yield", "go"], per_class=1, seed=9)
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
    # the paper's λ for both baselines (3 tasks: the 8-task value), recorded with its source
    assert rep["methods"]["task_arithmetic"]["params"]["lam"] == 0.3
    assert rep["methods"]["ties"]["params"] == {"lam": 0.3, "keep": 0.2}
    assert rep["meta"]["lam"]["value"] == 0.3 and "appendix C.1.1" in rep["meta"]["lam"]["source"]
    assert "λ = 0.3" in text
    for t in TASKS:
        assert "tanganke/fusion_bench" in rep["meta"]["heads"][t]


def test_lam_option_overrides_both_baselines(inputs, tmp_path):
    ck, ds = inputs
    out = tmp_path / "out"
    rc = main(["reproduce", "--checkpoints", str(ck), "--datasets", str(ds), "--tasks", "pcam,rendered-sst2",
               "--orders", "1", "--methods", "task_arithmetic,ties", "--lam", "0.2", "--out", str(out),
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["methods"]["task_arithmetic"]["params"]["lam"] == 0.2
    assert rep["methods"]["ties"]["params"]["lam"] == 0.2
    assert rep["meta"]["lam"] == {"value": 0.2, "source": "--lam"}


def test_memory_budget_reaches_every_merge(inputs, tmp_path, capsys):
    """--compat release holds a whole-model float32 vector: a budget below it is refused, naming the minimum."""
    ck, ds = inputs
    rc = main(["reproduce", "--checkpoints", str(ck), "--datasets", str(ds), "--tasks", "pcam,rendered-sst2",
               "--orders", "1", "--methods", "opcm", "--compat", "release", "--memory-budget", "16KiB",
               "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "the memory budget 16.0KiB is below what this step needs" in err and "--compat release" in err


def test_paper_lambda_by_task_count():
    assert [paper_lambda(n) for n in (8, 14, 20)] == [0.3, 0.1, 0.1]
    assert paper_lambda(3) == 0.3 and paper_lambda(12) == 0.1
    for n, lam in ((8, 0.3), (14, 0.1), (20, 0.1)):
        params = paper_methods(n)
        assert params["task_arithmetic"] == {"lam": lam} and params["ties"] == {"lam": lam, "keep": 0.2}
        assert params["opcm"] == {"alpha": 0.5} and params["average"] == {}
    assert paper_methods(20, ["ties"], lam=0.25) == {"ties": {"lam": 0.25, "keep": 0.2}}
    assert paper_methods(8, ["opcm", "ties"], compat="release") == {"opcm": {"alpha": 0.5, "compat": "release"},
                                                                  "ties": {"lam": 0.3, "keep": 0.2}}
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError):
            paper_methods(8, lam=bad)
    with pytest.raises(ConfigError):
        paper_methods(8, ["nope"])


def test_heads_use_the_curated_class_names(inputs):
    from opcm_ext.evaluation.heads import ZeroShotHeadBuilder

    ck, ds = inputs
    ev = ClipTaskEvaluator(ck / MODEL, {"pcam": ds / "pcam"}, device="cpu", progress=False)
    builder = ZeroShotHeadBuilder(ck / MODEL)
    p = prompts_for("pcam")
    torch.testing.assert_close(ev.head("pcam"), builder.head(p.classnames, p.templates))
    by_folder = ClipTaskEvaluator(ck / MODEL, {"pcam": ds / "pcam"}, device="cpu", progress=False,
                                  class_names="dataset")
    torch.testing.assert_close(by_folder.head("pcam"), builder.head(["normal", "tumor"], p.templates))
    assert not torch.allclose(ev.head("pcam"), by_folder.head("pcam"))


def test_class_count_mismatch_is_a_clear_error(inputs, capsys):
    ck, ds = inputs
    ev = ClipTaskEvaluator(ck / MODEL, {"gtsrb": ds / "gtsrb"}, device="cpu", progress=False)
    with pytest.raises(ClassNamesMismatchError, match=r"'gtsrb'.*43 names.*has 3 classes"):
        ev.head("gtsrb")
    rc = main(["eval", str(ck / f"{MODEL}_mnist"), "--clip-model", str(ck / MODEL), "--datasets", str(ds),
               "--tasks", "gtsrb", "--device", "cpu", "--no-progress"])
    assert rc == 2 and "43 names" in capsys.readouterr().err
    rc = main(["eval", str(ck / f"{MODEL}_mnist"), "--clip-model", str(ck / MODEL), "--datasets", str(ds),
               "--tasks", "gtsrb", "--device", "cpu", "--no-progress", "--class-names", "dataset", "--json"])
    assert rc == 0 and set(json.loads(capsys.readouterr().out)) == {"gtsrb"}


def test_precomputed_head_file(inputs, tmp_path, capsys):
    ck, ds = inputs
    heads = tmp_path / "heads.safetensors"
    assert main(["heads", "--clip-model", str(ck / MODEL), "--tasks", "mnist,pcam,rendered-sst2", "-o", str(heads),
                 "--device", "cpu"]) == 0
    assert set(load_heads(heads)) == {"mnist", "pcam", "rendered_sst2"}
    capsys.readouterr()
    args = ["eval", str(ck / f"{MODEL}_pcam"), "--clip-model", str(ck / MODEL), "--datasets", str(ds),
            "--tasks", "mnist,pcam", "--device", "cpu", "--json", "--no-progress"]
    assert main(args) == 0
    built = json.loads(capsys.readouterr().out)
    assert main(args + ["--heads", str(heads)]) == 0
    assert json.loads(capsys.readouterr().out) == built  # the same heads, read from the file
    # a head with the wrong number of rows, and a task the file lacks
    from opcm_ext.evaluation.prompts import save_heads

    save_heads({"mnist": torch.randn(3, 16)}, tmp_path / "bad.safetensors")
    ev = ClipTaskEvaluator(ck / MODEL, {"mnist": ds / "mnist", "pcam": ds / "pcam"}, device="cpu", progress=False,
                           heads=tmp_path / "bad.safetensors")
    with pytest.raises(ClassNamesMismatchError, match="10 classes"):
        ev.head("mnist")
    with pytest.raises(ConfigError, match="no head for task 'pcam'"):
        ev.head("pcam")
    assert "head file" in ev.head_sources(["mnist"])["mnist"]


def test_missing_inputs_are_listed_together(inputs, tmp_path, capsys):
    ck, ds = inputs
    with pytest.raises(MissingInputsError) as err:
        find_inputs(ck, ds, ["mnist", "svhn", "dtd"])
    msg = str(err.value)
    assert "4 input(s) missing" in msg
    for what in (f"{MODEL}_svhn", f"{MODEL}_dtd", "datasets/svhn", "datasets/dtd"):
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
    assert second.classnames == [f"digit{i}" for i in range(10)]
    acc = again.evaluate(ck / f"{MODEL}_mnist", ["mnist"])["mnist"]
    assert 0.0 <= acc <= 1.0


def test_eval_command_on_dataset_folders(inputs, capsys):
    ck, ds = inputs
    rc = main(["eval", str(ck / f"{MODEL}_pcam"), "--clip-model", str(ck / MODEL), "--datasets", str(ds),
               "--tasks", "pcam,rendered-sst2", "--device", "cpu", "--json", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    acc = json.loads(out)
    assert set(acc) == {"pcam", "rendered-sst2"} and all(0 <= v <= 1 for v in acc.values())
    rc = main(["eval", str(ck / f"{MODEL}_pcam"), "--clip-model", str(ck / MODEL), "--datasets", str(ds),
               "--tasks", "svhn", "--no-progress"])
    assert rc == 2 and "svhn" in capsys.readouterr().err
