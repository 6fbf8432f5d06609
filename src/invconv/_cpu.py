"""Backend "cpu": the masked convolution and its inverse with NumPy and BLAS only.

Everything is computed in the input dtype, with no compiler at run time and
no SciPy (except the reference for calls with non-finite inputs or an
overflowing result, see the end).

Orientation.  Every op is reduced to one canonical case: the image is viewed
flipped (a view, no copy) so that the operator reads only up and to the left,
``(M x)[h, w] = sum_{du, dv} A[du, dv] @ x[h - du, w - dv]`` with C x C blocks
``A`` (block-diagonal over groups, the masking rules applied).  The adjoints
are the same computations on the image flipped the other way with every block
transposed.

Convolution and weight gradient.  im2col then one GEMM: the kh*kw shifted
copies of the (zero-padded) input are stacked into a (C*kh*kw, pixels)
matrix, ``y = [A_00 ... A_(kh-1)(kw-1)] @ Z`` and ``grad_W = g @ Z^T``.
With groups, the rows of each group are consecutive and the GEMM is one
batched GEMM over groups (so does the wavefront below): groups cost no
extra flops.
Images are held batch-innermost, (C, H, W, B), so a pixel's values across
the batch are one contiguous run for im2col and the wavefront's gathers.
The im2col matrix is built in chunks of rows so the scratch stays within
twice the input and ``_IM2COL_ELEMENTS`` (or one row's worth).

Inverse.  The image is cut into Th x Tw pixel tiles, walked by anti-diagonals
of tiles (every tile of a diagonal depends only on earlier diagonals).  For
one tile, with its pixels' unknowns ``x_P`` and the already solved pixels
around it ``x_H`` (kh-1 rows above, kw-1 columns to the left),
``A_PP x_P + A_PH x_H = y_P``, so ``x_P = A_PP^-1 y_P - A_PP^-1 A_PH x_H``:
the inverse of the tile's own (triangular) block is folded into the taps, in
float64 by substitution, once per call.  So one wavefront step is: gather the tiles'
(Th+kh-1) x (Tw+kw-1) windows (a ``np.take``; y on the tile's own pixels,
solutions around them) and one GEMM with the folded (Th*Tw*C, window*C)
operator for all tiles and images of the diagonal, which writes its block of
a step-ordered solution array in place (no scatter; one gather at the end
puts the solutions in image order).  Gather indices depend only on (C, H, W,
kh, kw, Th, Tw), are built once and kept in a bounded LRU cache
(``_PLAN_ENTRIES`` plans, ``_PLAN_BYTES`` bytes) under a lock; a call's
scratch is its own, so calls from several threads are independent.

Tile rule (``_tile``).  A tile trades extra flops (the window is larger
than the tile and the folded operator is dense: C^2 (Th+kh-1)(Tw+kw-1)
multiply-adds a pixel) for fewer, wider GEMMs and fewer wavefront steps.
Measured on the project's 2-core AMD EPYC machine (shared with other jobs,
load average 5-8: ratios move by +-10% between runs), one thread, float32,
k = 3, 2026-11-29, code at c6729b9 (step-ordered solution array, np.dot):
inverse time / torch conv2d forward time for tiles Th x Tw, median [range]
of three interleaved sweeps (21 repeats each), best first:

================ ==========================================================
shape            ratio for tile
================ ==========================================================
100 x 1 x 28^2   4x4 0.77 [0.74-0.79], 2x2 0.80, 2x8 0.80, 2x4 0.81
100 x 4 x 14^2   2x2 1.02 [1.02-1.04], 2x1 1.04, 1x1 1.06, 1x2 1.10
100 x 12 x 16^2  2x1 1.36 [1.34-1.47], 1x2 1.41, 1x1 1.50, 2x2 1.67
100 x 3 x 32^2   1x2 0.82 [0.81-0.82], 2x1 0.84, 2x2 0.87, 2x4 0.91
16 x 3 x 64^2    4x2 1.00 [0.89-1.08], 2x4 1.02, 4x4 1.07, 2x2 1.08
4 x 3 x 256^2    4x2 1.27 [1.24-1.39], 4x4 1.28, 2x4 1.31, 2x2 1.52
1 x 3 x 256^2    2x4 2.04 [2.04-2.21], 4x4 2.13, 2x8 2.13, 4x8 2.33
================ ==========================================================

(torch's time is bimodal at some shapes, so compare tiles within a row, not
rows.)  At 1 x 3 x 256^2 two earlier sweeps put 4x4 first (2.04 and 2.21,
against 2.18/2.22 for 2x4 and 2.24/2.28 for 2x8).  At 100 x 48 x 8^2 the
first version of the gather measured 1x1 2.18, 1x2 5.24 (sweeps today are
too noisy there).  Wide channels fill the GEMM by themselves: 1 x 1 from 16
channels, 2 x 1 from 4.  One channel: 4 x 4.  Two or three channels: 1 x 2
for 32 images or more, 4 x 2 from 4 images, 4 x 4 below that (one large
image: fewer, wider steps).  Tiles are clipped to the image.

Which algorithm (``_wavefront``), in this order.  Taps that reach beyond
the image are dropped first (they never read it).  A thin image (one side a
few pixels, the other long) is solved by the blocked recurrence of
:mod:`invconv._cpu_rows` when its measured cost model says it is cheaper
(``_cpu_rows.chosen``: H + W - 1 wavefront steps of Python overhead
against a fixed number of whole-image GEMMs).  Otherwise the tiled
wavefront runs, with a gather plan when the plan (its size computed by
``_plan_bytes`` before it is built) is at most ``_PLAN_MAX_BYTES``, and
else the plan-free walk of :mod:`invconv._cpu_walk` (strided window views,
no index arrays; measured faster than the plan at k = 31, slower at k = 3).

Memory bound.  Beyond a few image-sized arrays (the input, the output, the
solutions and y: at most about 5 inputs with the tile padding), a call
holds at most one plan of ``_PLAN_MAX_BYTES`` (64 MiB), the folded
operators of about ``_fold_bytes`` (at most ``_WORK_BYTES``, 256 MiB: a
fold over it on the chosen tile is made on 1 x 1 tiles instead, and a size
whose 1 x 1 fold is still over it is refused with a MemoryError naming the
sizes before anything large is allocated) and one step's windows (at most
``_cpu_walk._STEP_BYTES`` on the walk).  The plan cache never holds more
than ``_PLAN_BYTES`` (a plan over it serves its call only); fold patterns
over ``_PATTERN_CACHE_BYTES`` are not cached.  For comparison the SciPy
reference needs about 60 bytes per weight tap and pixel (C C_g kh kw H W
entries of its sparse matrix, with the COO indices while it is built).

NaN and Inf.  A folded operator and a padded window multiply every entry of
the window, so one non-finite value would turn into NaN on outputs that do
not depend on it (``0 * Inf``).  So each call first checks its inputs (the
images and the weight entries it reads) with ``np.isfinite``; if any is not
finite, that call is computed by the SciPy reference instead, whose sparse
structure sends NaN/Inf exactly to the outputs that depend on them.  A
solve with finite inputs can still overflow mid-solve, and a window then
carries that Inf into tile pixels that do not depend on it (even rows or
channels far from overflow); so a solve whose result is not all finite is
computed again by the reference.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import threading

import numpy as np

from . import _cache
from ._api import Conv, effective_weight, ignored

_IM2COL_ELEMENTS = 1 << 18      # im2col chunk bound in elements (about L2-sized)
_PLAN_ENTRIES = 32              # plan cache bound: entries ...
_PLAN_BYTES = 256 << 20         # ... and bytes of index arrays (never exceeded)
_PLAN_MAX_BYTES = 64 << 20      # a larger plan is not built: the plan-free walk runs
_WORK_BYTES = 256 << 20         # bound of a call's folded operators (beyond the images)
_PATTERN_CACHE_BYTES = 8 << 20  # fold patterns larger than this are not cached
_TRANSPOSE_IMAGES = 8           # batch block of the layout changes (measured)


# --------------------------------------------------------------------------
# orientation and blocks


def _flip(a, rows: bool, cols: bool):
    """View of a (..., H, W) array with the chosen axes reversed."""
    return a[..., ::-1 if rows else 1, ::-1 if cols else 1]


class _Operator:
    """The blocks of one (adjoint) operator, as :func:`_blocks` returns them.

    ``key`` identifies the weight values and options (a digest of the
    weight's bytes), so work derived from the blocks alone (the folded tile operators,
    the convolution's GEMM matrix) is cached under it: a repeated call with
    the same weight, and the solve and vjp of one training step, fold once.
    """

    __slots__ = ("key", "blocks", "flip_rows", "flip_cols", "finite")

    def __init__(self, key, blocks, flip_rows, flip_cols):
        self.key, self.blocks = key, _cache.frozen(blocks)
        self.flip_rows, self.flip_cols = flip_rows, flip_cols
        self.finite = bool(np.isfinite(blocks).all())


# Operators and what is derived from them, by weight digest: bounded so that a
# training run (a new weight every step) only ever holds the newest few.
_derived = _cache.BoundedCache(max_entries=64, max_bytes=64 << 20)


def _blocks(weight, conv: Conv, adjoint: bool) -> _Operator:
    """(kh, kw, C, C) offset-form blocks A[du, dv] in the input dtype, and the
    flips that make the (adjoint) operator read up-left.

    Forward: pixel (h, w) reads (h - rs*du, w - cs*dv) with block A[du, dv];
    flipping the axes whose sign is -1 makes it read (h - du, w - dv).  The
    adjoint reads (h + rs*du, w + cs*dv) with A^T: flip the other axes.
    """
    # A digest, not the bytes themselves: a key must not hold a copy of a
    # large weight (blake2b: a collision is not a practical concern).
    digest = hashlib.blake2b(np.ascontiguousarray(weight).data, digest_size=20).digest()
    key = ("blocks", conv, adjoint, weight.dtype.str, weight.shape, digest)
    return _derived.get_or_build(key, lambda: _build_blocks(key, weight, conv, adjoint),
                                 lambda op: 2 * op.blocks.nbytes)


def _build_blocks(key, weight, conv, adjoint):
    C, cg, kh, kw = weight.shape
    weff = effective_weight(weight, conv)
    if conv.row_sign > 0:
        weff = weff[:, :, ::-1, :]
    if conv.col_sign > 0:
        weff = weff[:, :, :, ::-1]
    blocks = np.zeros((kh, kw, C, C), dtype=weight.dtype)
    for g in range(conv.groups):
        s = slice(g * cg, (g + 1) * cg)
        blocks[:, :, s, s] = weff[s].transpose(2, 3, 0, 1)
    if adjoint:
        blocks = np.ascontiguousarray(blocks.transpose(0, 1, 3, 2))
        return _Operator(key, blocks, conv.row_sign > 0, conv.col_sign > 0)
    return _Operator(key, blocks, conv.row_sign < 0, conv.col_sign < 0)


def _derived_from(operator: _Operator, what, build):
    """``build()``, cached with ``operator`` under ``what`` (a NumPy array)."""
    return _derived.get_or_build((what, operator.key),
                                 lambda: _cache.frozen(build()), lambda a: a.nbytes)


# --------------------------------------------------------------------------
# layout: (B, C, H, W) <-> (C, H, W, B), batch innermost


def _copy_batch_last(dst, x):
    """dst (C, H, W, B) <- x (B, C, H, W).

    Batch innermost makes every pixel's (image) values one contiguous run, so
    im2col slices and wavefront gathers copy long runs.  The layout change
    goes a few images at a time, which keeps both sides of the copy in cache
    (about 6x faster than one strided copy, measured).
    """
    B = x.shape[0]
    for b0 in range(0, B, _TRANSPOSE_IMAGES):
        b1 = min(B, b0 + _TRANSPOSE_IMAGES)
        dst[..., b0:b1] = x[b0:b1].transpose(1, 2, 3, 0)


def _copy_batch_first(dst, a):
    """dst (B, C, H, W) <- a (C, H, W, B), a few images at a time."""
    B = a.shape[3]
    for b0 in range(0, B, _TRANSPOSE_IMAGES):
        b1 = min(B, b0 + _TRANSPOSE_IMAGES)
        dst[b0:b1] = a[..., b0:b1].transpose(3, 0, 1, 2)


def _batch_last(x, hs, ws, top, left):
    """(B, C, H, W) -> zeros (C, hs, ws, B) holding x at rows top.., columns left.."""
    B, C, H, W = x.shape
    buf = np.zeros((C, hs, ws, B), dtype=x.dtype)
    _copy_batch_last(buf[:, top:top + H, left:left + W], x)
    return buf


def _batch_first(a, flip_rows, flip_cols):
    """(C, H, W, B) -> a new (B, C, H, W), flipped back."""
    C, H, W, B = a.shape
    out = np.empty((B, C, H, W), dtype=a.dtype)
    _copy_batch_first(_flip(out, flip_rows, flip_cols), a)
    return out


# --------------------------------------------------------------------------
# convolution and weight gradient: im2col + one GEMM


def _row_chunks(H, per_row, image_elements):
    """Row ranges whose im2col (per_row elements a row) stays within twice the
    input and within ``_IM2COL_ELEMENTS`` (or one row, if that is more)."""
    bound = min(_IM2COL_ELEMENTS, max(2 * image_elements, 1 << 16))
    rows = max(1, bound // per_row)
    for r0 in range(0, H, rows):
        yield r0, min(H, r0 + rows)


def _im2col(xb, kh, kw, r0, r1, W):
    """(C*kh*kw, rows*W*B): row (c, du, dv) holds x[c, h - du, w - dv, b].

    xb is (C, H + kh - 1, W + kw - 1, B), zero-padded at the top and left.
    Channel-major rows keep each group's rows together.
    """
    C, B = xb.shape[0], xb.shape[3]
    z = np.empty((C, kh, kw, r1 - r0, W, B), dtype=xb.dtype)
    for du in range(kh):
        for dv in range(kw):
            z[:, du, dv] = xb[:, r0 + kh - 1 - du:r1 + kh - 1 - du, kw - 1 - dv:kw - 1 - dv + W]
    return z.reshape(C * kh * kw, -1)


def _per_group(a, groups):
    """The rows of a 2-D matrix as ``groups`` consecutive blocks, (G, rows / G,
    columns), a batch for np.matmul; the matrix itself for one group."""
    return a if groups == 1 else a.reshape(groups, a.shape[0] // groups, -1)


def _conv_matrix(blocks, groups):
    """a[g, o, (i, du, dv)] = A[du, dv][g*cg + o, g*cg + i] (no g for one group)."""
    kh, kw, C = blocks.shape[:3]
    cg = C // groups
    a = np.stack([blocks[:, :, s, s].transpose(2, 3, 0, 1).reshape(cg, cg * kh * kw)
                  for s in (slice(g * cg, (g + 1) * cg) for g in range(groups))])
    return a[0] if groups == 1 else a


def _apply(x, operator: _Operator, groups):
    """sum_{du,dv} A[du,dv] @ x[h-du, w-dv] on the flipped view; returned unflipped.

    Groups are independent: one batched GEMM of each group's rows.
    """
    B, C, H, W = x.shape
    blocks, flip_rows, flip_cols = operator.blocks, operator.flip_rows, operator.flip_cols
    kh, kw = blocks.shape[:2]
    xb = _batch_last(_flip(x, flip_rows, flip_cols), H + kh - 1, W + kw - 1, kh - 1, kw - 1)
    a = _derived_from(operator, ("conv matrix", groups), lambda: _conv_matrix(blocks, groups))
    yb = np.empty((C, H, W, B), dtype=x.dtype)
    for r0, r1 in _row_chunks(H, kh * kw * C * W * B, x.size):
        z = _per_group(_im2col(xb, kh, kw, r0, r1, W), groups)
        yb[:, r0:r1] = np.matmul(a, z).reshape(C, r1 - r0, W, B)
        del z  # before the next chunk's im2col is allocated
    return _batch_first(yb, flip_rows, flip_cols)


def _weight_grad_canonical(g, x, kh, kw, groups):
    """(C, C_g, kh, kw): G[o, i, du, dv] = sum_{b,h,w} g[b, o, h, w] *
    x[b, g*C_g + i, h - du, w - dv], g the group of o."""
    B, C, H, W = x.shape
    cg = C // groups
    xb = _batch_last(x, H + kh - 1, W + kw - 1, kh - 1, kw - 1)
    gb = _batch_last(g, H, W, 0, 0)
    acc = np.zeros((groups, cg, cg * kh * kw), dtype=x.dtype)
    for r0, r1 in _row_chunks(H, kh * kw * C * W * B, x.size):
        z = _per_group(_im2col(xb, kh, kw, r0, r1, W), groups)
        gm = _per_group(gb[:, r0:r1].reshape(C, -1), groups)
        # z^T as a transposed view: BLAS reads it in place (no copy) for one group
        acc += np.matmul(gm, np.swapaxes(z, -1, -2)).reshape(acc.shape)
        del z  # before the next chunk's im2col is allocated
    return acc.reshape(C, cg, kh, kw)


# --------------------------------------------------------------------------
# the tiled wavefront solve


def _tile(B, C, H, W, kh, kw):
    """(Th, Tw) for B images of C channels (per group): the measured rule
    of the module docstring."""
    if C >= 16:
        th, tw = 1, 1
    elif C >= 4:
        th, tw = 2, 1
    elif C == 1:
        th, tw = 4, 4
    elif B >= 32:
        th, tw = 1, 2
    elif B >= 4:
        th, tw = 4, 2
    else:
        th, tw = 4, 4
    return min(th, H), min(tw, W)


def _tile_windows(a, shape, th, tw):
    """Read-only view (C, rows, columns, tiles) of a (C, ., .) array from its
    origin: tile t's window starts t * th rows down and t * tw columns left."""
    sC, sH, sW = a.strides
    return np.lib.stride_tricks.as_strided(a, shape=shape, strides=(sC, sH, sW, th * sH - tw * sW),
                                           writeable=False)


class _Plan:
    """Gather indices of the tiled wavefront for one (C, H, W, kh, kw, Th, Tw).

    The call's scratch is one array of rows (B values each, the batch
    innermost): first the solutions, step by step, each step's block laid out
    (channel, tile pixel, tile) exactly as that step's GEMM writes it (so the
    GEMM writes in place, with no scatter); then y, (C, H, W) as the flipped
    view sees it; then one zero row.  Step s gathers the rows ``gather[s]``
    (channel, window pixel, tile): a window pixel of the tile itself reads y,
    an earlier pixel its solution, and a pixel outside the image the zero
    row, so padding and the solutions of tile overhang beyond the image are
    never read.  ``final`` gathers the solutions in (C, H, W) order of the
    flipped view.  (Folding the flips into the indices instead would save a
    copy at B = 1 but cache two plans per shape, forward and adjoint.)  Row
    indices that include the channel make each gather one contiguous-row
    ``take`` (for B = 1 the fast 1-D path).
    """

    def __init__(self, C, H, W, kh, kw, th, tw):
        ni, nj = -(-H // th), -(-W // tw)
        wh, ww = th + kh - 1, tw + kw - 1
        P = th * tw
        steps = ni + nj - 1
        first = [max(0, d - nj + 1) for d in range(steps)]           # first tile row of a step
        tiles = np.array([min(ni, d + 1) - first[d] for d in range(steps)])
        start = np.concatenate([[0], np.cumsum(C * P * tiles)])
        self.blocks = [(int(start[d]), int(start[d + 1])) for d in range(steps)]
        self.y_row = int(start[-1])
        self.zero_row = self.y_row + C * H * W
        self.rows = self.zero_row + 1
        # int32 halves the plan (numpy converts to intp inside each take: a
        # little slower on a warm cache, a little faster when the benchmark's
        # other ops have evicted the plan, measured at 1 x 3 x 256^2)
        index = np.int32 if self.rows < 2**31 else np.intp
        # every canonical (flipped-view) pixel of the tile grid: its solution's
        # row for channel 0 and the row distance between channels, and y's row
        h, w = np.arange(ni * th)[:, None], np.arange(nj * tw)[None, :]
        step = h // th + w // tw
        tile_count = tiles[step]
        solution = (start[step] + ((h % th) * tw + w % tw) * tile_count
                    + h // th - np.asarray(first)[step])
        solution_stride = P * tile_count
        channel = np.arange(C)[:, None, None]
        self.final = (solution + channel * solution_stride)[:, :H, :W].reshape(-1).astype(index)
        # Index images: the row of each pixel's solution (zero-padded with
        # the zero row above/left of the image and over the tile overhang)
        # and of its y.  A step's gather is then one strided window view per
        # index image (tile i + 1's window is th rows down, tw columns left
        # of tile i's) copied out: two copies a step, no per-entry arithmetic
        # (a first call was dominated by building the plan otherwise).
        grid = np.full((C, kh - 1 + ni * th, kw - 1 + nj * tw), self.zero_row, dtype=index)
        grid[:, kh - 1:kh - 1 + H, kw - 1:kw - 1 + W] = self.final.reshape(C, H, W)
        ys = np.full((C, ni * th, nj * tw), self.zero_row, dtype=index)
        ys[:, :H, :W] = (self.y_row + np.arange(C * H * W)).reshape(C, H, W)
        self.gather = []
        for d in range(steps):
            i0, count = first[d], int(tiles[d])
            g = np.empty((C, wh, ww, count), dtype=index)
            g[...] = _tile_windows(grid[:, i0 * th:, (d - i0) * tw:], (C, wh, ww, count), th, tw)
            g[:, kh - 1:, kw - 1:] = _tile_windows(ys[:, i0 * th:, (d - i0) * tw:],
                                                   (C, th, tw, count), th, tw)
            self.gather.append(g.reshape(-1))
        self.nbytes = sum(a.nbytes for a in self.gather) + self.final.nbytes


_plans: collections.OrderedDict = collections.OrderedDict()
_plans_bytes = [0]
_plans_lock = threading.Lock()


def _plan_bytes(C, H, W, kh, kw, th, tw) -> int:
    """The bytes of :class:`_Plan`'s index arrays, before building it."""
    tiles = -(-H // th) * -(-W // tw)
    rows = C * th * tw * tiles + C * H * W + 1
    entries = C * (th + kh - 1) * (tw + kw - 1) * tiles + C * H * W
    return entries * (4 if rows < 2**31 else 8)


def _plan(C, H, W, kh, kw, th, tw) -> _Plan:
    key = (C, H, W, kh, kw, th, tw)
    with _plans_lock:
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            return plan
    plan = _Plan(*key)  # built outside the lock; plans are immutable once built
    with _plans_lock:
        # a plan over the byte bound serves its call only: never cached
        if key not in _plans and plan.nbytes <= _PLAN_BYTES:
            _plans[key] = plan
            _plans_bytes[0] += plan.nbytes
        while _plans and (len(_plans) > _PLAN_ENTRIES or _plans_bytes[0] > _PLAN_BYTES):
            _, old = _plans.popitem(last=False)
            _plans_bytes[0] -= old.nbytes
        return _plans.get(key, plan)


def _pattern_bytes(C, kh, kw, th, tw) -> int:
    """About the bytes :func:`_fold_pattern` keeps: two int64 entries a tap
    and pixel pair, and the boolean reach."""
    P, Q = th * tw, (th + kh - 1) * (tw + kw - 1)
    return 2 * 8 * C * C * P * kh * kw + C * P * C * Q


def _fold_bytes(C, kh, kw, th, tw) -> int:
    """About the peak bytes of one :func:`_folded_operator` call (float64
    system, right-hand side, solution and pattern, transients included)."""
    P, Q = th * tw, (th + kh - 1) * (tw + kw - 1)
    return 8 * (C * P) ** 2 + 3 * 8 * C * P * C * Q + 3 * _pattern_bytes(C, kh, kw, th, tw)


def _fold_pattern(C, kh, kw, th, tw):
    if _pattern_bytes(C, kh, kw, th, tw) > _PATTERN_CACHE_BYTES:
        return _fold_pattern_cached.__wrapped__(C, kh, kw, th, tw)
    return _fold_pattern_cached(C, kh, kw, th, tw)


@functools.lru_cache(maxsize=16)   # each at most _PATTERN_CACHE_BYTES
def _fold_pattern_cached(C, kh, kw, th, tw):
    """Where the taps go in the folded operator's system, for one (C, kh, kw,
    Th, Tw); rows (channel, tile pixel), columns (channel, tile or window pixel).

    Tile pixel p = (r, s) reads window pixel q = (r + kh-1-du, s + kw-1-dv)
    with block (du, dv): inside the tile (pixel p') that entry goes into the
    tile's own block A_PP (flat indices ``own_at`` for the taps ``own_tap``),
    outside it into the right-hand side with a minus sign (``rest_at``,
    ``rest_tap``); ``eye_at`` are the right-hand side's identity entries (y
    of the tile's own pixels), ``reach`` the entries that may be nonzero,
    ``pixel_major`` the rows in (tile pixel, channel) order, where ``A_PP`` is
    lower-triangular when the same-pixel block is.
    """
    wh, ww = th + kh - 1, tw + kw - 1
    P, Q = th * tw, wh * ww
    r, s, du, dv = (a.reshape(-1) for a in np.indices((th, tw, kh, kw)))
    p, tap = r * tw + s, du * kw + dv
    qr, qc = r + kh - 1 - du, s + kw - 1 - dv
    q = qr * ww + qc
    inside = (qr >= kh - 1) & (qc >= kw - 1)
    p_in = (qr - (kh - 1)) * tw + (qc - (kw - 1))
    co, ci = np.arange(C)[:, None, None], np.arange(C)[None, :, None]

    def flat(keep, row_pixel, col_pixel, ncols):      # (taps, C_out, C_in) flat indices
        rows = co * P + row_pixel[keep]
        cols = ci * ncols + col_pixel[keep]
        return (rows * (C * ncols) + cols).transpose(2, 0, 1).reshape(-1)

    own = (kh - 1 + np.arange(th))[:, None] * ww + (kw - 1 + np.arange(tw))[None, :]
    eye_rows = np.arange(C)[:, None] * P + np.arange(P)[None, :]
    eye_cols = np.arange(C)[:, None] * Q + own.reshape(1, -1)
    pr, pc = np.divmod(own.reshape(-1), ww)
    wr, wc = np.divmod(np.arange(Q), ww)
    reach = (wr[None, :] <= pr[:, None]) & (wc[None, :] <= pc[:, None])     # (P, Q)
    return dict(own_at=flat(inside, p, p_in, P), own_tap=tap[inside],
                rest_at=flat(~inside, p, q, Q), rest_tap=tap[~inside],
                eye_at=(eye_rows * (C * Q) + eye_cols).reshape(-1),
                pixel_major=(np.arange(C)[None, :] * P + np.arange(P)[:, None]).reshape(-1),
                reach=np.broadcast_to(reach[None, :, None, :], (C, P, C, Q)).reshape(C * P, C * Q))


def _tile_block_solve(lower, rhs, c):
    """``lower @ x = rhs`` by block forward substitution (NumPy only).

    lower: (n, n), block-lower-triangular in blocks of c x c (one block row a
    tile pixel) whose diagonal blocks are all the same lower-triangular
    same-pixel block with a non-zero diagonal; rhs: (n, m). That block is
    inverted once by substitution, then each pixel's rows take one GEMM.
    Substitution stays accurate where LU with pivoting does not (see
    :func:`_folded_operator`).
    """
    block = lower[:c, :c]
    inverse = np.zeros_like(block)
    for i in range(c):
        inverse[i, i] = 1.0 / block[i, i]
        inverse[i, :i] = -(block[i, :i] @ inverse[:i, :i]) / block[i, i]
    x = np.empty_like(rhs)
    for p0 in range(0, lower.shape[0], c):
        x[p0:p0 + c] = inverse @ (rhs[p0:p0 + c] - lower[p0:p0 + c, :p0] @ x[:p0])
    return x


def _folded_operator(blocks, th, tw, dtype):
    """(C*Th*Tw, C*window): rows (c, tile pixel), columns (c, window pixel).

    Applied to the window holding y on the tile's pixels and the solution
    around it, it gives the tile's solution: ``A_PP^-1 [I | -A_PH]`` in
    float64, columns in window order.
    """
    kh, kw, C, _ = blocks.shape
    P, Q = th * tw, (th + kh - 1) * (tw + kw - 1)
    pattern = _fold_pattern(C, kh, kw, th, tw)
    a = blocks.astype(np.float64).reshape(kh * kw, C, C)
    a_pp = np.zeros((C * P, C * P))
    a_pp.flat[pattern["own_at"]] = a[pattern["own_tap"]].reshape(-1)
    rhs = np.zeros((C * P, C * Q))
    rhs.flat[pattern["rest_at"]] = -a[pattern["rest_tap"]].reshape(-1)
    rhs.flat[pattern["eye_at"]] = 1.0
    # In (tile pixel, channel) order A_PP is lower-triangular, channels
    # descending for the adjoint (its same-pixel block is upper-triangular):
    # substitution, never LU with pivoting, which loses everything once a
    # small diagonal makes A_PP ill-conditioned (or calls it singular).
    order = pattern["pixel_major"]
    if np.triu(a[0], 1).any():
        order = order.reshape(P, C)[:, ::-1].reshape(-1)
    op = np.empty_like(rhs)
    op[order] = _tile_block_solve(a_pp[np.ix_(order, order)], rhs[order], C)
    # Tile pixel p depends only on window pixels above-left of it (or itself);
    # clear everything else exactly, so nothing couples real pixels to the
    # tile padding beyond the image's right/bottom edge.
    op *= pattern["reach"]
    return op.astype(dtype)


def _folded_operators(blocks, groups, th, tw):
    """Each group's :func:`_folded_operator`, stacked (no group axis for one)."""
    cg = blocks.shape[2] // groups
    ops = np.stack([_folded_operator(blocks[:, :, s, s], th, tw, blocks.dtype)
                    for s in (slice(g * cg, (g + 1) * cg) for g in range(groups))])
    return ops[0] if groups == 1 else ops


def _wavefront(rhs, operator: _Operator, groups):
    """Solve sum_{du,dv} A[du,dv] x[h-du, w-dv] = rhs on the flipped view.

    Groups are independent: channel-major rows and columns make the folded
    operator block-diagonal, so each step is one batched GEMM over groups.
    """
    B, C, H, W = rhs.shape
    flip_rows, flip_cols = operator.flip_rows, operator.flip_cols
    blocks = operator.blocks[:H, :W]    # taps reaching beyond the image never read it
    kh, kw = blocks.shape[:2]
    cg = C // groups
    th, tw = _tile(B, cg, H, W, kh, kw)
    if _cpu_rows.chosen(B, cg, H, W, kh, kw, groups, (th, tw)):
        return _cpu_rows.solve(rhs, blocks, flip_rows, flip_cols, groups)
    if _fold_bytes(cg, kh, kw, th, tw) > _WORK_BYTES:
        th, tw = 1, 1                           # the smallest fold: C x C kh kw
        if _fold_bytes(cg, kh, kw, th, tw) > _WORK_BYTES:
            raise MemoryError(
                f"inv_conv2d on the cpu backend: {B}x{C}x{H}x{W} images with a {kh}x{kw} "
                f"kernel ({cg} channels a group, taps beyond the image dropped) need a "
                f"folded operator of about {_fold_bytes(cg, kh, kw, 1, 1) / 2**20:.0f} MiB "
                f"even on 1x1 tiles, over the backend's bound of {_WORK_BYTES / 2**20:.0f} "
                f"MiB (invconv._cpu._WORK_BYTES); the reference backend needs about 60 "
                f"bytes per weight tap and pixel, "
                f"{60 * C * cg * kh * kw * H * W / 2**30:.1f} GiB here")
    if _plan_bytes(C, H, W, kh, kw, th, tw) > _PLAN_MAX_BYTES:
        return _cpu_walk.walk(rhs, blocks, flip_rows, flip_cols, groups, th, tw)
    plan = _plan(C, H, W, kh, kw, th, tw)
    ops = _derived_from(operator, ("folded", groups, kh, kw, th, tw),
                        lambda: _folded_operators(blocks, groups, th, tw))
    lead = () if groups == 1 else (groups,)
    z_rows, out_rows = cg * (th + kh - 1) * (tw + kw - 1), cg * th * tw
    store = np.empty(plan.rows * B, dtype=rhs.dtype)
    rows = store if B == 1 else store.reshape(-1, B)
    rows[plan.zero_row] = 0
    _copy_batch_last(rows[plan.y_row:plan.zero_row].reshape(C, H, W, B),
                     _flip(rhs, flip_rows, flip_cols))
    # np.dot has less per-call overhead than np.matmul (both BLAS): about 4%
    # of the step loop at 1 x 3 x 256^2 (127 steps), measured
    product = np.dot if groups == 1 else np.matmul
    for gather, (r0, r1) in zip(plan.gather, plan.blocks):
        z = rows.take(gather, axis=0).reshape(*lead, z_rows, -1)
        product(ops, z, out=store[r0 * B:r1 * B].reshape(*lead, out_rows, -1))
    if B == 1:
        # in pieces: take converts the int32 indices to intp, a copy each
        out = np.empty((1, C, H, W), dtype=rhs.dtype)
        dst, final = _flip(out, flip_rows, flip_cols)[0], plan.final.reshape(C, H, W)
        piece = max(1, _IM2COL_ELEMENTS // W)
        for c in range(C):
            for r0 in range(0, H, piece):
                dst[c, r0:r0 + piece] = store.take(final[c, r0:r0 + piece])
        return out
    solution = rows.take(plan.final, axis=0).reshape(C, H, W, B)
    del rows, store                              # before the output is allocated
    return _batch_first(solution, flip_rows, flip_cols)


# --------------------------------------------------------------------------
# the backend functions


def _finite(*arrays) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def _reference():
    from . import reference  # only for non-finite inputs
    return reference


# Each op checks the arrays it reads; the blocks hold exactly the weight
# entries that are read (ignored ones are already replaced by 0 or 1).

def _forward(x, weight, conv: Conv):
    operator = _blocks(weight, conv, adjoint=False)
    if not (operator.finite and _finite(x)):
        return _reference()._forward(x, weight, conv)
    return _apply(x, operator, conv.groups)


def _forward_adjoint(grad_y, weight, conv: Conv):
    operator = _blocks(weight, conv, adjoint=True)
    if not (operator.finite and _finite(grad_y)):
        return _reference()._forward_adjoint(grad_y, weight, conv)
    return _apply(grad_y, operator, conv.groups)


def _solve(y, weight, conv: Conv):
    operator = _blocks(weight, conv, adjoint=False)
    if not (operator.finite and _finite(y)):
        return _reference()._solve(y, weight, conv)
    x = _wavefront(y, operator, conv.groups)
    if not _finite(x):      # overflowed mid-solve (module docstring)
        return _reference()._solve(y, weight, conv)
    return x


def _solve_adjoint(grad_x, weight, conv: Conv):
    operator = _blocks(weight, conv, adjoint=True)
    if not (operator.finite and _finite(grad_x)):
        return _reference()._solve_adjoint(grad_x, weight, conv)
    grad_y = _wavefront(grad_x, operator, conv.groups)
    if not _finite(grad_y):
        return _reference()._solve_adjoint(grad_x, weight, conv)
    return grad_y


def _weight_grad(grad_out, x, scale, conv: Conv):
    if not _finite(grad_out, x):
        return _reference()._weight_grad(grad_out, x, scale, conv)
    rows, cols = conv.row_sign < 0, conv.col_sign < 0
    out = _weight_grad_canonical(_flip(grad_out, rows, cols), _flip(x, rows, cols),
                                 conv.kh, conv.kw, conv.groups)
    # canonical offset (du, dv) is kernel tap (u, v) with u = kh-1-du for a padded top
    out = _flip(out, conv.row_sign > 0, conv.col_sign > 0) * np.asarray(scale, dtype=x.dtype)
    out[ignored(conv)] = 0
    return out


from . import _cpu_rows, _cpu_walk  # noqa: E402  (last: they import this module's helpers)
