"""The fast call path: cached validation and preparation, and the torch
adapter's direct route to the backends.

Every check must still fire on a signature seen before, results must follow
the weight's values (not its identity), caches keep their bounds, and the
direct route must agree with the dispatched operators bit for bit.
"""
import threading

import numpy as np
import pytest

import invconv
from invconv import _api, _cache, _cpu
from support import assert_close, dense_operator, make_weight


def _case(seed=0, C=3, groups=1, k=3, unit=False, shape=(2, 3, 5, 6), corner="top-left"):
    rng = np.random.default_rng(seed)
    w = make_weight(rng, C, groups, k, k, corner, unit)
    y = rng.standard_normal(shape)
    return y, w


# --------------------------------------------------------------------------
# the bounded cache


def test_bounded_cache_keeps_both_bounds():
    cache = _cache.BoundedCache(max_entries=3, max_bytes=100)
    for i in range(10):
        cache.put(i, str(i), 20)
        assert len(cache) <= 3 and cache.nbytes <= 100
    assert [cache.get(i) for i in (7, 8, 9)] == ["7", "8", "9"]
    assert cache.get(0) is None


def test_bounded_cache_never_stores_an_oversized_value():
    cache = _cache.BoundedCache(max_entries=8, max_bytes=100)
    cache.put("small", 1, 10)
    assert cache.put("huge", 2, 26) == 2          # handed back, not stored
    assert cache.get("huge") is None and cache.get("small") == 1
    assert cache.nbytes == 10


def test_bounded_cache_evicts_least_recently_used():
    cache = _cache.BoundedCache(max_entries=2, max_bytes=100)
    cache.put("a", 1, 1)
    cache.put("b", 2, 1)
    cache.get("a")
    cache.put("c", 3, 1)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3


# --------------------------------------------------------------------------
# the array API: checks on a signature seen before


def test_every_check_still_fires_after_a_good_call():
    y, w = _case(unit=False)
    invconv.inv_conv2d(y, w, unit_diagonal=False)          # the signature is now known
    zero = w.copy()
    zero[1, 1, 2, 2] = 0
    with pytest.raises(ValueError, match=r"weight\[1, 1, 2, 2\] is zero"):
        invconv.inv_conv2d(y, zero, unit_diagonal=False)
    with pytest.raises(ValueError, match="y has 4 channels"):
        invconv.inv_conv2d(np.zeros((2, 4, 5, 6)), w, unit_diagonal=False)
    with pytest.raises(TypeError, match="groups must be an integer"):
        invconv.inv_conv2d(y, w, groups=1.0, unit_diagonal=False)
    with pytest.raises(TypeError, match="unit_diagonal must be a bool"):
        invconv.inv_conv2d(y, w, unit_diagonal=0)
    with pytest.raises(TypeError, match="dtype"):
        invconv.inv_conv2d(y.astype(np.float32), w, unit_diagonal=False)
    with pytest.raises(ValueError, match="backend must be"):
        invconv.inv_conv2d(y, w, unit_diagonal=False, backend=["cpu"])   # unhashable
    with pytest.raises(ValueError, match="stream is only meaningful"):
        invconv.inv_conv2d(y, w, unit_diagonal=False, stream=object())


def test_the_signature_cache_keeps_its_bound(monkeypatch):
    monkeypatch.setattr(_api, "_signatures", _cache.BoundedCache(max_entries=4, max_bytes=1 << 20))
    w = _case()[1]
    for W in range(1, 12):
        invconv.conv2d(np.ones((1, 3, 2, W)), w)
        assert len(_api._signatures) <= 4


# --------------------------------------------------------------------------
# the cpu backend: derived work cached by the weight's values


@pytest.mark.parametrize("op", ["conv2d", "inv_conv2d"])
def test_a_weight_changed_in_place_gives_the_new_result(op):
    y, w = _case(unit=True)
    fn = getattr(invconv, op)
    first = fn(y, w)
    w *= 0.5                                      # same array, new values
    M = dense_operator(w, 5, 6)
    flat = y.reshape(2, -1)
    expected = (flat @ M.T if op == "conv2d" else np.linalg.solve(M, flat.T).T)
    second = fn(y, w)
    assert not np.array_equal(first, second)
    assert_close(second.reshape(2, -1), expected)


def test_cached_operators_are_read_only_and_bounded(monkeypatch):
    monkeypatch.setattr(_cpu, "_derived", _cache.BoundedCache(max_entries=6, max_bytes=1 << 20))
    rng = np.random.default_rng(1)
    y = rng.standard_normal((1, 2, 4, 4))
    for _ in range(10):                           # a new weight every call, as in training
        w = 0.1 * rng.standard_normal((2, 2, 3, 3))
        x = invconv.inv_conv2d(y, w)
        assert_close(invconv.conv2d(x, w), y)
        assert len(_cpu._derived) <= 6
    operator = _cpu._blocks(w, _api.make_conv(w.shape, corner="top-left", groups=1,
                                              unit_diagonal=True), adjoint=False)
    with pytest.raises(ValueError):
        operator.blocks[0, 0, 0, 0] = 1.0


