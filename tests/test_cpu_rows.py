"""Backend "cpu", issue 19: the blocked recurrence on thin images (long rows
and columns), the plan-free walk for large kernels, the plan cache's bound and
the refusal of sizes beyond the working-set bound.  Truths: dense linear
algebra (tests/support.py) and scipy.signal.lfilter."""
import os
import pathlib
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

import invconv
from invconv import _cpu, _cpu_rows, _cpu_walk
from support import CORNERS, dense_operator, dense_weight_grad, make_weight

lfilter = pytest.importorskip("scipy.signal").lfilter

RTOL = {np.float64: 1e-10, np.float32: 5e-5}

# (B, C, H, W, kh, kw, groups): rows, columns (H > W: the transposed case),
# kernels taller than the image, groups, chunks that do not divide the row.
THIN = [
    (2, 1, 1, 301, 1, 5, 1),
    (2, 3, 1, 150, 3, 3, 1),
    (1, 4, 2, 71, 3, 4, 2),
    (2, 2, 90, 2, 4, 3, 1),
    (1, 3, 1, 130, 2, 2, 3),
    (1, 2, 3, 67, 5, 5, 2),
    (3, 1, 97, 1, 6, 2, 1),
    (1, 1, 1, 257, 1, 3, 1),       # one image, one channel: written in place where it can
    (1, 4, 80, 2, 3, 2, 2),        # a column with groups
]


def _close(got, want, rtol):
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want), initial=0.0)) / scale
    assert err <= rtol, err


def _no_fallback():
    raise AssertionError("the reference computed a call with finite inputs and results")


def _force(monkeypatch, blocked):
    calls = []
    real = _cpu_rows.solve

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(_cpu_rows, "chosen", lambda *args: blocked)
    monkeypatch.setattr(_cpu_rows, "solve", spy)
    return calls


@pytest.mark.parametrize("shape", THIN, ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_thin_images_match_dense(monkeypatch, shape, dtype):
    """Inverse and inverse vjp (grad_y and grad_weight) on the blocked path,
    every corner, against dense solves with M and M^T."""
    calls = _force(monkeypatch, True)
    monkeypatch.setattr(_cpu, "_reference", _no_fallback)
    B, C, H, W, kh, kw, groups = shape
    for n, corner in enumerate(CORNERS):
        unit = n % 2 == 1
        rng = np.random.default_rng(n + sum(shape))
        w = make_weight(rng, C, groups, kh, kw, corner, unit)
        y, g = rng.standard_normal((2, B, C, H, W))
        M = dense_operator(w, H, W, corner, groups, unit)
        want = np.linalg.solve(M, y.reshape(B, -1).T).T.reshape(y.shape)
        want_gy = np.linalg.solve(M.T, g.reshape(B, -1).T).T.reshape(y.shape)
        opts = dict(corner=corner, groups=groups, unit_diagonal=unit, backend="cpu")
        wd, yd, gd = (a.astype(dtype) for a in (w, y, g))
        before = yd.copy()
        got = invconv.inv_conv2d(yd, wd, **opts)
        np.testing.assert_array_equal(yd, before)           # inputs never modified
        assert got.dtype == dtype
        _close(got, want, RTOL[dtype])
        x = want.astype(dtype)
        gy, gw = invconv.inv_conv2d_vjp(gd, x, wd, **opts)
        _close(gy, want_gy, RTOL[dtype])
        if n == 0:     # the weight gradient once per shape (its dense truth is slow)
            _close(gw, dense_weight_grad(want_gy, want, w, corner, groups, unit, sign=-1.0),
                   RTOL[dtype])
    assert len(calls) == 2 * len(CORNERS)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(2, 3, 4, 700, 3, 3, 1), (1, 4, 900, 3, 2, 5, 2),
                                   (3, 2, 2, 1000, 1, 7, 2), (1, 1, 1, 5000, 4, 4, 1)], ids=str)
def test_blocked_and_wavefront_agree(monkeypatch, shape, dtype):
    """The same solve by both algorithms (and the adjoint) to rounding."""
    B, C, H, W, kh, kw, groups = shape
    rng = np.random.default_rng(sum(shape))
    for n, corner in enumerate(CORNERS):
        w = make_weight(rng, C, groups, kh, kw, corner, n % 2 == 0, dtype=dtype)
        y = rng.standard_normal((B, C, H, W)).astype(dtype)
        opts = dict(corner=corner, groups=groups, unit_diagonal=n % 2 == 0, backend="cpu")
        results = []
        for blocked in (False, True):
            calls = _force(monkeypatch, blocked)
            results.append((invconv.inv_conv2d(y, w, **opts),
                            invconv.inv_conv2d_vjp(y, y, w, **opts)[0]))
            assert len(calls) == (2 if blocked else 0)
        for a, b in zip(*results):
            _close(a, b.astype(np.float64), RTOL[dtype])


