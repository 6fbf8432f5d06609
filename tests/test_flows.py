"""Flow layers and models: exact inverses, log-determinants against dense Jacobians."""
import math

import pytest

torch = pytest.importorskip("torch")
from invconv import flows  # noqa: E402
from invconv.torch import InvConv2d, MaskedConv2d  # noqa: E402


def _randomise(module, scale=0.1, seed=0):
    """Move every parameter off its (often identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _flat(out):
    if isinstance(out, tuple):
        return torch.cat([o.reshape(o.shape[0], -1) for o in out], 1)
    return out.reshape(out.shape[0], -1)


def _dense_logdet(fn, x):
    """log|det| of the Jacobian of one sample's map, by autograd."""
    jac = torch.autograd.functional.jacobian(lambda t: _flat(fn(t.reshape(x.shape))).reshape(-1),
                                             x.reshape(-1))
    return torch.linalg.slogdet(jac)[1]


def _layers():
    torch.manual_seed(0)
    act = flows.ActNorm(4)
    act(torch.randn(8, 4, 3, 3) * 3 + 1)    # data-dependent init
    return {
        "squeeze": flows.Squeeze(),
        "actnorm": act.eval(),
        "conv1x1": flows.InvertibleConv1x1(4),
        "coupling": _randomise(flows.AffineCoupling(4, 8)),
        "coupling-odd": _randomise(flows.AffineCoupling(5, 8)),
        "spline": _randomise(flows.SplineActivation(4, bins=5, bound=2.0), scale=0.5),
        "split": _randomise(flows.Split(4)),
        "invconv": _randomise(InvConv2d(4, 2, learn_diagonal=True)),
        "emerging": _randomise(flows.EmergingConv2d(4, 3)),
        "emerging-k5": _randomise(flows.EmergingConv2d(4, 5), scale=0.05),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_layer_inverse_and_logabsdet(name):
    layer = _layers()[name].double()
    C = 5 if name == "coupling-odd" else 4
    x = 2.5 * torch.randn(1, C, 4, 2, dtype=torch.float64)   # reaches the spline's tails too
    y, ld = layer(x)
    back, ld_inv = layer.inverse(y)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(ld_inv, -ld)
    assert ld.shape == (1,)
    torch.testing.assert_close(ld[0], _dense_logdet(lambda t: layer(t)[0], x))


def test_spline_starts_at_identity_and_is_monotone():
    spline = flows.SplineActivation(3)
    x = torch.linspace(-12, 12, 101).repeat(3).reshape(1, 3, 101, 1)
    y, ld = spline(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(ld, torch.zeros(1), atol=1e-4, rtol=0)
    _randomise(spline, scale=1.0)
    y, _ = spline(x)
    assert torch.all(torch.diff(y[0, :, :, 0], dim=1) > 0)


def test_actnorm_flag_survives_checkpoints():
    a = flows.ActNorm(2)
    a(torch.randn(16, 2, 3, 3) * 5 + 2)
    assert bool(a.initialized) and "initialized" in a.state_dict()
    b = flows.ActNorm(2)
    b.load_state_dict(a.state_dict())
    b(torch.randn(16, 2, 3, 3))          # must not re-initialise
    torch.testing.assert_close(b.bias, a.bias)
    torch.testing.assert_close(b.logs, a.logs)


MODELS = {
    "inverse-flow": dict(steps=2, hidden=8, learn_diagonal=True),
    "finc-flow": dict(steps=2, hidden=8, learn_diagonal=True),
    "glow": dict(steps=2, hidden=8),
    "snf-small": dict(),
    "emerging": dict(steps=2, hidden=8),
    "snf-small-emerging": dict(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_presets_round_trip_float32(name):
    torch.manual_seed(0)
    model = flows.build(name, (1, 8, 8), logit=0.05, **MODELS[name])
    v = flows.dequantize(torch.randint(0, 256, (4, 1, 8, 8)))
    model.train()
    model.log_prob(v)                      # ActNorm init
    _randomise(model, scale=0.05)
    model.eval()
    with torch.no_grad():
        latents, _ = model.encode(v)
        back = model.decode(latents)
    assert (back - v).abs().max() < 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_log_prob_matches_dense_jacobian(name):
    torch.manual_seed(1)
    model = flows.build(name, (1, 8, 8), logit=0.05, **MODELS[name]).double()
    v = flows.dequantize(torch.randint(0, 256, (2, 1, 8, 8))).double()
    model.train()
    model.log_prob(v)
    _randomise(model, scale=0.05)
    model.eval()
    x = v[:1]
    logdet = _dense_logdet(lambda t: tuple(model.encode(t)[0]), x)
    z = _flat(tuple(model.encode(x)[0]))
    expected = (-0.5 * z.square() - 0.5 * math.log(2 * math.pi)).sum() + logdet
    torch.testing.assert_close(model.log_prob(x)[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("logit", [None, 0.05])
def test_bits_per_dim_known_answer(logit):
    # No steps: the model is a squeeze (volume preserving) and a standard
    # normal prior, so log p(v) is known in closed form.
    model = flows.InverseFlow((1, 4, 4), levels=1, steps=0, logit=logit)
    v = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    s, jac = v, 0.0
    if logit is not None:
        p = logit + (1 - 2 * logit) * v
        s = torch.log(p / (1 - p))
        jac = torch.log((1 - 2 * logit) / (p * (1 - p))).sum((1, 2, 3))
    logp = (-0.5 * s * s - 0.5 * math.log(2 * math.pi)).sum((1, 2, 3)) + jac
    D = 16
    expected = (-logp + D * math.log(256)) / (D * math.log(2))
    torch.testing.assert_close(model.bits_per_dim(v.float()).double(), expected, rtol=1e-5,
                               atol=1e-5)


def test_sampling_shapes_and_temperature():
    torch.manual_seed(2)
    model = flows.build("inverse-flow", (1, 8, 8), steps=1, hidden=8)
    cold = model.sample(5, temperature=0.0)
    assert cold.shape == (5, 1, 8, 8)
    torch.testing.assert_close(cold[0], cold[1])   # T = 0: every sample is the mode
    assert model.sample(3, temperature=1.0).std() > 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        flows.InverseFlow((1, 6, 6), levels=2)
    with pytest.raises(ValueError, match="unknown model"):
        flows.build("realnvp", (1, 8, 8))


def _masked_conv_by_torch(x, weight, corner):
    """M x by torch's conv2d: pad on ``corner``'s sides, zero the taps the convention ignores."""
    C, _, kh, kw = weight.shape
    w = weight.clone()
    u0 = kh - 1 if corner.startswith("top") else 0
    v0 = kw - 1 if corner.endswith("left") else 0
    w[:, :, u0, v0] = torch.tril(w[:, :, u0, v0])           # same pixel: lower-triangular
    left = kw - 1 if corner.endswith("left") else 0
    top = kh - 1 if corner.startswith("top") else 0
    return torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (left, kw - 1 - left, top, kh - 1 - top)), w)


def test_emerging_is_two_masked_convolutions_around_a_channel_reversal():
    torch.manual_seed(3)
    layer = _randomise(flows.EmergingConv2d(3, 3), scale=0.3).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    w1 = layer.first.effective_weight().detach()
    w2 = layer.second.effective_weight().detach()
    assert w1.shape == w2.shape == (3, 3, 2, 2)
    expected = _masked_conv_by_torch(_masked_conv_by_torch(x, w1, "bottom-right").flip(1),
                                     w2, "top-left").flip(1)
    y, ld = layer(x)
    torch.testing.assert_close(y, expected)
    H, W = x.shape[2:]
    logdet = H * W * (torch.log(torch.diagonal(w1[:, :, 0, 0]).abs()).sum()
                      + torch.log(torch.diagonal(w2[:, :, 1, 1]).abs()).sum())
    torch.testing.assert_close(ld, logdet.expand(2))
    # The composed same-pixel map is a full C x C matrix (not triangular):
    # every output channel of a pixel depends on every input channel there.
    jac = torch.autograd.functional.jacobian(lambda t: layer(t)[0][0, :, 2, 3], x[:1])
    assert bool((jac[:, 0, :, 2, 3].abs() > 1e-6).all())
    # ... and its receptive field is the centred 3 x 3 window.
    reach = (jac[0, 0].abs().sum(0) > 0).nonzero().tolist()
    assert {(r, c) for r, c in reach} == {(r, c) for r in (1, 2, 3) for c in (2, 3, 4)}


def test_emerging_refuses_even_kernels():
    with pytest.raises(ValueError, match="kernel_size"):
        flows.EmergingConv2d(4, 2)


def _k_by_k_layers(model):
    return [m for m in model.modules() if isinstance(m, (InvConv2d, MaskedConv2d))]


def test_presets_keep_their_defaults_and_honour_given_options():
    snf = flows.build("snf-small", (1, 8, 8))
    layers = _k_by_k_layers(snf)
    assert len(layers) == 9 and all(layer.learn_diagonal for layer in layers)   # Table 4
    assert not any(isinstance(m, flows.AffineCoupling) for m in snf.modules())
    snf = flows.build("snf-small", (1, 8, 8), levels=2, steps=1, learn_diagonal=False,
                      kernel_size=2)
    layers = _k_by_k_layers(snf)
    assert len(layers) == 2 and not any(layer.learn_diagonal for layer in layers)
    assert {layer.kernel_size for layer in layers} == {(2, 2)}
    flow = flows.build("inverse-flow", (1, 8, 8), levels=1, steps=3, hidden=5)
    assert len(_k_by_k_layers(flow)) == 3
    couplings = [m for m in flow.modules() if isinstance(m, flows.AffineCoupling)]
    assert len(couplings) == 3 and {c.net[0].out_channels for c in couplings} == {5}
    finc = flows.build("finc-flow", (1, 8, 8), levels=2, steps=1)
    assert [type(m) for m in _k_by_k_layers(finc)] == [MaskedConv2d] * 2
    snf_em = flows.build("snf-small-emerging", (1, 8, 8), levels=2, steps=1)
    assert len([m for m in snf_em.modules() if isinstance(m, flows.EmergingConv2d)]) == 2
    glow = flows.build("glow", (1, 8, 8), levels=1, steps=2, hidden=6)
    assert _k_by_k_layers(glow) == []
    assert len([m for m in glow.modules() if isinstance(m, flows.AffineCoupling)]) == 2


@pytest.mark.parametrize("name, option", [("snf-small", "hidden"), ("glow", "kernel_size"),
                                          ("glow", "learn_diagonal"),
                                          ("emerging", "learn_diagonal"),
                                          ("snf-small-emerging", "hidden"),
                                          ("snf-small-emerging", "learn_diagonal")])
def test_presets_refuse_options_they_have_no_use_for(name, option):
    with pytest.raises(ValueError, match=f"{name}: {option}="):
        flows.build(name, (1, 8, 8), **{option: 3 if option != "learn_diagonal" else True})
