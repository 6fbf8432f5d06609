"""PyTorch adapters: differentiable ops and the flow layers.

Functional ops ``conv2d`` and ``inv_conv2d`` take the same options as the
array API (``corner``, ``groups``, ``unit_diagonal``) and are PyTorch
operators in the ``invconv::`` namespace, with fake (meta) kernels so
``torch.compile(fullgraph=True)`` traces them:

- ``invconv::conv2d`` / ``invconv::inv_conv2d``: ``M x`` and ``M^-1 y``;
- ``invconv::conv2d_adjoint`` / ``invconv::inv_conv2d_adjoint``: ``M^T g`` and ``M^-T g``;
- ``invconv::conv2d_weight_grad``: the weight gradient shared by both.

All five are differentiable in both modes, and each derivative is one of the
five again (``M`` is linear in ``x`` and in ``W``), so every transform
composes: backward (only the gradients that are needed: a frozen weight costs
no weight-gradient launch), double backward and Hessians, forward mode
(``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``),
``torch.func.grad``/``jacrev``/``vjp``, and ``vmap``.  A vmapped image
dimension joins the batch and a vmapped weight becomes extra channel groups,
so a vmapped call is one launch, not a loop.

CPU tensors go through the NumPy/BLAS backend "cpu"; CUDA tensors go to the
CuPy kernels through DLPack without copies, on ``torch.cuda.current_stream()``,
with every CuPy allocation (outputs and scratch) served by PyTorch's caching
allocator.  On CUDA no op synchronises with the host, so a zero on the
diagonal with ``unit_diagonal=False`` is not checked there (it yields
inf/NaN); on the CPU it raises ``ValueError`` as in the array API.

Layers follow the nflows/zuko convention: both directions return
``(outputs, logabsdet)`` with ``logabsdet`` of shape ``(batch,)``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers

import numpy as np
import torch
from torch import Tensor
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.function import _SingleLevelFunction

from . import _api, _cache

__all__ = ["conv2d", "inv_conv2d", "InvConv2d", "MaskedConv2d"]

# --------------------------------------------------------------------------
# running the array backends on tensors


class _TorchBlock:
    """Owner of one block from PyTorch's caching allocator; frees it when CuPy lets go."""

    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr

    def __del__(self):
        try:
            torch.cuda.caching_allocator_delete(self.ptr)
        except Exception:  # interpreter shutdown: the allocator is gone already
            pass


@functools.lru_cache(maxsize=1)
def _torch_allocator():
    """A CuPy allocator that takes memory from PyTorch's caching allocator
    (one for the process: it reads the current device and stream per call)."""
    import cupy

    def allocate(size):
        device = cupy.cuda.Device().id
        if size == 0:
            return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None, device), 0)
        ptr = torch.cuda.caching_allocator_alloc(size, device, torch.cuda.current_stream(device))
        # UnownedMemory keeps its owner alive for as long as CuPy uses the memory.
        memory = cupy.cuda.UnownedMemory(ptr, size, _TorchBlock(ptr), device)
        return cupy.cuda.MemoryPointer(memory, 0)
    return allocate


def _cupy_stream(device):
    """CuPy's handle of torch's current stream on ``device``, made once per
    stream (creating one per call cost microseconds of every launch)."""
    stream = torch.cuda.current_stream(device)
    key = (device.index, stream.cuda_stream)
    wrapped = _cupy_streams.get(key)
    if wrapped is None:
        wrapped = _cupy_streams.put(key, _wrap_stream(stream, device), 1)
    return wrapped


# Torch streams as CuPy streams, by (device, handle); a handle names one live
# stream at a time, so a recycled handle is the same stream.
_cupy_streams = _cache.BoundedCache(max_entries=64, max_bytes=1 << 20)


def _wrap_stream(stream, device):
    import cupy
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        try:
            return from_external(stream)
        except Exception:  # older protocol support; the raw handle always works
            pass
    return cupy.cuda.ExternalStream(stream.cuda_stream, device.index)


@contextlib.contextmanager
def _cuda_context(device):
    import cupy
    with cupy.cuda.Device(device.index), cupy.cuda.using_allocator(_torch_allocator()):
        yield _cupy_stream(device)


