"""Backend "cuda": the kernels of ``kernels/`` compiled by NVRTC through CuPy.

One ``cupy.RawModule`` per (device, source file), compiled lazily on first
use with every float32/float64 instantiation named by name expressions.
Launches go to CuPy's current stream (the ops' ``stream=`` argument sets it);
nothing in an op synchronises with the host.
"""
from __future__ import annotations

import threading

import cupy

from ._kernels import KernelOps, LaunchLimits, kernel_dir, name_expressions

_modules: dict = {}
_limits: dict = {}
_lock = threading.Lock()


def _module(source: str):
    key = (cupy.cuda.Device().id, source)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            directory = kernel_dir()
            mod = cupy.RawModule(code=(directory / source).read_text(),
                                 options=("--std=c++17", f"-I{directory}"),
                                 name_expressions=name_expressions(source))
            _modules[key] = mod
        return mod


def _device_limits() -> LaunchLimits:
    device = cupy.cuda.Device()
    limits = _limits.get(device.id)
    if limits is None:
        attrs = device.attributes
        limits = LaunchLimits(
            block=256,
            max_block=min(1024, attrs["MaxThreadsPerBlock"]),
            max_grid=attrs["MultiProcessorCount"] * 32,
            smem_bytes=attrs.get("MaxSharedMemoryPerBlockOptin",
                                 attrs["MaxSharedMemoryPerBlock"]),
            target_blocks=attrs["MultiProcessorCount"] * 4,
        )
        _limits[device.id] = limits
    return limits


_ops = KernelOps(cupy, _module, _device_limits)

_forward = _ops.forward
_forward_adjoint = _ops.forward_adjoint
_solve = _ops.solve
_solve_adjoint = _ops.solve_adjoint
_weight_grad = _ops.weight_grad
