"""The fused rational-quadratic spline as a PyTorch operator (``invconv::rq_spline``).

    rq_spline(t, knots, bound, inverse, runtime) -> (out, logabsdet)

``t`` (B, C, H, W); ``knots`` (3, C, K+1): per channel the x knots, the y knots
and the derivatives at the knots, as :class:`invconv.flows.SplineActivation`
builds them; ``out`` the spline of every element with ``-bound < t < bound``
(its inverse when ``inverse``), the identity elsewhere; ``logabsdet`` (B,) the
log-derivative summed per sample (at the input for the forward direction, at
the output for the inverse: the layer negates it).  ``runtime``: ``"cuda"``
(CUDA tensors, the kernels of ``kernels/spline.cu`` through CuPy on torch's
current stream with torch's caching allocator, like :mod:`invconv.torch`) or
``"emulator"`` (CPU tensors, the same kernels on the CPU emulator: for tests).

Autograd: backward is one op again, ``invconv::rq_spline_backward`` (one or
two launches), giving the gradients with respect to ``t`` and to the knot
table; torch's autograd carries the table's gradient on to the parameters
(softmax, cumsum: C x bins numbers).  Double backward and forward mode are
not implemented (the flows need neither).  Both ops have fake kernels, so
``torch.compile(fullgraph=True)`` traces them as single opaque ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rq_spline", "RUNTIMES"]

RUNTIMES = ("cuda", "emulator")


def _check(t, knots, runtime):
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    want_cuda = runtime == "cuda"
    for name, x in (("t", t), ("knots", knots)):
        if x.is_cuda != want_cuda:
            raise ValueError(f"runtime={runtime!r} needs {'CUDA' if want_cuda else 'CPU'} "
                             f"tensors, but {name} is on {x.device}")


def _launch(method, runtime, tensors, *extra):
    """Run ``SplineKernels.<method>`` on ``tensors`` (a list); returns tensors."""
    from . import _spline
    kern = _spline.kernels(runtime)
    first = tensors[0]
    if runtime == "cuda":
        import cupy
        from .torch import _cuda_context
        # Launches and DLPack exchanges on torch's current stream, memory from
        # torch's caching allocator (so CUDA graph capture works).
        with _cuda_context(first.device) as stream, stream:
            arrays = [cupy.from_dlpack(x.detach()) for x in tensors]
            return tuple(torch.from_dlpack(a) for a in getattr(kern, method)(*arrays, *extra))
    arrays = [x.detach().numpy() for x in tensors]
    return tuple(torch.from_numpy(a) for a in getattr(kern, method)(*arrays, *extra))


@torch.library.custom_op("invconv::rq_spline", mutates_args=())
def _rq_spline(t: Tensor, knots: Tensor, bound: float, inverse: bool,
               runtime: str) -> tuple[Tensor, Tensor]:
    _check(t, knots, runtime)
    return _launch("forward", runtime, [t, knots], bound, inverse)


@_rq_spline.register_fake
def _(t, knots, bound, inverse, runtime):
    return t.new_empty(t.shape), t.new_empty(t.shape[0])


@torch.library.custom_op("invconv::rq_spline_backward", mutates_args=())
def _rq_spline_backward(t: Tensor, grad_out: Tensor, grad_logdet: Tensor, knots: Tensor,
                        bound: float, inverse: bool, runtime: str) -> tuple[Tensor, Tensor]:
    _check(t, knots, runtime)
    return _launch("backward", runtime, [t, grad_out, grad_logdet, knots], bound, inverse)


@_rq_spline_backward.register_fake
def _(t, grad_out, grad_logdet, knots, bound, inverse, runtime):
    return t.new_empty(t.shape), knots.new_empty(knots.shape)


def _setup_context(ctx, inputs, output):
    t, knots, bound, inverse, runtime = inputs
    ctx.save_for_backward(t, knots)
    ctx.opts = (bound, inverse, runtime)


def _backward(ctx, grad_out, grad_logdet):
    t, knots = ctx.saved_tensors
    # An output that does not reach the loss has no gradient: zeros (the
    # kernel reads both).
    grad_out = torch.zeros_like(t) if grad_out is None else grad_out
    grad_logdet = t.new_zeros(t.shape[0]) if grad_logdet is None else grad_logdet
    grad_t, grad_knots = _rq_spline_backward(t, grad_out.contiguous(), grad_logdet.contiguous(),
                                             knots, *ctx.opts)
    return (grad_t if ctx.needs_input_grad[0] else None,
            grad_knots if ctx.needs_input_grad[1] else None, None, None, None)


_rq_spline.register_autograd(_backward, setup_context=_setup_context)


def rq_spline(t: Tensor, knots: Tensor, bound: float, inverse: bool = False,
              runtime: str = "cuda") -> tuple[Tensor, Tensor]:
    """The fused spline (see the module docs); validates its arguments,
    naming the one at fault."""
    for name, x in (("t", t), ("knots", knots)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if t.dtype not in (torch.float32, torch.float64) or knots.dtype != t.dtype:
        raise TypeError(f"t and knots must both be float32 or float64, got {t.dtype} and "
                        f"{knots.dtype}")
    if t.dim() != 4:
        raise ValueError(f"t must have 4 dimensions (B, C, H, W), got shape {tuple(t.shape)}")
    if knots.dim() != 3 or knots.shape[0] != 3 or knots.shape[1] != t.shape[1] \
            or knots.shape[2] < 2:
        raise ValueError(f"knots must have shape (3, C={t.shape[1]}, bins + 1 >= 2), got "
                         f"{tuple(knots.shape)}")
    _check(t, knots, runtime)
    return torch.ops.invconv.rq_spline(t, knots, float(bound), bool(inverse), runtime)