def _run(method, images, weight, corner, groups, unit_diagonal, *extra):
    """Apply backend ``method`` of :mod:`invconv._api` to tensors.

    The backend is the registry's default for the tensors' device; the
    diagonal check of a solve is :func:`invconv._api._prepare`'s, skipped on
    CUDA where it would synchronise with the host.
    """
    names = list(images)
    first = images[names[0]]
    if first.numel() == 0:
        like = weight if method == "_weight_grad" else first
        return like.new_zeros(like.shape)    # contiguous, like every result (see _like_first)
    solve = method in ("_solve", "_solve_adjoint")
    if first.is_cuda:
        import cupy
        # Every DLPack exchange and launch happens on torch's current stream,
        # so neither side inserts a cross-stream wait (CUDA graph capture
        # forbids those).
        with _cuda_context(first.device) as stream, stream:
            call = _api._prepare({n: cupy.from_dlpack(t.detach()) for n, t in images.items()},
                                 cupy.from_dlpack(weight.detach()), corner=corner,
                                 groups=groups, unit_diagonal=unit_diagonal, backend=None,
                                 stream=None, solve=solve, host_sync=False)
            out = _api._run(call, method, *_backend_args(method, call, extra))
            return torch.from_dlpack(out)
    call = _api._prepare({n: t.detach().numpy() for n, t in images.items()},
                         weight.detach().numpy(), corner=corner, groups=groups,
                         unit_diagonal=unit_diagonal, backend=None, stream=None, solve=solve)
    return torch.from_numpy(_api._run(call, method, *_backend_args(method, call, extra)))


def _backend_args(method, call, extra):
    # The weight gradient reads only images; the other methods take the weight.
    weight = () if method == "_weight_grad" else (call.weight,)
    return (*call.arrays.values(), *weight, *extra)


# --------------------------------------------------------------------------
# custom ops

# custom_op reads the schema from annotations, so each op states its own.
def _conv2d(x: Tensor, weight: Tensor, corner: str, groups: int,
            unit_diagonal: bool) -> Tensor:
    return _run("_forward", {"x": x}, weight, corner, groups, unit_diagonal)


def _inv_conv2d(y: Tensor, weight: Tensor, corner: str, groups: int,
                unit_diagonal: bool) -> Tensor:
    return _run("_solve", {"y": y}, weight, corner, groups, unit_diagonal)


def _conv2d_adjoint(grad_y: Tensor, weight: Tensor, corner: str, groups: int,
                    unit_diagonal: bool) -> Tensor:
    return _run("_forward_adjoint", {"grad_y": grad_y}, weight, corner, groups, unit_diagonal)


def _inv_conv2d_adjoint(grad_x: Tensor, weight: Tensor, corner: str, groups: int,
                        unit_diagonal: bool) -> Tensor:
    return _run("_solve_adjoint", {"grad_x": grad_x}, weight, corner, groups, unit_diagonal)


def _conv2d_weight_grad(grad_out: Tensor, x: Tensor, weight: Tensor, scale: float,
                        corner: str, groups: int, unit_diagonal: bool) -> Tensor:
    """``scale * d<grad_out, M(W) x>/dW``; ``weight`` gives shape and options only."""
    return _run("_weight_grad", {"grad_out": grad_out, "x": x}, weight, corner, groups,
                unit_diagonal, scale)


# The ops are registered with the low-level torch.library API rather than
# torch.library.custom_op: custom_op's register_autograd is reverse mode only
# (a dual tensor from torch.func.jvp or forward_ad passes through with a zero
# tangent, and torch.func.grad refuses its autograd.Function).  Here each op
# gets its own Autograd kernel recording backward and jvp formulas (see
# _differentiable), so every torch.func transform composes with it, and a
# vmap rule that turns a vmapped dimension into a batch or channel-group
# dimension (one launch, no loop).  torch.compile still sees one opaque op
# with a fake kernel.
_LIB = torch.library.Library("invconv", "FRAGMENT")


def _register(fn, fake, vmap_rule):
    name = fn.__name__.lstrip("_")
    _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()),
                tags=(torch.Tag.pt2_compliant_tag,))
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    op = getattr(torch.ops.invconv, name).default
    torch.library.register_fake(op, fake, lib=_LIB)
    torch.library.register_vmap(op, vmap_rule(op), lib=_LIB)
    return op


