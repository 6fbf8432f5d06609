"""Op-level benchmarks: invconv's kernels against the alternatives a user has.

    invconv bench --quick --out ops.json                      # seconds on a CPU
    invconv bench --device-check --out ops.json --markdown ops.md   # the GPU suite
    (python3 bench/bench_ops.py takes the same arguments)

For each op (inverse, inverse vjp, masked conv, conv vjp) and shape, every
implementation available on the machine is timed:

- ``invconv-cuda``: the one-launch wavefront kernels (CUDA events);
- ``*-graph``: invconv and the per-diagonal baseline captured once into a CUDA
  graph and timed as replays, i.e. the GPU work without Python's launch cost;
- ``invconv-SCHEDULE-cuda-graph`` (with ``--schedules``): the inverse and its
  vjp under a solve schedule that is off by default, or the convolution and
  its vjp under a convolution schedule that is (see invconv._kernels), to
  choose by measurement;
- ``per-diagonal-cuda``: the same kernel maths, one launch per anti-diagonal;
- ``cusparse``: ``cupyx.scipy.sparse.linalg.spsolve_triangular`` on the operator;
- ``dense-torch``: ``torch.linalg.solve_triangular`` on the dense operator, where it fits;
- ``cudnn-conv2d``: ``torch.nn.functional.conv2d`` (forward, or forward+backward), the
  yardstick of what a convolution costs, called eagerly; ``cudnn-conv2d-graph``: the
  same captured with ``torch.cuda.CUDAGraph`` and timed as replays (GPU time);
- ``invconv-cpu``: invconv's NumPy/BLAS backend on the host CPU (wall clock), and
  ``reference-cpu``: its SciPy reference; for both, the peak memory Python
  allocates during one call (tracemalloc) is recorded as ``peak_bytes``;
- on a CPU-only machine: ``dense-torch-cpu`` and ``torch-conv2d-cpu``, the same
  torch alternatives on the CPU.

The one-launch-per-diagonal baseline is :class:`invconv.baselines.PerDiagonal`.

Each row: median and quartiles over repeats after warm-up, with inputs
rotated among several sets so caches do not flatter, the ratio to invconv in
the same run, the bytes an op must move at least, the number of sequential
diagonal steps and, for the inverse and its vjp, the time per diagonal step
and the ratio to cuDNN's convolution of the same shape (forward for the
inverse, forward and backward for the vjp): the two measures of issue 12's
targets. A ratio to cuDNN compares like with like (:func:`cudnn_yardstick`):
a graph replay with cuDNN's graph replay, an eager GPU call with cuDNN's
eager call, never one with the other (an eager cuDNN call includes its host
time, which made graph rows look 1.5-5.6x cuDNN when they were 4-47x).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import numpy as np

import invconv
from invconv import _api, _backends

FLOW_SHAPES = [(100, 1, 28, 28), (100, 4, 14, 14), (100, 12, 16, 16), (100, 48, 8, 8),
               (100, 3, 32, 32), (16, 3, 64, 64), (4, 3, 256, 256)]
# The GPU suite: the flow shapes, the large single images, and issue 17's
# shapes: a larger batch of 64² images, many channels at 64² and at 16² in a
# large batch, and one slice far beyond shared memory (1x3x1024²).
GPU_SHAPES = FLOW_SHAPES + [(1, 3, 256, 256), (100, 3, 64, 64), (16, 16, 64, 64),
                            (256, 12, 16, 16), (1, 3, 1024, 1024)]
# cuSPARSE's rows need the operator as a SciPy matrix, built on the host:
# skipped past this many unknowns a slice (C*H*W; 1x3x1024² has 3.1M, ~85M
# non-zeros).
SPARSE_LIMIT = 1 << 20
# The SciPy reference (host CPU) is skipped past this many image elements in
# the device check, whose time is bounded (16x16x64² would take seconds a
# call); other GPU runs skip it past 2M.
REFERENCE_LIMIT_CHECK = 800_000
QUICK_SHAPES = [(4, 1, 12, 12), (4, 4, 8, 8), (2, 3, 16, 16)]
# The host suite: the flow shapes and one large single image.
CPU_SHAPES = FLOW_SHAPES + [(1, 3, 256, 256)]
OPS = ("inv", "inv_vjp", "conv", "conv_vjp")


def _quantiles(times):
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return statistics.median(times), q[0], q[2]


class GraphReplay:
    """Marks ``fn`` to be timed as CUDA-graph replays rather than eager calls;
    :meth:`capture` returns ``(launch, replays)``: ``launch(*replay)`` replays
    one captured graph."""

    def __init__(self, fn):
        self.fn = fn


class CudaGraphReplay(GraphReplay):
    """CuPy's stream capture of ``fn`` (invconv and the per-diagonal baseline).

    Eager timings of a schedule with hundreds of launches mostly measure
    Python's cost per launch (about 15-20 us through CuPy); a compiled caller
    such as the published C++ extensions pays a few us. Replaying a captured
    graph times the GPU work alone, which is the fair floor for every
    schedule: both invconv and the per-diagonal baseline get such rows, and
    cuDNN gets them through :class:`TorchGraphReplay`.
    """

    def capture(self, inputs):
        """One graph per input set, each checked against an eager call.

        Returns ``(launch, replays)`` in the timers' calling shape: each
        replay is ``(graph, its output, its memory pool)``. Each graph
        allocates from a memory pool of its own that lives as long as it
        does: a captured graph keeps writing to the addresses it saw (its
        scratch too, freed back to the pool during capture), so nothing else
        may be handed them, not even another graph's output. Capture is in
        CuPy's default (relaxed) mode, so an allocation the pool cannot serve
        from its cache is allowed.
        """
        import cupy
        stream = cupy.cuda.Stream(non_blocking=True)
        replays = []
        # A non-blocking stream does not wait for the legacy default stream,
        # where the inputs were written.
        cupy.cuda.Device().synchronize()
        for args in inputs:
            pool = cupy.cuda.MemoryPool()
            with cupy.cuda.using_allocator(pool.malloc), stream:
                # The eager call compiles the kernels and fills the pool with
                # blocks of the sizes the capture asks for; its result is what
                # the replay must reproduce.
                want = _to_host(self.fn(*args))
                stream.begin_capture()
                try:
                    out = self.fn(*args)
                finally:
                    graph = stream.end_capture()
                graph.launch(stream)
                stream.synchronize()
                # The kernels are deterministic: a replay gives the eager bits.
                if not all(np.array_equal(g, w) for g, w in zip(_to_host(out), want)):
                    raise RuntimeError("a CUDA-graph replay disagrees with the eager call")
            replays.append((graph, out, pool))
        return (lambda graph, out, pool: graph.launch()), replays


class TorchGraphReplay(GraphReplay):
    """``torch.cuda.CUDAGraph`` capture of a torch ``fn`` (cuDNN's conv2d, and
    its forward and backward through autograd): the graph-replay row cuDNN is
    compared with, so both sides of a ratio are GPU time.

    One graph per input set, the inputs turned into static torch tensors
    before capture. Warm-up calls run on a side stream first, as
    ``torch.cuda.graph`` requires (cuDNN picks its algorithms and workspaces
    there). A replay is checked against an eager call to within float32
    rounding, not bit for bit: cuDNN's weight gradient may sum in another
    order from call to call.
    """

    WARMUP = 3

    def capture(self, inputs):
        import torch
        replays = []
        torch.cuda.synchronize()
        for args in inputs:
            static = tuple(torch.as_tensor(a) for a in args)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    want = _as_tuple(self.fn(*static))
            torch.cuda.current_stream().wait_stream(side)
            want = tuple(t.detach().clone() for t in want)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = _as_tuple(self.fn(*static))
            graph.replay()
            torch.cuda.synchronize()
            for got, ref in zip(out, want):
                scale = float(ref.abs().max()) if ref.numel() else 0.0
                if float((got - ref).abs().max()) > 1e-4 * max(scale, 1e-30):
                    raise RuntimeError("a torch CUDA-graph replay disagrees with the eager call")
            replays.append((graph, static, out))
        return (lambda graph, static, out: graph.replay()), replays


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def _to_host(result):
    import cupy
    parts = result if isinstance(result, tuple) else (result,)
    return [cupy.asnumpy(a) for a in parts]


class GpuTimer:
    """CUDA-event timing on CuPy's current stream (torch shares the default stream)."""

    def __init__(self):
        import cupy
        self.cupy = cupy

    GRAPH_BATCH = 10  # replays per graph sample

    def __call__(self, fn, inputs, warmup=3, repeats=30, budget_s=3.0):
        """Per-call times in ms. An eager sample is one call between two
        events (the host's share included, as a user sees it); a graph
        sample is GRAPH_BATCH replays back to back, divided by GRAPH_BATCH,
        so the host time of launching the first is spread thin."""
        cupy = self.cupy
        per_sample = 1
        if isinstance(fn, GraphReplay):
            fn, inputs = fn.capture(inputs)
            per_sample = self.GRAPH_BATCH
        for k in range(warmup):
            fn(*inputs[k % len(inputs)])
        cupy.cuda.get_current_stream().synchronize()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times, t0, calls = [], time.perf_counter(), 0
        for _ in range(repeats):
            start.record()
            for _ in range(per_sample):
                fn(*inputs[calls % len(inputs)])
                calls += 1
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) / per_sample)
            if time.perf_counter() - t0 > budget_s and len(times) >= 5:
                break
        return times


