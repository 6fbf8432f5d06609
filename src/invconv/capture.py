"""Captured calls: run a tensor function as one CUDA-graph replay instead of per-op launches.

    fn(*tensors) -> tensor or tuple of tensors      (no autograd: calls run under no_grad)

A flow's sampling and density passes are hundreds of small kernels; called
from Python, each pays its host cost (launch, allocation, Python), which at
batch 100 is most of the time.  :class:`CapturedCall` captures ``fn`` once per
*key* -- the shapes, dtypes and devices of the arguments, plus the storage of
the parameters it reads -- and replays it:

- ``method="graph"``: :class:`torch.cuda.CUDAGraph`.  Static input buffers
  are allocated per key; a call copies its arguments into them, replays the
  graph and returns clones of the static outputs (so a later replay never
  overwrites what an earlier call returned).  Before capture, ``fn`` runs
  ``warmup`` times on a side stream (lazy initialisation, cuBLAS workspaces,
  CuPy's cached kernels happen outside the graph).
- ``method="compile"``: ``torch.compile(fn, mode="reduce-overhead")``, which
  traces the graph (invconv's ops are custom ops with fake kernels) and
  replays it through CUDA graph trees.
- ``method="eager"``: ``fn`` itself.

Capture needs CUDA: on other devices every method runs ``fn`` eagerly
(nothing to capture; no warning).  If capturing fails on CUDA, a
``RuntimeWarning`` is issued once per :class:`CapturedCall` and that key
runs eagerly from then on.  ``fn`` must not synchronise with the host or
change state that it reads (both make a replay differ from a call); in
:mod:`invconv.flows` that is why captured passes need ActNorm initialised.

A replay reads the parameters at the addresses they had when captured:
in-place updates (an optimiser step, ``load_state_dict``) are seen, and
moving or re-creating them (``model.to``, ``model.double()``) changes the key,
so the next call captures again (and the captures made with the old
parameters are dropped).
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["CapturedCall", "CapturedStep", "METHODS", "resolve_method"]

METHODS = ("graph", "compile", "eager")


def resolve_method(captured) -> str:
    """``captured`` as given by a user (False, True or a method name) -> a method name."""
    if captured is False or captured is None:
        return "eager"
    if captured is True:
        return "graph"
    if captured in METHODS:
        return captured
    raise ValueError(f"captured must be True, False or one of {METHODS}, got {captured!r}")


def _tensor_signature(t):
    return (tuple(t.shape), t.dtype, t.device, tuple(t.stride()))


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


class _GraphRecorder:
    """Captures ``fn(*static_inputs)`` into a CUDA graph; ``replay()`` re-runs it."""

    def __init__(self, warmup=2):
        self.warmup = warmup

    @staticmethod
    def available(args):
        return all(a.is_cuda for a in args)

    def capture(self, fn, static_inputs):
        """-> (replay callable, static outputs)."""
        device = static_inputs[0].device
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*static_inputs)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Each graph owns its memory pool: replays of different keys never
        # share intermediate buffers.
        with torch.cuda.graph(graph):
            outputs = fn(*static_inputs)
        return graph.replay, outputs


class _Entry:
    """One captured key: static inputs, the replay and the static outputs."""

    __slots__ = ("static_inputs", "replay", "static_outputs", "tuple_output")

    def __init__(self, recorder, fn, args):
        self.static_inputs = tuple(a.detach().clone() for a in args)
        self.replay, outputs = recorder.capture(fn, self.static_inputs)
        self.tuple_output = isinstance(outputs, tuple)
        self.static_outputs = _as_tuple(outputs)

    def __call__(self, args):
        for static, a in zip(self.static_inputs, args):
            static.copy_(a)
        self.replay()
        out = tuple(o.clone() for o in self.static_outputs)
        return out if self.tuple_output else out[0]


class CapturedCall:
    """``fn`` replayed from a capture per key (see the module docs).

    Parameters
    ----------
    fn : callable
        ``fn(*tensors) -> tensor or tuple of tensors``; run under ``torch.no_grad``.
    method : {"graph", "compile", "eager"}
    state : callable, optional
        Returns the tensors ``fn`` reads besides its arguments (a module's
        parameters and buffers); their storage is part of the key.
    warmup : int
        Eager runs before a graph capture (on a side stream).
    """

    def __init__(self, fn, method="graph", *, state=None, warmup=2, _recorder=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.fn, self.method, self.state = fn, method, state
        self._recorder = _recorder or _GraphRecorder(warmup)
        self._entries = {}      # key -> _Entry, or None: this key runs eagerly
        self._state_key = None  # the state's storage the entries were captured with
        self._compiled = None
        self._warned = False
        self.captures = 0       # how many keys were captured (for tests and benchmarks)

    def key(self, args):
        """What a capture depends on: argument signatures and the state's storage."""
        state = () if self.state is None else tuple(
            (t.data_ptr(), *_tensor_signature(t)) for t in self.state())
        return tuple(_tensor_signature(a) for a in args), state

    def _eager(self, args):
        return self.fn(*args)

    def _capture_allowed(self, args):
        # A stand-in recorder (the tests' _recorder) may capture on any device.
        return bool(args) and self._recorder.available(args)

    def _fall_back(self, exc):
        if not self._warned:
            self._warned = True
            warnings.warn(f"capturing {getattr(self.fn, '__name__', self.fn)!r} with "
                          f"method={self.method!r} failed ({type(exc).__name__}: {exc}); "
                          f"running eagerly", RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def __call__(self, *args):
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"argument {i} must be a torch.Tensor, got {type(a).__name__}")
        if self.method == "eager" or not self._capture_allowed(args):
            return self._eager(args)
        if self.method == "compile":
            return self._call_compiled(args)
        key = self.key(args)
        if key[1] != self._state_key:
            # Re-created parameters: the old captures would read freed memory
            # and are never replayed again; drop them and their memory pools.
            self._entries.clear()
            self._state_key = key[1]
        if key not in self._entries:
            try:
                self._entries[key] = _Entry(self._recorder, self.fn, args)
                self.captures += 1
            except Exception as exc:   # capture is impossible here: eager for this key
                self._entries[key] = None
                self._fall_back(exc)
        entry = self._entries[key]
        return self._eager(args) if entry is None else entry(args)

    def _call_compiled(self, args):
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, mode="reduce-overhead", dynamic=False)
        if self._compiled is False:
            return self._eager(args)
        try:
            # Each call is a new step for CUDA graph trees: the outputs are
            # cloned below, so the previous step's may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
            out = self._compiled(*args)
        except Exception as exc:
            self._compiled = False
            self._fall_back(exc)
            return self._eager(args)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()

    def clear(self):
        """Drop every capture (their memory pools go with them)."""
        self._entries.clear()
        self._compiled = None