# The fake kernels must promise the strides the real ops deliver: contiguous
# whatever the input's layout (empty_like would copy a non-contiguous input's
# strides, and a compiled graph's later views of the result would then fail).
def _like_first(first, *rest):
    return first.new_empty(first.shape)


def _like_weight(grad_out, x, weight, *rest):
    return weight.new_empty(weight.shape)


def _unbatched_shape(t, bdim):
    return t.shape if bdim is None else t.shape[:bdim] + t.shape[bdim + 1:]


def _stack_images(images, bdim, n):
    """vmapped (n, B, C, H, W) -> (B, n*C, H, W): copy i of the map becomes channel block i."""
    B, C, H, W = _unbatched_shape(images, bdim)
    images = images.expand(n, B, C, H, W) if bdim is None else images.movedim(bdim, 0)
    return images.transpose(0, 1).reshape(B, n * C, H, W)


def _stack_weights(weight, bdim, n):
    """vmapped (n, C, C_g, kh, kw) -> (n*C, C_g, kh, kw): n independent channel groups."""
    shape = _unbatched_shape(weight, bdim)
    weight = weight.expand(n, *shape) if bdim is None else weight.movedim(bdim, 0)
    return weight.reshape(n * shape[0], *shape[1:])


def _image_vmap(op):
    """vmap rule of an op ``(image, weight, corner, groups, unit_diagonal) -> image``."""
    def rule(info, in_dims, image, weight, corner, groups, unit_diagonal):
        image_dim, weight_dim = in_dims[:2]
        if weight_dim is None:      # one operator: the vmapped dimension joins the batch
            images = image.movedim(image_dim, 0)
            n, B, C, H, W = images.shape
            out = op(images.reshape(n * B, C, H, W), weight, corner, groups, unit_diagonal)
            return out.reshape(n, B, C, H, W), 0
        # One operator per copy: a block-diagonal operator with n times the groups.
        n = info.batch_size
        B, C, H, W = _unbatched_shape(image, image_dim)
        out = op(_stack_images(image, image_dim, n), _stack_weights(weight, weight_dim, n),
                 corner, groups * n, unit_diagonal)
        return out.reshape(B, n, C, H, W), 1
    return rule


def _weight_grad_vmap(op):
    def rule(info, in_dims, grad_out, x, weight, scale, corner, groups, unit_diagonal):
        grad_dim, x_dim, weight_dim = in_dims[:3]
        if grad_dim is None and x_dim is None:  # the weight's values are not read
            return op(grad_out, x, weight.select(weight_dim, 0), scale, corner, groups,
                      unit_diagonal), None
        n = info.batch_size
        shape = _unbatched_shape(weight, weight_dim)
        out = op(_stack_images(grad_out, grad_dim, n), _stack_images(x, x_dim, n),
                 _stack_weights(weight, weight_dim, n), scale, corner, groups * n, unit_diagonal)
        return out.reshape(n, *shape), 0
    return rule


conv2d_op = _register(_conv2d, _like_first, _image_vmap)
inv_conv2d_op = _register(_inv_conv2d, _like_first, _image_vmap)
conv2d_adjoint_op = _register(_conv2d_adjoint, _like_first, _image_vmap)
inv_conv2d_adjoint_op = _register(_inv_conv2d_adjoint, _like_first, _image_vmap)
conv2d_weight_grad_op = _register(_conv2d_weight_grad, _like_weight, _weight_grad_vmap)


class _Ops:
    """The five ops as the derivative formulas below call them: ``DISPATCHED``
    (the registered operators: differentiable again, seen by every torch.func
    transform and by torch.compile) or ``DIRECT`` (the backend calls
    themselves, for plain tensors where no further derivative is recorded)."""

    def __init__(self, conv2d, inv_conv2d, conv2d_adjoint, inv_conv2d_adjoint, weight_grad):
        self.conv2d, self.inv_conv2d = conv2d, inv_conv2d
        self.conv2d_adjoint, self.inv_conv2d_adjoint = conv2d_adjoint, inv_conv2d_adjoint
        self.weight_grad = weight_grad


