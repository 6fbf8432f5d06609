"""Interleaved A/B of the "cpu" backend's solves: two source trees in one process.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python3 bench/ab_cpu_solve.py --base /path/to/base/src --new src --out ab.json

Each tree's ``invconv`` package is loaded under its own name, and its
``_cpu._solve`` / ``_cpu._solve_adjoint`` (the backend functions, after the
API's validation) are timed back to back at the shapes of
bench/cpu_targets.py (float32, k = 3) plus a few thin images, repeats
interleaved; a cell is the median over repeats of new / base.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time

import numpy as np


def load(src, name):
    spec = importlib.util.spec_from_file_location(
        name, f"{src}/invconv/__init__.py", submodule_search_locations=[f"{src}/invconv"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}._cpu"), importlib.import_module(f"{name}._api")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--new", required=True)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    trees = {"base": load(args.base, "invconv_base"), "new": load(args.new, "invconv_new")}
    from invconv.benchmarks import CPU_SHAPES
    shapes = [(s, 3) for s in CPU_SHAPES] + [((1, 3, 4, 4096), 3), ((16, 1, 2, 2048), 3)]
    rows = []
    for shape, k in shapes:
        rng = np.random.default_rng(0)
        C = shape[1]
        w = (rng.standard_normal((C, C, k, k)) * 0.1 / C).astype(np.float32)
        y = rng.standard_normal(shape).astype(np.float32)
        fns = {}
        for tree, (cpu, api) in trees.items():
            conv = api.make_conv(w.shape, corner="top-left", groups=1, unit_diagonal=True)
            fns[tree, "inv"] = lambda cpu=cpu, conv=conv: cpu._solve(y, w, conv)
            fns[tree, "inv_adjoint"] = lambda cpu=cpu, conv=conv: cpu._solve_adjoint(y, w, conv)
        for f in fns.values():
            f()
        times = {key: [] for key in fns}
        for _ in range(args.repeats):
            for key, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[key].append(time.perf_counter() - t0)
        row = dict(shape=list(shape), k=k)
        for op in ("inv", "inv_adjoint"):
            row[op] = dict(
                base_ms=1e3 * statistics.median(times["base", op]),
                new_ms=1e3 * statistics.median(times["new", op]),
                new_over_base=statistics.median(
                    a / b for a, b in zip(times["new", op], times["base", op])))
        rows.append(row)
        print(shape, " ".join(f"{op}: {row[op]['base_ms']:.3f} -> {row[op]['new_ms']:.3f} ms "
                              f"({row[op]['new_over_base']:.2f})" for op in ("inv", "inv_adjoint")),
              flush=True)
        with open(args.out, "w") as f:
            json.dump({"base": args.base, "new": args.new, "repeats": args.repeats,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
