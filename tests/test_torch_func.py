"""Forward-mode AD and torch.func transforms through the PyTorch ops and layers.

The truths: the dense matrix of the operator (tests/support.py), finite
differences, and explicit loops.  The weight direction of M(W) is checked
against dense_operator(dW) - dense_operator(0), which drops the entries the
convention ignores (and the constant unit diagonal) by construction.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402
import invconv.torch as it  # noqa: E402
from invconv import _api  # noqa: E402
from support import dense_operator, make_weight  # noqa: E402

F64 = torch.float64
C, H, W = 3, 3, 4
# (corner, groups, unit_diagonal): every corner once, both group counts and
# both diagonals.
CASES = [("top-left", 1, True), ("top-right", 3, False), ("bottom-left", 1, False),
         ("bottom-right", 3, True), ("top-left", 3, False), ("bottom-right", 1, True)]
OPS = {"conv2d": it.conv2d, "inv_conv2d": it.inv_conv2d}


def _weight(corner, groups, unit, seed=0, k=2):
    rng = np.random.default_rng(seed)
    return torch.tensor(make_weight(rng, C, groups, k, k, corner, unit), dtype=F64)


def _direction(shape, seed):
    """A tangent with values everywhere, also where the convention ignores the weight."""
    return torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


class _Dense:
    """The operator of one case as a matrix, and its derivative along dW."""

    def __init__(self, weight, corner, groups, unit):
        self.opts = dict(corner=corner, groups=groups, unit_diagonal=unit)
        self.M = dense_operator(weight.numpy(), H, W, corner, groups, unit)
        self.base = dense_operator(np.zeros(weight.shape), H, W, corner, groups, unit)

    def dM(self, dweight):
        return dense_operator(dweight.numpy(), H, W, self.opts["corner"], self.opts["groups"],
                              self.opts["unit_diagonal"]) - self.base

    def matrix(self, name):
        return self.M if name == "conv2d" else np.linalg.inv(self.M)

    def tangent(self, name, x, dx, dweight):
        """d(op(x, W)) for directions dx and dweight, shape of x."""
        B = x.shape[0]
        X, dX = x.reshape(B, -1).numpy(), dx.reshape(B, -1).numpy()
        if name == "conv2d":
            out = dX @ self.M.T + X @ self.dM(dweight).T
        else:  # x = M^-1 y: dx = M^-1 (dy - dM x)
            Minv = np.linalg.inv(self.M)
            out = (dX - (X @ Minv.T) @ self.dM(dweight).T) @ Minv.T
        return torch.from_numpy(out.reshape(x.shape))


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("corner,groups,unit", CASES)
def test_jvp_matches_dense(name, corner, groups, unit):
    w = _weight(corner, groups, unit)
    dense = _Dense(w, corner, groups, unit)
    x, dx, dw = torch.randn(2, C, H, W, dtype=F64), _direction((2, C, H, W), 1), _direction(w.shape, 2)
    op = OPS[name]
    zero_x, zero_w = torch.zeros_like(x), torch.zeros_like(w)

    def f(a, b):
        return op(a, b, **dense.opts)

    out, by_x = torch.func.jvp(lambda a: f(a, w), (x,), (dx,))
    _assert_close(out, torch.from_numpy(
        (x.reshape(2, -1).numpy() @ dense.matrix(name).T).reshape(x.shape)))
    _assert_close(by_x, dense.tangent(name, x, dx, zero_w))
    _, by_w = torch.func.jvp(lambda b: f(x, b), (w,), (dw,))
    expected_w = dense.tangent(name, x, zero_x, dw)
    assert expected_w.abs().max() > 1e-3  # the weight direction does move the output
    _assert_close(by_w, expected_w)
    _, both = torch.func.jvp(f, (x, w), (dx, dw))
    _assert_close(both, dense.tangent(name, x, dx, dw))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("corner,groups,unit", CASES[:2])
def test_forward_ad_dual_numbers_match_dense(name, corner, groups, unit):
    w = _weight(corner, groups, unit)
    dense = _Dense(w, corner, groups, unit)
    x, dx, dw = torch.randn(2, C, H, W, dtype=F64), _direction((2, C, H, W), 3), _direction(w.shape, 4)
    with fwAD.dual_level():
        out = OPS[name](fwAD.make_dual(x, dx), fwAD.make_dual(w, dw), **dense.opts)
        tangent = fwAD.unpack_dual(out).tangent
        # Under no_grad too: forward AD does not depend on the grad mode.
        with torch.no_grad():
            out_ng = OPS[name](fwAD.make_dual(x, dx), w, **dense.opts)
            tangent_ng = fwAD.unpack_dual(out_ng).tangent
    assert tangent is not None and tangent_ng is not None
    _assert_close(tangent, dense.tangent(name, x, dx, dw))
    _assert_close(tangent_ng, dense.tangent(name, x, dx, torch.zeros_like(w)))


def test_ignored_weight_entries_of_a_tangent_never_reach_the_output():
    # NaN where the convention ignores the weight (upper same-pixel block, and
    # the unit diagonal): the tangent is replaced there, never multiplied.
    for corner, groups, unit in CASES[:2]:
        w = _weight(corner, groups, unit)
        conv = _api.make_conv(tuple(w.shape), corner=corner, groups=groups,
                              unit_diagonal=unit)
        dw = _direction(w.shape, 5)
        dw_nan = dw.clone()
        dw_nan[torch.from_numpy(conv.ignored_mask())] = float("nan")
        x = torch.randn(1, C, H, W, dtype=F64)
        for op in OPS.values():
            f = lambda b: op(x, b, corner=corner, groups=groups, unit_diagonal=unit)  # noqa: E731
            _, clean = torch.func.jvp(f, (w,), (dw,))
            _, dirty = torch.func.jvp(f, (w,), (dw_nan,))
            torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("corner,groups,unit", [CASES[1], CASES[3]])
def test_jacfwd_jacrev_and_dense_agree(name, corner, groups, unit):
    w = _weight(corner, groups, unit)
    dense = _Dense(w, corner, groups, unit)
    x = torch.randn(1, C, H, W, dtype=F64)
    n = C * H * W

    def f(a, b):
        return OPS[name](a, b, **dense.opts)

    fwd_x, fwd_w = torch.func.jacfwd(f, argnums=(0, 1))(x, w)
    rev_x, rev_w = torch.func.jacrev(f, argnums=(0, 1))(x, w)
    _assert_close(fwd_x.reshape(n, n), torch.from_numpy(dense.matrix(name)))
    _assert_close(rev_x, fwd_x)
    # Weight Jacobian column by column: d out / d W_e = (dense tangent along e_e).
    expected_w = torch.zeros(n, w.numel(), dtype=F64)
    for e in range(w.numel()):
        onehot = torch.zeros(w.numel(), dtype=F64)
        onehot[e] = 1
        expected_w[:, e] = dense.tangent(name, x, torch.zeros_like(x),
                                         onehot.reshape(w.shape)).reshape(-1)
    _assert_close(fwd_w.reshape(n, -1), expected_w)
    _assert_close(rev_w, fwd_w)


@pytest.mark.parametrize("name", OPS)
def test_func_grad_matches_autograd(name):
    corner, groups, unit = CASES[2]
    w = _weight(corner, groups, unit)
    x = torch.randn(2, C, H, W, dtype=F64)
    r = torch.randn(2, C, H, W, dtype=F64)
    opts = dict(corner=corner, groups=groups, unit_diagonal=unit)

    def loss(a, b):
        return (OPS[name](a, b, **opts) * r).sum()

    gx, gw = torch.func.grad(loss, argnums=(0, 1))(x, w)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    ex, ew = torch.autograd.grad(loss(xa, wa), (xa, wa))
    _assert_close(gx, ex)
    _assert_close(gw, ew)
    # and against the dense operator: d<r, M x>/dx = M^T r
    dense = _Dense(w, corner, groups, unit)
    expected = r.reshape(2, -1).numpy() @ dense.matrix(name)
    _assert_close(gx, torch.from_numpy(expected.reshape(x.shape)))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("batched", ["x", "weight", "both"])
def test_vmap_matches_a_loop(name, batched):
    corner, groups, unit = CASES[1]
    n = 3
    ws = torch.stack([_weight(corner, groups, unit, seed=s) for s in range(n)])
    xs = torch.randn(n, 2, C, H, W, dtype=F64)
    opts = dict(corner=corner, groups=groups, unit_diagonal=unit)
    f = lambda a, b: OPS[name](a, b, **opts)  # noqa: E731
    in_dims = {"x": (0, None), "weight": (None, 0), "both": (0, 0)}[batched]
    args = (xs if in_dims[0] is not None else xs[0], ws if in_dims[1] is not None else ws[0])
    out = torch.func.vmap(f, in_dims=in_dims)(*args)
    loop = torch.stack([f(args[0][i] if in_dims[0] is not None else args[0],
                          args[1][i] if in_dims[1] is not None else args[1]) for i in range(n)])
    _assert_close(out, loop)
    # A vmapped dimension that is not the first one.
    out_moved = torch.func.vmap(f, in_dims=tuple(None if d is None else 2 for d in in_dims))(
        *(a.movedim(0, 2) if d is not None else a for a, d in zip(args, in_dims)))
    _assert_close(out_moved, loop)


def test_vmap_of_gradients_uses_the_backward_ops():
    # Per-sample weight gradients: vmap(grad) runs the adjoint and weight-gradient
    # ops under vmap.
    corner, groups, unit = CASES[3]
    w = _weight(corner, groups, unit)
    xs = torch.randn(4, 1, C, H, W, dtype=F64)
    opts = dict(corner=corner, groups=groups, unit_diagonal=unit)
    for op in OPS.values():
        loss = lambda b, a: op(a, b, **opts).square().sum()  # noqa: E731
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, xs)
        loop = torch.stack([torch.func.grad(loss)(w, xs[i]) for i in range(4)])
        _assert_close(per_sample, loop)


@pytest.mark.parametrize("name", ["conv2d_op", "inv_conv2d_op", "conv2d_adjoint_op",
                                  "inv_conv2d_adjoint_op"])
def test_gradcheck_all_modes_on_the_image_ops(name):
    # Reverse, forward, batched (vmap) and second derivatives against finite
    # differences, for the backward ops too: the formulas of each derivative
    # are the ops again, so derivatives of derivatives exist.
    op = getattr(it, name)
    for corner, groups, unit in CASES[:4]:
        w = _weight(corner, groups, unit).requires_grad_()
        x = torch.randn(1, C, 2, 3, dtype=F64, requires_grad=True)
        f = lambda a, b: op(a, b, corner, groups, unit)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w), check_forward_ad=True,
                                        check_batched_grad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(f, (x, w), check_fwd_over_rev=True,
                                            check_rev_over_rev=True)


def test_gradcheck_all_modes_on_the_weight_gradient_op():
    for corner, groups, unit in CASES[:4]:
        w = _weight(corner, groups, unit)
        g = torch.randn(1, C, 2, 3, dtype=F64, requires_grad=True)
        x = torch.randn(1, C, 2, 3, dtype=F64, requires_grad=True)
        f = lambda a, b: it.conv2d_weight_grad_op(a, b, w, -1.0, corner, groups, unit)  # noqa: E731
        assert torch.autograd.gradcheck(f, (g, x), check_forward_ad=True,
                                        check_batched_grad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(f, (g, x), check_fwd_over_rev=True)


def test_hessian_forward_over_reverse_matches_reverse_over_reverse():
    corner, groups, unit = CASES[1]
    w = _weight(corner, groups, unit)
    y = torch.randn(1, C, H, W, dtype=F64)

    def nll(b):  # a Gaussian negative log-likelihood of z = M(b)^-1 y, as in a flow
        return 0.5 * it.inv_conv2d(y, b, corner=corner, groups=groups,
                                   unit_diagonal=unit).square().sum()

    fwd = torch.func.jacfwd(torch.func.jacrev(nll))(w)
    rev = torch.func.jacrev(torch.func.jacrev(nll))(w)
    assert fwd.abs().max() > 1e-3
    _assert_close(fwd, rev)
    _assert_close(fwd.reshape(w.numel(), -1), fwd.reshape(w.numel(), -1).T)


# -- layers ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [it.InvConv2d, it.MaskedConv2d])
@pytest.mark.parametrize("learn", [False, True])
def test_layers_under_jvp_match_finite_differences(cls, learn):
    torch.manual_seed(0)
    layer = cls(C, 3, corner="bottom-left", groups=1, learn_diagonal=learn, init_std=0.1).double()
    if learn:
        with torch.no_grad():
            layer.log_diag.uniform_(-0.3, 0.3)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    directions = {k: _direction(v.shape, i) for i, (k, v) in enumerate(params.items())}
    x = torch.randn(2, C, H, W, dtype=F64)
    dx = _direction(x.shape, 10)

    def f(p, a):
        return torch.func.functional_call(layer, p, (a,))

    (z, ld), (dz, dld) = torch.func.jvp(f, (params, x), (directions, dx))
    h = 1e-6
    plus = f({k: v + h * directions[k] for k, v in params.items()}, x + h * dx)
    minus = f({k: v - h * directions[k] for k, v in params.items()}, x - h * dx)
    torch.testing.assert_close(dz, (plus[0] - minus[0]) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dld, (plus[1] - minus[1]) / (2 * h), rtol=1e-6, atol=1e-7)
    assert dz.abs().max() > 1e-3
    # the tangent of a round trip is the input tangent
    _, (dround, _) = torch.func.jvp(lambda a: layer.inverse(layer(a)[0]), (x,), (dx,))
    torch.testing.assert_close(dround, dx)



def test_jvp_inside_torch_compile_fullgraph_matches_dense():
    corner, groups, unit = CASES[1]
    w = _weight(corner, groups, unit)
    dense = _Dense(w, corner, groups, unit)
    x, dx, dw = torch.randn(2, C, H, W, dtype=F64), _direction((2, C, H, W), 6), _direction(w.shape, 7)

    def tangent(a, b, da, db):
        return torch.func.jvp(lambda p, q: it.inv_conv2d(p, q, **dense.opts), (a, b), (da, db))[1]

    compiled = torch.compile(tangent, fullgraph=True)
    _assert_close(compiled(x, w, dx, dw), dense.tangent("inv_conv2d", x, dx, dw))
