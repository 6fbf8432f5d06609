"""Backend "cpu": the tiled wavefront without a gather plan, for large kernels.

A gather plan (:class:`invconv._cpu._Plan`) holds C (Th+kh-1)(Tw+kw-1) int32
indices per tile: every pixel's window again, about 72 entries a pixel at
k = 31 on 4 x 4 tiles (909 MB for one 3 x 1024 x 1024 image).  When a plan
would exceed ``_cpu._PLAN_MAX_BYTES`` this walk runs instead: the solution
lives in one zero-padded image, (B, C, kh-1+H', kw-1+W') with H', W' the
image rounded up to whole tiles, that holds y until a tile is solved; the
windows of one anti-diagonal's tiles are a strided view of it (tile i+1's
window is th rows down and tw columns left of tile i's), copied into a
scratch of at most ``_STEP_BYTES`` (a diagonal's tiles go in pieces),
multiplied by the folded operator, and the tiles written back through the
same kind of view.  Tile overhang beyond the image is zeroed again after
each write, so a later window never reads an overhang solution (0 * Inf).
No index array, so the working set is the padded image, one piece's windows
and the folded operator, whatever the kernel size.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._cpu import _flip, _folded_operator

_STEP_BYTES = 16 << 20          # windows gathered at once (one GEMM's right-hand side)


def walk(rhs, blocks, flip_rows, flip_cols, groups, th, tw):
    """Solve sum_{du,dv} A[du,dv] x[h-du, w-dv] = rhs on the flipped view with
    Th x Tw tiles and no plan; returned unflipped."""
    B, C, H, W = rhs.shape
    kh, kw = blocks.shape[:2]
    G, cg = groups, C // groups
    ni, nj = -(-H // th), -(-W // tw)
    Q = (th + kh - 1) * (tw + kw - 1)
    # the row form: windows (tile, image) x (channel, window pixel) times op^T
    ops = np.stack([_folded_operator(blocks[:, :, s, s], th, tw, rhs.dtype).T
                    for s in (slice(g * cg, (g + 1) * cg) for g in range(G))])
    img = np.zeros((B, C, kh - 1 + ni * th, kw - 1 + nj * tw), dtype=rhs.dtype)
    img[:, :, kh - 1:kh - 1 + H, kw - 1:kw - 1 + W] = _flip(rhs, flip_rows, flip_cols)
    piece = max(1, _STEP_BYTES // (B * C * Q * img.itemsize))
    with np.errstate(over="ignore", invalid="ignore"):   # the caller checks the result
        _steps(img, ops, ni, nj, th, tw, kh, kw, H, W, G, cg, B, piece)
    out = np.empty_like(rhs)
    _flip(out, flip_rows, flip_cols)[...] = img[:, :, kh - 1:kh - 1 + H, kw - 1:kw - 1 + W]
    return out


def _steps(img, ops, ni, nj, th, tw, kh, kw, H, W, G, cg, B, piece):
    """The wavefront's steps on the padded image, in place."""
    wh, ww = th + kh - 1, tw + kw - 1
    Q = wh * ww
    sB, sC, sH, sW = img.strides
    tile_stride = th * sH - tw * sW        # tile (i + 1, j - 1) from tile (i, j)
    for d in range(ni + nj - 1):
        first, last = max(0, d - nj + 1), min(ni, d + 1)     # tile rows of this diagonal
        for i0 in range(first, last, piece):
            nt = min(piece, last - i0)
            j0 = d - i0
            windows = as_strided(img[:, :, i0 * th:, j0 * tw:], shape=(nt, B, G, cg, wh, ww),
                                 strides=(tile_stride, sB, cg * sC, sC, sH, sW), writeable=False)
            z = np.ascontiguousarray(windows.transpose(2, 0, 1, 3, 4, 5)).reshape(G, nt * B, cg * Q)
            x = np.matmul(z, ops)                            # (G, tiles * images, cg * P)
            tiles = as_strided(img[:, :, kh - 1 + i0 * th:, kw - 1 + j0 * tw:],
                               shape=(nt, B, G, cg, th, tw),
                               strides=(tile_stride, sB, cg * sC, sC, sH, sW))
            tiles.transpose(2, 0, 1, 3, 4, 5)[...] = x.reshape(G, nt, B, cg, th, tw)
        # overhang beyond the image: back to zero before a later window reads it
        if ni * th > H and d - (ni - 1) >= 0:
            j = d - (ni - 1)
            img[:, :, kh - 1 + H:, kw - 1 + j * tw:kw - 1 + (j + 1) * tw] = 0
        if nj * tw > W and d - (nj - 1) >= 0:
            i = d - (nj - 1)
            img[:, :, kh - 1 + i * th:kh - 1 + (i + 1) * th, kw - 1 + W:] = 0
