"""The backend interface and the one registry of backends.

A backend is a module with the five functions of :class:`Backend`; it is
registered below by one :class:`BackendSpec` line (name, module, the array
kind it takes, whether it is that kind's default, and a cheap availability
probe).  :mod:`invconv._api` dispatches through :func:`load`, the torch adapter
routes tensors through the same defaults, and the tests and benchmarks list
backends with :func:`names`.  Importing this module imports no backend: a
backend module (and CuPy with it) is imported on its first call.

Validation, the zero-diagonal check and device routing are not a backend's
business: :mod:`invconv._api` does them once before any backend function is
called, so a backend only ever sees validated, non-empty arrays of its own
kind, and ``_solve``/``_solve_adjoint`` only a non-singular operator (except
from the torch adapter on CUDA, which skips that check rather than
synchronise with the host: a zero diagonal then gives inf/NaN).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import shutil
from dataclasses import dataclass
from typing import Callable, Protocol

__all__ = ["Backend", "BackendSpec", "REGISTRY", "names", "default_for", "spec", "load"]


class Backend(Protocol):
    """What every backend module provides.

    All arrays are (B, C, H, W) of one dtype (float32 or float64) and one kind
    (NumPy or CuPy), B*C*H*W > 0; ``weight`` is (C, C // groups, kh, kw) and
    ``conv`` the validated :class:`invconv._api.Conv`.  Outputs are new arrays
    of the input dtype; inputs are never modified.  Per-shape plans and
    scratch are the backend's own affair (cached inside the module).
    """

    def _forward(self, x, weight, conv):
        """x -> M x."""

    def _forward_adjoint(self, grad_y, weight, conv):
        """grad_y -> M^T grad_y."""

    def _solve(self, y, weight, conv):
        """y -> M^-1 y (the diagonal is known to be non-zero)."""

    def _solve_adjoint(self, grad_x, weight, conv):
        """grad_x -> M^-T grad_x."""

    def _weight_grad(self, grad_out, x, scale, conv):
        """(B,C,H,W), (B,C,H,W), float -> weight.shape: ``scale`` times the
        conv2d weight gradient at (grad_out, x), exactly 0 at ignored entries."""


METHODS = ("_forward", "_forward_adjoint", "_solve", "_solve_adjoint", "_weight_grad")


@dataclass(frozen=True)
class BackendSpec:
    """One registered backend.

    kind: the array kind it takes, "numpy" (host) or "cupy" (CUDA device).
    default: whether ``backend=None`` picks it for arrays of that kind.
    available: a cheap probe (no compilation, no CUDA context) of whether it
    can run here; used to list backends for tests and benchmarks.
    timed: whether benchmarks time it (the emulator is a test tool, not a contender).
    """

    name: str
    module: str
    kind: str
    default: bool
    available: Callable[[], bool]
    timed: bool = True


def _always() -> bool:
    return True


def _has_cupy() -> bool:
    return importlib.util.find_spec("cupy") is not None


def _has_compiler() -> bool:
    # CXX may carry a launcher and flags ("ccache g++ -O2"): the program is the first word.
    try:
        words = shlex.split(os.environ.get("CXX", "g++"))
    except ValueError:                 # unbalanced quotes: the emulator reports it by name
        return False
    return bool(words) and shutil.which(words[0]) is not None


REGISTRY = (
    BackendSpec("cpu", "invconv._cpu", "numpy", True, _always),
    BackendSpec("reference", "invconv.reference", "numpy", False, _always),
    BackendSpec("emulator", "invconv._emulated", "numpy", False, _has_compiler, timed=False),
    BackendSpec("cuda", "invconv._cuda", "cupy", True, _has_cupy),
)

_BY_NAME = {s.name: s for s in REGISTRY}


def names(kind: str | None = None, available_only: bool = False) -> tuple[str, ...]:
    """Registered backend names, optionally only those for one array kind / runnable here."""
    return tuple(s.name for s in REGISTRY
                 if (kind is None or s.kind == kind) and (not available_only or s.available()))


def spec(name: str) -> BackendSpec:
    return _BY_NAME[name]


def default_for(kind: str) -> str:
    """The backend ``backend=None`` picks for arrays of ``kind``."""
    return next(s.name for s in REGISTRY if s.kind == kind and s.default)


_LOADED: dict = {}


def load(name: str):
    """Import and return the module of backend ``name`` (looked up once: this
    is on every call's path)."""
    loaded = _LOADED.get(name)
    if loaded is not None:
        return loaded
    module = _BY_NAME[name].module
    try:
        loaded = _LOADED[name] = importlib.import_module(module)
        return loaded
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise NotImplementedError(
            f"backend={name!r} is not available in this version of invconv") from None