def cpu_timer(fn, inputs, warmup=1, repeats=5, budget_s=3.0):
    for k in range(warmup):
        fn(*inputs[k % len(inputs)])
    times, t0 = [], time.perf_counter()
    for k in range(repeats):
        s = time.perf_counter()
        fn(*inputs[k % len(inputs)])
        times.append((time.perf_counter() - s) * 1e3)
        if time.perf_counter() - t0 > budget_s:
            break
    return times


def wall_times_ms(fn, device, runs, warmup=2):
    """Wall-clock ms of ``runs`` calls of ``fn()`` after ``warmup`` calls.

    Each call is ended by synchronising the torch ``device`` (nothing to wait
    for on the CPU), so a CUDA time is the work's, not the launch's.
    """
    def sync():
        if device.type == "cuda":
            import torch
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return np.array(times)


def min_bytes(op, shape, k, itemsize):
    """Each input read once, each output written once."""
    B, C, H, W = shape
    image = B * C * H * W * itemsize
    weight = C * C * k * k * itemsize
    return {"inv": 2 * image + weight, "conv": 2 * image + weight,
            "inv_vjp": 3 * image + 2 * weight, "conv_vjp": 3 * image + 2 * weight}[op]


def make_problem(rng, shape, k, dtype, n_sets):
    B, C, H, W = shape
    w = rng.uniform(-1, 1, (C, C, k, k)) * (0.5 / (C * k * k))
    sets = [(rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype))
            for _ in range(n_sets)]
    return w.astype(dtype), sets


