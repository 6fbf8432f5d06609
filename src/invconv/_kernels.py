"""How each op launches the kernels in ``kernels/``: one plan, two runtimes.

:class:`KernelOps` holds the launch plans (grid, block, shared memory and
arguments of every kernel) once.  The CUDA backend (:mod:`invconv._cuda`)
gives it CuPy and ``cupy.RawModule``; the emulator backend
(:mod:`invconv._emulated`) gives it NumPy and the CPU emulator's
``EmulatedModule``, which has the same call shape.  So the emulator tests
exercise the very plans and sources the GPU runs.

Launch counts are fixed, whatever the image size: conv2d 1, its adjoint 1,
inverse 3 (two to prepare the folded taps, one wavefront), inverse
adjoint 3, weight gradient 2.

Every kernel takes its shape and launch choices as one struct, ``IcParams``
in ``kernels/common.cuh``, built here by :func:`kernel_params` and passed as a
one-element NumPy array of :data:`PARAMS_DTYPE` (how CuPy passes a struct by
value; the emulator takes the same).

The solves have schedules (:class:`SolveSchedule`): ``diagonal``, the default,
one block per (image, group) walking its anti-diagonals; ``lanes``, the same
with each thread on fixed (channel, place) lanes instead of a division per
element; ``tiled``, several blocks per slice taking tiles through an atomic
ticket (for small ``B * groups``). The untiled two take a number of channels
a thread (1 by default, 2 or 4: register tiling, each value read from the
slice feeding several sums). Only the default is measured on a GPU yet; the
others are chosen on request: ``INVCONV_SOLVE_SCHEDULE`` (read when a backend
starts, e.g. ``lanes``, ``diagonal:4`` or ``tiled:16x32``) or
:meth:`KernelOps.using_schedule`.

The convolutions have schedules too (:class:`ConvSchedule`): ``direct``, the
default, one thread per (pixel, channels of a group) reading the weights from
global memory; ``smem``, for many channels, each block staging the weights of
its (group, channels) slab in shared memory (when they fit) and each thread
computing several pixels (``smem:P``, P in 1, 2 or 4; 2 by default), so a
weight read feeds P sums. Not yet measured on a GPU, it is chosen on request:
``INVCONV_CONV_SCHEDULE`` or :meth:`KernelOps.using_schedule` with a
:class:`ConvSchedule`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.resources
import os
import pathlib

import numpy as np

from ._api import Conv

# Kernel templates per source file, instantiated for each float type.
KERNELS = {
    "forward.cu": ("masked_conv_forward", "inv_conv_lower_inverse", "inv_conv_fold_taps",
                   "inv_conv_solve", "inv_conv_solve_tiled"),
    "backward.cu": ("masked_conv_adjoint", "inv_conv_solve_adjoint",
                    "inv_conv_solve_adjoint_tiled", "conv_weight_grad_partial",
                    "conv_weight_grad_combine"),
    # The convolutions' "smem" schedule, compiled only when it is used.
    "conv_smem.cu": ("masked_conv_forward_smem", "masked_conv_adjoint_smem"),
    # The fused spline of flows.SplineActivation (launched by invconv._spline).
    "spline.cu": ("spline_forward", "spline_logdet_combine", "spline_backward",
                  "spline_knot_grad_combine"),
}
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
WG_TAPS = 9  # IC_WG_TAPS in backward.cu: partial sums per thread in the weight gradient
# Channels per thread (template argument CH) of the two convolution kernels.
CONV_CHANNELS = (1, 2, 4)
# Channels per thread (template argument CH) of the untiled solves: 1 by
# default, 2 or 4 on request (register tiling, not yet measured on a GPU).
SOLVE_CHANNELS = (1, 2, 4)
# Pixels per thread (template argument P) of the convolutions' "smem" schedule.
CONV_PIXELS = (1, 2, 4)
# The template arguments after T of each instantiation, per kernel.
_EXTRA_TEMPLATE_ARGS = {
    "masked_conv_forward": [(ch,) for ch in CONV_CHANNELS],
    "masked_conv_adjoint": [(ch,) for ch in CONV_CHANNELS],
    "masked_conv_forward_smem": [(ch, px) for ch in CONV_CHANNELS for px in CONV_PIXELS],
    "masked_conv_adjoint_smem": [(ch, px) for ch in CONV_CHANNELS for px in CONV_PIXELS],
    "inv_conv_solve": [(ch,) for ch in SOLVE_CHANNELS],
    "inv_conv_solve_adjoint": [(ch,) for ch in SOLVE_CHANNELS],
}


def conv_channels_per_thread(group_channels: int) -> int:
    """CH of the convolution kernels for a group size. Measured on the H200
    (2026-11-28, k = 3, B = 100): 2 channels a thread beat 1 by 1.3-1.8x from
    12 to 48 channels, and beat 4 there (4 a thread need more registers);
    at 3 channels one thread covering the group is 1.1-1.3x faster than 2 a
    thread (about even at 4); a single channel gains nothing from more."""
    if group_channels <= 2:
        return group_channels
    return 4 if group_channels <= 4 else 2


# The members of IcParams (kernels/common.cuh), in order; all int32.
PARAM_FIELDS = ("B", "C", "H", "W", "G", "cg", "kh", "kw", "rs", "cs", "unit",
                "kp_in_smem", "slice_in_smem", "nsplit", "lanes",
                "tile_h", "tile_w", "tiles_h", "tiles_w", "w_in_smem")
PARAMS_DTYPE = np.dtype([(name, np.int32) for name in PARAM_FIELDS])


@functools.lru_cache(maxsize=512)
def kernel_params(shape, conv: Conv, **choices) -> np.ndarray:
    """The kernels' ``IcParams`` for images of ``shape`` (B, C, H, W) and the
    launch ``choices`` (other fields by name, 0 when not given): a read-only
    one-element array of :data:`PARAMS_DTYPE`. Cached, as building one costs
    microseconds a launch."""
    B, C, H, W = shape
    params = np.zeros(1, dtype=PARAMS_DTYPE)
    values = dict(B=B, C=C, H=H, W=W, G=conv.groups, cg=conv.group_channels, kh=conv.kh,
                  kw=conv.kw, rs=conv.row_sign, cs=conv.col_sign,
                  unit=int(conv.unit_diagonal), **choices)
    for name, value in values.items():
        params[name] = value   # a name IcParams lacks is a KeyError here
    params.flags.writeable = False
    return params


SCHEDULES = ("diagonal", "lanes", "tiled")
DEFAULT_TILE = 32   # pixels a side of a tile of the tiled schedule


@dataclasses.dataclass(frozen=True)
class SolveSchedule:
    """How the solves are scheduled (see the module docstring)."""

    kind: str = "diagonal"
    channels: int = 1          # per thread, untiled schedules
    tile_h: int = DEFAULT_TILE
    tile_w: int = DEFAULT_TILE

    @classmethod
    def parse(cls, text: str) -> "SolveSchedule":
        """``"diagonal"`` or ``"lanes"``, optionally with channels per thread
        (``"lanes:4"``; 1, 2 or 4), or ``"tiled"``, optionally with a tile
        size (``"tiled:16x32"``)."""
        kind, _, arg = (text or "diagonal").strip().partition(":")
        usage = (f"INVCONV_SOLVE_SCHEDULE must be diagonal[:N] or lanes[:N] with N in "
                 f"{', '.join(map(str, SOLVE_CHANNELS))} channels a thread, or tiled[:HxW] "
                 f"with positive H and W; got {text!r}")
        if kind not in SCHEDULES:
            raise ValueError(usage)
        if not arg:
            return cls(kind)
        try:
            if kind == "tiled":
                th, tw = (int(v) for v in arg.lower().split("x"))
                if th >= 1 and tw >= 1:
                    return cls(kind, tile_h=th, tile_w=tw)
            elif int(arg) in SOLVE_CHANNELS:
                return cls(kind, channels=int(arg))
        except ValueError:
            pass
        raise ValueError(usage)


CONV_SCHEDULES = ("direct", "smem")
DEFAULT_CONV_PIXELS = 2


@dataclasses.dataclass(frozen=True)
class ConvSchedule:
    """How the convolutions are scheduled (see the module docstring)."""

    kind: str = "direct"
    pixels: int = DEFAULT_CONV_PIXELS   # per thread, schedule smem

    @classmethod
    def parse(cls, text: str) -> "ConvSchedule":
        """``"direct"``, or ``"smem"`` optionally with pixels per thread
        (``"smem:4"``; 1, 2 or 4)."""
        kind, _, arg = (text or "direct").strip().partition(":")
        usage = (f"INVCONV_CONV_SCHEDULE must be direct, or smem[:P] with P in "
                 f"{', '.join(map(str, CONV_PIXELS))} pixels a thread; got {text!r}")
        if kind not in CONV_SCHEDULES or (kind == "direct" and arg):
            raise ValueError(usage)
        if not arg:
            return cls(kind)
        try:
            if int(arg) in CONV_PIXELS:
                return cls(kind, pixels=int(arg))
        except ValueError:
            pass
        raise ValueError(usage)


def parse_schedule(text: str) -> "SolveSchedule | ConvSchedule":
    """A solve or a convolution schedule from its text form, told apart by
    its kind (the two sets of names are disjoint)."""
    if (text or "").strip().partition(":")[0] in CONV_SCHEDULES:
        return ConvSchedule.parse(text)
    try:
        return SolveSchedule.parse(text)
    except ValueError as exc:
        raise ValueError(f"{exc}; or a convolution schedule (INVCONV_CONV_SCHEDULE): "
                         f"direct, or smem[:P] with P in "
                         f"{', '.join(map(str, CONV_PIXELS))}") from None


def template_name(kernel: str, dtype, *extra) -> str:
    """``"inv_conv_solve<float>"``, ``"masked_conv_forward<double, 2>"``: the
    name expression of one instantiation."""
    return f"{kernel}<{', '.join([_CTYPES[np.dtype(dtype)], *map(str, extra)])}>"


def name_expressions(source: str) -> list[str]:
    names = []
    for kernel in KERNELS[source]:
        extras = _EXTRA_TEMPLATE_ARGS.get(kernel, [()])
        names += [template_name(kernel, t, *e) for t in _CTYPES for e in extras]
    return names


def kernel_dir() -> pathlib.Path:
    """The folder of the .cu sources: inside the installed package, or the
    repository's top-level ``kernels/`` when running from a checkout."""
    packaged = importlib.resources.files("invconv") / "kernels"
    if packaged.is_dir():
        return pathlib.Path(str(packaged))
    here = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    if here.is_dir():
        return here
    raise FileNotFoundError("invconv's CUDA sources (kernels/*.cu) are missing from "
                            "this installation")


