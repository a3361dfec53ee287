"""The pure-torch reference (python/opcm_ref) against docs/algorithm.md.

Small random "models" (dicts of tensors): Linear-like 2-D projected weights
(square, tall, wide), biases, a LayerNorm-like vector, and an int64 buffer
that must be carried unchanged. Hand-computed cases use values that are exact
in float32, so they are compared exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

import opcm_ref
from opcm_ref import (
    AVERAGED,
    CARRIED,
    PROJECTED,
    AverageRef,
    OPCMRef,
    TaskArithmeticRef,
    TiesRef,
    acc,
    average_merge,
    bwt,
    classify,
    classify_by_module,
    flat_norm,
    opcm_merge,
    project,
    split_rank,
    task_arithmetic_merge,
    ties_combine,
    ties_merge,
)

# name -> shape; the three `*.weight` 2-D tensors are the projected ones.
SHAPES: dict[str, tuple[int, ...]] = {
    "attn.q_proj.weight": (16, 16),  # square
    "attn.q_proj.bias": (16,),
    "mlp.fc1.weight": (24, 10),  # tall
    "mlp.fc1.bias": (24,),
    "mlp.fc2.weight": (10, 24),  # wide
    "ln.weight": (10,),  # LayerNorm-like vector
}
PROJ = {"attn.q_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"}
BUF = "embeddings.position_ids"


def make_base(gen: torch.Generator) -> dict[str, torch.Tensor]:
    sd = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    sd[BUF] = torch.arange(7, dtype=torch.int64)
    return sd


def make_model(base, gen: torch.Generator, scale: float = 0.1) -> dict[str, torch.Tensor]:
    return {
        k: (v.float() + scale * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in base.items()
    }


def diff(a, b) -> dict[str, torch.Tensor]:
    return {k: a[k].float() - b[k].float() for k in a if a[k].is_floating_point()}


def rel_inner(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return abs(float((a * b).sum())) / (float(a.norm()) * float(b.norm()))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cheap_form_fp64(M: torch.Tensor, T: torch.Tensor, alpha: float) -> torch.Tensor:
    """docs/algorithm.md, "The thin form used in practice", in float64 with the thin SVD (independent check)."""
    M, T = M.double(), T.double()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    V = Vh.mT
    r = split_rank(S, alpha)
    d = torch.einsum("mi,mn,ni->i", U, T, V)
    Ur, Vr = U[:, :r], V[:, :r]
    out = T - Ur @ (Ur.mT @ T @ Vr) @ Vr.mT
    return out - (U[:, r:] * d[r:]) @ V[:, r:].mT


# ---------------------------------------------------------------- split rank


@pytest.mark.parametrize(
    "S, alpha, expected",
    [
        ([3.0, 2.0, 1.0], 0.5, 1),  # ratios 0.5, 0.833, 1: first > 0.5 is index 1
        ([3.0, 2.0, 1.0], 0.4, 0),  # 0.5 > 0.4 already at index 0
        ([3.0, 2.0, 1.0], 0.9, 2),
        ([3.0, 2.0, 1.0], 0.0, 0),
        ([3.0, 2.0, 1.0], 1.0, 0),  # cumsum/sum > 1 never holds: no index, r = 0
        ([1.0, 1.0, 1.0, 1.0], 0.5, 2),  # 0.5 at index 1 is not > 0.5 (strict)
        ([1.0, 1.0, 1.0, 1.0], 0.74, 2),
        ([4.0, 0.0, 0.0], 0.99, 0),
        ([5.0], 0.5, 0),
        ([0.0, 0.0, 0.0], 0.5, 0),  # M = 0: 0/0, no index qualifies
    ],
    ids=lambda v: str(v),
)
def test_split_rank_hand_cases(S, alpha, expected):
    assert split_rank(torch.tensor(S), alpha) == expected


# ---------------------------------------------------------------- projection


@pytest.mark.parametrize("shape", [(16, 16), (24, 10), (10, 24)], ids=["square", "tall", "wide"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_projection_matches_cheap_form_fp64(shape, alpha):
    g = gen(1)
    M = torch.randn(shape, generator=g)
    T = torch.randn(shape, generator=g)
    Tp = project(M, T, alpha)
    ref = cheap_form_fp64(M, T, alpha)
    assert Tp.dtype == torch.float32
    assert float((Tp.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("shape", [(16, 16), (24, 10), (10, 24)], ids=["square", "tall", "wide"])
@pytest.mark.parametrize("rank", [None, 3], ids=["full-rank", "rank3"])
def test_projection_structure_of_P(shape, rank):
    """Uᵀ T' V: zero diagonal (kept triplets), zero [:r, :r], rest = Uᵀ T V."""
    g = gen(2)
    m, n = shape
    if rank is None:
        M = torch.randn(shape, generator=g)
    else:
        M = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
    T = torch.randn(shape, generator=g)
    alpha = 0.5
    U, S, Vh = torch.linalg.svd(M, full_matrices=True)
    V = Vh.mT
    q = int((S > opcm_ref.drop_tolerance(S, m, n)).sum())
    assert q == (rank or min(m, n))
    S_kept = S.clone()
    S_kept[q:] = 0
    r = split_rank(S_kept, alpha)
    assert 0 < r < q
    P = U.mT @ T @ V
    Pp = U.mT @ project(M, T, alpha) @ V
    expected = P.clone()
    idx = torch.arange(q)
    expected[idx, idx] = 0
    expected[:r, :r] = 0
    torch.testing.assert_close(Pp, expected, atol=2e-5 * float(P.abs().max()), rtol=0)
    # dropped (null-space) triplets keep their diagonal entries
    k = min(m, n)
    if q < k:
        assert float(P.diagonal()[q:].abs().min()) > 1e-3
        torch.testing.assert_close(Pp.diagonal()[q:], P.diagonal()[q:], atol=2e-5, rtol=1e-5)


