"""Bad input gets a clear error naming the argument; awkward input just works."""
import numpy as np
import pytest

import invconv
from support import assert_close, make_weight

OPS = ["conv2d", "inv_conv2d", "conv2d_vjp", "inv_conv2d_vjp"]


def call(name, x, w, **opts):
    f = getattr(invconv, name)
    if name.endswith("vjp"):
        return f(x, x, w, **opts)
    return f(x, w, **opts)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 4, 5, 6)), make_weight(rng, 4, 2, 3, 3, unit_diagonal=False, junk=0.0)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("bad, kwargs, error, words", [
    ("x_ndim", {}, ValueError, "4 dimensions"),
    ("w_ndim", {}, ValueError, "weight must have 4 dimensions"),
    ("channels", {}, ValueError, "channels"),
    ("groups", {"groups": 3}, ValueError, "not divisible by groups=3"),
    ("groups_shape", {"groups": 1}, ValueError, "second dimension"),
    ("groups_type", {"groups": 2.0}, TypeError, "groups must be an integer"),
    ("groups_zero", {"groups": 0}, ValueError, "groups must be >= 1"),
    ("corner", {"corner": "middle"}, ValueError, "corner must be one of"),
    ("backend", {"backend": "gpu"}, ValueError, "backend must be None or one of"),
    ("unit", {"unit_diagonal": "yes"}, TypeError, "unit_diagonal must be a bool"),
    ("int", {}, TypeError, "int64"),
    ("complex", {}, TypeError, "complex128"),
    ("bool", {}, TypeError, "bool"),
    ("mixed", {}, TypeError, "weight has dtype float32"),
    ("list", {}, TypeError, "got list"),
    ("kernel", {}, ValueError, "kernel size"),
    ("stream", {"stream": object()}, ValueError, "stream"),
    ("cuda", {"backend": "cuda"}, ValueError, "backend='cuda' takes CuPy arrays"),
])
def test_bad_input_raises_clearly(data, name, bad, kwargs, error, words):
    x, w = data
    kwargs = dict({"groups": 2}, **kwargs)
    if bad == "x_ndim":
        x = x[0]
    elif bad == "w_ndim":
        w = w[0]
    elif bad == "channels":
        x = x[:, :3]
    elif bad == "int":
        x = x.astype(np.int64)
    elif bad == "complex":
        x = x.astype(np.complex128)
    elif bad == "bool":
        x = x > 0
    elif bad == "mixed":
        w = w.astype(np.float32)
    elif bad == "list":
        x = x.tolist()
    elif bad == "kernel":
        w = np.zeros((4, 2, 0, 3))
    with pytest.raises(error, match=words):
        call(name, x, w, **kwargs)


@pytest.mark.parametrize("name, image", [("conv2d", "x"), ("inv_conv2d", "y"),
                                         ("conv2d_vjp", "grad_y"), ("inv_conv2d_vjp", "grad_x")])
def test_channel_mismatch_names_the_image_argument(data, name, image):
    x, w = data
    with pytest.raises(ValueError, match=rf"^{image} has 3 channels but weight has 4"):
        call(name, x[:, :3], w, groups=2)


@pytest.mark.parametrize("name", ["conv2d_vjp", "inv_conv2d_vjp"])
def test_vjp_shapes_must_agree(data, name):
    x, w = data
    with pytest.raises(ValueError, match="has shape"):
        getattr(invconv, name)(x[:, :, :4], x, w, groups=2)


@pytest.mark.parametrize("name", ["inv_conv2d", "inv_conv2d_vjp"])
def test_zero_diagonal_is_a_value_error(data, name):
    x, w = data
    w = w.copy()
    w[3, 1, 2, 2] = 0.0   # the same-pixel diagonal of channel 3 (group-local 1)
    with pytest.raises(ValueError, match=r"weight\[3, 1, 2, 2\] is zero"):
        call(name, x, w, groups=2, unit_diagonal=False)
    # A unit diagonal ignores what is stored there.
    call(name, x, w, groups=2, unit_diagonal=True)
    assert invconv.logdet(w, 5, 6, groups=2, unit_diagonal=False) == -np.inf


