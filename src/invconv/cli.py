"""The ``invconv`` command line: train, evaluate and sample flows; classify; benchmark.

    invconv train --model inverse-flow --dataset mnist -K 4 -L 2 --epochs 1 --out runs/mnist
    invconv evaluate --checkpoint runs/mnist/checkpoint.pt
    invconv sample --checkpoint runs/mnist/checkpoint.pt --n 64 --temperature 0.7 --out grid.png
    invconv classify --epochs 5
    invconv bench --quick --out ops.json
    torchrun --nproc_per_node=2 -m invconv.cli train ...      # data-parallel (DDP)

Training is deterministic given ``--seed``: the data order of epoch e comes
from ``seed + e``, the dequantisation noise from a generator whose state is
checkpointed, so ``--resume`` continues exactly where the checkpoint was taken.
Checkpoints are written atomically after every epoch (and when ``--max-steps``
ends a run); a non-finite loss stops training with exit status 3 and leaves
the last good checkpoint in place.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import zlib

import numpy as np

CHECKPOINT = "checkpoint.pt"
EXIT_DIVERGED = 3


# --------------------------------------------------------------------------
# small utilities


def save_png(path, images):
    """Write a grid of images (N, C, H, W) in [0, 1] (C = 1 or 3) as an 8-bit PNG."""
    images = np.clip(np.asarray(images, dtype=np.float64), 0, 1)
    n, c, h, w = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((c, rows * (h + 2) + 2, cols * (w + 2) + 2))
    for k in range(n):
        r, q = divmod(k, cols)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = images[k]
    pixels = np.rint(grid * 255).astype(np.uint8).transpose(1, 2, 0)
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if c == 1 else 2, 0, 0, 0)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    os.replace(tmp, path)


class Progress:
    """A progress line on stderr (rewritten at most a few times a second)."""

    def __init__(self, total, label, enabled=True):
        self.total, self.label, self.enabled = total, label, enabled
        self.start = self.last = time.perf_counter()
        self.open = False

    def update(self, done, **fields):
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.5 and done < self.total):
            return
        self.last = now
        info = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in fields.items())
        print(f"\r{self.label} {done}/{self.total} {info}", end="", file=sys.stderr, flush=True)
        self.open = True
        if done >= self.total:
            self.close()

    def close(self):
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


def _atomic_torch_save(obj, path):
    import torch
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _device(name):
    import torch
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a no-op."""

    def __init__(self, device):
        import torch.distributed as dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self):
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.active:
            import torch.distributed as dist
            dist.destroy_process_group()


# --------------------------------------------------------------------------
# train


def _bpd_from_log_prob(log_prob, dims):
    return (-log_prob + dims * math.log(256.0)) / (dims * math.log(2.0))


def _test_bpd(model, images, batch_size, device, seed):
    """Mean test bits/dim, with fixed dequantisation noise (seeded)."""
    import torch
    from .flows import dequantize
    gen = torch.Generator().manual_seed(seed)
    dims = math.prod(images.shape[1:])
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            v = dequantize(images[start:start + batch_size], generator=gen).to(device)
            total += float(_bpd_from_log_prob(model.log_prob(v), dims).sum())
            count += len(v)
    model.train()
    return total / max(count, 1)


def _model_kwargs(args):
    kw = dict(levels=args.L, steps=args.K, hidden=args.hidden, kernel_size=args.kernel_size,
              logit=args.logit, learn_diagonal=args.learn_diagonal)
    return kw


def _load_images(name, split, root, limit):
    import torch
    from . import data
    images, labels = data.load(name, split, root=root)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.asarray(labels))


