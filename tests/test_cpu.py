"""Backend "cpu" beyond the shared suites: every tile shape against dense linear
algebra, im2col chunking, the NaN/Inf contract, threads, the plan cache, and
the registry that makes it the default."""
import functools
import threading

import numpy as np
import pytest

import invconv
from invconv import _backends, _cpu
from support import CORNERS, dense_operator, dense_weight_grad, make_weight

# (B, C, H, W, kh, kw, groups): H or W = 1, kernels larger than the image,
# groups = C, tiles that do not divide the image.
SHAPES = [
    (2, 3, 1, 7, 3, 3, 1),
    (2, 2, 6, 1, 3, 2, 2),
    (1, 3, 2, 3, 4, 5, 3),
    (3, 4, 5, 9, 3, 3, 1),
    (1, 6, 4, 4, 2, 3, 3),
    (2, 1, 7, 5, 3, 3, 1),
]
TILES = [None, (1, 1), (2, 3), (1, 8), (4, 4)]     # None: the module's rule
# float64 to 1e-10 of the largest magnitude; float32 to 5e-5 of it (the folded
# operators are rounded to float32 once, then each output sees ~kh*kw*C terms).
RTOL = {np.float64: 1e-10, np.float32: 5e-5}


@functools.lru_cache(maxsize=None)   # shared by every tile and dtype
def _dense_results(shape, corner, unit, seed):
    B, C, H, W, kh, kw, groups = shape
    rng = np.random.default_rng(seed)
    w = make_weight(rng, C, groups, kh, kw, corner, unit)
    x, g = rng.standard_normal((2, B, C, H, W))
    M = dense_operator(w, H, W, corner, groups, unit)
    X, G = x.reshape(B, -1), g.reshape(B, -1)
    inv = np.linalg.solve(M, X.T).T.reshape(x.shape)
    gy = np.linalg.solve(M.T, G.T).T.reshape(x.shape)
    return w, x, g, {
        "conv": (X @ M.T).reshape(x.shape),
        "inv": inv,
        "conv_vjp": ((G @ M).reshape(x.shape),
                     dense_weight_grad(g, x, w, corner, groups, unit)),
        "inv_vjp": (gy, dense_weight_grad(gy, inv, w, corner, groups, unit, sign=-1.0)),
    }


def _close(got, want, rtol):
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want), initial=0.0)) / scale
    assert err <= rtol, err


def _no_fallback():
    raise AssertionError("the reference computed a call with finite inputs and results")


@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_tile_matches_dense(monkeypatch, shape, tile, dtype):
    if tile is not None:
        monkeypatch.setattr(_cpu, "_tile", lambda *args: tile)
    monkeypatch.setattr(_cpu, "_reference", _no_fallback)    # finite: the fast path answers
    for n, corner in enumerate(CORNERS):
        unit = n % 2 == 0
        w, x, g, want = _dense_results(shape, corner, unit, seed=n + 10 * sum(shape))
        opts = dict(corner=corner, groups=shape[6], unit_diagonal=unit, backend="cpu")
        w, x, g = (a.astype(dtype) for a in (w, x, g))
        _close(invconv.conv2d(x, w, **opts), want["conv"], RTOL[dtype])
        _close(invconv.inv_conv2d(x, w, **opts), want["inv"], RTOL[dtype])
        for got, expected in zip(invconv.conv2d_vjp(g, x, w, **opts), want["conv_vjp"]):
            _close(got, expected, RTOL[dtype])
        inv = want["inv"].astype(dtype)
        for got, expected in zip(invconv.inv_conv2d_vjp(g, inv, w, **opts), want["inv_vjp"]):
            assert got.dtype == dtype
            _close(got, expected, RTOL[dtype])


