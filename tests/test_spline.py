"""The fused rational-quadratic spline (kernels/spline.cu) against the torch path.

The truths: SplineActivation's torch code (:func:`invconv.flows.rq_spline_torch`,
values and autograd gradients), finite differences (gradcheck, float64), and
for the lean layout the spline as it was computed before (a transposed
(C, N) layout with six gathers, kept below as ``_spline_before``).  On the
CPU the kernels run on the emulator; the GPU-marked tests run them on CUDA.
"""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from invconv import flows  # noqa: E402
from invconv.spline_torch import rq_spline  # noqa: E402

_emulated = pytest.importorskip("invconv._emulated")

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-11, atol=1e-11)}
# Gradients of the inverse direction divide by the slope and go through a
# quadratic root: float32 loses a few more bits there.
GRAD_TOL = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


def _spline_layer(C=3, bins=5, bound=2.0, dtype=torch.float64, seed=0, scale=0.7,
                  implementation="torch"):
    torch.manual_seed(seed)
    layer = flows.SplineActivation(C, bins, bound, implementation=implementation).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=dtype))
    return layer


def _knots(layer):
    with torch.no_grad():
        return layer.knot_table().clone()


def _inputs(shape, bound, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (1.3 * bound * (2 * torch.rand(shape, generator=g, dtype=dtype) - 1))


def _both(t, knots, bound, inverse, gy, gl):
    """(out, logdet, grad_t, grad_knots) by the kernels (emulator) and by torch."""
    results = []
    for fused in (True, False):
        tt = t.clone().requires_grad_()
        kk = knots.clone().requires_grad_()
        out, ld = (rq_spline(tt, kk, bound, inverse, runtime="emulator") if fused
                   else flows.rq_spline_torch(tt, kk, bound, inverse))
        ((out * gy).sum() + (ld * gl).sum()).backward()
        results.append((out.detach(), ld.detach(), tt.grad, kk.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_values_and_gradients_match_torch(dtype, inverse):
    layer = _spline_layer(C=3, bins=5, bound=2.0, dtype=dtype)
    knots = _knots(layer)
    t = _inputs((4, 3, 5, 6), 2.0, dtype)     # inside and both tails
    g = torch.Generator().manual_seed(9)
    gy = torch.randn(t.shape, generator=g, dtype=dtype)
    gl = torch.randn(t.shape[0], generator=g, dtype=dtype)
    (out, ld, gt, gk), (r_out, r_ld, r_gt, r_gk) = _both(t, knots, 2.0, inverse, gy, gl)
    torch.testing.assert_close(out, r_out, **TOL[dtype])
    torch.testing.assert_close(ld, r_ld, **TOL[dtype])
    torch.testing.assert_close(gt, r_gt, **GRAD_TOL[dtype])
    torch.testing.assert_close(gk, r_gk, **GRAD_TOL[dtype])


@pytest.mark.parametrize("limits", [dict(block=1, max_block=1, max_grid=3),
                                    dict(block=7, max_grid=5, target_blocks=50),
                                    dict(block=33, max_grid=2, target_blocks=1)],
                         ids=["one-thread", "block-7-split", "block-33"])
def test_any_launch_shape_gives_the_same(limits):
    # Block sizes that do not divide the work, and reductions split over
    # several blocks (then combined), give what the default launch gives.
    layer = _spline_layer(C=2, bins=4, bound=3.0)
    knots = _knots(layer)
    t = _inputs((5, 2, 3, 7), 3.0, torch.float64, seed=3)
    gy = torch.randn(t.shape, dtype=torch.float64)
    gl = torch.randn(5, dtype=torch.float64)
    for inverse in (False, True):
        want = _both(t, knots, 3.0, inverse, gy, gl)[1]
        with _emulated.launch_limits(**limits):
            got = _both(t, knots, 3.0, inverse, gy, gl)[0]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **GRAD_TOL[torch.float64])


def test_launch_counts():
    from test_emulated_kernels import counting_launches
    layer = _spline_layer(C=2, bins=5, bound=2.0)
    knots = _knots(layer)
    t = _inputs((3, 2, 4, 4), 2.0, torch.float64).requires_grad_()
    with _emulated.launch_limits(target_blocks=1):       # no splits: one launch each
        with counting_launches() as counts:
            out, ld = rq_spline(t, knots, 2.0, False, runtime="emulator")
            assert len(counts) == 1
            (out.sum() + ld.sum()).backward()
            assert len(counts) == 2
    with _emulated.launch_limits(block=4, target_blocks=64):   # split: partials + combine
        with counting_launches() as counts:
            out, ld = rq_spline(t, knots, 2.0, True, runtime="emulator")
            (out.sum() + ld.sum()).backward()
        assert [c.split("<")[0] for c in counts] == [
            "spline_forward", "spline_logdet_combine", "spline_backward",
            "spline_knot_grad_combine"]


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_gradcheck_float64(inverse):
    layer = _spline_layer(C=2, bins=4, bound=2.0)
    knots = _knots(layer).requires_grad_()
    # Inside, away from the knots and from +-bound (where the derivatives
    # with respect to the knots jump), and in the tails.
    t = torch.tensor([-1.7, -0.9, -0.31, 0.07, 0.55, 1.21, 1.9, -2.6, 2.4, 3.3, -5.0, 0.83],
                     dtype=torch.float64).reshape(2, 2, 3, 1).requires_grad_()
    fn = lambda a, b: rq_spline(a, b, 2.0, inverse, runtime="emulator")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (t, knots), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_identity_at_initialisation():
    layer = flows.SplineActivation(3, bins=5, bound=2.0, implementation="emulator").double()
    t = _inputs((2, 3, 4, 5), 2.0, torch.float64, seed=4)
    reference = flows.SplineActivation(3, bins=5, bound=2.0).double()
    for direction, ref_direction in ((layer.forward, reference.forward),
                                     (layer.inverse, reference.inverse)):
        out, ld = direction(t)
        r_out, r_ld = ref_direction(t)
        torch.testing.assert_close(out, r_out, **TOL[torch.float64])
        torch.testing.assert_close(ld, r_ld, **TOL[torch.float64])
        # The identity up to the float32 parameters' rounding (the layer was
        # built in float32: its unit derivatives are 1 to about 1e-8).
        torch.testing.assert_close(out, t, rtol=0, atol=1e-6)
        torch.testing.assert_close(ld, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_exact_knots_bounds_and_tails(dtype, inverse):
    # Values exactly at every knot (x knots for the forward direction, y knots
    # for the inverse), exactly at +-bound, just inside, and beyond.
    bound = 2.0
    layer = _spline_layer(C=2, bins=5, bound=bound, dtype=dtype, seed=5)
    knots = _knots(layer)
    at = knots[1 if inverse else 0]                      # (C, K+1)
    eps = torch.finfo(dtype).eps * 4 * bound
    extra = torch.tensor([bound, -bound, bound - eps, -bound + eps, 1.5 * bound, -7.0],
                         dtype=dtype).expand(2, -1)
    t = torch.cat([at, extra], 1).reshape(1, 2, 1, -1).expand(2, -1, 3, -1).contiguous()
    gy = torch.randn(t.shape, dtype=dtype)
    gl = torch.randn(2, dtype=dtype)
    (out, ld, gt, gk), (r_out, r_ld, r_gt, r_gk) = _both(t, knots, bound, inverse, gy, gl)
    torch.testing.assert_close(out, r_out, **TOL[dtype])
    torch.testing.assert_close(ld, r_ld, **TOL[dtype])
    torch.testing.assert_close(gt, r_gt, **GRAD_TOL[dtype])
    torch.testing.assert_close(gk, r_gk, **GRAD_TOL[dtype])
    # +-bound and beyond are the identity, with slope 1 and no log-derivative.
    outside = t.abs() >= bound
    assert torch.equal(out[outside], t[outside])
    assert torch.equal(gt[outside], gy[outside])


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_nan_and_inf_as_the_torch_path(inverse):
    # NaN and +-Inf are outside: passed on unchanged with log-derivative 0; a
    # NaN input makes its channel's knot gradients NaN in both paths (torch's
    # autograd multiplies 0 by the NaN of the discarded branch).
    layer = _spline_layer(C=3, bins=5, bound=2.0)
    knots = _knots(layer)
    t = _inputs((2, 3, 2, 3), 2.0, torch.float64, seed=6)
    t[0, 0, 0, 0] = math.nan
    t[1, 1, 1, 2] = math.inf
    t[0, 2, 1, 1] = -math.inf
    gy = torch.randn(t.shape, dtype=torch.float64)
    gl = torch.randn(2, dtype=torch.float64)
    (out, ld, gt, gk), (r_out, r_ld, r_gt, r_gk) = _both(t, knots, 2.0, inverse, gy, gl)
    for a, b in ((out, r_out), (ld, r_ld), (gt, r_gt), (gk, r_gk)):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        torch.testing.assert_close(a, b, equal_nan=True, **GRAD_TOL[torch.float64])
    assert torch.isnan(out[0, 0, 0, 0]) and torch.isinf(out[1, 1, 1, 2])
    assert torch.isfinite(ld).all()
    assert torch.isnan(gk[:, 0]).any() and torch.isfinite(gk[:, 1:]).all()


def test_non_contiguous_input_and_inputs_unchanged():
    layer = _spline_layer(C=3, bins=5, bound=2.0)
    knots = _knots(layer)
    base = _inputs((2, 3, 6, 4), 2.0, torch.float64, seed=7)
    t = base.transpose(2, 3)                        # (2, 3, 4, 6), not contiguous
    saved, saved_knots = base.clone(), knots.clone()
    for inverse in (False, True):
        out, ld = rq_spline(t, knots, 2.0, inverse, runtime="emulator")
        r_out, r_ld = flows.rq_spline_torch(t.contiguous(), knots, 2.0, inverse)
        torch.testing.assert_close(out, r_out, **TOL[torch.float64])
        torch.testing.assert_close(ld, r_ld, **TOL[torch.float64])
    assert torch.equal(base, saved) and torch.equal(knots, saved_knots)


def test_empty_batch():
    layer = _spline_layer(C=3)
    knots = _knots(layer).requires_grad_()
    t = torch.zeros(0, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    out, ld = rq_spline(t, knots, 2.0, False, runtime="emulator")
    assert out.shape == (0, 3, 4, 4) and ld.shape == (0,)
    (out.sum() + ld.sum()).backward()
    assert t.grad.shape == t.shape and torch.equal(knots.grad, torch.zeros_like(knots))


def test_bad_arguments_are_named():
    knots = _knots(_spline_layer(C=3))
    t = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="knots"):
        rq_spline(t, knots[:, :2], 2.0, runtime="emulator")
    with pytest.raises(TypeError, match="float32 or float64"):
        rq_spline(t, knots.float(), 2.0, runtime="emulator")
    with pytest.raises(ValueError, match="t must have 4 dimensions"):
        rq_spline(t[0], knots, 2.0, runtime="emulator")
    with pytest.raises(ValueError, match="runtime"):
        rq_spline(t, knots, 2.0, runtime="cuda")          # CPU tensors
    with pytest.raises(ValueError, match="runtime"):
        rq_spline(t, knots, 2.0, runtime="gpu")
    with pytest.raises(ValueError, match="bound"):
        rq_spline(t, knots, -1.0, runtime="emulator")
    with pytest.raises(ValueError, match="implementation"):
        flows.SplineActivation(3, implementation="cuda")


def test_environment_picks_the_implementation(monkeypatch):
    monkeypatch.setenv("INVCONV_SPLINE", "emulator")
    assert flows.SplineActivation(2).implementation == "emulator"
    monkeypatch.setenv("INVCONV_SPLINE", "")
    assert flows.SplineActivation(2).implementation == "torch"      # the default
    monkeypatch.setenv("INVCONV_SPLINE", "fast")
    with pytest.raises(ValueError, match="INVCONV_SPLINE"):
        flows.SplineActivation(2)


def test_fused_on_cpu_tensors_runs_the_torch_path(monkeypatch):
    # "fused" means the CUDA kernels on CUDA tensors; CPU tensors keep torch ops.
    layer = _spline_layer(C=2, implementation="fused")
    monkeypatch.setattr("invconv.spline_torch.rq_spline",
                        lambda *a, **k: pytest.fail("the kernels ran on CPU tensors"))
    t = _inputs((2, 2, 3, 3), 2.0, torch.float64)
    out, ld = layer(t)
    r_out, r_ld = _spline_layer(C=2)(t)
    assert torch.equal(out, r_out) and torch.equal(ld, r_ld)


def test_model_with_emulated_spline_matches_torch_path():
    # A whole (small) Inverse-Flow: log-density, its parameter gradients and
    # samples with the kernels equal those with torch's spline.
    def model(implementation):
        torch.manual_seed(0)
        m = flows.build("inverse-flow", (1, 4, 4), levels=1, steps=1, hidden=4).double()
        for s in m.modules():
            if isinstance(s, flows.SplineActivation):
                s.implementation = implementation
                with torch.no_grad():
                    for p in s.parameters():
                        p.add_(0.3 * torch.randn_like(p))
        return m
    fused, ref = model("emulator"), model("torch")
    v = torch.rand(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lp, r_lp = fused.log_prob(v), ref.log_prob(v)
    torch.testing.assert_close(lp, r_lp, rtol=1e-11, atol=1e-11)
    lp.sum().backward()
    r_lp.sum().backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-9, msg=name)
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    torch.testing.assert_close(fused.sample(3, generator=g()), ref.sample(3, generator=g()),
                               rtol=1e-11, atol=1e-11)


def test_op_traces_as_one_graph():
    # The fake kernels: torch.compile(fullgraph=True) traces the op and its backward.
    layer = _spline_layer(C=2, implementation="emulator")
    t = _inputs((2, 2, 3, 3), 2.0, torch.float64).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: layer(x), backend="aot_eager", fullgraph=True)
    out, ld = compiled(t)
    r_out, r_ld = layer(t)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(ld, r_ld)
    (g,) = torch.autograd.grad(out.sum() + ld.sum(), t)
    (r_g,) = torch.autograd.grad(r_out.sum() + r_ld.sum(), t)
    torch.testing.assert_close(g, r_g)


SPLINE_RACE_SCRIPT = """
import numpy as np
from invconv import _emulated, _spline

rng = np.random.default_rng(0)
kern = _spline.kernels("emulator")
C, bins = 3, 4
xk = np.sort(rng.uniform(-2, 2, (C, bins + 1)), 1)
xk[:, 0], xk[:, -1] = -2, 2
knots = np.stack([xk, xk + 0.0, rng.uniform(0.5, 2, (C, bins + 1))])
t = rng.uniform(-2.5, 2.5, (3, C, 4, 5))
for limits in ({}, {"block": 7, "target_blocks": 40}, {"block": 33, "max_grid": 2}):
    with _emulated.launch_limits(**limits):
        for inverse in (0, 1):
            out, ld = kern.forward(t, knots, 2.0, inverse)
            kern.backward(t, np.ones_like(t), np.ones(3), knots, 2.0, inverse)
print("kernels ran")
"""


def test_spline_kernels_are_race_free_under_thread_sanitizer(tmp_path):
    from invconv.emulator.racecheck import run_race_check, tsan_runtime
    try:
        tsan_runtime()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    script = tmp_path / "run_spline.py"
    script.write_text(SPLINE_RACE_SCRIPT)
    result = run_race_check([str(script)], timeout=600)
    assert result.races == 0, result.report
    assert result.returncode == 0 and "kernels ran" in result.stdout, result.report


# --------------------------------------------------------------------------
# the lean torch path against the spline as it was computed before


def _spline_before(layer, t, inverse):
    """SplineActivation._spline before the layout change (commit 5bac756)."""
    C = t.shape[1]
    flat = t.transpose(0, 1).reshape(C, -1)

    def knots_of(raw):
        frac = torch.softmax(raw, dim=-1)
        frac = layer.MIN_BIN + (1 - layer.MIN_BIN * layer.bins) * frac
        knots = F.pad(torch.cumsum(frac, -1), (1, 0))
        knots = 2 * layer.bound * knots - layer.bound
        end = torch.full_like(knots[:, :1], layer.bound)
        knots = torch.cat([-end, knots[:, 1:-1], end], dim=-1)
        return knots, knots[:, 1:] - knots[:, :-1]
    xk, w = knots_of(layer.widths)
    yk, h = knots_of(layer.heights)
    d = F.softplus(layer.derivatives) + layer.MIN_DERIVATIVE
    one = torch.ones(C, 1, dtype=d.dtype, device=d.device)
    d = torch.cat([one, d, one], dim=-1)
    inside = (flat > -layer.bound) & (flat < layer.bound)
    flat_in = flat.clamp(-layer.bound, layer.bound)
    knots = yk if inverse else xk
    k = (flat_in.unsqueeze(1) > knots[:, 1:-1].unsqueeze(-1)).sum(1)
    g = lambda a: torch.gather(a, 1, k)  # noqa: E731
    x0, wk, y0, hk, d0, d1 = g(xk), g(w), g(yk), g(h), g(d[:, :-1]), g(d[:, 1:])
    s = hk / wk
    if not inverse:
        xi = ((flat_in - x0) / wk).clamp(0, 1)
        den = s + (d1 + d0 - 2 * s) * xi * (1 - xi)
        out = y0 + hk * (s * xi * xi + d0 * xi * (1 - xi)) / den
    else:
        dy = flat_in - y0
        a = hk * (s - d0) + dy * (d1 + d0 - 2 * s)
        b = hk * d0 - dy * (d1 + d0 - 2 * s)
        c = -s * dy
        disc = (b * b - 4 * a * c).clamp_min(0)
        xi = ((2 * c) / (-b - torch.sqrt(disc))).clamp(0, 1)
        out = x0 + xi * wk
        den = s + (d1 + d0 - 2 * s) * xi * (1 - xi)
    deriv = s * s * (d1 * xi * xi + 2 * s * xi * (1 - xi) + d0 * (1 - xi) ** 2) / (den * den)
    out = torch.where(inside, out, flat)
    logd = torch.where(inside, torch.log(deriv), torch.zeros_like(flat))
    shape = (C, t.shape[0], *t.shape[2:])
    out = out.reshape(shape).transpose(0, 1)
    logd = logd.reshape(shape).transpose(0, 1)
    return out, logd.reshape(t.shape[0], -1).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_lean_torch_path_equals_the_previous_one(dtype, inverse):
    layer = _spline_layer(C=4, bins=5, bound=2.0, dtype=dtype, seed=8)
    t = _inputs((3, 4, 5, 5), 2.0, dtype, seed=8)
    t[0, 1, 2, 3] = math.nan
    tt, tb = t.clone().requires_grad_(), t.clone().requires_grad_()
    out, ld = layer.inverse(tt) if inverse else layer(tt)
    b_out, b_ld = _spline_before(layer, tb, inverse)
    b_ld = -b_ld if inverse else b_ld
    # Element by element the same arithmetic: the same bits.
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(b_out))
    torch.testing.assert_close(ld, b_ld, rtol=4 * torch.finfo(dtype).eps, atol=0)
    gy = torch.randn(t.shape, dtype=dtype)
    grads = torch.autograd.grad((out * gy).nansum() + ld.sum(), [tt, *layer.parameters()])
    b_grads = torch.autograd.grad((b_out * gy).nansum() + b_ld.sum(), [tb, *layer.parameters()])
    for a, b in zip(grads, b_grads):
        torch.testing.assert_close(a, b, equal_nan=True, **GRAD_TOL[dtype])


def test_parameter_cache_serves_only_unrecorded_passes_and_follows_updates():
    layer = _spline_layer(C=3)
    with torch.no_grad():
        first = layer.knot_table()
        assert layer.knot_table() is first                 # served again
        layer.widths.add_(0.1)                             # in-place: a new version
        second = layer.knot_table()
    assert second is not first
    torch.testing.assert_close(second, layer._knot_table().detach(), rtol=0, atol=0)
    recorded = layer.knot_table()                          # grad mode: in the graph
    assert recorded.requires_grad and recorded is not second
    layer.load_state_dict({k: v + 0.1 for k, v in layer.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(layer.knot_table(), layer._knot_table(), rtol=0, atol=0)


def test_model_passes_with_and_without_the_cache_are_bit_identical():
    # Decoding and the density pass without grad (parameter caches filled,
    # then served) equal the same passes in grad mode (nothing cached) bit
    # for bit; after an optimiser step the caches follow the new parameters.
    torch.manual_seed(0)
    model = flows.build("inverse-flow", (1, 8, 8), levels=2, steps=2, hidden=8)
    v = torch.rand(4, 1, 8, 8)
    model.log_prob(v)                                       # ActNorm init (training mode)
    model.eval()
    latents = [torch.randn(4, *s) for s in model.latent_shapes]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        with torch.no_grad():
            first = model.decode(latents)
            served, l_served = model.decode(latents), model.log_prob(v)
        assert any("_parameter_cache" in m.__dict__ for m in model.modules())
        computed, l_computed = model.decode(latents), model.log_prob(v)
        assert torch.equal(first, served) and torch.equal(served, computed.detach())
        assert torch.equal(l_served, l_computed.detach())
        opt.zero_grad()
        (-l_computed.mean()).backward()
        opt.step()


# --------------------------------------------------------------------------
# on a GPU (run by bench/device_check.sh; skipped without one)


def _cuda_layer(dtype, implementation):
    return _spline_layer(C=8, bins=5, bound=3.0, dtype=dtype, seed=11,
                         implementation=implementation).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_cuda_kernels_match_torch(dtype, inverse):
    knots = _knots(_cuda_layer(dtype, "torch"))
    t = _inputs((100, 8, 14, 14), 3.0, dtype, seed=12).cuda()
    t[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
    gy = torch.randn(t.shape, dtype=dtype, device="cuda")
    gl = torch.randn(100, dtype=dtype, device="cuda")
    results = []
    for fused in (True, False):
        tt, kk = t.clone().requires_grad_(), knots.clone().requires_grad_()
        out, ld = (rq_spline(tt, kk, 3.0, inverse, runtime="cuda") if fused
                   else flows.rq_spline_torch(tt, kk, 3.0, inverse))
        ((out * gy).nansum() + (ld * gl).sum()).backward()
        results.append((out.detach(), ld.detach(), tt.grad, kk.grad))
    (out, ld, gt, gk), (r_out, r_ld, r_gt, r_gk) = results
    # The GPU contracts to fused multiply-adds: rounding differs from torch's.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for a, b in ((out, r_out), (ld, r_ld), (gt, r_gt)):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)
    assert torch.equal(torch.isnan(gk), torch.isnan(r_gk))
    # The knot gradients sum 100*196 terms a channel, in a different order.
    torch.testing.assert_close(gk, r_gk, equal_nan=True, rtol=10 * tol["rtol"],
                               atol=10 * tol["atol"] * math.sqrt(t.numel() / 8))


@pytest.mark.gpu
def test_cuda_fused_model_passes_match_torch_eager_and_captured():
    def model(implementation):
        torch.manual_seed(0)
        m = flows.build("inverse-flow", (1, 28, 28), levels=2, steps=2, hidden=16).cuda()
        for s in m.modules():
            if isinstance(s, flows.SplineActivation):
                s.implementation = implementation
        m.train()
        with torch.no_grad():
            m.log_prob(torch.rand(16, 1, 28, 28, device="cuda", generator=torch.Generator(
                "cuda").manual_seed(1)))
        return m.eval()
    fused, ref = model("fused"), model("torch")
    v = torch.rand(16, 1, 28, 28, device="cuda")
    for captured in (False, True):
        torch.testing.assert_close(fused.log_prob(v, captured=captured), ref.log_prob(v),
                                   rtol=1e-4, atol=1e-3)
        g = lambda: torch.Generator("cuda").manual_seed(2)  # noqa: E731
        torch.testing.assert_close(fused.sample(16, generator=g(), captured=captured),
                                   ref.sample(16, generator=g()), rtol=1e-4, atol=1e-4)
    lp, r_lp = fused.log_prob(v), ref.log_prob(v)
    lp.sum().backward()
    r_lp.sum().backward()
    for p, q in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3)