def test_threads_with_different_weights_get_their_own_answers():
    rng = np.random.default_rng(2)
    y = rng.standard_normal((2, 3, 6, 5))
    weights = [0.1 * rng.standard_normal((3, 3, 3, 3)) for _ in range(6)]
    expected = [invconv.reference.inv_conv2d(y, w) for w in weights]
    errors = []

    def work(i):
        for _ in range(20):
            got = invconv.inv_conv2d(y, weights[i])
            if not np.allclose(got, expected[i], rtol=1e-10, atol=1e-12):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_non_finite_weight_after_a_finite_one_takes_the_exact_path():
    y, w = _case(unit=True)
    invconv.inv_conv2d(y, w)
    w = w.copy()
    w[0, 0, 0, 0] = np.nan                        # top-left tap (0, 0): reads 2 rows up, 2 left
    x = invconv.inv_conv2d(y, w)
    assert np.isnan(x).any() and np.isfinite(x[:, :, :2, :]).all()


# --------------------------------------------------------------------------
# the torch adapter's direct route

torch = pytest.importorskip("torch")
import invconv.torch as it  # noqa: E402


def _torch_case(unit=False, grad=True):
    y, w = _case(unit=unit)
    yt, wt = torch.tensor(y), torch.tensor(w)
    return yt.requires_grad_(grad), wt.requires_grad_(grad)


@pytest.mark.parametrize("name", ["conv2d", "inv_conv2d"])
def test_the_direct_route_is_the_dispatched_op_bit_for_bit(name, monkeypatch):
    y, w = _torch_case()
    opts = dict(corner="top-left", groups=1, unit_diagonal=False)
    op = getattr(it, name + "_op")
    g = torch.randn(y.shape, dtype=y.dtype)
    out = getattr(it, name)(y, w, **opts)
    grads = torch.autograd.grad(out, (y, w), g)
    expected = op(y, w, "top-left", 1, False)
    expected_grads = torch.autograd.grad(expected, (y, w), g)
    assert torch.equal(out, expected)
    for a, b in zip(grads, expected_grads):
        assert torch.equal(a, b)
    assert type(out.grad_fn).__name__.endswith("_fastBackward")
    # and the backward really ran the backends directly: no dispatched op is used
    for attr in ("conv2d", "inv_conv2d", "conv2d_adjoint", "inv_conv2d_adjoint", "weight_grad"):
        monkeypatch.setattr(it._DISPATCHED, attr, None)
    out = getattr(it, name)(y, w, **opts)
    again = torch.autograd.grad(out, (y, w), g)
    for a, b in zip(again, expected_grads):
        assert torch.equal(a, b)


def test_no_gradient_needed_records_nothing():
    y, w = _torch_case(grad=False)
    out = it.inv_conv2d(y, w, unit_diagonal=False)
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():
        assert it.inv_conv2d(*_torch_case(), unit_diagonal=False).grad_fn is None


def test_double_backward_through_the_fast_route():
    y, w = _torch_case()
    assert torch.autograd.gradgradcheck(
        lambda a, b: it.inv_conv2d(a, b, unit_diagonal=False), (y, w))
    assert torch.autograd.gradgradcheck(
        lambda a, b: it.conv2d(a, b, unit_diagonal=False), (y, w))


def test_transforms_and_tracing_take_the_dispatched_op():
    y, w = _torch_case(grad=False)
    assert it._plain(y, w)
    seen = []
    torch.func.vmap(lambda a: seen.append(it._plain(a, w)) or a)(y)
    torch.func.grad(lambda a: seen.append(it._plain(a, w)) or a.sum())(y)
    with torch.autograd.forward_ad.dual_level():
        seen.append(it._plain(y, w))
    with torch.device("meta"):
        seen.append(it._plain(torch.empty(1), w))
    assert seen == [False] * 4
    # forward mode through the public function still carries the tangent
    t = torch.randn(y.shape, dtype=y.dtype)
    _, jvp = torch.func.jvp(lambda a: it.inv_conv2d(a, w, unit_diagonal=False), (y,), (t,))
    assert torch.allclose(jvp, it.inv_conv2d(t, w, unit_diagonal=False))


def test_torch_checks_still_fire_after_a_good_call():
    y, w = _torch_case(grad=False)
    it.inv_conv2d(y, w, unit_diagonal=False)
    with pytest.raises(TypeError, match="groups must be an integer"):
        it.inv_conv2d(y, w, groups=1.0, unit_diagonal=False)
    with pytest.raises(ValueError, match="y has 3 channels but weight has 4"):
        it.inv_conv2d(y, torch.zeros(4, 4, 3, 3, dtype=y.dtype), unit_diagonal=False)
    zero = w.clone()
    zero[2, 2, 2, 2] = 0
    with pytest.raises(ValueError, match="is zero"):
        it.inv_conv2d(y, zero, unit_diagonal=False)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        it.inv_conv2d(y, w.numpy(), unit_diagonal=False)
    with pytest.raises(TypeError, match="float32 or float64"):
        it.inv_conv2d(y.float(), w, unit_diagonal=False)