_DISPATCHED = _Ops(conv2d_op, inv_conv2d_op, conv2d_adjoint_op, inv_conv2d_adjoint_op,
                   conv2d_weight_grad_op)
_DIRECT = _Ops(_conv2d, _inv_conv2d, _conv2d_adjoint, _inv_conv2d_adjoint, _conv2d_weight_grad)
_BACKEND_OF = {conv2d_op: _conv2d, inv_conv2d_op: _inv_conv2d,
               conv2d_adjoint_op: _conv2d_adjoint, inv_conv2d_adjoint_op: _inv_conv2d_adjoint,
               conv2d_weight_grad_op: _conv2d_weight_grad}


# --------------------------------------------------------------------------
# derivatives
#
# M(W) is linear in W as well as in x.  Its derivative along a weight
# direction dW is M'(dW): the masked convolution with dW whose ignored entries
# are zero -- including the diagonal when unit_diagonal=True, since a constant
# 1 has no tangent.  So every formula below is one of the five ops again, and
# derivatives of derivatives (Hessians, forward-over-reverse) work too.


def _diagonal_mask(shape, corner, groups, device):
    """Boolean tensor of a weight's shape: True on the same-pixel diagonal."""
    conv = _api.make_conv(tuple(shape), corner=corner, groups=groups, unit_diagonal=True)
    mask = np.zeros(tuple(shape), dtype=bool)
    u0, v0 = conv.same_pixel_tap
    c = np.arange(conv.channels)
    mask[c, c % conv.group_channels, u0, v0] = True
    return torch.from_numpy(mask).to(device)


def _linear_part(op, image, weight_direction, corner, groups, unit_diagonal):
    """``op`` (conv2d or its adjoint) with M'(dW) in place of M(W)."""
    if unit_diagonal:
        mask = _diagonal_mask(weight_direction.shape, corner, groups, weight_direction.device)
        weight_direction = weight_direction.masked_fill(mask, 0)
    return op(image, weight_direction, corner, groups, False)


def _save(ctx, *tensors):
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


# y = M x
def _setup_conv2d(ctx, inputs, output):
    x, weight, *opts = inputs
    _save(ctx, x, weight)
    ctx.opts = opts


def _backward_conv2d(ctx, grad, ops=_DISPATCHED):
    x, weight = ctx.saved_tensors
    grad_x = ops.conv2d_adjoint(grad, weight, *ctx.opts) if ctx.needs_input_grad[0] else None
    grad_w = (ops.weight_grad(grad, x, weight, 1.0, *ctx.opts)
              if ctx.needs_input_grad[1] else None)
    return grad_x, grad_w, None, None, None


def _jvp_conv2d(ctx, x_t, weight_t, *_):
    # d(M x) = M dx + M'(dW) x
    x, weight = ctx.saved_tensors
    out = None if x_t is None else conv2d_op(x_t, weight, *ctx.opts)
    if weight_t is not None:
        by_weight = _linear_part(conv2d_op, x, weight_t, *ctx.opts)
        out = by_weight if out is None else out + by_weight
    return out


# x = M^-1 y
def _setup_inv_conv2d(ctx, inputs, output):
    _, weight, *opts = inputs
    _save(ctx, output, weight)   # the weight derivatives need x = M^-1 y
    ctx.opts = opts


def _backward_inv_conv2d(ctx, grad, ops=_DISPATCHED):
    x, weight = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:2]):
        return None, None, None, None, None
    grad_y = ops.inv_conv2d_adjoint(grad, weight, *ctx.opts)
    grad_w = (ops.weight_grad(grad_y, x, weight, -1.0, *ctx.opts)
              if ctx.needs_input_grad[1] else None)
    return (grad_y if ctx.needs_input_grad[0] else None), grad_w, None, None, None


def _jvp_inv_conv2d(ctx, y_t, weight_t, *_):
    # M x = y gives M dx = dy - M'(dW) x: one more solve.
    x, weight = ctx.saved_tensors
    rhs = y_t
    if weight_t is not None:
        by_weight = _linear_part(conv2d_op, x, weight_t, *ctx.opts)
        rhs = -by_weight if rhs is None else rhs - by_weight
    return inv_conv2d_op(rhs, weight, *ctx.opts)