def test_zero_M_gives_T_exactly():
    T = torch.randn(10, 24, generator=gen(3))
    assert torch.equal(project(torch.zeros(10, 24), T, 0.5), T)


def test_projection_rejects_bad_shapes():
    with pytest.raises(ValueError):
        project(torch.zeros(3, 4), torch.zeros(4, 3), 0.5)
    with pytest.raises(ValueError):
        project(torch.zeros(3), torch.zeros(3), 0.5)


# ---------------------------------------------------------------- OPCM: spec properties


def test_t1_byte_identical_and_state():
    g = gen(4)
    base = make_base(g)
    base["ln.weight"] = base["ln.weight"].to(torch.bfloat16)
    base["mlp.fc1.bias"] = base["mlp.fc1.bias"].half()
    new = make_model(base, g)
    ref = OPCMRef()
    out = ref.step(base, new, PROJ)
    assert ref.t == 1 and ref.lam == 1.0
    assert ref.norms == [pytest.approx(flat_norm(diff(new, base)), rel=1e-12)]
    for k in new:
        assert out[k].dtype == new[k].dtype
        assert out[k].untyped_storage().data_ptr() != new[k].untyped_storage().data_ptr()
        assert bytes(out[k].contiguous().view(torch.uint8).numpy()) == bytes(
            new[k].contiguous().view(torch.uint8).numpy()
        )


def test_P1_orthogonality_inside_the_merge():
    """<T', M>_F = 0 with M = theta(t-1) - theta0 of a real merge state."""
    g = gen(5)
    base = make_base(g)
    ref = OPCMRef(0.5)
    for t in range(1, 6):
        new = make_model(base, g)
        if t >= 2:
            for k in sorted(PROJ):
                M = ref.merged[k].float() - base[k].float()
                Tp = project(M, new[k].float() - base[k].float(), ref.alpha)
                assert rel_inner(Tp, M) < 1e-5, (t, k)
        ref.step(base, new, PROJ)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_P2_norm_equals_mean_task_norm(alpha):
    g = gen(6)
    base = make_base(g)
    ref = OPCMRef(alpha)
    for t in range(1, 9):
        new = make_model(base, g, scale=0.05 * t)  # different norms per task
        out = ref.step(base, new, PROJ)
        assert ref.t == t and len(ref.norms) == t
        mean_norm = sum(ref.norms) / t
        assert flat_norm(diff(out, base)) == pytest.approx(mean_norm, rel=1e-5)


