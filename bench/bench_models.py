"""Model-level timings (the timing columns of the paper's Tables 2-6), eager and captured.

    python3 bench/bench_models.py --out models.json [--markdown models.md] [--quick]

For the inverse-flow, finc-flow, glow and emerging presets at the paper's
MNIST (1x28x28) and CIFAR-10 (3x32x32) configurations (K = 4 and 16, L = 2,
hidden 64) and the 9-layer snf-small and snf-small-emerging (K = 3, L = 3, no
coupling), with random
weights and ActNorm initialised on a random batch, times sampling 100 images
and the forward pass (log-density) of a batch of 100: mean and standard
deviation over runs after warm-up, device-synchronised, with parameter
counts.  Each model is timed per *method*: ``eager`` (layer by layer from
Python) and, on CUDA, ``graph`` (the pass captured once in a CUDA graph and
replayed, :mod:`invconv.capture`) and ``compile`` (torch.compile,
mode="reduce-overhead"; compiling is slow, so only for ``--compile-presets``
at MNIST K = 4).  Before a captured method is timed its
samples and log-densities are compared with eager ones (same latents); the
largest differences are in the row.  ``--quick`` keeps K = 4, MNIST only,
and fewer runs (for CPUs, where only eager runs).

Each row also counts what one pass dispatches (``sampling_launches``,
``forward_launches``), by the torch profiler around one call after warm-up:
on CUDA the kernel launches (for a captured method, those the replay runs),
on the CPU the top-level aten and invconv ops (operators called from Python,
not the ops they call inside; views included), a proxy for launches.
"""
from __future__ import annotations

import argparse
import json
import warnings
from datetime import datetime, timezone

import numpy as np
import torch

from invconv import flows
from invconv.benchmarks import wall_times_ms

CONFIGS = [("mnist", (1, 28, 28), 4), ("mnist", (1, 28, 28), 16),
           ("cifar10", (3, 32, 32), 4), ("cifar10", (3, 32, 32), 16)]
PRESETS = ("inverse-flow", "finc-flow", "glow", "emerging", "snf-small", "snf-small-emerging")
NINE_LAYER = ("snf-small", "snf-small-emerging")   # fixed shape: K = 3, L = 3, no coupling


def _time(fn, device, runs):
    times = wall_times_ms(fn, device, runs)
    return float(np.mean(times)), float(np.std(times))


def _model(preset, shape, K, device):
    torch.manual_seed(0)
    if preset in NINE_LAYER:
        model = flows.build(preset, shape)
    else:
        model = flows.build(preset, shape, levels=2, steps=K, hidden=64)
    model = model.to(device).train()
    with torch.no_grad():
        model.log_prob(torch.rand(100, *shape, device=device))   # ActNorm's data-dependent init
    return model.eval()


def count_launches(fn, device):
    """Kernel launches (CUDA) or top-level ops (CPU) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)

    def is_op(e):
        return e.name.startswith(("aten::", "invconv::"))
    return sum(1 for e in events if is_op(e) and (e.cpu_parent is None
                                                  or not is_op(e.cpu_parent)))


def _agreement(model, batch, method, device):
    """Largest |captured - eager| of samples (same latents) and of log-densities."""
    gen = (lambda: torch.Generator(device=device).manual_seed(1))  # noqa: E731
    with torch.no_grad():
        s_eager = model.sample(100, generator=gen())
        s_cap = model.sample(100, generator=gen(), captured=method)
        l_eager = model.log_prob(batch)
        l_cap = model.log_prob(batch, captured=method)
    return (float((s_cap - s_eager).abs().max()), float((l_cap - l_eager).abs().max()))


def run(device, quick, methods, compile_presets):
    rows = []
    configs = [c for c in CONFIGS if not quick or (c[0] == "mnist" and c[2] == 4)]
    if device.type != "cuda":
        methods = ["eager"]          # nothing to capture off CUDA (the captured paths run eagerly)
    for dataset, shape, K in configs:
        for preset in PRESETS:
            if preset in NINE_LAYER and K != 4:
                continue             # one fixed 9-layer model per dataset
            model = _model(preset, shape, K, device)
            batch = torch.rand(100, *shape, device=device)
            for method in methods:
                if method == "compile" and (preset not in compile_presets
                                            or (dataset, K) != ("mnist", 4)):
                    continue
                captured = False if method == "eager" else method
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    diff = (None, None) if method == "eager" else _agreement(model, batch,
                                                                             method, device)
                    with torch.no_grad():
                        sample = _time(lambda: model.sample(100, captured=captured), device,
                                       runs=2 if quick else 5)
                        forward = _time(lambda: model.log_prob(batch, captured=captured),
                                        device, runs=2 if quick else 10)
                        launches = (count_launches(lambda: model.sample(100, captured=captured),
                                                   device),
                                    count_launches(lambda: model.log_prob(batch,
                                                                          captured=captured),
                                                   device))
                # A capture that failed ran eagerly: the row says so.
                fell_back = any("running eagerly" in str(w.message) for w in caught)
                row = dict(model=preset, dataset=dataset,
                           K=3 if preset in NINE_LAYER else K,
                           L=3 if preset in NINE_LAYER else 2,
                           hidden=None if preset in NINE_LAYER else 64, method=method,
                           parameters=sum(p.numel() for p in model.parameters()),
                           sampling_ms_100=sample[0], sampling_ms_std=sample[1],
                           forward_ms_batch100=forward[0], forward_ms_std=forward[1],
                           max_abs_diff_sample=diff[0], max_abs_diff_log_prob=diff[1],
                           fell_back_to_eager=fell_back, device=str(device),
                           sampling_launches=launches[0], forward_launches=launches[1])
                rows.append(row)
                print(f"{dataset:8s} K={row['K']:2d} {preset:18s} {method:8s} sample "
                      f"{sample[0]:9.2f} ms  forward {forward[0]:9.2f} ms  "
                      f"params {row['parameters']}  launches {launches[0]}/{launches[1]}"
                      + ("  (capture failed: eager)" if fell_back else ""), flush=True)
    return rows


def markdown(rows, env):
    lines = [f"Measured {env['date']} on {env['device_name']} (torch {env['torch']}); "
             "random weights, ActNorm initialised; mean ± std ms, device-synchronised; "
             "eager = layer by layer, graph = one CUDA-graph replay, compile = "
             "torch.compile(mode=\"reduce-overhead\").", "",
             "| dataset | K, L | model | params | method | sampling 100 (ms) | "
             "forward batch 100 (ms) | launches sampling / forward |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['K']}, {r['L']} | {r['model']} | "
                     f"{r['parameters']:,} | {r.get('method', 'eager')}"
                     f"{' (failed: eager)' if r.get('fell_back_to_eager') else ''} | "
                     f"{r['sampling_ms_100']:.2f} ± {r['sampling_ms_std']:.2f} | "
                     f"{r['forward_ms_batch100']:.2f} ± {r['forward_ms_std']:.2f} | "
                     f"{r.get('sampling_launches', '—')} / {r.get('forward_launches', '—')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--markdown")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--methods", nargs="+", default=["eager", "graph", "compile"],
                   choices=["eager", "graph", "compile"])
    p.add_argument("--compile-presets", nargs="+", default=["inverse-flow", "glow"],
                   choices=PRESETS, help="presets timed with torch.compile (MNIST K = 4 only)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = run(device, args.quick, args.methods, args.compile_presets)
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
