"""Launch plans of the fused rational-quadratic spline (``kernels/spline.cu``).

Array level, like :mod:`invconv._kernels`: :class:`SplineKernels` runs on a
:class:`~invconv._kernels.KernelOps` of either runtime, NumPy arrays through
the CPU emulator (:mod:`invconv._emulated`) or CuPy arrays through NVRTC
(:mod:`invconv._cuda`), with the same plans, so the emulator tests exercise
what the GPU runs.  The torch op and its autograd live in
:mod:`invconv.spline_torch`; :class:`invconv.flows.SplineActivation` uses it
when asked (off by default until a GPU run has passed the kernels).

Inputs: images ``t`` (B, C, H, W) and the knot table ``knots`` (3, C, K+1):
x knots, y knots and the derivatives at the knots, per channel (see
``spline.cu``).  Launches, whatever the size: :meth:`SplineKernels.forward`
1 (2 when a sample's elements are split over several blocks to fill the
device), :meth:`SplineKernels.backward` 1 (2 when a channel's elements are
split).  Reductions are partial sums and a combine, never atomics, so
results are deterministic.
"""
from __future__ import annotations

import functools
import math

import numpy as np

# The members of SplineParams (kernels/spline.cu), in order; all int32.
SPLINE_PARAM_FIELDS = ("B", "C", "HW", "bins", "inverse", "nsplit")
SPLINE_PARAMS_DTYPE = np.dtype([(name, np.int32) for name in SPLINE_PARAM_FIELDS])
SOURCE = "spline.cu"
MAX_GRID_Y = 65535   # CUDA's limit on gridDim.y; the kernels stride past it


@functools.lru_cache(maxsize=256)
def spline_params(B, C, HW, bins, inverse, nsplit) -> np.ndarray:
    """A read-only one-element array of :data:`SPLINE_PARAMS_DTYPE` (cached:
    building one costs microseconds a launch)."""
    params = np.zeros(1, dtype=SPLINE_PARAMS_DTYPE)
    for name, value in zip(SPLINE_PARAM_FIELDS, (B, C, HW, bins, inverse, nsplit)):
        if not 0 <= value < 2**31:
            raise ValueError(f"{name}={value} does not fit the spline kernels' int32 fields")
        params[name] = value
    params.flags.writeable = False
    return params


def check_arguments(t, knots, bound):
    """Validate the array arguments, naming the one at fault; returns ``(B, C, HW, bins)``."""
    if t.ndim != 4:
        raise ValueError(f"t must have 4 dimensions (B, C, H, W), got shape {tuple(t.shape)}")
    if np.dtype(t.dtype) not in (np.float32, np.float64):
        raise TypeError(f"t must be float32 or float64, got {t.dtype}")
    if knots.dtype != t.dtype:
        raise TypeError(f"knots must have t's dtype {t.dtype}, got {knots.dtype}")
    B, C, H, W = t.shape
    if knots.ndim != 3 or knots.shape[0] != 3 or knots.shape[1] != C or knots.shape[2] < 2:
        raise ValueError(f"knots must have shape (3, C={C}, bins + 1 >= 2), got "
                         f"{tuple(knots.shape)}")
    if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a finite number > 0, got {bound!r}")
    return B, C, H * W, knots.shape[2] - 1


