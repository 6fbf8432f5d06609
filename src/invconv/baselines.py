"""Alternative implementations of the inverse, for the benchmarks.

``PerDiagonal``: the kernel maths of invconv scheduled one launch per
anti-diagonal (``per_diagonal.cu``), as the published FInC Flow and
Inverse-Flow code schedules it. It runs on CuPy (``runtime="cuda"``) or on the
CPU emulator (``runtime="emulator"``, which the tests use to check it).
"""
from __future__ import annotations

import pathlib

import numpy as np

from . import _api
from ._kernels import kernel_dir, kernel_params, template_name

# The .cu sits beside this wrapper (it is a benchmark baseline, not one of the
# package's kernels), and ships in the wheel with it.
SOURCE = pathlib.Path(__file__).resolve().parent / "per_diagonal.cu"
KERNELS = ("diag_lower_solve", "diag_solve_step", "diag_adjoint_step", "diag_upper_solve")


class PerDiagonal:
    """``solve``/``solve_adjoint`` with H + W - 1 launches each (plus 3);
    ``inv_conv2d_vjp`` adds invconv's two-launch weight gradient."""

    def __init__(self, runtime: str = "cuda"):
        names = [template_name(k, t) for k in KERNELS for t in (np.float32, np.float64)]
        if runtime == "cuda":
            import cupy
            from . import _cuda
            self.ops = _cuda._ops
            self.module = cupy.RawModule(code=SOURCE.read_text(),
                                         options=("--std=c++17", f"-I{kernel_dir()}"),
                                         name_expressions=names)
        else:
            from . import _emulated
            from .emulator import EmulatedModule
            self.ops = _emulated._ops
            self.module = EmulatedModule(path=str(SOURCE), options=(f"-I{kernel_dir()}",),
                                         name_expressions=names)
        self.xp = self.ops.xp

    def _launch(self, kernel, n, args, dtype):
        fn = self.module.get_function(template_name(kernel, dtype))
        block = self.ops.limits.block
        grid = max(1, min(-(-n // block), self.ops.limits.max_grid))
        fn((grid,), (block,), args)

    def _conv(self, a, weight, corner, groups, unit_diagonal):
        return _api.make_conv(weight.shape, corner=corner, groups=groups,
                              unit_diagonal=unit_diagonal, channels=a.shape[1])

    def solve(self, y, weight, *, corner="top-left", groups=1, unit_diagonal=True):
        conv = self._conv(y, weight, corner, groups, unit_diagonal)
        y = self.xp.ascontiguousarray(y)
        prep = self.ops._prepare(weight, conv)
        x = self.xp.empty_like(y)
        params = kernel_params(y.shape, conv)
        B, C, H, W = y.shape
        self._launch("diag_lower_solve", y.size, (y, prep, x, params), y.dtype)
        for d in range(H + W - 1):
            npix = min(d, H - 1) - max(0, d - W + 1) + 1
            self._launch("diag_solve_step", B * C * npix, (prep, x, params, np.int32(d)),
                         y.dtype)
        return x

    def solve_adjoint(self, grad_x, weight, *, corner="top-left", groups=1,
                      unit_diagonal=True):
        conv = self._conv(grad_x, weight, corner, groups, unit_diagonal)
        work = self.xp.array(grad_x, order="C", copy=True)
        prep = self.ops._prepare(weight, conv)
        params = kernel_params(work.shape, conv)
        B, C, H, W = work.shape
        for d in range(H + W - 2, -1, -1):
            npix = min(d, H - 1) - max(0, d - W + 1) + 1
            self._launch("diag_adjoint_step", B * C * npix,
                         (prep, work, params, np.int32(d)), work.dtype)
        out = self.xp.empty_like(work)
        self._launch("diag_upper_solve", work.size, (work, prep, out, params), work.dtype)
        return out

    def inv_conv2d_vjp(self, grad_x, x, weight, *, corner="top-left", groups=1,
                       unit_diagonal=True):
        """Same contract as :func:`invconv.inv_conv2d_vjp`: (grad_y, grad_weight)."""
        conv = self._conv(x, weight, corner, groups, unit_diagonal)
        grad_y = self.solve_adjoint(grad_x, weight, corner=corner, groups=groups,
                                    unit_diagonal=unit_diagonal)
        # x = A^-1 y, so dL/dA = -grad_y x^T: the same correlation as the
        # convolution's weight gradient, negated.
        return grad_y, self.ops.weight_grad(grad_y, x, -1.0, conv)
