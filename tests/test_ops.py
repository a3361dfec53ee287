"""opcm_ext.ops: every native op against its torch twin, the projection against the spec.

- Element-wise ops (deltas, sigma_update, finalize, sumsq) run the compiled kernels and
  the ``backend="torch"`` twins on the same inputs; fp32 results must agree to the ulp
  budget of ``ULP_TOL`` (0 on the CPU: same IEEE operations), float64 sums to ``SUM_RTOL``.
- ``project`` is compared with a plain full-SVD implementation of the OPCM step as the
  algorithm states it (U m x m, V n x n, float64), written below, on random full-rank inputs.
- The SVD is checked through invariants (orthonormal columns of the kept triplets,
  reconstruction, singular values vs torch in float64), never through the signs of
  vectors, including spectra with singular values closer than eps32.
Devices come from the ``device`` fixture (CPU, plus CUDA when torch sees a GPU).
"""

from __future__ import annotations

import math
import os
import struct
import time

import pytest
import torch

from opcm_ext import _native, ops
from opcm_ext.errors import BackendError, ConfigError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DNAME = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# Element-wise results, native vs torch twin, in units in the last place of the output dtype.
# The kernels do the same IEEE fp32 operations as torch (no FMA, true division, round to
# nearest even), so the budget is zero on the CPU; CUDA gets one ulp per output dtype.
ULP_TOL = {
    "cpu": {torch.float32: 0, torch.float16: 0, torch.bfloat16: 0},
    "cuda": {torch.float32: 1, torch.float16: 1, torch.bfloat16: 1},
}
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
SUM_RTOL = 1e-12  # float64 sums of squares: only the summation order differs
SVD_TOL = 2e-5  # fp32 SVD invariants, relative to sigma_1 / ||A||
PROJ_RTOL = 1e-5  # T' vs the full-SVD spec implementation, relative to ||T'||

SIZES = [0, 1, 7, 1000, 3 * 32768 + 5]  # empty, single, odd, one block, several blocks + tail


def _ids(v):
    if isinstance(v, torch.dtype):
        return DNAME[v]
    return None


def _rand(n, dtype, device, scale=1.0, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return (torch.randn(n, generator=g) * scale).to(dtype).to(device)


def assert_close_ulp(actual, expected, dtype, device):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = ULP_TOL[torch.device(device).type][dtype]
    if tol == 0:
        assert torch.equal(actual.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           expected.view(torch.int16 if dtype != torch.float32 else torch.int32))
        return
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(e)
    assert torch.equal(torch.isnan(a), torch.isnan(e))
    assert torch.equal(a[~finite & ~torch.isnan(e)], e[~finite & ~torch.isnan(e)])
    err = (a[finite] - e[finite]).abs()
    assert bool((err <= tol * ULP[dtype] * e[finite].abs().clamp_min(torch.finfo(dtype).tiny)).all())


def assert_sum_close(actual, expected):
    assert actual.dtype == torch.float64 and actual.dim() == 0
    a, e = float(actual), float(expected)
    if math.isnan(e) or math.isinf(e):
        assert (math.isnan(a) and math.isnan(e)) or a == e
    else:
        assert a == pytest.approx(e, rel=SUM_RTOL, abs=1e-300)


# ----------------------------------------------------------------------------- deltas
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_deltas_matches_torch(device, dtype, n):
    base, merged, new = (_rand(n, dtype, device, gen_seed=s) for s in (1, 2, 3))
    M, T, sm, st = ops.deltas(base, merged, new)
    M2, T2, sm2, st2 = ops.deltas(base, merged, new, backend="torch")
    assert M.dtype == T.dtype == torch.float32 and M.device == T.device == base.device
    assert_close_ulp(M, M2, torch.float32, device)
    assert_close_ulp(T, T2, torch.float32, device)
    assert torch.equal(T.cpu(), new.cpu().float() - base.cpu().float())  # the spec's exact op order
    assert_sum_close(sm, sm2)
    assert_sum_close(st, st2)
    assert sm.device == base.device


@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16, torch.float32, torch.float16), (torch.float16, torch.bfloat16, torch.float32)],
    ids=lambda d: "-".join(DNAME[x] for x in d),
)
def test_deltas_mixed_dtypes(device, dtypes):
    base, merged, new = (_rand(777, dt, device, gen_seed=i) for i, dt in enumerate(dtypes))
    M, T, sm, st = ops.deltas(base, merged, new)
    assert torch.equal(M.cpu(), merged.cpu().float() - base.cpu().float())
    assert torch.equal(T.cpu(), new.cpu().float() - base.cpu().float())
    assert_sum_close(st, (new.cpu().double().float() - base.cpu().float()).double().square().sum())


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_deltas_without_merged(device, backend):
    base, new = _rand(100, torch.float16, device, gen_seed=1), _rand(100, torch.float16, device, gen_seed=2)
    M, T, sm, st = ops.deltas(base, None, new, backend=backend)
    assert M is None and sm is None
    assert torch.equal(T, new.float() - base.float())
    assert_sum_close(st, (new.float() - base.float()).double().square().sum())


