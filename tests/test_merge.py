"""OPCM through the streaming engine: parity with the reference, the spec's properties, HF round trips.

Tolerances (per tensor, relative Frobenius error against the reference on the same inputs):
fp32 1e-5; fp16 2e-3 and bf16 1.6e-2 (outputs are rounded to the storage dtype at every step,
so a one-ulp difference in a rounding decision is 2^-11 resp. 2^-8 of an entry).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import opcm_ext
from opcm_ext.errors import ConfigError, MergeStateError, OutputError
from helpers import (
    assert_close_dicts,
    build_model,
    load_folder,
    make_family,
    opcm_ref,
    projected_keys,
    rel_err,
    run_cli,
    tiny_clip_config,
    tiny_clip_vision_config,
    tiny_llama_config,
    vit_b32_config,
)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference_sequence(paths, model, alpha=0.5, prefix=""):
    """Run the oracle over the saved checkpoints; return the merged state dict after every step and the oracle."""
    base = load_folder(paths[0])
    proj = {prefix + k for k in projected_keys(model)}
    ref = opcm_ref.OPCMRef(alpha=alpha)
    outs, lams = [], []
    for p in paths[1:]:
        outs.append({k: v.clone() for k, v in ref.step(base, load_folder(p), proj).items()})
        lams.append(ref.lam)
    return outs, lams


@pytest.fixture(scope="module")
def clip_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipv")
    paths, model = make_family(root, tiny_clip_vision_config(), "CLIPVisionModel", 8, seed=1)
    ref_outs, ref = reference_sequence(paths, model)
    return paths, model, ref_outs, ref


def test_api_sequence_matches_reference_and_properties(clip_family, tmp_path):
    paths, model, ref_outs, ref = clip_family
    out = tmp_path / "merged"
    base = load_folder(paths[0])
    proj = projected_keys(model)
    prev_sd, prev_lam = None, None
    for t, p in enumerate(paths[1:], start=1):
        rep = opcm_ext.merge_stream(paths[0], None if t == 1 else out, p, out)
        got = load_folder(out)
        assert_close_dicts(got, ref_outs[t - 1], TOL[torch.float32])
        assert rep.step == t
        assert math.isclose(rep.lam, ref[t - 1], rel_tol=1e-5)
        # P2: the merged model stays at distance mean(n1..nt) from the base.
        dist = math.sqrt(sum(((got[k].double() - base[k].double()) ** 2).sum().item() for k in got if got[k].is_floating_point()))
        assert math.isclose(dist, rep.mean_norm, rel_tol=1e-5), (t, dist, rep.mean_norm)
        if t == 1:
            raw_new = load_folder(p)
            assert all(torch.equal(got[k], raw_new[k]) for k in got)  # θ(1) = θ1 byte for byte
            assert rep.lam == 1.0
        else:
            # P1: T' = λ(t)(θ(t) − θ0) − λ(t−1)(θ(t−1) − θ0) is orthogonal to M = θ(t−1) − θ0.
            for k in proj:
                M = prev_sd[k].double() - base[k].double()
                Tp = rep.lam * (got[k].double() - base[k].double()) - prev_lam * M
                cos = (Tp * M).sum() / (Tp.norm() * M.norm())
                assert abs(cos.item()) < 1e-4, (k, cos.item())
        prev_sd, prev_lam = got, rep.lam
    assert rep.tensors["projected"] == len(proj)


def test_merge_sequence_and_cli_agree(clip_family, tmp_path):
    paths, _, ref_outs, _ = clip_family
    reports = opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / "api")
    assert [r.step for r in reports] == list(range(1, 9))
    api = load_folder(tmp_path / "api")
    assert_close_dicts(api, ref_outs[-1], TOL[torch.float32])
    proc = run_cli("merge", paths[0], *paths[1:], "-o", tmp_path / "cli", "--json", "--no-progress")
    data = json.loads(proc.stdout)
    assert [d["step"] for d in data] == list(range(1, 9))
    cli = load_folder(tmp_path / "cli")
    assert all(torch.equal(cli[k], api[k]) for k in api)
    info = json.loads(run_cli("info", tmp_path / "cli", "--json").stdout)
    assert info["state"]["step"] == 8 and info["state"]["method"] == "opcm"
    assert info["state"]["params"] == {"alpha": 0.5, "compat": "paper"}
    assert [m["name"] for m in info["state"]["models"]] == [p.name for p in paths[1:]]


def test_continue_in_new_process_equals_single_run(clip_family, tmp_path):
    paths, *_ = clip_family
    opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / "one")
    opcm_ext.merge_sequence(paths[0], paths[1:5], tmp_path / "two")
    for p in paths[5:]:
        run_cli("step", paths[0], tmp_path / "two", p, "--no-progress")
    one, two = load_folder(tmp_path / "one"), load_folder(tmp_path / "two")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert opcm_ext.read_state(tmp_path / "one") == opcm_ext.read_state(tmp_path / "two")


def test_output_loads_with_from_pretrained(clip_family, tmp_path):
    from transformers import CLIPVisionModel

    paths, model, _, _ = clip_family
    opcm_ext.merge_sequence(paths[0], paths[1:4], tmp_path / "m")
    loaded = CLIPVisionModel.from_pretrained(tmp_path / "m").eval()
    direct = build_model(model.config, "CLIPVisionModel", 0)
    direct.load_state_dict(load_folder(tmp_path / "m"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = loaded(pixel_values=x).pooler_output
        b = direct(pixel_values=x).pooler_output
    assert torch.equal(a, b)


def test_order_matters(clip_family, tmp_path):
    paths, *_ = clip_family
    opcm_ext.merge_sequence(paths[0], paths[1:4], tmp_path / "a")
    opcm_ext.merge_sequence(paths[0], [paths[3], paths[1], paths[2]], tmp_path / "b")
    a, b = load_folder(tmp_path / "a"), load_folder(tmp_path / "b")
    assert max(rel_err(a[k], b[k]) for k in a if a[k].is_floating_point()) > 1e-3  # P4


def test_orthogonal_task_vectors_scale_like_sqrt_t(tmp_path):
    """P3: disjoint row supports make the task vectors orthogonal (and untouched by projection): λ(t) = √t."""
    cfg = tiny_clip_vision_config(hidden=32, layers=1, inter=64)
    model = build_model(cfg, "CLIPVisionModel", 3)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    proj = projected_keys(model)
    paths = []
    from helpers import save_hf

    save_hf(tmp_path / "base", model, base)
    for t in range(4):
        sd = {k: v.clone() for k, v in base.items()}
        for k in sorted(proj):
            rows = sd[k].shape[0] // 4
            delta = torch.zeros_like(sd[k])
            delta[t * rows:(t + 1) * rows] = 0.01
            sd[k] += delta
        save_hf(tmp_path / f"t{t}", model, sd)
        paths.append(tmp_path / f"t{t}")
    reps = opcm_ext.merge_sequence(tmp_path / "base", paths, tmp_path / "out")
    for t, r in enumerate(reps, start=1):
        assert math.isclose(r.lam, math.sqrt(t), rel_tol=1e-4), (t, r.lam)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs(tmp_path, dtype):
    paths, model = make_family(tmp_path, tiny_clip_vision_config(), "CLIPVisionModel", 4, seed=5, dtype=dtype)
    ref_outs, _ = reference_sequence(paths, model)
    opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / "m")
    got = load_folder(tmp_path / "m")
    assert all(v.dtype == dtype for v in got.values() if v.is_floating_point())
    assert_close_dicts(got, ref_outs[-1], TOL[dtype])


def test_transformers4_vision_model_prefix(tmp_path):
    """Checkpoints saved by transformers 4 prefix CLIPVisionModel keys with `vision_model.`."""
    paths, model = make_family(tmp_path, tiny_clip_vision_config(), "CLIPVisionModel", 3, seed=7, prefix="vision_model.")
    ref_outs, _ = reference_sequence(paths, model, prefix="vision_model.")
    reps = opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / "m")
    assert reps[-1].tensors["projected"] == len(projected_keys(model))
    assert reps[-1].classification.startswith("module types")
    assert_close_dicts(load_folder(tmp_path / "m"), ref_outs[-1], TOL[torch.float32])


def test_full_clip_model(tmp_path):
    paths, model = make_family(tmp_path, tiny_clip_config(), "CLIPModel", 3, seed=9)
    ref_outs, _ = reference_sequence(paths, model)
    reps = opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / "m")
    proj = projected_keys(model)
    assert "visual_projection.weight" in proj and "text_projection.weight" in proj
    assert reps[-1].tensors["projected"] == len(proj)
    assert_close_dicts(load_folder(tmp_path / "m"), ref_outs[-1], TOL[torch.float32])


def test_llama_sharded(tmp_path):
    paths, model = make_family(tmp_path, tiny_llama_config(), "LlamaForCausalLM", 3, seed=11, max_shard_size="20KB")
    assert (paths[1] / "model.safetensors.index.json").exists()
    ref_outs, _ = reference_sequence(paths, model)
    opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / "m")
    out = tmp_path / "m"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    src = json.loads((paths[-1] / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == src["weight_map"]  # sharded like the input
    assert_close_dicts(load_folder(out), ref_outs[-1], TOL[torch.float32])
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(out)


def test_a_one_shard_index_stays_loadable(tmp_path):
    """A checkpoint saved as one shard behind an index (model-00001-of-00001.safetensors): the output
    keeps the shard's name, so it needs the index for from_pretrained to find it."""
    paths, _ = make_family(tmp_path, tiny_llama_config(), "LlamaForCausalLM", 2, seed=3, max_shard_size="5GB")
    for p in paths:  # save_pretrained wrote model.safetensors: rename it as a one-shard hub checkpoint does
        (p / "model.safetensors").rename(p / "model-00001-of-00001.safetensors")
        keys = list(load_folder_file(p / "model-00001-of-00001.safetensors"))
        (p / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(tmp_path / "m")


def load_folder_file(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.keys()


def test_bare_safetensors_files(clip_family, tmp_path):
    paths, _, ref_outs, _ = clip_family
    files = [p / "model.safetensors" for p in paths[:4]]
    opcm_ext.merge_sequence(files[0], files[1:], tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    assert_close_dicts(load_file(str(tmp_path / "m.safetensors")), ref_outs[2], TOL[torch.float32])


def test_memory_budget_too_small_is_a_clear_error(clip_family, tmp_path):
    paths, *_ = clip_family
    with pytest.raises(ConfigError, match="memory budget"):
        opcm_ext.merge_stream(paths[0], None, paths[1], tmp_path / "m", memory_budget="1KB")
    assert not (tmp_path / "m").exists()


def test_tiny_budget_many_groups_same_result(clip_family, tmp_path):
    paths, _, ref_outs, _ = clip_family
    reps = opcm_ext.merge_sequence(paths[0], paths[1:4], tmp_path / "m", memory_budget="200KB")
    assert reps[-1].groups > 10
    assert_close_dicts(load_folder(tmp_path / "m"), ref_outs[2], TOL[torch.float32])


def test_continuing_with_other_params_needs_permission(clip_family, tmp_path):
    paths, *_ = clip_family
    opcm_ext.merge_sequence(paths[0], paths[1:3], tmp_path / "m")
    with pytest.raises(MergeStateError, match="alpha"):
        opcm_ext.merge_stream(paths[0], tmp_path / "m", paths[3], alpha=0.7)
    rep = opcm_ext.merge_stream(paths[0], tmp_path / "m", paths[3], alpha=0.7, allow_param_change=True)
    assert rep.params == {"alpha": 0.7, "compat": "paper"}


def test_existing_output_needs_overwrite(clip_family, tmp_path):
    paths, *_ = clip_family
    opcm_ext.merge_sequence(paths[0], paths[1:2], tmp_path / "m")
    with pytest.raises(OutputError, match="overwrite"):
        opcm_ext.merge_sequence(paths[0], paths[1:3], tmp_path / "m")
    opcm_ext.merge_sequence(paths[0], paths[1:3], tmp_path / "m", overwrite=True)


@pytest.mark.slow
def test_vit_b32_shapes(tmp_path):
    """One slower test on real ViT-B/32 vision shapes (88M parameters): 3 models, 2 SVD steps."""
    paths, model = make_family(tmp_path, vit_b32_config(), "CLIPVisionModel", 3, seed=13)
    ref_outs, _ = reference_sequence(paths, model)
    reps = opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / "m", memory_budget="512MiB")
    assert reps[-1].tensors["projected"] == 72
    assert_close_dicts(load_folder(tmp_path / "m"), ref_outs[-1], TOL[torch.float32])


@pytest.mark.parametrize("case", ["duplicate", "wrong-base"])
def test_identity_is_refused_before_any_pass(clip_family, tmp_path, monkeypatch, case):
    """A duplicate model or a wrong base is refused before the engine runs a single pass (no SVD, no read of
    the tensors beyond hashing): the check uses the content hashes, which come first."""
    import opcm_ext.api as api
    from opcm_ext.errors import DuplicateModelError, IncompatibleCheckpointError

    paths, _, _, _ = clip_family
    out = tmp_path / "m"
    opcm_ext.merge_sequence(paths[0], paths[1:3], out)

    def no_step(job):
        raise AssertionError("the engine ran a step")

    monkeypatch.setattr(api, "run_step", no_step)
    if case == "duplicate":
        with pytest.raises(DuplicateModelError):
            opcm_ext.merge_stream(paths[0], out, paths[1])
    else:
        with pytest.raises(IncompatibleCheckpointError, match="made from base"):
            opcm_ext.merge_stream(paths[3], out, paths[4])