def _disjoint_task_vector(s: int, gen_: torch.Generator) -> dict[str, torch.Tensor]:
    """Task s touches rows/columns/entries no other task touches; unit norm."""
    tv = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    tv["attn.q_proj.weight"][2 * s : 2 * s + 2, :] = torch.randn(2, 16, generator=gen_)
    tv["attn.q_proj.bias"][2 * s : 2 * s + 2] = torch.randn(2, generator=gen_)
    tv["mlp.fc1.weight"][3 * s : 3 * s + 3, :] = torch.randn(3, 10, generator=gen_)  # rows
    tv["mlp.fc1.bias"][3 * s : 3 * s + 3] = torch.randn(3, generator=gen_)
    tv["mlp.fc2.weight"][:, 3 * s : 3 * s + 3] = torch.randn(10, 3, generator=gen_)  # columns
    tv["ln.weight"][s] = 1.0
    norm = flat_norm(tv)
    return {k: v / norm for k, v in tv.items()}


def test_P3_orthogonal_equal_norm_tasks_give_sqrt_t():
    g = gen(7)
    base = make_base(g)
    taus = [_disjoint_task_vector(s, g) for s in range(8)]
    for i in range(8):  # mutually orthogonal
        for j in range(i):
            dot = sum(float((taus[i][k] * taus[j][k]).sum()) for k in SHAPES)
            assert dot == 0.0
    ref = OPCMRef(0.5)
    for t, tau in enumerate(taus, start=1):
        new = dict(base)
        for k in SHAPES:
            new[k] = base[k] + tau[k]
        ref.step(base, new, PROJ)
        assert ref.lam == pytest.approx(math.sqrt(t), rel=1e-5)


def test_P4_order_matters():
    g = gen(8)
    base = make_base(g)
    models = [make_model(base, g) for _ in range(3)]
    a, lams_a, norms_a = opcm_merge(base, models, PROJ)
    b, lams_b, norms_b = opcm_merge(base, models[::-1], PROJ)
    assert sorted(norms_a) == pytest.approx(sorted(norms_b))
    for k in PROJ:
        d = float((a[k] - b[k]).norm() / (a[k] - base[k]).norm())
        assert d > 1e-3, k


def test_zero_M_layer_keeps_T_in_the_step():
    """Model 1 leaves fc2 untouched, so at t = 2 fc2's M = 0 and T' = T."""
    g = gen(9)
    base = make_base(g)
    m1 = make_model(base, g)
    m1["mlp.fc2.weight"] = base["mlp.fc2.weight"].clone()
    m2 = make_model(base, g)
    ref = OPCMRef()
    ref.step(base, m1, PROJ)
    out = ref.step(base, m2, PROJ)
    T = m2["mlp.fc2.weight"] - base["mlp.fc2.weight"]
    torch.testing.assert_close(out["mlp.fc2.weight"] - base["mlp.fc2.weight"], T / ref.lam, rtol=1e-5, atol=1e-6)
    # contrast: q_proj (M != 0) did get projected, T' = lam(2) (theta(2) - theta0) - lam(1) M != T
    M_q = m1["attn.q_proj.weight"] - base["attn.q_proj.weight"]
    T_q = m2["attn.q_proj.weight"] - base["attn.q_proj.weight"]
    Tp_q = ref.lam * (out["attn.q_proj.weight"] - base["attn.q_proj.weight"]) - 1.0 * M_q
    assert float((Tp_q - T_q).norm()) > 1e-2 * float(T_q.norm())


def test_sigma_zero_raises():
    # averaged tensors only: theta0 = 0, theta1 = tau, theta2 = -tau: Sigma = tau - tau = 0
    tau = torch.tensor([1.0, -2.0, 3.0])
    base = {"w": torch.zeros(3), BUF: torch.arange(2)}
    ref = OPCMRef()
    ref.step(base, {"w": tau.clone(), BUF: torch.arange(2)}, set())
    with pytest.raises(ValueError, match="Sigma"):
        ref.step(base, {"w": -tau, BUF: torch.arange(2)}, set())
    assert ref.t == 1  # a failed step leaves the state unchanged
    # nothing changed anywhere (projected tensors present too)
    g = gen(10)
    base = make_base(g)
    ref = OPCMRef()
    ref.step(base, dict(base), PROJ)
    with pytest.raises(ValueError, match="Sigma"):
        ref.step(base, dict(base), PROJ)


