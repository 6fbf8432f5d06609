"""Calls every kernel once on small CuPy inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 9 python3 bench/sanitize_ops.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/sanitize_ops.py

Covers float32 and float64, all four corners, groups 1 and C, unit and
stored diagonals, the shared-memory path of the solves and (1x1x256x256 and
1x3x160x160 float32: 256 and 300 KiB slices) their global-memory path, and
every choice of the default solve schedule "auto" (see default_solve_choice
in src/invconv/_kernels.py): 2 channels a thread for the forward solve
(C_g = 3 at 160x160, C_g = 12 at 8x8), lanes (C_g = 12 adjoint, C_g = 13),
and 1 channel a thread on diagonals (the rest).
"""
import itertools

import cupy
import numpy as np

import invconv
from invconv._api import make_conv

CASES = [  # (B, C, H, W, k, groups)
    (2, 4, 9, 7, 3, 1), (3, 6, 5, 8, 2, 3), (1, 1, 1, 1, 3, 1), (1, 1, 256, 256, 3, 1),
    (2, 12, 8, 8, 3, 1), (1, 13, 6, 5, 2, 1), (1, 3, 160, 160, 3, 1),
]
GLOBAL_PATH_PIXELS = 160 * 160   # float32 only from here: float64 would only be slower


def make_weight(rng, C, groups, k, corner, unit, dtype):
    """A well-conditioned weight: small taps, a non-unit diagonal of magnitude in [0.8, 1.6]."""
    cg = C // groups
    w = rng.uniform(-1, 1, size=(C, cg, k, k)) * (0.5 / (cg * k * k))
    if not unit:
        conv = make_conv(w.shape, corner=corner, groups=groups, unit_diagonal=False)
        u0, v0 = conv.same_pixel_tap
        c = np.arange(C)
        w[c, c % cg, u0, v0] = rng.uniform(0.8, 1.6, size=C) * rng.choice([-1.0, 1.0], size=C)
    return w.astype(dtype)


def main():
    rng = np.random.default_rng(0)
    n = 0
    for dtype in (np.float32, np.float64):
        for (B, C, H, W, k, groups), corner in zip(CASES * 2, itertools.cycle(invconv.CORNERS)):
            if H * W >= GLOBAL_PATH_PIXELS and dtype == np.float64:
                continue
            unit = bool(n % 2)
            w = cupy.asarray(make_weight(rng, C, groups, k, corner, unit, dtype))
            x = cupy.asarray(rng.standard_normal((B, C, H, W)).astype(dtype))
            opts = dict(corner=corner, groups=groups, unit_diagonal=unit)
            y = invconv.conv2d(x, w, **opts)
            x2 = invconv.inv_conv2d(y, w, **opts)
            invconv.conv2d_vjp(x, x, w, **opts)
            invconv.inv_conv2d_vjp(x, x2, w, **opts)
            err = float(cupy.abs(x2 - x).max())
            assert err < (1e-3 if dtype == np.float32 else 1e-9), (B, C, H, W, err)
            n += 1
    cupy.cuda.Device().synchronize()
    print(f"sanitize_ops: {n} cases, every kernel called")


if __name__ == "__main__":
    main()
