"""The cpu backend against the issue-10 targets, robust to a shared machine.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        python3 bench/cpu_targets.py --threads 1 --out cpu_targets.json
    (--train-step: the README model's training step, "cpu" against "reference")

For each shape (float32, k = 3) every repeat times, back to back, invconv's
"cpu" inverse, inverse vjp and conv2d and torch's conv2d forward and
forward+backward (same shape, same padding), and takes the ratios within
the repeat; the table gives the median ratio over repeats, so load from other
processes that changes slowly cancels.  Targets: inverse <= 2x conv2d
forward, inverse vjp <= 1.5x conv2d forward+backward, conv2d <= 1.5x conv2d.
Peak memory: what Python allocates during one call (tracemalloc), "cpu"
against the SciPy reference.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc

import numpy as np
import torch
import torch.nn.functional as F

import invconv
from invconv.benchmarks import CPU_SHAPES, environment


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _peak(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(shape, repeats, with_reference_memory):
    rng = np.random.default_rng(0)
    B, C, H, W = shape
    w = (rng.standard_normal((C, C, 3, 3)) * 0.1 / C).astype(np.float32)
    x, g = rng.standard_normal((2, *shape)).astype(np.float32)
    xt, gt, wt = torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(w)

    def torch_fwd():
        F.conv2d(F.pad(xt, (2, 0, 2, 0)), wt)

    def torch_fwd_bwd():
        xr, wr = xt.clone().requires_grad_(True), wt.clone().requires_grad_(True)
        torch.autograd.grad(F.conv2d(F.pad(xr, (2, 0, 2, 0)), wr), (xr, wr), gt)

    ops = {
        "inv": lambda: invconv.inv_conv2d(x, w, backend="cpu"),
        "inv_vjp": lambda: invconv.inv_conv2d_vjp(g, x, w, backend="cpu"),
        "conv": lambda: invconv.conv2d(x, w, backend="cpu"),
        "conv_vjp": lambda: invconv.conv2d_vjp(g, x, w, backend="cpu"),
        "torch_fwd": torch_fwd,
        "torch_fwd_bwd": torch_fwd_bwd,
    }
    for fn in ops.values():
        fn()
    times = {k: [] for k in ops}
    for _ in range(repeats):
        for k, fn in ops.items():
            times[k].append(_seconds(fn))
    ratio = {
        "inv / conv2d fwd": ("inv", "torch_fwd", 2.0),
        "inv_vjp / conv2d fwd+bwd": ("inv_vjp", "torch_fwd_bwd", 1.5),
        "conv / conv2d fwd": ("conv", "torch_fwd", 1.5),
        "conv_vjp / conv2d fwd+bwd": ("conv_vjp", "torch_fwd_bwd", None),
    }
    row = dict(shape=list(shape), repeats=repeats,
               median_ms={k: 1e3 * statistics.median(v) for k, v in times.items()})
    row["ratios"] = {name: statistics.median(a / b for a, b in zip(times[num], times[den]))
                     for name, (num, den, _) in ratio.items()}
    row["targets"] = {name: t for name, (_, _, t) in ratio.items()}
    row["input_bytes"] = x.nbytes
    row["peak_bytes_cpu"] = {"inv": _peak(ops["inv"]), "inv_vjp": _peak(ops["inv_vjp"])}
    if with_reference_memory:
        row["peak_bytes_reference"] = {
            "inv": _peak(lambda: invconv.inv_conv2d(x, w, backend="reference")),
            "inv_vjp": _peak(lambda: invconv.inv_conv2d_vjp(g, x, w, backend="reference"))}
    return row


def train_steps(repeats):
    """Images/s of the README's training step (inverse-flow, K = 4, L = 2, batch
    100 of MNIST-shaped data, Adam) with CPU tensors on "cpu" and on "reference",
    steps interleaved.  The torch adapter runs the registry's default backend
    for CPU tensors; this swaps that default."""
    from invconv import _backends, flows
    torch.manual_seed(0)
    model = flows.build("inverse-flow", (1, 28, 28), levels=2, steps=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(100, 1, 28, 28)
    default_for = _backends.default_for

    def step(name):
        _backends.default_for = lambda kind: name if kind == "numpy" else default_for(kind)
        try:
            t0 = time.perf_counter()
            loss = -model.log_prob(x).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return time.perf_counter() - t0
        finally:
            _backends.default_for = default_for

    times = {"cpu": [], "reference": []}
    for name in times:
        step(name)
    for _ in range(repeats):
        for name in times:
            times[name].append(step(name))
    return {name: 100 / statistics.median(t) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (set BLAS threads "
                   "with OMP_NUM_THREADS/OPENBLAS_NUM_THREADS before starting)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--reference-memory", action="store_true",
                   help="also the SciPy reference's peak memory (slow at large shapes)")
    p.add_argument("--train-step", action="store_true",
                   help="only the training step's images/s, cpu against reference")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train_step:
        result = train_steps(args.repeats)
        print(" ".join(f"{k}: {v:.0f} images/s" for k, v in result.items()))
        with open(args.out, "w") as f:
            json.dump({"environment": environment(False), "train_images_per_s": result}, f,
                      indent=1)
        return
    rows = []
    for shape in CPU_SHAPES:
        rows.append(measure(shape, args.repeats, args.reference_memory))
        r = rows[-1]
        print(shape, " ".join(f"{k}: {v:.2f}" for k, v in r["ratios"].items()),
              "peak MB inv cpu %.1f" % (r["peak_bytes_cpu"]["inv"] / 1e6),
              "ref %.1f" % (r["peak_bytes_reference"]["inv"] / 1e6)
              if "peak_bytes_reference" in r else "", flush=True)
        with open(args.out, "w") as f:
            json.dump({"environment": environment(False), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