@dataclasses.dataclass
class LaunchLimits:
    """Launch choices of one runtime (the emulator's are small on purpose)."""

    block: int              # threads per block of the element-wise kernels
    max_block: int          # most threads per block of the wavefront kernels
    max_grid: int           # most blocks of a grid-stride launch
    smem_bytes: int         # dynamic shared memory one block may use
    target_blocks: int      # blocks that fill the device (splits the weight gradient)


class KernelOps:
    """The backend protocol of :mod:`invconv._api` on top of the kernels.

    Parameters
    ----------
    xp : module
        ``numpy`` or ``cupy``: allocates outputs and scratch.
    module_for : callable
        ``module_for(source_file) -> module`` with ``get_function(name)``.
    limits_for : callable
        ``limits_for() -> LaunchLimits`` for the current device.
    """

    def __init__(self, xp, module_for, limits_for):
        self.xp = xp
        self.module_for = module_for
        self.limits_for = limits_for
        self._functions = {}
        self.schedule = SolveSchedule.parse(os.environ.get("INVCONV_SOLVE_SCHEDULE", ""))
        self.conv_schedule = ConvSchedule.parse(os.environ.get("INVCONV_CONV_SCHEDULE", ""))

    @contextlib.contextmanager
    def using_schedule(self, schedule):
        """Run the solves with ``schedule`` (a :class:`SolveSchedule`), or the
        convolutions with it (a :class:`ConvSchedule`), or either from its
        text form (:func:`parse_schedule`), inside the block; not
        thread-safe."""
        if isinstance(schedule, str):
            schedule = parse_schedule(schedule)
        which = "conv_schedule" if isinstance(schedule, ConvSchedule) else "schedule"
        if not isinstance(schedule, (SolveSchedule, ConvSchedule)):
            raise TypeError(f"schedule must be a SolveSchedule, a ConvSchedule or a string, "
                            f"got {type(schedule).__name__}")
        saved = getattr(self, which)
        setattr(self, which, schedule)
        try:
            yield schedule
        finally:
            setattr(self, which, saved)

    # -- helpers ---------------------------------------------------------
    # Host time matters at flow sizes, where a kernel runs for microseconds:
    # CuPy's get_function and the thread-limit query cost about 4 us a launch
    # (measured on the H200 host, bench/profile_host.py), so a function is
    # looked up once per module.
    def _function(self, source, kernel, dtype, *extra):
        """``(kernel function, its most threads per block)``; the limit can be
        below 1024 when the compiled kernel uses many registers."""
        module = self.module_for(source)
        key = (source, kernel, dtype, extra)
        hit = self._functions.get(key)
        if hit is None or hit[0] is not module:   # a new module (device) compiles anew
            fn = module.get_function(template_name(kernel, dtype, *extra))
            hit = (module, fn, fn.max_threads_per_block)
            self._functions[key] = hit
        return hit[1], hit[2]

    @property
    def limits(self) -> LaunchLimits:
        return self.limits_for()

    @staticmethod
    def _grid(n, block, limits):
        return max(1, min(-(-n // block), limits.max_grid))

    @staticmethod
    def _block(max_threads, wanted):
        """``wanted`` threads, capped by what the compiled kernel allows."""
        return max(1, min(wanted, max_threads))

    def _contiguous(self, a):
        return self.xp.ascontiguousarray(a)

    # -- ops -------------------------------------------------------------
    def _elementwise(self, source, kernel, a, weight, conv):
        a, weight = self._contiguous(a), self._contiguous(weight)
        if self.conv_schedule.kind == "smem":
            return self._slabs(kernel + "_smem", a, weight, conv)
        out = self.xp.empty(a.shape, dtype=a.dtype)
        per_thread = conv_channels_per_thread(conv.group_channels)
        fn, max_threads = self._function(source, kernel, a.dtype, per_thread)
        lim = self.limits
        block = self._block(max_threads, lim.block)
        B, C, H, W = a.shape
        threads = B * conv.groups * -(-conv.group_channels // per_thread) * H * W
        fn((self._grid(threads, block, lim),), (block,),
           (a, weight, out, kernel_params(a.shape, conv)))
        return out

    def _slabs(self, kernel, a, weight, conv):
        """The convolutions' "smem" schedule (see ic_masked_conv_slabs in
        common.cuh): a grid of (tiles of pixels) x (group, channels) slabs."""
        out = self.xp.empty(a.shape, dtype=a.dtype)
        cg = conv.group_channels
        per_thread = conv_channels_per_thread(cg)
        pixels = self.conv_schedule.pixels
        fn, max_threads = self._function("conv_smem.cu", kernel, a.dtype, per_thread, pixels)
        lim = self.limits
        slab_bytes = per_thread * cg * conv.kh * conv.kw * a.dtype.itemsize
        w_in_smem = slab_bytes <= lim.smem_bytes
        shared = slab_bytes if w_in_smem else 0
        if shared > 48 * 1024:   # CUDA needs an opt-in past 48 KiB
            fn.max_dynamic_shared_size_bytes = shared
        block = self._block(max_threads, lim.block)
        B, C, H, W = a.shape
        slabs = conv.groups * -(-cg // per_thread)
        grid_y = min(slabs, lim.max_grid, 65535)
        grid_x = max(1, min(-(-B * H * W // (block * pixels)), lim.max_grid // grid_y))
        fn((grid_x, grid_y), (block,),
           (a, weight, out, kernel_params(a.shape, conv, w_in_smem=int(w_in_smem))),
           shared_mem=shared)
        return out

    def forward(self, x, weight, conv):
        return self._elementwise("forward.cu", "masked_conv_forward", x, weight, conv)

    def forward_adjoint(self, grad_y, weight, conv):
        return self._elementwise("backward.cu", "masked_conv_adjoint", grad_y, weight, conv)

    def _prepare(self, weight, conv):
        """The solves' scratch: L^-1 and the folded taps K' (see common.cuh)."""
        weight = self._contiguous(weight)
        cg = conv.group_channels
        prep = self.xp.empty((conv.groups, conv.kh * conv.kw, cg, cg), dtype=weight.dtype)
        args = (weight, prep, kernel_params((1, conv.channels, 1, 1), conv))
        lim = self.limits
        fn, max_threads = self._function("forward.cu", "inv_conv_lower_inverse", weight.dtype)
        fn((conv.groups,), (self._block(max_threads, min(lim.max_block, -(-cg // 32) * 32)),),
           args)
        n = conv.groups * (conv.kh * conv.kw - 1) * cg * cg
        if n:
            fn, max_threads = self._function("forward.cu", "inv_conv_fold_taps", weight.dtype)
            block = self._block(max_threads, lim.block)
            fn((self._grid(n, block, lim),), (block,), args)
        return prep

    def _wavefront(self, kernel, source, rhs, weight, conv):
        rhs = self._contiguous(rhs)
        prep = self._prepare(weight, conv)
        if self.schedule.kind == "tiled":
            out = self._tiled(kernel + "_tiled", source, rhs, prep, conv)
            if out is not None:
                return out
        out = self.xp.empty(rhs.shape, dtype=rhs.dtype)
        B, C, H, W = rhs.shape
        cg, item = conv.group_channels, rhs.dtype.itemsize
        kp_bytes = conv.kh * conv.kw * cg * cg * item
        slice_bytes = cg * H * W * item
        lim = self.limits
        kp_in_smem = kp_bytes <= lim.smem_bytes
        used = kp_bytes if kp_in_smem else 0
        slice_in_smem = used + slice_bytes <= lim.smem_bytes
        shared = used + (slice_bytes if slice_in_smem else 0)
        per_thread = self.schedule.channels
        fn, max_threads = self._function(source, kernel, rhs.dtype, per_thread)
        if shared > 48 * 1024:   # CUDA needs an opt-in past 48 KiB
            fn.max_dynamic_shared_size_bytes = shared
        diagonal = min(H, W) * -(-cg // per_thread)
        block = self._block(max_threads, min(lim.max_block, max(32, -(-diagonal // 32) * 32)))
        params = kernel_params(rhs.shape, conv, kp_in_smem=int(kp_in_smem),
                               slice_in_smem=int(slice_in_smem),
                               lanes=int(self.schedule.kind == "lanes"))
        fn((B * conv.groups,), (block,), (rhs, prep, out, params), shared_mem=shared)
        return out

    def _tiled(self, kernel, source, rhs, prep, conv):
        """The tiled schedule (see ic_solve_tiled in common.cuh), or None
        where a tile does not fit in shared memory."""
        B, C, H, W = rhs.shape
        cg, item, lim = conv.group_channels, rhs.dtype.itemsize, self.limits
        # A tile reads only its up-left neighbours when it is at least
        # (kh-1) x (kw-1); one tile spans a side shorter than that.
        th = min(H, max(self.schedule.tile_h, conv.kh - 1))
        tw = min(W, max(self.schedule.tile_w, conv.kw - 1))
        header = 16   # the block's ticket, as 16 bytes of T
        tile_bytes = cg * (th + conv.kh - 1) * (tw + conv.kw - 1) * item
        kp_bytes = conv.kh * conv.kw * cg * cg * item
        if header + tile_bytes > lim.smem_bytes:
            return None
        kp_in_smem = header + kp_bytes + tile_bytes <= lim.smem_bytes
        shared = header + tile_bytes + (kp_bytes if kp_in_smem else 0)
        tiles_h, tiles_w = -(-H // th), -(-W // tw)
        blocks = B * conv.groups * tiles_h * tiles_w
        flags = self.xp.zeros(1 + blocks, dtype=np.int32)  # ticket counter, ready flags
        out = self.xp.empty(rhs.shape, dtype=rhs.dtype)
        # The adjoint passes g_hat on in a scratch array; the forward solve x itself.
        extra = (self.xp.empty(rhs.shape, dtype=rhs.dtype),) if "adjoint" in kernel else ()
        fn, max_threads = self._function(source, kernel, rhs.dtype)
        if shared > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = shared
        block = self._block(max_threads, min(lim.max_block,
                                             max(32, -(-min(th, tw) * cg // 32) * 32)))
        params = kernel_params(rhs.shape, conv, kp_in_smem=int(kp_in_smem), tile_h=th,
                               tile_w=tw, tiles_h=tiles_h, tiles_w=tiles_w)
        fn((blocks,), (block,), (rhs, prep, out, *extra, flags, params), shared_mem=shared)
        return out

    def solve(self, y, weight, conv):
        return self._wavefront("inv_conv_solve", "forward.cu", y, weight, conv)

    def solve_adjoint(self, grad_x, weight, conv):
        return self._wavefront("inv_conv_solve_adjoint", "backward.cu", grad_x, weight, conv)

    def weight_grad(self, grad_out, x, scale, conv):
        grad_out, x = self._contiguous(grad_out), self._contiguous(x)
        B, C, H, W = x.shape
        cg, taps, lim = conv.group_channels, conv.kh * conv.kw, self.limits
        # Split the (b, h, w) reduction until the grid fills the device, but
        # leave every block at least a block's worth of terms.
        splits = max(1, min(-(-lim.target_blocks // (C * cg)), B * H * W // lim.block))
        partial = self.xp.empty((splits, C * cg * taps), dtype=x.dtype)
        # Few terms per thread would leave the block's reduction tree (taps x
        # log2(block) barrier steps) costing more than the sums themselves.
        block, per_split = lim.block, -(-B * H * W // splits)
        while block > 32 and per_split < 16 * block:
            block //= 2
        fn, max_threads = self._function("backward.cu", "conv_weight_grad_partial", x.dtype)
        block = self._block(max_threads, block)
        fn((C * cg, splits), (block,), (grad_out, x, partial, kernel_params(x.shape, conv)),
           shared_mem=block * WG_TAPS * x.dtype.itemsize)
        out = self.xp.empty((C, cg, conv.kh, conv.kw), dtype=x.dtype)
        fn, max_threads = self._function("backward.cu", "conv_weight_grad_combine", x.dtype)
        block = self._block(max_threads, lim.block)
        fn((self._grid(out.size, block, lim),), (block,),
           (partial, out, x.dtype.type(scale),
            kernel_params((1, C, 1, 1), conv, nsplit=splits)))
        return out
