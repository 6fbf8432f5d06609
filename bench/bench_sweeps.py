"""Scaling sweeps (the paper's Tables 7-10): time and peak memory of the inverse.

    python3 bench/bench_sweeps.py --out sweeps.json [--plot sweeps.png] [--quick]

Four sweeps around a base problem, changing one thing at a time: image size
(16..256), kernel size (2..11), batch size (1..128) and channels (1..48).
For each point the inverse and its vjp are timed for invconv and for the same
kernel maths scheduled one launch per anti-diagonal (bench/baselines.py), and
the peak device memory an op allocates is recorded.

On a GPU, every CuPy allocation of the ops goes through PyTorch's caching
allocator (as in invconv.torch), so ``torch.cuda.max_memory_allocated`` sees
the peak of outputs and scratch. ``--quick`` (for CPUs) sweeps small sizes
with invconv's SciPy reference only; its "peak memory" is what tracemalloc
sees (NumPy allocations, not SuperLU's own).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import tracemalloc
from datetime import datetime, timezone

import numpy as np

import invconv

# (name, parameter values, function of the value -> (B, C, H, W, k))
GPU_SWEEPS = [
    ("image size", [16, 32, 64, 128, 256], lambda n: (100, 3, n, n, 3)),
    ("kernel size", [2, 3, 5, 7, 9, 11], lambda k: (100, 3, 32, 32, k)),
    ("batch size", [1, 2, 4, 8, 16, 32, 64, 128], lambda b: (b, 3, 64, 64, 3)),
    ("channels", [1, 3, 6, 12, 24, 48], lambda c: (100, c, 16, 16, 3)),
]
QUICK_SWEEPS = [
    ("image size", [4, 8, 16], lambda n: (2, 3, n, n, 3)),
    ("kernel size", [2, 3, 5], lambda k: (2, 3, 8, 8, k)),
    ("batch size", [1, 2, 4], lambda b: (b, 3, 8, 8, 3)),
    ("channels", [1, 2, 4], lambda c: (2, c, 8, 8, 3)),
]
OPS = ("inv", "inv_vjp")


def _problem(rng, shape, dtype):
    B, C, H, W, k = shape
    w = (rng.uniform(-1, 1, (C, C, k, k)) * (0.5 / (C * k * k))).astype(dtype)
    x = rng.standard_normal((B, C, H, W)).astype(dtype)
    return w, x


def _gpu_runner():
    import cupy
    import torch
    from invconv.torch import _cuda_context
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from baselines import PerDiagonal
    from invconv import _api
    per_diag = PerDiagonal("cuda")
    device = torch.device("cuda", cupy.cuda.Device().id)

    def implementations(op, w, x):
        wg, xg = cupy.asarray(w), cupy.asarray(x)
        conv = _api.make_conv(w.shape, corner="top-left", groups=1, unit_diagonal=True)
        if op == "inv":
            yield "invconv-cuda", lambda: invconv.inv_conv2d(xg, wg)
            yield "per-diagonal-cuda", lambda: per_diag.solve(xg, wg)
        else:
            yield "invconv-cuda", lambda: invconv.inv_conv2d_vjp(xg, xg, wg)
            yield "per-diagonal-cuda", lambda: per_diag.ops.weight_grad(
                per_diag.solve_adjoint(xg, wg), xg, -1.0, conv)

    def measure(fn, repeats, budget_s):
        # Inside the context CuPy allocates from torch's caching allocator and
        # launches on torch's current stream, so torch's statistics see it all.
        with _cuda_context(device) as stream, stream:
            for _ in range(2):
                fn()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times, t0 = [], time.perf_counter()
            for _ in range(repeats):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
                if time.perf_counter() - t0 > budget_s and len(times) >= 3:
                    break
            peak = torch.cuda.max_memory_allocated(device) - base
        return times, peak
    return implementations, measure, torch.cuda.get_device_name(device)


def _cpu_runner():
    def implementations(op, w, x):
        if op == "inv":
            yield "reference-cpu", lambda: invconv.reference.inv_conv2d(x, w)
        else:
            yield "reference-cpu", lambda: invconv.reference.inv_conv2d_vjp(x, x, w)

    def measure(fn, repeats, budget_s):
        fn()
        times, t0 = [], time.perf_counter()
        tracemalloc.start()
        for _ in range(repeats):
            s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - s) * 1e3)
            if time.perf_counter() - t0 > budget_s:
                break
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return times, peak
    return implementations, measure, "CPU"


def run(quick, gpu, dtype=np.float32):
    implementations, measure, device_name = _gpu_runner() if gpu else _cpu_runner()
    rng = np.random.default_rng(0)
    rows = []
    for sweep, values, make in (QUICK_SWEEPS if quick else GPU_SWEEPS):
        for value in values:
            B, C, H, W, k = make(value)
            w, x = _problem(rng, (B, C, H, W, k), dtype)
            for op in OPS:
                for name, fn in implementations(op, w, x):
                    times, peak = measure(fn, repeats=5 if quick else 20, budget_s=1.0)
                    rows.append(dict(sweep=sweep, value=value, op=op, implementation=name,
                                     shape=[B, C, H, W], kernel_size=k,
                                     dtype=np.dtype(dtype).name,
                                     median_ms=statistics.median(times),
                                     min_ms=min(times), repeats=len(times),
                                     peak_bytes=int(peak), diagonal_steps=H + W - 1))
                    print(f"{sweep:11s} {value:4d} {op:8s} {name:18s} "
                          f"{rows[-1]['median_ms']:9.3f} ms  peak {peak / 2**20:9.2f} MiB",
                          flush=True)
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               device=device_name, numpy=np.__version__)
    return env, rows


def plot(rows, env, path):
    """One panel per sweep: median time against the swept value, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.6), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        sub = [r for r in rows if r["sweep"] == sweep]
        for key in dict.fromkeys((r["implementation"], r["op"]) for r in sub):
            pts = [r for r in sub if (r["implementation"], r["op"]) == key]
            ax.plot([r["value"] for r in pts], [r["median_ms"] for r in pts], marker="o",
                    label=f"{key[0]} {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(sweep)
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"invconv scaling sweeps, {env['device']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the rows")
    p.add_argument("--plot", help="PNG of the sweeps (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="small CPU sweeps, reference only")
    args = p.parse_args(argv)
    try:
        import cupy
        gpu = not args.quick and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        gpu = False
    if not gpu and not args.quick:
        p.error("the full sweeps need CuPy, torch and a CUDA device; use --quick on a CPU")
    env, rows = run(args.quick, gpu)
    if not rows:
        raise SystemExit("no sweep rows were produced")
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    if args.plot:
        try:
            plot(rows, env, args.plot)
        except ImportError:
            print("matplotlib is not installed (pip install invconv[plots]); no plot written",
                  file=sys.stderr)
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
