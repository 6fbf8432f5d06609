"""invconv: the inverse of a masked convolution and its backpropagation.

A k x k convolution zero-padded on one corner, whose same-pixel channel block
is lower-triangular, is a triangular linear operator ``M`` on the image.
``conv2d`` applies it, ``inv_conv2d`` solves ``M x = y`` (a wavefront over
anti-diagonals on the GPU), and the ``*_vjp`` functions give the gradients.
See :mod:`invconv._api` for the exact convention.
"""
from ._api import (BACKENDS, CORNERS, conv2d, conv2d_vjp, inv_conv2d,
                   inv_conv2d_vjp, logdet)
from . import reference

__version__ = "0.1.0"

__all__ = ["BACKENDS", "CORNERS", "conv2d", "conv2d_vjp", "inv_conv2d",
           "inv_conv2d_vjp", "logdet", "reference"]