def test_dtypes_kept_and_int_buffer_carried():
    g = gen(11)
    base = make_base(g)
    base["ln.weight"] = base["ln.weight"].to(torch.bfloat16)
    base["mlp.fc2.weight"] = base["mlp.fc2.weight"].half()
    models = [make_model(base, g) for _ in range(3)]
    models[0][BUF] = torch.arange(7, dtype=torch.int64) * 3  # theta1's buffer differs
    merged, lams, norms = opcm_merge(base, models, PROJ)
    assert len(lams) == 3 and lams[0] == 1.0 and len(norms) == 3
    for k in base:
        assert merged[k].dtype == base[k].dtype
    # carried: copied unchanged from the current merged checkpoint (theta(1) = theta1)
    assert torch.equal(merged[BUF], models[0][BUF])
    # P2 still holds up to the storage rounding of the fp16/bf16 tensors
    assert flat_norm(diff(merged, base)) == pytest.approx(sum(norms) / 3, rel=1e-2)


def test_merge_equals_stepwise_and_resume():
    g = gen(12)
    base = make_base(g)
    models = [make_model(base, g) for _ in range(4)]
    merged, lams, norms = opcm_merge(base, models, PROJ, alpha=0.3)
    ref = OPCMRef(0.3)
    for sd in models[:2]:
        ref.step(base, sd, PROJ)
    resumed = OPCMRef.from_state(ref.merged, ref.t, ref.lam, ref.norms, alpha=0.3)
    for sd in models[2:]:
        out = resumed.step(base, sd, PROJ)
    assert resumed.lam == lams[-1] and resumed.norms == norms
    for k in base:
        assert torch.equal(out[k], merged[k])


