"""The operator convention, input validation and backend dispatch.

Every public function of :mod:`invconv` lands here.  This module is the one
place that says what the masked convolution *is*; the backends only compute.

The operator
------------
``x`` and ``y`` have shape ``(B, C, H, W)``; ``weight`` has shape
``(C, C // groups, kh, kw)``.  The convolution is the cross-correlation of
:func:`torch.nn.functional.conv2d` applied to ``x`` zero-padded with ``kh - 1``
rows on one vertical side and ``kw - 1`` columns on one horizontal side, the
sides given by ``corner``:

=============== ============================== =====================
corner          pads (left, right, top, bottom) same-pixel tap
=============== ============================== =====================
"top-left"      (kw-1, 0, kh-1, 0)              ``W[:, :, kh-1, kw-1]``
"top-right"     (0, kw-1, kh-1, 0)              ``W[:, :, kh-1, 0]``
"bottom-left"   (kw-1, 0, 0, kh-1)              ``W[:, :, 0, kw-1]``
"bottom-right"  (0, kw-1, 0, kh-1)              ``W[:, :, 0, 0]``
=============== ============================== =====================

Inside each group the same-pixel ``C_g x C_g`` block is lower-triangular:
entries whose (group-local) input channel exceeds the output channel are
*ignored* -- never read, gradient exactly zero -- like the unreferenced
triangle of BLAS ``trsm``.  With ``unit_diagonal=True`` the diagonal of that
block is taken as 1 whatever is stored (also ignored).  Ordered pixel-major
from the padded corner, the operator is therefore triangular, and invertible
exactly when every diagonal entry is non-zero.

In offset form, output pixel ``(h, w)`` reads input pixel
``(h - rs * du, w - cs * dv)`` for ``0 <= du < kh``, ``0 <= dv < kw``, where
``rs = +1`` for a padded top (``-1`` for bottom) and ``cs = +1`` for a padded
left (``-1`` for right).  The kernels and the reference share this form.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from . import _backends, _cache

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
BACKENDS = _backends.names()
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# DLPack device types (dlpack.h, DLDeviceType).
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


@dataclass(frozen=True)
class Conv:
    """Static description of one masked convolution (shapes and options)."""

    channels: int
    groups: int
    kh: int
    kw: int
    corner: str
    unit_diagonal: bool

    @property
    def group_channels(self) -> int:
        return self.channels // self.groups

    @property
    def row_sign(self) -> int:
        """+1 when the padding is on top (pixels read from above), else -1."""
        return 1 if self.corner.startswith("top") else -1

    @property
    def col_sign(self) -> int:
        """+1 when the padding is on the left, else -1."""
        return 1 if self.corner.endswith("left") else -1

    @property
    def same_pixel_tap(self) -> tuple[int, int]:
        return (self.kh - 1 if self.row_sign > 0 else 0,
                self.kw - 1 if self.col_sign > 0 else 0)

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) zero padding, as for ``F.pad``."""
        left = self.kw - 1 if self.col_sign > 0 else 0
        top = self.kh - 1 if self.row_sign > 0 else 0
        return (left, self.kw - 1 - left, top, self.kh - 1 - top)

    def ignored_mask(self) -> np.ndarray:
        """Boolean ``(C, C_g, kh, kw)``: True where the weight is never read."""
        return ignored(self).copy()

    def diagonal(self, weight):
        """The stored same-pixel diagonal ``W[c, c % C_g, u0, v0]``, shape (C,)."""
        u0, v0 = self.same_pixel_tap
        c = np.arange(self.channels)
        return weight[c, c % self.group_channels, u0, v0]


# Ignored-entry masks by Conv, built once: bounded in bytes too, since a
# mask is as large as the weight.
_ignored_masks = _cache.BoundedCache(max_entries=256, max_bytes=64 << 20)


def _build_ignored(conv: Conv) -> np.ndarray:
    cg = conv.group_channels
    out_local = np.arange(conv.channels)[:, None] % cg
    in_local = np.arange(cg)[None, :]
    block = in_local > out_local
    if conv.unit_diagonal:
        block = block | (in_local == out_local)
    mask = np.zeros((conv.channels, cg, conv.kh, conv.kw), dtype=bool)
    u0, v0 = conv.same_pixel_tap
    mask[:, :, u0, v0] = block
    return _cache.frozen(mask)


def ignored(conv: Conv) -> np.ndarray:
    """:meth:`Conv.ignored_mask`, read-only and shared (for the hot paths)."""
    return _ignored_masks.get_or_build(conv, lambda: _build_ignored(conv), lambda m: m.nbytes)


