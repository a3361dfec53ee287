"""The CUDA kernels of ``opcm_ext._cuda`` against torch on the same inputs.

GPU only: the whole module skips cleanly when torch sees no GPU or the CUDA
module cannot be loaded (``opcm_ext._native.cuda()`` says why). The kernels are
called directly with raw pointers (``tensor.data_ptr()``) on torch's current
stream, exactly as ``ops.py`` does; the kernels ADD into their float64 sums, so
some tests seed them and compare relative to max(|want|, |seed|).
Element-wise kernels are compared with torch's fp32 CPU arithmetic (same
roundings); the SVD through invariants: singular values vs
``torch.linalg.svdvals`` in fp64, orthonormal columns, ``u_i^T A v_i = s_i``
and the reconstruction, never the signs of vectors.

Run (on a GPU machine, after building the CUDA module):
    pytest tests/test_cuda_ops.py -v
Benchmarks (deselected by default):
    pytest tests/test_cuda_ops.py -m benchmark -v -s
"""

from __future__ import annotations

import pytest
import torch

from opcm_ext import _native, ops
from opcm_ext.errors import BackendError

if not torch.cuda.is_available():
    pytest.skip("CUDA kernel tests need a CUDA GPU", allow_module_level=True)

try:  # preloads the cuSOLVER/cuBLAS of torch's CUDA family, then imports _cuda
    C = _native.cuda()
except BackendError as e:
    pytest.skip(str(e), allow_module_level=True)

pytestmark = pytest.mark.cuda

DEV = torch.device("cuda", torch.cuda.current_device())
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NAME = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
EPS32 = torch.finfo(torch.float32).eps

# Largest accepted relative difference from the torch reference, per output
# dtype. The element-wise kernels use the same fp32 roundings as torch's CPU
# ops (so they are expected to match exactly); one unit in the last place is
# allowed for a different but equally valid rounding order.
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# float64 norm accumulators: only the summation order differs (per-block atomics).
SUM_RTOL = 1e-12
# SVD: singular values and u^T A v against sigma_1, reconstruction against ||A||_F,
# orthonormality of fp32 factors.
SVD_TOL = 2e-5
ORTH_TOL = 1e-5


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def rand(n: int, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """n random values of `dtype` on the GPU; offset > 0 gives a misaligned view."""
    return torch.randn(n + offset, device=DEV).to(dtype)[offset:]


def empty(n: int, dtype: torch.dtype = torch.float32, offset: int = 0) -> torch.Tensor:
    return torch.empty(n + offset, device=DEV, dtype=dtype)[offset:]


def sumsq64(x: torch.Tensor) -> float:
    return float((x.double() ** 2).sum())


def close_sum(got: float, want: float, seed: float = 0.0) -> bool:
    """got == seed + want up to summation order; relative to max(|want|, |seed|), since
    rounding seed + want in float64 costs up to eps64 * |seed| even when want << seed."""
    return abs(got - seed - want) <= SUM_RTOL * max(abs(want), abs(seed), 1e-300)


SIZES = [1, 3, 4, 5, 4099, (1 << 20) + 3]
OFFSETS = [0, 1]  # 1: every pointer misaligned for the 4-wide path


# ------------------------------------------------------------------- deltas

@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"off{o}")
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize(
    "dts",
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.float16, torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32, torch.float16),
    ],
    ids=lambda d: "-".join(NAME[x] for x in d),
)
def test_deltas_matches_torch(dts, n, offset):
    bdt, mdt, ndt = dts
    base, merged, new = rand(n, bdt, offset), rand(n, mdt, offset), rand(n, ndt, offset)
    out_m, out_t = empty(n, offset=offset), empty(n, offset=offset)
    sums = torch.tensor([1.5, 2.5], dtype=torch.float64, device=DEV)  # the kernel ADDS
    C.deltas(base.data_ptr(), CODE[bdt], merged.data_ptr(), CODE[mdt], new.data_ptr(), CODE[ndt],
             out_m.data_ptr(), out_t.data_ptr(), n, sums.data_ptr(), stream())
    ref_m = merged.float() - base.float()
    ref_t = new.float() - base.float()
    assert torch.equal(out_m, ref_m)
    assert torch.equal(out_t, ref_t)
    got = sums.tolist()
    assert close_sum(got[0], sumsq64(ref_m), seed=1.5)
    assert close_sum(got[1], sumsq64(ref_t), seed=2.5)


