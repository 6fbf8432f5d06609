"""SciPy reference: the masked convolution as a sparse matrix.

This is the truth the other backends are tested against (backend
"reference"; the default CPU backend is the faster "cpu"), so it stays
simple: build the sparse operator ``M`` once per call, multiply by it for
the convolution and its adjoint, and solve all batch columns in one
:func:`scipy.sparse.linalg.spsolve_triangular` call (in pixel-major order,
where ``M`` is lower-triangular) for the inverse and its adjoint.  The
weight gradient is a correlation over shifted views, one GEMM per tap.
Everything is computed in float64 and returned in the input dtype.

The functions here have the signatures of the public ones in :mod:`invconv`
without ``backend`` (they are those functions with ``backend="reference"``).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve_triangular

from . import _api
from ._api import Conv, effective_weight

__all__ = ["operator", "conv2d", "inv_conv2d", "conv2d_vjp", "inv_conv2d_vjp", "logdet"]


def operator(weight, height, width, *, corner="top-left", groups=1, unit_diagonal=True):
    """The masked convolution on ``height x width`` images as a sparse matrix.

    weight : (C, C // groups, kh, kw) -> M : scipy.sparse.csr_array, (C*H*W, C*H*W).

    Rows and columns follow ``x.reshape(B, -1)[b]``, i.e. (C, H, W) order:
    ``conv2d(x).reshape(B, -1)[b] == M @ x.reshape(B, -1)[b]``.  M has the
    weight's dtype; ignored weight entries are absent (or 1 on a unit
    diagonal), and every diagonal entry is stored, even a zero one.
    """
    weight, kind = _api.as_array(weight, "weight")
    if kind != "numpy":
        raise ValueError("reference.operator builds a SciPy matrix on the CPU; "
                         "pass a NumPy weight (cupy.asnumpy(weight))")
    _api._check_float(weight, "weight")
    height = _api._check_int(height, "height", 1)
    width = _api._check_int(width, "width", 1)
    conv = _api.make_conv(weight.shape, corner=corner, groups=groups,
                          unit_diagonal=unit_diagonal)
    return _operator(weight, height, width, conv)


def _operator(weight, height, width, conv: Conv, dtype=None):
    C, cg, kh, kw = weight.shape
    H, W = height, width
    weff = effective_weight(weight, conv).astype(dtype or weight.dtype)
    # Offset form: tap (du, dv) reads pixel (h - rs*du, w - cs*dv).
    if conv.row_sign > 0:
        weff = weff[:, :, ::-1, :]
    if conv.col_sign > 0:
        weff = weff[:, :, :, ::-1]
    o = np.arange(C)[:, None, None, None, None, None]
    i = (o // cg) * cg + np.arange(cg)[None, :, None, None, None, None]
    du = np.arange(kh)[None, None, :, None, None, None]
    dv = np.arange(kw)[None, None, None, :, None, None]
    h = np.arange(H)[None, None, None, None, :, None]
    w = np.arange(W)[None, None, None, None, None, :]
    sh, sw = h - conv.row_sign * du, w - conv.col_sign * dv
    shape = (C, cg, kh, kw, H, W)
    valid = (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
    vals = np.broadcast_to(weff[..., None, None], shape)
    on_diagonal = (o == i) & (du == 0) & (dv == 0)
    keep = np.broadcast_to(valid, shape) & ((vals != 0) | on_diagonal)
    rows = np.broadcast_to(o * (H * W) + h * W + w, shape)[keep]
    cols = np.broadcast_to(i * (H * W) + sh * W + sw, shape)[keep]
    n = C * H * W
    return sp.csr_array((vals[keep], (rows, cols)), shape=(n, n))


def _pixel_major_order(conv: Conv, height: int, width: int) -> np.ndarray:
    """Original (C, H, W) index of each position in pixel-major order.

    Pixels run row by row from the padded corner, channels ascending inside
    a pixel; in this order M is lower-triangular.
    """
    C, H, W = conv.channels, height, width
    rows = np.arange(H) if conv.row_sign > 0 else np.arange(H)[::-1]
    cols = np.arange(W) if conv.col_sign > 0 else np.arange(W)[::-1]
    pix = (rows[:, None] * W + cols[None, :]).reshape(-1)
    return (np.arange(C)[None, :] * (H * W) + pix[:, None]).reshape(-1)


def _columns(a):
    """(B, C, H, W) -> (C*H*W, B) float64 matrix of right-hand sides."""
    return a.reshape(a.shape[0], -1).T.astype(np.float64)


def _images(cols, like):
    return np.ascontiguousarray(cols.T).reshape(like.shape).astype(like.dtype, copy=False)


def _matrix(weight, x, conv):
    return _operator(weight, x.shape[2], x.shape[3], conv, dtype=np.float64)


def _forward(x, weight, conv: Conv):
    return _images(_matrix(weight, x, conv) @ _columns(x), x)


def _forward_adjoint(grad_y, weight, conv: Conv):
    return _images(_matrix(weight, grad_y, conv).T @ _columns(grad_y), grad_y)


def _triangular_solve(rhs, weight, conv: Conv, transpose: bool):
    m = _matrix(weight, rhs, conv)
    order = _pixel_major_order(conv, rhs.shape[2], rhs.shape[3])
    m_perm = m[order][:, order]
    if transpose:
        m_perm = m_perm.T.tocsr()
    cols = _columns(rhs)
    sol = np.empty_like(cols)
    sol[order] = spsolve_triangular(m_perm, cols[order], lower=not transpose)
    return _images(sol, rhs)


def _solve(y, weight, conv: Conv):
    return _triangular_solve(y, weight, conv, transpose=False)


def _solve_adjoint(grad_x, weight, conv: Conv):
    return _triangular_solve(grad_x, weight, conv, transpose=True)


def _weight_grad(grad_out, x, scale, conv: Conv):
    """``scale * sum_{b,h,w} grad_out[b,o,h,w] * x_pad[b, g*C_g+i, h+u, w+v]``.

    Only the terms whose ``x_pad`` pixel lies inside the image are summed: a
    padded zero times a NaN or Inf gradient would otherwise make an entry
    non-finite that does not depend on it.
    """
    B, C, H, W = x.shape
    G, cg = conv.groups, conv.group_channels
    left, _, top, _ = conv.pads
    xs = x.astype(np.float64).reshape(B, G, cg, H, W)
    g = grad_out.astype(np.float64).reshape(B, G, cg, H, W)
    out = np.zeros((C, cg, conv.kh, conv.kw))
    for u in range(conv.kh):
        h0, h1 = max(0, top - u), min(H, H + top - u)   # output rows reading inside x
        for v in range(conv.kw):
            w0, w1 = max(0, left - v), min(W, W + left - v)
            if h0 >= h1 or w0 >= w1:
                continue
            with np.errstate(invalid="ignore"):  # Inf - Inf is a NaN that propagates, as documented
                out[:, :, u, v] = np.einsum(
                    "bgohw,bgihw->goi", g[..., h0:h1, w0:w1],
                    xs[..., h0 + u - top:h1 + u - top, w0 + v - left:w1 + v - left],
                    optimize=True).reshape(C, cg)
    out[conv.ignored_mask()] = 0.0
    return (scale * out).astype(x.dtype)


# Same-signature twins of the public API, pinned to this backend.

def conv2d(x, weight, *, corner="top-left", groups=1, unit_diagonal=True):
    """:func:`invconv.conv2d` computed by the SciPy reference."""
    return _api.conv2d(x, weight, corner=corner, groups=groups,
                       unit_diagonal=unit_diagonal, backend="reference")


def inv_conv2d(y, weight, *, corner="top-left", groups=1, unit_diagonal=True):
    """:func:`invconv.inv_conv2d` computed by the SciPy reference."""
    return _api.inv_conv2d(y, weight, corner=corner, groups=groups,
                           unit_diagonal=unit_diagonal, backend="reference")


def conv2d_vjp(grad_y, x, weight, *, corner="top-left", groups=1, unit_diagonal=True):
    """:func:`invconv.conv2d_vjp` computed by the SciPy reference."""
    return _api.conv2d_vjp(grad_y, x, weight, corner=corner, groups=groups,
                           unit_diagonal=unit_diagonal, backend="reference")


def inv_conv2d_vjp(grad_x, x, weight, *, corner="top-left", groups=1, unit_diagonal=True):
    """:func:`invconv.inv_conv2d_vjp` computed by the SciPy reference."""
    return _api.inv_conv2d_vjp(grad_x, x, weight, corner=corner, groups=groups,
                               unit_diagonal=unit_diagonal, backend="reference")


logdet = _api.logdet
