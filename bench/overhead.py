"""What a call costs: per-call time of every op, eager, host time included.

    python3 bench/overhead.py [--device cpu|cuda] [--quick] [--training] [--out F.json]
                              [--markdown F.md]

Each op is called back to back, as a Python training loop calls it, and the
median over repeats of the time per call is reported beside torch's own
``F.conv2d`` (with ``F.pad``) of the same shape: an eager call against an
eager call (on CUDA each repeat ends with a synchronisation, so a row is
host and device time together).  Rows:

- ``array <op>``: the array API (NumPy on the CPU, CuPy on CUDA) for
  ``conv2d``, ``inv_conv2d``, ``conv2d_vjp``, ``inv_conv2d_vjp``;
- ``torch <op>``: ``invconv.torch.conv2d``/``inv_conv2d`` without
  gradients, and ``fwd+bwd``: the output's ``torch.autograd.grad`` with
  respect to image and weight;
- ``... new weight``: the same with the weight changed in place before every
  call (as in training, where nothing derived from the weight can be
  reused), beside ``F.conv2d`` with the same in-place change.

The ratio column divides by ``F.conv2d`` (forward rows) or ``F.conv2d
fwd+bwd`` (vjp and fwd+bwd rows) of the same shape and weight treatment.
``--breakdown`` (default on) also times the layers of one small inverse call
(the public function, the route choice, the tensor/array exchange and
validation, the backend) and reports each layer's own cost.

``--training`` adds one Adam training step of the flow presets (eager, and
on CUDA the captured step of ``invconv train --captured``).

Timings are wall clock on a shared machine: compare rows of one run, not
runs.  No test asserts on them.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

TINY = (1, 1, 4, 4)
FLOW_SHAPES = [(100, 1, 28, 28), (100, 4, 14, 14), (100, 12, 16, 16), (100, 48, 8, 8),
               (100, 3, 32, 32), (16, 3, 64, 64)]
QUICK_SHAPES = [(4, 3, 8, 8)]


def per_call_us(fn, sync, repeats, budget_s):
    """Median over ``repeats`` of the mean time of back-to-back calls (µs)."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, min(5000, int(budget_s / repeats / once)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return float(np.median(times))


def _ops(shape, k, device, dtype):
    """name -> (callable, yardstick name) for one shape."""
    import torch
    import torch.nn.functional as F

    import invconv
    import invconv.torch as it

    rng = np.random.default_rng(0)
    B, C, H, W = shape
    x = torch.tensor(rng.standard_normal(shape), dtype=dtype, device=device)
    w = torch.tensor(0.1 * rng.standard_normal((C, C, k, k)), dtype=dtype, device=device)
    g = torch.randn(shape, dtype=dtype, device=device)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    if device.type == "cuda":
        import cupy
        xa, wa, ga = (cupy.from_dlpack(t) for t in (x, w, g))
    else:
        xa, wa, ga = x.numpy(), w.numpy(), g.numpy()
    pad = (k - 1, 0, k - 1, 0)

    def nudged(t):
        # new weight values every call (a step of 1e-6 changes every float32
        # entry of size below 8), the same cost on both sides
        with torch.no_grad():
            t.add_(1e-6)
        return t

    def fwd_bwd(f, weight):
        out = f(xg, weight)
        torch.autograd.grad(out, (xg, weight), g)

    def cudnn(a, b):
        return F.conv2d(F.pad(a, pad), b)

    return {
        "F.conv2d": (lambda: cudnn(x, w), None),
        "F.conv2d fwd+bwd": (lambda: fwd_bwd(cudnn, wg), None),
        "F.conv2d fwd+bwd new weight": (lambda: fwd_bwd(cudnn, nudged(wg)), None),
        "array conv2d": (lambda: invconv.conv2d(xa, wa), "F.conv2d"),
        "array inv_conv2d": (lambda: invconv.inv_conv2d(xa, wa), "F.conv2d"),
        "array conv2d_vjp": (lambda: invconv.conv2d_vjp(ga, xa, wa), "F.conv2d fwd+bwd"),
        "array inv_conv2d_vjp": (lambda: invconv.inv_conv2d_vjp(ga, xa, wa),
                                 "F.conv2d fwd+bwd"),
        "torch conv2d": (lambda: it.conv2d(x, w), "F.conv2d"),
        "torch inv_conv2d": (lambda: it.inv_conv2d(x, w), "F.conv2d"),
        "torch conv2d fwd+bwd": (lambda: fwd_bwd(it.conv2d, wg), "F.conv2d fwd+bwd"),
        "torch inv_conv2d fwd+bwd": (lambda: fwd_bwd(it.inv_conv2d, wg), "F.conv2d fwd+bwd"),
        "torch inv_conv2d fwd+bwd new weight": (
            lambda: fwd_bwd(it.inv_conv2d, nudged(wg)), "F.conv2d fwd+bwd new weight"),
    }