def _lfilter_solve(y, w, corner, axis):
    """The inverse of a 1-channel row (axis -1) or column (axis -2) by lfilter:
    along the image's long side it is x[n] = (y[n] - sum_j a_j x[n - j]) / a_0,
    a_j the tap reading j pixels back (towards the padded side)."""
    kh, kw = w.shape[2:]
    top, left = corner.startswith("top"), corner.endswith("left")
    if axis == -1:
        taps = w[0, 0, kh - 1 if top else 0]                 # the kernel row reading row h
        a = taps[::-1] if left else taps                     # a_j: j pixels towards the pad
        backwards = not left
    else:
        taps = w[0, 0, :, kw - 1 if left else 0]
        a = taps[::-1] if top else taps
        backwards = not top
    series = np.moveaxis(y, axis, -1)
    series = series[..., ::-1] if backwards else series
    x = lfilter([1.0], a.astype(np.float64), series, axis=-1)
    return np.moveaxis(x[..., ::-1] if backwards else x, -1, axis)


@pytest.mark.parametrize("corner", CORNERS)
@pytest.mark.parametrize("axis", [-1, -2])
def test_single_channel_rows_and_columns_match_lfilter(corner, axis):
    rng = np.random.default_rng(3)
    n, k = 20_000, 5
    shape = (2, 1, 1, n) if axis == -1 else (2, 1, n, 1)
    kernel = (3, k) if axis == -1 else (k, 3)                # the other taps never read the image
    w = make_weight(rng, 1, 1, *kernel, corner, unit_diagonal=False)
    y = rng.standard_normal(shape)
    assert _cpu_rows.chosen(2, 1, *shape[2:], *kernel, 1, _cpu._tile(2, 1, *shape[2:], *kernel))
    got = invconv.inv_conv2d(y, w, corner=corner, unit_diagonal=False)
    want = _lfilter_solve(y, w, corner, axis)
    _close(got, want, 1e-12)
    # the adjoint M^T g = x runs the same recurrence from the other end
    opposite = {"top-left": "bottom-right", "top-right": "bottom-left",
                "bottom-left": "top-right", "bottom-right": "top-left"}[corner]
    flipped = w[:, :, ::-1, ::-1]                           # the same taps, read from the other side
    gy = invconv.inv_conv2d_vjp(y, y, w, corner=corner, unit_diagonal=False)[0]
    _close(gy, _lfilter_solve(y, flipped, opposite, axis), 1e-12)


def test_a_long_row_at_the_issue_size_matches_lfilter():
    rng = np.random.default_rng(4)
    w = make_weight(rng, 1, 1, 1, 5)
    y = rng.standard_normal((1, 1, 1, 200_000))
    got = invconv.inv_conv2d(y, w)
    a = w[0, 0, 0, ::-1].copy()
    a[0] = 1.0                                                # the unit diagonal
    want = lfilter([1.0], a, y[0, 0, 0])
    assert np.max(np.abs(got[0, 0, 0] - want)) <= 1e-13 * np.max(np.abs(want))


def test_the_rule_picks_the_blocked_recurrence_only_for_thin_images():
    tile = _cpu._tile
    for B, C, H, W, k in [(1, 1, 1, 200_000, 5), (1, 1, 200_000, 1, 5), (1, 3, 1, 200_000, 5),
                          (1, 1, 2, 4096, 3), (16, 3, 1, 2048, 3)]:
        assert _cpu_rows.chosen(B, C, H, W, k, k, 1, tile(B, C, H, W, k, k)), (B, C, H, W)
    for B, C, H, W, k in [(1, 3, 256, 256, 3), (100, 3, 32, 32, 3), (100, 48, 8, 8, 3),
                          (4, 3, 256, 256, 3), (1, 1, 1, 30, 3), (1, 3, 64, 2048, 3)]:
        assert not _cpu_rows.chosen(B, C, H, W, k, k, 1, tile(B, C, H, W, k, k)), (B, C, H, W)


