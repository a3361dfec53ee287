"""Continual Task Arithmetic, TIES-Merging and averaging in the streaming engine vs the reference.

Tolerance: 1e-5 relative Frobenius error per tensor (fp32); the TIES threshold must equal
torch.kthvalue on the concatenated rows exactly.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import opcm_ext
from opcm_ext.errors import ConfigError, MergeStateError
from opcm_ext.methods.ties import radix_select_bucket
from helpers import (
    assert_close_dicts,
    build_model,
    load_folder,
    make_family,
    opcm_ref,
    run_cli,
    save_hf,
    tiny_clip_vision_config,
)

TOL = 1e-5
REFS = {
    "task_arithmetic": lambda: opcm_ref.TaskArithmeticRef(lam=0.3),
    "ties": lambda: opcm_ref.TiesRef(lam=0.3, keep=0.2),
    "average": lambda: opcm_ref.AverageRef(),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    paths, model = make_family(root, tiny_clip_vision_config(), "CLIPVisionModel", 8, seed=21)
    return paths, model


def _reference(method, paths):
    base = load_folder(paths[0])
    ref = REFS[method]()
    out = None
    for p in paths[1:]:
        out = {k: v.clone() for k, v in ref.step(base, load_folder(p)).items()}
    return out


@pytest.mark.parametrize("method", sorted(REFS))
def test_api_matches_reference(family, tmp_path, method):
    paths, _ = family
    reps = opcm_ext.merge_sequence(paths[0], paths[1:], tmp_path / "m", method=method)
    assert [r.method for r in reps] == [method] * 8
    assert_close_dicts(load_folder(tmp_path / "m"), _reference(method, paths), TOL)
    state = opcm_ext.read_state(tmp_path / "m")
    assert state.method == method and state.step == 8
    assert state.params == {"task_arithmetic": {"lam": 0.3}, "ties": {"lam": 0.3, "keep": 0.2}, "average": {}}[method]


@pytest.mark.parametrize("method", sorted(REFS))
def test_cli_matches_reference(family, tmp_path, method):
    paths, _ = family
    run_cli("merge", paths[0], *paths[1:], "-o", tmp_path / "m", "--method", method, "--no-progress")
    assert_close_dicts(load_folder(tmp_path / "m"), _reference(method, paths), TOL)
    info = run_cli("info", tmp_path / "m").stdout
    assert f"method: {method}" in info
    params = {"task_arithmetic": {"lam": 0.3}, "ties": {"lam": 0.3, "keep": 0.2}, "average": {}}[method]
    for name, value in params.items():
        assert re.search(rf"\b{name}\b\W+{value}", info), info
    state = json.loads(run_cli("info", tmp_path / "m", "--json").stdout)["state"]
    assert state["method"] == method and state["params"] == params and state["step"] == 8


def test_ties_threshold_is_kthvalue_exactly_with_ties(tmp_path):
    """Quantised task vectors put many equal magnitudes at the threshold."""
    model = build_model(tiny_clip_vision_config(), "CLIPVisionModel", 4)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_hf(tmp_path / "base", model, base)
    g = torch.Generator().manual_seed(5)
    paths = []
    for i in range(3):
        sd = {k: (v + 0.01 * torch.randint(-3, 4, v.shape, generator=g).float()) if v.is_floating_point() else v
              for k, v in base.items()}
        save_hf(tmp_path / f"t{i}", model, sd)
        paths.append(tmp_path / f"t{i}")
    opcm_ext.merge_sequence(tmp_path / "base", paths[:2], tmp_path / "m", method="ties")
    merged_before = load_folder(tmp_path / "m")
    rep = opcm_ext.merge_stream(tmp_path / "base", tmp_path / "m", paths[2], method="ties")
    # Rebuild the two rows exactly as the spec says (sorted key order, fp32) and compare thresholds.
    new, b = load_folder(paths[2]), load_folder(tmp_path / "base")
    keys = sorted(k for k in b if b[k].is_floating_point())
    rows = [torch.cat([(merged_before[k].float() - b[k].float()).reshape(-1) for k in keys]),
            torch.cat([(new[k].float() - b[k].float()).reshape(-1) for k in keys])]
    d = rows[0].numel()
    k = d - math.floor(d * 0.2)
    want = [r.abs().kthvalue(k).values.item() for r in rows]
    assert rep.details["thresholds"] == want
    ties_at = [int((r.abs() == w).sum()) for r, w in zip(rows, want)]
    assert min(ties_at) > 1  # the test really exercises ties at the threshold
    ref = opcm_ref.TiesRef(lam=0.3, keep=0.2)
    for p in paths:
        expect = ref.step(b, load_folder(p))
    assert_close_dicts(load_folder(tmp_path / "m"), expect, TOL)


def test_radix_select_bucket():
    hist = torch.tensor([0, 3, 0, 2, 5])
    assert radix_select_bucket(hist, 1) == (1, 1)
    assert radix_select_bucket(hist, 3) == (1, 3)
    assert radix_select_bucket(hist, 4) == (3, 1)
    assert radix_select_bucket(hist, 10) == (4, 5)


def test_method_change_needs_permission(family, tmp_path):
    paths, _ = family
    opcm_ext.merge_sequence(paths[0], paths[1:3], tmp_path / "m", method="task_arithmetic")
    with pytest.raises(MergeStateError, match="task_arithmetic"):
        opcm_ext.merge_stream(paths[0], tmp_path / "m", paths[3], method="ties")
    with pytest.raises(MergeStateError, match="lam"):
        opcm_ext.merge_stream(paths[0], tmp_path / "m", paths[3], lam=0.9)
    # Parameters recorded in the state are reused when not given.
    rep = opcm_ext.merge_stream(paths[0], tmp_path / "m", paths[3])
    assert rep.method == "task_arithmetic" and rep.params == {"lam": 0.3}


@pytest.mark.parametrize("method,params,match", [
    ("ties", {"keep": 0.0}, "keep"),
    ("ties", {"keep": 1.0}, "keep"),
    ("task_arithmetic", {"lam": -1.0}, "lam"),
    ("opcm", {"alpha": 0.0}, "alpha"),
    ("opcm", {"alpha": 1.5}, "alpha"),
    ("average", {"lam": 0.3}, "unknown parameter"),
    ("nope", {}, "unknown method"),
])
def test_bad_params(family, tmp_path, method, params, match):
    paths, _ = family
    with pytest.raises(ConfigError, match=match):
        opcm_ext.merge_stream(paths[0], None, paths[1], tmp_path / "m", method=method, **params)
    assert not (tmp_path / "m").exists()
