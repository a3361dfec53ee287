"""Tensors larger than the memory budget: row blocks for element-wise passes, streamed SVD for projection.

Tolerances: the streamed projection works in float64 where the whole-matrix path forms P and T'
in float32, so the two agree to float32 rounding (relative 1e-5 on T').
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import opcm_ext
from opcm_ext import ops
from opcm_ext.errors import ConfigError
from opcm_ext.methods.base import BlockSource, Sums
from opcm_ext.methods.opcm import SigmaSums
from opcm_ext.methods.streamed import project_streamed
from helpers import assert_close_dicts, load_folder, make_family, opcm_ref, projected_keys, rel_err, tiny_clip_vision_config


class MemoryBlocks(BlockSource):
    """A BlockSource over in-memory M and T, cut along the long side like the engine's."""

    def __init__(self, M: torch.Tensor, T: torch.Tensor, block: int) -> None:
        m, n = M.shape
        self.key, self.shape, self.ops = "w", (m, n), ops
        self.tall = m >= n
        self.M, self.T = (M, T) if self.tall else (M.mT.contiguous(), T.mT.contiguous())
        self.block = block
        self.nblocks = math.ceil(max(m, n) / block)
        self.out = torch.empty_like(self.M)
        self.reads = 0

    def deltas(self, i):
        self.reads += 1
        s = slice(i * self.block, (i + 1) * self.block)
        return self.M[s], self.T[s]

    def keep(self, i, x):
        self.out[i * self.block:(i + 1) * self.block] = x

    def sigma(self) -> torch.Tensor:
        return self.out if self.tall else self.out.mT


def whole_sigma(M: torch.Tensor, T: torch.Tensor, alpha: float, lam_prev: float) -> torch.Tensor:
    U, S, V = ops.thin_svd(M)
    Tp = ops.project(T, U, S, V, alpha)
    return lam_prev * M + Tp


def low_rank(m: int, n: int, rank: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) / math.sqrt(rank)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("block", [7, 16, 1000])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_streamed_projection_equals_whole_matrix(shape, block, alpha):
    g = torch.Generator().manual_seed(hash((shape, block)) % 1000)
    M = torch.randn(*shape, generator=g) * torch.logspace(0, -2, shape[1])[None, :]
    T = torch.randn(*shape, generator=g)
    src = MemoryBlocks(M, T, block)
    sums = SigmaSums()
    project_streamed(src, ops, alpha, 1.3, sums)
    want = whole_sigma(M, T, alpha, 1.3)
    assert rel_err(src.sigma(), want) < 1e-5
    assert math.isclose(float(sums.sigma_sq), float(want.double().square().sum()), rel_tol=1e-6)
    # P1: T' = Σ − λ·M is orthogonal to M
    Tp = src.sigma().double() - 1.3 * M.double()
    assert abs(float((Tp * M.double()).sum())) <= 1e-5 * float(Tp.norm() * M.double().norm())


def test_streamed_projection_rank_deficient_and_zero():
    g = torch.Generator().manual_seed(3)
    M = low_rank(80, 30, 4, g)
    T = torch.randn(80, 30, generator=g)
    src = MemoryBlocks(M, T, 9)
    project_streamed(src, ops, 0.5, 1.0, SigmaSums())
    assert rel_err(src.sigma(), whole_sigma(M, T, 0.5, 1.0)) < 1e-5
    Z = torch.zeros(50, 20)  # M = 0: every triplet is dropped, T' = T
    src = MemoryBlocks(Z, T[:50, :20].contiguous(), 8)
    project_streamed(src, ops, 0.5, 2.0, SigmaSums())
    assert torch.equal(src.sigma(), T[:50, :20])


def test_sums_merge_and_timings():
    a, b = SigmaSums(), SigmaSums()
    a.sigma_sq += 2.0
    b.sigma_sq += 3.5
    with b.timed("svd"):
        pass
    a.merge(b)
    assert float(a.sigma_sq) == 5.5 and "svd" in a.timings
    assert isinstance(Sums().to("cpu"), Sums)


# ----------------------------------------------------------------------------------------------
# through the engine: budgets that force row blocks and streamed matrices
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    cfg = tiny_clip_vision_config(hidden=48, layers=2, inter=96)
    paths, model = make_family(root, cfg, "CLIPVisionModel", 3, seed=5)
    return paths, model


