"""The PyTorch adapters on CUDA tensors (needs a GPU; run by bench/device_check.sh)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import invconv.torch as it  # noqa: E402
from support import CORNERS, make_weight  # noqa: E402

pytestmark = pytest.mark.gpu


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    pytest.importorskip("cupy")
    return torch.device("cuda")


def _problem(dtype, corner="top-left", groups=1, unit=True, shape=(8, 6, 12, 10), k=3, seed=0):
    rng = np.random.default_rng(seed)
    w = torch.tensor(make_weight(rng, shape[1], groups, k, k, corner, unit), dtype=dtype)
    x = torch.tensor(rng.standard_normal(shape), dtype=dtype)
    g = torch.tensor(rng.standard_normal(shape), dtype=dtype)
    return x, w, g


def _forward_backward(x, w, g, opts):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = it.conv2d(x, w, **opts) + it.inv_conv2d(x, w, **opts)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    return y.detach(), gx, gw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("corner", CORNERS)
@pytest.mark.parametrize("groups", [1, 6])
def test_cuda_agrees_with_cpu(dtype, corner, groups):
    dev = _cuda()
    x, w, g = _problem(dtype, corner, groups, unit=groups == 1)
    opts = dict(corner=corner, groups=groups, unit_diagonal=groups == 1)
    cpu = _forward_backward(x, w, g, opts)
    gpu = _forward_backward(x.to(dev), w.to(dev), g.to(dev), opts)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for a, b in zip(gpu, cpu):
        assert a.is_cuda
        torch.testing.assert_close(a.cpu(), b, **tol)


def test_gradcheck_on_cuda():
    dev = _cuda()
    x, w, _ = _problem(torch.float64, "bottom-left", 2, False, shape=(2, 4, 5, 4), k=2)
    x, w = x.to(dev).requires_grad_(), w.to(dev).requires_grad_()
    opts = dict(corner="bottom-left", groups=2, unit_diagonal=False)
    assert torch.autograd.gradcheck(lambda a, b: it.inv_conv2d(a, b, **opts), (x, w))
    assert torch.autograd.gradcheck(lambda a, b: it.conv2d(a, b, **opts), (x, w))


def test_forward_mode_and_vmap_on_cuda_agree_with_cpu():
    # jvp along x and the weight (the unit diagonal's tangent masked on the
    # device), jacrev (vmap of the backward ops) and vmap over weights
    # (folded into channel groups).
    dev = _cuda()
    x, w, g = _problem(torch.float64, "top-right", 2, True, shape=(2, 4, 5, 4), k=2)
    dw = torch.randn(w.shape, dtype=torch.float64)
    ws = torch.stack([w, 2 * w, -w])
    opts = dict(corner="top-right", groups=2, unit_diagonal=True)

    def transforms(x, w, g, dw, ws):
        out = []
        for op in (it.conv2d, it.inv_conv2d):
            f = lambda a, b: op(a, b, **opts)  # noqa: E731
            out.append(torch.func.jvp(f, (x, w), (g, dw))[1])
            out.append(torch.func.jacrev(f, argnums=1)(x[:1], w))
            out.append(torch.func.vmap(f, in_dims=(None, 0))(x, ws))
        return out

    cpu = transforms(x, w, g, dw, ws)
    gpu = transforms(*(t.to(dev) for t in (x, w, g, dw, ws)))
    for a, b in zip(gpu, cpu):
        assert a.is_cuda
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)


def test_non_default_stream_gives_the_same_results():
    dev = _cuda()
    x, w, g = (t.to(dev) for t in _problem(torch.float32))
    expected = _forward_backward(x, w, g, {})
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _forward_backward(x, w, g, {})
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_graph_capture_and_replay():
    dev = _cuda()
    layer = it.InvConv2d(6, 3, learn_diagonal=True, init_std=0.05).to(dev)
    static_x = torch.randn(8, 6, 12, 10, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up (compiles kernels) off the capture
        for _ in range(2):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_z, static_ld = layer(static_x)
        static_back, _ = layer.inverse(static_z)
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_z, layer(new_x)[0])
    torch.testing.assert_close(static_back, new_x, rtol=1e-4, atol=1e-4)


def test_layers_round_trip_on_cuda():
    dev = _cuda()
    for cls in (it.InvConv2d, it.MaskedConv2d):
        layer = cls(12, 3, groups=3, learn_diagonal=True, init_std=0.05).to(dev)
        x = torch.randn(16, 12, 16, 16, device=dev)
        z, ld = layer(x)
        back, ld_inv = layer.inverse(z)
        torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ld, -ld_inv)
        (z.square().mean() - ld.mean()).backward()
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_torch_compile_on_cuda_matches_eager():
    dev = _cuda()
    layer = it.InvConv2d(4, 3, learn_diagonal=True, init_std=0.05).to(dev)
    x = torch.randn(4, 4, 8, 8, device=dev)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x)[0], layer(x)[0])
