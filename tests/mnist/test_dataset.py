"""MNIST loader: shipped files, shapes, scaling, padding, label counts, md5 verification."""

import hashlib
import shutil

import numpy as np
import pytest

from diffsparse.mnist import dataset
from diffsparse.mnist.dataset import (
    IMAGES_FILE,
    LABELS_FILE,
    SHIPPED_DIR,
    MnistDataError,
    default_data_dir,
    load_mnist_test,
)

# Class counts of the official MNIST test set (also in the data README).
CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def data_dir():
    d = default_data_dir()
    if not ((d / IMAGES_FILE).is_file() and (d / LABELS_FILE).is_file()):
        pytest.fail(f"MNIST test files not found in {d}; they ship in {SHIPPED_DIR} (or unset "
                    f"DIFFSPARSE_MNIST_DIR / point it at a folder holding {IMAGES_FILE} and {LABELS_FILE})")
    return d


@pytest.fixture(scope="module")
def mnist(data_dir):
    return load_mnist_test(data_dir)


def test_shapes_dtypes_and_range(mnist):
    x, y = mnist
    assert x.shape == (10_000, 1, 32, 32) and x.dtype == np.float32
    assert y.shape == (10_000,) and y.dtype == np.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.bincount(y, minlength=10).tolist() == CLASS_COUNTS


def test_padding_is_background(mnist):
    x, _ = mnist
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(x[:, 0, border] == -1.0)
    # and the digits themselves are inside: every image has ink in the 28x28 centre
    assert np.all(x[:, 0, 2:30, 2:30].max(axis=(1, 2)) > 0.5)


def test_first_image_is_a_seven(mnist):
    x, y = mnist
    assert y[:5].tolist() == [7, 2, 1, 0, 4]  # well-known first labels of the test set
    assert 0.05 < (x[0] > 0).mean() < 0.3  # a stroke, not blank or full


def test_env_var_sets_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFSPARSE_MNIST_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("DIFFSPARSE_MNIST_DIR")
    assert default_data_dir() == SHIPPED_DIR
    assert SHIPPED_DIR.parts[-3:] == ("diffsparse", "mnist", "data")


def test_shipped_files_match_their_readme():
    """The package carries the two official files; its README gives source, licence and the md5s
    the loader checks."""
    readme = (SHIPPED_DIR / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme and "yann.lecun.com/exdb/mnist" in readme
    for name, md5 in dataset.MD5.items():
        assert hashlib.md5((SHIPPED_DIR / name).read_bytes()).hexdigest() == md5
        assert name in readme and md5 in readme


def test_md5_mismatch_names_the_file(data_dir, tmp_path):
    shutil.copy(data_dir / LABELS_FILE, tmp_path / LABELS_FILE)
    raw = bytearray((data_dir / IMAGES_FILE).read_bytes())
    raw[-100] ^= 0xFF  # corrupt one byte
    (tmp_path / IMAGES_FILE).write_bytes(bytes(raw))
    with pytest.raises(MnistDataError, match="md5") as e:
        load_mnist_test(tmp_path)
    msg = str(e.value)
    assert IMAGES_FILE in msg and dataset.MD5[IMAGES_FILE] in msg and "Fix" in msg
    assert "DIFFSPARSE_MNIST_DIR" in msg  # the fix names the override / the shipped copy


def test_md5_mismatch_of_the_shipped_copy_says_how_to_restore_it(monkeypatch, data_dir, tmp_path):
    shutil.copy(data_dir / IMAGES_FILE, tmp_path / IMAGES_FILE)
    (tmp_path / LABELS_FILE).write_bytes(b"not the labels")
    monkeypatch.setattr(dataset, "SHIPPED_DIR", tmp_path.resolve())
    monkeypatch.delenv("DIFFSPARSE_MNIST_DIR", raising=False)
    with pytest.raises(MnistDataError, match="md5") as e:
        load_mnist_test()
    msg = str(e.value)
    assert LABELS_FILE in msg and "restore" in msg and "reinstall" in msg


def test_missing_file_names_the_file(data_dir, tmp_path):
    shutil.copy(data_dir / IMAGES_FILE, tmp_path / IMAGES_FILE)
    with pytest.raises(MnistDataError, match=LABELS_FILE.replace(".", r"\.")):
        load_mnist_test(tmp_path)
