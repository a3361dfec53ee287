"""Dataset folders, CLIP preprocessing and checkpoint loading for evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from opcm_ext.errors import CheckpointError
from opcm_ext.evaluation.clip_eval import EncoderLoader, accuracy_from_tensors, read_vision_config
from opcm_ext.evaluation.datasets import (ClipPreprocessor, DatasetError, HFDiskDataset, ImageFolderDataset,
                                          open_dataset, preprocess)
from opcm_ext.evaluation.fixtures import make_image_folder, make_tiny_clip, make_tiny_finetuned


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip-tiny")


def test_image_folder_with_split_and_classnames(tmp_path):
    root = make_image_folder(tmp_path / "ds", ["b_class", "a_class"], per_class=2)
    ds = open_dataset(root)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.classnames == ["a class", "b class"]  # sorted folder names, '_' shown as a space
    assert len(ds) == 4 and [ds.load(i)[1] for i in range(4)] == [0, 0, 1, 1]
    (root / "test" / "classnames.txt").write_text("first\nsecond\n")
    assert open_dataset(root).classnames == ["first", "second"]
    (root / "test" / "classnames.txt").write_text("only one\n")
    with pytest.raises(DatasetError, match="class names"):
        open_dataset(root)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(tmp_path / "empty")


def test_hf_folder_without_datasets_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DatasetError, match="pip install datasets"):
        HFDiskDataset(tmp_path / "hf")


def test_hf_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    imgs = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (0, 100, 200)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x_y", "z"])})
    d = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 1]}, features=feats)})
    d.save_to_disk(str(tmp_path / "hf"))
    ds = open_dataset(tmp_path / "hf")
    assert ds.classnames == ["x y", "z"] and len(ds) == 3 and ds.load(2)[1] == 1


def test_preprocessor_matches_transformers_clip_processor(tiny_clip):
    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc
    from PIL import Image

    cfg = json.loads((tiny_clip / "preprocessor_config.json").read_text())
    ref = Proc(**{k: v for k, v in cfg.items() if k != "image_processor_type"})
    mine = ClipPreprocessor.from_model_dir(tiny_clip)
    rng = np.random.default_rng(0)
    for shape in [(20, 23, 3), (31, 17, 3), (16, 16, 3)]:
        im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        expected = ref(images=im, return_tensors="pt")["pixel_values"]
        got = mine.normalize(torch.from_numpy(mine.to_uint8(im))[None])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_preprocess_subset_and_memmap_cache(tmp_path, tiny_clip):
    root = make_image_folder(tmp_path / "ds", ["a", "b", "c"], per_class=4)
    pre = ClipPreprocessor.from_model_dir(tiny_clip)
    full = preprocess(open_dataset(root), pre)
    assert full.pixels.shape == (12, 3, 16, 16) and full.pixels.dtype == np.uint8
    cached = preprocess(open_dataset(root), pre, cache_file=tmp_path / "c.npy")
    np.testing.assert_array_equal(np.asarray(cached.pixels), full.pixels)
    sub = preprocess(open_dataset(root), pre, max_examples=5)
    assert len(sub) == 5 and sub.labels[0] == 0 and sub.labels[-1] == 2


@pytest.mark.parametrize("legacy", [True, False], ids=["transformers4-keys", "transformers5-keys"])
def test_encoder_loads_vision_checkpoints_and_takes_projection_from_clip(tmp_path, tiny_clip, legacy):
    from transformers import CLIPModel

    ft = make_tiny_finetuned(tiny_clip, tmp_path / "ft", seed=3, legacy_prefix=legacy)
    with pytest.raises(CheckpointError, match="visual_projection"):
        EncoderLoader().load(ft)
    enc = EncoderLoader(projection_from=tiny_clip).load(ft)

    clip = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    from opcm_ext.evaluation.clip_eval import read_state_dict

    sd = read_state_dict(ft)
    vis = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    clip.vision_model.load_state_dict(vis, strict=False)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(clip.get_image_features(pixel_values=x).pooler_output, dim=-1)
        torch.testing.assert_close(enc(x), expected, rtol=1e-4, atol=1e-5)


def test_full_clip_model_is_evaluable_and_accuracy_counts(tiny_clip):
    enc = EncoderLoader().load(tiny_clip)
    assert read_vision_config(tiny_clip).image_size == 16
    x = torch.randn(10, 3, 16, 16)
    with torch.no_grad():
        emb = enc(x)
    head = emb[:3].clone()  # classes = the first three images' own embeddings
    labels = torch.tensor([0, 1, 2] + [0] * 7)
    acc = accuracy_from_tensors(enc, x, labels, head, batch_size=4)
    pred = (emb @ head.T).argmax(-1)
    assert acc == pytest.approx(float((pred == labels).float().mean()))
    assert pred[:3].tolist() == [0, 1, 2]


def test_checkpoint_errors(tmp_path, tiny_clip):
    with pytest.raises(CheckpointError):
        EncoderLoader().load(tmp_path / "missing")
    ft = make_tiny_finetuned(tiny_clip, tmp_path / "ft", seed=1)
    (ft / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a CLIP model"):
        EncoderLoader(projection_from=tiny_clip).load(ft)