@functools.lru_cache(maxsize=None)
def _per_diagonal():
    from .baselines import PerDiagonal
    return PerDiagonal("cuda")


def with_schedule(fn, schedule):
    """``fn`` with the CUDA backend's solves, or its convolutions, under
    ``schedule`` (its text form) while it runs, a CUDA-graph capture
    included."""
    from invconv import _cuda

    def scheduled(*args):
        with _cuda._ops.using_schedule(schedule):
            return fn(*args)
    return scheduled


# The convolution each solve is measured against (issue 12's targets).
CUDNN_COUNTERPART = {"inv": "conv", "inv_vjp": "conv_vjp"}
# The ops each kind of schedule changes.
SCHEDULED_OPS = {"solve": ("inv", "inv_vjp"), "conv": ("conv", "conv_vjp")}


def schedule_family(schedule):
    """``"solve"`` or ``"conv"``: which ops a schedule's text form changes."""
    from ._kernels import ConvSchedule, parse_schedule
    return "conv" if isinstance(parse_schedule(schedule), ConvSchedule) else "solve"


CUDNN_EAGER, CUDNN_GRAPH = "cudnn-conv2d", "cudnn-conv2d-graph"


def cudnn_yardstick(row):
    """The cuDNN row a row's ratio to cuDNN is taken over: cuDNN's graph
    replay for a graph replay (``*-graph``: GPU time on both sides), its
    eager call for an eager GPU call (host time on both sides); None for a
    host row (its time is the CPU's)."""
    if row.get("device", "cuda") != "cuda":
        return None
    return CUDNN_GRAPH if row["implementation"].endswith("-graph") else CUDNN_EAGER


