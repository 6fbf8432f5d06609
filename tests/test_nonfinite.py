"""A NaN or Inf reaches exactly the outputs that depend on it structurally.

The truth is the structure of the dense operator (tests/support.py): which
entries of ``M``, ``M^-1`` and ``dM/dW`` are non-zero for a generic weight.
A NaN or Inf in an image or in a weight entry must not reach an output
through an ignored tap (0 * NaN) or a padded pixel, and must reach every
output that does depend on it.
"""
import functools

import numpy as np
import pytest

import invconv
from conftest import CPU_BACKENDS
from support import CORNERS, make_weight, nonfinite_reach, pads, structure

# Backends held to this: the kernels skip ignored taps rather than multiply
# them by the input (0 * NaN). The CUDA run lives in the GPU tests
# (tests/test_gpu.py), through check_nonfinite_reach.
BACKENDS = CPU_BACKENDS          # every registered host backend

SHAPE = (2, 4, 4, 5)           # B, C, H, W: two groups of two channels with groups=2
ARGUMENTS = {"conv2d": ["x"], "inv_conv2d": ["y"], "conv2d_vjp": ["grad_y", "x"],
             "inv_conv2d_vjp": ["grad_x", "x"]}


def image_entries():
    """(image, channel, row, col): every channel at an inner pixel, channel 1 at each corner."""
    B, C, H, W = SHAPE
    inner = [(1, c, 1, 2) for c in range(C)]
    corners = [(0, 1, h, w) for h in (0, H - 1) for w in (0, W - 1)]
    return inner + corners


def weight_entries(weight, corner, op, value):
    """Every read entry of output channel 1 (the ignored ones hold NaN already).

    Not, for an Inf and the inverse, the diagonal: dividing by it gives 0,
    the limit, a finite answer that then flows on as one.
    """
    read = ~np.isnan(weight)
    C, cg, kh, kw = weight.shape
    left, _, top, _ = pads(corner, kh, kw)
    diagonal = (1, 1 % cg, top, left)
    skip_diagonal = np.isinf(value) and op.startswith("inv")
    return [index for index in np.ndindex(*weight.shape) if index[0] == 1 and read[index]
            and not (skip_diagonal and index == diagonal)]


@functools.lru_cache(maxsize=None)
def cached_structure(weight_shape, corner, groups, unit_diagonal):
    return structure(weight_shape, SHAPE[2], SHAPE[3], corner, groups, unit_diagonal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(ARGUMENTS))
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("corner", CORNERS)
@pytest.mark.parametrize("groups, unit_diagonal", [(1, True), (2, False)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_reaches_exactly_its_dependents(backend, op, value, corner, groups,
                                                   unit_diagonal, dtype):
    def run(op, args, opts):
        return getattr(invconv, op)(*args, backend=backend, **opts)
    check_nonfinite_reach(run, op, value, corner, groups, unit_diagonal, dtype)


def check_nonfinite_reach(run, op, value, corner, groups, unit_diagonal, dtype):
    """The check of the test above for any runner: ``run(op, args, options)``
    returns the op's outputs (NumPy arrays, or anything np.isfinite takes)."""
    B, C, H, W = SHAPE
    rng = np.random.default_rng(13)
    # NaN in the ignored entries too: they must never be read.
    weight = make_weight(rng, C, groups, 2, 3, corner, unit_diagonal, dtype, junk=np.nan)
    opts = dict(corner=corner, groups=groups, unit_diagonal=unit_diagonal)
    struct = cached_structure(weight.shape, corner, groups, unit_diagonal)
    inputs = {name: rng.standard_normal(SHAPE).astype(dtype) for name in ARGUMENTS[op]}
    cases = [(name, (b, c, h, w), (b, np.ravel_multi_index((c, h, w), (C, H, W))))
             for name in ARGUMENTS[op] for b, c, h, w in image_entries()]
    cases += [("weight", index, np.ravel_multi_index(index, weight.shape))
              for index in weight_entries(weight, corner, op, value)]
    for argument, where, entry in cases:
        given = dict(inputs, weight=weight)
        given[argument] = given[argument].copy()
        given[argument][where] = value
        outputs = run(op, tuple(given.values()), opts)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        expected = nonfinite_reach(op, argument, entry, SHAPE, weight.shape, struct)
        assert any(reach.any() for reach in expected)  # every input matters somewhere
        for out, reach in zip(outputs, expected, strict=True):
            wrong = np.argwhere(~np.isfinite(out) != reach)
            assert not len(wrong), (
                f"{value} in {argument}{list(where)}: output entries {wrong[:6].tolist()} "
                f"(of {len(wrong)}) are {'finite' if reach[tuple(wrong[0])] else 'non-finite'}"
                f" but should not be")


def test_the_structure_is_selective():
    """The truth above could pass vacuously if it marked everything: with
    groups=2 nothing crosses groups, the closure of the inverse reaches
    strictly more than the convolution, ignored taps have no structure."""
    S, R, taps = cached_structure((4, 2, 2, 3), "top-left", 2, False)
    n = S.shape[0] // 4
    assert not S[:2 * n, 2 * n:].any() and not R[:2 * n, 2 * n:].any()
    assert (R >= S).all() and R.sum() > S.sum()
    # Channel 1 does not feed channel 0 at the same pixel (an ignored tap).
    assert not S[0, n] and not R[0, n]
    ignored = np.isnan(make_weight(np.random.default_rng(0), 4, 2, 2, 3, "top-left", False,
                                   junk=np.nan)).reshape(-1)
    assert ignored.any() and not taps[ignored].any() and taps[~ignored].any(axis=(1, 2)).all()