def effective_weight(weight, conv: Conv):
    """``W_eff``: the weight with the masking rules applied (ignored -> 0 or 1).

    Works for NumPy and CuPy arrays; ignored entries are replaced, never
    multiplied, so a NaN stored there cannot leak into results.
    """
    xp = _array_module(weight)
    out = xp.where(xp.asarray(ignored(conv)), xp.zeros((), dtype=weight.dtype), weight)
    if conv.unit_diagonal:
        u0, v0 = conv.same_pixel_tap
        c = xp.arange(conv.channels)
        out[c, c % conv.group_channels, u0, v0] = 1
    return out


# --------------------------------------------------------------------------
# arrays


def _array_module(a):
    if isinstance(a, np.ndarray):
        return np
    import cupy  # only reached for CuPy arrays
    return cupy


def _is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def _import_cupy(why: str):
    try:
        import cupy
    except Exception as exc:  # ImportError, or CUDA libraries missing
        raise RuntimeError(
            f"{why} needs CuPy with a CUDA device, but CuPy could not be "
            f"imported ({exc}); install invconv[cuda12] or invconv[cuda13]"
        ) from exc
    return cupy


def as_array(obj, name: str):
    """Return ``(array, kind)`` with kind "numpy" or "cupy".

    NumPy and CuPy arrays pass through, except that a NumPy array in
    non-native byte order comes back as a native copy (the kernels read
    native numbers, and the input must not change); any other object
    exporting ``__dlpack__`` is imported without a copy, to NumPy when it
    lives on the CPU and to CuPy when it lives on a CUDA device.
    """
    if isinstance(obj, np.ndarray):
        if not obj.dtype.isnative:
            return obj.astype(obj.dtype.newbyteorder("=")), "numpy"
        return obj, "numpy"
    if _is_cupy(obj) and hasattr(obj, "__cuda_array_interface__"):
        return obj, "cupy"
    if not hasattr(obj, "__dlpack__") or not hasattr(obj, "__dlpack_device__"):
        raise TypeError(
            f"{name} must be a NumPy or CuPy array or an object with "
            f"__dlpack__, got {type(obj).__name__}")
    try:
        device_type = int(obj.__dlpack_device__()[0])
    except Exception as exc:
        raise TypeError(f"{name}: __dlpack_device__() failed: {exc}") from exc
    if device_type == _DL_CPU:
        importer, kind = np.from_dlpack, "numpy"
    elif device_type in (_DL_CUDA, _DL_CUDA_MANAGED):
        importer, kind = _import_cupy(f"{name} lives on a CUDA device and").from_dlpack, "cupy"
    else:
        importer = None
    if importer is not None:
        try:
            return importer(obj), kind
        except (RuntimeError, BufferError, TypeError, ValueError) as exc:
            raise TypeError(f"{name} could not be imported through DLPack: {exc}") from exc
    raise TypeError(
        f"{name} lives on DLPack device type {device_type}; only CPU (1) and "
        f"CUDA (2) arrays are supported")


def _check_float(a, name: str):
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {a.dtype}; invconv supports float32 and float64")


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def make_conv(weight_shape, *, corner, groups, unit_diagonal, channels=None,
              image="x") -> Conv:
    """Validate options against a weight shape and return the :class:`Conv`.

    ``channels``: the channel count of the image argument named ``image``, if any.
    """
    if not isinstance(corner, str) or corner not in CORNERS:
        raise ValueError(f"corner must be one of {CORNERS}, got {corner!r}")
    groups = _check_int(groups, "groups", 1)
    if not isinstance(unit_diagonal, (bool, np.bool_)):
        raise TypeError(
            f"unit_diagonal must be a bool, got {type(unit_diagonal).__name__}")
    if len(weight_shape) != 4:
        raise ValueError(
            f"weight must have 4 dimensions (C, C // groups, kh, kw), got shape "
            f"{tuple(weight_shape)}")
    c_out, c_in, kh, kw = (int(s) for s in weight_shape)
    if kh < 1 or kw < 1:
        raise ValueError(f"weight kernel size (kh, kw) = ({kh}, {kw}) must be >= 1")
    if c_out < 1:
        raise ValueError(f"weight must have at least one output channel, got shape {tuple(weight_shape)}")
    if c_out % groups:
        raise ValueError(
            f"the channel count {c_out} of weight is not divisible by groups={groups}")
    if c_in != c_out // groups:
        raise ValueError(
            f"weight has shape {tuple(weight_shape)}; with groups={groups} its "
            f"second dimension must be C // groups = {c_out // groups}")
    if channels is not None and channels != c_out:
        raise ValueError(
            f"{image} has {channels} channels but weight has {c_out} output channels")
    return Conv(c_out, groups, kh, kw, corner, bool(unit_diagonal))


