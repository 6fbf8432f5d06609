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
Checkpoints are written atomically every ``--checkpoint-every`` steps, after
every epoch, when ``--max-steps`` ends a run and when SIGINT or SIGTERM stops
one (exit status 130).  A non-finite loss stops training with exit status 3
and leaves the last good checkpoint in place.  A checkpoint holds only
tensors, numbers, strings, lists and dicts and is read with
``torch.load(weights_only=True)``, so loading one never runs code.

A mistake in the options or files is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pickle
import signal
import struct
import sys
import threading
import time
import zlib

import numpy as np

from . import __version__

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
METRICS = "metrics.json"
SAMPLES = "samples.png"
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
CHECKPOINT_EVERY = 200
NEEDS_TORCH = ("train", "evaluate", "sample", "classify")

# Options that define a training run (``dest`` names).  Not given, they take
# these values, or with ``--resume`` the run's own; given with ``--resume``,
# they must agree with the run.
RUN_DEFAULTS = dict(model="inverse-flow", dataset="mnist", batch_size=100, lr=1e-3,
                    lr_decay_epochs=None, clip=100.0, seed=0, limit_train=None)
# Taken from the run on --resume when not given, but free to change.
KEPT_ON_RESUME = dict(limit_test=None, temperature=0.7, data_root=None)
# Model options: InverseFlow keyword -> (dest, flag).  Not given, each preset
# keeps its own value.
MODEL_OPTIONS = {"steps": ("K", "-K"), "levels": ("L", "-L"), "hidden": ("hidden", "--hidden"),
                 "kernel_size": ("kernel_size", "--kernel-size"),
                 "learn_diagonal": ("learn_diagonal", "--learn-diagonal"),
                 "logit": ("logit", "--logit")}
# Format 1 checkpoints recorded every model option, also those their preset ignored.
_FORMAT1_IGNORED = {"snf-small": ("levels", "steps", "hidden"),
                    "glow": ("kernel_size", "learn_diagonal")}


class UsageError(Exception):
    """A mistake in a command's options or files: one line on stderr, exit status 2."""


def _one_line(exc, limit=200):
    """An exception's message on one line, cut to ``limit`` characters (None: uncut)."""
    text = " ".join(str(exc).split())
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------
# small utilities


def save_png(path, images):
    """Write a grid of images (N, C, H, W) in [0, 1] (C = 1 or 3) as an 8-bit PNG."""
    # A NaN pixel (a diverging sample) is drawn black rather than cast to garbage.
    images = np.clip(np.nan_to_num(np.asarray(images, dtype=np.float64), nan=0.0), 0, 1)
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
    """``--device`` as a torch.device (default: cuda if available), checked to exist."""
    import torch
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name}: {_one_line(exc)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: torch sees no CUDA device here "
                             f"(torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} "
                             f"CUDA devices (0..{torch.cuda.device_count() - 1})")
    return device


def _generator(device, seed):
    """A generator seeded with ``seed`` on ``device``: torch draws only from a generator
    on the device the numbers are drawn on."""
    import torch
    return torch.Generator(device=device).manual_seed(seed)


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
        self.device = device
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def any(self, flag):
        """Whether ``flag`` is true on any rank (every rank must call this)."""
        if not self.active:
            return bool(flag)
        import torch
        import torch.distributed as dist
        t = torch.tensor([int(bool(flag))], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self):
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.active:
            import torch.distributed as dist
            dist.destroy_process_group()


