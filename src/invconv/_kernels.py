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

The solves have schedules (:class:`SolveSchedule`): ``diagonal``, one block
per (image, group) walking its anti-diagonals; ``lanes``, the same with each
thread on fixed (channel, place) lanes instead of a division per element;
either with 1 or 2 channels a thread (``diagonal:2``: register tiling, each
value read from the slice feeding two sums); ``slices``, several (image,
group) slices a block walking their diagonals together, each thread on fixed
(slice, channel, place) lanes (``slices:S``, S in 2, 4 or 8; for small
slices at large batch; off by default until a GPU times it); ``bands``,
one block a band of R rows of a slice (``bands:R``, R = 32 when not named;
kernels/solve_bands.cu), bands taken by atomic ticket and pipelined a few
steps apart on per-band progress counters, for large images at small batch
(off by default until a GPU times it; :func:`band_plan` picks R, and where
no band fits shared memory the solve runs under ``diagonal``). The default,
``auto``, picks one per solve by the rule of :func:`default_solve_choice`,
set from the H200
graph-replay measurements of 2026-12-04 (``bench/README.md``, "Schedules
chosen by measurement"). Another is chosen on request:
``INVCONV_SOLVE_SCHEDULE`` (read when a backend starts, e.g. ``lanes`` or
``diagonal:2``) or :meth:`KernelOps.using_schedule`. Removed by that
measurement: ``tiled`` (several blocks a slice: 1.14-1.98x the time of
``diagonal`` at every shape with more than one tile; it cannot win as
built, since a tile waits for its whole up and left neighbours and the
critical path grows to tile diagonals x steps in a tile; with one tile it is
no tiling at all, and ``lanes`` does as well there) and 4 channels a thread
(never more than 1% ahead of 2 a thread, up to 1.49x the time of
``diagonal``); naming either is an error that says so.

The convolutions have schedules too (:class:`ConvSchedule`): ``smem``, the
default as ``smem:1``, each block staging the weights of its (group,
channels) slab in shared memory (when they fit) and each thread computing P
pixels (``smem:P``, P in 1, 2 or 4), so a weight read feeds P sums; and
``direct``, one thread per (pixel, channels of a group) reading the weights
from global memory, the default until the 2026-12-04 measurements, in which
``smem:1`` took 0.51-0.99 of its time at every shape (conv and conv vjp).
Chosen on request: ``INVCONV_CONV_SCHEDULE`` or :meth:`KernelOps.using_schedule`
with a :class:`ConvSchedule`.
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
                   "inv_conv_solve"),
    "backward.cu": ("masked_conv_adjoint", "inv_conv_solve_adjoint",
                    "conv_weight_grad_partial", "conv_weight_grad_combine"),
    # The solves' "slices" schedule (off by default), compiled on first use.
    "solve_slices.cu": ("inv_conv_solve_slices", "inv_conv_solve_adjoint_slices"),
    # The solves' "bands" schedule (off by default), compiled on first use.
    "solve_bands.cu": ("inv_conv_solve_bands", "inv_conv_solve_adjoint_bands"),
    # The convolutions' "smem" schedule (the default), compiled on first use.
    "conv_smem.cu": ("masked_conv_forward_smem", "masked_conv_adjoint_smem"),
    # The fused spline of flows.SplineActivation (launched by invconv._spline).
    "spline.cu": ("spline_forward", "spline_logdet_combine", "spline_backward",
                  "spline_knot_grad_combine"),
}
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
WG_TAPS = 9  # IC_WG_TAPS in backward.cu: partial sums per thread in the weight gradient
# Channels per thread (template argument CH) of the two convolution kernels.
CONV_CHANNELS = (1, 2, 4)
# Channels per thread (template argument CH) of the solves (register tiling;
# 4 was removed: see the module docstring).
SOLVE_CHANNELS = (1, 2)
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
                "kp_in_smem", "slice_in_smem", "nsplit", "lanes", "w_in_smem", "slices",
                "band_rows", "bands")
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