def test_opcm_validation():
    g = gen(13)
    base = make_base(g)
    new = make_model(base, g)
    with pytest.raises(ValueError):
        OPCMRef(1.5)
    with pytest.raises(ValueError):
        OPCMRef(float("nan"))
    with pytest.raises(ValueError):  # projected must be 2-D
        OPCMRef().step(base, new, {"ln.weight"})
    with pytest.raises(ValueError):  # unknown projected key
        OPCMRef().step(base, new, {"nope.weight"})
    bad = dict(new)
    bad["mlp.fc1.weight"] = torch.zeros(10, 24)
    with pytest.raises(ValueError, match="shape"):
        OPCMRef().step(base, bad, PROJ)
    bad = dict(new)
    del bad["ln.weight"]
    with pytest.raises(ValueError, match="missing"):
        OPCMRef().step(base, bad, PROJ)
    bad = dict(new)
    bad["ln.weight"] = bad["ln.weight"].clone()
    bad["ln.weight"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        OPCMRef().step(base, bad, PROJ)
    with pytest.raises(ValueError):
        opcm_merge(base, [], PROJ)


# ---------------------------------------------------------------- TIES


def test_ties_combine_hand_example_threshold_ties_and_zero_sum():
    # d = 10, keep = 0.25: k = 10 - floor(2.5) = 8; keep |x| >= 8th smallest |x|.
    row0 = [3.0, -2.0, 2.0, -2.0, 0.5, 1.0, 0.0, 0.0, -1.0, 0.25]
    # |row0| sorted: 0 0 .25 .5 1 1 2 2 2 3 -> threshold 2; all three 2's tie at
    # the threshold and are kept (4 entries kept, not 3).
    row1 = [-4.0, 2.0, 1.0, -3.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0]
    # |row1| sorted: 0 0 0 0 0 .5 1 2 3 4 -> threshold 2: keeps -4, 2, -3.
    # trimmed0 = [3,-2,2,-2,0...], trimmed1 = [-4,2,0,-3,0...]
    # column sums [-1, 0, 2, -5, 0...]: signs [-1, 0, +1, -1, 0...]; sum of
    # signs = -1, so zero-sum entries (col 1: -2 + 2) get -1.
    out = ties_combine(torch.tensor([row0, row1]), 0.25)
    expected = torch.tensor([-4.0, -2.0, 2.0, -5.0, 0, 0, 0, 0, 0, 0])
    assert torch.equal(out, expected)


def test_ties_combine_positive_majority_fix():
    # d = 4, keep = 0.5: k = 2. row0 |.| sorted 0 1 2 3 -> thr 1; row1 0 1 2 3 -> thr 1.
    rows = torch.tensor([[3.0, 0.0, 1.0, 2.0], [2.0, -3.0, -1.0, 0.0]])
    # sums [5, -3, 0, 2]: signs [1, -1, 0, 1], majority +1 -> col 2 keeps the +1
    assert torch.equal(ties_combine(rows, 0.5), torch.tensor([5.0, -3.0, 1.0, 2.0]))


def test_ties_combine_zero_majority_keeps_negatives():
    # thresholds are 0 (2nd smallest |x| is 0), so everything is kept.
    rows = torch.tensor([[3.0, 0.0, 1.0, 0.0], [0.0, -3.0, -1.0, 0.0]])
    # sums [3, -3, 0, 0]: signs [1, -1, 0, 0]; their sum is 0, so the zero
    # signs stay 0 and the published rule where(sign > 0, x > 0, x < 0) keeps
    # the NEGATIVE entry of column 2.
    assert torch.equal(ties_combine(rows, 0.5), torch.tensor([3.0, -3.0, -1.0, 0.0]))


def test_ties_steps_hand_example():
    row0 = torch.tensor([3.0, -2.0, 2.0, -2.0, 0.5, 1.0, 0.0, 0.0, -1.0, 0.25])
    row1 = torch.tensor([-4.0, 2.0, 1.0, -3.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0])

    def sd(vec: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        # sorted key order: "a" (2x3, the first 6 entries), then "b" (4,)
        return {"b": vec[6:].clone(), "a": vec[:6].reshape(2, 3).clone(), "c": c}

    ids = torch.arange(3)
    base = sd(torch.ones(10), ids)
    m1 = sd(1.0 + 2.0 * row0, ids * 5)  # theta(1) = theta0 + 0.5 * tau1 = 1 + row0
    m2 = sd(1.0 + row1, ids * 7)
    ties = TiesRef(lam=0.5, keep=0.25)
    out1 = ties.step(base, m1)
    assert torch.equal(torch.cat([out1["a"].reshape(-1), out1["b"]]), 1.0 + row0)
    assert torch.equal(out1["c"], ids)  # carried from theta(0) = theta0
    out2 = ties.step(base, m2)
    merged = torch.tensor([-4.0, -2.0, 2.0, -5.0, 0, 0, 0, 0, 0, 0])
    expected = 1.0 + row0 + 0.5 * merged
    assert torch.equal(torch.cat([out2["a"].reshape(-1), out2["b"]]), expected)
    assert torch.equal(out2["c"], ids)
    again = ties_merge(base, [m1, m2], lam=0.5, keep=0.25)
    assert all(torch.equal(again[k], out2[k]) for k in out2)


@pytest.mark.parametrize("keep", [0.0, 1.0, -0.1, 20])
def test_ties_keep_validated(keep):
    with pytest.raises(ValueError, match="keep"):
        TiesRef(keep=keep)


# ---------------------------------------------------------------- TA and averaging


def test_task_arithmetic_hand_example():
    base = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([4.0], dtype=torch.bfloat16), "i": torch.tensor([5])}
    m1 = {"w": torch.tensor([2.0, 2.0]), "h": torch.tensor([6.0], dtype=torch.bfloat16), "i": torch.tensor([9])}
    m2 = {"w": torch.tensor([1.0, 0.0]), "h": torch.tensor([2.0], dtype=torch.bfloat16), "i": torch.tensor([9])}
    ta = TaskArithmeticRef(lam=0.5)
    out1 = ta.step(base, m1)
    assert torch.equal(out1["w"], torch.tensor([1.5, 2.0]))
    assert torch.equal(out1["h"], torch.tensor([5.0], dtype=torch.bfloat16))
    assert torch.equal(out1["i"], torch.tensor([5]))  # carried from theta(0) = theta0
    out2 = ta.step(base, m2)
    assert torch.equal(out2["w"], torch.tensor([1.5, 1.0]))
    assert torch.equal(out2["h"], torch.tensor([4.0], dtype=torch.bfloat16))
    assert ta.t == 2
    merged = task_arithmetic_merge(base, [m1, m2], lam=0.5)
    assert all(torch.equal(merged[k], out2[k]) for k in out2)
    # default lambda 0.3
    assert torch.equal(task_arithmetic_merge(base, [m1])["w"], torch.tensor([1.0, 2.0]) + 0.3 * torch.tensor([1.0, 0.0]))


def test_average_hand_example():
    base = {"w": torch.zeros(2), "i": torch.tensor([1])}
    ms = [
        {"w": torch.tensor([1.0, 4.0]), "i": torch.tensor([2])},
        {"w": torch.tensor([3.0, 0.0]), "i": torch.tensor([3])},
        {"w": torch.tensor([5.0, -1.0]), "i": torch.tensor([4])},
    ]
    avg = AverageRef()
    assert torch.equal(avg.step(base, ms[0])["w"], torch.tensor([1.0, 4.0]))  # theta(1) = theta1
    assert torch.equal(avg.step(base, ms[1])["w"], torch.tensor([2.0, 2.0]))
    out = avg.step(base, ms[2])
    assert torch.equal(out["w"], torch.tensor([3.0, 1.0]))  # (2 * [2, 2] + [5, -1]) / 3
    assert torch.equal(out["i"], torch.tensor([2]))  # carried from theta(1)
    merged = average_merge(base, ms)
    assert torch.equal(merged["w"], out["w"])


# ---------------------------------------------------------------- metrics and helpers


def test_acc_bwt_hand_matrix():
    nan = float("nan")
    A = [[0.9, nan, nan], [0.8, 0.7, nan], [0.6, 0.5, 0.4]]
    assert acc(A) == pytest.approx(0.5)  # (0.6 + 0.5 + 0.4) / 3
    assert bwt(A) == pytest.approx(-0.25)  # ((0.6 - 0.9) + (0.5 - 0.7)) / 2
    assert acc([[0.7]]) == pytest.approx(0.7)
    assert math.isnan(bwt([[0.7]]))  # mean over an empty set
    with pytest.raises(ValueError):
        acc([[1.0, 2.0]])


def test_flat_norm():
    sd = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]], dtype=torch.float16), "i": torch.tensor([100])}
    assert flat_norm(sd) == 5.0


