"""opcm_ext.Merger: the in-memory merge equals the streaming one, resumes from disk, keeps tensors where they are."""

from __future__ import annotations

import math

import pytest
import torch

import opcm_ext
from opcm_ext import io
from opcm_ext.errors import ConfigError, DuplicateModelError, IncompatibleCheckpointError, MergeStateError, OutputError
from opcm_ext.plan import Kind
from helpers import (
    assert_close_dicts,
    build_model,
    load_folder,
    make_family,
    projected_keys,
    run_cli,
    tiny_clip_vision_config,
    tiny_llama_config,
)

METHODS = ["opcm", "task_arithmetic", "ties", "average"]
TOL = 1e-6  # relative Frobenius error per tensor against merge_sequence on the same inputs


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("merger")
    paths, model = make_family(root, tiny_clip_vision_config(), "CLIPVisionModel", 8, seed=5)
    return paths, model, [load_folder(p) for p in paths[1:]]


@pytest.fixture(scope="module")
def on_disk(family, tmp_path_factory):
    """merge_sequence of the 8 models per method, computed once."""
    paths, *_ = family
    done: dict[str, tuple] = {}

    def get(method: str):
        if method not in done:
            out = tmp_path_factory.mktemp(f"disk-{method}") / "m"
            reps = opcm_ext.merge_sequence(paths[0], paths[1:], out, method=method)
            done[method] = (reps[-1], load_folder(out), opcm_ext.read_state(out))
        return done[method]

    return get


def _module_like(model, sd):
    """A copy of ``model``'s architecture holding ``sd`` (a fine-tune as a user holds it: an nn.Module)."""
    m = build_model(model.config, type(model).__name__, 0)
    m.load_state_dict(sd)
    return m


