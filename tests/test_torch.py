"""The PyTorch adapters: custom ops, autograd, torch.compile, and the layers."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import invconv  # noqa: E402
import invconv.torch as it  # noqa: E402
from support import CORNERS, dense_operator, make_weight  # noqa: E402


def _weight(C, groups, k, corner, unit, seed=0, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    return torch.tensor(make_weight(rng, C, groups, k, k, corner, unit), dtype=dtype)


@pytest.mark.parametrize("corner", CORNERS)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("unit", [True, False])
def test_gradcheck(corner, groups, unit):
    w = _weight(3, groups, 2, corner, unit).requires_grad_()
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    opts = dict(corner=corner, groups=groups, unit_diagonal=unit)
    assert torch.autograd.gradcheck(lambda a, b: it.conv2d(a, b, **opts), (x, w))
    assert torch.autograd.gradcheck(lambda a, b: it.inv_conv2d(a, b, **opts), (x, w))


def test_ops_agree_with_the_array_api():
    w = _weight(4, 2, 3, "top-right", False)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    opts = dict(corner="top-right", groups=2, unit_diagonal=False)
    np.testing.assert_array_equal(it.conv2d(x, w, **opts).numpy(),
                                  invconv.conv2d(x.numpy(), w.numpy(), **opts))
    np.testing.assert_array_equal(it.inv_conv2d(x, w, **opts).numpy(),
                                  invconv.inv_conv2d(x.numpy(), w.numpy(), **opts))


@pytest.mark.parametrize("name", ["conv2d_op", "inv_conv2d_op", "conv2d_adjoint_op",
                                  "inv_conv2d_adjoint_op"])
def test_opcheck(name):
    # Every op is differentiable (the backward ops too), so all are checked
    # with inputs that require gradients.
    w = _weight(3, 1, 3, "bottom-left", False).requires_grad_()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(getattr(it, name), (x, w, "bottom-left", 1, False))


def test_opcheck_weight_grad():
    w = _weight(3, 3, 3, "top-left", True)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(it.conv2d_weight_grad_op, (g, x, w, -1.0, "top-left", 3, True))


def test_frozen_weight_costs_no_weight_gradient(monkeypatch):
    calls = []
    original = it._run
    monkeypatch.setattr(it, "_run", lambda method, *a: calls.append(method) or original(method, *a))
    w = _weight(2, 1, 3, "top-left", True)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    (it.inv_conv2d(x, w).sum() + it.conv2d(x, w).sum()).backward()
    assert "_weight_grad" not in calls and w.grad is None and x.grad is not None
    calls.clear()
    w.requires_grad_()
    x2 = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    it.inv_conv2d(x2, w).sum().backward()
    assert calls.count("_weight_grad") == 1 and w.grad is not None


def test_bad_input_is_refused():
    w = _weight(2, 1, 3, "top-left", True)
    with pytest.raises(ValueError, match="channels"):
        it.conv2d(torch.zeros(1, 3, 4, 4, dtype=torch.float64), w)
    with pytest.raises(TypeError, match="float32 or float64"):
        it.conv2d(torch.zeros(1, 2, 4, 4), w)
    with pytest.raises(ValueError, match="corner"):
        it.inv_conv2d(torch.zeros(1, 2, 4, 4, dtype=torch.float64), w, corner="centre")
    # inv_conv2d's image argument is y, and the messages say so
    with pytest.raises(ValueError, match="^y has 3 channels"):
        it.inv_conv2d(torch.zeros(1, 3, 4, 4, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="^y must have 4 dimensions"):
        it.inv_conv2d(torch.zeros(2, 4, 4, dtype=torch.float64), w)
    zero = w.clone()
    zero[1, 1, 2, 2] = 0
    with pytest.raises(ValueError, match="zero"):
        it.inv_conv2d(torch.zeros(1, 2, 4, 4, dtype=torch.float64), zero, unit_diagonal=False)


def test_double_backward_matches_the_dense_hessian():
    # The Hessian of 0.5 |M^-1 x|^2 in x is M^-T M^-1.
    w = _weight(2, 1, 2, "top-left", False)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(0.5 * it.inv_conv2d(x, w, unit_diagonal=False).square().sum(), x,
                               create_graph=True)
    hessian = torch.stack([torch.autograd.grad(g.reshape(-1)[i], x, retain_graph=True)[0]
                           for i in range(x.numel())]).reshape(x.numel(), x.numel())
    Minv = np.linalg.inv(dense_operator(w.numpy(), 3, 3, "top-left", 1, False))
    torch.testing.assert_close(hessian, torch.from_numpy(Minv.T @ Minv))


# -- layers ----------------------------------------------------------------

LAYERS = [it.InvConv2d, it.MaskedConv2d]


def _layer(cls, learn, corner="top-left", groups=1, C=3, k=3):
    torch.manual_seed(0)
    layer = cls(C, k, corner=corner, groups=groups, learn_diagonal=learn, init_std=0.1).double()
    if learn:
        with torch.no_grad():
            layer.log_diag.uniform_(-0.3, 0.3)
            layer.diag_sign.copy_(torch.tensor([1.0, -1.0, 1.0][:C]))
    return layer


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("corner", CORNERS)
def test_layer_round_trip_and_logabsdet(cls, learn, corner):
    layer = _layer(cls, learn, corner, groups=1)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    z, ld = layer(x)
    back, ld_inv = layer.inverse(z)
    torch.testing.assert_close(back, x)
    assert ld.shape == (2,)
    torch.testing.assert_close(ld_inv, -ld)
    # Against the dense Jacobian of the forward map.
    M = dense_operator(layer.effective_weight().detach().numpy(), 4, 5, corner, 1, not learn)
    jac = np.linalg.inv(M) if cls is it.InvConv2d else M
    torch.testing.assert_close(ld, torch.full((2,), np.linalg.slogdet(jac)[1], dtype=torch.float64))


@pytest.mark.parametrize("cls", LAYERS)
def test_layer_state_dict_round_trip_and_gradients(cls):
    layer = _layer(cls, True, "bottom-right", groups=3)
    other = cls(3, 3, corner="bottom-right", groups=3, learn_diagonal=True).double()
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(other(x)[0], layer(x)[0])
    torch.testing.assert_close(other(x)[1], layer(x)[1])
    z, ld = layer(x)
    (z.square().sum() - ld.sum()).backward()
    assert layer.weight.grad is not None and layer.log_diag.grad is not None
    assert layer.weight.grad.abs().sum() > 0 and layer.log_diag.grad.abs().sum() > 0
    # Ignored entries (upper same-pixel block, the stored diagonal) get no gradient.
    ignored = torch.from_numpy(layer.conv.ignored_mask() | layer._diag_mask.numpy())
    assert torch.all(layer.weight.grad[ignored] == 0)


def test_reset_parameters_is_near_identity():
    layer = it.InvConv2d(4, 3, learn_diagonal=True, init_std=0.01)
    with torch.no_grad():
        layer.weight.fill_(5.0)
        layer.log_diag.fill_(1.0)
    layer.reset_parameters()
    assert layer.weight.abs().max() < 0.1 and torch.all(layer.log_diag == 0)
    x = torch.randn(2, 4, 6, 6)
    z, ld = layer(x)
    assert (z - x).abs().max() < 0.5 and torch.all(ld == 0)


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = it.InvConv2d(2, 3, learn_diagonal=True, init_std=0.1)
        self.b = it.MaskedConv2d(2, 2, corner="bottom-right", groups=2, init_std=0.1)

    def forward(self, x):
        z, ld1 = self.a(x)
        z, ld2 = self.b(z)
        return z, ld1 + ld2


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(1)
    model = _TwoLayers().double()
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)

    def loss_and_grads(m):
        z, ld = m(x)
        loss = z.square().sum() - ld.sum()
        grads = torch.autograd.grad(loss, [x, *model.parameters()])
        return loss, grads

    eager_loss, eager_grads = loss_and_grads(model)
    comp_loss, comp_grads = loss_and_grads(compiled)
    torch.testing.assert_close(comp_loss, eager_loss)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kernel_size=(3,)), ValueError, "kernel_size must be an int or a pair"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be an int or a pair"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
    (dict(kernel_size=(3, 0)), ValueError, r"kernel_size\[1\] must be >= 1"),
    (dict(kernel_size=(3, 2.5)), TypeError, r"kernel_size\[1\] must be an integer"),
    (dict(kernel_size=3.0), TypeError, "kernel_size must be an int"),
    (dict(kernel_size="3"), TypeError, "kernel_size must be an int"),
    (dict(kernel_size=True), TypeError, "kernel_size must be an int"),
    (dict(channels=0), ValueError, "channels must be >= 1"),
    (dict(channels=4.0), TypeError, "channels must be an integer"),
    (dict(groups=0), ValueError, "groups must be >= 1"),
    (dict(groups=3), ValueError, "channels=4 is not divisible by groups=3"),
    (dict(groups=2.0), TypeError, "groups must be an integer"),
    (dict(corner="centre"), ValueError, "corner must be one of"),
    (dict(corner=None), ValueError, "corner must be one of"),
    (dict(learn_diagonal="yes"), TypeError, "learn_diagonal must be a bool"),
    (dict(init_std=-0.1), ValueError, "init_std must be finite and >= 0"),
    (dict(init_std=float("nan")), ValueError, "init_std must be finite and >= 0"),
    (dict(init_std="0.1"), TypeError, "init_std must be a real number"),
])
def test_layer_arguments_are_validated_by_name(cls, kwargs, error, match):
    kwargs = dict(dict(channels=4), **kwargs)
    with pytest.raises(error, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", LAYERS)
def test_layer_accepts_valid_argument_forms(cls):
    for kernel_size, expected in [(3, (3, 3)), ((2, 3), (2, 3)), ([1, 4], (1, 4)),
                                  (np.int64(2), (2, 2)), ((np.int32(3), 2), (3, 2))]:
        layer = cls(np.int64(4), kernel_size, groups=2, init_std=0)
        assert layer.kernel_size == expected and layer.channels == 4
        assert layer.weight.shape == (4, 2, *expected)
        assert torch.all(layer.weight == 0)  # init_std=0: exactly the identity


def test_results_are_contiguous_as_the_fake_kernels_say():
    # torch.compile plans later views from the fake kernels' strides; the
    # real ops must match them for a non-contiguous input too.
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64).transpose(0, 1)
    w = 0.1 * torch.randn(3, 3, 2, 2, dtype=torch.float64)
    for op in (it.conv2d, it.inv_conv2d):
        real = op(x, w)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = op(mode.from_tensor(x), mode.from_tensor(w))
        assert real.is_contiguous() and fake.stride() == real.stride()
        compiled = torch.compile(lambda a, b: op(a, b).view(-1), backend="aot_eager",
                                 fullgraph=True)
        torch.testing.assert_close(compiled(x, w), real.reshape(-1))