def test_classify_explicit():
    g = gen(14)
    base = make_base(g)
    kinds = classify(base, PROJ)
    assert {k for k, v in kinds.items() if v == PROJECTED} == PROJ
    assert kinds[BUF] == CARRIED
    assert kinds["ln.weight"] == AVERAGED and kinds["mlp.fc1.bias"] == AVERAGED
    with pytest.raises(ValueError):
        classify(base, {"ln.weight"})


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 2, bias=False)
        self.norm = torch.nn.LayerNorm(3)
        self.emb = torch.nn.Embedding(5, 3)  # 2-D but not projected
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.cls = torch.nn.Parameter(torch.zeros(3, 3))  # bare 2-D parameter
        self.register_buffer("ids", torch.arange(5))


def test_classify_by_module_tiny():
    with torch.device("meta"):
        model = _Tiny()
    keys = list(model.state_dict())
    kinds = classify_by_module(model, keys)
    assert kinds == {
        "fc.weight": PROJECTED,
        "fc.bias": AVERAGED,
        "head.weight": PROJECTED,
        "norm.weight": AVERAGED,
        "norm.bias": AVERAGED,
        "emb.weight": AVERAGED,
        "conv.weight": AVERAGED,
        "conv.bias": AVERAGED,
        "cls": AVERAGED,
        "ids": CARRIED,
    }
    # a checkpoint with an extra prefix maps by dotted suffix
    pref = classify_by_module(model, ["model." + k for k in keys])
    assert pref == {"model." + k: v for k, v in kinds.items()}
    with pytest.raises(ValueError, match="matches no"):
        classify_by_module(model, ["other.weight"])