SCHEDULES = ("auto", "diagonal", "lanes", "slices", "bands")
# (image, group) slices a block of schedule slices (slices:S); 4 when none
# are named.
SLICES_PER_BLOCK = (2, 4, 8)
DEFAULT_SLICES = 4
# Rows a band of schedule bands (bands:R) when none are named; the launcher
# raises R to kh - 1 and halves it until a band with its halo fits shared
# memory (band_plan; 1x3x1024x1024 float32 on an H200: R = 16, 216 KiB).
DEFAULT_BAND_ROWS = 32
# Schedules removed by measurement: what naming one says.
REMOVED_SCHEDULES = {
    "tiled": "the tiled schedule was removed: it took 1.14-1.98x the time of diagonal at "
             "every H200 shape with more than one tile (bench/README.md)",
}
REMOVED_CHANNELS = {4: "4 channels a thread were removed: never more than 1% ahead of 2, "
                       "up to 1.49x the time of diagonal (bench/README.md)"}


def default_solve_choice(adjoint: bool, group_channels: int, H: int, W: int):
    """``(lanes, channels a thread)`` of schedule ``auto`` for one solve.

    The rule, from the H200 graph replays of 2026-12-04 (float32, k = 3;
    time over the ``diagonal`` schedule's, ``bench/README.md``):

    - forward solve, 2 channels a thread where 2 <= C_g <= 12 and the longest
      anti-diagonal holds at least 96 (pixel, channel) elements
      (min(H, W) * C_g): it won at every such shape (C_g = 3 at 256², 64²
      and 32²: 0.88-0.96; C_g = 12 at 16²: 0.91) and lost where the diagonal
      is short (C_g = 4 at 14², 56 elements: 1.06) or each element long
      (C_g = 48: 1.12);
    - else ``lanes`` where C_g >= 12, both solves: 0.84-0.88 at C_g = 12 and
      48 (the adjoint at 12 and 48, the forward solve at 48), while at
      C_g <= 4 it was 0.90-1.16;
    - else ``diagonal`` with 1 channel a thread. The adjoint solve never
      takes 2 channels a thread: 0.94-1.12, losing at 5 of 8 shapes, and
      beaten by ``lanes`` where it won.

    Shapes the table lacks follow the same rule and await a GPU run.
    """
    cg = group_channels
    if not adjoint and 2 <= cg <= 12 and min(H, W) * cg >= 96:
        return False, 2
    if cg >= 12:
        return True, 1
    return False, 1