class CapturedStep:
    """One training step -- forward, backward, gradient clipping and the
    optimiser step -- replayed as one CUDA graph.

        step = CapturedStep(loss_fn, parameters, optimizer, clip=100.0)
        loss, grad_norm = step(batch)        # detached scalar tensors

    ``loss_fn(batch)`` returns the scalar loss; a step is
    ``zero_grad(set_to_none=True)``, ``loss.backward()``,
    ``clip_grad_norm_(parameters, clip)`` and ``optimizer.step()``, the same
    operations an eager loop runs, so a replay gives the eager step's result.
    The first ``warmup`` steps run eagerly (on a side stream on CUDA: lazy
    initialisation, data-dependent initialisation such as ActNorm's, and
    the optimiser's state happen outside the graph); the next is captured
    (capturing runs nothing) and replayed, and every later step copies its
    batch into the static buffer and replays.  A new batch shape, dtype or
    device, or a changed learning rate (a scheduler's step: a float learning
    rate is baked into the captured kernels), captures again.

    Requirements: the optimiser must be capturable (``capturable=True`` for
    Adam) and ``loss_fn`` must not synchronise with the host.  The step is
    taken whatever the loss: a caller that stops on a non-finite loss must
    not keep the model it returns (the CLI keeps its last good checkpoint).
    Off CUDA, or with ``method="eager"``, every step runs eagerly.
    """

    def __init__(self, loss_fn, parameters, optimizer, clip, *, warmup=3, method="graph",
                 _recorder=None):
        if method not in ("graph", "eager"):
            raise ValueError(f"method must be 'graph' or 'eager', got {method!r}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (an eager step initialises the state), "
                             f"got {warmup}")
        self.loss_fn, self.optimizer, self.clip = loss_fn, optimizer, float(clip)
        self.parameters = [p for p in parameters]
        self.method, self.warmup = method, int(warmup)
        self._recorder = _recorder or _GraphRecorder(warmup=0)
        self._entry = None          # (key, static batch, replay, static outputs)
        self.steps = 0              # steps taken, eager or replayed
        self.captures = 0           # how many times the step was captured

    def _step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.clip)
        self.optimizer.step()
        return loss.detach(), grad_norm.detach()

    def _eager(self, batch):
        if not batch.is_cuda:
            return self._step(batch)
        current = torch.cuda.current_stream(batch.device)
        side = torch.cuda.Stream(batch.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = self._step(batch)
        current.wait_stream(side)
        return out

    def key(self, batch):
        return _tensor_signature(batch), tuple(g["lr"] for g in self.optimizer.param_groups)

    def __call__(self, batch):
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
        self.steps += 1
        if (self.method == "eager" or not self._recorder.available((batch,))
                or self.steps <= self.warmup):
            return self._eager(batch)
        key = self.key(batch)
        if self._entry is None or self._entry[0] != key:
            self._entry = None          # the old graph and its pool go first
            static = batch.detach().clone()
            # Gradients are allocated inside the capture (from its pool) and
            # written, not accumulated, by every replay.
            self.optimizer.zero_grad(set_to_none=True)
            replay, outputs = self._recorder.capture(self._step, (static,))
            self._entry = (key, static, replay, outputs)
            self.captures += 1
        _, static, replay, outputs = self._entry
        static.copy_(batch)
        replay()
        return tuple(o.clone() for o in outputs)
