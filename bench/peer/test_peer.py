"""Parity with FusionBench's own code (marker `peer`; needs the venv of bench/peer/setup_env.sh).

Deselected by default; run with `python -m pytest bench/peer -m peer`. Skips when the venv is absent.
"""

from __future__ import annotations

import pytest

import parity

pytestmark = [pytest.mark.peer,
              pytest.mark.skipif(not parity.peer_python().exists(),
                                 reason="no FusionBench venv (run bench/peer/setup_env.sh)")]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return parity.run("tiny", 3, workdir=tmp_path_factory.mktemp("peer"))


def test_task_arithmetic_and_ties_match_fusionbench(result):
    for method in ("task_arithmetic", "ties"):
        c = result["methods"][method]["ours_vs_fusionbench"]
        assert c["worst_rel"] <= 1e-6, (method, c["worst_key"], c["worst_rel"])
        ref = result["methods"][method]["reference_vs_fusionbench"]["paper"]
        assert ref["worst_rel"] <= 1e-6, (method, ref["worst_key"])


def test_reference_compat_modes_match_fusionbench_on_every_tensor(result):
    opcm = result["methods"]["opcm"]
    fb = opcm["reference_vs_fusionbench"]["fusionbench"]
    assert fb["worst_rel"] <= 1e-5, (fb["worst_key"], fb["worst_rel"])
    before_fix = opcm["reference_release_vs_fusionbench_before_fix"]
    assert before_fix["worst_rel"] <= 1e-5, (before_fix["worst_key"], before_fix["worst_rel"])
    # and the modes differ where they should: paper on class_embedding, release on projected weights
    assert opcm["reference_vs_fusionbench"]["paper"]["by_kind"]["class_embedding"] > 1e-3
    assert opcm["reference_vs_fusionbench"]["release"]["by_kind"]["projected"] > 1e-4


def test_opcm_merge_against_fusionbench(result):
    c = result["methods"]["opcm"]["ours_vs_fusionbench"]
    if result["compat_ours"] == "fusionbench":  # FusionBench's own arithmetic: every tensor byte for byte
        assert c["identical"] == c["tensors"], (c["worst_key"], c["worst_rel"])
    else:  # the default (paper) mode: FusionBench's known difference on class_embedding, through λ elsewhere
        assert c["by_kind"]["class_embedding"] > 1e-3
        assert c["by_kind"]["projected"] <= 1e-4