def test_im2col_chunks_match_one_piece(monkeypatch):
    rng = np.random.default_rng(3)
    w = make_weight(rng, 3, 1, 3, 3, "bottom-right", False)
    x, g = rng.standard_normal((2, 3, 3, 6, 5))
    whole = invconv.conv2d(x, w, backend="cpu"), invconv.conv2d_vjp(g, x, w, backend="cpu")
    # 9 taps * 3 channels * 5 columns * 2 images = 270 elements a row: 1 row
    # per chunk, then 2 rows per chunk (the last one short).
    for bound in (100, 2 * 270):
        monkeypatch.setattr(_cpu, "_IM2COL_ELEMENTS", bound)
        np.testing.assert_allclose(invconv.conv2d(x, w, backend="cpu"), whole[0], rtol=1e-12)
        for got, want in zip(invconv.conv2d_vjp(g, x, w, backend="cpu"), whole[1]):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("op", ["conv2d", "inv_conv2d", "conv2d_vjp", "inv_conv2d_vjp"])
def test_non_finite_reaches_what_the_reference_reaches(op, value):
    """One bad pixel/channel: the pattern of non-finite outputs (and the finite
    values) equal the reference's, although folded operators would spread it."""
    rng = np.random.default_rng(4)
    C, groups = 4, 2
    w = make_weight(rng, C, groups, 3, 3, "top-right", False)
    x, g = rng.standard_normal((2, 2, C, 6, 7))
    x[0, 1, 2, 3] = value
    g[1, 2, 4, 1] = value
    args = (g, x, w) if op.endswith("vjp") else (x, w)
    f = getattr(invconv, op)
    got, want = f(*args, groups=groups, unit_diagonal=False, backend="cpu"), \
        f(*args, groups=groups, unit_diagonal=False, backend="reference")
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b))
        finite = np.isfinite(b)
        assert finite.any() and not finite.all()
        np.testing.assert_allclose(a[finite], b[finite], rtol=1e-10, atol=1e-12)


def test_non_finite_weight_read_uses_the_reference():
    rng = np.random.default_rng(5)
    w = make_weight(rng, 2, 1, 2, 2, junk=np.nan)    # NaN in ignored entries: never read
    x = rng.standard_normal((1, 2, 4, 4))
    assert np.isfinite(invconv.inv_conv2d(x, w, backend="cpu")).all()
    w[1, 0, 0, 0] = np.inf                          # a read tap (offset (1, 1))
    got = invconv.inv_conv2d(x, w, backend="cpu")
    want = invconv.inv_conv2d(x, w, backend="reference")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))


def test_threads_with_different_shapes():
    """Two threads, each its own shape (own plans and scratch), at once."""
    rng = np.random.default_rng(6)
    jobs = []
    for shape in [(3, 2, 9, 11), (2, 5, 7, 6)]:
        w = make_weight(rng, shape[1], 1, 3, 3, "bottom-left", False)
        x = rng.standard_normal(shape)
        jobs.append((x, w, invconv.inv_conv2d(x, w, corner="bottom-left", unit_diagonal=False,
                                              backend="reference")))
    _cpu._plans.clear()
    _cpu._plans_bytes[0] = 0
    barrier = threading.Barrier(len(jobs))
    errors = []

    def work(x, w, want):
        try:
            barrier.wait()
            for _ in range(20):
                got = invconv.inv_conv2d(x, w, corner="bottom-left", unit_diagonal=False,
                                         backend="cpu")
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        except Exception as exc:  # reported below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_cpu, "_PLAN_ENTRIES", 3)
    _cpu._plans.clear()
    _cpu._plans_bytes[0] = 0
    rng = np.random.default_rng(7)
    w = make_weight(rng, 2, 1, 2, 2)
    for width in range(1, 8):
        x = rng.standard_normal((1, 2, 3, width))
        np.testing.assert_allclose(invconv.inv_conv2d(x, w, backend="cpu"),
                                   invconv.inv_conv2d(x, w, backend="reference"), rtol=1e-10)
        assert len(_cpu._plans) <= 3
    assert _cpu._plans_bytes[0] == sum(p.nbytes for p in _cpu._plans.values())
    monkeypatch.setattr(_cpu, "_PLAN_BYTES", 1)       # every plan over the byte bound:
    x = rng.standard_normal((1, 2, 5, 5))            # used for its call, never cached
    np.testing.assert_allclose(invconv.inv_conv2d(x, w, backend="cpu"),
                               invconv.inv_conv2d(x, w, backend="reference"), rtol=1e-10)
    assert len(_cpu._plans) == 0 and _cpu._plans_bytes[0] == 0