@pytest.mark.parametrize("op", ["inv_conv2d", "inv_conv2d_vjp"])
def test_blocked_overflow_falls_back_to_the_reference(monkeypatch, op):
    """A 1 x 2 kernel: four independent rows, row 0 grows x10 a column and
    overflows float32.  The blocked path mixes rows in its chunk operators
    (exact zeros times Inf are NaN), so its result is not finite and the call
    is redone by the reference: finite rows stay finite and exact."""
    calls = _force(monkeypatch, True)
    w = np.zeros((1, 1, 1, 2), dtype=np.float32)
    w[0, 0, 0, 0] = -10.0
    image = np.zeros((1, 1, 4, 30), dtype=np.float32)       # rows 1-3 stay below 1e30
    if op == "inv_conv2d":
        image[0, 0, :, 0] = [1e30, 1, 1, 1]
        args = (image, w)
    else:
        image[0, 0, :, -1] = [1e30, 1, 1, 1]
        args = (image, np.ones_like(image), w)
    f = getattr(invconv, op)
    with np.errstate(over="ignore", invalid="ignore"):
        got, want = f(*args, backend="cpu"), f(*args, backend="reference")
    assert calls                                             # the blocked path ran first
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b))
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
        finite = np.isfinite(b)
        np.testing.assert_allclose(a[finite], b[finite], rtol=1e-5)
    solution = got[0] if isinstance(got, tuple) else got
    assert np.isfinite(solution[0, 0, 1:]).all() and not np.isfinite(solution[0, 0, 0]).all()


def test_non_finite_input_on_a_long_row_reaches_what_the_reference_reaches():
    rng = np.random.default_rng(5)
    w = make_weight(rng, 2, 1, 1, 3, "top-right", False)
    y = rng.standard_normal((1, 2, 1, 400))
    y[0, 1, 0, 200] = np.nan
    got = invconv.inv_conv2d(y, w, corner="top-right", unit_diagonal=False)
    want = invconv.inv_conv2d(y, w, corner="top-right", unit_diagonal=False, backend="reference")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(want).any() and np.isfinite(want).any()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------
# large kernels: the plan-free walk, the cache bound, the refusal


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (4, 4)], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 3, 3, 1), (1, 4, 6, 9, 4, 2, 2),
                                   (3, 1, 7, 5, 6, 5, 1)], ids=str)
def test_the_plan_free_walk_matches_dense(monkeypatch, shape, tile):
    monkeypatch.setattr(_cpu, "_PLAN_MAX_BYTES", 0)           # every plan too large: the walk
    monkeypatch.setattr(_cpu, "_tile", lambda *args: tile)
    monkeypatch.setattr(_cpu, "_reference", _no_fallback)
    monkeypatch.setattr(_cpu_rows, "chosen", lambda *args: False)
    monkeypatch.setattr(_cpu, "_Plan", None)                  # no plan is built
    B, C, H, W, kh, kw, groups = shape
    for n, corner in enumerate(CORNERS):
        unit = n % 2 == 0
        rng = np.random.default_rng(n + sum(shape))
        w = make_weight(rng, C, groups, kh, kw, corner, unit)
        y = rng.standard_normal((B, C, H, W))
        M = dense_operator(w, H, W, corner, groups, unit)
        opts = dict(corner=corner, groups=groups, unit_diagonal=unit, backend="cpu")
        _close(invconv.inv_conv2d(y, w, **opts),
               np.linalg.solve(M, y.reshape(B, -1).T).T.reshape(y.shape), RTOL[np.float64])
        _close(invconv.inv_conv2d_vjp(y, y, w, **opts)[0],
               np.linalg.solve(M.T, y.reshape(B, -1).T).T.reshape(y.shape), RTOL[np.float64])


def test_the_walk_never_reads_the_tile_overhang(monkeypatch):
    """As test_cpu's overhang test, on the walk: x[w] = y[w] - 10 x[w-1] grows
    past float32 in the 7 overhang columns of a 1 x 8 tile on a 9-wide image."""
    monkeypatch.setattr(_cpu, "_PLAN_MAX_BYTES", 0)
    monkeypatch.setattr(_cpu, "_tile", lambda *args: (1, 8))
    monkeypatch.setattr(_cpu, "_reference", _no_fallback)
    w = np.zeros((1, 1, 2, 2), dtype=np.float32)
    w[0, 0, 1, 0] = 10.0
    y = np.zeros((1, 1, 2, 9), dtype=np.float32)
    y[0, 0, :, 0] = 1e30
    want = invconv.inv_conv2d(y, w, backend="reference")
    np.testing.assert_allclose(invconv.inv_conv2d(y, w, backend="cpu"), want, rtol=1e-5)