class _StopRequest:
    """Turns the first SIGINT or SIGTERM into a request to stop at the next step.

    A second one gets the previous handler (for SIGINT: KeyboardInterrupt, an
    immediate stop).  Handlers can only be set in the main thread; elsewhere
    this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce=True):
        self.signum, self.announce, self.previous = None, announce, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])
        if self.announce:   # os.write: print() may be in the middle of writing stderr
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and writing "
                        f"a checkpoint (again to abort)\n".encode())

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
        return False

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None


# --------------------------------------------------------------------------
# checkpoints


def _read_checkpoint(path, device, option):
    """The dict in an invconv training checkpoint (a directory means its checkpoint.pt).

    Read with ``torch.load(weights_only=True)``: only tensors, numbers,
    strings, lists, tuples and dicts are rebuilt, by torch's allow-listed
    functions, and no other code runs.  Any
    problem is a :class:`UsageError` naming ``option``.  Returns ``(ckpt, path)``.
    """
    import torch
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CHECKPOINT)):
            raise UsageError(f"{option} {path}: a directory without {CHECKPOINT}")
        path = os.path.join(path, CHECKPOINT)
    if not os.path.exists(path):
        raise UsageError(f"{option} {path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot be read ({exc.strerror})") from None
    if not head:
        raise UsageError(f"{option} {path}: the file is empty")
    if head != b"PK\x03\x04":   # torch.save writes a zip archive
        raise UsageError(f"{option} {path}: not a checkpoint (not a file written by torch.save)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise UsageError(f"{option} {path}: refused: it holds objects other than tensors, "
                             f"numbers, strings, lists and dicts, and loading those could run "
                             f"code") from None
        raise UsageError(f"{option} {path}: damaged ({_one_line(exc)})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise UsageError(f"{option} {path}: truncated or damaged ({_one_line(exc)})") from None
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not (isinstance(cfg, dict) and isinstance(ckpt.get("model"), dict)
            and all(k in cfg for k in ("model", "dataset", "input_shape", "kwargs"))):
        kind = (f"a dict with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict)
                else f"a {type(ckpt).__name__}")
        raise UsageError(f"{option} {path}: not an invconv training checkpoint ({kind}; "
                         f"expected the {CHECKPOINT} that invconv train writes)")
    return ckpt, path


def _recorded_kwargs(ckpt):
    """The model options a checkpoint's model was built with (explicit ones only)."""
    cfg = ckpt["config"]
    kwargs = dict(cfg["kwargs"])
    if ckpt.get("format", 1) < 2:
        for name in _FORMAT1_IGNORED.get(cfg["model"], ()):
            kwargs.pop(name, None)
    return kwargs


def _build_model(name, shape, kwargs, what):
    from . import flows
    try:
        return flows.build(name, shape, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{what}: cannot build --model {name} for input {tuple(shape)}: "
                         f"{_one_line(exc)}") from None


def _load_weights(model, state_dict, path):
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: its weights do not fit the model its config describes "
                         f"({_one_line(exc)})") from None


def _load_checkpoint(path, device, option="--checkpoint"):
    """The model of a training checkpoint, in eval mode, and its config."""
    ckpt, path = _read_checkpoint(path, device, option)
    cfg = ckpt["config"]
    model = _build_model(cfg["model"], cfg["input_shape"], _recorded_kwargs(ckpt), path)
    model = model.to(device)
    _load_weights(model, ckpt["model"], path)
    from .flows import ActNorm
    if any(isinstance(m, ActNorm) and not bool(m.initialized) for m in model.modules()):
        # A run stopped before its first step (Ctrl-C right after starting)
        # has a checkpoint, but its ActNorm layers were never initialised.
        raise UsageError(f"{option} {path}: the run was stopped before its first training "
                         f"step, so there is no trained model yet; continue it with "
                         f"invconv train --out {os.path.dirname(path) or '.'} --resume")
    model.eval()
    return model, cfg


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
    """The model options given on the command line (the preset supplies the others)."""
    return {key: getattr(args, dest) for key, (dest, _) in MODEL_OPTIONS.items()
            if getattr(args, dest, None) is not None}


