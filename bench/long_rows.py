"""Issue 19: long rows and thin images, large kernels, first calls, memory.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python3 bench/long_rows.py --out long_rows.json --markdown long_rows.md
    (--src DIR: import invconv from DIR instead, e.g. another worktree's src;
     --quick: small sizes, seconds)

Every case runs in a fresh subprocess (one thread), so its first call pays
everything a first call pays (plans, folds, patterns) and its memory is its
own.  A case times the first ``inv_conv2d`` call, then the median of several
repeated calls; the resident memory growth is the process's peak RSS
(VmHWM) after the calls minus its RSS before the first one (inputs already
made; the backend's modules are imported before the first call, as an
installed package's cached bytecode would make them).  Single-channel rows and columns are compared with
``scipy.signal.lfilter`` on the same data (its time measured in the same
process, interleaved with the repeats; the result's largest difference
relative to the largest magnitude is reported).  A case that raises reports
the error's first line and the seconds until it was raised.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _case(spec):
    """Run one case in this process; returns a dict (printed as JSON)."""
    import importlib

    import numpy as np
    import invconv
    # Import the backend's modules before timing: the first call measures the
    # call (plans, folds, patterns), not compiling modules, which an installed
    # package has cached (this environment sets PYTHONDONTWRITEBYTECODE).
    for name in ("_cpu", "_cpu_rows", "_cpu_walk", "reference"):
        try:
            importlib.import_module("invconv." + name)
        except ImportError:      # an older tree without that module
            pass

    B, C, H, W = spec["shape"]
    kh, kw = spec["kernel"]
    dtype = np.dtype(spec["dtype"])
    rng = np.random.default_rng(0)
    # a stable, well-conditioned kernel: small taps, unit diagonal
    w = (rng.uniform(-1, 1, (C, C, kh, kw)) * (0.5 / (C * kh * kw))).astype(dtype)
    y = rng.standard_normal((B, C, H, W)).astype(dtype)
    try:  # reset the peak RSS to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss0 = _status("VmRSS")
    row = dict(spec)
    t0 = time.perf_counter()
    try:
        x = invconv.inv_conv2d(y, w, backend="cpu")
    except (MemoryError, ValueError) as exc:
        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                   first_s=time.perf_counter() - t0,
                   rss_growth_mb=(_status("VmHWM") - rss0) / 1e6)
        return row
    row["first_s"] = time.perf_counter() - t0
    lfilter = None
    if spec.get("lfilter"):
        from scipy.signal import lfilter as lf
        if H == 1:
            a = w[0, 0, kh - 1, ::-1].astype(np.float64)   # the taps reading row h
            series = y[0, 0, 0]
        else:
            a = w[0, 0, ::-1, kw - 1].astype(np.float64)   # the taps reading column w
            series = y[0, :, :, 0]
        a[0] = 1.0                                # the unit diagonal
        if C == 1:
            want = lf([1.0], a, series)
            row["err_vs_lfilter"] = float(np.max(np.abs(x.reshape(-1) - want)) / np.max(np.abs(want)))

        def lfilter():                            # C independent channels: C calls
            for c in range(C):
                lf([1.0], a, y[0, c].reshape(-1))
    times, lf_times = [], []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        invconv.inv_conv2d(y, w, backend="cpu")
        times.append(time.perf_counter() - t0)
        if lfilter is not None:
            t0 = time.perf_counter()
            lfilter()
            lf_times.append(time.perf_counter() - t0)
    row["repeated_s"] = statistics.median(times) if times else None
    row["rss_growth_mb"] = (_status("VmHWM") - rss0) / 1e6
    row["input_mb"] = y.nbytes / 1e6
    if lf_times:
        row["lfilter_s"] = statistics.median(lf_times)
        row["first_over_lfilter"] = row["first_s"] / row["lfilter_s"]
        row["repeated_over_lfilter"] = row["repeated_s"] / row["lfilter_s"]
    try:
        from invconv import _cpu
        row["plan_cache_mb"] = _cpu._plans_bytes[0] / 1e6
    except Exception:
        pass
    return row


def cases(quick):
    n = 20_000 if quick else 200_000
    big = 256 if quick else 1024
    out = [
        dict(name=f"row 1x1x1x{n}", shape=[1, 1, 1, n], kernel=[1, 5], dtype="float64",
             repeats=9, lfilter=True),
        dict(name=f"column 1x1x{n}x1", shape=[1, 1, n, 1], kernel=[5, 1], dtype="float64",
             repeats=9, lfilter=True),
        dict(name=f"row C=3 1x3x1x{n}", shape=[1, 3, 1, n], kernel=[1, 5], dtype="float64",
             repeats=9, lfilter=True),
        dict(name=f"row 5x5 kernel 1x1x1x{n}", shape=[1, 1, 1, n], kernel=[5, 5],
             dtype="float64", repeats=9, lfilter=True),
        dict(name=f"row 1x1x1x{15 * n}", shape=[1, 1, 1, 15 * n], kernel=[1, 5],
             dtype="float64", repeats=3, lfilter=True),
        dict(name=f"1x3x{big}^2 k=31", shape=[1, 3, big, big], kernel=[31, 31],
             dtype="float32", repeats=1),
        dict(name=f"1x3x{big}^2 k=127", shape=[1, 3, big, big], kernel=[127, 127],
             dtype="float32", repeats=0),
        dict(name="1x3x700^2 k=21" if not quick else "1x3x128^2 k=21",
             shape=[1, 3, 700, 700] if not quick else [1, 3, 128, 128], kernel=[21, 21],
             dtype="float32", repeats=1),
    ]
    if not quick:
        from invconv.benchmarks import CPU_SHAPES
        for shape in CPU_SHAPES:
            out.append(dict(name="cpu_targets " + "x".join(map(str, shape)), shape=list(shape),
                            kernel=[3, 3], dtype="float32", repeats=15))
    else:
        out.append(dict(name="cpu_targets 4x3x32x32", shape=[4, 3, 32, 32], kernel=[3, 3],
                        dtype="float32", repeats=3))
    return out


def run(spec, src, timeout, memory_limit):
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    code = ("import json, sys, resource; sys.path.insert(0, %r); import long_rows; "
            "lim = %d; lim and resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); "
            "print(json.dumps(long_rows._case(json.loads(sys.argv[1]))))"
            % (os.path.dirname(os.path.abspath(__file__)), memory_limit))
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout} s")
    if proc.returncode != 0:
        return dict(spec, error=(proc.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, spec="%.3g"):
    return "" if v is None else spec % v


def markdown(rows, env):
    lines = [f"Machine: {env['machine']}; {env['date']}; invconv from {env['src']}", "",
             "| case | dtype | first call s | repeated s | lfilter s | first / lfilter | "
             "repeated / lfilter | err vs lfilter | RSS growth MB | plans cached MB | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["name"], r["dtype"], _fmt(r.get("first_s")), _fmt(r.get("repeated_s")),
            _fmt(r.get("lfilter_s")), _fmt(r.get("first_over_lfilter"), "%.1f"),
            _fmt(r.get("repeated_over_lfilter"), "%.2f"), _fmt(r.get("err_vs_lfilter"), "%.1e"),
            _fmt(r.get("rss_growth_mb"), "%.0f"), _fmt(r.get("plan_cache_mb"), "%.0f"),
            r.get("error", "")]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--markdown")
    p.add_argument("--src", help="import invconv from this directory (default: as installed)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", help="run only the cases whose name contains this")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--memory-limit-gb", type=float, default=4.0,
                   help="address-space limit of each case (protects a shared machine)")
    args = p.parse_args(argv)
    import platform
    env = dict(machine=f"{platform.machine()} {os.cpu_count()} cores, "
                       f"load {os.getloadavg()[0]:.1f}",
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               src=args.src or "installed", threads=os.environ.get("OMP_NUM_THREADS"))
    rows = []
    for spec in cases(args.quick):
        if args.only and args.only not in spec["name"]:
            continue
        rows.append(run(spec, args.src, args.timeout, int(args.memory_limit_gb * 2**30)))
        r = rows[-1]
        print(r["name"], " ".join(f"{k}={_fmt(r.get(k))}" for k in
                                  ("first_s", "repeated_s", "lfilter_s", "rss_growth_mb")),
              r.get("error", ""), flush=True)
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown(rows, env))


if __name__ == "__main__":
    main()
