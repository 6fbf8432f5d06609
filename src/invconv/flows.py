"""Normalizing flows built on the inverse of a masked convolution (Inverse-Flow).

Every layer maps the data direction to the latent direction with
``forward(x) -> (y, logabsdet)`` and back with ``inverse(y) -> (x, logabsdet)``,
``logabsdet`` being ``log|det dy/dx|`` (resp. ``log|det dx/dy|``) per sample,
shape ``(B,)`` -- the nflows/zuko convention.  :class:`Split` is the one layer
whose output is a pair ``(kept, factored)``.

Models (:class:`InverseFlow`) are multi-scale like Glow (the paper's Figure
3): per level a squeeze, ``steps`` flow steps and a split (none after the
last level).  An Inverse-Flow step is ``InvConv2d`` (the inverse of a k x k
masked convolution in the density direction, so sampling is a plain
convolution), a spline activation, ActNorm, an invertible 1x1 convolution and
an affine coupling.  Presets: ``inverse-flow``, ``finc-flow`` (the same with
``MaskedConv2d``: convolution to the latent, inverse when sampling), ``glow``
(no k x k layer, no spline), ``emerging`` (Glow with the Emerging k x k
convolution in place of the 1x1) and ``snf-small`` (the 9-layer MNIST flow of
the paper's Table 4: 3 blocks of 3 x [3x3 inverse convolution + spline],
squeeze between blocks; ``snf-small-emerging`` the same with the Emerging
convolution).

Data handling and bits per dimension
------------------------------------
Images are 8-bit.  ``dequantize`` maps ``x in {0..255}`` to
``v = (x + u) / 256`` with ``u ~ U[0, 1)``.  With ``logit=alpha`` the model
sees ``s = logit(alpha + (1 - 2 alpha) v)`` and the Jacobian
``log|ds/dv| = sum log((1 - 2 alpha) / (p (1 - p)))``, ``p = alpha + (1 - 2 alpha) v``,
is added.  For the discrete data the (variational) negative log-likelihood
in nats is ``-log p_V(v) + D log 256``, and

    bits/dim = (-log p_V(v) + D log 256) / (D log 2),

``D = C H W``.  :meth:`InverseFlow.bits_per_dim` computes exactly that.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .capture import CapturedCall, resolve_method
from .torch import InvConv2d, MaskedConv2d

__all__ = ["Squeeze", "Split", "ActNorm", "InvertibleConv1x1", "EmergingConv2d",
           "AffineCoupling", "SplineActivation", "FlowStep", "InverseFlow", "PRESETS",
           "build", "dequantize"]

LOG2 = math.log(2.0)


def _sum_per_sample(t):
    return t.reshape(t.shape[0], -1).sum(1)


def _cacheable(params):
    """Whether parameter-only results may be served from a cache now.

    Only in eager passes that record nothing: with grad mode on they must be
    in the autograd graph; under inference mode a cached inference tensor
    could later meet autograd; while a CUDA graph is being captured the graph
    must compute them itself, so that its replays see in-place parameter
    updates (capture.py's promise); under torch.compile the tracer sees the
    computation; and only for real parameters (``torch.func.functional_call``
    swaps in other tensors).
    """
    if torch.compiler.is_compiling():   # first: the tracer refuses the checks below
        return False
    if torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    if not all(isinstance(p, nn.Parameter) for p in params):
        return False
    if any(p.is_cuda for p in params) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def parameter_cached(module, name, compute, params):
    """``compute()``, a function of ``params`` only, once per parameter version.

    In passes that record no gradient (sampling, evaluation; see
    :func:`_cacheable`) the result is kept on ``module`` with the parameters'
    identity, storage, dtype and version counters, and served again until one
    of them changes: an optimiser step, ``load_state_dict``, ``copy_`` or any
    in-place update bumps the version, ``.to()`` changes the storage.
    (Writes through ``param.data``, which bypass the version counter, are
    not seen: use ``with torch.no_grad(): param.copy_(...)``.)  Elsewhere
    ``compute()`` runs every call.  Served results are equal to computed ones
    bit for bit: the same code computes them.
    """
    if not _cacheable(params):
        return compute()
    key = tuple((id(p), p.data_ptr(), p.dtype, p.device, p._version) for p in params)
    cache = module.__dict__.setdefault("_parameter_cache", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    cache[name] = (key, value)
    return value


class Squeeze(nn.Module):
    """2x2 space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2); volume preserving."""

    def forward(self, x):
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"Squeeze needs even height and width, got {H}x{W}")
        y = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(B, 4 * C, H // 2, W // 2), x.new_zeros(B)

    def inverse(self, y):
        B, C4, H, W = y.shape
        x = y.reshape(B, C4 // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(B, C4 // 4, 2 * H, 2 * W), y.new_zeros(B)


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + bias) * exp(logs)`` with data-dependent init.

    On the first forward pass in training mode the bias and scale are set so
    that the batch has zero mean and unit variance per channel (averaged over
    ranks under ``torch.distributed``).  The ``initialized`` flag is a buffer,
    so checkpoints restore it.
    """

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        sq = (x * x).mean(dim=(0, 2, 3), keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = torch.cat([mean, sq])
            torch.distributed.all_reduce(stats)
            mean, sq = (stats / torch.distributed.get_world_size()).chunk(2)
        std = (sq - mean * mean).clamp_min(0).sqrt()
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def _logdet(self, x):
        logs_sum = parameter_cached(self, "logs_sum", self.logs.sum, (self.logs,))
        return (x.shape[2] * x.shape[3] * logs_sum).expand(x.shape[0])

    def forward(self, x):
        if self.training and not bool(self.initialized):
            self._initialize(x)
        scale = parameter_cached(self, "scale", lambda: torch.exp(self.logs), (self.logs,))
        return (x + self.bias) * scale, self._logdet(x)

    def inverse(self, y):
        inv_scale = parameter_cached(self, "inv_scale", lambda: torch.exp(-self.logs),
                                     (self.logs,))
        return y * inv_scale - self.bias, -self._logdet(y)


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1x1 convolution, LU-parametrised: ``W = P L (U + diag(sign * exp(logs)))``.

    ``P`` (a permutation) and ``sign`` are buffers; ``L`` is unit lower- and
    ``U`` strictly upper-triangular.  Initialised at a random rotation.
    """

    def __init__(self, channels):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.logs = nn.Parameter(torch.log(diag.abs()))

    def _factors(self):
        """(L, U): unit lower- and upper-triangular, ``W = P L U``."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * torch.exp(self.logs))
        return lower, upper

    def _weight(self):
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def _inverse_weight(self):
        # W^-1 = U^-1 L^-1 P^T by two triangular solves: exact for this
        # factorisation, and unlike torch.linalg.inv (which checks for
        # singularity on the host) free of device-host syncs, so it can be
        # captured in a CUDA graph.
        lower, upper = self._factors()
        return torch.linalg.solve_triangular(
            upper, torch.linalg.solve_triangular(lower, self.perm.T, upper=False,
                                                 unitriangular=True), upper=True)

    def _params(self):
        return (self.lower, self.upper, self.logs)

    def weight(self):
        """``W = P L U``; in passes that record no gradient computed once per
        parameter version (:func:`parameter_cached`; the buffers are fixed)."""
        return parameter_cached(self, "weight", self._weight, self._params())

    def _logdet(self, x):
        logs_sum = parameter_cached(self, "logs_sum", self.logs.sum, (self.logs,))
        return (x.shape[2] * x.shape[3] * logs_sum).expand(x.shape[0])

    def forward(self, x):
        return torch.einsum("oi,bihw->bohw", self.weight(), x), self._logdet(x)

    def inverse(self, y):
        w_inv = parameter_cached(self, "inverse_weight", self._inverse_weight, self._params())
        return torch.einsum("oi,bihw->bohw", w_inv, y), -self._logdet(y)


class EmergingConv2d(nn.Module):
    """Emerging convolution (Hoogeboom et al., 2019): two masked convolutions composed.

    x, y : (B, C, H, W).  ``forward(x) -> (y, logabsdet)`` with
    ``y = R M2 R M1 x``: ``M1`` a masked convolution reading the pixels below
    and to the right (``corner="bottom-right"``), ``R`` the channel reversal
    and ``M2`` one reading above and to the left (``corner="top-left"``).  Each
    same-pixel block is triangular with a learned diagonal
    ``sign * exp(log_diag)``; reversing the channels around ``M2`` makes its
    block upper-triangular in the original order, so the composed same-pixel
    map is a full ``C x C`` matrix (an LU-factorised 1x1 convolution) and the
    composed receptive field is the centred ``kernel_size x kernel_size``
    window.  Each factor is a ``(k//2 + 1) x (k//2 + 1)`` masked convolution.

    ``logabsdet = H W (sum log|d1| + sum log|d2|)``, shape (B,);
    ``inverse(y)`` solves ``M2`` then ``M1`` with :func:`invconv.torch.inv_conv2d`
    (exact, one launch each on CUDA), where the published Emerging code inverts
    on the CPU.
    """

    def __init__(self, channels, kernel_size=3, *, init_std=0.01):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int (the composed "
                             f"window), got {kernel_size!r}")
        half = kernel_size // 2 + 1
        self.first = MaskedConv2d(channels, half, corner="bottom-right", learn_diagonal=True,
                                  init_std=init_std)
        self.second = MaskedConv2d(channels, half, corner="top-left", learn_diagonal=True,
                                   init_std=init_std)

    def forward(self, x):
        h, ld1 = self.first(x)
        y, ld2 = self.second(h.flip(1))
        return y.flip(1), ld1 + ld2

    def inverse(self, y):
        h, ld2 = self.second.inverse(y.flip(1))
        x, ld1 = self.first.inverse(h.flip(1))
        return x, ld1 + ld2


class AffineCoupling(nn.Module):
    """RealNVP/Glow affine coupling with a bounded scale.

    The first ``C // 2`` channels pass unchanged and parametrise
    ``y_b = (x_b + shift) * scale`` of the others, with
    ``scale = sigmoid(raw + 2)`` in (0, 1) (Glow's bound) from
    conv3x3 - ReLU - conv1x1 - ReLU - conv3x3, the last one zero-initialised
    so the layer starts as the identity map up to a constant scale.
    """

    def __init__(self, channels, hidden):
        super().__init__()
        if channels < 2:
            raise ValueError(f"AffineCoupling needs at least 2 channels, got {channels}")
        self.c_a = channels // 2
        c_b = channels - self.c_a
        self.net = nn.Sequential(
            nn.Conv2d(self.c_a, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, 2 * c_b, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _params(self, x_a):
        shift, raw = self.net(x_a).chunk(2, dim=1)
        return shift, torch.sigmoid(raw + 2.0)

    def forward(self, x):
        x_a, x_b = x[:, :self.c_a], x[:, self.c_a:]
        shift, scale = self._params(x_a)
        return torch.cat([x_a, (x_b + shift) * scale], 1), _sum_per_sample(torch.log(scale))

    def inverse(self, y):
        y_a, y_b = y[:, :self.c_a], y[:, self.c_a:]
        shift, scale = self._params(y_a)
        return torch.cat([y_a, y_b / scale - shift], 1), -_sum_per_sample(torch.log(scale))


SPLINE_IMPLEMENTATIONS = ("torch", "fused", "emulator")


def _spline_implementation(value):
    """``value`` or, when None, ``$INVCONV_SPLINE`` (default ``"torch"``), checked."""
    name = "implementation"
    if value is None:
        value, name = os.environ.get("INVCONV_SPLINE", "") or "torch", "INVCONV_SPLINE"
    if value not in SPLINE_IMPLEMENTATIONS:
        raise ValueError(f"{name} must be one of {SPLINE_IMPLEMENTATIONS}, got {value!r}")
    return value


def rq_spline_torch(t, knots, bound, inverse=False):
    """The rational-quadratic spline in torch ops: the CPU path and the reference.

    ``t`` (B, C, H, W); ``knots`` (3, C, K+1): per channel the x knots, the y
    knots and the derivatives at the knots (see :meth:`SplineActivation.knot_table`);
    elements with ``-bound < t < bound`` go through the spline (its inverse, a
    quadratic solve, when ``inverse``), the others through unchanged with
    log-derivative 0.  Returns ``(out, logabsdet)``, ``logabsdet`` (B,) the
    log-derivative summed per sample (at the input, or at the output for the
    inverse).  Works in the images' own (B, C, H*W) layout (no transposed
    copies), with one gather for the six per-bin numbers; differentiable.
    """
    B, C = t.shape[:2]
    flat = t.reshape(B, C, -1)
    bins = knots.shape[2] - 1
    bin_table = _bin_table(knots)
    inside = (flat > -bound) & (flat < bound)
    # Outside values go through the spline clamped (then are replaced), so
    # the unused branch of the where below stays finite for autograd.
    flat_in = flat.clamp(-bound, bound)
    inner = knots[1 if inverse else 0, :, 1:-1]
    # The bin index, as searchsorted (left) would give it: with a handful of
    # knots, counting the inner knots below the value is one comparison and
    # one sum, about 4x faster than searchsorted on the CPU; offset by the
    # channel's row of the bin table, so one gather reads all six numbers.
    k = (flat_in.unsqueeze(2) > inner.reshape(1, C, bins - 1, 1)).sum(2)
    k += torch.arange(0, C * bins, bins, device=t.device).reshape(1, C, 1)
    # index_select of the flattened bins: on the CPU 5x faster than bin_table[:, k].
    x0, wk, y0, hk, d0, d1 = bin_table.index_select(1, k.reshape(-1)).reshape(6, *k.shape).unbind(0)
    s = hk / wk
    if not inverse:
        xi = ((flat_in - x0) / wk).clamp(0, 1)
        den = s + (d1 + d0 - 2 * s) * xi * (1 - xi)
        out = y0 + hk * (s * xi * xi + d0 * xi * (1 - xi)) / den
    else:
        dy = flat_in - y0
        a = hk * (s - d0) + dy * (d1 + d0 - 2 * s)
        b = hk * d0 - dy * (d1 + d0 - 2 * s)
        c = -s * dy
        disc = (b * b - 4 * a * c).clamp_min(0)
        xi = ((2 * c) / (-b - torch.sqrt(disc))).clamp(0, 1)
        out = x0 + xi * wk
        den = s + (d1 + d0 - 2 * s) * xi * (1 - xi)
    deriv = s * s * (d1 * xi * xi + 2 * s * xi * (1 - xi) + d0 * (1 - xi) ** 2) / (den * den)
    out = torch.where(inside, out, flat)
    logd = torch.where(inside, torch.log(deriv), 0.0)
    return out.reshape(t.shape), logd.sum((1, 2))


def _bin_table(knots):
    """(3, C, K+1) knots -> (6, C*K): per bin its left x knot, width, bottom,
    height and the derivatives at its two ends (the rows of one gather)."""
    xk, yk, d = knots.unbind(0)
    C, bins = xk.shape[0], xk.shape[1] - 1
    table = torch.stack([xk[:, :-1], xk[:, 1:] - xk[:, :-1], yk[:, :-1], yk[:, 1:] - yk[:, :-1],
                         d[:, :-1], d[:, 1:]])
    return table.reshape(6, C * bins)


class SplineActivation(nn.Module):
    """Element-wise monotone rational-quadratic spline with linear tails.

    One spline per channel on ``[-bound, bound]`` with ``bins`` bins
    (Durkan et al., 2019), the identity outside; exactly invertible (a
    quadratic solve), with the analytic log-derivative.  Initialised at the
    identity (uniform bins, unit derivatives).

    ``implementation``: ``"torch"`` (torch ops, :func:`rq_spline_torch`),
    ``"fused"`` (the CUDA kernels of ``kernels/spline.cu``, one launch a
    direction and one or two for the backward, :mod:`invconv.spline_torch`, on
    CUDA tensors; torch ops on the CPU) or ``"emulator"`` (the same kernels,
    CPU tensors run on the CPU emulator: slow, for tests); None reads
    ``$INVCONV_SPLINE`` when the layer is built, default ``"torch"``.  The
    fused kernels stay off by default until a GPU run has passed their tests
    (``tests/test_spline.py -m gpu``).  Either way the knot table is computed
    by torch from the parameters (differentiable there).
    """

    MIN_BIN = 1e-3
    MIN_DERIVATIVE = 1e-3

    def __init__(self, channels, bins=5, bound=10.0, *, implementation=None):
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be an int >= 1, got {bins!r}")
        if not (isinstance(bound, (int, float)) and not isinstance(bound, bool)
                and math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be a finite number > 0, got {bound!r}")
        self.bins, self.bound = bins, float(bound)
        self.implementation = _spline_implementation(implementation)
        self.widths = nn.Parameter(torch.zeros(channels, bins))
        self.heights = nn.Parameter(torch.zeros(channels, bins))
        # softplus(d) + MIN_DERIVATIVE == 1 at d = this value: the identity.
        d0 = math.log(math.expm1(1.0 - self.MIN_DERIVATIVE))
        self.derivatives = nn.Parameter(torch.full((channels, bins - 1), d0))

    def _knots(self, raw):
        frac = torch.softmax(raw, dim=-1)
        frac = self.MIN_BIN + (1 - self.MIN_BIN * self.bins) * frac
        knots = F.pad(torch.cumsum(frac, -1), (1, 0))
        knots = 2 * self.bound * knots - self.bound
        # Pin the ends exactly at +-bound so the tails join without a gap.
        end = torch.full_like(knots[:, :1], self.bound)
        return torch.cat([-end, knots[:, 1:-1], end], dim=-1)

    def _knot_table(self):
        d = F.softplus(self.derivatives) + self.MIN_DERIVATIVE
        one = torch.ones_like(d[:, :1])
        d = torch.cat([one, d, one], dim=-1)          # linear tails: slope 1 at the ends
        return torch.stack([self._knots(self.widths), self._knots(self.heights), d])

    def knot_table(self):
        """(3, C, bins + 1): per channel the x knots, the y knots and the
        derivatives at the knots.  Parameter-only: in passes that record no
        gradient it is computed once per parameter version (see
        :func:`parameter_cached`)."""
        return parameter_cached(self, "knot_table", self._knot_table,
                                (self.widths, self.heights, self.derivatives))

    def _spline(self, t, inverse):
        knots = self.knot_table()
        impl = self.implementation
        if impl == "emulator" or (impl == "fused" and t.is_cuda):
            from .spline_torch import rq_spline
            return rq_spline(t, knots, self.bound, inverse,
                             runtime="cuda" if t.is_cuda else "emulator")
        return rq_spline_torch(t, knots, self.bound, inverse)

    def forward(self, x):
        return self._spline(x, inverse=False)

    def inverse(self, y):
        x, logd = self._spline(y, inverse=True)
        return x, -logd

    def extra_repr(self):
        return f"bins={self.bins}, bound={self.bound}, implementation={self.implementation!r}"


class Split(nn.Module):
    """Factor out half the channels, scored by a Gaussian conditioned on the rest (Glow).

    ``forward(x) -> ((kept, eps), logabsdet)`` with ``kept = x[:, :C/2]`` and
    ``eps = (x[:, C/2:] - mean) * exp(-logs)``, ``(mean, logs)`` from a
    zero-initialised 3x3 convolution of ``kept``; ``eps`` is a standard-normal
    latent and ``logabsdet = -sum(logs)`` -- together exactly the learned
    Gaussian prior of Glow's split.
    """

    def __init__(self, channels):
        super().__init__()
        self.kept = channels // 2
        self.prior = nn.Conv2d(self.kept, 2 * (channels - self.kept), 3, padding=1)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)

    def forward(self, x):
        kept, rest = x[:, :self.kept], x[:, self.kept:]
        mean, logs = self.prior(kept).chunk(2, dim=1)
        return (kept, (rest - mean) * torch.exp(-logs)), -_sum_per_sample(logs)

    def inverse(self, pair):
        kept, eps = pair
        mean, logs = self.prior(kept).chunk(2, dim=1)
        return torch.cat([kept, mean + eps * torch.exp(logs)], 1), _sum_per_sample(logs)


class FlowStep(nn.Module):
    """A sequence of layers applied in order (inverse in reverse order)."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    # The sum starts from the first layer's term (no zeros to add to): the
    # same values, two ops fewer a step.
    def forward(self, x):
        total = None
        for layer in self.layers:
            x, ld = layer(x)
            total = ld if total is None else total + ld
        return x, x.new_zeros(x.shape[0]) if total is None else total

    def inverse(self, y):
        total = None
        for layer in reversed(self.layers):
            y, ld = layer.inverse(y)
            total = ld if total is None else total + ld
        return y, y.new_zeros(y.shape[0]) if total is None else total


def dequantize(x_uint8, generator=None):
    """``(x + u) / 256`` with ``u ~ U[0, 1)``: 8-bit images to [0, 1)."""
    u = torch.rand(x_uint8.shape, generator=generator, device=x_uint8.device)
    return (x_uint8.to(torch.float32) + u) / 256.0


class InverseFlow(nn.Module):
    """Multi-scale flow with inverse-convolution steps (see the module docs).

    Parameters
    ----------
    input_shape : (C, H, W)
        H and W must be divisible by ``2 ** levels``.
    levels, steps : int
        L and K of the paper: levels of (squeeze, K steps, split); no split after the last.
    hidden : int
        Channels of the coupling networks.
    kernel_size : int
        Size of the masked convolution in each step.
    conv : {"inverse", "masked", "emerging", None}
        ``InvConv2d`` (Inverse-Flow), ``MaskedConv2d`` (FInC Flow) or none (Glow)
        at the start of each step; ``"emerging"`` puts an :class:`EmergingConv2d`
        (its diagonals always learned) in place of the 1x1 convolution, or at
        the start of the step when ``coupling=False``.
    spline : bool
        Put a :class:`SplineActivation` after the k x k layer.
    coupling : bool
        Use ActNorm, the 1x1 convolution and the coupling in each step (False
        for the ``snf-small`` preset).
    logit : float or None
        ``alpha`` of the logit pre-processing, or None for none.
    learn_diagonal : bool
        Learned same-pixel diagonal in the k x k layers (else unit: volume preserving).
    """

    def __init__(self, input_shape, *, levels=2, steps=4, hidden=64, kernel_size=3,
                 conv="inverse", spline=True, coupling=True, logit=None,
                 learn_diagonal=False, spline_bins=5, spline_bound=10.0, split=True,
                 squeeze_first=True):
        super().__init__()
        C, H, W = input_shape
        squeezes = levels if squeeze_first else levels - 1
        if H % 2 ** squeezes or W % 2 ** squeezes:
            raise ValueError(f"input {H}x{W} is not divisible by 2**{squeezes} (one squeeze "
                             f"per level)")
        if conv not in ("inverse", "masked", "emerging", None):
            raise ValueError(f"conv must be 'inverse', 'masked', 'emerging' or None, "
                             f"got {conv!r}")
        self.input_shape = tuple(input_shape)
        self.logit = logit
        self.config = dict(levels=levels, steps=steps, hidden=hidden, kernel_size=kernel_size,
                           conv=conv, spline=spline, coupling=coupling, logit=logit,
                           learn_diagonal=learn_diagonal, spline_bins=spline_bins,
                           spline_bound=spline_bound, split=split,
                           squeeze_first=squeeze_first)
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        self.latent_shapes = []
        c, h, w = C, H, W
        for level in range(levels):
            layers = []
            if level > 0 or squeeze_first:
                c, h, w = 4 * c, h // 2, w // 2
                layers.append(Squeeze())
            for _ in range(steps):
                step = []
                if conv in ("inverse", "masked"):
                    cls = InvConv2d if conv == "inverse" else MaskedConv2d
                    step.append(cls(c, kernel_size, learn_diagonal=learn_diagonal))
                elif conv == "emerging" and not coupling:
                    step.append(EmergingConv2d(c, kernel_size))
                if spline:
                    step.append(SplineActivation(c, spline_bins, spline_bound))
                if coupling:
                    mix = (EmergingConv2d(c, kernel_size) if conv == "emerging"
                           else InvertibleConv1x1(c))
                    step += [ActNorm(c), mix, AffineCoupling(c, hidden)]
                layers.append(FlowStep(*step))
            self.levels.append(FlowStep(*layers))
            if split and level < levels - 1:
                self.splits.append(Split(c))
                self.latent_shapes.append((c - c // 2, h, w))
                c = c // 2
        self.latent_shapes.append((c, h, w))

    # -- pre-processing ------------------------------------------------------
    def _preprocess(self, v):
        if self.logit is None:
            return v, v.new_zeros(v.shape[0])
        a = self.logit
        p = a + (1 - 2 * a) * v
        s = torch.log(p) - torch.log1p(-p)
        return s, _sum_per_sample(math.log(1 - 2 * a) - torch.log(p) - torch.log1p(-p))

    def _postprocess(self, s):
        if self.logit is None:
            return s
        return (torch.sigmoid(s) - self.logit) / (1 - 2 * self.logit)

    # -- the flow ------------------------------------------------------------
    def encode(self, v):
        """Data in [0, 1] -> (latents, logabsdet): the list of standard-normal
        latents (one per split, then the last level's output)."""
        x, total = self._preprocess(v)
        latents = []
        for i, level in enumerate(self.levels):
            x, ld = level(x)
            total = total + ld
            if i < len(self.splits):
                (x, eps), ld = self.splits[i](x)
                total = total + ld
                latents.append(eps)
        latents.append(x)
        return latents, total

    def decode(self, latents):
        """Latents (as from :meth:`encode`) -> data in [0, 1] (un-clamped)."""
        x = latents[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                x, _ = self.splits[i].inverse((x, latents[i]))
            x, _ = self.levels[i].inverse(x)
        return self._postprocess(x)

    def _log_prob(self, v):
        latents, logdet = self.encode(v)
        prior = sum(_sum_per_sample(-0.5 * z * z - 0.5 * math.log(2 * math.pi)) for z in latents)
        return prior + logdet

    def log_prob(self, v, captured=False):
        """``log p_V(v)`` in nats for data ``v`` in [0, 1]^D, shape (B,).

        ``captured``: False (eager, differentiable), True or ``"graph"`` (a
        CUDA-graph replay per batch shape), ``"compile"`` (torch.compile,
        mode="reduce-overhead"); see :mod:`invconv.capture`.  Captured calls
        return detached results, need ActNorm initialised, run the model as in
        eval mode (the one training-mode difference of these layers is
        ActNorm's initialisation) and run eagerly off CUDA.
        """
        method = resolve_method(captured)
        if method == "eager":
            return self._log_prob(v)
        return self._capture("log_prob", method)(v)

    def _log_prob_eval(self, v):
        # Training-mode ActNorm reads its flag on the host (a sync, which
        # capture forbids); initialised, it computes the same in eval mode.
        if not self.training:
            return self._log_prob(v)
        self.eval()
        try:
            return self._log_prob(v)
        finally:
            self.train()

    def bits_per_dim(self, v, captured=False):
        """``(-log p_V(v) + D log 256) / (D log 2)`` per sample, shape (B,)."""
        D = math.prod(self.input_shape)
        return (-self.log_prob(v, captured) + D * math.log(256.0)) / (D * LOG2)

    @torch.no_grad()
    def sample(self, n, temperature=1.0, generator=None, captured=False):
        """``n`` samples in data space [0, 1] (decoded from N(0, T^2) latents).

        The latents are drawn eagerly (so ``generator`` gives the same samples
        either way); with ``captured`` (as in :meth:`log_prob`) the decoding is
        one replay per (n, dtype, device), whatever the temperature.
        """
        method = resolve_method(captured)
        p = next(self.parameters(), None)
        device = p.device if p is not None else None
        dtype = p.dtype if p is not None else torch.float32
        latents = [temperature * torch.randn((n, *s), generator=generator, device=device,
                                             dtype=dtype)
                   for s in self.latent_shapes]
        if method == "eager":
            return self.decode(latents)
        return self._capture("decode", method)(*latents)

    # -- captured passes -----------------------------------------------------
    def _capture(self, name, method):
        """The :class:`~invconv.capture.CapturedCall` of pass ``name`` for ``method``."""
        cache = self.__dict__.setdefault("_captures", {})
        if (name, method) not in cache:
            # Checked once per pass (reading the flags syncs with the device);
            # an initialised ActNorm stays initialised.
            uninitialised = [n for n, m in self.named_modules()
                             if isinstance(m, ActNorm) and not bool(m.initialized)]
            if uninitialised:
                raise ValueError(f"captured passes need ActNorm initialised (run one forward "
                                 f"pass in training mode first; a trained checkpoint has "
                                 f"it): {uninitialised[0]} is not")
            fn = self._log_prob_eval if name == "log_prob" else self._decode_flat
            cache[(name, method)] = CapturedCall(fn, method, state=self._state_tensors)
        return cache[(name, method)]

    def _decode_flat(self, *latents):
        return self.decode(list(latents))

    def _state_tensors(self):
        return [*self.parameters(), *self.buffers()]

    def __getstate__(self):
        # Captured graphs do not pickle (deepcopy, torch.save of the module):
        # a copy captures again on first use.
        state = dict(self.__dict__)
        state.pop("_captures", None)
        return state

    def forward(self, v):
        return self.log_prob(v)


def _refuse(preset, kw, **why):
    """Raise when ``kw`` names an option the preset has no use for (``why[option]`` says why)."""
    unused = [name for name in why if name in kw]
    if unused:
        raise ValueError(f"{preset}: {unused[0]}= does not apply ({why[unused[0]]})")


def _inverse_flow(shape, **kw):
    return InverseFlow(shape, **{"conv": "inverse", **kw})


def _finc_flow(shape, **kw):
    return InverseFlow(shape, **{"conv": "masked", **kw})


def _glow(shape, **kw):
    _refuse("glow", kw, kernel_size="glow has no k x k layer",
            learn_diagonal="glow has no k x k layer")
    return InverseFlow(shape, **{"conv": None, "spline": False, **kw})


def _snf_small(shape, **kw):
    """3 blocks x 3 x [3x3 inverse conv + spline (5 bins, bound 10)], squeeze between blocks.

    ``levels`` (blocks), ``steps`` (layers per block), ``kernel_size``,
    ``logit`` and ``learn_diagonal`` (default True here) override the paper's values.
    """
    _refuse("snf-small", kw, hidden="snf-small has no coupling layers")
    return InverseFlow(shape, **{"levels": 3, "steps": 3, "conv": "inverse", "spline": True,
                                 "coupling": False, "learn_diagonal": True, "split": False,
                                 "squeeze_first": False, **kw})


def _snf_small_emerging(shape, **kw):
    """snf-small with the Emerging k x k convolution in place of the inverse convolution
    (the "Emerging Conv." row of the paper's Table 4)."""
    _refuse("snf-small-emerging", kw, hidden="snf-small-emerging has no coupling layers",
            learn_diagonal="Emerging always learns its diagonals")
    return InverseFlow(shape, **{"levels": 3, "steps": 3, "conv": "emerging", "spline": True,
                                 "coupling": False, "split": False, "squeeze_first": False,
                                 **kw})


def _emerging(shape, **kw):
    """Glow's steps with the Emerging k x k convolution in place of the 1x1 (no spline)."""
    _refuse("emerging", kw, learn_diagonal="Emerging always learns its diagonals")
    return InverseFlow(shape, **{"conv": "emerging", "spline": False, **kw})


PRESETS = {"inverse-flow": _inverse_flow, "finc-flow": _finc_flow, "glow": _glow,
           "snf-small": _snf_small, "emerging": _emerging,
           "snf-small-emerging": _snf_small_emerging}


def build(name, input_shape, **kwargs):
    """A preset model by name (see :data:`PRESETS`).

    ``kwargs`` are :class:`InverseFlow` options; those not given keep the
    preset's own values, and one the preset has no use for (``hidden`` for
    ``snf-small`` and ``snf-small-emerging``, ``kernel_size`` or
    ``learn_diagonal`` for ``glow``, ``learn_diagonal`` for the Emerging
    presets, which always learn it) is a ``ValueError`` naming it.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](tuple(input_shape), **kwargs)