def _run_options(args, recorded):
    """The run's options: the recorded run's (on resume), else given, else the defaults.

    ``recorded`` is the ``run`` dict of the checkpoint being resumed, or None;
    a given option of :data:`KEPT_ON_RESUME` replaces the recorded one.
    Returns ``(options, differing)``, ``differing`` naming each given option
    of :data:`RUN_DEFAULTS` that disagrees with the recorded run as
    ``(flag, recorded, given)``.
    """
    options, differing = {}, []
    for dest, default in {**RUN_DEFAULTS, **KEPT_ON_RESUME}.items():
        given = getattr(args, dest)
        kept = recorded is not None and dest in recorded
        if kept and dest in RUN_DEFAULTS and given is not None and given != recorded[dest]:
            differing.append((_flag(dest), recorded[dest], given))
        options[dest] = (recorded[dest] if kept and (given is None or dest in RUN_DEFAULTS)
                         else default if given is None else given)
    if options["lr_decay_epochs"] is None:   # the paper's schedule
        options["lr_decay_epochs"] = 25 if options["dataset"] == "cifar10" else 50
    return options, differing


def _flag(dest):
    return "--" + dest.replace("_", "-")


def _architecture(model, kwargs):
    """Every model option's value as built (the preset's where not given)."""
    config = getattr(model, "config", None)
    resolved = dict(config) if isinstance(config, dict) else {}
    resolved.update(kwargs)
    return {key: resolved.get(key) for key in MODEL_OPTIONS}


def _load_images(name, split, root, limit):
    import torch
    from . import data
    images, labels = data.load(name, split, root=root)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.asarray(labels))


