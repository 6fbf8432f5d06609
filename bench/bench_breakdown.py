"""Where a flow's time goes: time per layer type, sampling and density directions.

    python3 bench/bench_breakdown.py --out breakdown.json [--markdown breakdown.md] [--quick]

For each preset (inverse-flow, finc-flow, glow, emerging, snf-small,
snf-small-emerging) at
MNIST K = 4, L = 2 (and CIFAR-10 K = 4, L = 2 unless ``--quick``), batch 100,
ActNorm initialised on a random batch: every flow layer's ``forward`` (the
density direction) and ``inverse`` (sampling) is wrapped by a timer that
synchronises the device before and after the call, and the time is booked
*exclusively* to the layer's type (the coupling's network is its own row,
not part of the coupling's).  "other" is the rest of the pass: drawing the
latents, the prior, pre/post-processing, Python between layers.  The
breakdown is that of the fastest of the timed passes (on a shared machine the
least disturbed one), and the ``pass`` rows are the fastest runs too.

On a GPU the synchronisation per layer adds its own cost and removes the
overlap of host and device work, so the breakdown tells which layers cost
what, and the ``pass, eager`` and ``pass, captured`` rows (timed without the
wrappers) say what a user sees.
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from datetime import datetime, timezone

import numpy as np
import torch

from invconv import flows
from invconv.benchmarks import wall_times_ms
from invconv.torch import InvConv2d, MaskedConv2d

PRESETS = ("inverse-flow", "finc-flow", "glow", "emerging", "snf-small", "snf-small-emerging")
NINE_LAYER = ("snf-small", "snf-small-emerging")   # fixed shape: K = 3, L = 3, no coupling
CONFIGS = [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))]
# Layer classes whose calls are timed, with their row names.
LAYERS = [(InvConv2d, "InvConv2d (k×k)"), (MaskedConv2d, "MaskedConv2d (k×k)"),
          (flows.EmergingConv2d, "EmergingConv2d (k×k)"),
          (flows.SplineActivation, "spline"), (flows.ActNorm, "ActNorm"),
          (flows.InvertibleConv1x1, "1×1 conv"), (flows.AffineCoupling, "coupling (affine)"),
          (flows.Split, "split"), (flows.Squeeze, "squeeze")]
NETWORK = "coupling network"
OTHER = "other"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LayerTimer:
    """Exclusive wall time per (direction, row) of the wrapped calls."""

    def __init__(self, device):
        self.device = device
        self.totals = collections.defaultdict(float)
        self.calls = collections.defaultdict(int)
        self.direction = None
        self._children = []     # per open call: time spent in timed calls inside it

    def wrap(self, row, fn):
        def timed(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            self._children.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                elapsed = time.perf_counter() - t0
                inner = self._children.pop()
                self.totals[(self.direction, row)] += elapsed - inner
                self.calls[(self.direction, row)] += 1
                if self._children:
                    self._children[-1] += elapsed
        return timed

    def instrument(self, model):
        """Wrap the layers of ``model`` in place (instance attributes shadow the methods)."""
        # An Emerging convolution's two masked convolutions are booked to it.
        inner = {id(m) for e in model.modules() if isinstance(e, flows.EmergingConv2d)
                 for m in e.modules() if m is not e}
        for module in model.modules():
            if id(module) in inner:
                continue
            for cls, row in LAYERS:
                if type(module) is cls:
                    module.forward = self.wrap(row, module.forward)
                    module.inverse = self.wrap(row, module.inverse)
            if isinstance(module, flows.AffineCoupling):
                module.net.forward = self.wrap(NETWORK, module.net.forward)


def _model(preset, shape, device, seed=0):
    torch.manual_seed(seed)
    if preset in NINE_LAYER:
        model = flows.build(preset, shape)
    else:
        model = flows.build(preset, shape, levels=2, steps=4, hidden=64)
    model = model.to(device).train()
    with torch.no_grad():
        model.log_prob(torch.rand(100, *shape, device=device))   # ActNorm's data-dependent init
    return model.eval()


def _fastest_ms(fn, device, runs):
    return float(np.min(wall_times_ms(fn, device, runs, warmup=1)))


def breakdown(preset, dataset, shape, device, runs):
    """Rows for one model: per direction, ms per pass of each layer type and of the passes."""
    model = _model(preset, shape, device)
    batch = torch.rand(100, *shape, device=device)
    passes = {"sampling": lambda captured: model.sample(100, captured=captured),
              "density": lambda captured: model.log_prob(batch, captured=captured)}
    rows = []
    with torch.no_grad():
        plain = {d: _fastest_ms(lambda: fn(False), device, runs) for d, fn in passes.items()}
        captured = ({d: _fastest_ms(lambda: fn(True), device, runs) for d, fn in passes.items()}
                    if device.type == "cuda" else {})
        timer = LayerTimer(device)
        timer.instrument(model)
        per_run = collections.defaultdict(list)
        for direction, fn in passes.items():
            timer.direction = direction
            fn(False)                                   # warm-up
            for _ in range(runs):
                timer.totals.clear()
                _sync(device)
                t0 = time.perf_counter()
                fn(False)
                _sync(device)
                total = (time.perf_counter() - t0) * 1e3
                layers = {row: ms * 1e3 for (d, row), ms in timer.totals.items() if d == direction}
                for row in {row for (d, row) in timer.calls if d == direction}:
                    per_run[(direction, row)].append(layers.get(row, 0.0))
                per_run[(direction, OTHER)].append(total - sum(layers.values()))
                per_run[(direction, "pass, timed per layer")].append(total)
    base = dict(model=preset, dataset=dataset, K=3 if preset in NINE_LAYER else 4,
                L=3 if preset in NINE_LAYER else 2, batch=100, device=str(device))
    for direction in passes:
        totals = per_run[(direction, "pass, timed per layer")]
        best = int(np.argmin(totals))
        total = totals[best]
        for (d, row), values in per_run.items():
            if d != direction or row == "pass, timed per layer":
                continue
            ms = values[best]
            rows.append(dict(base, direction=direction, layer=row, ms=ms,
                             share=ms / total, calls_per_pass=timer.calls[(d, row)] // (runs + 1)
                             if row != OTHER else None))
        rows.append(dict(base, direction=direction, layer="pass, timed per layer", ms=total,
                         share=1.0, calls_per_pass=None))
        rows.append(dict(base, direction=direction, layer="pass, eager", ms=plain[direction],
                         share=None, calls_per_pass=None))
        if captured:
            rows.append(dict(base, direction=direction, layer="pass, captured (CUDA graph)",
                             ms=captured[direction], share=None, calls_per_pass=None))
    return rows


def markdown(rows, env):
    lines = [f"Measured {env['date']} on {env['device_name']} (torch {env['torch']}, "
             f"{env['threads']} thread(s)); batch 100, random weights with ActNorm initialised; "
             "ms per pass (the fastest of the runs), exclusive time per layer type with a "
             "device sync around each layer call (share of the per-layer-timed pass in "
             "brackets).", ""]
    keys = list(dict.fromkeys((r["dataset"], r["direction"]) for r in rows))
    for dataset, direction in keys:
        sel = [r for r in rows if r["dataset"] == dataset and r["direction"] == direction]
        models = list(dict.fromkeys(r["model"] for r in sel))
        order = [row for _, row in LAYERS] + [NETWORK, OTHER, "pass, timed per layer",
                                               "pass, eager", "pass, captured (CUDA graph)"]
        cell = {(r["model"], r["layer"]): r for r in sel}
        what = "latent → image" if direction == "sampling" else "image → log-density"
        lines += [f"**{dataset}, {direction}** ({what})",
                  "", "| layer type | " + " | ".join(models) + " |",
                  "|---|" + "---|" * len(models)]
        for row in order:
            if not any((m, row) in cell for m in models):
                continue
            vals = []
            for m in models:
                r = cell.get((m, row))
                if r is None:
                    vals.append("—")
                elif r["share"] is None or row.startswith("pass"):
                    vals.append(f"{r['ms']:.2f}")
                else:
                    vals.append(f"{r['ms']:.2f} ({100 * r['share']:.0f}%)")
            lines.append(f"| {row} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--markdown")
    p.add_argument("--quick", action="store_true", help="MNIST only, fewer runs")
    p.add_argument("--device", default=None)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = args.runs or (3 if args.quick else 10)
    rows = []
    for dataset, shape in CONFIGS[:1] if args.quick else CONFIGS:
        for preset in args.presets:
            new = breakdown(preset, dataset, shape, device, runs)
            rows += new
            top = sorted((r for r in new if r["share"] is not None and r["share"] < 1),
                         key=lambda r: -r["ms"])[:3]
            print(f"{dataset:8s} {preset:13s} " + "  ".join(
                f"{r['direction']}:{r['layer']} {r['ms']:.2f} ms" for r in top), flush=True)
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, threads=torch.get_num_threads(),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    with open(args.out, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, env))


if __name__ == "__main__":
    main()