def _breakdown(device, dtype, sync, repeats, budget_s):
    """Own cost of each layer of one ``invconv.torch.inv_conv2d`` call on TINY,
    as differences of nested calls: [(layer, µs)]."""
    import torch

    import invconv
    import invconv.torch as it
    from invconv import _api, _backends

    rng = np.random.default_rng(0)
    y = torch.tensor(rng.standard_normal(TINY), dtype=dtype, device=device)
    w = torch.tensor(0.1 * rng.standard_normal((1, 1, 3, 3)), dtype=dtype, device=device)
    opts = ("top-left", 1, True)
    kind = "cupy" if device.type == "cuda" else "numpy"
    backend = _backends.load(_backends.default_for(kind))
    if kind == "cupy":
        import cupy
        ya, wa = cupy.from_dlpack(y), cupy.from_dlpack(w)
    else:
        ya, wa = y.numpy(), w.numpy()
    conv = _api.make_conv(tuple(w.shape), corner="top-left", groups=1, unit_diagonal=True)

    def time_of(fn):
        return per_call_us(fn, sync, repeats, budget_s)

    public = time_of(lambda: it.inv_conv2d(y, w))
    if hasattr(it, "_call"):       # the fast path: the route choice, then the backend call
        routed = time_of(lambda: it._call(it.inv_conv2d_op, y, w, *opts))
        route = "route choice and autograd bookkeeping (_call)"
    else:                          # before it: the dispatched operator
        routed = time_of(lambda: it.inv_conv2d_op(y, w, *opts))
        route = "dispatcher, Autograd kernel, autograd.Function (the op)"
    exchanged = time_of(lambda: it._run("_solve", {"y": y}, w, *opts))
    prepared = time_of(lambda: _api._prepare({"y": ya}, wa, corner="top-left", groups=1,
                                              unit_diagonal=True, backend=None, stream=None,
                                              solve=True))
    solved = time_of(lambda: backend._solve(ya, wa, conv))
    array_api = time_of(lambda: invconv.inv_conv2d(ya, wa))
    return [
        {"layer": "torch option checks (inv_conv2d)", "us": public - routed},
        {"layer": route, "us": routed - exchanged},
        {"layer": "tensor <-> array exchange (_run)", "us": exchanged - prepared - solved},
        {"layer": "validation and backend choice (_api._prepare)", "us": prepared},
        {"layer": f"backend {_backends.default_for(kind)!r} _solve", "us": solved},
        {"layer": "total: invconv.torch.inv_conv2d", "us": public},
        {"layer": "for comparison: array API invconv.inv_conv2d", "us": array_api},
    ]


TRAINING_PRESETS = ("inverse-flow", "glow", "finc-flow", "emerging")


def training_steps(device, repeats, budget_s, presets=TRAINING_PRESETS, batch=100,
                   shape=(1, 28, 28)):
    """ms of one Adam training step (K = 4, L = 2, hidden 64, batch 100) per
    preset: eager, and on CUDA captured (:class:`invconv.capture.CapturedStep`)."""
    import torch

    from invconv import capture, flows

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    methods = ("eager", "graph") if device.type == "cuda" else ("eager",)
    for preset in presets:
        for method in methods:
            torch.manual_seed(0)
            model = flows.build(preset, shape, levels=2, steps=4, hidden=64).to(device)
            v = flows.dequantize(torch.randint(0, 256, (batch, *shape))).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4,
                                         capturable=method == "graph")
            step = _training_step(capture, model, optimizer, method)
            for _ in range(4):       # ActNorm's init, the warm-up, then the capture
                step(v)
            ms = per_call_us(lambda: step(v), sync, repeats, budget_s) / 1e3
            rows.append({"preset": preset, "method": method, "batch": batch, "ms": ms})
    glow = {r["method"]: r["ms"] for r in rows if r["preset"] == "glow"}
    for r in rows:
        r["ratio_to_glow"] = r["ms"] / glow[r["method"]] if r["method"] in glow else None
    return rows


