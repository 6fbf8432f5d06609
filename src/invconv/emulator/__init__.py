"""CPU emulator for the project's CUDA C kernels (see :mod:`._module`).

``EmulatedModule`` mirrors ``cupy.RawModule`` and ``EmulatedFunction`` mirrors
``cupy.cuda.Function``; :mod:`invconv.emulator.racecheck` runs a program with
ThreadSanitizer watching the emulated kernels.
"""
from ._module import (EmulatedFunction, EmulatedKernel, EmulatedModule, cache_dir,
                      tsan_loaded)

__all__ = ["EmulatedFunction", "EmulatedKernel", "EmulatedModule", "cache_dir", "tsan_loaded"]