def test_opcm_with_streamed_matrices_matches_the_reference(family, tmp_path):
    paths, model = family
    out = tmp_path / "merged"
    reps = opcm_ext.merge_sequence(paths[0], paths[1:], out, memory_budget="300KB", device="cpu")
    base = load_folder(paths[0])
    ref = opcm_ref.OPCMRef(alpha=0.5)
    proj = projected_keys(model)
    for p in paths[1:]:
        want = ref.step(base, load_folder(p), proj)
    assert_close_dicts(load_folder(out), want, 1e-5)
    assert math.isclose(reps[-1].lam, ref.lam, rel_tol=1e-6)
    assert reps[-1].streamed > 0 and reps[0].streamed == 0  # step 1 copies; later steps stream some SVDs


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "average"])
def test_row_blocks_give_the_whole_tensor_result(family, tmp_path, method):
    """Element-wise methods: a budget that splits tensors into row blocks changes no output byte."""
    paths, _ = family
    small, big = tmp_path / "small", tmp_path / "big"
    split = opcm_ext.merge_sequence(paths[0], paths[1:], small, method=method, memory_budget="120KB", device="cpu")
    whole = opcm_ext.merge_sequence(paths[0], paths[1:], big, method=method, device="cpu")
    assert split[-1].groups > 2 * whole[-1].groups  # the small budget split tensors into row blocks
    a, b = load_folder(small), load_folder(big)
    assert all(torch.equal(a[k], b[k]) for k in b)
    sa, sb = opcm_ext.read_state(small), opcm_ext.read_state(big)
    assert sa.step == sb.step and all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(sa.norms, sb.norms))


def test_a_budget_below_the_floor_names_the_minimum(family, tmp_path):
    paths, _ = family
    with pytest.raises(ConfigError) as info:
        opcm_ext.merge_sequence(paths[0], paths[1:3], tmp_path / "m", memory_budget="20KB", device="cpu")
    m = re.search(r"use --memory-budget (\d+)(KiB|MiB) or more", str(info.value))
    assert m, str(info.value)
    need = int(m.group(1)) * (1024 if m.group(2) == "KiB" else 1 << 20)
    opcm_ext.merge_sequence(paths[0], paths[1:3], tmp_path / "ok", memory_budget=need, device="cpu")


# ----------------------------------------------------------------------------------------------
# the memory floor, from the planner alone (shapes only: no checkpoint is built)
# ----------------------------------------------------------------------------------------------


def _plan_for(config, cls_name: str, dtype: torch.dtype, budget: str):
    """make_plan for an architecture's real shapes (built on the meta device) and an OPCM step t = 2."""
    import transformers

    from opcm_ext.methods import OPCM, StepInfo
    from opcm_ext.plan import classify, make_plan, parse_size
    from opcm_ext.state import MergeState

    with torch.device("meta"):
        model = getattr(transformers, cls_name)(config)
    sd = model.state_dict()
    tensors = {k: (dtype if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in sd.items()}
    proj = {k for k in projected_keys(model) if k in sd}
    cls = classify(tensors, None, projected=[f"^{re.escape(k)}$" for k in sorted(proj)])
    infos = {k: (s, 3 * d.itemsize) for k, (d, s) in tensors.items()}
    m = OPCM()
    prev = MergeState(method="opcm", params={"alpha": 0.5}, step=1, lam=1.0, norms=[1.0], base={"hash": "x"},
                      models=[{"hash": "y"}])
    m.begin(StepInfo(step=2, prev=prev))
    return make_plan(cls, infos, parse_size(budget), m)


def test_vit_b32_fits_64_mib():
    from helpers import vit_b32_config

    plan = _plan_for(vit_b32_config(), "CLIPVisionModel", torch.float32, "64MiB")
    assert plan.streamed and plan.peak <= 64 << 20
    with pytest.raises(ConfigError, match=r"use --memory-budget \d+(KiB|MiB) or more"):
        _plan_for(vit_b32_config(), "CLIPVisionModel", torch.float32, "24MiB")


def test_tinyllama_shapes_fit_512_mib():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    plan = _plan_for(cfg, "LlamaForCausalLM", torch.bfloat16, "512MiB")
    assert "lm_head.weight" in plan.streamed and plan.peak <= 512 << 20


def test_budget_cut_projected_groups_are_a_multiple_of_the_svd_workers():
    """Three same-shape matrices fit a group but two workers would idle half of the last round: two it is."""
    from opcm_ext.plan import Classification, Kind, make_plan

    class Cost:
        projects = True

        def cost(self, kind, shape, isz):
            return 100

        def stream_cost(self, shape, isz, rows):
            return 1000 + rows

    kinds = {f"w{i}": Kind.PROJECTED for i in range(7)}
    infos = {k: ((8, 8), 12) for k in kinds}
    cls = Classification(kinds=kinds, source="test")
    sizes = [len(g.keys) for g in make_plan(cls, infos, 700, Cost(), batch_multiple=2).groups]
    assert sizes == [2, 2, 3]  # 3 would fit the 350-byte half budget; the last group takes what is left
    assert [len(g.keys) for g in make_plan(cls, infos, 700, Cost()).groups] == [3, 3, 1]
    assert [len(g.keys) for g in make_plan(cls, infos, 10_000, Cost(), batch_multiple=2).groups] == [7]
