"""Captured sampling and density passes: same results as eager, one capture per key.

CUDA graphs need a GPU; on the CPU the captured paths run eagerly, and the
bookkeeping (keys, static buffers, fallback) is tested with a stand-in
recorder that replays by re-running the function on the static inputs.
"""
import warnings

import pytest

torch = pytest.importorskip("torch")
from invconv import capture, flows  # noqa: E402

PRESETS = ["inverse-flow", "finc-flow", "glow", "emerging", "snf-small", "snf-small-emerging"]


def _model(name, shape=(1, 8, 8), dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    kw = {} if name.startswith("snf-small") else dict(steps=1, hidden=8)
    model = flows.build(name, shape, logit=0.05, **kw).to(device=device, dtype=dtype)
    model.train()
    v = flows.dequantize(torch.randint(0, 256, (8, *shape))).to(device=device, dtype=dtype)
    model.log_prob(v)                                   # ActNorm's data-dependent init
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():                               # off the identity initialisation
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(device))
    return model.eval()


class Replayer:
    """Stand-in for the CUDA-graph recorder: a replay re-runs fn into the static outputs."""

    def __init__(self, fail=False):
        self.fail, self.captured = fail, 0

    @staticmethod
    def available(args):
        return True

    def capture(self, fn, static_inputs):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        outputs = fn(*static_inputs)

        def replay():
            fresh = fn(*static_inputs)
            for o, f in zip(capture._as_tuple(outputs), capture._as_tuple(fresh)):
                o.copy_(f)
        return replay, outputs


def test_resolve_method():
    assert capture.resolve_method(False) == "eager"
    assert capture.resolve_method(True) == "graph"
    assert capture.resolve_method("compile") == "compile"
    with pytest.raises(ValueError, match="captured"):
        capture.resolve_method("cudagraph")
    with pytest.raises(ValueError, match="method"):
        capture.CapturedCall(lambda x: x, "fast")


@pytest.mark.parametrize("method", [True, "graph", "compile"])
@pytest.mark.parametrize("name", PRESETS)
def test_cpu_fallback_equals_eager(name, method):
    model = _model(name)
    eager = model.sample(6, temperature=0.7, generator=torch.Generator().manual_seed(5))
    got = model.sample(6, temperature=0.7, generator=torch.Generator().manual_seed(5),
                       captured=method)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    v = flows.dequantize(torch.randint(0, 256, (4, 1, 8, 8)), torch.Generator().manual_seed(6))
    torch.testing.assert_close(model.log_prob(v, captured=method), model.log_prob(v),
                               rtol=0, atol=0)
    torch.testing.assert_close(model.bits_per_dim(v, captured=method), model.bits_per_dim(v),
                               rtol=0, atol=0)


def test_captured_needs_initialised_actnorm():
    model = flows.build("inverse-flow", (1, 8, 8), steps=1, hidden=8).eval()
    with pytest.raises(ValueError, match="ActNorm"):
        model.sample(2, captured=True)
    with pytest.raises(ValueError, match="ActNorm"):
        model.log_prob(torch.rand(2, 1, 8, 8), captured=True)


def test_captured_log_prob_in_training_mode():
    # Initialised, a training-mode model has the same density; the captured
    # pass runs it in eval mode (no host read of ActNorm's flag) and restores the mode.
    model = _model("glow")
    calls = _with_replayer(model, Replayer())
    model.train()
    v = torch.rand(3, 1, 8, 8)
    got = model.log_prob(v, captured=True)
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(got, model.log_prob(v).detach(), rtol=0, atol=0)
    assert calls["log_prob"].captures == 1


def _with_replayer(model, recorder):
    calls = {}
    for name, fn in (("decode", model._decode_flat), ("log_prob", model._log_prob_eval)):
        calls[name] = capture.CapturedCall(fn, "graph", state=model._state_tensors,
                                           _recorder=recorder)
        model.__dict__.setdefault("_captures", {})[(name, "graph")] = calls[name]
    return calls