def train(args):
    import torch
    from . import flows

    device = _device(args.device)
    dist = _Dist(device)
    main = dist.rank == 0
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    train_x, _ = _load_images(args.dataset, "train", args.data_root, args.limit_train)
    test_x, _ = _load_images(args.dataset, "test", args.data_root, args.limit_test)
    shape = tuple(train_x.shape[1:])
    dims = math.prod(shape)
    model = flows.build(args.model, shape, **_model_kwargs(args)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    decay = args.lr_decay_epochs or (25 if args.dataset == "cifar10" else 50)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay, gamma=0.1)
    noise = torch.Generator().manual_seed(args.seed * 1000 + dist.rank)
    state = dict(epoch=0, step_in_epoch=0, global_step=0, history=[])

    path = os.path.join(args.out, CHECKPOINT)
    if args.resume and os.path.exists(path):
        ckpt = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        noise.set_state(ckpt["noise_state"][dist.rank])
        state = ckpt["state"]
        if main:
            print(f"resumed from {path} at epoch {state['epoch']} step {state['global_step']}")

    net = model
    if dist.active:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    per_rank = len(train_x) // dist.world
    steps_per_epoch = per_rank // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {per_rank} "
                         f"training images per process")
    fault_at = int(os.environ.get("INVCONV_FAULT_AT_STEP", "0"))  # testing aid: simulate a crash

    def checkpoint():
        noise_states = [noise.get_state()]
        if dist.active:
            gathered = [None] * dist.world
            torch.distributed.all_gather_object(gathered, noise.get_state())
            noise_states = gathered
        if main:
            _atomic_torch_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                    scheduler=scheduler.state_dict(), noise_state=noise_states,
                                    state=state, config=dict(model=args.model, dataset=args.dataset,
                                                             input_shape=shape,
                                                             kwargs=_model_kwargs(args))),
                               path)
            _atomic_json(dict(config={k: v for k, v in vars(args).items() if k != "func"},
                              history=state["history"],
                              world_size=dist.world), os.path.join(args.out, "metrics.json"))

    stop = False
    while state["epoch"] < args.epochs and not stop:
        epoch = state["epoch"]
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed + epoch))
        order = order[:per_rank * dist.world][dist.rank::dist.world]
        progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", enabled=main)
        t0, seen, loss = time.perf_counter(), 0, None
        model.train()
        for step in range(state["step_in_epoch"], steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            v = flows.dequantize(train_x[idx], generator=noise).to(device)
            loss = _bpd_from_log_prob(net(v), dims).mean()
            if not torch.isfinite(loss):
                progress.close()
                print(f"error: non-finite loss ({loss.item()}) at epoch {epoch + 1} step "
                      f"{step + 1}; training stopped, the last good checkpoint is kept in "
                      f"{path}", file=sys.stderr)
                dist.close()
                raise SystemExit(EXIT_DIVERGED)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            state["global_step"] += 1
            state["step_in_epoch"] = step + 1
            seen += len(idx) * dist.world
            if fault_at and state["global_step"] == fault_at:
                os._exit(137)
            progress.update(step + 1, bpd=loss.item(), grad_norm=grad_norm.item(),
                            img_per_s=seen / (time.perf_counter() - t0))
            if args.max_steps and state["global_step"] >= args.max_steps:
                stop = True
                break
        progress.close()
        if state["step_in_epoch"] >= steps_per_epoch:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            scheduler.step()
        test_bpd = _test_bpd(model, test_x, args.batch_size, device, args.seed)
        record = dict(epoch=epoch + 1, global_step=state["global_step"], test_bpd=test_bpd,
                      train_bpd=None if loss is None else loss.item(),
                      lr=optimizer.param_groups[0]["lr"],
                      seconds=time.perf_counter() - t0)
        state["history"].append(record)
        if main:
            print(f"epoch {epoch + 1}: test bits/dim {test_bpd:.4f} "
                  f"(last train step {record['train_bpd'] or float('nan'):.4f}, "
                  f"{record['seconds']:.1f} s)", flush=True)
        checkpoint()
        if main:
            with torch.no_grad():
                samples = model.sample(64, temperature=args.temperature,
                                       generator=torch.Generator().manual_seed(args.seed))
            save_png(os.path.join(args.out, "samples.png"), samples.float().cpu().numpy())
    if dist.active:   # lets a launcher (and the tests) check that the ranks agree
        flat = torch.cat([p.detach().double().reshape(-1).cpu() for p in model.parameters()])
        print(f"rank {dist.rank} parameter checksum {float(flat.sum()):.12e} "
              f"{float(flat.abs().sum()):.12e}", flush=True)
    dist.barrier()
    dist.close()
    if main and state["history"]:
        print(f"final test bits/dim {state['history'][-1]['test_bpd']:.4f}")


# --------------------------------------------------------------------------
# evaluate / sample


def _load_checkpoint(path, device):
    import torch
    from . import flows
    ckpt = torch.load(path, map_location=device, weights_only=False)
    cfg = ckpt["config"]
    model = flows.build(cfg["model"], cfg["input_shape"], **cfg["kwargs"]).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg


def _time(fn, device, runs, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.mean(times)), float(np.std(times))


def evaluate(args):
    import torch
    from .flows import dequantize
    device = _device(args.device)
    model, cfg = _load_checkpoint(args.checkpoint, device)
    test_x, _ = _load_images(cfg["dataset"], "test", args.data_root, args.limit_test)
    bpd = _test_bpd(model, test_x, args.batch_size, device, seed=0)
    with torch.no_grad():
        sample_ms = _time(lambda: model.sample(100, captured=True), device, runs=5)
        batch = dequantize(test_x[torch.arange(100) % len(test_x)]).to(device)
        forward_ms = _time(lambda: model.log_prob(batch, captured=True), device, runs=10)
    result = dict(checkpoint=args.checkpoint, model=cfg["model"], dataset=cfg["dataset"],
                  test_bpd=bpd, test_images=len(test_x),
                  parameters=sum(p.numel() for p in model.parameters()),
                  sampling_ms_100=sample_ms[0], sampling_ms_std=sample_ms[1],
                  forward_ms_batch100=forward_ms[0], forward_ms_std=forward_ms[1],
                  device=str(device))
    print(json.dumps(result, indent=1))
    return result


def sample(args):
    import torch
    device = _device(args.device)
    model, _ = _load_checkpoint(args.checkpoint, device)
    gen = torch.Generator(device=device).manual_seed(args.seed) if device.type == "cuda" else \
        torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        images = model.sample(args.n, temperature=args.temperature, generator=gen, captured=True)
    save_png(args.out, images.float().cpu().numpy())
    print(f"wrote {args.n} samples to {args.out}")


# --------------------------------------------------------------------------
# classify (the paper's section 10)


def classify(args):
    import torch
    from .torch import InvConv2d
    device = _device(args.device)
    torch.manual_seed(args.seed)
    train_x, train_y = _load_images("mnist", "train", args.data_root, args.limit_train)
    test_x, test_y = _load_images("mnist", "test", args.data_root, args.limit_test)
    activation = {"none": torch.nn.Identity, "relu": torch.nn.ReLU,
                  "tanh": torch.nn.Tanh}[args.activation]
    # Two 3x3 single-channel inverse convolutions (8 free taps each with the
    # unit diagonal: 16 parameters) and one fully connected layer.
    class FirstOutput(torch.nn.Module):   # a flow layer's output without its logabsdet
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)[0]

    model = torch.nn.Sequential(
        FirstOutput(InvConv2d(1, 3, init_std=0.1)), activation(),
        FirstOutput(InvConv2d(1, 3, init_std=0.1)), activation(),
        torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x), generator=gen)
        model.train()
        progress = Progress(len(order) // args.batch_size, f"epoch {epoch + 1}/{args.epochs}")
        for step in range(len(order) // args.batch_size):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = (train_x[idx].float() / 255.0).to(device)
            loss = torch.nn.functional.cross_entropy(model(x), train_y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.update(step + 1, loss=loss.item())
        progress.close()
        accuracy = _accuracy(model, test_x, test_y, device)
        print(f"epoch {epoch + 1}: test accuracy {accuracy:.4f}", flush=True)
    inv_params = sum(p.numel() for m in model.modules() if isinstance(m, InvConv2d)
                     for p in m.parameters())
    print(json.dumps(dict(test_accuracy=accuracy, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, activation=args.activation,
                          inv_conv_free_taps=inv_params - 2)))  # the two ignored diagonal taps
    return accuracy


def _accuracy(model, x, y, device, batch=1000):
    import torch
    correct = 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(x), batch):
            pred = model((x[s:s + batch].float() / 255.0).to(device)).argmax(1)
            correct += int((pred.cpu() == y[s:s + batch]).sum())
    return correct / len(x)


# --------------------------------------------------------------------------
# main


def _parser():
    p = argparse.ArgumentParser(prog="invconv", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a flow")
    t.add_argument("--model", default="inverse-flow",
                   choices=["inverse-flow", "finc-flow", "glow", "snf-small", "emerging",
                            "snf-small-emerging"])
    t.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "cifar10"])
    t.add_argument("-K", type=int, default=4, help="flow steps per level (default 4)")
    t.add_argument("-L", type=int, default=2, help="levels (default 2)")
    t.add_argument("--hidden", type=int, default=64, help="coupling channels (default 64)")
    t.add_argument("--kernel-size", type=int, default=3)
    t.add_argument("--learn-diagonal", action="store_true",
                   help="learn the k x k layers' diagonal (default: unit, volume preserving)")
    t.add_argument("--logit", type=float, default=None, metavar="ALPHA",
                   help="logit pre-processing with this alpha (default: none)")
    t.add_argument("--batch-size", type=int, default=100)
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lr-decay-epochs", type=int, default=None,
                   help="divide the learning rate by 10 every this many epochs "
                        "(default 50, 25 for cifar10: the paper's schedule)")
    t.add_argument("--clip", type=float, default=100.0, help="gradient-norm clipping threshold")
    t.add_argument("--temperature", type=float, default=0.7, help="of the sample grid")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="directory for checkpoint, metrics and samples")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    t.add_argument("--limit-train", type=int, default=None, help="use the first N training images")
    t.add_argument("--limit-test", type=int, default=None, help="use the first N test images")
    t.add_argument("--data-root", default=None, help="dataset directory (see invconv.data)")
    t.set_defaults(func=train)

    e = sub.add_parser("evaluate", help="test bits/dim, parameters, sampling and forward time")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--limit-test", type=int, default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--data-root", default=None)
    e.set_defaults(func=evaluate)

    s = sub.add_parser("sample", help="write a grid of samples as PNG")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.set_defaults(func=sample)

    c = sub.add_parser("classify", help="the paper's 2 inverse-conv + 1 FC MNIST classifier")
    c.add_argument("--epochs", type=int, default=5)
    c.add_argument("--batch-size", type=int, default=100)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--activation", default="none", choices=["none", "relu", "tanh"])
    c.add_argument("--limit-train", type=int, default=None)
    c.add_argument("--limit-test", type=int, default=None)
    c.add_argument("--device", default=None)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--data-root", default=None)
    c.set_defaults(func=classify)
    # Listed for --help; main() hands its arguments to invconv.benchmarks.
    sub.add_parser("bench", add_help=False,
                   help="op-level benchmarks (invconv bench --help for options)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from . import benchmarks
        benchmarks.main(argv[1:])
        return 0
    args = _parser().parse_args(argv)
    from . import data
    try:
        args.func(args)
    except data.DatasetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    return 0


if __name__ == "__main__":
    main()
