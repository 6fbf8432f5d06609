"""Where the host time of an eager op goes (needs CuPy and a CUDA device).

    python3 bench/profile_host.py [--calls 300] [--out profile.txt]

The benchmarks show eager calls taking 40-190 us more than their CUDA-graph
replays at small shapes; that gap is host work (validation, CuPy's launch and
allocation calls). This script times each op's host cost per call (with the
device idle, on a 1x1x4x4 problem so the kernels take nothing), times the
CuPy primitives an op is built from for comparison, and prints a cProfile of
the ops sorted by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np


def per_call_us(fn, calls):
    import cupy
    for _ in range(10):
        fn()
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    cupy.cuda.Device().synchronize()
    return host


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", help="also write the report here")
    args = p.parse_args(argv)

    import cupy
    import invconv
    from invconv import _cuda

    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((1, 1, 4, 4)).astype(np.float32))
    w = cupy.asarray((rng.standard_normal((1, 1, 3, 3)) * 0.1).astype(np.float32))
    ops = {
        "conv2d": lambda: invconv.conv2d(x, w),
        "inv_conv2d": lambda: invconv.inv_conv2d(x, w),
        "conv2d_vjp": lambda: invconv.conv2d_vjp(x, x, w),
        "inv_conv2d_vjp": lambda: invconv.inv_conv2d_vjp(x, x, w),
    }
    from invconv._kernels import conv_channels_per_thread, template_name
    kernel_name = template_name("masked_conv_forward", np.float32, conv_channels_per_thread(1))
    fn = _cuda._module("forward.cu").get_function(kernel_name)
    y = cupy.empty_like(x)
    shape = tuple(np.int32(v) for v in (1, 1, 4, 4, 1, 3, 3, 1, 1, 1))
    primitives = {
        "cupy.empty": lambda: cupy.empty((1, 1, 4, 4), dtype=np.float32),
        "cupy.ascontiguousarray (already contiguous)": lambda: cupy.ascontiguousarray(x),
        "RawModule.get_function": lambda: _cuda._module("forward.cu").get_function(kernel_name),
        "Function.max_threads_per_block": lambda: fn.max_threads_per_block,
        "cupy.cuda.Device()": lambda: cupy.cuda.Device(),
        "x.device.id": lambda: x.device.id,
        "one RawKernel launch (13 args)": lambda: fn((1,), (32,), (x, w, y, *shape)),
    }
    lines = ["host us per call (device idle, 1x1x4x4 float32, k=3)"]
    for name, f in {**ops, **primitives}.items():
        lines.append(f"  {name:45s} {per_call_us(f, args.calls):8.1f}")
    for name, f in ops.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            f()
        prof.disable()
        cupy.cuda.Device().synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        lines += ["", f"== cProfile of {args.calls} calls of {name} (by own time)", buf.getvalue()]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