def test_classify_by_module_clip():
    transformers = pytest.importorskip("transformers")
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)
    with torch.device("meta"):
        full = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
        vis = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
    kinds = classify_by_module(full, full.state_dict())
    assert kinds["visual_projection.weight"] == PROJECTED
    assert kinds["text_projection.weight"] == PROJECTED
    assert kinds["text_model.embeddings.token_embedding.weight"] == AVERAGED
    # a CLIPVisionModel checkpoint saved with the `vision_model.` prefix and
    # the (older, persistent) integer position_ids buffer, stored in fp16
    ckpt = {"vision_model." + k: v.half() for k, v in vis.state_dict().items()}
    ckpt["vision_model.embeddings.position_ids"] = torch.zeros(1, 5, dtype=torch.int64, device="meta")
    kinds = classify_by_module(vis, ckpt)
    proj = {k for k, v in kinds.items() if v == PROJECTED}
    assert proj == {
        f"vision_model.encoder.layers.0.{m}.weight"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    }
    assert kinds["vision_model.embeddings.position_ids"] == CARRIED
    for k in ("embeddings.position_embedding.weight", "embeddings.patch_embedding.weight", "embeddings.class_embedding",
              "pre_layrnorm.weight", "encoder.layers.0.mlp.fc1.bias"):
        assert kinds["vision_model." + k] == AVERAGED


# ---------------------------------------------------------------- compat modes (FusionBench's code)
#
# Hand-computed with a zero base, so task vectors are the models themselves and every value is
# exact: "w" projected 3x3, "b" averaged, "cls" a parameter owned by a non-leaf module.
W1 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # S = (3, 2, 1): ratios 0.5, 0.83, 1 -> r = 1 at α = 0.5
T2 = torch.arange(1.0, 10.0).reshape(3, 3)
COMPAT_BASE = {"w": torch.zeros(3, 3), "b": torch.zeros(2), "cls": torch.zeros(2)}
COMPAT_M1 = {"w": W1, "b": torch.tensor([1.0, 0.0]), "cls": torch.tensor([0.0, 2.0])}
COMPAT_M2 = {"w": T2, "b": torch.tensor([0.0, 1.0]), "cls": torch.tensor([4.0, 0.0])}
# U = V = I (up to signs, which cancel): P = T2. Paper/fusionbench zero the diagonal and P[:1, :1];
# release only P[:1, :1].
TP_PAPER = torch.tensor([[0.0, 2, 3], [4, 0, 6], [7, 8, 0]])
TP_RELEASE = torch.tensor([[0.0, 2, 3], [4, 5, 6], [7, 8, 9]])


def test_project_release_keeps_the_diagonal():
    torch.testing.assert_close(project(W1, T2, 0.5), TP_PAPER, atol=1e-6, rtol=0)
    torch.testing.assert_close(project(W1, T2, 0.5, zero_diagonal=False), TP_RELEASE, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "compat, sigma",
    [
        # Σ = λ(1)·M + T' (λ(1) = 1); paper merges cls too: M + τ = [0, 2] + [4, 0].
        ("paper", {"w": W1 + TP_PAPER, "b": torch.tensor([1.0, 1.0]), "cls": torch.tensor([4.0, 2.0])}),
        # fusionbench: cls is never merged; its merged task vector M = [0, 2] stays in Σ.
        ("fusionbench", {"w": W1 + TP_PAPER, "b": torch.tensor([1.0, 1.0]), "cls": torch.tensor([0.0, 2.0])}),
        ("release", {"w": W1 + TP_RELEASE, "b": torch.tensor([1.0, 1.0]), "cls": torch.tensor([0.0, 2.0])}),
    ],
)
def test_compat_step_hand_computed(compat, sigma):
    ref = OPCMRef(0.5, compat=compat)
    ref.step(COMPAT_BASE, COMPAT_M1, {"w"}, unmerged={"cls"})
    out = ref.step(COMPAT_BASE, COMPAT_M2, {"w"}, unmerged={"cls"})
    n1, n2 = math.sqrt(19.0), math.sqrt(285.0 + 1 + 16)  # ‖τ1‖, ‖τ2‖
    sigma_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in sigma.values()))
    assert sigma_norm == pytest.approx({"paper": math.sqrt(214), "fusionbench": math.sqrt(198),
                                        "release": math.sqrt(342)}[compat], rel=1e-12)
    lam = sigma_norm / ((n1 + n2) / 2)
    assert ref.lam == pytest.approx(lam, rel=1e-6)
    for k, v in sigma.items():
        torch.testing.assert_close(out[k], v / lam, atol=1e-6, rtol=1e-6)
    # P2 holds in every mode: the unmerged tensor's part is inside Σ.
    assert flat_norm(out) == pytest.approx((n1 + n2) / 2, rel=1e-6)


