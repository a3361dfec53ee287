"""Zero-shot heads from a tiny random CLIP model and a tiny offline tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opcm_ext.errors import CheckpointError, ConfigError
from opcm_ext.evaluation.fixtures import make_tiny_clip
from opcm_ext.evaluation.heads import (GENERIC_TEMPLATES, TEMPLATES, ZeroShotHeadBuilder, canonical_task,
                                       templates_for)
from opcm_ext.evaluation.reproduce import PAPER_TASKS


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
        assert all("{}" in s for s in tpl)
    assert templates_for("my-own-task") == GENERIC_TEMPLATES
    assert len(TEMPLATES["resisc45"]) == 18 and len(set(TEMPLATES["resisc45"])) == 18
    assert len(TEMPLATES["cifar100"]) == 18 and len(set(TEMPLATES["cifar100"])) == 18
    assert canonical_task("Stanford-Cars") == "stanford_cars"
    assert canonical_task("oxford-iiit-pet") == "oxford_iiit_pet"
    assert canonical_task("rendered-sst2") == "rendered_sst2"