# h = M^T g
def _setup_conv2d_adjoint(ctx, inputs, output):
    grad, weight, *opts = inputs
    _save(ctx, grad, weight)
    ctx.opts = opts


def _backward_conv2d_adjoint(ctx, grad_h, ops=_DISPATCHED):
    # <G, M^T g> = <g, M G>
    grad, weight = ctx.saved_tensors
    grad_g = ops.conv2d(grad_h, weight, *ctx.opts) if ctx.needs_input_grad[0] else None
    grad_w = (ops.weight_grad(grad, grad_h, weight, 1.0, *ctx.opts)
              if ctx.needs_input_grad[1] else None)
    return grad_g, grad_w, None, None, None


def _jvp_conv2d_adjoint(ctx, grad_t, weight_t, *_):
    grad, weight = ctx.saved_tensors
    out = None if grad_t is None else conv2d_adjoint_op(grad_t, weight, *ctx.opts)
    if weight_t is not None:
        by_weight = _linear_part(conv2d_adjoint_op, grad, weight_t, *ctx.opts)
        out = by_weight if out is None else out + by_weight
    return out


# h = M^-T g
def _setup_inv_conv2d_adjoint(ctx, inputs, output):
    _, weight, *opts = inputs
    _save(ctx, output, weight)
    ctx.opts = opts


def _backward_inv_conv2d_adjoint(ctx, grad_h, ops=_DISPATCHED):
    # <G, dh> = -<M^-1 G, dM^T h> = -<h, dM u> with u = M^-1 G
    h, weight = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:2]):
        return None, None, None, None, None
    u = ops.inv_conv2d(grad_h, weight, *ctx.opts)
    grad_w = (ops.weight_grad(h, u, weight, -1.0, *ctx.opts)
              if ctx.needs_input_grad[1] else None)
    return (u if ctx.needs_input_grad[0] else None), grad_w, None, None, None


def _jvp_inv_conv2d_adjoint(ctx, grad_t, weight_t, *_):
    # M^T h = g gives M^T dh = dg - M'(dW)^T h.
    h, weight = ctx.saved_tensors
    rhs = grad_t
    if weight_t is not None:
        by_weight = _linear_part(conv2d_adjoint_op, h, weight_t, *ctx.opts)
        rhs = -by_weight if rhs is None else rhs - by_weight
    return inv_conv2d_adjoint_op(rhs, weight, *ctx.opts)


# G_W = scale * d<g, M x>/dW: bilinear in (g, x); reads only the weight's shape.
def _setup_weight_grad(ctx, inputs, output):
    grad, x, weight, scale, *opts = inputs
    _save(ctx, grad, x, weight)
    ctx.scale, ctx.opts = scale, opts


def _backward_weight_grad(ctx, grad_gw, ops=_DISPATCHED):
    # <Gw, G_W> = scale * <g, M'(Gw) x>
    grad, x, weight = ctx.saved_tensors
    grad_g = grad_x = None
    if ctx.needs_input_grad[0]:
        grad_g = ctx.scale * _linear_part(ops.conv2d, x, grad_gw, *ctx.opts)
    if ctx.needs_input_grad[1]:
        grad_x = ctx.scale * _linear_part(ops.conv2d_adjoint, grad, grad_gw, *ctx.opts)
    return grad_g, grad_x, None, None, None, None, None


def _jvp_weight_grad(ctx, grad_t, x_t, weight_t, *_):
    grad, x, weight = ctx.saved_tensors
    if grad_t is None and x_t is None:   # a weight tangent alone: the values are not read
        return torch.zeros_like(weight)
    out = None if grad_t is None else conv2d_weight_grad_op(grad_t, x, weight, ctx.scale,
                                                            *ctx.opts)
    if x_t is not None:
        by_x = conv2d_weight_grad_op(grad, x_t, weight, ctx.scale, *ctx.opts)
        out = by_x if out is None else out + by_x
    return out