def test_sums_are_fresh_on_every_call(device):
    b, m, t = (_rand(5000, torch.bfloat16, device, gen_seed=i) for i in range(3))
    first, second = ops.deltas(b, m, t), ops.deltas(b, m, t)
    assert float(first[3]) == float(second[3]) == pytest.approx(
        float((t.float() - b.float()).double().square().sum()), rel=SUM_RTOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_input_shows_in_sums(device, dtype, bad):
    base = _rand(70000, dtype, device, gen_seed=1)
    merged = _rand(70000, dtype, device, gen_seed=2)
    new = _rand(70000, dtype, device, gen_seed=3)
    new[40000] = float(bad)
    M, T, sm, st = ops.deltas(base, merged, new)
    assert math.isfinite(float(sm))
    assert (math.isnan if bad == "nan" else math.isinf)(float(st))
    assert (math.isnan if bad == "nan" else math.isinf)(float(ops.sumsq(new)))
    if bad == "inf":
        assert float(st) > 0


def test_deltas_outputs_for_noncontiguous_inputs(device):
    base = _rand(60, torch.float32, device, gen_seed=1).reshape(6, 10).t()
    new = _rand(60, torch.float32, device, gen_seed=2).reshape(6, 10).t()
    _, T, _, _ = ops.deltas(base, None, new)
    assert T.shape == (10, 6) and torch.equal(T, new - base)


def test_sums_do_not_depend_on_thread_count():
    x = _rand(10 * 32768 + 11, torch.float32, "cpu", gen_seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = float(ops.sumsq(x))
        torch.set_num_threads(max(2, threads))
        many = float(ops.sumsq(x))
    finally:
        torch.set_num_threads(threads)
    assert one == many  # bitwise: fixed blocks, fixed combination order


# ----------------------------------------------------------------------------- sigma_update
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_sigma_update_matches_torch(device, n):
    M, Tp = _rand(n, torch.float32, device, gen_seed=1), _rand(n, torch.float32, device, gen_seed=2)
    lam = 1.7320508075688772
    S, ss = ops.sigma_update(M, Tp, lam)
    S2, ss2 = ops.sigma_update(M, Tp, lam, backend="torch")
    assert_close_ulp(S, S2, torch.float32, device)
    assert torch.equal(S.cpu(), M.cpu() * lam + Tp.cpu())
    assert_sum_close(ss, ss2)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_sigma_update_in_place(device, backend):
    M, Tp = _rand(4099, torch.float32, device, gen_seed=1), _rand(4099, torch.float32, device, gen_seed=2)
    want = M * 0.75 + Tp
    S, ss = ops.sigma_update(M, Tp, 0.75, out=M, backend=backend)
    assert S.data_ptr() == M.data_ptr()
    assert torch.equal(M, want)
    assert float(ss) == pytest.approx(float(want.double().square().sum()), rel=SUM_RTOL)


def test_finalize_into_out(device):
    base, sigma = _rand(777, torch.bfloat16, device, gen_seed=1), _rand(777, torch.float32, device, gen_seed=2)
    out = torch.empty(777, dtype=torch.float16, device=device)
    assert ops.finalize(base, sigma, 1.5, torch.float16, out).data_ptr() == out.data_ptr()
    assert torch.equal(out, ops.finalize(base, sigma, 1.5, torch.float16, backend="torch"))
    with pytest.raises(ValueError, match="out"):
        ops.finalize(base, sigma, 1.5, torch.float32, out)


# ----------------------------------------------------------------------------- finalize
@pytest.mark.parametrize("n", [0, 1, 7, 70001], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("base_dtype", DTYPES, ids=_ids)
def test_finalize_matches_torch(device, base_dtype, out_dtype, n):
    base = _rand(n, base_dtype, device, gen_seed=1)
    sigma = _rand(n, torch.float32, device, scale=0.3, gen_seed=2)
    lam = 1.4142135623730951
    out = ops.finalize(base, sigma, lam, out_dtype)
    out2 = ops.finalize(base, sigma, lam, out_dtype, backend="torch")
    assert out.dtype == out_dtype
    assert_close_ulp(out, out2, out_dtype, device)


def _special_floats() -> torch.Tensor:
    vals = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 65504.0, 65519.99, 65520.0, 1e6, -1e6,
            6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-10, 3.4e38, -3.4e38, 1e-38, 1.17549435e-38, 1e-45]
    # ties: exactly halfway between two halves / two bfloat16 values, both parities
    for v in (1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 2049.0, 2051.0):
        vals += [v, -v]
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**31), 2**31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    return torch.cat([torch.tensor(vals, dtype=torch.float32), bits.view(torch.float32)])


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=_ids)
def test_finalize_rounding_is_bit_exact(out_dtype):
    x = _special_floats()
    zero = torch.zeros_like(x)
    native = ops.finalize(x, zero, 1.0, out_dtype)
    want = (x + zero).to(out_dtype)  # torch's own round-to-nearest-even
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(native), nan)
    assert torch.equal(native[~nan].view(torch.int16), want[~nan].view(torch.int16))
    # and the same through a real division
    y = ops.finalize(x, x, 3.0, out_dtype)
    want = (x + x / 3.0).to(out_dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
def test_every_16bit_pattern_converts_exactly(dtype):
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    out = ops.finalize(x, torch.zeros(x.shape), 1.0, torch.float32)
    want = x.float() + 0.0
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))
    assert float(ops.sumsq(x[~nan & torch.isfinite(want)])) == pytest.approx(
        float(want[~nan & torch.isfinite(want)].double().square().sum()), rel=SUM_RTOL)


