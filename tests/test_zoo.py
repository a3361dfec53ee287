"""The shipped example zoo: complete, small, and each fine-tuned model clearly better than the base on its task."""

from __future__ import annotations

import hashlib

import pytest
import torch

from opcm_ext.errors import CheckpointError
from opcm_ext.zoo import Zoo, default_zoo_dir
from opcm_ext.zoo.tasks import TASK_NAMES, TASKS


@pytest.fixture(scope="module")
def zoo():
    return Zoo()


def test_shipped_zoo_is_complete_and_small(zoo):
    assert zoo.root == default_zoo_dir()
    assert zoo.tasks == list(TASK_NAMES) and len(zoo.tasks) >= 8
    for folder in [zoo.base, *zoo.models.values()]:
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
        assert (folder / "preprocessor_config.json").exists()
    total = sum(f.stat().st_size for f in zoo.root.rglob("*") if f.is_file())
    assert total < 25 * 2**20, f"shipped zoo is {total / 2**20:.1f} MiB"


def test_heads_and_test_sets(zoo):
    for spec in TASKS:
        head = zoo.head(spec.name)
        assert head.shape[0] == spec.num_classes
        torch.testing.assert_close(head.norm(dim=-1), torch.ones(spec.num_classes))
        pixels, labels = zoo.test_set(spec.name)
        assert pixels.dtype == torch.uint8 and pixels.shape[1:] == (3, 16, 16)
        assert labels.shape == (pixels.shape[0],) and int(labels.max()) < spec.num_classes
    with pytest.raises(CheckpointError, match="has no task"):
        zoo.head("nope")


def test_finetuned_models_beat_the_base_on_their_own_task(zoo):
    ev = zoo.evaluator()
    base = ev.evaluate(zoo.base, zoo.tasks)
    recorded = zoo.info["accuracy"]
    for t in zoo.tasks:
        ft = ev.evaluate(zoo.model(t), [t])[t]
        assert ft >= 0.85, (t, ft)
        assert ft - base[t] >= 0.3, (t, base[t], ft)
        # zoo.json holds what the build measured on these very files
        assert ft == pytest.approx(recorded["finetuned"][t], abs=0.005)
        assert base[t] == pytest.approx(recorded["pretrained"][t], abs=0.005)


def test_missing_zoo_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="rebuild it"):
        Zoo(tmp_path)


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_build_script_is_deterministic(tmp_path):
    pytest.importorskip("sklearn")
    from opcm_ext.zoo.build import BuildConfig, build

    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=8,
                pretrain_steps=3, finetune_steps=2, batch_size=16, test_size=40)
    info = build(tmp_path / "a", BuildConfig(**tiny), log=False)
    build(tmp_path / "b", BuildConfig(**tiny), log=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert [t["name"] for t in info["tasks"]] == list(TASK_NAMES)
    z = Zoo(tmp_path / "a")
    assert z.test_set(z.tasks[0])[0].shape[0] == 40
    with pytest.raises(TypeError):
        BuildConfig(not_an_option=1)