def test_fusionbench_unmerged_tensor_decays_by_one_over_lambda_each_step():
    m3 = {"w": torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 5]]), "b": torch.tensor([2.0, 2.0]),
          "cls": torch.tensor([9.0, 9.0])}
    ref = OPCMRef(0.5, compat="fusionbench")
    lams = []
    for m in (COMPAT_M1, COMPAT_M2, m3):
        out = ref.step(COMPAT_BASE, m, {"w"}, unmerged={"cls"})
        lams.append(ref.lam)
    torch.testing.assert_close(out["cls"], COMPAT_M1["cls"] / (lams[1] * lams[2]), atol=1e-6, rtol=1e-6)
    # the functional form agrees with the stepwise one
    merged, lams2, _ = opcm_merge(COMPAT_BASE, [COMPAT_M1, COMPAT_M2, m3], {"w"}, compat="fusionbench",
                                  unmerged={"cls"})
    assert lams2 == pytest.approx(lams)
    torch.testing.assert_close(merged["cls"], out["cls"])


def test_paper_mode_ignores_unmerged_keys_and_modes_are_checked():
    a, _, _ = opcm_merge(COMPAT_BASE, [COMPAT_M1, COMPAT_M2], {"w"}, compat="paper", unmerged={"cls"})
    b, _, _ = opcm_merge(COMPAT_BASE, [COMPAT_M1, COMPAT_M2], {"w"})
    for k in a:
        assert torch.equal(a[k], b[k])
    assert opcm_ref.COMPAT_MODES == ("paper", "fusionbench", "release")
    with pytest.raises(ValueError, match="compat"):
        OPCMRef(compat="fusion")
    with pytest.raises(ValueError, match="both projected and unmerged"):
        OPCMRef(compat="fusionbench").step(COMPAT_BASE, COMPAT_M1, {"w"}, unmerged={"w"})
    with pytest.raises(ValueError, match="unmerged key 'nope'"):
        OPCMRef(compat="release").step(COMPAT_BASE, COMPAT_M1, {"w"}, unmerged={"nope"})
    resumed = OPCMRef.from_state(COMPAT_M1, 1, 1.0, [math.sqrt(19.0)], compat="fusionbench")
    out = resumed.step(COMPAT_BASE, COMPAT_M2, {"w"}, unmerged={"cls"})
    torch.testing.assert_close(out["cls"], torch.tensor([0.0, 2.0]) / resumed.lam)


def test_nonleaf_parameter_keys():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token = torch.nn.Parameter(torch.zeros(4))  # on a module with children: never merged there
            self.register_buffer("scale", torch.ones(4))  # buffers are not parameters
            self.proj = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = torch.nn.Linear(4, 2)
            self.bias = torch.nn.Parameter(torch.zeros(2))

    net = Net()
    assert opcm_ref.nonleaf_parameter_keys(net) == {"block.token", "bias"}
    keys = ["model." + k for k in net.state_dict()]
    assert opcm_ref.nonleaf_parameter_keys(net, keys) == {"model.block.token", "model.bias"}
    import transformers

    with torch.device("meta"):
        vis = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8,
            patch_size=4))
    ckpt = {"vision_model." + k: v for k, v in vis.state_dict().items()}
    assert opcm_ref.nonleaf_parameter_keys(vis, ckpt) == {"vision_model.embeddings.class_embedding"}
