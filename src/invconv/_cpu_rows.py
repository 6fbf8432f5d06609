"""Backend "cpu": the inverse on thin images (long rows, long columns) as a
blocked linear recurrence.

On an image whose short side is a few pixels (down to one) the wavefront of
:mod:`invconv._cpu` has H + W - 1 steps with almost nothing to do in each,
so its time is Python's overhead per step.  Here the image is a sequence of
columns along its long side (a column image is transposed: a view, with the
blocks' (du, dv) swapped), every column a vector of n = C_g * H values, and
the canonical (reads up-left) operator is a block-banded lower-triangular
system along the columns: ``sum_{dv < kw} B_dv x[w - dv] = y[w]``.

Level 0: the columns are cut into chunks of L.  One chunk is one "tile" of
H x L pixels of the wavefront's fold (:func:`invconv._cpu._folded_operator`):
``x_chunk = T y_chunk + R s``, T the chunk's own inverse (n L x n L, lower
block-Toeplitz) and R the response to the state s, the last kw - 1 columns of
the previous chunk (d = n (kw - 1) values).  So: one GEMM solves every chunk
of every image from a zero state; the true states obey the first-order
recurrence ``s_m = Phi s_{m-1} + e_m`` (Phi: R's rows at the chunk's last
kw - 1 columns, e_m: the zero-state solution there), solved by
:func:`_scan`; one more GEMM ``x += R s_{m-1}`` corrects every chunk.

:func:`_scan` is the same idea one level up and recursively: chunks of L2
states are solved from zero by one GEMM with the block-Toeplitz matrix of
Phi's powers, the chunk-end states obey ``t_c = Phi^L2 t_{c-1} + ...``
(recursion, until a few states remain: a loop), and one GEMM with
``[Phi; Phi^2; ...; Phi^L2]`` corrects them.  A call is a fixed, small
number of NumPy operations (about ten a level, log_L2(W / L) levels), each
over the whole image.  The folds and Phi's powers are computed in float64
and rounded once to the input dtype.  For a kernel whose recurrence grows
(an ill-conditioned inverse) the powers grow with it; a power or result
that overflows is not finite, and the caller then recomputes the call by
the reference (the NaN/Inf contract of :mod:`invconv._cpu`).

Rule (:func:`chosen`): a cost model in seconds, one thread, fitted on the
project's 2-core AMD EPYC machine on 2026-12-04 to a sweep of B in {1, 16},
C in {1, 3}, H in {1, 2, 4, 8, 16}, W in {64, 256, 2048}, k = 3, float32,
each shape solved both ways (the model picks the faster one except near
ties, within 1.5x either way; the machine was shared, so +-30%).  The
wavefront pays ``_WAVE_S`` a call, ``_STEP_S`` a step (Python, the gather's
and the GEMM's calls) and ``_GATHER_S`` a gathered window entry; the
blocked recurrence ``_BLOCKED_S`` a call and ``_FLOP_S`` a multiply-add,
(n L + n (kw - 1)) (1 + (kw - 1) / L) a value.  The cheaper one runs.  In
practice: 1-channel rows from a few hundred pixels, 3-channel rows and
images up to about 4 rows high from a thousand or two.  Never when
n > ``_CHUNK_VALUES`` / 2 or the chunk operator T would pass 256 x 256 (a
long kernel along the row: L >= 2 (kw - 1)), so T, R and Phi's powers stay
below a megabyte; the scratch is about three arrays the size of the input.
Chunk length: n L near ``_CHUNK_VALUES`` (64), at least 2 (kw - 1), so each
scan level has fewer states than the one below (measured at N = 200,000:
n L = 32-64 best for one channel, 64-128 for three).
"""
from __future__ import annotations

import numpy as np

from ._cpu import _flip, _folded_operator

# The rule's cost model (seconds, one thread; fitted to a sweep of B in {1, 16},
# C in {1, 3}, H in {1, ..., 16}, W in {64, 256, 2048}, k = 3, float32, 2026-12-04):
_WAVE_S = 100e-6        # wavefront: a call
_STEP_S = 2.5e-6        # ... a step (Python, the gather's and the GEMM's calls)
_GATHER_S = 1e-9        # ... a gathered window entry (B images of a channel count once each)
_BLOCKED_S = 300e-6     # blocked recurrence: a call besides its multiply-adds
_FLOP_S = 1 / 7e9       # ... a multiply-add (GEMMs of 64 x 64 operators)
_CHUNK_VALUES = 64      # n * L, the level-0 chunk's unknowns (T is at most 64^2; measured)
_SCAN_CHUNK = 64        # L2 * d, the scan chunk's states
_SCAN_DIRECT = 8        # a scan this short is a loop