@pytest.mark.parametrize("n", [5, 4099], ids=lambda n: f"n{n}")
def test_deltas_without_merged_leaves_sum0(n):
    base, new = rand(n, torch.bfloat16), rand(n, torch.bfloat16)
    out_t = empty(n)
    sums = torch.tensor([7.0, 0.0], dtype=torch.float64, device=DEV)
    C.deltas(base.data_ptr(), 2, 0, 0, new.data_ptr(), 2, 0, out_t.data_ptr(), n,
             sums.data_ptr(), stream())
    assert torch.equal(out_t, new.float() - base.float())
    assert sums[0].item() == 7.0
    assert close_sum(sums[1].item(), sumsq64(out_t))


def test_deltas_nonfinite_input_shows_in_sum():
    base = rand(1000, torch.float32)
    new = base.clone()
    new[17] = float("nan")
    out_t = empty(1000)
    sums = torch.zeros(2, dtype=torch.float64, device=DEV)
    C.deltas(base.data_ptr(), 0, 0, 0, new.data_ptr(), 0, 0, out_t.data_ptr(), 1000,
             sums.data_ptr(), stream())
    assert not torch.isfinite(sums[1]).item()


# -------------------------------------------------------------- sigma_update

@pytest.mark.parametrize("alias", [False, True], ids=["out", "in-place"])
@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"off{o}")
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
def test_sigma_update_matches_torch(n, offset, alias):
    m, tp = rand(n, torch.float32, offset), rand(n, torch.float32, offset)
    lam = 1.2345678901234
    ref = torch.add(torch.mul(m.cpu(), torch.tensor(lam, dtype=torch.float32)), tp.cpu())
    out = m if alias else empty(n, offset=offset)
    sums = torch.tensor([0.25], dtype=torch.float64, device=DEV)
    C.sigma_update(m.data_ptr(), tp.data_ptr(), lam, out.data_ptr(), n, sums.data_ptr(), stream())
    torch.testing.assert_close(out.cpu(), ref, rtol=ULP[torch.float32], atol=0.0)
    assert close_sum(sums.item(), sumsq64(out), seed=0.25)


# ------------------------------------------------------------------ finalize

def finalize_ref(base: torch.Tensor, sigma: torch.Tensor, lam: float, out_dtype) -> torch.Tensor:
    """torch's CPU fp32 arithmetic: base + sigma / lam (true division), then a RNE cast."""
    q = torch.div(sigma.cpu(), torch.tensor(lam, dtype=torch.float32))
    return torch.add(base.cpu().float(), q).to(out_dtype)


@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"off{o}")
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize(
    "dts",
    [(a, b) for a in CODE for b in CODE],
    ids=lambda d: f"{NAME[d[0]]}->{NAME[d[1]]}",
)
def test_finalize_matches_torch(dts, n, offset):
    bdt, odt = dts
    base, sigma = rand(n, bdt, offset), rand(n, torch.float32, offset)
    lam = 1.7320508075688772
    out = empty(n, odt, offset)
    C.finalize(base.data_ptr(), CODE[bdt], sigma.data_ptr(), lam, out.data_ptr(), CODE[odt], n,
               stream())
    torch.testing.assert_close(out.cpu().float(), finalize_ref(base, sigma, lam, odt).float(),
                               rtol=ULP[odt], atol=0.0)


