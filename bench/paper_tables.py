"""The paper's Tables 2 and 4 from trained runs: parameters, bits/dim, sampling and forward time.

    python3 bench/paper_tables.py RUNS_DIR --out tables.json [--markdown tables.md] [--device cuda]

``RUNS_DIR/<model>/`` are ``invconv train --out`` directories (checkpoint.pt
and metrics.json).  For each: the parameter count, the test bits/dim that
training measured last (on the test images it was given), the training
budget (steps, batch, seed, lr, from the run's own config) and the
``invconv train`` command that reproduces it, and the time to sample 100
images and of the forward pass (log-density) of a batch of 100 test images:
fastest, median and quartiles over runs after warm-up, device-synchronised,
per method (eager; on CUDA also the captured CUDA-graph replay).  The
markdown quotes the fastest run: on a shared machine, the least disturbed.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from datetime import datetime, timezone

import numpy as np
import torch

from invconv import data, flows
from invconv.benchmarks import wall_times_ms

TABLES = {"Table 2 (MNIST, K = 4, L = 2)": ("inverse-flow", "finc-flow", "glow", "emerging"),
          "Table 4 (9-layer MNIST flows)": ("snf-small", "snf-small-emerging")}
FLAGS = [("model", "--model"), ("dataset", "--dataset"), ("K", "-K"), ("L", "-L"),
         ("hidden", "--hidden"), ("kernel_size", "--kernel-size"), ("batch_size", "--batch-size"),
         ("epochs", "--epochs"), ("max_steps", "--max-steps"), ("lr", "--lr"), ("seed", "--seed"),
         ("logit", "--logit"), ("limit_train", "--limit-train"), ("limit_test", "--limit-test")]


def _command(config, out):
    parts = ["invconv train"]
    for key, flag in FLAGS:
        if config.get(key) is not None:
            parts.append(f"{flag} {config[key]}")
    if config.get("learn_diagonal"):
        parts.append("--learn-diagonal")
    return " ".join(parts) + f" --out {out}"


def _times(fn, device, runs):
    out = wall_times_ms(fn, device, runs)
    q1, med, q3 = np.percentile(out, [25, 50, 75])
    return dict(min_ms=float(np.min(out)), median_ms=float(med), q1_ms=float(q1),
                q3_ms=float(q3), runs=runs)


def measure(run_dir, device, test_images):
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location=device, weights_only=True)
    cfg = ckpt["config"]
    model = flows.build(cfg["model"], cfg["input_shape"], **cfg["kwargs"]).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config, last = metrics["config"], metrics["history"][-1]
    batch = flows.dequantize(torch.from_numpy(test_images[:100]),
                             generator=torch.Generator().manual_seed(0)).to(device)
    methods = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    timing = {}
    with torch.no_grad():
        for method in methods:
            captured = method != "eager" and method
            timing[method] = dict(
                sampling_100=_times(lambda: model.sample(100, captured=captured), device, 5),
                forward_batch100=_times(lambda: model.log_prob(batch, captured=captured),
                                        device, 10))
    return dict(model=cfg["model"], dataset=cfg["dataset"], K=config["K"], L=config["L"],
                hidden=config["hidden"], parameters=sum(p.numel() for p in model.parameters()),
                test_bpd=last["test_bpd"], train_bpd_last_step=last["train_bpd"],
                steps=last["global_step"], batch_size=config["batch_size"], lr=config["lr"],
                seed=config["seed"], test_images=config["limit_test"] or len(test_images),
                train_seconds=last["seconds"], command=_command(config, f"runs/{cfg['model']}"),
                timing=timing, device=str(device))


def markdown(rows, env):
    lines = [f"Timed {env['date']} on {env['device_name']} (torch {env['torch']}, "
             f"{env['threads']} thread(s)); fastest of 5 sampling and 10 forward runs, ms.", ""]
    lines += ["| table | model | K, L | params | steps × batch | test bits/dim | method | "
              "sampling 100 (ms) | forward batch 100 (ms) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for table, models in TABLES.items():
        for r in rows:
            if r["model"] not in models:
                continue
            for method, t in r["timing"].items():
                lines.append(f"| {table.split(' (')[0]} | {r['model']} | {r['K']}, {r['L']} | "
                             f"{r['parameters']:,} | {r['steps']} × {r['batch_size']} | "
                             f"{r['test_bpd']:.3f} | {method} | "
                             f"{t['sampling_100']['min_ms']:.1f} | "
                             f"{t['forward_batch100']['min_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", type=pathlib.Path)
    p.add_argument("--out", required=True)
    p.add_argument("--markdown")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    test_images, _ = data.load("mnist", "test", root=args.data_root)
    rows = []
    for models in TABLES.values():
        for name in models:
            run_dir = args.runs_dir / name
            if not (run_dir / "checkpoint.pt").exists():
                print(f"{name}: no run in {run_dir}, skipped")
                continue
            row = measure(run_dir, device, np.ascontiguousarray(test_images))
            rows.append(row)
            t = row["timing"]["eager"]
            print(f"{name:13s} params {row['parameters']:8,d}  test bits/dim "
                  f"{row['test_bpd']:.4f}  sampling {t['sampling_100']['min_ms']:.1f} ms  "
                  f"forward {t['forward_batch100']['min_ms']:.1f} ms", flush=True)
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, threads=torch.get_num_threads(),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, env))
    if not rows:
        raise SystemExit(f"no trained runs under {args.runs_dir}")


if __name__ == "__main__":
    main()