def test_one_capture_per_key_and_static_buffers():
    model = _model("inverse-flow")
    recorder = Replayer()
    calls = _with_replayer(model, recorder)
    v1 = torch.rand(4, 1, 8, 8)
    v2 = torch.rand(4, 1, 8, 8)
    kept1 = v1.clone()
    a = model.log_prob(v1, captured=True)
    b = model.log_prob(v2, captured=True)
    assert recorder.captured == 1 and calls["log_prob"].captures == 1   # same key: one replay
    torch.testing.assert_close(v1, kept1, rtol=0, atol=0)               # input not modified
    # Each call returns its own result, not the static buffer the next replay overwrites.
    torch.testing.assert_close(a, model.log_prob(v1), rtol=0, atol=0)
    torch.testing.assert_close(b, model.log_prob(v2), rtol=0, atol=0)
    assert a.data_ptr() != b.data_ptr()
    entry, = calls["log_prob"]._entries.values()
    assert all(o.data_ptr() not in (a.data_ptr(), b.data_ptr()) for o in entry.static_outputs)
    model.log_prob(torch.rand(3, 1, 8, 8), captured=True)               # new batch size
    assert recorder.captured == 2
    # Samples: one key per n; temperature is applied to the latents, not captured.
    s = model.sample(5, temperature=0.5, generator=torch.Generator().manual_seed(1),
                     captured=True)
    model.sample(5, temperature=1.0, captured=True)
    assert calls["decode"].captures == 1
    torch.testing.assert_close(
        s, model.sample(5, temperature=0.5, generator=torch.Generator().manual_seed(1)))
    # Re-created parameters (dtype change) change the key: captured again.
    key = calls["log_prob"].key((v1,))
    model.double()
    assert calls["log_prob"].key((v1,)) != key
    out = model.log_prob(v1.double(), captured=True)
    assert out.dtype == torch.float64 and recorder.captured == 4
    torch.testing.assert_close(out, model.log_prob(v1.double()), rtol=0, atol=0)
    assert len(calls["log_prob"]._entries) == 1      # the float32 captures are dropped