def add_step_and_cudnn_measures(rows):
    """Adds ``us_per_step``, ``ratio_to_cudnn`` and ``cudnn_baseline`` to the
    inverse rows of one shape: cuDNN's time is its conv2d (forward, or
    forward and backward) row of the same shape timed the same way
    (:func:`cudnn_yardstick`); None where there is none, never a row timed
    the other way."""
    cudnn = {(r["op"], r["implementation"]): r for r in rows
             if r["implementation"] in (CUDNN_EAGER, CUDNN_GRAPH)}
    for r in rows:
        if r["op"] in CUDNN_COUNTERPART:
            r["us_per_step"] = r["median_ms"] * 1e3 / r["diagonal_steps"]
            name = cudnn_yardstick(r)
            base = cudnn.get((CUDNN_COUNTERPART[r["op"]], name)) if name else None
            r["ratio_to_cudnn"] = r["median_ms"] / base["median_ms"] if base else None
            r["cudnn_baseline"] = name if base else None


def implementations(op, shape, k, weight, xp_sets, have_gpu, dense_limit_bytes,
                    schedules=()):
    """Yield (name, device, fn, inputs, launches) for every available implementation."""
    B, C, H, W = shape
    steps = H + W - 1
    host_sets = [tuple(np.asarray(a) for a in s) for s in xp_sets["numpy"]]
    if have_gpu:
        import cupy
        wg = cupy.asarray(weight)
        gsets = xp_sets["cupy"]
        ops = {
            "inv": (lambda y, g: invconv.inv_conv2d(y, wg), 3),
            "inv_vjp": (lambda x, g: invconv.inv_conv2d_vjp(g, x, wg), 5),
            "conv": (lambda x, g: invconv.conv2d(x, wg), 1),
            "conv_vjp": (lambda x, g: invconv.conv2d_vjp(g, x, wg), 3),
        }
        fn, launches = ops[op]
        yield "invconv-cuda", "cuda", fn, gsets, launches
        yield "invconv-cuda-graph", "cuda", CudaGraphReplay(fn), gsets, launches
        for schedule in schedules:
            if op in SCHEDULED_OPS[schedule_family(schedule)]:
                yield (f"invconv-{schedule}-cuda-graph", "cuda",
                       CudaGraphReplay(with_schedule(fn, schedule)), gsets, launches)

        per_diag = _per_diagonal() if op in ("inv", "inv_vjp") else None
        if per_diag is not None:
            if op == "inv":
                fn, launches = (lambda y, g: per_diag.solve(y, wg)), steps + 3
            else:
                fn, launches = (lambda x, g: per_diag.inv_conv2d_vjp(g, x, wg)), steps + 5
            yield "per-diagonal-cuda", "cuda", fn, gsets, launches
            yield "per-diagonal-cuda-graph", "cuda", CudaGraphReplay(fn), gsets, launches

        if op in ("inv", "inv_vjp") and C * H * W <= SPARSE_LIMIT:
            m_perm, order = _permuted_operator(weight, C, H, W)
            try:
                import cupyx.scipy.sparse as csp
                from cupyx.scipy.sparse.linalg import spsolve_triangular as gpu_trsv
                lower = csp.csr_matrix(m_perm.tocsr())
                upper = csp.csr_matrix(m_perm.T.tocsr())
                order_g = cupy.asarray(order)

                def sparse_solve(rhs, matrix, is_lower):
                    cols = rhs.reshape(B, -1).T[order_g]
                    sol = gpu_trsv(matrix, cols, lower=is_lower)
                    out = cupy.empty_like(sol)
                    out[order_g] = sol
                    return out.T.reshape(rhs.shape)
                if op == "inv":
                    yield ("cusparse", "cuda", lambda y, g: sparse_solve(y, lower, True), gsets,
                           None)
                else:
                    yield ("cusparse", "cuda", lambda x, g: sparse_solve(g, upper, False),
                           gsets, None)
            except Exception as exc:  # report, don't hide
                print(f"  cusparse unavailable for {op} {shape}: {exc}", file=sys.stderr)

    yield from _torch_alternatives(op, shape, k, weight, gsets if have_gpu else host_sets,
                                   "cuda" if have_gpu else "cpu", dense_limit_bytes)

    for backend in _backends.names("numpy", available_only=True):
        if _backends.spec(backend).timed:
            yield _host_row_name(backend), "cpu", _host_op(op, weight, backend), host_sets, None