def _prepare_out(args):
    """Check ``--out`` against ``--resume``/``--overwrite``; returns the checkpoint path."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: a file, not a directory")
    path = os.path.join(out, CHECKPOINT)
    used = [name for name in (CHECKPOINT, METRICS) if os.path.exists(os.path.join(out, name))]
    if args.resume and not os.path.isfile(path):
        raise UsageError(f"--resume: there is no {path} to continue (leave out --resume "
                         f"to start a new run)")
    if used and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} already holds a run ({', '.join(used)}); add --resume "
                         f"to continue it or --overwrite to replace it")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    return path


def train(args):
    from .data import DatasetMissing
    created = not os.path.exists(args.out)
    path = _prepare_out(args)
    try:
        device = _device(args.device)
        with _StopRequest(announce=int(os.environ.get("RANK", "0")) == 0) as stop_request:
            _train(args, path, device, stop_request)
    except (UsageError, DatasetMissing, KeyboardInterrupt):
        if created:   # a mistake or an early Ctrl-C leaves no empty run directory behind
            try:
                os.rmdir(args.out)
            except OSError:   # not empty (another rank wrote to it) or already gone
                pass
        raise


def _train(args, path, device, stop_request):
    import torch
    from . import flows

    ckpt = _read_checkpoint(path, device, "--resume")[0] if args.resume else None
    recorded = ckpt["config"].get("run") if ckpt is not None else None
    run, differing = _run_options(args, recorded)
    given_kwargs = _model_kwargs(args)
    kwargs = _recorded_kwargs(ckpt) if ckpt is not None else given_kwargs

    dist = _Dist(device)
    main = dist.rank == 0
    torch.manual_seed(run["seed"])
    np.random.seed(run["seed"])

    train_x, _ = _load_images(run["dataset"], "train", run["data_root"], run["limit_train"])
    test_x, _ = _load_images(run["dataset"], "test", run["data_root"], run["limit_test"])
    shape = tuple(train_x.shape[1:])
    dims = math.prod(shape)
    model = _build_model(run["model"], shape, kwargs, "train")
    architecture = _architecture(model, kwargs)
    if ckpt is not None:
        differing += [(MODEL_OPTIONS[key][1], architecture[key], value)
                      for key, value in given_kwargs.items() if value != architecture[key]]
        if differing:
            raise UsageError(
                f"--resume: the run in {args.out} has "
                + ", ".join(f"{flag} {old}" for flag, old, _ in differing)
                + "; this command gives " + ", ".join(f"{flag} {new}" for flag, _, new in differing)
                + " (leave those options out to continue the run, or use --overwrite)")
    model = model.to(device)
    captured = bool(args.captured) and device.type == "cuda" and not dist.active
    if args.captured and not captured and main:
        print(f"note: --captured needs one process on a CUDA device; training eagerly on "
              f"{device}{' with ' + str(dist.world) + ' processes' if dist.active else ''}",
              file=sys.stderr, flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=run["lr"], capturable=captured)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=run["lr_decay_epochs"],
                                                gamma=0.1)
    noise = torch.Generator().manual_seed(run["seed"] * 1000 + dist.rank)
    state = dict(epoch=0, step_in_epoch=0, global_step=0, history=[])

    per_rank = len(train_x) // dist.world
    steps_per_epoch = per_rank // run["batch_size"]
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {run['batch_size']} is larger than the {per_rank} "
                         f"training images per process")
    if ckpt is not None:
        _load_weights(model, ckpt["model"], path)
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_capturable(optimizer, captured)   # the checkpoint's run may have differed
        scheduler.load_state_dict(ckpt["scheduler"])
        if len(ckpt["noise_state"]) != dist.world:
            raise UsageError(f"--resume: the run in {args.out} used {len(ckpt['noise_state'])} "
                             f"processes, this one {dist.world}")
        noise.set_state(ckpt["noise_state"][dist.rank].cpu())
        state = ckpt["state"]
    if args.overwrite and main:   # only now: a mistake found above keeps the old run
        for name in (CHECKPOINT, METRICS, SAMPLES):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    if main:
        what = (f"resuming at epoch {state['epoch'] + 1} step {state['step_in_epoch']} "
                f"(global step {state['global_step']})" if ckpt is not None else "training")
        print(f"{what}: {run['model']} on {run['dataset']} ({len(train_x)} images, "
              f"{steps_per_epoch} steps/epoch) on {device}; run directory "
              f"{os.path.abspath(args.out)}", flush=True)

    net = model
    if dist.active:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    fault_at = int(os.environ.get("INVCONV_FAULT_AT_STEP", "0"))  # testing aid: simulate a crash
    if captured:
        from .capture import CapturedStep
        captured_step = CapturedStep(lambda v: _bpd_from_log_prob(net(v), dims).mean(),
                                     model.parameters(), optimizer, run["clip"])

    def checkpoint():
        noise_states = [noise.get_state()]
        if dist.active:
            gathered = [None] * dist.world
            torch.distributed.all_gather_object(gathered, noise.get_state())
            noise_states = gathered
        if main:
            config = dict(model=run["model"], dataset=run["dataset"], input_shape=list(shape),
                          kwargs=kwargs, architecture=architecture, run=run)
            _atomic_torch_save(dict(format=CHECKPOINT_FORMAT, model=model.state_dict(),
                                    optimizer=optimizer.state_dict(),
                                    scheduler=scheduler.state_dict(), noise_state=noise_states,
                                    state=state, config=config), path)
            options = {k: v for k, v in vars(args).items() if k != "func"}
            _atomic_json(dict(config={**options, **run, "architecture": architecture},
                              history=state["history"], world_size=dist.world),
                         os.path.join(args.out, METRICS))

    def reached_max_steps():
        return bool(args.max_steps) and state["global_step"] >= args.max_steps

    while state["epoch"] < args.epochs and not reached_max_steps():
        epoch = state["epoch"]
        order = torch.randperm(len(train_x),
                               generator=torch.Generator().manual_seed(run["seed"] + epoch))
        order = order[:per_rank * dist.world][dist.rank::dist.world]
        first = state["step_in_epoch"]
        last = steps_per_epoch
        if args.max_steps:
            last = min(last, first + args.max_steps - state["global_step"])
        progress = Progress(last, f"epoch {epoch + 1}/{args.epochs}", enabled=main)
        t0, seen, loss = time.perf_counter(), 0, None
        model.train()
        for step in range(first, steps_per_epoch):
            if dist.any(stop_request.signum is not None):
                progress.close()
                checkpoint()
                if main:
                    print(f"interrupted ({stop_request.name or 'signal on another rank'}) at "
                          f"epoch {epoch + 1} step {step}/{steps_per_epoch} (global step "
                          f"{state['global_step']}); checkpoint written to {path}; continue "
                          f"with the same command and --resume", file=sys.stderr, flush=True)
                dist.close()
                raise SystemExit(EXIT_INTERRUPTED)
            idx = order[step * run["batch_size"]:(step + 1) * run["batch_size"]]
            v = flows.dequantize(train_x[idx], generator=noise).to(device)
            if captured:
                # the step is taken whatever the loss; on a non-finite one the
                # model is dropped below and the last good checkpoint kept
                loss, grad_norm = captured_step(v)
            else:
                loss = _bpd_from_log_prob(net(v), dims).mean()
            if not torch.isfinite(loss):
                progress.close()
                print(f"error: non-finite loss ({loss.item()}) at epoch {epoch + 1} step "
                      f"{step + 1}; training stopped, the last good checkpoint is kept in "
                      f"{path}", file=sys.stderr)
                dist.close()
                raise SystemExit(EXIT_DIVERGED)
            if not captured:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run["clip"])
                optimizer.step()
            state["global_step"] += 1
            state["step_in_epoch"] = step + 1
            seen += len(idx) * dist.world
            if fault_at and state["global_step"] == fault_at:
                os._exit(137)
            progress.update(step + 1, bpd=loss.item(), grad_norm=grad_norm.item(),
                            img_per_s=seen / (time.perf_counter() - t0))
            if reached_max_steps():
                break
            if (args.checkpoint_every and state["global_step"] % args.checkpoint_every == 0
                    and step + 1 < steps_per_epoch):   # the epoch's end writes one anyway
                checkpoint()
        progress.close()
        if state["step_in_epoch"] >= steps_per_epoch:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            scheduler.step()
        test_bpd = _test_bpd(model, test_x, run["batch_size"], device, run["seed"])
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
                samples = model.sample(64, temperature=run["temperature"],
                                       generator=_generator(device, run["seed"]))
            save_png(os.path.join(args.out, SAMPLES), samples.float().cpu().numpy())
    if dist.active:   # lets a launcher (and the tests) check that the ranks agree
        flat = torch.cat([p.detach().double().reshape(-1).cpu() for p in model.parameters()])
        # One write per line: the ranks share stdout, and print() writes the
        # newline separately when Python runs unbuffered.
        sys.stdout.write(f"rank {dist.rank} parameter checksum {float(flat.sum()):.12e} "
                         f"{float(flat.abs().sum()):.12e}\n")
        sys.stdout.flush()
    dist.barrier()
    dist.close()
    if main and state["history"]:
        print(f"final test bits/dim {state['history'][-1]['test_bpd']:.4f}; run directory "
              f"{os.path.abspath(args.out)}")


def _set_capturable(optimizer, capturable):
    """Adam's ``capturable`` for this run, whatever the loaded checkpoint's run
    used, with each step counter where that mode keeps it (on the parameter's
    device when capturable, on the CPU otherwise)."""
    import torch
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = (state["step"].to(device=p.device, dtype=torch.float32)
                                 if capturable else state["step"].cpu())


# --------------------------------------------------------------------------
# evaluate / sample


def _time(fn, device, runs):
    """(mean, std) ms of ``runs`` device-synchronised calls after warm-up."""
    from .benchmarks import wall_times_ms
    times = wall_times_ms(fn, device, runs)
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


def _check_output_file(path, option="--out"):
    """A file path whose directory exists and which is not itself a directory."""
    if not path:
        raise UsageError(f"{option} is empty; give the path of the file to write")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: a directory; give the path of the file to write")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{option} {path}: the directory {directory} does not exist")


def sample(args):
    import torch
    _check_output_file(args.out)
    device = _device(args.device)
    model, _ = _load_checkpoint(args.checkpoint, device)
    with torch.no_grad():
        images = model.sample(args.n, temperature=args.temperature,
                              generator=_generator(device, args.seed), captured=True)
    images = images.float().cpu().numpy()
    try:
        save_png(args.out, images)
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot write ({exc.strerror})") from None
    print(f"wrote {args.n} samples to {args.out}")
    diverged = int((~np.isfinite(images.reshape(len(images), -1)).all(axis=1)).sum())
    if diverged:
        print(f"note: {diverged} of {args.n} samples are not finite (drawn black): the model "
              f"is undertrained or --temperature {args.temperature:g} is too high")


# --------------------------------------------------------------------------
# demo: the inverse of a convolution, to look at


def _demo_images(size):
    """Four smooth RGB test pictures, (4, 3, size, size) in [0, 1]."""
    t = np.linspace(-1, 1, size)
    y, x = np.meshgrid(t, t, indexing="ij")
    r = np.hypot(x, y)
    rings = np.stack([0.5 + 0.5 * np.cos(12 * r), 0.5 + 0.5 * np.cos(12 * r + 2),
                      0.5 + 0.5 * np.cos(12 * r + 4)])
    checks = ((np.floor(4 * (x + 1)) + np.floor(4 * (y + 1))) % 2).astype(float)
    squares = np.stack([checks, 0.3 + 0.4 * checks * (x > 0), 1 - checks])
    shapes = np.stack([(r < 0.6).astype(float), (np.maximum(abs(x), abs(y)) < 0.35).astype(float),
                       0.5 + 0.5 * y])
    blobs = sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.05) * np.array(c)[:, None, None]
                for cx, cy, c in [(-0.5, -0.4, (1, 0.2, 0.2)), (0.4, -0.3, (0.2, 1, 0.3)),
                                  (0.0, 0.5, (0.2, 0.4, 1)), (0.5, 0.5, (1, 1, 0.2))])
    return np.clip(np.stack([rings, squares, shapes, blobs]), 0, 1)


def demo(args):
    """Smear pictures with a masked convolution, undo it exactly with its inverse."""
    from . import _backends, conv2d, inv_conv2d, reference
    _check_output_file(args.out)
    k, C = args.kernel_size, 3
    x = _demo_images(args.size)
    # Every tap of the smear is positive and, with the unit diagonal, they sum
    # to 1 + strength per output: a visible blur towards the bottom right that
    # stays invertible without growth (strength < 1).
    weight = np.full((C, C, k, k), args.strength / (C * k * k - 1))
    y = conv2d(x, weight)
    start = time.perf_counter()
    x_back = inv_conv2d(y, weight)
    seconds = time.perf_counter() - start
    error = float(np.abs(x_back - x).max())
    start = time.perf_counter()
    x_ref = reference.inv_conv2d(y, weight)
    ref_seconds = time.perf_counter() - start
    try:
        save_png(args.out, np.concatenate([x, y / (1 + args.strength), x_back]))
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot write ({exc.strerror})") from None
    backend = _backends.default_for("numpy")
    print(f"smeared {len(x)} pictures of {C}x{args.size}x{args.size} with a {k}x{k} masked "
          f"convolution (top row: original; middle: convolved; bottom: inv_conv2d of the middle)")
    print(f"max |inv_conv2d(conv2d(x)) - x| = {error:.1e}  (float64)")
    print(f"inverse: {seconds * 1e3:.1f} ms on the {backend!r} backend, "
          f"{ref_seconds * 1e3:.1f} ms by the SciPy reference "
          f"(which agrees to {float(np.abs(x_ref - x_back).max()):.1e})")
    print(f"wrote {args.out}")


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
    if len(train_x) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(train_x)} "
                         f"training images")
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


class _Parser(argparse.ArgumentParser):
    """Reports a usage mistake as one line (no usage block) with exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` unless the help says it already or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.required:
            return text
        return text + " (default: %(default)s)"


def _at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def _float_in(low, high=math.inf, *, low_open=True, high_open=True):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = ((value > low if low_open else value >= low)
              and (value < high if high_open else value <= high))
        if not ok or math.isnan(value):
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lo}{low:g}, {high:g}{hi}, got {text}")
        return value
    return parse


POSITIVE = _at_least(1)
NON_NEGATIVE = _at_least(0)
POSITIVE_FLOAT = _float_in(0.0)


def _parser():
    p = _Parser(prog="invconv", description=__doc__.split("\n\n")[0],
                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    kw = dict(formatter_class=_HelpFormatter)

    t = sub.add_parser("train", help="train a flow", **kw, description=(
        "Train a flow; checkpoint, metrics.json and samples.png go to --out. Options marked * "
        "define the run: with --resume they default to the run's own values and, when given, "
        "must agree with them; those marked + default to the run's values too but may change."))
    t.add_argument("--model", default=None, choices=["inverse-flow", "finc-flow", "glow",
                                                     "snf-small", "emerging", "snf-small-emerging"],
                   help="* preset (default: inverse-flow)")
    t.add_argument("--dataset", default=None, choices=["mnist", "fashion-mnist", "cifar10"],
                   help="* training data (default: mnist)")
    t.add_argument("-K", type=POSITIVE, default=None,
                   help="* flow steps per level (default: 4; snf-small: 3)")
    t.add_argument("-L", type=POSITIVE, default=None,
                   help="* levels (default: 2; snf-small: 3)")
    t.add_argument("--hidden", type=POSITIVE, default=None,
                   help="* channels of the coupling networks (default: 64; "
                        "not for snf-small, which has no couplings)")
    t.add_argument("--kernel-size", type=POSITIVE, default=None,
                   help="* size of the k x k masked convolution (default: 3; not for glow)")
    t.add_argument("--learn-diagonal", action=argparse.BooleanOptionalAction, default=None,
                   help="* learn the k x k layers' diagonal (default: off, volume preserving; "
                        "on for snf-small)")
    t.add_argument("--logit", type=_float_in(0.0, 0.5), default=None, metavar="ALPHA",
                   help="* logit pre-processing with this alpha in (0, 0.5) (default: none)")
    t.add_argument("--batch-size", type=POSITIVE, default=None,
                   help="* images per step and process (default: 100)")
    t.add_argument("--epochs", type=POSITIVE, default=100, help="epochs in all")
    t.add_argument("--lr", type=POSITIVE_FLOAT, default=None,
                   help="* Adam learning rate (default: 0.001)")
    t.add_argument("--lr-decay-epochs", type=POSITIVE, default=None,
                   help="* divide the learning rate by 10 every this many epochs "
                        "(default: 50, 25 for cifar10: the paper's schedule)")
    t.add_argument("--clip", type=POSITIVE_FLOAT, default=None,
                   help="* gradient-norm clipping threshold (default: 100)")
    t.add_argument("--temperature", type=_float_in(0.0, low_open=False), default=None,
                   help="+ of the sample grid (default: 0.7)")
    t.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    t.add_argument("--seed", type=NON_NEGATIVE, default=None, help="* random seed (default: 0)")
    t.add_argument("--out", required=True, metavar="DIR",
                   help="run directory for checkpoint, metrics and samples (created if missing)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help=f"continue the run in DIR from its {CHECKPOINT}")
    again.add_argument("--overwrite", action="store_true",
                       help="start a new run in a DIR that holds one, deleting it")
    t.add_argument("--checkpoint-every", type=NON_NEGATIVE, default=CHECKPOINT_EVERY,
                   metavar="STEPS", help="also write a checkpoint every this many steps "
                                         "(0: only at epoch ends)")
    t.add_argument("--max-steps", type=POSITIVE, default=None,
                   help="stop after this many optimizer steps in all (default: no limit)")
    t.add_argument("--captured", action="store_true",
                   help="run each training step (forward, backward, clipping, Adam) as one "
                        "CUDA-graph replay after 3 eager steps; CUDA and one process only, "
                        "eager elsewhere (default: off)")
    t.add_argument("--limit-train", type=POSITIVE, default=None, metavar="N",
                   help="* use the first N training images (default: all)")
    t.add_argument("--limit-test", type=POSITIVE, default=None, metavar="N",
                   help="+ use the first N test images (default: all)")
    t.add_argument("--data-root", default=None,
                   help="+ dataset directory (default: see invconv.data)")
    t.set_defaults(func=train)

    e = sub.add_parser("evaluate", help="test bits/dim, parameters, sampling and forward time",
                       **kw)
    e.add_argument("--checkpoint", required=True,
                   help=f"a {CHECKPOINT} written by invconv train, or its run directory")
    e.add_argument("--batch-size", type=POSITIVE, default=100, help="test images per batch")
    e.add_argument("--limit-test", type=POSITIVE, default=None, metavar="N",
                   help="use the first N test images (default: all)")
    e.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    e.add_argument("--data-root", default=None,
                   help="dataset directory (default: see invconv.data)")
    e.set_defaults(func=evaluate)

    s = sub.add_parser("sample", help="write a grid of samples as PNG", **kw)
    s.add_argument("--checkpoint", required=True,
                   help=f"a {CHECKPOINT} written by invconv train, or its run directory")
    s.add_argument("--n", type=POSITIVE, default=64, help="number of samples")
    s.add_argument("--temperature", type=_float_in(0.0, low_open=False), default=0.7,
                   help="standard deviation of the latents")
    s.add_argument("--out", required=True, metavar="PNG",
                   help="the image to write (its directory must exist)")
    s.add_argument("--seed", type=NON_NEGATIVE, default=0, help="of the latents")
    s.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    s.set_defaults(func=sample)

    d = sub.add_parser("demo", help="blur pictures with a masked convolution and undo it exactly",
                       **kw)
    d.add_argument("--out", default="invconv-demo.png", metavar="PNG",
                   help="the picture to write: originals, convolved, recovered")
    d.add_argument("--size", type=POSITIVE, default=128, help="pixels per side")
    d.add_argument("--kernel-size", type=POSITIVE, default=7, help="k of the k x k convolution")
    d.add_argument("--strength", type=_float_in(0.0, 1.0, low_open=False), default=0.9,
                   help="sum of the off-diagonal taps per output (below 1: no growth)")
    d.set_defaults(func=demo)

    c = sub.add_parser("classify", help="the paper's 2 inverse-conv + 1 FC MNIST classifier",
                       **kw)
    c.add_argument("--epochs", type=POSITIVE, default=5, help="epochs in all")
    c.add_argument("--batch-size", type=POSITIVE, default=100, help="images per step")
    c.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3, help="Adam learning rate")
    c.add_argument("--activation", default="none", choices=["none", "relu", "tanh"],
                   help="after each inverse convolution")
    c.add_argument("--limit-train", type=POSITIVE, default=None, metavar="N",
                   help="use the first N training images (default: all)")
    c.add_argument("--limit-test", type=POSITIVE, default=None, metavar="N",
                   help="use the first N test images (default: all)")
    c.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    c.add_argument("--seed", type=NON_NEGATIVE, default=0, help="of the initialisation and order")
    c.add_argument("--data-root", default=None,
                   help="dataset directory (default: see invconv.data)")
    c.set_defaults(func=classify)
    # Listed for --help; main() hands its arguments to invconv.benchmarks.
    sub.add_parser("bench", add_help=False,
                   help="op-level benchmarks (invconv bench --help for options)")
    return p


def main(argv=None):
    """Run the command line; returns 0 or raises SystemExit with the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from . import benchmarks
        command, run = "bench", lambda: benchmarks.main(argv[1:], parser_class=_Parser)
    else:
        args = _parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    from . import data
    try:
        if command in NEEDS_TORCH and importlib.util.find_spec("torch") is None:
            raise UsageError(f"{command} needs PyTorch, which is not installed: "
                             f"python3 -m pip install \"invconv[torch]\" (on a machine "
                             f"without a GPU, install PyTorch's CPU build first)")
        run()
    except (UsageError, data.DatasetMissing) as exc:
        print(f"invconv {command}: error: {_one_line(exc, None)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        print(f"\ninvconv {command}: aborted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        print(f"invconv {command}: error: out of memory: the sizes given (--n, --size, "
              f"--batch-size ...) need more than this machine has ({_one_line(exc)})",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return 0


def _out_of_memory(exc):
    """Whether ``exc`` is an allocation failure (NumPy's MemoryError, torch's CPU or CUDA one)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return "DefaultCPUAllocator: can't allocate memory" in str(exc)


if __name__ == "__main__":
    raise SystemExit(main())
