"""PyTorch adapters: differentiable ops and the flow layers.

Functional ops ``conv2d`` and ``inv_conv2d`` take the same options as the
array API (``corner``, ``groups``, ``unit_diagonal``) and are registered with
:func:`torch.library.custom_op` in the ``invconv::`` namespace, with fake
(meta) kernels so ``torch.compile`` traces them, and autograd formulas whose
backward launches are custom ops themselves:

- ``invconv::conv2d`` / ``invconv::inv_conv2d``: ``M x`` and ``M^-1 y``;
- ``invconv::conv2d_adjoint`` / ``invconv::inv_conv2d_adjoint``: ``M^T g`` and ``M^-T g``;
- ``invconv::conv2d_weight_grad``: the weight gradient shared by both.

Only the gradients that are needed are computed (a frozen weight costs no
weight-gradient launch). Double backward is not supported: differentiating
the backward ops raises an error from PyTorch.

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

import numpy as np
import torch
from torch import Tensor

from . import _api

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


def _torch_allocator():
    """A CuPy allocator that takes memory from PyTorch's caching allocator."""
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
    import cupy
    stream = torch.cuda.current_stream(device)
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
        return torch.zeros_like(weight if method == "_weight_grad" else first)
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


def _register(fn, fake):
    op = torch.library.custom_op(f"invconv::{fn.__name__.lstrip('_')}", mutates_args=())(fn)
    op.register_fake(fake)
    return op


def _like_first(first, *rest):
    return torch.empty_like(first)


def _like_weight(grad_out, x, weight, *rest):
    return torch.empty_like(weight)


conv2d_op = _register(_conv2d, _like_first)
inv_conv2d_op = _register(_inv_conv2d, _like_first)
conv2d_adjoint_op = _register(_conv2d_adjoint, _like_first)
inv_conv2d_adjoint_op = _register(_inv_conv2d_adjoint, _like_first)
conv2d_weight_grad_op = _register(_conv2d_weight_grad, _like_weight)


def _setup_conv2d(ctx, inputs, output):
    x, weight, *opts = inputs
    ctx.save_for_backward(x, weight)
    ctx.opts = opts


def _backward_conv2d(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = conv2d_adjoint_op(grad, weight, *ctx.opts) if ctx.needs_input_grad[0] else None
    grad_w = (conv2d_weight_grad_op(grad, x, weight, 1.0, *ctx.opts)
              if ctx.needs_input_grad[1] else None)
    return grad_x, grad_w, None, None, None


def _setup_inv_conv2d(ctx, inputs, output):
    _, weight, *opts = inputs
    ctx.save_for_backward(output, weight)   # the weight gradient needs x = M^-1 y
    ctx.opts = opts


def _backward_inv_conv2d(ctx, grad):
    x, weight = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:2]):
        return None, None, None, None, None
    grad_y = inv_conv2d_adjoint_op(grad, weight, *ctx.opts)
    grad_w = (conv2d_weight_grad_op(grad_y, x, weight, -1.0, *ctx.opts)
              if ctx.needs_input_grad[1] else None)
    return (grad_y if ctx.needs_input_grad[0] else None), grad_w, None, None, None


conv2d_op.register_autograd(_backward_conv2d, setup_context=_setup_conv2d)
inv_conv2d_op.register_autograd(_backward_inv_conv2d, setup_context=_setup_inv_conv2d)


def _check_options(x, weight, corner, groups, unit_diagonal):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        raise TypeError(f"x and weight must both be float32 or float64, got {x.dtype} "
                        f"and {weight.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dimensions (B, C, H, W), got shape {tuple(x.shape)}")
    _api.make_conv(tuple(weight.shape), corner=corner, groups=groups,
                   unit_diagonal=unit_diagonal, channels=x.shape[1])


def conv2d(x: Tensor, weight: Tensor, *, corner: str = "top-left", groups: int = 1,
           unit_diagonal: bool = True) -> Tensor:
    """Differentiable masked convolution (see :func:`invconv.conv2d`).

    x : (B, C, H, W) -> (B, C, H, W); weight : (C, C // groups, kh, kw).
    """
    _check_options(x, weight, corner, groups, unit_diagonal)
    return conv2d_op(x, weight, corner, groups, bool(unit_diagonal))


def inv_conv2d(y: Tensor, weight: Tensor, *, corner: str = "top-left", groups: int = 1,
               unit_diagonal: bool = True) -> Tensor:
    """Differentiable inverse of the masked convolution (see :func:`invconv.inv_conv2d`).

    y : (B, C, H, W) -> (B, C, H, W); weight : (C, C // groups, kh, kw).
    """
    _check_options(y, weight, corner, groups, unit_diagonal)
    return inv_conv2d_op(y, weight, corner, groups, bool(unit_diagonal))


# --------------------------------------------------------------------------
# layers


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
        kh, kw = ((kernel_size, kernel_size) if isinstance(kernel_size, int)
                  else tuple(kernel_size))
        conv = _api.make_conv((channels, channels // groups if groups else 0, kh, kw),
                              corner=corner, groups=groups,
                              unit_diagonal=not learn_diagonal)
        self.conv = conv
        self.channels, self.kernel_size, self.corner, self.groups = channels, (kh, kw), corner, groups
        self.learn_diagonal, self.init_std = bool(learn_diagonal), float(init_std)
        factory = dict(dtype=dtype, device=device)
        self.weight = torch.nn.Parameter(torch.empty(conv.ignored_mask().shape, **factory))
        if self.learn_diagonal:
            self.log_diag = torch.nn.Parameter(torch.zeros(channels, **factory))
            self.register_buffer("diag_sign", torch.ones(channels, **factory))
            mask = np.zeros(conv.ignored_mask().shape, dtype=bool)
            u0, v0 = conv.same_pixel_tap
            c = np.arange(channels)
            mask[c, c % conv.group_channels, u0, v0] = True
            self.register_buffer("_diag_mask", torch.from_numpy(mask), persistent=False)
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