def check_nonsingular(weight, conv: Conv) -> None:
    """Raise ValueError if a stored diagonal entry is zero (non-unit only).

    For a CuPy weight this reads C values back to the host.
    """
    if conv.unit_diagonal:
        return
    diag = conv.diagonal(weight)
    zero = diag == 0
    if bool(zero.any()):
        c = int(np.flatnonzero(_to_host(zero))[0])
        u0, v0 = conv.same_pixel_tap
        raise ValueError(
            f"weight[{c}, {c % conv.group_channels}, {u0}, {v0}] is zero: with "
            f"unit_diagonal=False the same-pixel diagonal must be non-zero, "
            f"otherwise the convolution is singular and has no inverse")


def _to_host(a):
    return a if isinstance(a, np.ndarray) else a.get()


@dataclass
class _Call:
    arrays: dict
    weight: object
    conv: Conv
    kind: str
    backend: str
    stream: object


def _prepare(images: dict, weight, *, corner, groups, unit_diagonal, backend, stream,
             solve=False, host_sync=True) -> _Call:
    """Validate the arguments of one op and pick its backend.

    images maps argument name -> array.  With ``solve=True`` (the op solves
    with M or M^T) this is the one place that checks the diagonal; on CuPy
    arrays that reads C values back to the host, so a caller that must not
    synchronise (the torch adapter on CUDA) passes ``host_sync=False`` and
    gets inf/NaN from a zero diagonal instead of an error.
    """
    arrays, kinds = {}, {}
    for name, obj in images.items():
        arrays[name], kinds[name] = as_array(obj, name)
    weight, kinds["weight"] = as_array(weight, "weight")
    try:
        signature = (tuple((n, kinds[n], a.shape, a.dtype) for n, a in arrays.items()),
                     kinds["weight"], weight.shape, weight.dtype, _devices(arrays, weight),
                     type(corner), corner, type(groups), groups, type(unit_diagonal),
                     unit_diagonal, type(backend), backend, stream is None)
        known = _signatures.get(signature)
    except TypeError:               # an unhashable argument: the checks below name it
        signature = known = None
    if known is None:
        known = _validate(arrays, kinds, weight, corner, groups, unit_diagonal, backend, stream)
        if signature is not None:
            _signatures.put(signature, known, 1)
    conv, kind, backend = known
    if solve and (kind == "numpy" or host_sync):
        check_nonsingular(weight, conv)
    return _Call(arrays, weight, conv, kind, backend, stream)


# Validated call signatures (names, kinds, shapes, dtypes and devices of the
# arrays, and the options with their types) -> (Conv, kind, backend): an
# identical call skips the checks, which cost more than a small op itself.
# What depends on values (the zero-diagonal check) runs on every call.
_signatures = _cache.BoundedCache(max_entries=1024, max_bytes=1 << 30)


def _devices(arrays, weight):
    """The CUDA device of each array of a CuPy call (none for a NumPy call)."""
    if isinstance(weight, np.ndarray):
        return ()
    return tuple(getattr(getattr(a, "device", None), "id", None)
                 for a in (*arrays.values(), weight))


def _validate(arrays, kinds, weight, corner, groups, unit_diagonal, backend, stream):
    """The checks of :func:`_prepare` that depend only on its signature."""
    for name, arr in arrays.items():
        _check_float(arr, name)
        if arr.ndim != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (B, C, H, W), got shape {tuple(arr.shape)}")
    _check_float(weight, "weight")
    first = next(iter(arrays))
    shape = arrays[first].shape
    for name, arr in arrays.items():
        if arr.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(arr.shape)} but {first} has shape {tuple(shape)}")
    for name, arr in [*arrays.items(), ("weight", weight)]:
        if arr.dtype != arrays[first].dtype:
            raise TypeError(
                f"{name} has dtype {arr.dtype} but {first} has dtype {arrays[first].dtype}; "
                f"they must agree")
    if len(set(kinds.values())) > 1:
        where = ", ".join(f"{n}: {'CUDA (CuPy)' if k == 'cupy' else 'CPU (NumPy)'}"
                          for n, k in kinds.items())
        raise ValueError(f"arrays must live on one device, got {where}")
    kind = kinds["weight"]
    if kind == "cupy":
        devices = {n: a.device.id for n, a in [*arrays.items(), ("weight", weight)]}
        if len(set(devices.values())) > 1:
            raise ValueError(f"arrays must live on one CUDA device, got {devices}")
    conv = make_conv(weight.shape, corner=corner, groups=groups,
                     unit_diagonal=unit_diagonal, channels=shape[1], image=first)
    backend = _resolve_backend(backend, kind)
    if stream is not None and kind != "cupy":
        raise ValueError("stream is only meaningful for CuPy arrays; pass stream=None")
    return conv, kind, backend