def test_capture_failure_warns_once_and_runs_eagerly():
    model = _model("emerging")
    _with_replayer(model, Replayer(fail=True))
    v = torch.rand(4, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        first = model.log_prob(v, captured=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = model.log_prob(v, captured=True)
    torch.testing.assert_close(first, model.log_prob(v), rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_captured_model_still_deep_copies():
    import copy
    model = _model("glow")
    _with_replayer(model, Replayer())
    model.sample(2, captured=True)
    clone = copy.deepcopy(model)
    assert "_captures" not in clone.__dict__
    torch.testing.assert_close(clone.sample(3, generator=torch.Generator().manual_seed(0)),
                               model.sample(3, generator=torch.Generator().manual_seed(0)))


@pytest.mark.gpu
@pytest.mark.parametrize("name, method", [(name, "graph") for name in PRESETS]
                         + [("inverse-flow", "compile")])   # compiling takes a minute
def test_captured_equals_eager_on_cuda(name, method):
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    pytest.importorskip("cupy")
    model = _model(name, shape=(1, 16, 16), device="cuda")
    gen = lambda: torch.Generator(device="cuda").manual_seed(3)  # noqa: E731
    v = flows.dequantize(torch.randint(0, 256, (10, 1, 16, 16))).cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):                # capture, then replays
            got = model.sample(10, temperature=0.8, generator=gen(), captured=method)
            lp = model.log_prob(v, captured=method)
    # A fallback to eager would make this test vacuous.
    assert not [w for w in caught if "running eagerly" in str(w.message)]
    want = model.sample(10, temperature=0.8, generator=gen())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lp, model.log_prob(v).detach(), rtol=1e-4, atol=1e-3)
    if method == "graph":
        assert model._captures[("decode", "graph")].captures == 1
        assert model._captures[("log_prob", "graph")].captures == 1
        # In-place parameter updates are seen by the replay.
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        torch.testing.assert_close(model.log_prob(v, captured=True),
                                   model.log_prob(v).detach(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["inverse-flow", "emerging", "snf-small"])
def test_passes_trace_as_one_graph(name):
    # What method="compile" needs on CUDA: the passes trace without graph
    # breaks (invconv's ops through their fake kernels) and the traced graph
    # computes what eager does.  aot_eager traces like inductor, without
    # generating code.
    model = _model(name)
    v = flows.dequantize(torch.randint(0, 256, (4, 1, 8, 8)), torch.Generator().manual_seed(2))
    latents = [torch.randn(4, *s) for s in model.latent_shapes]
    torch._dynamo.reset()
    with torch.no_grad():
        lp = torch.compile(model._log_prob_eval, backend="aot_eager", fullgraph=True)(v)
        x = torch.compile(model._decode_flat, backend="aot_eager", fullgraph=True)(*latents)
        torch.testing.assert_close(lp, model.log_prob(v))
        torch.testing.assert_close(x, model.decode(latents))


# --------------------------------------------------------------------------
# the captured training step


class StepReplayer:
    """Stand-in recorder for a training step: capturing runs nothing (as a
    CUDA-graph capture runs nothing); a replay runs the step into the static
    outputs."""

    def __init__(self):
        self.captured = 0

    @staticmethod
    def available(args):
        return True

    def capture(self, fn, static_inputs):
        self.captured += 1
        outputs = (torch.zeros(()), torch.zeros(()))

        def replay():
            for o, f in zip(outputs, fn(*static_inputs)):
                o.copy_(f)
        return replay, outputs


def _training(seed=0):
    torch.manual_seed(seed)
    model = flows.build("inverse-flow", (1, 8, 8), steps=1, hidden=8, logit=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    batches = [flows.dequantize(torch.randint(0, 256, (n, 1, 8, 8)),
                                torch.Generator().manual_seed(seed + i))
               for i, n in enumerate([6, 6, 6, 6, 4, 4, 6, 6])]
    return model, optimizer, scheduler, batches


def _loss(model):
    return lambda v: -model.log_prob(v).mean()


def test_captured_step_equals_the_eager_loop():
    # The CLI's eager loop, step by step ...
    model, optimizer, scheduler, batches = _training()
    eager = []
    for i, v in enumerate(batches):
        loss = _loss(model)(v)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        eager.append((loss.detach(), norm))
        if i == 5:
            scheduler.step()
    expected = [p.detach().clone() for p in model.parameters()]

    # ... and the captured step with a stand-in recorder: 2 eager warm-up
    # steps, a capture at step 3, captures again for the new batch size
    # (step 5) and for the size and learning rate changing back (step 7),
    # replays in between.
    model, optimizer, scheduler, batches = _training()
    recorder = StepReplayer()
    step = capture.CapturedStep(_loss(model), model.parameters(), optimizer, 5.0, warmup=2,
                                _recorder=recorder)
    for i, v in enumerate(batches):
        loss, norm = step(v)
        torch.testing.assert_close(loss, eager[i][0], rtol=0, atol=0)
        torch.testing.assert_close(norm, eager[i][1], rtol=0, atol=0)
        if i == 5:
            scheduler.step()
    assert step.steps == 8 and step.captures == recorder.captured == 3
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)


def test_captured_step_off_cuda_is_eager():
    model, optimizer, _, batches = _training()
    step = capture.CapturedStep(_loss(model), model.parameters(), optimizer, 5.0)
    for v in batches[:5]:
        loss, norm = step(v)
        assert loss.shape == () and torch.isfinite(norm)
    assert step.captures == 0 and step.steps == 5


def test_captured_step_arguments_are_checked():
    model, optimizer, _, batches = _training()
    with pytest.raises(ValueError, match="warmup"):
        capture.CapturedStep(_loss(model), model.parameters(), optimizer, 5.0, warmup=0)
    with pytest.raises(ValueError, match="method"):
        capture.CapturedStep(_loss(model), model.parameters(), optimizer, 5.0, method="compile")
    with pytest.raises(TypeError, match="batch must be a torch.Tensor"):
        capture.CapturedStep(_loss(model), model.parameters(), optimizer, 5.0)(batches[0].numpy())


@pytest.mark.gpu
def test_captured_step_on_cuda_equals_eager():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    results = []
    for captured in (False, True):
        model, _, _, batches = _training()
        model = model.cuda()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
        step = capture.CapturedStep(_loss(model), model.parameters(), optimizer, 5.0,
                                    method="graph" if captured else "eager")
        losses = [step(v.cuda())[0] for v in batches]
        results.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
        assert step.captures == (3 if captured else 0)   # at steps 4 (size 6), 5 (4), 7 (6)
    (eager_losses, eager_params), (losses, params) = results
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for p, e in zip(params, eager_params):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