def _differentiable(op, setup_context, backward, jvp):
    """Give ``op`` an Autograd kernel that records these formulas.

    The kernel applies a single-level autograd.Function directly, as a
    built-in op's Autograd kernel records on the tensors of the level it runs
    at; under torch.func transforms the functorch interpreters have already
    brought the op to that level.  (``autograd.Function.apply`` would hand it
    back to functorch, which cannot take it from inside a dispatcher kernel;
    functorch's own autograd.Function support uses the same single-level
    Function, hence the flag that allows it.)
    """
    def forward(*args):
        # Both grad modes are off here, so this call reaches the backend.
        return op(*args)

    function = type(f"{op._opname}_function", (_SingleLevelFunction,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp)})

    def autograd_kernel(keyset, *args):
        # Forward mode is on by default, whatever the grad mode: only inside
        # forward() above is there nothing to record.
        if torch.is_grad_enabled() or torch._C._is_fwd_grad_enabled():
            with enable_single_level_autograd_function():
                return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _LIB.impl(op._opname, autograd_kernel, "Autograd", with_keyset=True)
    _FAST[op] = _fast_function(op, setup_context, backward, jvp)


# --------------------------------------------------------------------------
# the fast path
#
# Through the dispatcher a call crosses three Python kernels (the op, its
# Autograd kernel, the function's forward calling the op again below
# autograd), which cost several times the backend call on small images.  For
# plain tensors -- no torch.func transform, no torch.compile tracing, no
# forward-mode level, no torch_function or dispatch mode, CPU or CUDA tensors
# of the base class -- nothing but autograd needs to see the op, so the
# public functions call the backend directly (no gradient needed) or through
# a plain autograd.Function recording the same formulas; its backward calls
# the backends directly too unless it builds a graph (create_graph), which
# goes through the dispatched ops so that it is differentiable again.

_FAST: dict = {}
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _plain(*tensors) -> bool:
    """True where nothing but autograd needs to see the op (see above)."""
    if (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.forward_ad._current_level >= 0
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack()):
        return False
    return all(type(t) in _PLAIN_TYPES and t.device.type in ("cpu", "cuda") for t in tensors)


def _fast_function(op, setup_context, backward, jvp):
    """A plain autograd.Function with ``op``'s formulas (see above)."""
    backend = _BACKEND_OF[op]

    # forward takes ctx (no setup_context staticmethod): Function.apply then
    # skips binding the arguments with inspect.signature, which alone cost
    # about 15 us a call
    def fast_forward(ctx, *args):
        output = backend(*args)
        setup_context(ctx, args, output)
        return output

    def fast_backward(ctx, *grads):
        direct = not torch.is_grad_enabled() and _plain(*grads, *ctx.saved_tensors)
        return backward(ctx, *grads, ops=_DIRECT if direct else _DISPATCHED)

    return type(f"{op._opname}_fast", (torch.autograd.Function,), {
        "forward": staticmethod(fast_forward), "backward": staticmethod(fast_backward),
        "jvp": staticmethod(jvp)})


def _call(op, image, weight, *options):
    """``op(image, weight, *options)`` by the fastest route that records what is needed."""
    if not _plain(image, weight):
        return op(image, weight, *options)
    if torch.is_grad_enabled() and (image.requires_grad or weight.requires_grad):
        return _FAST[op].apply(image, weight, *options)
    return _BACKEND_OF[op](image, weight, *options)


_differentiable(conv2d_op, _setup_conv2d, _backward_conv2d, _jvp_conv2d)
_differentiable(inv_conv2d_op, _setup_inv_conv2d, _backward_inv_conv2d, _jvp_inv_conv2d)
_differentiable(conv2d_adjoint_op, _setup_conv2d_adjoint, _backward_conv2d_adjoint,
                _jvp_conv2d_adjoint)
_differentiable(inv_conv2d_adjoint_op, _setup_inv_conv2d_adjoint,
                _backward_inv_conv2d_adjoint, _jvp_inv_conv2d_adjoint)
_differentiable(conv2d_weight_grad_op, _setup_weight_grad, _backward_weight_grad,
                _jvp_weight_grad)


def _check_options(x, weight, corner, groups, unit_diagonal, image="x"):
    """Validate a functional op's arguments; ``image`` is the name of ``x`` in messages.

    A signature seen before (the tensors' types, devices, dtypes and shapes,
    the options with their types) passes without the checks again.
    """
    if torch.compiler.is_compiling():   # traced once; dynamo cannot enter the cache's lock
        return _check_options_once(x, weight, corner, groups, unit_diagonal, image)
    try:
        signature = (type(x), type(weight), x.device, weight.device, x.dtype, weight.dtype,
                     x.shape, weight.shape, type(corner), corner, type(groups), groups,
                     type(unit_diagonal), unit_diagonal, image)
        if _checked.get(signature) is not None:
            return
    except (AttributeError, TypeError):  # not tensors, or unhashable options: checked below
        signature = None
    _check_options_once(x, weight, corner, groups, unit_diagonal, image)
    if signature is not None:
        _checked.put(signature, True, 1)