def test_finalize_rejects_zero_lambda():
    with pytest.raises(ValueError, match="lam"):
        ops.finalize(torch.zeros(3), torch.zeros(3), 0.0, torch.float32)
    with pytest.raises(ValueError, match="lam"):
        ops.finalize(torch.zeros(3), torch.zeros(3), 1e300, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_sumsq_matches_torch(device, dtype, n):
    x = _rand(n, dtype, device, gen_seed=3)
    assert_sum_close(ops.sumsq(x), ops.sumsq(x, backend="torch"))


# ----------------------------------------------------------------------------- raw kernels
def test_kernel_argument_errors_name_the_argument():
    C = _native.cpu()
    x = torch.zeros(4)
    sums = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="base_dtype"):
        C.deltas(x.data_ptr(), 7, 0, 0, x.data_ptr(), 0, 0, x.data_ptr(), 4, sums.data_ptr())
    with pytest.raises(ValueError, match="'n'"):
        C.sumsq(x.data_ptr(), 0, -1, sums.data_ptr())
    with pytest.raises(ValueError, match="x_ptr"):
        C.sumsq(0, 0, 4, sums.data_ptr())
    with pytest.raises(ValueError, match="sums_ptr"):
        C.sigma_update(x.data_ptr(), x.data_ptr(), 1.0, x.data_ptr(), 4, 0)
    P = torch.zeros(1, 3, 3)
    r, keep = torch.tensor([4]), torch.tensor([3])
    with pytest.raises(ValueError, match="r_ptr"):
        C.mask_projection(P.data_ptr(), r.data_ptr(), keep.data_ptr(), 1, 3, P.data_ptr())


def test_ops_argument_errors():
    with pytest.raises(ValueError, match="shape"):
        ops.deltas(torch.zeros(3), None, torch.zeros(4))
    with pytest.raises(ValueError, match="dtype"):
        ops.deltas(torch.zeros(3, dtype=torch.float64), None, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="alpha"):
        ops.split_rank(torch.ones(1, 3), 0.0)
    with pytest.raises(ConfigError, match="backend"):
        ops.sumsq(torch.zeros(3), backend="numpy")


def test_torch_backend_never_touches_the_kernels(monkeypatch):
    monkeypatch.setattr(ops, "_native", None)  # any native call would fail
    assert float(ops.sumsq(torch.ones(5), backend="torch")) == 5.0
    M, T, _, st = ops.deltas(torch.zeros(4), torch.ones(4), torch.ones(4), backend="torch")
    assert torch.equal(T, torch.ones(4)) and float(st) == 4.0


