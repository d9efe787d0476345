"""MNIST loader: shapes, scaling, padding, label counts, md5 verification."""

import shutil

import numpy as np
import pytest
from diffsparse.train import mnist_data
from diffsparse.train.mnist_data import (
    IMAGES_FILE,
    LABELS_FILE,
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
        pytest.fail(f"MNIST test files not found in {d}; set DIFFSPARSE_MNIST_DIR to the folder holding "
                    f"{IMAGES_FILE} and {LABELS_FILE}")
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
    assert default_data_dir().parts[-3:] == ("shared", "data", "mnist")


def test_md5_mismatch_names_the_file(data_dir, tmp_path):
    shutil.copy(data_dir / LABELS_FILE, tmp_path / LABELS_FILE)
    raw = bytearray((data_dir / IMAGES_FILE).read_bytes())
    raw[-100] ^= 0xFF  # corrupt one byte
    (tmp_path / IMAGES_FILE).write_bytes(bytes(raw))
    with pytest.raises(MnistDataError, match="md5") as e:
        load_mnist_test(tmp_path)
    msg = str(e.value)
    assert IMAGES_FILE in msg and mnist_data.MD5[IMAGES_FILE] in msg and "Fix" in msg


def test_missing_file_names_the_file(data_dir, tmp_path):
    shutil.copy(data_dir / IMAGES_FILE, tmp_path / IMAGES_FILE)
    with pytest.raises(MnistDataError, match=LABELS_FILE.replace(".", r"\.")):
        load_mnist_test(tmp_path)