def _same_state(a, b) -> None:
    assert a.method == b.method and a.params == b.params and a.step == b.step
    assert a.base["hash"] == b.base["hash"]
    assert [m["hash"] for m in a.models] == [m["hash"] for m in b.models]
    assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a.norms, b.norms))
    assert math.isclose(a.lam, b.lam, rel_tol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_equals_merge_sequence(family, on_disk, method):
    paths, model, sds = family
    disk, want, state = on_disk(method)
    merger = opcm_ext.Merger(model, method=method)
    assert merger.device == torch.device("cpu")
    for i, sd in enumerate(sds):  # modules and state dicts both count as models
        rep = merger.add(_module_like(model, sd) if i % 2 else sd, name=paths[i + 1].name)
        assert rep.step == i + 1 and rep.output is None
    assert_close_dicts(merger.state_dict(), want, TOL)
    _same_state(merger.state, state)  # hash_tensors in memory == content_hash on disk
    assert rep.tensors == disk.tensors and rep.tensors["projected"] == len(projected_keys(model))
    assert rep.classification == disk.classification == "module types (CLIPVisionModel)"
    assert "-> memory" in rep.summary() and rep.to_dict()["output"] is None


def test_state_dict_base_with_and_without_config(family, on_disk):
    paths, model, sds = family
    _, want, _ = on_disk("opcm")
    base_sd = load_folder(paths[0])
    by_module = opcm_ext.Merger(model).classification.kinds
    with_config = opcm_ext.Merger(base_sd, config=model.config)
    assert with_config.classification.kinds == by_module
    assert opcm_ext.Merger(base_sd, config=paths[0]).classification.kinds == by_module  # a folder with config.json
    for sd in sds:
        with_config.add(sd)
    assert_close_dicts(with_config.state_dict(), want, TOL)
    fallback = opcm_ext.Merger(base_sd)
    assert fallback.classification.source == "fallback name rule"
    # CLIP's class_embedding is 1-D and its position embedding is an "embed": the fallback agrees here
    assert fallback.classification.kinds == by_module


def test_overrides_apply_on_module_types(family):
    _, model, _ = family
    m = opcm_ext.Merger(model, averaged=[r"q_proj"], projected=[r"position_embedding"])
    kinds = m.classification.kinds
    assert all(v is Kind.AVERAGED for k, v in kinds.items() if "q_proj.weight" in k)
    assert kinds["embeddings.position_embedding.weight"] is Kind.PROJECTED
    assert all(kinds[k] is Kind.PROJECTED for k in projected_keys(model) if "q_proj" not in k)
    with pytest.raises(ConfigError, match="matches no tensor"):
        opcm_ext.Merger(model, projected=["no_such_tensor"])


@pytest.mark.parametrize("method", ["opcm", "ties"])
def test_resume_from_save_mid_sequence(family, on_disk, tmp_path, method):
    paths, model, sds = family
    _, want, state = on_disk(method)
    first = opcm_ext.Merger(model, method=method)
    for sd in sds[:4]:
        first.add(sd)
    saved = first.save(tmp_path / "mid")
    assert opcm_ext.read_state(saved).step == 4
    assert (saved / "config.json").is_file()  # from the module's transformers config
    with pytest.raises(OutputError, match="already exists"):
        first.save(saved)
    resumed = opcm_ext.Merger.load(model, saved)
    assert resumed.state.step == 4 and resumed.params == first.params
    for sd in sds[4:]:
        resumed.add(sd)
    assert_close_dicts(resumed.state_dict(), want, TOL)
    assert resumed.state.base["hash"] == state.base["hash"]


def test_resume_from_opcm_step_output(family, on_disk, tmp_path):
    paths, model, sds = family
    _, want, _ = on_disk("opcm")
    out = tmp_path / "four"
    opcm_ext.merge_sequence(paths[0], paths[1:5], out)
    resumed = opcm_ext.Merger.load(load_folder(paths[0]), out)  # a state-dict base: classified by out's config.json
    assert resumed.classification.source.startswith("module types")
    for sd in sds[4:]:
        resumed.add(sd)
    assert_close_dicts(resumed.state_dict(), want, TOL)


def test_saved_merge_continues_with_opcm_step(family, on_disk, tmp_path):
    paths, model, sds = family
    _, want, state = on_disk("opcm")
    merger = opcm_ext.Merger(model)
    for sd in sds[:4]:
        merger.add(sd)
    saved = merger.save(tmp_path / "mem")
    run_cli("step", paths[0], saved, paths[5], "--no-progress")  # replaces saved atomically
    for p in paths[6:]:
        opcm_ext.merge_stream(paths[0], saved, p)
    assert_close_dicts(load_folder(saved), want, TOL)
    _same_state(opcm_ext.read_state(saved), state)


def test_duplicate_and_wrong_base(family, tmp_path):
    paths, model, sds = family
    merger = opcm_ext.Merger(model, method="task_arithmetic")
    merger.add(sds[0])
    with pytest.raises(DuplicateModelError, match="already merged at step 1"):
        merger.add(_module_like(model, sds[0]))
    assert merger.state.step == 1  # a refused step changes nothing
    merger.add(sds[0], allow_duplicate=True)
    saved = merger.save(tmp_path / "ta")
    with pytest.raises(IncompatibleCheckpointError, match="pass the same base"):
        opcm_ext.Merger.load(sds[1], saved)
    with pytest.raises(MergeStateError, match="no opcm-ext merge state"):
        opcm_ext.Merger.load(model, paths[1])
    with pytest.raises(MergeStateError, match="changes the method's parameters"):
        opcm_ext.Merger.load(model, saved, lam=0.5)
    changed = opcm_ext.Merger.load(model, saved, lam=0.5, allow_param_change=True)
    assert changed.add(sds[2]).params == {"lam": 0.5}


def test_incompatible_models_and_bad_arguments(family):
    _, model, sds = family
    with pytest.raises(ConfigError, match="unknown method"):
        opcm_ext.Merger(model, method="nope")
    with pytest.raises(ConfigError, match="unknown parameter"):
        opcm_ext.Merger(model, lam=0.3)  # OPCM has alpha, not lam
    with pytest.raises(ConfigError, match="nn.Module or a state dict"):
        opcm_ext.Merger([1, 2])
    merger = opcm_ext.Merger(model)
    with pytest.raises(MergeStateError, match="nothing is merged yet"):
        merger.state_dict()
    short = dict(sds[0])
    short.pop(next(iter(short)))
    with pytest.raises(IncompatibleCheckpointError, match="missing 1 tensor"):
        merger.add(short)
    bad = dict(sds[0])
    k = next(k for k in bad if bad[k].ndim == 2)
    bad[k] = bad[k].clone()
    bad[k][0, 0] = float("nan")
    with pytest.raises(opcm_ext.errors.NonFiniteError, match=k):
        merger.add(bad)
    assert merger.state is None


def test_tied_weights_merge_once_and_save_like_save_pretrained(tmp_path):
    cfg = tiny_llama_config()
    cfg.tie_word_embeddings = True
    base = build_model(cfg, "LlamaForCausalLM", 0)
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    base.save_pretrained(tmp_path / "base")
    tunes = []
    for i in range(3):
        m = build_model(cfg, "LlamaForCausalLM", 0)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / f"t{i}")
        tunes.append(m)
    assert "lm_head.weight" not in io.CheckpointReader(tmp_path / "base").keys()  # save_pretrained drops the tie
    merger = opcm_ext.Merger(base)
    for m in tunes:
        merger.add(m)
    sd = merger.state_dict()
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    base.load_state_dict(sd)  # every name of the module is there
    opcm_ext.merge_sequence(tmp_path / "base", [tmp_path / f"t{i}" for i in range(3)], tmp_path / "disk")
    want = load_folder(tmp_path / "disk")
    assert_close_dicts({k: sd[k] for k in want}, want, TOL)
    with io.CheckpointReader(tmp_path / "base") as r:
        assert merger.state.base["hash"] == io.content_hash(r)
    saved = merger.save(tmp_path / "mem")
    assert set(load_folder(saved)) == set(want)


def test_sharded_save_and_load(family, tmp_path):
    _, model, sds = family
    merger = opcm_ext.Merger(model, method="average")
    merger.add(sds[0])
    merger.add(sds[1])
    saved = merger.save(tmp_path / "sharded", max_shard_size="64KB")
    assert (saved / io.SAFE_WEIGHTS_INDEX_NAME).is_file()
    assert len(list(saved.glob("model-*-of-*.safetensors"))) > 1
    again = opcm_ext.Merger.load(model, saved)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in merger.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensors_on_a_gpu_stay_there(family):
    paths, model, sds = family
    dev = torch.device("cuda")
    cpu = opcm_ext.Merger(model)
    gpu = opcm_ext.Merger({k: v.to(dev) for k, v in model.state_dict().items()})
    assert gpu.device.type == "cuda"
    for sd in sds[:4]:
        cpu.add(sd)
        gpu.add({k: v.to(dev) for k, v in sd.items()})
    got = gpu.state_dict()
    assert all(t.device.type == "cuda" for t in got.values())
    assert_close_dicts({k: v.cpu() for k, v in got.items()}, cpu.state_dict(), 1e-5)
    assert gpu.state.base["hash"] == cpu.state.base["hash"]
    mixed = opcm_ext.Merger(model, device="cuda")  # CPU inputs, merged on the GPU
    mixed.add(sds[0])
    assert all(t.device.type == "cuda" for t in mixed.state_dict().values())