def test_missing_kernel_raises_backend_error_with_fix(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_C_error", "ImportError: test")
    with pytest.raises(BackendError, match="pip install"):
        ops.sumsq(torch.ones(3), backend="native")
    monkeypatch.setattr(_native, "_cuda_tried", False)  # load again, as if _cuda had not been built
    for name in ("_cuda", "_cuda_error", "_cuda_family"):
        monkeypatch.setattr(_native, name, None)  # restored afterwards
    monkeypatch.setattr(_native.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendError, match="not built.*fix: .*OPCM_WITH_CUDA=ON"):
        _native.cuda()
    info = _native.available()
    assert info["cpu"] is False and info["cuda"] is False and info["cpu_error"] == "ImportError: test"


# ----------------------------------------------------------------------------- masking
def _mask_plain(P, r, keep):
    Q = torch.zeros_like(P)
    for b in range(P.shape[0]):
        rb, kb = int(r[b]), int(keep[b])
        Q[b, :rb, :rb] = P[b, :rb, :rb]
        for i in range(rb, kb):
            Q[b, i, i] = P[b, i, i]
    return Q


@pytest.mark.parametrize("k", [1, 5, 16], ids=lambda k: f"k{k}")
def test_mask_projection(device, k):
    B = 6
    P = torch.randn(B, k, k, device=device)
    r = torch.tensor([0, k, min(2, k), 1, 0, k // 2][:B], device=device)
    keep = torch.tensor([k, k, k - 1, 1, 0, k // 2][:B], device=device)
    mod, tail = ops._kernels(P.device)
    Q = torch.empty_like(P)
    mod.mask_projection(P.data_ptr(), r.data_ptr(), keep.data_ptr(), B, k, Q.data_ptr(), *tail)
    assert torch.equal(Q.cpu(), _mask_plain(P.cpu(), r.cpu(), keep.cpu()))
    assert torch.equal(ops._mask_torch(P, r, keep).cpu(), Q.cpu())
    mod.mask_projection(P.data_ptr(), r.data_ptr(), keep.data_ptr(), B, k, P.data_ptr(), *tail)  # in place
    assert torch.equal(P.cpu(), Q.cpu())


# ----------------------------------------------------------------------------- SVD
SVD_SHAPES = [(3, 20, 20), (2, 50, 20), (2, 20, 50), (1, 1, 5), (4, 33, 17), (1, 7, 1)]


def _shape_id(s):
    return "x".join(map(str, s))


def check_svd_invariants(A, U, S, V):
    B, m, n = A.shape
    k = min(m, n)
    assert U.shape == (B, m, k) and S.shape == (B, k) and V.shape == (B, n, k)
    A64, U64, S64, V64 = A.double().cpu(), U.double().cpu(), S.double().cpu(), V.double().cpu()
    ref = torch.linalg.svdvals(A64)
    scale = ref[:, :1].clamp_min(1e-30)
    assert bool((S64[:, :-1] >= S64[:, 1:]).all()) and bool((S64 >= 0).all())
    assert float(((S64 - ref).abs() / scale).max()) < SVD_TOL
    eye = torch.eye(k, dtype=torch.float64)
    keep = S64 > scale * max(m, n) * torch.finfo(torch.float32).eps
    for b in range(B):
        kb = int(keep[b].sum())
        Ub, Vb = U64[b, :, :kb], V64[b, :, :kb]
        assert float((Ub.mT @ Ub - eye[:kb, :kb]).abs().max()) < SVD_TOL
        assert float((Vb.mT @ Vb - eye[:kb, :kb]).abs().max()) < SVD_TOL
    recon = U64 @ torch.diag_embed(S64) @ V64.mT
    assert float(torch.linalg.matrix_norm(recon - A64).max() / torch.linalg.matrix_norm(A64).max()) < SVD_TOL


@pytest.mark.parametrize("shape", SVD_SHAPES, ids=_shape_id)
def test_thin_svd_invariants(device, shape):
    A = torch.randn(*shape, device=device)
    U, S, V = ops.thin_svd(A)
    assert U.device == A.device and U.dtype == torch.float32
    check_svd_invariants(A, U, S, V)
    U2, S2, V2 = ops.thin_svd(A, backend="torch")
    check_svd_invariants(A, U2, S2, V2)


@pytest.mark.parametrize("workers", ["1", "2", "3"])
def test_thin_svd_thread_pool(monkeypatch, workers):
    monkeypatch.setenv("OPCM_SVD_WORKERS", workers)
    threads = torch.get_num_threads()
    A = torch.randn(5, 40, 24) * 0.01
    U, S, V = ops.thin_svd(A)
    check_svd_invariants(A, U, S, V)
    assert torch.get_num_threads() == threads  # the pool restores the caller's setting


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_thin_svd_pool_survives_fork():
    A = torch.randn(4, 20, 12)
    ops.thin_svd(A)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # child: must not wait forever on the parent's (absent) pool threads
        try:
            U, S, V = ops.thin_svd(A)
            os._exit(0 if bool(torch.isfinite(S).all()) else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("thin_svd hung in a forked child")


def test_thin_svd_2d_and_empty(device):
    A = torch.randn(9, 4, device=device)
    U, S, V = ops.thin_svd(A)
    assert U.shape == (9, 4) and S.shape == (4,) and V.shape == (4, 4)
    check_svd_invariants(A[None], U[None], S[None], V[None])
    U, S, V = ops.thin_svd(torch.zeros(0, 5, 3, device=device))
    assert U.shape == (0, 5, 3) and S.shape == (0, 3) and V.shape == (0, 3, 3)


def test_thin_svd_nonfinite_is_backend_error(device):
    A = torch.randn(2, 6, 5, device=device)
    A[1, 2, 3] = float("nan")
    with pytest.raises(BackendError):
        ops.thin_svd(A)


# ----------------------------------------------------------------------------- projection
def split_rank_plain(s: list[float], alpha: float) -> int:
    total = sum(s)
    acc = 0.0
    for i, v in enumerate(s):
        acc += v
        if total > 0 and acc / total > alpha:
            return i
    return 0


def test_split_rank(device):
    S = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], device=device)
    assert ops.split_rank(S, 0.5).tolist() == [1, 0, 0, 1]
    assert ops.split_rank(S[0], 0.5).item() == 1
    g = torch.Generator().manual_seed(3)
    S = (torch.rand(50, 12, generator=g).sort(dim=-1, descending=True).values ** 3).to(device)
    for alpha in (0.1, 0.5, 0.9, 1.0):
        r = ops.split_rank(S, alpha)
        assert r.dtype == torch.int64 and r.device == S.device
        assert r.tolist() == [split_rank_plain(row.tolist(), alpha) for row in S.double().cpu()]


@pytest.mark.parametrize("S, alpha, want", [
    ([1.0, 1.0], 0.5, 1),  # share 0.5 is not > 0.5: the boundary index is not the split
    ([1.0, 1.0, 1.0, 1.0], 0.5, 2),
    ([1.0, 1.0, 1.0, 1.0], 0.75, 3),
    ([1.0, 1.0], 1.0, 0),  # alpha = 1: the last share is exactly 1, never above
    ([0.9, 0.05, 0.03, 0.02], 1.0, 0),  # float32 cumsum / sum ends at 1.0000001 here
    ([5.0, 0.0, 0.0], 1.0, 0),
], ids=["1-1-a0.5", "4x1-a0.5", "4x1-a0.75", "1-1-a1", "uneven-a1", "rank1-a1"])
def test_split_rank_boundaries(device, S, alpha, want):
    S32 = torch.tensor(S, dtype=torch.float32, device=device)
    assert ops.split_rank(S32, alpha).item() == want == split_rank_plain(S32.double().tolist(), alpha)


def test_split_rank_is_float64():
    """S = [1, s] with s below float32's resolution at 1: in float32 1 + s == 1, so the first share
    would be 1 > alpha (r = 0); in float64 it is exactly alpha = 1 / (1 + s), not above it (r = 1)."""
    S = torch.tensor([1.0, 1e-8], dtype=torch.float32)
    s = float(S[1])
    alpha = 1.0 / (1.0 + s)
    assert split_rank_plain(S.double().tolist(), alpha) == 1
    assert ops.split_rank(S, alpha).item() == 1


def test_keep_count():
    S = torch.tensor([[2.0, 1.0, 1e-9, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert ops.keep_count(S, 10, 4).tolist() == [2, 0]


def project_full_svd_spec(M: torch.Tensor, T: torch.Tensor, alpha: float) -> torch.Tensor:
    """The OPCM step's projection literally: full SVD, P = U^T T V, zero diag and P[:r,:r]."""
    M, T = M.double(), T.double()
    m, n = M.shape
    U, S, Vh = torch.linalg.svd(M, full_matrices=True)  # U m x m, V n x n
    V = Vh.mT
    r = split_rank_plain(S.tolist(), alpha)
    P = U.mT @ T @ V
    for i in range(min(m, n)):
        P[i, i] = 0.0
    P[:r, :r] = 0.0
    return U @ P @ V.mT


PROJ_SHAPES = [(1, 24, 24), (2, 40, 16), (2, 16, 40), (1, 96, 64)]


@pytest.mark.parametrize("alpha", [0.5, 0.9], ids=lambda a: f"a{a}")
@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=_shape_id)
def test_project_matches_full_svd_spec(device, shape, alpha):
    B, m, n = shape
    M = torch.randn(B, m, n, device=device)
    T = torch.randn(B, m, n, device=device)
    U, S, V = ops.thin_svd(M)
    for backend in (None, "torch"):
        Tp = ops.project(T, U, S, V, alpha, backend=backend)
        assert Tp.shape == T.shape and Tp.dtype == torch.float32 and Tp.device == T.device
        for b in range(B):
            want = project_full_svd_spec(M[b].cpu(), T[b].cpu(), alpha)
            err = torch.linalg.matrix_norm(Tp[b].double().cpu() - want) / torch.linalg.matrix_norm(want)
            assert float(err) < PROJ_RTOL, (backend, b, float(err))


@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=_shape_id)
def test_projection_is_orthogonal_to_m(device, shape):
    M = torch.randn(*shape, device=device)
    T = torch.randn(*shape, device=device) + 0.5 * M  # T correlated with M
    Tp = ops.project(T, *ops.thin_svd(M), 0.5)
    for b in range(shape[0]):
        inner = float((Tp[b].double() * M[b].double()).sum())
        assert abs(inner) < 1e-5 * float(Tp[b].double().norm() * M[b].double().norm())
        assert abs(float((T[b].double() * M[b].double()).sum())) > 1e-2 * float(T[b].norm() * M[b].norm())


def test_zero_m_keeps_t(device):
    M = torch.zeros(2, 12, 7, device=device)
    T = torch.randn(2, 12, 7, device=device)
    U, S, V = ops.thin_svd(M)
    for backend in (None, "torch"):
        assert torch.equal(ops.project(T, U, S, V, 0.5, backend=backend), T)


def test_rank_deficient_m_drops_zero_triplets(device):
    g = torch.Generator().manual_seed(1)
    M = (torch.randn(2, 20, 3, generator=g) @ torch.randn(2, 3, 15, generator=g)).to(device)  # rank 3
    T = torch.randn(2, 20, 15, generator=g).to(device)
    U, S, V = ops.thin_svd(M)
    assert ops.keep_count(S, 20, 15).tolist() == [3, 3]
    Tp = ops.project(T, U, S, V, 0.5)
    Tp2 = ops.project(T, U, S, V, 0.5, backend="torch")
    assert float((Tp - Tp2).norm() / Tp2.norm()) < PROJ_RTOL
    # only the 3 real triplets act: T' = T - U3 Q3 V3^T, independent of the null-space vectors
    for b in range(2):
        U3, V3 = U[b, :, :3].double(), V[b, :, :3].double()
        P3 = U3.mT @ T[b].double() @ V3
        r = int(ops.split_rank(S[b], 0.5))
        Q3 = torch.diag(torch.diagonal(P3))
        Q3[:r, :r] = P3[:r, :r]
        want = T[b].double() - U3 @ Q3 @ V3.mT
        assert float((Tp[b].double() - want).norm() / want.norm()) < PROJ_RTOL
        assert abs(float((Tp[b].double() * M[b].double()).sum())) < 1e-5 * float(Tp[b].norm() * M[b].norm())


def test_split_rank_ignores_dropped_triplets(device):
    """S = [1, 1, 1, 1, 1e-4] on a 1000x5 weight: the last triplet is below the cut
    (1000 * eps32 = 1.2e-4), so the split rank for alpha = 0.74999 is 2 (share 0.75), not
    3 as it would be with 1e-4 counted (3 / 4.0001 < alpha)."""
    g = torch.Generator().manual_seed(6)
    Q1, _ = torch.linalg.qr(torch.randn(1000, 5, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    S = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e-4], dtype=torch.float64)
    M = ((Q1 * S) @ Q2.mT).float()[None].to(device)
    T = torch.randn(1, 1000, 5, generator=g).to(device)
    U, S, V = ops.thin_svd(M)
    assert ops.keep_count(S, 1000, 5).tolist() == [4]
    assert ops.split_rank(S, 0.74999).tolist() == [3]
    for backend in (None, "torch"):
        Tp = ops.project(T, U, S, V, 0.74999, backend=backend)[0].double()
        U4, V4 = U[0, :, :4].double(), V[0, :, :4].double()
        P = U4.mT @ T[0].double() @ V4
        Q = torch.diag(torch.diagonal(P))
        Q[:2, :2] = P[:2, :2]  # r = 2
        want = T[0].double() - U4 @ Q @ V4.mT
        assert float((Tp - want).norm() / want.norm()) < PROJ_RTOL


def test_project_2d(device):
    M, T = torch.randn(10, 6, device=device), torch.randn(10, 6, device=device)
    U, S, V = ops.thin_svd(M)
    Tp = ops.project(T, U, S, V, 0.5)
    assert Tp.shape == (10, 6)
    want = project_full_svd_spec(M.cpu(), T.cpu(), 0.5)
    assert float((Tp.double().cpu() - want).norm() / want.norm()) < PROJ_RTOL


def _with_spectrum(m: int, n: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    k = min(m, n)
    Q1, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    i = torch.arange(k, dtype=torch.float64)
    if kind == "clustered":  # two plateaus of singular values 1e-6 apart: closer than eps32
        s = torch.where(i < k // 2, 1.0 - 1e-6 * i, 0.1 - 1e-6 * i)
    elif kind == "powerlaw":
        s = (i + 1) ** -1.5
    else:  # steep: down to just above project()'s cut S_1 * max(m, n) * eps32
        s = torch.logspace(0, math.log10(1.5 * max(m, n) * 2.0**-23), k, dtype=torch.float64)
    return ((Q1 * s) @ Q2.mT).float()


@pytest.mark.parametrize("kind", ["clustered", "powerlaw", "steep"])
@pytest.mark.parametrize("shape", [(96, 64), (12, 8), (32, 80)], ids=_shape_id)
def test_project_accurate_for_hard_spectra(device, shape, kind):
    """Near-degenerate singular values: the float64 Gram route resolves what an fp32 SVD cannot
    (an fp32 LAPACK gesdd is off by ~3e-2 on the clustered 96x64 case)."""
    M = _with_spectrum(*shape, kind)
    T = torch.randn(*shape)
    U, S, V = ops.thin_svd(M[None].to(device))
    check_svd_invariants(M[None], U, S, V)
    Tp = ops.project(T[None].to(device), U, S, V, 0.5)[0].cpu()
    want = project_full_svd_spec(M, T, 0.5)
    assert float((Tp.double() - want).norm() / want.norm()) < PROJ_RTOL


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("shape", [(3, 40, 16), (3, 16, 40), (2, 24, 24), (1, 96, 64)], ids=_shape_id)
def test_svd_project_matches_thin_svd_then_project(device, shape, workers, monkeypatch):
    """The fused per-matrix path (CPU: one worker decomposes and projects each matrix, reusing its
    float64 buffers) gives what thin_svd then project give on the stacked batch, and the spec."""
    monkeypatch.setenv("OPCM_SVD_WORKERS", str(workers))
    g = torch.Generator().manual_seed(11)
    B, m, n = shape
    Ms = [torch.randn(m, n, generator=g).to(device) for _ in range(B)]
    Ts = [(torch.randn(m, n, generator=g) + 0.3 * M.cpu()).to(device) for M in Ms]
    Ms[0] = torch.zeros(m, n, device=device)  # M = 0 keeps T
    for backend in (None, "torch"):
        got, took = ops.svd_project(Ms, Ts, 0.5, backend=backend)
        assert set(took) == {"svd", "project"} and min(took.values()) >= 0.0
        want = ops.project(torch.stack(Ts), *ops.thin_svd(torch.stack(Ms), backend=backend), 0.5, backend=backend)
        assert len(got) == B and all(t.shape == (m, n) and t.dtype == torch.float32 for t in got)
        assert torch.equal(got[0], Ts[0])
        for b in range(B):
            assert float((got[b] - want[b]).norm() / want[b].norm()) < 1e-5, (backend, b)
            if b == 0:
                continue  # the spec's literal formula has no keep rule (M = 0 keeps T, checked above)
            spec = project_full_svd_spec(Ms[b].cpu(), Ts[b].cpu(), 0.5)
            assert float((got[b].double().cpu() - spec).norm() / spec.norm()) < PROJ_RTOL


@pytest.mark.parametrize("kind", ["clustered", "powerlaw", "steep"])
def test_svd_project_accurate_for_hard_spectra(device, kind):
    """The buffers one worker reuses from matrix to matrix (different spectra, both orientations)
    leave nothing behind: every result matches the spec."""
    shapes = [(96, 64), (64, 96), (96, 64)]
    Ms = [_with_spectrum(m, n, kind) for m, n in shapes]
    Ts = [torch.randn(m, n) for m, n in shapes]
    for (m, n), M, T in zip(shapes, Ms, Ts):
        got, _ = ops.svd_project([M.to(device)], [T.to(device)], 0.5)
        spec = project_full_svd_spec(M, T, 0.5)
        assert float((got[0].double().cpu() - spec).norm() / spec.norm()) < PROJ_RTOL, (m, n)
    # one call, same shape: a worker's workspace is reused for every matrix
    got, _ = ops.svd_project([Ms[0].to(device), Ms[2].to(device)], [Ts[0].to(device), Ts[2].to(device)], 0.5)
    for M, T, Tp in zip((Ms[0], Ms[2]), (Ts[0], Ts[2]), got):
        spec = project_full_svd_spec(M, T, 0.5)
        assert float((Tp.double().cpu() - spec).norm() / spec.norm()) < PROJ_RTOL


def test_svd_project_rejects_bad_input():
    M, T = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="2 matrices M but 1"):
        ops.svd_project([M, M], [T], 0.5)
    with pytest.raises(ValueError, match="shape of M"):
        ops.svd_project([M, torch.randn(4, 6)], [T, T], 0.5)
    with pytest.raises((ValueError, TypeError), match="float32|fp32"):
        ops.svd_project([M.double()], [T], 0.5)
    bad = M.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(BackendError, match="eigensolver failed on matrix 0 of 1"):
        ops.svd_project([bad], [T], 0.5, backend="native")
    assert ops.svd_project([], [], 0.5) == ([], {"svd": 0.0, "project": 0.0})


@pytest.mark.slow
def test_vit_b32_sized_projection():
    """One 768x3072 weight (the wide orientation the CPU SVD transposes)."""
    g = torch.Generator().manual_seed(2)
    M = torch.randn(1, 768, 3072, generator=g) * 0.02
    T = torch.randn(1, 768, 3072, generator=g) * 0.02
    Tp = ops.project(T, *ops.thin_svd(M), 0.5)
    want = project_full_svd_spec(M[0], T[0], 0.5)
    assert float((Tp[0].double() - want).norm() / want.norm()) < PROJ_RTOL


# ----------------------------------------------------------------------------- CuPy
def test_cupy_arrays_round_trip():
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("CuPy arrays need a GPU")
    base = cupy.asarray(torch.randn(1000).numpy()).astype(cupy.float16)
    new = cupy.asarray(torch.randn(1000).numpy()).astype(cupy.float16)
    M, T, sm, st = ops.deltas(base, None, new)
    assert M is None and isinstance(T, cupy.ndarray) and isinstance(st, cupy.ndarray)
    want = new.astype(cupy.float32) - base.astype(cupy.float32)
    assert bool(cupy.array_equal(T, want))
    A = cupy.random.standard_normal((2, 12, 8), dtype=cupy.float32)
    U, S, V = ops.thin_svd(A)
    assert isinstance(U, cupy.ndarray)
    Tp = ops.project(cupy.random.standard_normal((2, 12, 8), dtype=cupy.float32), U, S, V, 0.5)
    assert isinstance(Tp, cupy.ndarray) and Tp.shape == (2, 12, 8)


def test_f32_helper_rejects_overflow():
    with pytest.raises(ValueError):
        ops._f32(1e39, "x", "lam")
    assert ops._f32(1.0000000001, "x", "lam") == struct.unpack("f", struct.pack("f", 1.0000000001))[0]
