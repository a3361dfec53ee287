"""OPCM's compatibility modes against the python/ reference extended with the same switches.

- ``paper`` (default): every floating tensor merged, P's diagonal zeroed.
- ``fusionbench``: tensors owned directly by a non-leaf module (CLIP's class_embedding) keep Σ = M
  (never merged, only rescaled by 1/λ(t)), yet count in ‖Σ‖.
- ``release``: as fusionbench, and P's diagonal is kept.
Tolerance: 1e-5 relative per tensor (fp32), as for the default mode.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import opcm_ext
from opcm_ext.errors import ConfigError, MergeStateError
from helpers import assert_close_dicts, build_model, load_folder, make_family, opcm_ref, projected_keys, rel_err, run_cli, \
    tiny_clip_vision_config

from opcm_ref.classify import nonleaf_parameter_keys


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    return make_family(root, tiny_clip_vision_config(), "CLIPVisionModel", 4, seed=9, prefix="vision_model.")


def _reference(paths, model, compat):
    base = load_folder(paths[0])
    proj = {"vision_model." + k for k in projected_keys(model)}
    unmerged = nonleaf_parameter_keys(model, base.keys())
    ref = opcm_ref.OPCMRef(alpha=0.5, compat=compat)
    outs = []
    for p in paths[1:]:
        outs.append({k: v.clone() for k, v in ref.step(base, load_folder(p), proj, unmerged).items()})
    return outs, ref, unmerged


@pytest.mark.parametrize("compat", ["paper", "fusionbench", "release"])
def test_modes_match_the_reference(family, tmp_path, compat):
    paths, model = family
    out = tmp_path / "m"
    reps = opcm_ext.merge_sequence(paths[0], paths[1:], out, compat=compat, device="cpu")
    want, ref, unmerged = _reference(paths, model, compat)
    assert unmerged == {"vision_model.embeddings.class_embedding"}
    assert_close_dicts(load_folder(out), want[-1], 1e-5)
    assert math.isclose(reps[-1].lam, ref.lam, rel_tol=1e-6)
    assert opcm_ext.read_state(out).params == {"alpha": 0.5, "compat": compat}


def test_the_modes_really_differ(family, tmp_path):
    """fusionbench keeps θ0 + M/λ for class_embedding; release also changes the projected weights."""
    paths, _ = family
    got = {}
    for compat in ("paper", "fusionbench", "release"):
        opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / compat, compat=compat, device="cpu")
        got[compat] = load_folder(tmp_path / compat)
    ce = "vision_model.embeddings.class_embedding"
    assert rel_err(got["fusionbench"][ce], got["paper"][ce]) > 1e-3
    fc = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert rel_err(got["release"][fc], got["fusionbench"][fc]) > 1e-4
    base, first = load_folder(paths[0]), load_folder(paths[1])
    # θ(t) − θ0 of an unmerged tensor stays parallel to the first model's task vector
    d, tau1 = (got["fusionbench"][ce] - base[ce]).double(), (first[ce] - base[ce]).double()
    assert float(torch.nn.functional.cosine_similarity(d, tau1, dim=0)) > 1 - 1e-6


def test_a_continued_merge_keeps_its_mode(family, tmp_path):
    paths, _ = family
    out = tmp_path / "m"
    opcm_ext.merge_sequence(paths[0], paths[1:3], out, compat="fusionbench", device="cpu")
    opcm_ext.merge_stream(paths[0], out, paths[3], device="cpu")  # no compat given: the recorded one
    assert opcm_ext.read_state(out).params["compat"] == "fusionbench"
    with pytest.raises(MergeStateError, match="allow-param-change"):
        opcm_ext.merge_stream(paths[0], out, paths[4], compat="paper", device="cpu")
    opcm_ext.merge_stream(paths[0], out, paths[4], compat="paper", allow_param_change=True, device="cpu")
    assert opcm_ext.read_state(out).params["compat"] == "paper"


def test_cli_flag_and_a_bad_mode(family, tmp_path):
    paths, _ = family
    run_cli("merge", paths[0], paths[1], paths[2], "-o", tmp_path / "m", "--compat", "release", "--no-progress")
    assert opcm_ext.read_state(tmp_path / "m").params["compat"] == "release"
    r = run_cli("merge", paths[0], paths[1], "-o", tmp_path / "x", "--compat", "nope", check=False)
    assert r.returncode == 2
    with pytest.raises(ConfigError, match="compat must be one of paper, fusionbench, release"):
        opcm_ext.merge_sequence(paths[0], paths[1:2], tmp_path / "y", compat="nope")


# -- fusionbench/release: FusionBench's own arithmetic, byte for byte ------------------------------------------


def _fusionbench_reference(paths, model, compat):
    base = load_folder(paths[0])
    proj = {"vision_model." + k for k in projected_keys(model)}
    ref = opcm_ref.FusionBenchOPCMRef(alpha=0.5, compat=compat)
    for p in paths[1:]:
        want = ref.step(base, load_folder(p), proj, nonleaf_parameter_keys(model, base.keys()))
    return want, ref


def _assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k].to(got[k].dtype))]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}: {rel_err(got[differ[0]], want[differ[0]]):.2e}"


@pytest.mark.parametrize("compat", ["fusionbench", "release"])
def test_fusionbench_modes_are_fusionbench_arithmetic_byte_for_byte(family, tmp_path, compat):
    """float32 full SVDs, one whole-model float32 vector per norm, float32 λ: the same bytes, and the
    state records FusionBench's own n_t and λ(t)."""
    paths, model = family
    out = tmp_path / "m"
    opcm_ext.merge_sequence(paths[0], paths[1:], out, compat=compat, device="cpu")
    want, ref = _fusionbench_reference(paths, model, compat)
    _assert_identical(load_folder(out), want)
    st = opcm_ext.read_state(out)
    assert st.norms == [float(n) for n in ref.norms]
    assert st.lam == float(ref.lam)


