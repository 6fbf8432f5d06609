"""conv2d against other libraries' convolutions, and the sparse operator's layout."""
import numpy as np
import pytest
import scipy.signal

import invconv
from support import CORNERS, assert_close, make_weight, pads

CASES = [(2, 3, 6, 5, 3, 3, 1), (1, 4, 4, 7, 2, 4, 2), (2, 4, 3, 3, 5, 2, 4), (1, 1, 1, 1, 3, 3, 1)]


def effective(w, corner, groups, unit):
    """W_eff written out directly from the convention (for the comparisons)."""
    C, cg, kh, kw = w.shape
    left, _, top, _ = pads(corner, kh, kw)
    w = w.copy()
    for o in range(C):
        for il in range(cg):
            if il > o % cg:
                w[o, il, top, left] = 0
            elif il == o % cg and unit:
                w[o, il, top, left] = 1
    return w


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("corner", CORNERS)
@pytest.mark.parametrize("unit", [True, False])
def test_conv2d_matches_torch(case, corner, unit, backend):
    torch = pytest.importorskip("torch")
    B, C, H, W, kh, kw, groups = case
    rng = np.random.default_rng(1)
    w = make_weight(rng, C, groups, kh, kw, corner, unit)
    x = rng.standard_normal((B, C, H, W))
    xt = torch.nn.functional.pad(torch.from_numpy(x), pads(corner, kh, kw))
    expected = torch.nn.functional.conv2d(xt, torch.from_numpy(effective(w, corner, groups, unit)),
                                          groups=groups).numpy()
    got = invconv.conv2d(x, w, corner=corner, groups=groups, unit_diagonal=unit,
                         backend=backend)
    assert_close(got, expected)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("corner", CORNERS)
def test_conv2d_matches_scipy_correlate(case, corner):
    B, C, H, W, kh, kw, groups = case
    rng = np.random.default_rng(2)
    w = make_weight(rng, C, groups, kh, kw, corner, unit_diagonal=False)
    x = rng.standard_normal((B, C, H, W))
    left, right, top, bottom = pads(corner, kh, kw)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    weff = effective(w, corner, groups, False)
    cg = C // groups
    expected = np.zeros_like(x)
    for b in range(B):
        for o in range(C):
            for il in range(cg):
                expected[b, o] += scipy.signal.correlate(xp[b, (o // cg) * cg + il], weff[o, il],
                                                         mode="valid")
    got = invconv.conv2d(x, w, corner=corner, groups=groups, unit_diagonal=False)
    assert_close(got, expected)


def test_operator_layout_follows_reshape():
    rng = np.random.default_rng(3)
    w = make_weight(rng, 3, 1, 3, 2, "bottom-right", unit_diagonal=False)
    x = rng.standard_normal((2, 3, 4, 5))
    M = invconv.reference.operator(w, 4, 5, corner="bottom-right", unit_diagonal=False)
    assert M.shape == (60, 60) and M.dtype == np.float64
    y = invconv.conv2d(x, w, corner="bottom-right", unit_diagonal=False)
    for b in range(2):
        assert_close(M @ x.reshape(2, -1)[b], y.reshape(2, -1)[b])


def test_operator_rejects_bad_sizes():
    w = np.zeros((1, 1, 2, 2))
    with pytest.raises(ValueError, match="height must be >= 1"):
        invconv.reference.operator(w, 0, 3)
    with pytest.raises(TypeError, match="width must be an integer"):
        invconv.reference.operator(w, 3, 2.5)


def test_reference_twins_have_the_public_signatures():
    import inspect
    for name in ["conv2d", "inv_conv2d", "conv2d_vjp", "inv_conv2d_vjp", "logdet"]:
        public = inspect.signature(getattr(invconv, name)).parameters
        twin = inspect.signature(getattr(invconv.reference, name)).parameters
        assert list(twin) == [p for p in public if p not in ("backend", "stream")]