def test_a_large_kernel_runs_in_bounded_memory(monkeypatch):
    """k = 31 on 96 x 96: its gather plan (8 MB) is 75 times the image.  With
    the plan bound below it the walk runs: it allocates a few images and the
    fold, less than that plan alone, and caches nothing."""
    rng = np.random.default_rng(6)
    C, N, k = 3, 96, 31
    w = make_weight(rng, C, 1, k, k, dtype=np.float32)
    y = rng.standard_normal((1, C, N, N)).astype(np.float32)
    th, tw = _cpu._tile(1, C, N, N, k, k)
    plan = _cpu._plan_bytes(C, N, N, k, k, th, tw)
    assert plan > 50 * y.nbytes
    monkeypatch.setattr(_cpu, "_PLAN_MAX_BYTES", plan // 2)
    monkeypatch.setattr(_cpu, "_Plan", None)                  # no plan is built
    _cpu._plans.clear()
    _cpu._plans_bytes[0] = 0
    tracemalloc.start()
    try:
        got = invconv.inv_conv2d(y, w)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < plan, (peak, plan)
    bound = 8 * y.nbytes + _cpu._fold_bytes(C, k, k, th, tw) + _cpu_walk._STEP_BYTES
    assert peak <= bound, (peak, bound)
    assert len(_cpu._plans) == 0 or _cpu._plans_bytes[0] <= _cpu._PLAN_BYTES
    want = invconv.inv_conv2d(y.astype(np.float64), w.astype(np.float64), backend="reference")
    _close(got, want, RTOL[np.float32])


def test_the_plan_cache_bound_holds_with_one_oversized_plan(monkeypatch):
    rng = np.random.default_rng(7)
    w = make_weight(rng, 2, 1, 2, 2)
    _cpu._plans.clear()
    _cpu._plans_bytes[0] = 0
    small, large = rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((1, 2, 40, 40))
    invconv.inv_conv2d(small, w)
    kept = _cpu._plans_bytes[0]
    assert len(_cpu._plans) == 1 and kept > 0
    monkeypatch.setattr(_cpu, "_PLAN_BYTES", 4 * kept)       # the large shape's plan is over it
    th, tw = _cpu._tile(1, 2, 40, 40, 2, 2)
    assert _cpu._plan_bytes(2, 40, 40, 2, 2, th, tw) > 4 * kept
    for _ in range(2):
        _close(invconv.inv_conv2d(large, w), invconv.inv_conv2d(large, w, backend="reference"),
               1e-10)
        assert _cpu._plans_bytes[0] <= _cpu._PLAN_BYTES
        assert _cpu._plans_bytes[0] == sum(p.nbytes for p in _cpu._plans.values())
        assert len(_cpu._plans) == 1                         # the small plan stays, alone


def test_the_plan_size_formula_is_exact():
    for key in [(3, 17, 23, 3, 3, 4, 4), (2, 5, 9, 4, 2, 1, 8), (1, 7, 7, 1, 1, 2, 2)]:
        assert _cpu._Plan(*key).nbytes == _cpu._plan_bytes(*key)


def test_a_size_beyond_the_bound_is_refused_before_allocating():
    """32 channels and a 64 x 64 kernel on a 64 x 64 image: even on 1 x 1
    tiles the fold needs more than _WORK_BYTES.  Refused in well under a
    second, naming the sizes, having allocated little beyond the inputs."""
    rng = np.random.default_rng(8)
    C, N, k = 32, 64, 64
    w = (rng.uniform(-1, 1, (C, C, k, k)) * 1e-4).astype(np.float32)
    y = rng.standard_normal((1, C, N, N)).astype(np.float32)
    assert _cpu._fold_bytes(C, k, k, 1, 1) > _cpu._WORK_BYTES
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(MemoryError, match=r"1x32x64x64 images with a 64x64 kernel") as info:
            invconv.inv_conv2d(y, w)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert "MiB" in str(info.value) and "_WORK_BYTES" in str(info.value)
    assert peak <= 3 * w.nbytes + 2 * y.nbytes, peak / w.nbytes   # the masked blocks, no fold


def test_long_rows_benchmark_quick(tmp_path):
    """bench/long_rows.py runs as a user runs it (a subprocess) and writes rows."""
    import json
    root = pathlib.Path(__file__).resolve().parents[1]
    src = str(pathlib.Path(invconv.__file__).resolve().parents[1])
    out, md = tmp_path / "rows.json", tmp_path / "rows.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(root / "bench" / "long_rows.py"), "--quick",
                           "--only", "row 1x1x1x20000", "--src", src, "--out", str(out),
                           "--markdown", str(md)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, = json.loads(out.read_text())["rows"]
    assert row["first_s"] > 0 and row["repeated_s"] > 0 and row["lfilter_s"] > 0
    assert row["err_vs_lfilter"] < 1e-12
    assert "| row 1x1x1x20000 |" in md.read_text()
