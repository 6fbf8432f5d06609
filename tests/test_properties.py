"""Properties that hold for every shape and option: hypothesis draws them."""
import numpy as np
from hypothesis import given, strategies as st

import invconv
from support import CORNERS, assert_close, ignored_entries, make_weight


@st.composite
def problems(draw, max_hw=7, max_k=4):
    C = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    return dict(
        B=draw(st.integers(1, 3)), C=C, groups=groups,
        H=draw(st.integers(1, max_hw)), W=draw(st.integers(1, max_hw)),
        kh=draw(st.integers(1, max_k)), kw=draw(st.integers(1, max_k)),
        corner=draw(st.sampled_from(CORNERS)), unit=draw(st.booleans()),
        dtype=draw(st.sampled_from([np.float64, np.float32])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def setup(p, junk=7.0):
    rng = np.random.default_rng(p["seed"])
    w = make_weight(rng, p["C"], p["groups"], p["kh"], p["kw"], p["corner"], p["unit"],
                    p["dtype"], junk=junk)
    shape = (p["B"], p["C"], p["H"], p["W"])
    x = rng.standard_normal(shape).astype(p["dtype"])
    g = rng.standard_normal(shape).astype(p["dtype"])
    opts = dict(corner=p["corner"], groups=p["groups"], unit_diagonal=p["unit"])
    return rng, w, x, g, opts


def vdot(a, b):
    return float(np.vdot(a.astype(np.float64), b.astype(np.float64)))


@given(problems())
def test_round_trips(backend, p):
    _, w, x, _, opts = setup(p)
    y = invconv.conv2d(x, w, backend=backend, **opts)
    assert_close(invconv.inv_conv2d(y, w, backend=backend, **opts), x)
    assert_close(invconv.conv2d(invconv.inv_conv2d(x, w, backend=backend, **opts), w,
                                backend=backend, **opts), x)


@given(problems())
def test_adjoint_dot_products(backend, p):
    _, w, x, g, opts = setup(p)
    lhs = vdot(invconv.conv2d(x, w, backend=backend, **opts), g)
    rhs = vdot(x, invconv.conv2d_vjp(g, x, w, backend=backend, **opts)[0])
    assert_close(lhs, rhs, p["dtype"], scale=10)
    inv = invconv.inv_conv2d(x, w, backend=backend, **opts)
    lhs = vdot(inv, g)
    rhs = vdot(x, invconv.inv_conv2d_vjp(g, inv, w, backend=backend, **opts)[0])
    assert_close(lhs, rhs, p["dtype"], scale=10)


@given(problems(max_hw=5, max_k=3))
def test_weight_grad_finite_differences(backend, p):
    p = dict(p, dtype=np.float64)
    rng, w, x, g, opts = setup(p)
    direction = rng.standard_normal(w.shape) * 0.01
    direction[ignored_entries(p["C"], p["groups"], p["kh"], p["kw"], p["corner"],
                              p["unit"])] = 0
    eps = 1e-5

    def inv_loss(weight):
        return vdot(invconv.inv_conv2d(x, weight, backend=backend, **opts), g)

    def conv_loss(weight):
        return vdot(invconv.conv2d(x, weight, backend=backend, **opts), g)

    inv_x = invconv.inv_conv2d(x, w, backend=backend, **opts)
    _, gw_inv = invconv.inv_conv2d_vjp(g, inv_x, w, backend=backend, **opts)
    _, gw_conv = invconv.conv2d_vjp(g, x, w, backend=backend, **opts)
    for loss, gw in ((inv_loss, gw_inv), (conv_loss, gw_conv)):
        fd = (loss(w + eps * direction) - loss(w - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(vdot(gw, direction), fd, rtol=1e-6, atol=1e-8)


@given(problems())
def test_ignored_entries_are_never_read(backend, p):
    _, w, x, g, opts = setup(p, junk=np.nan)
    clean = np.where(np.isnan(w), 0, w)
    mask = np.isnan(w)
    for op in (invconv.conv2d, invconv.inv_conv2d):
        np.testing.assert_array_equal(op(x, w, backend=backend, **opts),
                                      op(x, clean, backend=backend, **opts))
    for vjp in (invconv.conv2d_vjp, invconv.inv_conv2d_vjp):
        gx, gw = vjp(g, x, w, backend=backend, **opts)
        gx2, gw2 = vjp(g, x, clean, backend=backend, **opts)
        np.testing.assert_array_equal(gx, gx2)
        np.testing.assert_array_equal(gw, gw2)
        assert np.all(gw[mask] == 0)


def _flip(corner):
    """Axes of (H, W) to flip to turn ``corner`` into "top-left"."""
    return (() if corner.startswith("top") else (2,)) + (() if corner.endswith("left") else (3,))


@given(problems())
def test_corners_are_flips_of_top_left(backend, p):
    _, w, x, g, opts = setup(p)
    axes = _flip(p["corner"])
    flip = lambda a: np.flip(a, axes) if axes else a  # noqa: E731
    tl = dict(opts, corner="top-left")
    for op in (invconv.conv2d, invconv.inv_conv2d):
        assert_close(op(x, w, backend=backend, **opts),
                     flip(op(flip(x), flip(w), backend=backend, **tl)))
    for vjp in (invconv.conv2d_vjp, invconv.inv_conv2d_vjp):
        gx, gw = vjp(g, x, w, backend=backend, **opts)
        gx_tl, gw_tl = vjp(flip(g), flip(x), flip(w), backend=backend, **tl)
        assert_close(gx, flip(gx_tl))
        assert_close(gw, flip(gw_tl))


@given(problems())
def test_groups_are_block_diagonal(backend, p):
    _, w, x, g, opts = setup(p)
    G, cg = p["groups"], p["C"] // p["groups"]
    one = dict(opts, groups=1)
    sl = [slice(k * cg, (k + 1) * cg) for k in range(G)]
    for op in (invconv.conv2d, invconv.inv_conv2d):
        parts = [op(x[:, s], w[s], backend=backend, **one) for s in sl]
        assert_close(op(x, w, backend=backend, **opts), np.concatenate(parts, axis=1))
    for vjp in (invconv.conv2d_vjp, invconv.inv_conv2d_vjp):
        gx, gw = vjp(g, x, w, backend=backend, **opts)
        parts = [vjp(g[:, s], x[:, s], w[s], backend=backend, **one) for s in sl]
        assert_close(gx, np.concatenate([q[0] for q in parts], axis=1))
        assert_close(gw, np.concatenate([q[1] for q in parts], axis=0))