def _resolve_backend(backend, kind: str) -> str:
    """The registered backend for ``backend`` (None: the default for ``kind``)."""
    if backend is None:
        return _backends.default_for(kind)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    wants = _backends.spec(backend).kind
    if wants == kind:
        return backend
    others = ", ".join(repr(n) for n in _backends.names(kind))
    if wants == "numpy":
        raise ValueError(
            f"backend={backend!r} runs on the CPU and takes NumPy arrays; got CuPy "
            f"arrays (use backend={others}, or move them with cupy.asnumpy)")
    raise ValueError(
        f"backend={backend!r} takes CuPy arrays on a CUDA device; got CPU arrays "
        f"(move them with cupy.asarray, or use backend={others})")


def _run(call: _Call, method: str, *args):
    impl = getattr(_backends.load(call.backend), method)
    if call.stream is None:
        return impl(*args, call.conv)
    with call.stream:
        return impl(*args, call.conv)


def _empty_like(a):
    return _array_module(a).zeros(a.shape, dtype=a.dtype)


# --------------------------------------------------------------------------
# public API

_OPTIONS_DOC = """corner : {"top-left", "top-right", "bottom-left", "bottom-right"}
        Which corner is zero-padded (see :mod:`invconv`).
    groups : int
        Channel groups, as in ``torch.nn.functional.conv2d``.
    unit_diagonal : bool
        Take the same-pixel diagonal as 1 (True, default) or use the stored one.
    backend : {None, "cpu", "reference", "emulator", "cuda"}
        None picks by device: "cpu" (NumPy/BLAS) for CPU arrays, "cuda" for
        CuPy arrays.  "reference" is the SciPy ground truth, "emulator" runs
        the CUDA kernels on the CPU.
    stream : cupy.cuda.Stream, optional
        Stream for the CUDA launches (default: CuPy's current stream).
        Only for CuPy arrays."""

_ARRAYS_DOC = """Arrays may be NumPy, CuPy, or any object with ``__dlpack__`` (a CPU
    tensor comes back as a NumPy array, a CUDA tensor as a CuPy array).
    Inputs are never modified.  NaN and Inf propagate; on "reference" and
    "cpu" a NaN or Inf reaches exactly the outputs that depend on it (the
    "cpu" backend computes a call with a non-finite input, or a solve that
    overflows, by the reference)."""


def conv2d(x, weight, *, corner="top-left", groups=1, unit_diagonal=True,
           backend=None, stream=None):
    """Masked convolution ``y = M x``.

    x : (B, C, H, W) -> y : (B, C, H, W); weight : (C, C // groups, kh, kw).

    Parameters
    ----------
    x : array, float32 or float64
    weight : array, same dtype as ``x``
    {options}

    Returns
    -------
    y : array of the same kind, dtype and shape as ``x``.

    Notes
    -----
    {arrays}
    """
    call = _prepare({"x": x}, weight, corner=corner, groups=groups,
                    unit_diagonal=unit_diagonal, backend=backend, stream=stream)
    x = call.arrays["x"]
    if x.size == 0:
        return _empty_like(x)
    return _run(call, "_forward", x, call.weight)


def inv_conv2d(y, weight, *, corner="top-left", groups=1, unit_diagonal=True,
               backend=None, stream=None):
    """Inverse of the masked convolution: the ``x`` with ``conv2d(x) == y``.

    y : (B, C, H, W) -> x : (B, C, H, W); weight : (C, C // groups, kh, kw).

    A triangular solve (a wavefront over anti-diagonals on the GPU), never a
    dense inverse.  A badly conditioned kernel (same-pixel diagonal entries
    small next to the others) can make the solution grow geometrically
    across the image and overflow; that is the mathematics of the inverse,
    not a failure of the solver.

    Parameters
    ----------
    y : array, float32 or float64
    weight : array, same dtype as ``y``
    {options}

    Returns
    -------
    x : array of the same kind, dtype and shape as ``y``.

    Raises
    ------
    ValueError
        If ``unit_diagonal=False`` and a same-pixel diagonal entry is zero
        (for CuPy arrays this check reads the C diagonal entries back to the
        host).

    Notes
    -----
    {arrays}
    """
    call = _prepare({"y": y}, weight, corner=corner, groups=groups,
                    unit_diagonal=unit_diagonal, backend=backend, stream=stream, solve=True)
    y = call.arrays["y"]
    if y.size == 0:
        return _empty_like(y)
    return _run(call, "_solve", y, call.weight)


