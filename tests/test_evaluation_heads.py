"""Zero-shot heads from a tiny random CLIP model and a tiny offline tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opcm_ext.errors import CheckpointError, ConfigError
from opcm_ext.evaluation.fixtures import make_tiny_clip
from opcm_ext.evaluation.heads import (GENERIC_TEMPLATES, ZeroShotHeadBuilder, build_task_heads, canonical_task,
                                       templates_for)
from opcm_ext.evaluation.prompts import (ClassNamesMismatchError, check_head_rows, classnames_for, load_heads,
                                         load_prompts, prompts_for, save_heads)
from opcm_ext.evaluation.reproduce import PAPER_TASKS

# Each task's number of classes (the datasets' own) and FusionBench's number of prompt templates.
CLASSES_AND_TEMPLATES = {
    "sun397": (397, 2), "stanford-cars": (196, 8), "resisc45": (45, 18), "eurosat": (10, 3), "svhn": (10, 1),
    "gtsrb": (43, 3), "mnist": (10, 1), "dtd": (47, 8), "oxford_flowers102": (102, 1), "pcam": (2, 1),
    "fer2013": (7, 6), "oxford-iiit-pet": (37, 1), "stl10": (10, 2), "cifar100": (100, 18), "cifar10": (10, 18),
    "food101": (101, 1), "fashion_mnist": (10, 2), "emnist_letters": (26, 1), "kmnist": (10, 1),
    "rendered-sst2": (2, 1),
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip-tiny")


def test_head_is_clip_zero_shot_recipe(tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    classes = ["cat", "dog", "the bird"]
    templates = ["a photo of a {}.", "a blurry photo of the {}.", "{}"]
    head = ZeroShotHeadBuilder(tiny_clip).head(classes, templates)

    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_clip))
    rows = []
    with torch.no_grad():
        for c in classes:
            inp = tok([t.format(c) for t in templates], padding=True, return_tensors="pt")
            emb = F.normalize(model.get_text_features(**inp).pooler_output, dim=-1)  # per template, normalised
            rows.append(F.normalize(emb.mean(0), dim=-1))                            # mean, normalised again
    expected = torch.stack(rows)
    assert head.shape == (3, model.config.projection_dim)
    torch.testing.assert_close(head, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(3))


def test_padding_does_not_change_embeddings(tiny_clip):
    b = ZeroShotHeadBuilder(tiny_clip, batch_size=1)
    b2 = ZeroShotHeadBuilder(tiny_clip, batch_size=64)
    texts = ["a", "a much longer prompt about a cat."]
    torch.testing.assert_close(b.embed_texts(texts), b2.embed_texts(texts), rtol=1e-5, atol=1e-6)


def test_head_argument_errors(tiny_clip):
    b = ZeroShotHeadBuilder(tiny_clip)
    with pytest.raises(ConfigError):
        b.head([], ["a photo of a {}."])
    with pytest.raises(ConfigError):
        b.head(["cat"], ["no placeholder"])


def test_vision_only_or_missing_folder_is_a_clear_error(tmp_path, tiny_clip):
    from opcm_ext.evaluation.fixtures import make_tiny_finetuned

    with pytest.raises(CheckpointError, match="config.json"):
        ZeroShotHeadBuilder(tmp_path / "nowhere")
    vis = make_tiny_finetuned(tiny_clip, tmp_path / "vision_only", seed=1)
    with pytest.raises(CheckpointError):
        ZeroShotHeadBuilder(vis)


def test_every_paper_task_has_templates():
    for t in PAPER_TASKS:
        tpl = templates_for(t)
        assert tpl is not GENERIC_TEMPLATES, t
        assert all(s.count("{}") == 1 for s in tpl)
    assert templates_for("my-own-task") == GENERIC_TEMPLATES
    assert len(templates_for("resisc45")) == 18 and len(set(templates_for("resisc45"))) == 18
    assert len(templates_for("cifar100")) == 18 and len(set(templates_for("cifar100"))) == 18
    assert canonical_task("Stanford-Cars") == "stanford_cars"
    assert canonical_task("oxford-iiit-pet") == "oxford_iiit_pet"
    assert canonical_task("rendered-sst2") == "rendered_sst2"


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_curated_lists_have_each_datasets_class_count_and_fusionbench_template_count(task):
    p = prompts_for(task)
    assert p is not None
    classes, templates = CLASSES_AND_TEMPLATES[task]
    assert len(p.classnames) == classes and len(set(p.classnames)) == classes
    assert len(p.templates) == templates
    assert "tanganke/fusion_bench" in p.source and "fusion_bench/tasks/clip_classification/" in p.source


def test_the_shipped_file_covers_exactly_the_papers_tasks_and_names_its_source():
    import json

    from opcm_ext.evaluation.prompts import PROMPTS_FILE

    assert set(load_prompts()) == {canonical_task(t) for t in PAPER_TASKS}
    src = json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))["source"]
    assert src["repository"] == "tanganke/fusion_bench" and src["package"] == "fusion-bench 0.2.33"
    assert len(src["commit"]) == 40


def test_known_curated_names_and_templates():
    gtsrb = prompts_for("gtsrb")
    assert gtsrb.classnames[0] == "red and white circle 20 kph speed limit"
    assert gtsrb.templates[0] == 'a zoomed in photo of a "{}" traffic sign.'
    assert prompts_for("Stanford-Cars").classnames[0] == "AM General Hummer SUV 2000"
    assert prompts_for("pcam").classnames == ("lymph node", "lymph node containing metastatic tumor tissue")
    assert prompts_for("rendered_sst2").templates == ("a {} review of a movie.",)
    assert prompts_for("mnist").classnames == tuple(str(i) for i in range(10))
    assert prompts_for("my-own-task") is None


def test_classnames_for_checks_the_count_and_falls_back_to_the_dataset():
    ten = [f"folder{i}" for i in range(10)]
    assert classnames_for("eurosat", ten)[0] == "annual crop land"
    assert classnames_for("eurosat", ten, source="dataset") == ten
    assert classnames_for("my-own-task", ["a", "b"]) == ["a", "b"]
    with pytest.raises(ClassNamesMismatchError, match=r"'gtsrb'.*43 names.*/data/gtsrb has 42 classes.*--class-names"):
        classnames_for("gtsrb", [str(i) for i in range(42)], where="/data/gtsrb")
    with pytest.raises(ConfigError):
        classnames_for("gtsrb", ["x"], source="folders")


def test_a_corrupt_prompt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"format": "opcm-ext/zero-shot-prompts", "version": 1, "source": {}, '
                   '"tasks": {"x": {"classnames": ["a"], "templates": ["no placeholder"]}}}')
    with pytest.raises(ConfigError, match="'x'"):
        load_prompts(bad)
    (tmp_path / "q.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a opcm-ext/zero-shot-prompts"):
        load_prompts(tmp_path / "q.json")


def test_head_file_round_trip_and_errors(tmp_path):
    heads = {"Stanford-Cars": torch.randn(196, 8), "mnist": torch.randn(10, 8, dtype=torch.float16)}
    path = save_heads(heads, tmp_path / "h.safetensors", meta={"clip_model": "x"})
    back = load_heads(path)
    assert set(back) == {"stanford_cars", "mnist"}
    torch.testing.assert_close(back["stanford_cars"], heads["Stanford-Cars"])
    assert back["mnist"].dtype == torch.float32
    assert check_head_rows("mnist", back["mnist"], 10) is back["mnist"]
    with pytest.raises(ClassNamesMismatchError, match="10 classes"):
        check_head_rows("mnist", back["stanford_cars"], 10)
    with pytest.raises(CheckpointError, match="no such head file"):
        load_heads(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        load_heads(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"mnist": torch.full((10, 4), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="finite 2-D"):
        load_heads(tmp_path / "nan.safetensors")
    with pytest.raises(ConfigError, match="two heads"):
        save_heads({"stanford-cars": torch.zeros(2, 2), "stanford_cars": torch.zeros(2, 2)}, tmp_path / "d.safetensors")


def test_build_task_heads_uses_the_curated_names_and_templates(tiny_clip):
    heads = build_task_heads(tiny_clip, ["pcam", "rendered-sst2"])
    assert set(heads) == {"pcam", "rendered_sst2"}
    p = prompts_for("pcam")
    torch.testing.assert_close(heads["pcam"], ZeroShotHeadBuilder(tiny_clip).head(p.classnames, p.templates))
    with pytest.raises(ConfigError, match="my-task"):
        build_task_heads(tiny_clip, ["pcam", "my-task"])