def test_cpu_is_the_default_for_host_arrays():
    assert _backends.default_for("numpy") == "cpu"
    assert _backends.default_for("cupy") == "cuda"
    rng = np.random.default_rng(8)
    w = make_weight(rng, 3, 1, 3, 3)
    x = rng.standard_normal((2, 3, 5, 4))
    np.testing.assert_array_equal(invconv.inv_conv2d(x, w), invconv.inv_conv2d(x, w, backend="cpu"))


def test_torch_cpu_tensors_run_the_default_backend(monkeypatch):
    torch = pytest.importorskip("torch")
    import invconv.torch as it
    seen = []
    real = invconv._api._run
    monkeypatch.setattr(invconv._api, "_run",
                        lambda call, *a: seen.append(call.backend) or real(call, *a))
    rng = np.random.default_rng(9)
    w = torch.from_numpy(make_weight(rng, 2, 1, 2, 2))
    it.inv_conv2d(torch.from_numpy(rng.standard_normal((1, 2, 3, 3))), w)
    assert seen == ["cpu"]


def test_registered_backends_provide_the_interface():
    for name in _backends.names(available_only=True):
        if _backends.spec(name).kind != "numpy":
            continue   # importing the CUDA backend needs a device
        module = _backends.load(name)
        for method in _backends.METHODS:
            assert callable(getattr(module, method)), (name, method)
    assert set(invconv.BACKENDS) == set(_backends.names())


@pytest.mark.parametrize("shape", [(20, 6, 16, 16), (1, 3, 96, 80)], ids=str)
def test_scratch_is_a_small_multiple_of_the_input(shape):
    """What Python allocates during a call (outputs included): the SciPy path
    needs ~60 bytes per weight-tap-pixel entry; this backend a few inputs."""
    import tracemalloc
    rng = np.random.default_rng(10)
    w = make_weight(rng, shape[1], 1, 3, 3)
    x, g = rng.standard_normal((2, *shape))
    for f, args in [(invconv.inv_conv2d, (x, w)), (invconv.inv_conv2d_vjp, (g, x, w)),
                    (invconv.conv2d_vjp, (g, x, w))]:
        f(*args, backend="cpu")                       # plans are built once, not counted
        tracemalloc.start()
        try:
            f(*args, backend="cpu")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= 6 * x.nbytes, (f.__name__, peak / x.nbytes)


def test_folded_operator_keeps_the_structural_zeros():
    """A tile pixel depends only on window pixels above-left of it; anything
    but an exact zero elsewhere would couple real pixels to the tile padding
    beyond the image's edge."""
    rng = np.random.default_rng(11)
    C, kh, kw, th, tw = 3, 3, 3, 2, 4
    blocks = 2 * rng.standard_normal((kh, kw, C, C))
    # a small diagonal: large entries in the fold
    blocks[0, 0] = np.tril(blocks[0, 0], -1) + 0.5 * np.eye(C)
    op = _cpu._folded_operator(blocks, th, tw, np.float64)
    wh, ww = th + kh - 1, tw + kw - 1
    op = op.reshape(C, th, tw, C, wh, ww)
    r, s, qr, qc = np.meshgrid(np.arange(th), np.arange(tw), np.arange(wh), np.arange(ww),
                               indexing="ij")
    unreachable = (qr > r + kh - 1) | (qc > s + kw - 1)
    assert unreachable.any()
    np.testing.assert_array_equal(op.transpose(1, 2, 4, 5, 0, 3)[unreachable], 0.0)


