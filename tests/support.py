"""Test helpers: an independent dense builder of the operator and tolerances.

Nothing here imports invconv's own operator code: the dense matrix is built
by literal loops over the convention as the API docs state it, so agreement
with it means something.
"""
import numpy as np

# One table of tolerances, keyed by dtype: (rtol, atol relative to the
# largest magnitude of the expected result).
TOLERANCES = {
    np.dtype(np.float64): (1e-9, 1e-10),
    np.dtype(np.float32): (2e-4, 2e-5),
}

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def assert_close(actual, expected, dtype=None, scale=1.0):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = np.dtype(dtype or actual.dtype)
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    magnitude = float(np.max(np.abs(expected), initial=1.0))
    np.testing.assert_allclose(actual, expected, rtol=rtol * scale,
                               atol=atol * scale * magnitude)


def pads(corner, kh, kw):
    """(left, right, top, bottom) as the issue's table states it."""
    return {
        "top-left": (kw - 1, 0, kh - 1, 0),
        "top-right": (0, kw - 1, kh - 1, 0),
        "bottom-left": (kw - 1, 0, 0, kh - 1),
        "bottom-right": (0, kw - 1, 0, kh - 1),
    }[corner]


def dense_operator(weight, H, W, corner="top-left", groups=1, unit_diagonal=True):
    """Dense (C*H*W)^2 matrix of the masked convolution, rows/cols in C,H,W order."""
    C, cg, kh, kw = weight.shape
    left, _, top, _ = pads(corner, kh, kw)
    M = np.zeros((C * H * W, C * H * W), dtype=np.float64)
    hh, ww = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    for o in range(C):
        g, ol = divmod(o, cg)
        for il in range(cg):
            i = g * cg + il
            for u in range(kh):
                for v in range(kw):
                    val = float(weight[o, il, u, v])
                    if (u, v) == (top, left):  # the tap that reads the same pixel
                        if il > ol:
                            continue
                        if il == ol and unit_diagonal:
                            val = 1.0
                    sh, sw = hh - top + u, ww - left + v
                    ok = (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
                    M[o * H * W + hh[ok] * W + ww[ok], i * H * W + sh[ok] * W + sw[ok]] += val
    return M


def dense_weight_grad(gs, xs, weight, corner, groups, unit_diagonal, sign=1.0):
    """sign * sum_b g_b^T (dM/dW_e) x_b for every weight entry e, by linearity."""
    B, C, H, W = xs.shape
    base = dense_operator(np.zeros_like(weight, dtype=np.float64), H, W, corner, groups,
                          unit_diagonal)
    G = gs.reshape(B, -1).astype(np.float64)
    X = xs.reshape(B, -1).astype(np.float64)
    out = np.zeros(weight.shape)
    for e in np.ndindex(*weight.shape):
        onehot = np.zeros(weight.shape)
        onehot[e] = 1.0
        E = dense_operator(onehot, H, W, corner, groups, unit_diagonal) - base
        out[e] = sign * np.einsum("bi,ij,bj->", G, E, X)
    return out


def ignored_entries(C, groups, kh, kw, corner, unit_diagonal):
    """Boolean mask of the weight entries the convention says are never read."""
    cg = C // groups
    left, _, top, _ = pads(corner, kh, kw)
    mask = np.zeros((C, cg, kh, kw), dtype=bool)
    for o in range(C):
        for il in range(cg):
            if il > o % cg or (il == o % cg and unit_diagonal):
                mask[o, il, top, left] = True
    return mask


def make_weight(rng, C, groups, kh, kw, corner="top-left", unit_diagonal=True,
                dtype=np.float64, junk=7.0):
    """A well-conditioned weight by construction (not by filtering).

    Taps other than the diagonal are small (each row's off-diagonal sum stays
    well under the diagonal), a non-unit diagonal has magnitude in [0.8, 1.6]
    with random signs, and the ignored entries hold ``junk`` (large values,
    or NaN) that must never show up in any result.
    """
    cg = C // groups
    w = rng.uniform(-1, 1, size=(C, cg, kh, kw)) * (0.5 / (cg * kh * kw))
    left, _, top, _ = pads(corner, kh, kw)
    if not unit_diagonal:
        d = rng.uniform(0.8, 1.6, size=C) * rng.choice([-1.0, 1.0], size=C)
        w[np.arange(C), np.arange(C) % cg, top, left] = d
    w[ignored_entries(C, groups, kh, kw, corner, unit_diagonal)] = junk
    return w.astype(dtype)


def structure(weight_shape, H, W, corner="top-left", groups=1, unit_diagonal=True):
    """Boolean structure of the operator, from :func:`dense_operator` alone.

    Returns ``(S, R, taps)`` for ``n = C*H*W`` in (C, H, W) order:
    ``S[i, j]``: ``M[i, j]`` is read (a non-ignored tap inside the image);
    ``R[i, j]``: ``(M^-1)[i, j]`` is structurally non-zero, i.e. a chain of
    non-zeros of ``M`` leads from j to i (the transitive closure of ``S``,
    diagonal included; forward substitution carries a NaN exactly that way);
    ``taps[e, i, j]``: ``dM[i, j] / dW_e`` is non-zero, for weight entries
    ``e`` in C order (empty for ignored entries).
    """
    n = weight_shape[0] * H * W
    ones = np.ones(weight_shape)   # every tap non-zero: the structure of a generic weight
    S = dense_operator(ones, H, W, corner, groups, unit_diagonal) != 0
    R = S | np.eye(n, dtype=bool)
    while True:
        closed = R | ((R.astype(np.int64) @ R.astype(np.int64)) > 0)
        if (closed == R).all():
            break
        R = closed
    base = dense_operator(np.zeros(weight_shape), H, W, corner, groups, unit_diagonal)
    taps = np.zeros((int(np.prod(weight_shape)), n, n), dtype=bool)
    for e, index in enumerate(np.ndindex(*weight_shape)):
        onehot = np.zeros(weight_shape)
        onehot[index] = 1.0
        taps[e] = dense_operator(onehot, H, W, corner, groups, unit_diagonal) != base
    return S, R, taps


def nonfinite_reach(op, argument, entry, shape, weight_shape, structure_):
    """Which outputs of `op` a NaN or Inf at one input entry makes non-finite.

    `entry` is ``(image, index)``, the entry ``argument[image].reshape(-1)[index]``
    of an image argument ("x", "y", "grad_y", "grad_x"), or for "weight" the
    index of a read (not ignored) entry of ``weight.reshape(-1)``.  All other
    inputs are finite and generic (no zeros).  Returns one boolean mask per
    output of `op`, shaped like it.  ``conv2d``: ``y = M x``; ``inv_conv2d``:
    ``x = M^-1 y``; the vjps: ``grad_x = M^T grad_y``, ``grad_y = M^-T grad_x``
    and ``grad_weight[e] = ±sum_b g_b^T (dM/dW_e) x_b`` with ``g`` the image
    gradient at the operator's output.
    """
    S, R, taps = structure_
    B, n = shape[0], int(np.prod(shape[1:]))
    rows, cols = taps.any(axis=2), taps.any(axis=1)   # (entries, n): the g and x W_e pairs

    def images(pattern, image=None):
        mask = np.zeros((B, n), dtype=bool)
        mask[slice(None) if image is None else image] = pattern
        return mask.reshape(shape)

    def weights(pattern):
        return pattern.reshape(weight_shape)

    nothing = np.zeros(shape, dtype=bool)
    if argument == "weight":
        # A NaN in W_e poisons the entries taps[e] of M; every image meets them.
        e = entry
        reach = {"conv2d": (images(rows[e]),),
                 "inv_conv2d": (images(R[:, rows[e]].any(axis=1)),),
                 "conv2d_vjp": (images(cols[e]), np.zeros(weight_shape, dtype=bool))}
        if op == "inv_conv2d_vjp":
            grad_y = R[cols[e], :].any(axis=0)
            return images(grad_y), weights(rows[:, grad_y].any(axis=1))
        return reach[op]
    image, index = entry
    if (op, argument) == ("conv2d", "x"):
        return (images(S[:, index], image),)
    if (op, argument) == ("inv_conv2d", "y"):
        return (images(R[:, index], image),)
    if (op, argument) == ("conv2d_vjp", "grad_y"):
        return images(S[index, :], image), weights(rows[:, index])
    if (op, argument) == ("inv_conv2d_vjp", "grad_x"):
        grad_y = R[index, :]
        return images(grad_y, image), weights(rows[:, grad_y].any(axis=1))
    if op in ("conv2d_vjp", "inv_conv2d_vjp") and argument == "x":
        return nothing, weights(cols[:, index])
    raise ValueError(f"{op} has no input {argument!r}")