class SplineKernels:
    """The fused spline on one runtime; ``ops`` is that runtime's KernelOps
    (its array module, compiled functions and launch limits)."""

    def __init__(self, ops):
        self.ops = ops
        self.xp = ops.xp

    def _splits(self, rows, per_row, block):
        """Blocks per reduction row: enough to fill the device, but each with
        at least a block's worth of elements."""
        lim = self.ops.limits
        return max(1, min(-(-lim.target_blocks // max(rows, 1)), per_row // block,
                          lim.max_grid))

    def forward(self, t, knots, bound, inverse):
        """``(out, logdet)``: the spline (or its inverse) of every element and
        the log-derivative summed per sample, shape (B,), at the input (the
        forward direction) or at the output (the inverse direction)."""
        B, C, HW, bins = check_arguments(t, knots, bound)
        xp = self.xp
        if B == 0 or C * HW == 0:
            return xp.empty(t.shape, dtype=t.dtype), xp.zeros(B, dtype=t.dtype)
        t, knots = xp.ascontiguousarray(t), xp.ascontiguousarray(knots)
        out = xp.empty(t.shape, dtype=t.dtype)
        logdet = xp.empty(B, dtype=t.dtype)
        fn, max_threads = self.ops._function(SOURCE, "spline_forward", t.dtype)
        lim = self.ops.limits
        block = self.ops._block(max_threads, lim.block)
        nsplit = self._splits(B, C * HW, block)
        partial = logdet if nsplit == 1 else xp.empty(B * nsplit, dtype=t.dtype)
        params = spline_params(B, C, HW, bins, int(bool(inverse)), nsplit)
        fn((nsplit, min(B, MAX_GRID_Y)), (block,),
           (t, knots, out, partial, t.dtype.type(bound), params),
           shared_mem=block * t.dtype.itemsize)
        if nsplit > 1:
            fn, max_threads = self.ops._function(SOURCE, "spline_logdet_combine", t.dtype)
            block = self.ops._block(max_threads, lim.block)
            fn((self.ops._grid(B, block, lim),), (block,), (partial, logdet, params))
        return out, logdet

    def backward(self, t, grad_out, grad_logdet, knots, bound, inverse):
        """``(grad_t, grad_knots)`` of ``<grad_out, out> + <grad_logdet, logdet>``
        for :meth:`forward`'s outputs at input ``t``."""
        B, C, HW, bins = check_arguments(t, knots, bound)
        xp = self.xp
        if tuple(grad_out.shape) != tuple(t.shape) or grad_out.dtype != t.dtype:
            raise ValueError(f"grad_out must match t ({tuple(t.shape)}, {t.dtype}), got "
                             f"{tuple(grad_out.shape)}, {grad_out.dtype}")
        if tuple(grad_logdet.shape) != (B,) or grad_logdet.dtype != t.dtype:
            raise ValueError(f"grad_logdet must have shape ({B},) and dtype {t.dtype}, got "
                             f"{tuple(grad_logdet.shape)}, {grad_logdet.dtype}")
        if B == 0 or C * HW == 0:
            return xp.empty(t.shape, dtype=t.dtype), xp.zeros(knots.shape, dtype=t.dtype)
        t, knots = xp.ascontiguousarray(t), xp.ascontiguousarray(knots)
        grad_out, grad_logdet = xp.ascontiguousarray(grad_out), xp.ascontiguousarray(grad_logdet)
        grad_t = xp.empty(t.shape, dtype=t.dtype)
        grad_knots = xp.empty(knots.shape, dtype=t.dtype)
        fn, max_threads = self.ops._function(SOURCE, "spline_backward", t.dtype)
        lim = self.ops.limits
        column = 3 * (bins + 1) * t.dtype.itemsize   # one thread's table gradients
        if column > lim.smem_bytes:
            raise ValueError(f"bins={bins} is too many for the fused spline's backward "
                             f"({column} bytes of shared memory a thread)")
        block = self.ops._block(max_threads, min(lim.block, lim.smem_bytes // column))
        nsplit = self._splits(C, B * HW, block)
        partial = grad_knots if nsplit == 1 else xp.empty((nsplit, *knots.shape), dtype=t.dtype)
        params = spline_params(B, C, HW, bins, int(bool(inverse)), nsplit)
        shared = block * column
        if shared > 48 * 1024:   # CUDA needs an opt-in past 48 KiB
            fn.max_dynamic_shared_size_bytes = shared
        fn((nsplit, min(C, MAX_GRID_Y)), (block,),
           (t, grad_out, grad_logdet, knots, grad_t, partial, t.dtype.type(bound), params),
           shared_mem=shared)
        if nsplit > 1:
            fn, max_threads = self.ops._function(SOURCE, "spline_knot_grad_combine", t.dtype)
            block = self.ops._block(max_threads, lim.block)
            fn((self.ops._grid(grad_knots.size, block, lim),), (block,),
               (partial, grad_knots, params))
        return grad_t, grad_knots


def kernels(runtime: str) -> SplineKernels:
    """The fused spline on ``runtime``: ``"emulator"`` (NumPy arrays, the CPU
    emulator) or ``"cuda"`` (CuPy arrays)."""
    if runtime == "emulator":
        from . import _emulated
        return _kernels_on(_emulated._ops)
    if runtime == "cuda":
        from . import _cuda
        return _kernels_on(_cuda._ops)
    raise ValueError(f"runtime must be 'emulator' or 'cuda', got {runtime!r}")


@functools.lru_cache(maxsize=None)
def _kernels_on(ops) -> SplineKernels:
    return SplineKernels(ops)