def _chunk(n, p, long_side):
    """Level-0 chunk length L: n * L near ``_CHUNK_VALUES``, at least 2 (kw - 1)
    so each level shrinks the states, at most the long side."""
    return max(1, min(long_side, max(2 * p, _CHUNK_VALUES // n)))


def chosen(B, cg, H, W, kh, kw, groups, wave_tile):
    """True when the blocked recurrence is expected to be faster (module rule)."""
    short, long_ = min(H, W), max(H, W)
    k_long = kw if W >= H else kh
    n, p = cg * short, min(k_long, long_) - 1
    L = _chunk(n, p, long_)
    if n > _CHUNK_VALUES // 2 or n * L > 4 * _CHUNK_VALUES:   # T at most 256^2
        return False
    values = B * groups * n * long_
    blocked = _BLOCKED_S + values * (n * L + n * p) * (1 + p / L) * _FLOP_S
    th, tw = wave_tile
    steps = -(-H // th) + -(-W // tw) - 1
    window = (th + min(kh, H) - 1) * (tw + min(kw, W) - 1)
    wave = _WAVE_S + steps * _STEP_S + values * window / (th * tw) * _GATHER_S
    return blocked < wave


def _split_view(a, shape):
    """``a`` with its last axis split as ``shape`` says, as a view (raises
    rather than copying, so writes through it reach ``a``)."""
    v = a.view()
    v.shape = shape
    return v


def _flush(a, dtype):
    """Entries below sqrt(tiny) of ``dtype`` set to exactly 0, in place.

    A decaying recurrence's high powers underflow into subnormal numbers,
    and GEMMs on subnormals are many times slower (measured 3x on a whole
    call).  Dropped entries change a result by at most sqrt(tiny) relative
    to the state they multiply: far below rounding.
    """
    a[np.abs(a) < np.sqrt(np.finfo(dtype).tiny)] = 0.0
    return a


def _powers(phi, count, dtype):
    """(count + 1, G, d, d): phi^0 .. phi^count, float64, flushed for ``dtype``."""
    G, d, _ = phi.shape
    out = np.empty((count + 1, G, d, d))
    out[0] = np.eye(d)
    for i in range(1, count + 1):
        np.matmul(phi, out[i - 1], out=out[i])
        _flush(out[i], dtype)
    return out


def _scan(phi, e):
    """s[:, m] = s[:, m - 1] @ phi^T + e[:, m] for m = 0.., s[:, -1] = 0.

    phi: (G, d, d) float64; e: (G, M, B, d) in the call's dtype (consumed).
    """
    G, M, B, d = e.shape
    if M <= _SCAN_DIRECT:
        step = np.swapaxes(phi, 1, 2).astype(e.dtype)
        for m in range(1, M):
            e[:, m] += e[:, m - 1] @ step
        return e
    L2 = max(2, _SCAN_CHUNK // d)
    M2 = -(-M // L2)
    pw = _powers(phi, L2, e.dtype)
    # K[(i, a), (j, b)] = phi^(i - j)[a, b] for i >= j: the chunk's zero-state solution
    i, j = np.arange(L2)[:, None], np.arange(L2)[None, :]
    K = np.where((i >= j)[:, :, None, None, None], pw[np.maximum(i - j, 0)], 0.0)
    K = K.transpose(2, 0, 3, 1, 4).reshape(G, L2 * d, L2 * d)
    padded = np.zeros((G, M2 * L2, B, d), dtype=e.dtype)
    padded[:, :M] = e
    chunks = padded.reshape(G, M2, L2, B, d).transpose(0, 1, 3, 2, 4).reshape(G, M2 * B, L2 * d)
    s = np.matmul(chunks, np.swapaxes(K, 1, 2).astype(e.dtype))
    ends = np.ascontiguousarray(s[:, :, (L2 - 1) * d:]).reshape(G, M2, B, d)
    t = _scan(pw[L2], ends)
    before = np.zeros((G, M2, B, d), dtype=e.dtype)
    before[:, 1:] = t[:, :-1]
    response = pw[1:].transpose(1, 0, 2, 3).reshape(G, L2 * d, d)       # [phi; phi^2; ...]
    s += np.matmul(before.reshape(G, M2 * B, d), np.swapaxes(response, 1, 2).astype(e.dtype))
    return s.reshape(G, M2, B, L2, d).transpose(0, 1, 3, 2, 4).reshape(G, M2 * L2, B, d)[:, :M]


def _rows_first(v, G, full, B, n, L):
    """(B, G, cg, H, >= full*L) -> (G, full*B, n*L): rows (chunk, image), columns
    (channel, row, column in the chunk); a view where the layout allows."""
    head = _split_view(v[..., :full * L], v.shape[:4] + (full, L))
    return head.transpose(1, 4, 0, 2, 3, 5)


def solve(rhs, blocks, flip_rows, flip_cols, groups):
    """Solve sum_{du,dv} A[du,dv] x[h-du, w-dv] = rhs on the flipped view, by
    the blocked recurrence along the image's long side; returned unflipped."""
    B, C, H, W = rhs.shape
    out = np.empty_like(rhs)
    y, x = _flip(rhs, flip_rows, flip_cols), _flip(out, flip_rows, flip_cols)
    if H > W:                           # a column is a row: transpose the view
        y, x = y.swapaxes(2, 3), x.swapaxes(2, 3)
        blocks = blocks.transpose(1, 0, 2, 3)
        H, W = W, H
    kh, kw = min(blocks.shape[0], H), min(blocks.shape[1], W)
    blocks = blocks[:kh, :kw]           # taps reaching beyond the image never read it
    G, cg, p = groups, C // groups, kw - 1
    n, dtype = cg * H, rhs.dtype
    L = _chunk(n, p, W)
    full, rem = divmod(W, L)
    d = n * p
    # Per group the fold of an H x L tile (window rows above the image
    # dropped: they read zeros): x_chunk = T y_chunk + R s, rows and columns
    # (channel, row, column in the chunk); state columns (channel, row, j)
    # for column L - p + j of the chunk before.
    Tt = np.empty((G, n * L, n * L), dtype=dtype)       # T^T, R^T: the row form
    Rt = np.empty((G, d, n * L), dtype=dtype)
    phi = np.empty((G, d, d))
    last = (np.arange(n)[:, None] * L + np.arange(L - p, L)[None, :]).reshape(-1)
    for g in range(G):
        s = slice(g * cg, (g + 1) * cg)
        op = _flush(_folded_operator(blocks[:, :, s, s], H, L, np.float64), dtype)
        op = op.reshape(n * L, cg, H + kh - 1, L + p)[:, :, kh - 1:]
        Tt[g] = op[..., p:].reshape(n * L, n * L).T
        r = op[..., :p].reshape(n * L, d)
        Rt[g] = r.T
        phi[g] = r[last]
    y5 = _split_view(y, (B, G, cg, H, W))
    x5 = _split_view(x, (B, G, cg, H, W))
    rows = full * B
    yr = _rows_first(y5, G, full, B, n, L).reshape(G, rows, n * L)   # copies if it must
    target = _rows_first(x5, G, full, B, n, L)
    direct = target.flags.c_contiguous
    sol = target.reshape(G, rows, n * L) if direct else np.empty((G, rows, n * L), dtype=dtype)
    np.matmul(yr, Tt, out=sol)                          # every chunk from a zero state
    state = None
    if p:
        ends = sol[:, :, last].reshape(G, full, B, d)     # the zero-state solution there
        states = _scan(phi, ends)                       # the true state at each chunk's end
        state = states[:, -1]
        before = np.zeros((G, full, B, d), dtype=dtype)
        before[:, 1:] = states[:, :-1]
        before = before.reshape(G, rows, d)
        step = max(1, (1 << 15) // (n * L))             # rows a piece: the product stays in cache
        for r0 in range(B, rows, step):                 # chunk 0 starts from zero
            sol[:, r0:r0 + step] += before[:, r0:r0 + step] @ Rt
    if not direct:
        target[...] = sol.reshape(target.shape)
    if rem:   # the last, short chunk: its first rem columns of T and R
        cols = (np.arange(n)[:, None] * L + np.arange(rem)[None, :]).reshape(-1)
        tail = y5[..., full * L:].transpose(1, 0, 2, 3, 4).reshape(G, B, n * rem)
        xt = tail @ Tt[:, cols][:, :, cols]
        if state is not None:
            xt += state @ Rt[:, :, cols]
        x5[..., full * L:] = xt.reshape(G, B, cg, H, rem).transpose(1, 0, 2, 3, 4)
    return out