def band_plan(band_rows: int, H: int, W: int, group_channels: int, kh: int, kw: int,
              itemsize: int, smem_bytes: int):
    """``(rows a band, K' table in shared memory, shared bytes)`` of schedule
    ``bands:R`` for one solve, or ``None`` where no band fits.

    R is raised to kh - 1 (a band's halo, the kh - 1 rows above it, must lie
    in the band just above) and lowered to H, then halved (not below
    max(kh - 1, 1)) while the band, cg x (kh - 1 + R) x W values, does not
    fit in shared memory beside the 16-byte ticket and, where it fits too,
    the group's K' table. E.g. 1x3x1024x1024 float32 (k = 3) with the
    H200's 227 KiB: R = 32 does not fit, R = 16 takes 216 KiB.
    """
    cg, halo = group_channels, kh - 1
    kp_bytes = kh * kw * cg * cg * itemsize
    kp_in_smem = 16 + kp_bytes <= smem_bytes
    used = 16 + (kp_bytes if kp_in_smem else 0)

    def band_bytes(r):
        return cg * (halo + r) * W * itemsize
    rows = min(max(band_rows, halo, 1), H)
    floor = min(max(halo, 1), H)
    while rows > floor and used + band_bytes(rows) > smem_bytes:
        rows = max(floor, rows // 2)
    shared = used + band_bytes(rows)
    if shared > smem_bytes:
        return None
    return rows, kp_in_smem, shared


@dataclasses.dataclass(frozen=True)
class SolveSchedule:
    """How the solves are scheduled (see the module docstring)."""

    kind: str = "auto"
    channels: int = 1          # per thread; schedule auto picks its own
    slices: int = 1            # a block; schedule slices only
    band_rows: int = 0         # rows a band (most); schedule bands only

    def choice(self, adjoint: bool, group_channels: int, H: int, W: int):
        """``(lanes, channels a thread)`` for one solve."""
        if self.kind == "auto":
            return default_solve_choice(adjoint, group_channels, H, W)
        return self.kind == "lanes", self.channels

    @classmethod
    def parse(cls, text: str) -> "SolveSchedule":
        """``"auto"`` (the default, also for ``""``), or ``"diagonal"`` or
        ``"lanes"``, optionally with channels per thread (``"lanes:2"``; 1
        or 2), or ``"slices"``, optionally with slices a block
        (``"slices:8"``; 2, 4 or 8), or ``"bands"``, optionally with rows
        a band (``"bands:16"``; a positive integer, 32 when not named)."""
        kind, _, arg = (text or "auto").strip().partition(":")
        usage = (f"INVCONV_SOLVE_SCHEDULE must be auto, diagonal[:N] or lanes[:N] with N "
                 f"in {', '.join(map(str, SOLVE_CHANNELS))} channels a thread, or "
                 f"slices[:S] with S in {', '.join(map(str, SLICES_PER_BLOCK))} slices a "
                 f"block, or bands[:R] with R >= 1 rows a band; got {text!r}")
        if kind in REMOVED_SCHEDULES:
            raise ValueError(f"{usage}: {REMOVED_SCHEDULES[kind]}")
        if kind not in SCHEDULES or (kind == "auto" and arg):
            raise ValueError(usage)
        if kind == "slices":
            try:
                slices = int(arg) if arg else DEFAULT_SLICES
            except ValueError:
                raise ValueError(usage) from None
            if slices not in SLICES_PER_BLOCK:
                raise ValueError(usage)
            return cls(kind, slices=slices)
        if kind == "bands":
            try:
                rows = int(arg) if arg else DEFAULT_BAND_ROWS
            except ValueError:
                raise ValueError(usage) from None
            if rows < 1:
                raise ValueError(usage)
            return cls(kind, band_rows=rows)
        if not arg:
            return cls(kind)
        try:
            channels = int(arg)
        except ValueError:
            raise ValueError(usage) from None
        if channels in REMOVED_CHANNELS:
            raise ValueError(f"{usage}: {REMOVED_CHANNELS[channels]}")
        if channels not in SOLVE_CHANNELS:
            raise ValueError(usage)
        return cls(kind, channels=channels)


CONV_SCHEDULES = ("direct", "smem")
# Pixels a thread of schedule smem when none are named: smem:1 took 0.51-0.99
# of direct's time at every measured shape, smem:2 0.49-1.15 and smem:4
# 0.33-1.42 (H200, 2026-12-04; bench/README.md); P = 4 won clearly only at
# 4x3x256x256 (0.33 vs 0.51), one shape, so it stays on request.
DEFAULT_CONV_PIXELS = 1


@dataclasses.dataclass(frozen=True)
class ConvSchedule:
    """How the convolutions are scheduled (see the module docstring)."""

    kind: str = "smem"
    pixels: int = DEFAULT_CONV_PIXELS   # per thread, schedule smem

    @classmethod
    def parse(cls, text: str) -> "ConvSchedule":
        """``"smem"`` (the default, also for ``""``) optionally with pixels
        per thread (``"smem:4"``; 1, 2 or 4), or ``"direct"``."""
        kind, _, arg = (text or "smem").strip().partition(":")
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
        if self.schedule.kind == "slices":
            return self._slices(kernel + "_slices", rhs, prep, out, conv)
        if self.schedule.kind == "bands":
            done = self._bands(kernel + "_bands", rhs, prep, out, conv)
            if done is not None:
                return done     # else no band fits shared memory: the diagonal schedule
        lanes, per_thread = self.schedule.choice("adjoint" in kernel, cg, H, W)
        fn, max_threads = self._function(source, kernel, rhs.dtype, per_thread)
        if shared > 48 * 1024:   # CUDA needs an opt-in past 48 KiB
            fn.max_dynamic_shared_size_bytes = shared
        diagonal = min(H, W) * -(-cg // per_thread)
        block = self._block(max_threads, min(lim.max_block, max(32, -(-diagonal // 32) * 32)))
        params = kernel_params(rhs.shape, conv, kp_in_smem=int(kp_in_smem),
                               slice_in_smem=int(slice_in_smem), lanes=int(lanes))
        fn((B * conv.groups,), (block,), (rhs, prep, out, params), shared_mem=shared)
        return out

    def _slices(self, kernel, rhs, prep, out, conv):
        """The solves' "slices" schedule (kernels/solve_slices.cu): S slices
        a block, one thread per (slice, channel, place) of a diagonal."""
        B, C, H, W = rhs.shape
        cg, item, lim = conv.group_channels, rhs.dtype.itemsize, self.limits
        per_block = min(self.schedule.slices, B * conv.groups)
        kp_bytes = prep.size * item            # the K' tables of all groups
        slices_bytes = per_block * cg * H * W * item
        kp_in_smem = kp_bytes <= lim.smem_bytes
        used = kp_bytes if kp_in_smem else 0
        slice_in_smem = used + slices_bytes <= lim.smem_bytes
        shared = used + (slices_bytes if slice_in_smem else 0)
        fn, max_threads = self._function("solve_slices.cu", kernel, rhs.dtype)
        if shared > 48 * 1024:   # CUDA needs an opt-in past 48 KiB
            fn.max_dynamic_shared_size_bytes = shared
        lanes = per_block * cg * min(H, W)
        block = self._block(max_threads, min(lim.max_block, max(32, -(-lanes // 32) * 32)))
        params = kernel_params(rhs.shape, conv, kp_in_smem=int(kp_in_smem),
                               slice_in_smem=int(slice_in_smem), slices=per_block)
        fn((-(-B * conv.groups // per_block),), (block,), (rhs, prep, out, params),
           shared_mem=shared)
        return out

    def _bands(self, kernel, rhs, prep, out, conv):
        """The solves' "bands" schedule (kernels/solve_bands.cu): one block
        a (slice, band) of R rows, bands pipelined a few steps apart; R as
        :func:`band_plan` picks it, ``None`` where no band fits shared
        memory (the caller falls back to the diagonal schedule)."""
        B, C, H, W = rhs.shape
        cg, lim = conv.group_channels, self.limits
        plan = band_plan(self.schedule.band_rows, H, W, cg, conv.kh, conv.kw,
                         rhs.dtype.itemsize, lim.smem_bytes)
        if plan is None:
            return None
        rows, kp_in_smem, shared = plan
        halo = conv.kh - 1
        bands = -(-H // rows)
        slices = B * conv.groups
        fn, max_threads = self._function("solve_bands.cu", kernel, rhs.dtype)
        if shared > 48 * 1024:   # CUDA needs an opt-in past 48 KiB
            fn.max_dynamic_shared_size_bytes = shared
        diagonal = min(rows, W) * cg
        block = self._block(max_threads, min(lim.max_block, max(32, -(-diagonal // 32) * 32)))
        edge = self.xp.empty(max(1, slices * bands * cg * halo * W), dtype=rhs.dtype)
        flags = self.xp.zeros(1 + slices * bands, dtype=np.int32)
        params = kernel_params(rhs.shape, conv, kp_in_smem=int(kp_in_smem),
                               band_rows=rows, bands=bands)
        fn((slices * bands,), (block,), (rhs, prep, out, edge, flags, params),
           shared_mem=shared)
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
