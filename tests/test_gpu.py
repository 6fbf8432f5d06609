"""The CUDA backend against the reference at realistic sizes (needs a GPU)."""
import numpy as np
import pytest

import invconv
from support import CORNERS, assert_close, make_weight

pytestmark = pytest.mark.gpu

# (B, C, H, W, k): flow-typical shapes, and one whose slice does not fit in
# shared memory (3 x 256 x 256 floats is 768 KiB).
SHAPES = [
    (100, 1, 64, 64, 3),
    (100, 3, 32, 32, 5),
    (100, 12, 16, 16, 3),
    (100, 48, 8, 8, 2),
    (16, 48, 16, 16, 3),
    (4, 3, 256, 256, 3),
]


def _run_all(xp_arrays, w, opts, backend=None):
    x, g = xp_arrays
    out = {
        "conv": invconv.conv2d(x, w, backend=backend, **opts),
        "inv": invconv.inv_conv2d(x, w, backend=backend, **opts),
    }
    out["conv_vjp"] = invconv.conv2d_vjp(g, x, w, backend=backend, **opts)
    out["inv_vjp"] = invconv.inv_conv2d_vjp(g, x, w, backend=backend, **opts)
    return out


def _flatten(results):
    for key, value in results.items():
        if isinstance(value, tuple):
            for k, v in enumerate(value):
                yield f"{key}[{k}]", v
        else:
            yield key, value


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{b}x{c}x{h}x{w}-k{k}" for b, c, h, w, k in SHAPES])
def test_cuda_matches_reference(shape, dtype):
    cupy = pytest.importorskip("cupy")
    B, C, H, W, k = shape
    rng = np.random.default_rng(B * C * H + k)
    for groups in sorted({1, C}):
        corner = CORNERS[rng.integers(4)]
        unit = bool(rng.integers(2))
        w = make_weight(rng, C, groups, k, k, corner, unit, dtype)
        x = rng.standard_normal((B, C, H, W)).astype(dtype)
        g = rng.standard_normal((B, C, H, W)).astype(dtype)
        opts = dict(corner=corner, groups=groups, unit_diagonal=unit)
        expected = _run_all((x, g), w, opts, backend="reference")
        got = _run_all((cupy.asarray(x), cupy.asarray(g)), cupy.asarray(w), opts)
        for (name, e), (_, a) in zip(_flatten(expected), _flatten(got)):
            assert isinstance(a, cupy.ndarray), name
            assert_close(cupy.asnumpy(a), e, dtype, scale=20)


def test_stream_and_noncontiguous_inputs_give_the_same_results():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(5)
    w = cupy.asarray(make_weight(rng, 12, 3, 3, 3, "bottom-left", False, np.float32))
    big = cupy.asarray(rng.standard_normal((32, 12, 40, 60)).astype(np.float32))
    x = big[:, :, ::2, ::3]
    assert not x.flags.c_contiguous
    opts = dict(corner="bottom-left", groups=3, unit_diagonal=False)
    expected = _run_all((cupy.ascontiguousarray(x), cupy.ascontiguousarray(x)), w, opts)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        got = _run_all((x, x), w, opts)
    got_kw = _run_all((x, x), w, dict(opts))
    stream.synchronize()
    for (name, e), (_, a), (_, b) in zip(_flatten(expected), _flatten(got), _flatten(got_kw)):
        cupy.testing.assert_array_equal(a, e)
        cupy.testing.assert_array_equal(b, e)
    y = invconv.inv_conv2d(x, w, stream=stream, **opts)
    stream.synchronize()
    cupy.testing.assert_array_equal(y, expected["inv"])


@pytest.mark.parametrize("op", ["conv2d", "inv_conv2d", "conv2d_vjp", "inv_conv2d_vjp"])
@pytest.mark.parametrize("groups, unit_diagonal", [(1, True), (2, False)])
def test_nonfinite_reaches_exactly_its_dependents(op, groups, unit_diagonal):
    # tests/test_nonfinite.py's check on the CUDA kernels: a NaN or Inf in an
    # input reaches exactly the outputs that depend on it (no 0 * NaN).
    cupy = pytest.importorskip("cupy")
    from test_nonfinite import check_nonfinite_reach

    def run(op, args, opts):
        out = getattr(invconv, op)(*map(cupy.asarray, args), **opts)
        return tuple(map(cupy.asnumpy, out)) if isinstance(out, tuple) else cupy.asnumpy(out)
    for value in (np.nan, np.inf):
        for corner in CORNERS:
            check_nonfinite_reach(run, op, value, corner, groups, unit_diagonal, np.float32)


def test_torch_cuda_tensors_come_back_as_cupy():
    cupy = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(6)
    w = make_weight(rng, 4, 1, 3, 3, "top-left", True, np.float32)
    x = rng.standard_normal((2, 4, 9, 7)).astype(np.float32)
    y = invconv.inv_conv2d(torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda())
    assert isinstance(y, cupy.ndarray)
    assert_close(cupy.asnumpy(y), invconv.inv_conv2d(x, w))


def test_mixed_devices_are_refused():
    cupy = pytest.importorskip("cupy")
    x = cupy.zeros((1, 2, 3, 3), dtype=cupy.float32)
    with pytest.raises(ValueError, match="one device"):
        invconv.conv2d(x, np.zeros((2, 2, 3, 3), dtype=np.float32))


def test_benchmark_graph_replays_match_eager_calls():
    # The benchmarks time CUDA-graph replays; a replay must compute what the
    # eager call does (CudaGraphReplay checks this itself, and raises).
    import cupy
    from invconv.benchmarks import CudaGraphReplay
    rng = np.random.default_rng(5)
    w = cupy.asarray(make_weight(rng, 12, 1, 3, 3, "top-left", True, np.float32))
    sets = [tuple(cupy.asarray(rng.standard_normal((8, 12, 16, 16)).astype(np.float32))
                  for _ in range(2)) for _ in range(3)]
    for fn in (lambda x, g: invconv.inv_conv2d(x, w),
               lambda x, g: invconv.inv_conv2d_vjp(g, x, w)):
        launch, replays = CudaGraphReplay(fn).capture(sets)
        for (x, g), replay in zip(sets, replays):
            launch(*replay)
            cupy.cuda.Device().synchronize()
            want = fn(x, g)
            got = replay[1]
            for a, e in zip(got if isinstance(got, tuple) else (got,),
                            want if isinstance(want, tuple) else (want,)):
                assert_close(cupy.asnumpy(a), cupy.asnumpy(e))