@pytest.mark.parametrize("odt", [torch.float16, torch.bfloat16], ids=lambda d: NAME[d])
def test_finalize_rounds_half_to_even(odt):
    mant = 10 if odt == torch.float16 else 7  # explicit mantissa bits
    ulp = 2.0**-mant
    # exact fp32 midpoints between neighbours of the output dtype near 1
    base = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 1 + 5 * ulp / 2],
                        dtype=torch.float32, device=DEV)
    want = torch.tensor([1.0, 1 + 2 * ulp, -1.0, 1 + 2 * ulp], dtype=torch.float32)
    sigma = torch.zeros(4, device=DEV)
    out = torch.empty(4, dtype=odt, device=DEV)
    C.finalize(base.data_ptr(), 0, sigma.data_ptr(), 1.0, out.data_ptr(), CODE[odt], 4, stream())
    assert torch.equal(out.cpu().float(), want)


# --------------------------------------------------------------------- sumsq

@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"off{o}")
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dt", list(CODE), ids=lambda d: NAME[d])
def test_sumsq_matches_torch(dt, n, offset):
    x = rand(n, dt, offset)
    sums = torch.tensor([3.0], dtype=torch.float64, device=DEV)
    C.sumsq(x.data_ptr(), CODE[dt], n, sums.data_ptr(), stream())
    assert close_sum(sums.item(), sumsq64(x.float()), seed=3.0)


def test_zero_length_is_a_no_op():
    sums = torch.tensor([1.0, 2.0], dtype=torch.float64, device=DEV)
    x = torch.empty(4, device=DEV)
    C.sumsq(x.data_ptr(), 0, 0, sums.data_ptr(), stream())
    C.deltas(x.data_ptr(), 0, x.data_ptr(), 0, x.data_ptr(), 0, x.data_ptr(), x.data_ptr(), 0,
             sums.data_ptr(), stream())
    assert sums.tolist() == [1.0, 2.0]


# ----------------------------------------------------------- mask_projection