@pytest.mark.parametrize("name", OPS)
def test_empty_batch(data, name, backend):
    x, w = data
    out = call(name, x[:0], w, groups=2, backend=backend)
    outs = out if isinstance(out, tuple) else (out,)
    assert outs[0].shape == (0, 4, 5, 6)
    if len(outs) == 2:
        assert outs[1].shape == w.shape and not outs[1].any()


@pytest.mark.parametrize("name", OPS)
def test_noncontiguous_and_readonly_inputs_are_untouched(data, name, backend):
    x, w = data
    big = np.repeat(np.repeat(x, 2, axis=2), 3, axis=3)
    sliced = big[:, :, ::2, ::3]               # non-contiguous view, same values as x
    np.testing.assert_array_equal(sliced, x)
    wt = np.ascontiguousarray(w.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    assert not wt.flags.c_contiguous
    for a in (big, wt):
        a.flags.writeable = False
    before = big.copy(), wt.copy()
    expected = call(name, x, w, groups=2, backend=backend)
    got = call(name, sliced, wt, groups=2, backend=backend)
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,),
                    got if isinstance(got, tuple) else (got,)):
        assert_close(g, e)
    np.testing.assert_array_equal(big, before[0])
    np.testing.assert_array_equal(wt, before[1])


class DLPackOnly:
    """Anything with __dlpack__ (here a CPU buffer) must be accepted."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_objects_come_back_as_numpy(data):
    x, w = data
    y = invconv.conv2d(DLPackOnly(x), DLPackOnly(w), groups=2)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, invconv.conv2d(x, w, groups=2))


def test_torch_cpu_tensors_come_back_as_numpy(data):
    torch = pytest.importorskip("torch")
    x, w = data
    y = invconv.inv_conv2d(torch.from_numpy(x), torch.from_numpy(w), groups=2)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, invconv.inv_conv2d(x, w, groups=2))


def test_nan_and_inf_propagate(data, backend):
    x, w = data
    x = x.copy()
    x[0, 0, 0, 0] = np.nan
    x[1, 2, 1, 1] = np.inf
    y = invconv.inv_conv2d(x, w, groups=2, backend=backend)
    assert np.isnan(y[0]).any() and not np.isfinite(y[1]).all()
    assert np.isfinite(y[0, 2:]).all()    # the other group of image 0 is untouched


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_byte_swapped_arrays_are_accepted(data, name, dtype, backend):
    x, w = (a.astype(dtype) for a in data)
    other = np.dtype(dtype).newbyteorder("S")          # same values, other byte order
    xs, ws = x.astype(other), w.astype(other)
    assert not xs.dtype.isnative and (xs == x).all()
    before = xs.tobytes(), ws.tobytes()
    expected = call(name, x, w, groups=2, backend=backend)
    for args in ((xs, ws), (xs, w), (x, ws)):          # swapped and native mix freely
        got = call(name, *args, groups=2, backend=backend)
        for e, g in zip(expected if isinstance(expected, tuple) else (expected,),
                        got if isinstance(got, tuple) else (got,)):
            assert g.dtype == np.dtype(dtype)          # native out
            np.testing.assert_array_equal(g, e)
    assert (xs.tobytes(), ws.tobytes()) == before and xs.dtype == other
    assert invconv.logdet(ws, 5, 6, groups=2, unit_diagonal=False) == \
        invconv.logdet(w, 5, 6, groups=2, unit_diagonal=False)
    swapped_operator = invconv.reference.operator(ws, 5, 6, groups=2, unit_diagonal=False)
    assert swapped_operator.dtype == np.dtype(dtype)
    assert (swapped_operator != invconv.reference.operator(w, 5, 6, groups=2,
                                                           unit_diagonal=False)).nnz == 0


def test_byte_swapped_non_floats_are_still_refused(data):
    x, w = data
    with pytest.raises(TypeError, match="x has dtype int64"):
        invconv.conv2d(x.astype(np.dtype(np.int64).newbyteorder("S")), w, groups=2)
