"""Every op against dense linear algebra on small shapes (the independent truth)."""
import functools
import zlib

import numpy as np
import pytest

import invconv
from support import (CORNERS, assert_close, dense_operator, dense_weight_grad,
                     make_weight)

# (B, C, H, W, kh, kw): odd sizes, H != W, kh != kw, 1x1 images, kernels
# larger than the image, C in {1, 2, 3, 5}.
SHAPES = [
    (2, 1, 4, 5, 3, 3),
    (2, 2, 3, 4, 2, 3),
    (1, 3, 5, 3, 3, 2),
    (2, 5, 3, 3, 2, 2),
    (1, 2, 2, 3, 4, 5),
    (2, 3, 1, 1, 3, 3),
    (1, 2, 3, 2, 1, 1),
]


def _cases():
    for shape in SHAPES:
        C = shape[1]
        for groups in sorted({1, C}):
            for corner in CORNERS:
                for unit in (True, False):
                    yield shape, corner, groups, unit


CASES = list(_cases())


def _case_id(case):
    (B, C, H, W, kh, kw), corner, groups, unit = case
    return f"{B}x{C}x{H}x{W}-k{kh}x{kw}-{corner}-g{groups}-{'unit' if unit else 'diag'}"


@functools.lru_cache(maxsize=None)
def expected(case):
    (B, C, H, W, kh, kw), corner, groups, unit = case
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))
    weight = make_weight(rng, C, groups, kh, kw, corner, unit)
    x = rng.standard_normal((B, C, H, W))
    g = rng.standard_normal((B, C, H, W))
    M = dense_operator(weight, H, W, corner, groups, unit)
    X, G = x.reshape(B, -1), g.reshape(B, -1)
    inv_x = np.linalg.solve(M, X.T).T              # x with M x = (the draw)
    gy = np.linalg.solve(M.T, G.T).T               # M^-T g
    return dict(
        weight=weight, x=x, g=g,
        conv=(X @ M.T).reshape(x.shape),
        inv=inv_x.reshape(x.shape),
        conv_grad_x=(G @ M).reshape(x.shape),
        conv_grad_w=dense_weight_grad(g, x, weight, corner, groups, unit),
        inv_grad_y=gy.reshape(x.shape),
        inv_grad_w=dense_weight_grad(gy.reshape(x.shape), inv_x.reshape(x.shape),
                                     weight, corner, groups, unit, sign=-1.0),
        logdet=np.linalg.slogdet(M)[1],
    )


@pytest.fixture(params=CASES, ids=[_case_id(c) for c in CASES])
def case(request):
    return request.param


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ops_match_dense(case, dtype, backend):
    _, corner, groups, unit = case
    e = expected(case)
    opts = dict(corner=corner, groups=groups, unit_diagonal=unit, backend=backend)
    w, x, g = (e[k].astype(dtype) for k in ("weight", "x", "g"))

    y = invconv.conv2d(x, w, **opts)
    inv = invconv.inv_conv2d(x, w, **opts)
    assert_close(y, e["conv"], dtype)
    assert_close(inv, e["inv"], dtype)

    gx, conv_gw = invconv.conv2d_vjp(g, x, w, **opts)
    assert_close(gx, e["conv_grad_x"], dtype)
    assert_close(conv_gw, e["conv_grad_w"], dtype)

    inv_x = e["inv"].astype(dtype)
    gy, inv_gw = invconv.inv_conv2d_vjp(g, inv_x, w, **opts)
    assert_close(gy, e["inv_grad_y"], dtype)
    assert_close(inv_gw, e["inv_grad_w"], dtype)

    for out in (y, inv, gx, gy):
        assert out.dtype == dtype and out.shape == x.shape
    for out in (conv_gw, inv_gw):
        assert out.dtype == dtype and out.shape == w.shape


def test_logdet_matches_slogdet(case):
    (B, C, H, W, kh, kw), corner, groups, unit = case
    e = expected(case)
    got = invconv.logdet(e["weight"], H, W, corner=corner, groups=groups, unit_diagonal=unit)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, e["logdet"], atol=1e-9)


def test_operator_matches_dense(case):
    (B, C, H, W, kh, kw), corner, groups, unit = case
    e = expected(case)
    M = invconv.reference.operator(e["weight"], H, W, corner=corner, groups=groups,
                                   unit_diagonal=unit)
    np.testing.assert_array_equal(M.toarray(), dense_operator(e["weight"], H, W, corner,
                                                              groups, unit))