def conv2d_vjp(grad_y, x, weight, *, corner="top-left", groups=1,
               unit_diagonal=True, backend=None, stream=None):
    """Vector-Jacobian product of :func:`conv2d`.

    grad_y, x : (B, C, H, W) -> grad_x : (B, C, H, W), grad_weight : weight.shape.

    ``grad_x = M^T grad_y`` and
    ``grad_weight[o, i, u, v] = sum_{{b,h,w}} grad_y[b, o, h, w] * x_pad[b, g*C_g + i, h + u, w + v]``
    (``x_pad`` padded as for the forward), exactly zero at ignored entries.

    Parameters
    ----------
    grad_y : array
        Gradient of the loss with respect to ``conv2d``'s output.
    x : array
        ``conv2d``'s input.
    weight : array
    {options}

    Returns
    -------
    grad_x, grad_weight : arrays of the same kind and dtype as the inputs.

    Notes
    -----
    {arrays}
    """
    call = _prepare({"grad_y": grad_y, "x": x}, weight, corner=corner, groups=groups,
                    unit_diagonal=unit_diagonal, backend=backend, stream=stream)
    grad_y, x = call.arrays["grad_y"], call.arrays["x"]
    if x.size == 0:
        return _empty_like(x), _empty_like(call.weight)
    grad_x = _run(call, "_forward_adjoint", grad_y, call.weight)
    grad_weight = _run(call, "_weight_grad", grad_y, x, 1.0)
    return grad_x, grad_weight


def inv_conv2d_vjp(grad_x, x, weight, *, corner="top-left", groups=1,
                   unit_diagonal=True, backend=None, stream=None):
    """Vector-Jacobian product of :func:`inv_conv2d`.

    grad_x, x : (B, C, H, W) -> grad_y : (B, C, H, W), grad_weight : weight.shape.

    With ``x = M^-1 y``: ``grad_y = M^-T grad_x`` (the same wavefront in reverse
    order), and ``grad_weight`` is minus the :func:`conv2d` weight gradient
    taken at ``(grad_y, x)``, exactly zero at ignored entries.

    Parameters
    ----------
    grad_x : array
        Gradient of the loss with respect to ``inv_conv2d``'s output.
    x : array
        ``inv_conv2d``'s output (not its input).
    weight : array
    {options}

    Returns
    -------
    grad_y, grad_weight : arrays of the same kind and dtype as the inputs.

    Notes
    -----
    {arrays}
    """
    call = _prepare({"grad_x": grad_x, "x": x}, weight, corner=corner, groups=groups,
                    unit_diagonal=unit_diagonal, backend=backend, stream=stream, solve=True)
    grad_x, x = call.arrays["grad_x"], call.arrays["x"]
    if x.size == 0:
        return _empty_like(x), _empty_like(call.weight)
    grad_y = _run(call, "_solve_adjoint", grad_x, call.weight)
    grad_weight = _run(call, "_weight_grad", grad_y, x, -1.0)
    return grad_y, grad_weight


def logdet(weight, height, width, *, corner="top-left", groups=1, unit_diagonal=True):
    """``log|det M|`` of the masked convolution on ``height x width`` images.

    weight : (C, C // groups, kh, kw) -> float.

    The operator is triangular, so ``log|det M| = H * W * sum_c log|W[c, c % C_g, u0, v0]|``;
    0.0 with a unit diagonal, ``-inf`` when a diagonal entry is zero.
    A CuPy weight is read back to the host.
    """
    weight, _ = as_array(weight, "weight")
    _check_float(weight, "weight")
    height = _check_int(height, "height", 1)
    width = _check_int(width, "width", 1)
    conv = make_conv(weight.shape, corner=corner, groups=groups, unit_diagonal=unit_diagonal)
    if conv.unit_diagonal:
        return 0.0
    diag = np.abs(_to_host(conv.diagonal(weight)).astype(np.float64))
    with np.errstate(divide="ignore"):
        return float(height * width * np.sum(np.log(diag)))


for _f in (conv2d, inv_conv2d, conv2d_vjp, inv_conv2d_vjp):
    _f.__doc__ = _f.__doc__.format(options=_OPTIONS_DOC, arrays=_ARRAYS_DOC)
del _f

__all__ = ["CORNERS", "BACKENDS", "Conv", "conv2d", "inv_conv2d", "conv2d_vjp",
           "inv_conv2d_vjp", "logdet", "effective_weight", "make_conv"]