def _training_step(capture, model, optimizer, method):
    """One step: CapturedStep, or what the CLI ran before it existed (the
    same operations, for timing older versions)."""
    def loss_fn(b):
        return -model.log_prob(b).mean()
    if hasattr(capture, "CapturedStep"):
        return capture.CapturedStep(loss_fn, model.parameters(), optimizer, 100.0, method=method)
    import torch

    def step(b):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(b).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        optimizer.step()
    return step


def run(shapes, k, device, dtype, repeats, budget_s, breakdown=True):
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for shape in shapes:
        ops = _ops(shape, k, device, dtype)
        times = {name: per_call_us(fn, sync, repeats, budget_s) for name, (fn, _) in ops.items()}
        for name, (_, yardstick) in ops.items():
            rows.append({"shape": list(shape), "k": k, "op": name, "us": times[name],
                         "yardstick": yardstick,
                         "ratio": None if yardstick is None else times[name] / times[yardstick]})
    layers = _breakdown(device, dtype, sync, repeats, budget_s) if breakdown else []
    return rows, layers


def markdown(rows, layers, env, steps=()):
    lines = [f"Per-call time, eager, host time included ({env['device']}, {env['dtype']}, "
             f"k = {rows[0]['k'] if rows else '?'}, torch {env['torch']}, {env['date']}): "
             f"median µs per call, ratio to torch's F.conv2d of the same shape.", "",
             "| shape | op | µs | ratio |", "|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {'×'.join(map(str, r['shape']))} | {r['op']} | {r['us']:.1f} | {ratio} |")
    if layers:
        lines += ["", f"Where one `invconv.torch.inv_conv2d` call on "
                      f"{'×'.join(map(str, TINY))} (k = 3) spends its time (differences of "
                      f"nested calls, so a layer can read slightly negative in noise):", "",
                  "| layer | µs |", "|---|---|"]
        lines += [f"| {layer['layer']} | {layer['us']:.1f} |" for layer in layers]
    if steps:
        lines += ["", f"One Adam training step (MNIST shape, K = 4, L = 2, hidden 64, batch "
                      f"{steps[0]['batch']}; graph: `invconv.capture.CapturedStep`, one "
                      f"CUDA-graph replay):", "",
                  "| preset | method | ms | ratio to glow |", "|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['method']} | {r['ms']:.2f} | "
                  f"{'' if r['ratio_to_glow'] is None else format(r['ratio_to_glow'], '.2f')} |"
                  for r in steps]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--kernel-size", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one tiny and one small shape, short")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--budget", type=float, default=1.0, help="seconds per row")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--training", action="store_true",
                   help="also time one training step of the flow presets")
    p.add_argument("--out", help="JSON file")
    p.add_argument("--markdown", help="markdown file")
    args = p.parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = [TINY] + (QUICK_SHAPES if args.quick else FLOW_SHAPES)
    repeats, budget = (3, 0.1) if args.quick else (args.repeats, args.budget)
    rows, layers = run(shapes, args.kernel_size, device, dtype, repeats, budget,
                       breakdown=not args.no_breakdown)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()}), "
                f"{torch.get_num_threads()} torch thread(s)",
           "dtype": args.dtype, "torch": torch.__version__, "python": sys.version.split()[0],
           "date": time.strftime("%Y-%m-%d")}
    steps = []
    if args.training:
        steps = training_steps(device, repeats, 5 * budget,
                               presets=("inverse-flow", "glow") if args.quick else TRAINING_PRESETS,
                               batch=8 if args.quick else 100)
    text = markdown(rows, layers, env, steps)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows, "layers": layers,
                       "training_steps": steps}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
