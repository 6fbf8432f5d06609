"""Backend "emulator": the CUDA kernels of ``kernels/`` run on the CPU.

The sources are compiled by the host C++ compiler against the emulator's
CUDA header (:mod:`invconv.emulator`) and launched with the launch plans of
:mod:`invconv._kernels`, the same ones the CUDA backend uses.  It is slow
(blocks run one after another, a block's threads as fibers) and meant for
testing the kernels where there is no GPU.  :func:`launch_limits` changes the block sizes and the shared-memory
budget, so tests can reach every code path (block sizes that do not divide
the work, slices in global rather than shared memory).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading

import numpy as np

from ._kernels import KernelOps, LaunchLimits, kernel_dir, name_expressions

DEFAULT_LIMITS = LaunchLimits(block=64, max_block=128, max_grid=8, smem_bytes=48 * 1024,
                              target_blocks=2)

_modules: dict = {}
_lock = threading.Lock()


def _module(source: str):
    with _lock:
        mod = _modules.get(source)
        if mod is None:
            from .emulator import EmulatedModule
            directory = kernel_dir()
            mod = EmulatedModule(path=str(directory / source),
                                 options=(f"-I{directory}",),
                                 name_expressions=name_expressions(source))
            _modules[source] = mod
        return mod


_limits = [DEFAULT_LIMITS]
_ops = KernelOps(np, _module, lambda: _limits[-1])


@contextlib.contextmanager
def launch_limits(**changes):
    """Temporarily change the emulator's :class:`~invconv._kernels.LaunchLimits`."""
    _limits.append(dataclasses.replace(_limits[-1], **changes))
    try:
        yield _limits[-1]
    finally:
        _limits.pop()


_forward = _ops.forward
_forward_adjoint = _ops.forward_adjoint
_solve = _ops.solve
_solve_adjoint = _ops.solve_adjoint
_weight_grad = _ops.weight_grad