def _host_row_name(backend):
    return "reference-cpu" if backend == "reference" else f"invconv-{backend}"


HOST_ROWS = tuple(_host_row_name(b) for b in _backends.names("numpy"))


def _host_op(op, weight, backend):
    return {
        "inv": lambda y, g: invconv.inv_conv2d(y, weight, backend=backend),
        "inv_vjp": lambda x, g: invconv.inv_conv2d_vjp(g, x, weight, backend=backend),
        "conv": lambda x, g: invconv.conv2d(x, weight, backend=backend),
        "conv_vjp": lambda x, g: invconv.conv2d_vjp(g, x, weight, backend=backend),
    }[op]


def peak_bytes(fn, inputs):
    """Peak bytes Python allocated (NumPy arrays included) during one call."""
    import tracemalloc
    tracemalloc.start()
    try:
        fn(*inputs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _permuted_operator(weight, C, H, W):
    """The sparse operator in pixel-major order (lower-triangular) and that order."""
    conv = _api.make_conv(weight.shape, corner="top-left", groups=1, unit_diagonal=True)
    m = invconv.reference._matrix(weight, np.empty((1, C, H, W)), conv)
    order = invconv.reference._pixel_major_order(conv, H, W)
    return m[order][:, order].astype(weight.dtype), order


def _torch_alternatives(op, shape, k, weight, inputs, device, dense_limit_bytes):
    """torch's dense triangular solve (where the dense operator fits) and
    conv2d (cuDNN on a GPU) at the same shape, on ``device``."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return
    B, C, H, W = shape
    suffix = "" if device == "cuda" else "-cpu"
    pad = (k - 1, 0, k - 1, 0)
    if op in ("inv", "inv_vjp") and (C * H * W) ** 2 * weight.itemsize <= dense_limit_bytes:
        m_perm, order = _permuted_operator(weight, C, H, W)
        dense = torch.as_tensor(m_perm.toarray(), device=device)
        order_t = torch.as_tensor(order, device=device)

        def dense_solve(rhs, upper):
            t = torch.as_tensor(rhs).reshape(B, -1).T[order_t]
            sol = torch.linalg.solve_triangular(dense.T if upper else dense, t, upper=upper)
            out = torch.empty_like(sol)
            out[order_t] = sol
            return out.T.reshape(rhs.shape)
        yield (f"dense-torch{suffix}", device,
               (lambda y, g: dense_solve(y, False)) if op == "inv"
               else (lambda x, g: dense_solve(g, True)), inputs, None)
    name = CUDNN_EAGER if device == "cuda" else "torch-conv2d-cpu"
    wt = torch.as_tensor(weight, device=device)
    if op == "conv":
        def torch_conv(x, g):
            return F.conv2d(F.pad(torch.as_tensor(x), pad), wt)
        fn = torch_conv
    elif op == "conv_vjp":
        def torch_vjp(x, g):
            xt = torch.as_tensor(x).detach().requires_grad_(True)
            wr = wt.detach().requires_grad_(True)
            y = F.conv2d(F.pad(xt, pad), wr)
            return torch.autograd.grad(y, (xt, wr), torch.as_tensor(g))
        fn = torch_vjp
    else:
        return
    yield name, device, fn, inputs, None
    if device == "cuda":   # the fair yardstick for graph rows: cuDNN's GPU time
        yield CUDNN_GRAPH, device, TorchGraphReplay(fn), inputs, None


def run(shapes, k, dtype, have_gpu, n_sets, repeats, budget_s, dense_limit_bytes,
        skip_reference_above, on_shape_done=lambda rows: None, schedules=()):
    rows = []
    gpu_timer = GpuTimer() if have_gpu else None
    rng = np.random.default_rng(0)
    for shape in shapes:
        weight, sets = make_problem(rng, shape, k, dtype, n_sets)
        xp_sets = {"numpy": sets}
        if have_gpu:
            import cupy
            xp_sets["cupy"] = [tuple(cupy.asarray(a) for a in s) for s in sets]
        first = len(rows)
        for op in OPS:
            shape_rows = []
            for name, device, fn, inputs, launches in implementations(
                    op, shape, k, weight, xp_sets, have_gpu, dense_limit_bytes, schedules):
                if (name == "reference-cpu" and have_gpu
                        and math.prod(shape) > skip_reference_above):
                    continue
                try:
                    if device == "cuda":
                        times = gpu_timer(fn, inputs, repeats=repeats, budget_s=budget_s)
                    else:
                        times = cpu_timer(fn, inputs, repeats=max(3, repeats // 10),
                                          budget_s=budget_s)
                except Exception as exc:
                    print(f"  {name} failed on {op} {shape}: {type(exc).__name__}: {exc}",
                          file=sys.stderr)
                    continue
                med, q1, q3 = _quantiles(times)
                peak = peak_bytes(fn, inputs[0]) if name in HOST_ROWS else None
                shape_rows.append(dict(peak_bytes=peak,
                    op=op, implementation=name, shape=list(shape), kernel_size=k,
                    dtype=np.dtype(dtype).name, device=device, median_ms=med, q1_ms=q1,
                    q3_ms=q3, repeats=len(times), launches=launches,
                    diagonal_steps=(shape[2] + shape[3] - 1) if op.startswith("inv") else 0,
                    min_bytes=min_bytes(op, shape, k, np.dtype(dtype).itemsize)))
                print(f"{op:9s} {str(shape):20s} {name:18s} {med:10.3f} ms", flush=True)
            # invconv's own row is the yardstick: its kernels on a GPU, else its
            # "cpu" backend (what invconv runs on the CPU by default); graph replays
            # are compared with invconv's graph replay.
            by_name = {r["implementation"]: r for r in shape_rows}
            eager = by_name.get("invconv-cuda", by_name.get("invconv-cpu",
                                                            by_name.get("reference-cpu")))
            for r in shape_rows:
                graphed = r["implementation"].endswith("-graph")
                base = by_name.get("invconv-cuda-graph") if graphed else eager
                r["ratio_to_invconv"] = r["median_ms"] / base["median_ms"] if base else None
                r["baseline"] = base["implementation"] if base else None
                r["GBps_floor"] = r["min_bytes"] / (r["median_ms"] * 1e-3) / 1e9
            rows.extend(shape_rows)
        add_step_and_cudnn_measures(rows[first:])
        on_shape_done(rows)
    return rows


def environment(have_gpu):
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), machine=platform.machine(),
               processor=platform.processor(), numpy=np.__version__, threads=_threads())
    import scipy
    env["scipy"] = scipy.__version__
    try:
        import torch
        env["torch"] = torch.__version__
    except ImportError:
        pass
    if have_gpu:
        import cupy
        env["cupy"] = cupy.__version__
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    return env


def _threads():
    """The thread settings the host rows ran under."""
    import os
    threads = {k: os.environ.get(k) for k in
               ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    threads["cpus"] = os.cpu_count()
    try:
        import torch
        threads["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    return threads


def markdown(rows, env):
    lines = [f"Measured {env['date']} on {env.get('gpu', 'CPU only')} "
             f"(CuPy {env.get('cupy', '-')}, torch {env.get('torch', '-')}, "
             f"NumPy {env['numpy']}, SciPy {env['scipy']}). Median ms over repeats "
             f"[q1, q3]; ratio = time / invconv's time in the same run (for *-graph rows, "
             f"over invconv's own graph replay); us / step = time / diagonal steps; "
             f"/ cuDNN = time / cuDNN conv2d's of the same shape (forward for inv, "
             f"forward + backward for inv_vjp) timed the same way: graph replays over "
             f"cudnn-conv2d-graph, eager calls over cudnn-conv2d. Threads: {env.get('threads', '-')}; "
             f"peak MB: memory Python allocated during one call (host backends).", "",
             "| op | shape (B,C,H,W) | implementation | median ms | [q1, q3] | ratio | launches "
             "| diagonal steps | us / step | / cuDNN | GB/s at the byte floor | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"
    for r in rows:
        peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 1e6:.1f}"
        lines.append(
            f"| {r['op']} | {tuple(r['shape'])} | {r['implementation']} | {r['median_ms']:.3f} | "
            f"[{r['q1_ms']:.3f}, {r['q3_ms']:.3f}] | {num(r['ratio_to_invconv'])} | "
            f"{r['launches'] or '-'} | {r['diagonal_steps'] or '-'} | "
            f"{num(r.get('us_per_step'))} | {num(r.get('ratio_to_cudnn'))} | "
            f"{r['GBps_floor']:.1f} | {peak} |")
    return "\n".join(lines) + "\n" + schedule_markdown(rows)


def schedule_markdown(rows):
    """The solve schedules side by side, then the convolution schedules
    (graph replays; empty without ``--schedules`` rows): what a
    default-schedule rule is chosen from."""
    return (_schedule_table(rows, "Solve schedules", SCHEDULED_OPS["solve"], steps=True)
            + _schedule_table(rows, "Convolution schedules", SCHEDULED_OPS["conv"], steps=False))


def _schedule_table(rows, title, ops, steps):
    default = "invconv-cuda-graph"
    names = list(dict.fromkeys(r["implementation"] for r in rows
                               if r["op"] in ops
                               and r["implementation"].startswith("invconv-")
                               and r["implementation"].endswith("-cuda-graph")
                               and r["implementation"] != default))
    if not names:
        return ""
    schedule = {n: n[len("invconv-"):-len("-cuda-graph")] for n in names}
    lines = ["", f"{title} (graph replays): ms, and in brackets time over the "
             "default schedule's; / cuDNN: over cuDNN's conv2d as a graph replay "
             "(cudnn-conv2d-graph; forward, or forward and backward for the vjps).", "",
             "| op | shape (B,C,H,W) | default ms | " + ("default us / step | " if steps else "")
             + "default / cuDNN | " + " | ".join(f"{schedule[n]} ms" for n in names) + " |",
             "|---|---|---|" + ("---|" if steps else "") + "---|" + "---|" * len(names)]
    cell = {(r["op"], tuple(r["shape"]), r["implementation"]): r for r in rows}
    for op, shape in dict.fromkeys((r["op"], tuple(r["shape"])) for r in rows
                                   if r["implementation"] in names):
        base = cell.get((op, shape, default))
        cudnn = cell.get((CUDNN_COUNTERPART.get(op, op), shape, CUDNN_GRAPH))
        line = [op, str(shape)]
        if base:
            line.append(f"{base['median_ms']:.3f}")
            if steps:
                line.append(f"{base['us_per_step']:.2f}")
            line.append(f"{base['median_ms'] / cudnn['median_ms']:.2f}" if cudnn else "-")
        else:
            line += ["-"] * (3 if steps else 2)
        for n in names:
            r = cell.get((op, shape, n))
            line.append("-" if r is None else f"{r['median_ms']:.3f}" + (
                f" ({r['median_ms'] / base['median_ms']:.2f})" if base else ""))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _shape_list(text):
    try:
        shapes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",")
                  if part.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like 100x1x28x28,4x3x256x256, "
                                         f"got {text!r}")
    return shapes


def main(argv=None, parser_class=argparse.ArgumentParser):
    """``invconv bench``; ``parser_class`` lets the CLI report mistakes its own way."""
    p = parser_class(prog="invconv bench", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small CPU shapes (seconds)")
    mode.add_argument("--device-check", action="store_true", help="the GPU suite, time-boxed")
    mode.add_argument("--cpu-suite", action="store_true",
                      help="the flow shapes on the CPU, every host implementation (minutes)")
    p.add_argument("--out", required=True, help="JSON file for the rows")
    p.add_argument("--markdown", help="markdown table file")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--kernel-size", type=_positive_int, default=3)
    p.add_argument("--schedules", default="",
                   help="comma-separated solve or convolution schedules to time beside the "
                        "default (GPU only), e.g. diagonal,lanes,diagonal:2,direct,smem:4")
    p.add_argument("--shapes", type=_shape_list, default=None,
                   help="comma-separated BxCxHxW shapes instead of the mode's own, "
                        "e.g. 100x1x28x28,1x3x1024x1024")
    p.add_argument("--row-budget-s", type=float, default=1.0,
                   help="seconds of repeats per row after warm-up (at least 5 repeats)")
    args = p.parse_args(argv)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    from ._kernels import parse_schedule
    for schedule in schedules:
        try:
            parse_schedule(schedule)
        except ValueError as exc:
            p.error(f"--schedules: {exc}")
    # Checked before measuring: the files are first written after a shape's timings.
    for option, path in (("--out", args.out), ("--markdown", args.markdown)):
        if path is None:
            continue
        directory = os.path.dirname(os.path.abspath(path)) if path else ""
        if not path or os.path.isdir(path) or not os.path.isdir(directory):
            p.error(f"{option} {path!r}: not a file path in an existing directory")

    try:
        import cupy
        have_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        have_gpu = False
    if args.device_check and not have_gpu:
        p.error("--device-check needs CuPy and a CUDA device")
    if args.cpu_suite:
        have_gpu = False
    shapes = GPU_SHAPES if (args.device_check or (have_gpu and not args.quick)) else QUICK_SHAPES
    shapes = CPU_SHAPES if args.cpu_suite else shapes
    shapes = args.shapes or shapes
    env = environment(have_gpu)

    def write(rows):  # after every shape, so a time-boxed run keeps what it measured
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown(rows, env))

    rows = run(shapes, args.kernel_size, np.dtype(args.dtype), have_gpu,
               n_sets=4 if have_gpu else 2, repeats=30 if have_gpu else 10,
               budget_s=args.row_budget_s, dense_limit_bytes=8 << 30,
               skip_reference_above=REFERENCE_LIMIT_CHECK if args.device_check else 2_000_000,
               on_shape_done=write, schedules=schedules if have_gpu else ())
    if not rows:
        raise SystemExit("no benchmark rows were produced")
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
