"""Scaling sweeps (the paper's Tables 7-10): time and peak memory of the inverse.

    python3 bench/bench_sweeps.py --out sweeps.json [--markdown sweeps.md]
                                  [--plot sweeps.png] [--quick]

Four sweeps around a base problem, changing one thing at a time: image size
(16..256), kernel size (2..11), batch size (1..128) and channels (1..48).
For each point the inverse and its vjp are timed for invconv and for the same
kernel maths scheduled one launch per anti-diagonal (invconv.baselines), each
called eagerly from Python and replayed from a CUDA graph (the GPU work alone,
without Python's per-launch cost), and the peak device memory an eager call
allocates is recorded. Inputs rotate among three
sets so repeated runs do not time a warm cache. cuDNN's conv2d of the same
shape (forward for the inverse, forward and backward for the vjp) is timed
too, eagerly and as a CUDA-graph replay: the table gives invconv's graph
replay per diagonal step beside its ratio to cuDNN's graph replay (GPU time
over GPU time), issue 12's two measures. ``--schedules diagonal,lanes`` adds
graph replays of the inverse under other solve schedules than the default.

On a GPU, every CuPy allocation of the ops goes through PyTorch's caching
allocator (as in invconv.torch), so ``torch.cuda.max_memory_allocated`` sees
the peak of outputs and scratch. ``--quick`` (for CPUs) sweeps small sizes
with invconv's SciPy reference only; its "peak memory" is what tracemalloc
sees (NumPy allocations, not SuperLU's own).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tracemalloc
from datetime import datetime, timezone

import numpy as np

import invconv
from invconv.benchmarks import (CUDNN_COUNTERPART, CUDNN_EAGER, CUDNN_GRAPH, CudaGraphReplay,
                                GpuTimer, GraphReplay, _torch_alternatives, cpu_timer,
                                with_schedule)

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


N_SETS = 3


def _problem(rng, shape, dtype):
    """The weight and N_SETS (x, grad) input pairs."""
    B, C, H, W, k = shape
    w = (rng.uniform(-1, 1, (C, C, k, k)) * (0.5 / (C * k * k))).astype(dtype)
    sets = [tuple(rng.standard_normal((B, C, H, W)).astype(dtype) for _ in range(2))
            for _ in range(N_SETS)]
    return w, sets


def _gpu_runner(schedules=()):
    import cupy
    import torch
    from invconv.torch import _cuda_context
    from invconv.baselines import PerDiagonal
    per_diag = PerDiagonal("cuda")
    device = torch.device("cuda", cupy.cuda.Device().id)

    def implementations(op, w, sets):
        wg = cupy.asarray(w)
        gsets = [tuple(cupy.asarray(a) for a in s) for s in sets]
        if op == "inv":
            fns = {"invconv-cuda": lambda x, g: invconv.inv_conv2d(x, wg),
                   "per-diagonal-cuda": lambda x, g: per_diag.solve(x, wg)}
        else:
            fns = {"invconv-cuda": lambda x, g: invconv.inv_conv2d_vjp(g, x, wg),
                   "per-diagonal-cuda": lambda x, g: per_diag.inv_conv2d_vjp(g, x, wg)}
        for name, fn in fns.items():
            yield name, fn, gsets
        for name, fn in fns.items():
            yield name + "-graph", CudaGraphReplay(fn), gsets
        for schedule in schedules:
            yield (f"invconv-{schedule}-cuda-graph",
                   CudaGraphReplay(with_schedule(fns["invconv-cuda"], schedule)), gsets)
        B, C, H, W = gsets[0][0].shape
        for name, _, fn, inputs, _ in _torch_alternatives(
                CUDNN_COUNTERPART[op], (B, C, H, W), w.shape[-1], w, gsets, "cuda", 0):
            if name in (CUDNN_EAGER, CUDNN_GRAPH):
                yield name, fn, inputs

    timer = GpuTimer()

    def measure(fn, inputs, repeats, budget_s):
        if isinstance(fn, GraphReplay):  # timing only: the graph's memory is its own pool
            return timer(fn, inputs, warmup=2, repeats=repeats, budget_s=budget_s), None
        # Inside the context CuPy allocates from torch's caching allocator and
        # launches on torch's current stream (the timer's events go there too),
        # so torch's statistics see every allocation of the op.
        with _cuda_context(device) as stream, stream:
            for args in inputs:  # warm-up: compile, fill the allocator's cache
                fn(*args)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            times = timer(fn, inputs, warmup=0, repeats=repeats, budget_s=budget_s)
            peak = torch.cuda.max_memory_allocated(device) - base
        return times, peak
    return implementations, measure, torch.cuda.get_device_name(device)


def _cpu_runner():
    def implementations(op, w, sets):
        if op == "inv":
            yield "reference-cpu", lambda x, g: invconv.reference.inv_conv2d(x, w), sets
        else:
            yield ("reference-cpu", lambda x, g: invconv.reference.inv_conv2d_vjp(g, x, w),
                   sets)

    def measure(fn, inputs, repeats, budget_s):
        fn(*inputs[0])  # warm-up outside tracemalloc's count
        tracemalloc.start()
        try:
            times = cpu_timer(fn, inputs, warmup=0, repeats=repeats, budget_s=budget_s)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return times, peak
    return implementations, measure, "CPU"


def run(quick, gpu, dtype=np.float32, schedules=()):
    implementations, measure, device_name = _gpu_runner(schedules) if gpu else _cpu_runner()
    rng = np.random.default_rng(0)
    rows = []
    for sweep, values, make in (QUICK_SWEEPS if quick else GPU_SWEEPS):
        for value in values:
            B, C, H, W, k = make(value)
            w, sets = _problem(rng, (B, C, H, W, k), dtype)
            for op in OPS:
                for name, fn, inputs in implementations(op, w, sets):
                    try:
                        times, peak = measure(fn, inputs, repeats=5 if quick else 20,
                                              budget_s=1.0)
                    except Exception as exc:  # report the point, keep the sweep
                        print(f"  {name} failed on {sweep} = {value}, {op}: "
                              f"{type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    rows.append(dict(sweep=sweep, value=value, op=op, implementation=name,
                                     shape=[B, C, H, W], kernel_size=k,
                                     dtype=np.dtype(dtype).name,
                                     median_ms=statistics.median(times),
                                     min_ms=min(times), repeats=len(times),
                                     peak_bytes=None if peak is None else int(peak),
                                     diagonal_steps=H + W - 1,
                                     us_per_step=statistics.median(times) * 1e3
                                     / (H + W - 1)))
                    peak_text = "-" if peak is None else f"{peak / 2**20:.2f} MiB"
                    print(f"{sweep:11s} {value:4d} {op:8s} {name:24s} "
                          f"{rows[-1]['median_ms']:9.3f} ms  peak {peak_text}", flush=True)
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               device=device_name, numpy=np.__version__)
    return env, rows


def markdown(rows, env):
    """One line per sweep point and op: each implementation's median ms, each
    other implementation's time over invconv's timed the same way (eager or
    graph replay), invconv's graph replay per diagonal step and over cuDNN's
    graph replay (eager over eager where there is no graph row), and the peak
    memory of the eager calls."""
    impls = list(dict.fromkeys(r["implementation"] for r in rows))
    first = impls[0]

    def base(impl):  # the invconv row timed the same way as impl
        twin = first + "-graph" if impl.endswith("-graph") else first
        return twin if twin in impls and twin != impl else None
    compared = [i for i in impls if base(i)]
    measured_peak = [i for i in impls
                     if any(r["peak_bytes"] is not None
                            for r in rows if r["implementation"] == i)]
    cell = {(r["sweep"], r["value"], r["op"], r["implementation"]): r for r in rows}
    stepped = first + "-graph" if first + "-graph" in impls else first
    # Like with like: a graph replay over cuDNN's graph replay (GPU time on
    # both sides), an eager call over cuDNN's eager call.
    cudnn = CUDNN_GRAPH if stepped.endswith("-graph") else CUDNN_EAGER
    cudnn = cudnn if cudnn in impls else None
    head = (["sweep", "value", "B,C,H,W", "k", "op"] + [f"{i} ms" for i in impls]
            + [f"{i} / {base(i)}" for i in compared]
            + [f"{stepped} us / step"] + ([f"{stepped} / cuDNN"] if cudnn else [])
            + [f"{i} peak MiB" for i in measured_peak])
    peak = ("device memory the op allocated (outputs and scratch), from torch's allocator"
            if env["device"] != "CPU" else "what tracemalloc saw the op allocate")
    lines = [f"Measured {env['date']} on {env['device']}, {rows[0]['dtype']}. Median ms; "
             f"peak = {peak}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sweep, value, op in dict.fromkeys((r["sweep"], r["value"], r["op"]) for r in rows):
        got = {i: cell.get((sweep, value, op, i)) for i in impls}
        any_row = next(r for r in got.values() if r)
        line = [sweep, str(value), ",".join(map(str, any_row["shape"])),
                str(any_row["kernel_size"]), op]
        line += [f"{r['median_ms']:.3f}" if r else "-" for r in got.values()]
        line += [f"{got[i]['median_ms'] / got[base(i)]['median_ms']:.2f}"
                 if got[i] and got[base(i)] else "-" for i in compared]
        line.append(f"{got[stepped]['us_per_step']:.2f}" if got[stepped] else "-")
        if cudnn:
            line.append(f"{got[stepped]['median_ms'] / got[cudnn]['median_ms']:.2f}"
                        if got[stepped] and got[cudnn] else "-")
        line += [f"{got[i]['peak_bytes'] / 2**20:.2f}"
                 if got[i] and got[i]["peak_bytes"] is not None else "-" for i in measured_peak]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


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
                    linestyle="--" if key[0].endswith("-graph") else "-",
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
    p.add_argument("--markdown", help="markdown table file")
    p.add_argument("--plot", help="PNG of the sweeps (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="small CPU sweeps, reference only")
    p.add_argument("--schedules", default="",
                   help="comma-separated solve schedules to time beside the default (GPU)")
    args = p.parse_args(argv)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    from invconv._kernels import SolveSchedule
    for schedule in schedules:
        try:
            SolveSchedule.parse(schedule)
        except ValueError as exc:
            p.error(f"--schedules: {exc}")
    try:
        import cupy
        gpu = not args.quick and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        gpu = False
    if not gpu and not args.quick:
        p.error("the full sweeps need CuPy, torch and a CUDA device; use --quick on a CPU")
    env, rows = run(args.quick, gpu, schedules=schedules)
    if not rows:
        raise SystemExit("no sweep rows were produced")
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, env))
    if args.plot:
        try:
            plot(rows, env, args.plot)
        except ImportError:
            print("matplotlib is not installed (pip install invconv[plots]); no plot written",
                  file=sys.stderr)
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