def test_fusionbench_mode_at_its_smallest_budget_and_in_memory(family, tmp_path):
    """Row blocks of the element-wise tensors (the smallest budget that plans) and the in-memory Merger give the same bytes."""
    paths, model = family
    want, _ = _fusionbench_reference(paths, model, "fusionbench")
    budget, least = "64KiB", 0
    for _ in range(3):  # step 1 (no SVD) needs less than the projecting steps: follow the refusals up
        try:
            out = tmp_path / f"b{budget}"
            opcm_ext.merge_sequence(paths[0], paths[1:], out, compat="fusionbench", device="cpu", memory_budget=budget)
            break
        except ConfigError as e:
            msg = e.args[0]
            assert re.search(r"held for the whole step \(--compat fusionbench: the whole-model float32 vector", msg)
            least = int(re.search(r"use --memory-budget (\d+)KiB or more", msg).group(1))
            budget = f"{least}KiB"
    assert least > 0 and budget == f"{least}KiB"
    _assert_identical(load_folder(out), want)
    with pytest.raises(ConfigError, match="is below what this step needs"):
        opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / "y", compat="fusionbench",
                                memory_budget=f"{least - 1}KiB")

    def module(path):  # the Merger learns the non-leaf parameters from the module tree
        m = build_model(tiny_clip_vision_config(), "CLIPVisionModel", 0)
        m.load_state_dict({k.removeprefix("vision_model."): v for k, v in load_folder(path).items()})
        return m

    merger = opcm_ext.Merger(module(paths[0]), compat="fusionbench")
    for p in paths[1:]:
        merger.add(module(p))
    names = {k.removeprefix("vision_model."): k for k in want}  # transformers 5 drops the prefix
    _assert_identical({names[k]: v for k, v in merger.state_dict().items()}, want)
