"""Model-level timings (the timing columns of the paper's Tables 2-6).

    python3 bench/bench_models.py --out models.json [--markdown models.md] [--quick]

For the inverse-flow, finc-flow and glow presets at the paper's MNIST
(1x28x28) and CIFAR-10 (3x32x32) configurations (K = 4 and 16, L = 2; random
initial weights), times sampling 100 images and the forward pass (log-density)
of a batch of 100: mean and standard deviation over runs after warm-up,
device-synchronised, with parameter counts.  ``--quick`` keeps K = 4, MNIST
only, and fewer runs (for CPUs).
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

import numpy as np
import torch

from invconv import flows

CONFIGS = [("mnist", (1, 28, 28), 4), ("mnist", (1, 28, 28), 16),
           ("cifar10", (3, 32, 32), 4), ("cifar10", (3, 32, 32), 16)]
PRESETS = ("inverse-flow", "finc-flow", "glow")


def _time(fn, device, runs, warmup=2):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.mean(times)), float(np.std(times))


def run(device, quick):
    rows = []
    configs = [c for c in CONFIGS if not quick or (c[0] == "mnist" and c[2] == 4)]
    for dataset, shape, K in configs:
        for preset in PRESETS:
            torch.manual_seed(0)
            model = flows.build(preset, shape, levels=2, steps=K, hidden=64).to(device).eval()
            batch = torch.rand(100, *shape, device=device)
            with torch.no_grad():
                sample = _time(lambda: model.sample(100), device, runs=2 if quick else 5)
                forward = _time(lambda: model.log_prob(batch), device, runs=2 if quick else 10)
            row = dict(model=preset, dataset=dataset, K=K, L=2, hidden=64,
                       parameters=sum(p.numel() for p in model.parameters()),
                       sampling_ms_100=sample[0], sampling_ms_std=sample[1],
                       forward_ms_batch100=forward[0], forward_ms_std=forward[1],
                       device=str(device))
            rows.append(row)
            print(f"{dataset:8s} K={K:2d} {preset:13s} sample {sample[0]:9.2f} ms  "
                  f"forward {forward[0]:9.2f} ms  params {row['parameters']}", flush=True)
    return rows


def markdown(rows, env):
    lines = [f"Measured {env['date']} on {env['device_name']} (torch {env['torch']}); "
             "random initial weights; mean ± std ms, device-synchronised.", "",
             "| dataset | K, L | model | params | sampling 100 (ms) | forward batch 100 (ms) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['K']}, {r['L']} | {r['model']} | {r['parameters']:,} | "
                     f"{r['sampling_ms_100']:.2f} ± {r['sampling_ms_std']:.2f} | "
                     f"{r['forward_ms_batch100']:.2f} ± {r['forward_ms_std']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--markdown")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = run(device, args.quick)
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__,
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, env))


if __name__ == "__main__":
    main()