_checked = _cache.BoundedCache(max_entries=1024, max_bytes=1 << 30)


def _check_options_once(x, weight, corner, groups, unit_diagonal, image):
    for name, t in ((image, x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.device != weight.device:
        raise ValueError(f"{image} is on {x.device} but weight is on {weight.device}")
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        raise TypeError(f"{image} and weight must both be float32 or float64, got {x.dtype} "
                        f"and {weight.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{image} must have 4 dimensions (B, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    _api.make_conv(tuple(weight.shape), corner=corner, groups=groups,
                   unit_diagonal=unit_diagonal, channels=x.shape[1], image=image)


def conv2d(x: Tensor, weight: Tensor, *, corner: str = "top-left", groups: int = 1,
           unit_diagonal: bool = True) -> Tensor:
    """Differentiable masked convolution (see :func:`invconv.conv2d`).

    x : (B, C, H, W) -> (B, C, H, W); weight : (C, C // groups, kh, kw).
    """
    _check_options(x, weight, corner, groups, unit_diagonal)
    return _call(conv2d_op, x, weight, corner, groups, bool(unit_diagonal))


def inv_conv2d(y: Tensor, weight: Tensor, *, corner: str = "top-left", groups: int = 1,
               unit_diagonal: bool = True) -> Tensor:
    """Differentiable inverse of the masked convolution (see :func:`invconv.inv_conv2d`).

    y : (B, C, H, W) -> (B, C, H, W); weight : (C, C // groups, kh, kw).
    """
    _check_options(y, weight, corner, groups, unit_diagonal, image="y")
    return _call(inv_conv2d_op, y, weight, corner, groups, bool(unit_diagonal))


# --------------------------------------------------------------------------
# layers


def _check_layer_arguments(channels, kernel_size, corner, groups, learn_diagonal, init_std):
    """Validate a layer's constructor arguments, naming the one at fault.

    Returns ``(channels, (kh, kw), groups, init_std)`` as Python numbers.
    """
    channels = _api._check_int(channels, "channels", 1)
    if isinstance(kernel_size, (tuple, list)):
        if len(kernel_size) != 2:
            raise ValueError(f"kernel_size must be an int or a pair (kh, kw), got "
                             f"{tuple(kernel_size)!r} of length {len(kernel_size)}")
        kernel = tuple(_api._check_int(k, f"kernel_size[{i}]", 1)
                       for i, k in enumerate(kernel_size))
    elif isinstance(kernel_size, numbers.Integral) and not isinstance(kernel_size, bool):
        k = _api._check_int(kernel_size, "kernel_size", 1)
        kernel = (k, k)
    else:
        raise TypeError(f"kernel_size must be an int or a pair (kh, kw) of ints, got "
                        f"{type(kernel_size).__name__}")
    if not isinstance(corner, str) or corner not in _api.CORNERS:
        raise ValueError(f"corner must be one of {_api.CORNERS}, got {corner!r}")
    groups = _api._check_int(groups, "groups", 1)
    if channels % groups:
        raise ValueError(f"channels={channels} is not divisible by groups={groups}")
    if not isinstance(learn_diagonal, (bool, np.bool_)):
        raise TypeError(f"learn_diagonal must be a bool, got {type(learn_diagonal).__name__}")
    if isinstance(init_std, bool) or not isinstance(init_std, numbers.Real):
        raise TypeError(f"init_std must be a real number, got {type(init_std).__name__}")
    if not (math.isfinite(init_std) and init_std >= 0):
        raise ValueError(f"init_std must be finite and >= 0, got {init_std}")
    return channels, kernel, groups, float(init_std)


class _MaskedConvLayer(torch.nn.Module):
    """Shared parameters of :class:`InvConv2d` and :class:`MaskedConv2d`.

    The weight is stored whole, shape ``(C, C // groups, k, k)``; the ops
    ignore its masked entries (they get no gradient).  With
    ``learn_diagonal=True`` the same-pixel diagonal is ``sign * exp(log_diag)``
    (``log_diag`` a parameter, initialised to 0; ``sign`` a buffer of +-1), so
    it can never be zero; otherwise it is 1.

    ``reset_parameters`` draws the other taps from N(0, init_std^2): near the
    identity, so the map starts well conditioned.
    """

    def __init__(self, channels, kernel_size=3, *, corner="top-left", groups=1,
                 learn_diagonal=False, init_std=0.01, dtype=None, device=None):
        super().__init__()
        channels, (kh, kw), groups, init_std = _check_layer_arguments(
            channels, kernel_size, corner, groups, learn_diagonal, init_std)
        conv = _api.make_conv((channels, channels // groups, kh, kw), corner=corner,
                              groups=groups, unit_diagonal=not learn_diagonal)
        self.conv = conv
        self.channels, self.kernel_size, self.corner, self.groups = channels, (kh, kw), corner, groups
        self.learn_diagonal, self.init_std = bool(learn_diagonal), float(init_std)
        factory = dict(dtype=dtype, device=device)
        self.weight = torch.nn.Parameter(torch.empty(conv.ignored_mask().shape, **factory))
        if self.learn_diagonal:
            self.log_diag = torch.nn.Parameter(torch.zeros(channels, **factory))
            self.register_buffer("diag_sign", torch.ones(channels, **factory))
            self.register_buffer("_diag_mask", _diagonal_mask(self.weight.shape, corner, groups,
                                                              self.weight.device),
                                 persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)
            if self.learn_diagonal:
                self.log_diag.zero_()
                self.diag_sign.fill_(1.0)

    def effective_weight(self) -> Tensor:
        """The weight handed to the ops (the learned diagonal put in place)."""
        if not self.learn_diagonal:
            return self.weight
        diag = (self.diag_sign * torch.exp(self.log_diag))[:, None, None, None]
        return torch.where(self._diag_mask, diag, self.weight)

    def log_abs_det(self, x: Tensor) -> Tensor:
        """``log|det M|`` for images shaped like ``x``, per sample: shape (B,)."""
        H, W = x.shape[-2:]
        if not self.learn_diagonal:
            return x.new_zeros(x.shape[0])
        return (H * W * self.log_diag.sum()).expand(x.shape[0])

    def _opts(self):
        return dict(corner=self.corner, groups=self.groups, unit_diagonal=not self.learn_diagonal)

    def _conv(self, x):
        return conv2d(x, self.effective_weight(), **self._opts())

    def _inv(self, x):
        return inv_conv2d(x, self.effective_weight(), **self._opts())

    def extra_repr(self):
        return (f"{self.channels}, kernel_size={self.kernel_size}, corner={self.corner!r}, "
                f"groups={self.groups}, learn_diagonal={self.learn_diagonal}")


class InvConv2d(_MaskedConvLayer):
    """Inverse-Flow layer: the inverse of a masked convolution in the density direction.

    ``forward(x) -> (z, logabsdet)`` with ``z = M^-1 x`` and
    ``logabsdet = -H*W*sum(log|d|)``; ``inverse(z) -> (x, logabsdet)`` with
    ``x = M z`` (a plain masked convolution: fast sampling) and
    ``logabsdet = +H*W*sum(log|d|)``. ``logabsdet`` has shape (B,) and is 0 for
    a unit diagonal. Arguments as in :class:`_MaskedConvLayer`.
    """

    def forward(self, x):
        return self._inv(x), -self.log_abs_det(x)

    def inverse(self, z):
        return self._conv(z), self.log_abs_det(z)


class MaskedConv2d(_MaskedConvLayer):
    """FInC-Flow direction: ``forward`` is the masked convolution, ``inverse`` its inverse.

    ``forward(x) -> (M x, +H*W*sum(log|d|))``, ``inverse(z) -> (M^-1 z, -H*W*sum(log|d|))``.
    """

    def forward(self, x):
        return self._conv(x), self.log_abs_det(x)

    def inverse(self, z):
        return self._inv(z), -self.log_abs_det(z)