def mask_ref(p: torch.Tensor, r: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    k = p.shape[-1]
    i = torch.arange(k, device=p.device)
    rb, kb = r[:, None, None], keep[:, None, None]
    block = (i[None, :, None] < rb) & (i[None, None, :] < rb)
    diag = (i[None, :, None] == i[None, None, :]) & (i[None, :, None] >= rb) & (i[None, :, None] < kb)
    return torch.where(block | diag, p, torch.zeros((), device=p.device))


@pytest.mark.parametrize("alias", [False, True], ids=["out", "in-place"])
@pytest.mark.parametrize("k", [1, 7, 256, 768], ids=lambda k: f"k{k}")
def test_mask_projection_matches_torch(k, alias):
    batch = 5
    p = torch.randn(batch, k, k, device=DEV)
    r = torch.tensor([0, k // 3, k, 1 % (k + 1), k // 2], dtype=torch.int64, device=DEV)
    keep = torch.tensor([k, k, k, 0, (3 * k) // 4], dtype=torch.int64, device=DEV)
    ref = mask_ref(p, r, keep)
    q = p if alias else torch.empty_like(p)
    C.mask_projection(p.data_ptr(), r.data_ptr(), keep.data_ptr(), batch, k, q.data_ptr(), stream())
    assert torch.equal(q, ref)


# ------------------------------------------------------------------------ SVD

def run_svd(a: torch.Tensor):
    b, m, n = a.shape
    k = min(m, n)
    u = torch.full((b, m, k), float("nan"), device=a.device)
    s = torch.full((b, k), float("nan"), device=a.device)
    v = torch.full((b, n, k), float("nan"), device=a.device)
    info = torch.full((b,), -12345, dtype=torch.int32, device=a.device)
    ws = C.svd_workspace_size(b, m, n)
    work = torch.empty(max(ws, 1), dtype=torch.uint8, device=a.device)
    C.batched_thin_svd(a.data_ptr(), b, m, n, u.data_ptr(), s.data_ptr(), v.data_ptr(),
                       work.data_ptr(), ws, info.data_ptr(), stream())
    return u, s, v, info


def check_svd(a: torch.Tensor, u, s, v, info) -> None:
    b, m, n = a.shape
    k = min(m, n)
    assert info.eq(0).all(), info.tolist()
    assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(v).all()
    ad, ud, sd, vd = a.double(), u.double(), s.double(), v.double()
    ref = torch.linalg.svdvals(ad)
    s1 = ref[:, :1].clamp_min(1e-300)
    assert (s >= 0).all()
    assert (s[:, 1:] <= s[:, :-1]).all(), "singular values must be descending"
    assert ((sd - ref).abs() <= SVD_TOL * s1).all(), (sd - ref).abs().max().item()

    keep = sd > sd[:, :1] * max(m, n) * EPS32  # the triplets the projection keeps
    eye = torch.eye(k, dtype=torch.float64, device=a.device)
    small, big = (vd, ud) if m >= n else (ud, vd)
    assert (small.mT @ small - eye).abs().max().item() <= ORTH_TOL
    both = keep[:, :, None] & keep[:, None, :]
    assert ((big.mT @ big - eye).abs() * both).max().item() <= ORTH_TOL
    zero = sd == 0  # sigma_i == 0 -> the big-side vector is exactly zero
    assert (big.abs() * zero[:, None, :]).max().item() == 0.0

    d = torch.einsum("bik,bij,bjk->bk", ud, ad, vd)  # u_i^T A v_i
    assert ((d - sd).abs() * keep).max().item() <= SVD_TOL * s1.max().item()

    rec = (ud * sd[:, None, :]) @ vd.mT
    err = torch.linalg.matrix_norm(rec - ad)
    scale = torch.linalg.matrix_norm(ad).clamp_min(1e-300)
    assert (err <= SVD_TOL * scale).all(), err.tolist()  # a zero A must come back exactly


SVD_SHAPES = [(768, 768), (3072, 768), (768, 3072)]


@pytest.mark.parametrize("batch", [1, 5, 12], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("shape", SVD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_svd_invariants_vit_shapes(shape, batch):
    a = torch.randn(batch, *shape, device=DEV) * 0.02
    check_svd(a, *run_svd(a))


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 9), (9, 1), (2, 3), (33, 17), (17, 33), (64, 64), (200, 96)],
    ids=lambda s: f"{s[0]}x{s[1]}")
def test_svd_invariants_small_shapes(shape):
    a = torch.randn(3, *shape, device=DEV)
    check_svd(a, *run_svd(a))


@pytest.mark.parametrize("rank", [1, 50], ids=lambda r: f"rank{r}")
@pytest.mark.parametrize("shape", SVD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_svd_rank_deficient(shape, rank):
    m, n = shape
    a = torch.randn(2, m, rank, device=DEV) @ torch.randn(2, rank, n, device=DEV) / (m * n) ** 0.5
    u, s, v, info = run_svd(a)
    check_svd(a, u, s, v, info)
    kept = (s > s[:, :1] * max(m, n) * EPS32).sum(dim=1)
    assert kept.tolist() == [rank, rank]


def test_svd_graded_spectrum():
    m, n = 512, 256
    q1, _ = torch.linalg.qr(torch.randn(m, n, device=DEV, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, device=DEV, dtype=torch.float64))
    sv = torch.logspace(0, -6, n, device=DEV, dtype=torch.float64)
    a = ((q1 * sv) @ q2.T).float()[None]
    check_svd(a, *run_svd(a))


@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (768, 3072), (5, 3)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_svd_zero_and_mixed_batch(shape):
    m, n = shape
    a = torch.randn(3, m, n, device=DEV)
    a[1] = 0.0  # a zero matrix between two full-rank ones: thresholds are per matrix
    u, s, v, info = run_svd(a)
    check_svd(a, u, s, v, info)
    assert s[1].eq(0).all()
    big = u if m >= n else v
    assert big[1].eq(0).all()


@pytest.fixture(params=[1, 2], ids=["xsyevd", "gesvdj"])
def per_matrix_path(request):
    """1: syevBatched skipped, Xsyevd per matrix on the Gram matrix; 2: gesvdj on A only."""
    C._set_svd_path(request.param)
    try:
        yield request.param
    finally:
        C._set_svd_path(0)


@pytest.mark.parametrize("shape", [(200, 96), (96, 200), (64, 64), (1, 7)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_svd_per_matrix_paths(per_matrix_path, shape):
    a = torch.randn(5, *shape, device=DEV)  # 5 matrices over 4 streams
    a[2] = 0.0
    check_svd(a, *run_svd(a))


def test_svd_per_matrix_paths_rank_deficient(per_matrix_path):
    a = torch.randn(2, 300, 4, device=DEV) @ torch.randn(2, 4, 120, device=DEV)
    u, s, v, info = run_svd(a)
    check_svd(a, u, s, v, info)
    assert (s > s[:, :1] * 300 * EPS32).sum(dim=1).tolist() == [4, 4]


def test_svd_on_a_side_stream():
    a = torch.randn(4, 300, 200, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = run_svd(a)
    torch.cuda.current_stream().wait_stream(side)
    check_svd(a, *out)


def test_svd_empty_and_degenerate_sizes():
    assert C.svd_workspace_size(0, 5, 5) == 0
    assert C.svd_workspace_size(3, 0, 5) == 0
    info = torch.full((3,), 7, dtype=torch.int32, device=DEV)
    C.batched_thin_svd(0, 3, 0, 5, 0, 0, 0, 0, 0, info.data_ptr(), stream())
    assert info.eq(0).all()


def test_svd_rejects_small_workspace():
    a = torch.randn(2, 64, 32, device=DEV)
    u, s, v = (torch.empty(2, 64, 32, device=DEV), torch.empty(2, 32, device=DEV),
               torch.empty(2, 32, 32, device=DEV))
    info = torch.empty(2, dtype=torch.int32, device=DEV)
    work = torch.empty(1024, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="work_bytes"):
        C.batched_thin_svd(a.data_ptr(), 2, 64, 32, u.data_ptr(), s.data_ptr(), v.data_ptr(),
                           work.data_ptr(), 1024, info.data_ptr(), stream())


# ---------------------------------------------------------------- arguments

def test_host_pointer_is_rejected():
    x = torch.randn(16)  # CPU
    sums = torch.zeros(1, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="x_ptr"):
        C.sumsq(x.data_ptr(), 0, 16, sums.data_ptr(), stream())


def test_bad_dtype_code_is_rejected():
    x = torch.randn(16, device=DEV)
    sums = torch.zeros(1, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="dtype"):
        C.sumsq(x.data_ptr(), 5, 16, sums.data_ptr(), stream())


def test_build_info():
    info = C.build_info()
    assert set(info) == {"cuda_runtime_version", "cusolver_version", "cublas_version",
                         "syev_batched"}


def test_runtime_info_matches_torch():
    info = C.runtime_info()
    assert info["device_count"] == torch.cuda.device_count()
    assert info["cuda_driver_version"] >= info["cuda_runtime_version"] // 1000 * 1000
    assert info["cuda_runtime_version"] // 1000 == int(torch.version.cuda.split(".")[0])
    assert info["syev_batched"] == (C.build_info()["syev_batched"] and info["cusolver_version"] >= 110702)


def test_workspace_holds_the_cublas_workspace_of_the_device():
    hopper = torch.cuda.get_device_capability(DEV)[0] >= 9
    fp64 = 2 * 8 * 64 * 32 + 2 * 8 * 32 * 32  # X, Y, G and C of one 64 x 32 matrix
    assert C.svd_workspace_size(1, 64, 32) > fp64 + ((32 << 20) if hopper else (4 << 20))


def test_ops_select_uses_the_native_kernels_after_the_self_test():
    chosen = ops.select(DEV)
    assert chosen.native, chosen.reason
    a = torch.randn(3, 96, 40, device=DEV)
    check_svd(a, *chosen.thin_svd(a), torch.zeros(3, dtype=torch.int32, device=DEV))


# ---------------------------------------------------------------------- CuPy

def test_cupy_arrays_through_raw_pointers():
    cp = pytest.importorskip("cupy")
    st = cp.cuda.get_current_stream().ptr
    x = cp.random.standard_normal(10_001, dtype=cp.float32)
    sums = cp.zeros(1, dtype=cp.float64)
    C.sumsq(x.data.ptr, 0, x.size, sums.data.ptr, st)
    want = float((x.astype(cp.float64) ** 2).sum())
    assert close_sum(float(sums[0]), want)

    a = cp.random.standard_normal((3, 96, 40), dtype=cp.float32)
    u = cp.empty((3, 96, 40), dtype=cp.float32)
    s = cp.empty((3, 40), dtype=cp.float32)
    v = cp.empty((3, 40, 40), dtype=cp.float32)
    info = cp.empty(3, dtype=cp.int32)
    ws = C.svd_workspace_size(3, 96, 40)
    work = cp.empty(ws, dtype=cp.uint8)
    C.batched_thin_svd(a.data.ptr, 3, 96, 40, u.data.ptr, s.data.ptr, v.data.ptr, work.data.ptr,
                       ws, info.data.ptr, st)
    assert int(abs(info).sum()) == 0
    ref = cp.linalg.svd(a.astype(cp.float64), compute_uv=False)
    assert float(abs(s - ref).max()) <= SVD_TOL * float(ref.max())
    check_svd(torch.from_dlpack(a), torch.from_dlpack(u), torch.from_dlpack(s),
              torch.from_dlpack(v), torch.from_dlpack(info))


# ---------------------------------------------------------------- benchmarks

def _time_ms(fn, reps: int = 5) -> float:
    fn()  # warm-up (handles, workspace queries, lazy module loading)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@pytest.mark.benchmark
@pytest.mark.parametrize("batch", [1, 12], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("shape", SVD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_svd_vs_torch(shape, batch):
    a = torch.randn(batch, *shape, device=DEV) * 0.02
    ours = _time_ms(lambda: run_svd(a))
    theirs = _time_ms(lambda: torch.linalg.svd(a, full_matrices=False))
    per_matrix = {}
    for path, name in ((1, "Xsyevd"), (2, "gesvdj")):
        C._set_svd_path(path)
        try:
            per_matrix[name] = _time_ms(lambda: run_svd(a), reps=2)
        finally:
            C._set_svd_path(0)
    print(f"\nSVD {batch}x{shape[0]}x{shape[1]}: syevBatched path {ours:.2f} ms, "
          f"Xsyevd per matrix {per_matrix['Xsyevd']:.2f} ms, gesvdj {per_matrix['gesvdj']:.2f} ms, "
          f"torch.linalg.svd {theirs:.2f} ms ({theirs / ours:.2f}x)")


@pytest.mark.benchmark
def test_bench_elementwise_bandwidth():
    n = 1 << 27  # 128 Mi elements
    base, merged, new = (torch.randn(n, device=DEV).to(torch.bfloat16) for _ in range(3))
    m, t = torch.empty(n, device=DEV), torch.empty(n, device=DEV)
    sums = torch.zeros(2, dtype=torch.float64, device=DEV)
    ms = _time_ms(lambda: C.deltas(base.data_ptr(), 2, merged.data_ptr(), 2, new.data_ptr(), 2,
                                   m.data_ptr(), t.data_ptr(), n, sums.data_ptr(), stream()))
    moved = n * (3 * 2 + 2 * 4)  # bytes read + written
    ms_t = _time_ms(lambda: ((merged.float() - base.float()), (new.float() - base.float())))
    print(f"\ndeltas bf16 x{n}: {ms:.2f} ms = {moved / ms / 1e6:.0f} GB/s "
          f"(torch, without the norms: {ms_t:.2f} ms)")