def test_tile_overhang_never_feeds_the_image(monkeypatch):
    """Tiles of 1 x 8 on a 9-wide image overhang it by 7 columns.  With x[w] =
    y[w] - 10 x[w-1] the row grows x10 a column and would overflow float32 in
    the overhang; the next row's windows cover that overhang (with exactly zero
    coefficients, and 0 * Inf is NaN), so they must read zeros there, never the
    overhang's own solutions."""
    monkeypatch.setattr(_cpu, "_tile", lambda *args: (1, 8))
    monkeypatch.setattr(_cpu, "_reference", _no_fallback)  # a NaN must not be redone there
    w = np.zeros((1, 1, 2, 2), dtype=np.float32)
    w[0, 0, 1, 0] = 10.0                       # reads (h, w - 1); the diagonal is unit
    y = np.zeros((1, 1, 2, 9), dtype=np.float32)
    y[0, 0, :, 0] = 1e30
    want = invconv.inv_conv2d(y, w, backend="reference")
    assert np.isfinite(want).all() and np.abs(want).max() > 1e37
    got = invconv.inv_conv2d(y, w, backend="cpu")
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("op", ["inv_conv2d", "inv_conv2d_vjp"])
def test_an_overflowing_row_leaves_the_independent_rows_finite(monkeypatch, op):
    """A 1 x 2 kernel makes every row its own system.  Row 0 grows x10 a column
    and overflows float32; rows 1-3 stay below 1e23.  A 4 x 4 tile solves the
    four rows together, and its window holds row 0's Inf against the exactly
    zero coefficient of another row (0 * Inf is NaN): the answer must still be
    the reference's, finite rows included."""
    monkeypatch.setattr(_cpu, "_tile", lambda *args: (4, 4))
    w = np.zeros((1, 1, 1, 2), dtype=np.float32)
    w[0, 0, 0, 0] = -10.0                      # reads (h, w - 1); the diagonal is unit
    image = np.zeros((1, 1, 4, 24), dtype=np.float32)
    x = np.ones_like(image)
    if op == "inv_conv2d":
        image[0, 0, :, 0] = [1e30, 1, 1, 1]    # M x = y grows to the right
        args = (image, w)
    else:
        image[0, 0, :, -1] = [1e30, 1, 1, 1]   # M^T h = g grows to the left
        args = (image, x, w)
    f = getattr(invconv, op)
    with np.errstate(over="ignore", invalid="ignore"):
        got, want = f(*args, backend="cpu"), f(*args, backend="reference")
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b))
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
        finite = np.isfinite(b)
        np.testing.assert_allclose(a[finite], b[finite], rtol=1e-5)
    solution = got[0] if isinstance(got, tuple) else got
    assert np.isfinite(solution[0, 0, 1:]).all() and not np.isfinite(solution[0, 0, 0]).all()


@pytest.mark.parametrize("diagonal", [0.03, 1e-4])
@pytest.mark.parametrize("adjoint", [False, True])
def test_a_small_diagonal_is_solved_by_substitution(monkeypatch, diagonal, adjoint):
    """A same-pixel diagonal small against the other taps makes the tile's own
    block (48 x 48 here) wildly ill-conditioned although it is triangular with
    a non-zero diagonal.  Substitution still solves such a system to rounding
    level in the componentwise backward sense (|M x - y| <= eps (|M| |x| + |y|)),
    as the reference and the kernels do; an LU with pivoting of the block gave
    answers off by 100% or raised LinAlgError("Singular matrix")."""
    monkeypatch.setattr(_cpu, "_reference", _no_fallback)    # finite: the fast path answers
    rng = np.random.default_rng(12)
    C, H, W = 3, 4, 4
    w = 0.3 * rng.standard_normal((C, C, 3, 3))
    w[np.arange(C), np.arange(C), 2, 2] = diagonal * rng.choice([-1.0, 1.0], size=C)
    rhs = rng.standard_normal((2, C, H, W))
    M = dense_operator(w, H, W, unit_diagonal=False)
    if adjoint:
        M = M.T
        got = invconv.inv_conv2d_vjp(rhs, rhs, w, unit_diagonal=False, backend="cpu")[0]
    else:
        got = invconv.inv_conv2d(rhs, w, unit_diagonal=False, backend="cpu")
    X, Y = got.reshape(2, -1).T, rhs.reshape(2, -1).T
    assert np.isfinite(X).all() and np.abs(X).max() > 1e10     # the solution did grow
    backward_error = np.abs(M @ X - Y) / (np.abs(M) @ np.abs(X) + np.abs(Y))
    assert backward_error.max() < 1e-12, backward_error.max()


def test_the_emulator_probe_reads_the_program_from_cxx(monkeypatch):
    import shutil
    from invconv import _backends
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    monkeypatch.setenv("CXX", "g++ -O2")          # flags after the program
    assert "emulator" in _backends.names("numpy", available_only=True)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "emulator" not in _backends.names("numpy", available_only=True)
