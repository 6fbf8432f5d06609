"""bench/README.md's GPU tables, from one device-check results folder.

    python3 bench/readme_tables.py bench/results/DATE-MACHINE-COMMIT

Prints three markdown tables (solves against every alternative, the masked
convolution against cuDNN, the scaling sweeps in GPU time), so bench/README.md
quotes the committed JSON exactly rather than by hand.
"""
from __future__ import annotations

import json
import pathlib
import sys

SOLVE_COLUMNS = [("invconv eager", "invconv-cuda"), ("invconv graph", "invconv-cuda-graph"),
                 ("per-diagonal eager", "per-diagonal-cuda"),
                 ("per-diagonal graph", "per-diagonal-cuda-graph"),
                 ("cuSPARSE trsv", "cusparse"), ("dense trsm (torch)", "dense-torch"),
                 ("SciPy reference (CPU)", "reference-cpu")]
CONV_COLUMNS = [("invconv eager", "invconv-cuda"), ("invconv graph", "invconv-cuda-graph"),
                ("cuDNN eager", "cudnn-conv2d")]
OP_NAMES = {"inv": "inverse", "inv_vjp": "inverse vjp", "conv": "conv", "conv_vjp": "conv vjp"}


def _ms(value):
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _table(rows, ops, columns):
    cell = {(r["op"], tuple(r["shape"]), r["implementation"]): r["median_ms"] for r in rows}
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    lines = ["| op | B×C×H×W | " + " | ".join(c[0] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for op in ops:
        for shape in shapes:
            if (op, shape, "invconv-cuda") not in cell:
                continue
            values = [_ms(cell.get((op, shape, impl))) for _, impl in columns]
            lines.append(f"| {OP_NAMES[op]} | {'×'.join(map(str, shape))} | "
                         + " | ".join(values) + " |")
    return "\n".join(lines)


def _sweep_table(rows):
    cell = {(r["sweep"], r["value"], r["op"], r["implementation"]): r for r in rows}
    lines = ["| sweep | B×C×H×W, k | inverse: invconv graph | per-diagonal graph | ratio | "
             "vjp: invconv graph | per-diagonal graph | ratio | vjp peak MiB: invconv | "
             "per-diagonal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for sweep, value in dict.fromkeys((r["sweep"], r["value"]) for r in rows):
        a, b = (cell[(sweep, value, "inv", i)]
                for i in ("invconv-cuda-graph", "per-diagonal-cuda-graph"))
        av, bv = (cell[(sweep, value, "inv_vjp", i)]
                  for i in ("invconv-cuda-graph", "per-diagonal-cuda-graph"))
        pa, pb = (cell[(sweep, value, "inv_vjp", i)]["peak_bytes"] / 2**20
                  for i in ("invconv-cuda", "per-diagonal-cuda"))
        shape = "×".join(map(str, a["shape"])) + f", {a['kernel_size']}"
        lines.append(
            f"| {sweep} = {value} | {shape} | {a['median_ms']:.3f} | {b['median_ms']:.3f} | "
            f"{b['median_ms'] / a['median_ms']:.2f} | {av['median_ms']:.3f} | "
            f"{bv['median_ms']:.3f} | {bv['median_ms'] / av['median_ms']:.2f} | "
            f"{pa:.2f} | {pb:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    folder = pathlib.Path((argv or sys.argv[1:])[0])
    ops = json.loads((folder / "ops.json").read_text())["rows"]
    print(_table(ops, ("inv", "inv_vjp"), SOLVE_COLUMNS), end="\n\n")
    print(_table(ops, ("conv", "conv_vjp"), CONV_COLUMNS), end="\n\n")
    sweeps = folder / "sweeps.json"
    if sweeps.exists():
        print(_sweep_table(json.loads(sweeps.read_text())["rows"]))


if __name__ == "__main__":
    main()
