"""MNIST test-set loader (the only MNIST split available offline).

The two files of the official test set ship with the package in ``diffsparse/mnist/data/`` (IDX
format, gzip-compressed; source, licence and checksums in that folder's README.md) and are checked
against their published md5 on every load.  ``$DIFFSPARSE_MNIST_DIR`` (or the ``data_dir``
argument) points the loader at another folder holding the same two files.  Images come back
padded 28 -> 32 with a 2-pixel zero border (so a patch-2 DiT sees 16 x 16 = 256 tokens) and
scaled to [-1, 1]; background is -1.

Note: there is no training split offline, so the demo DiT is trained on these 10,000
test images and its distribution metrics are computed against the same images.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
MD5 = {
    IMAGES_FILE: "9fb629c4189551a2d022fa330f9573f3",
    LABELS_FILE: "ec29112dd5afa0611ce80d1b7f02629c",
}
NUM_IMAGES = 10_000
PAD = 2  # 28 + 2*2 = 32
SHIPPED_DIR = Path(__file__).resolve().parent / "data"  # the copy that ships with the package


class MnistDataError(RuntimeError):
    """The MNIST files are missing, corrupt, or malformed."""


def default_data_dir() -> Path:
    """``$DIFFSPARSE_MNIST_DIR`` if set, else the files shipped in ``diffsparse/mnist/data``."""
    env = os.environ.get("DIFFSPARSE_MNIST_DIR")
    if env:
        return Path(env)
    return SHIPPED_DIR


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fix_hint(data_dir: Path, name: str) -> str:
    if data_dir.resolve() == SHIPPED_DIR:
        where = (f"restore {name} in {data_dir} from a complete diffsparse checkout (or reinstall diffsparse), "
                 "or point DIFFSPARSE_MNIST_DIR / the data_dir argument at a folder that has the official file.")
    else:
        where = (f"put the official gzip-compressed MNIST test file {name} in {data_dir}, or unset "
                 f"DIFFSPARSE_MNIST_DIR / drop the data_dir argument to use the copy shipped in {SHIPPED_DIR}.")
    return f"Fix: {where} Expected md5 of {name}: {MD5[name]}."


def _read_verified(data_dir: Path, name: str, verify: bool) -> bytes:
    path = data_dir / name
    if not path.is_file():
        raise MnistDataError(f"MNIST file missing: {path}. {_fix_hint(data_dir, name)}")
    if verify:
        got = _md5(path)
        if got != MD5[name]:
            raise MnistDataError(
                f"MNIST file {path} has md5 {got}, expected {MD5[name]} (corrupt or wrong file). "
                + _fix_hint(data_dir, name)
            )
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except OSError as e:  # not gzip
        raise MnistDataError(f"MNIST file {path} is not valid gzip: {e}. {_fix_hint(data_dir, name)}") from e


def load_mnist_test(
    data_dir: str | os.PathLike | None = None, *, verify_md5: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load the 10k MNIST test images and labels.

    Returns ``(images, labels)``: images float32 ``(N, 1, 32, 32)`` in [-1, 1] (28x28 digits
    zero-padded by 2 px on each side, padding = -1), labels int64 ``(N,)`` in 0..9.
    Raises :class:`MnistDataError` naming the file if it is missing or its md5 differs.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    raw_img = _read_verified(data_dir, IMAGES_FILE, verify_md5)
    raw_lab = _read_verified(data_dir, LABELS_FILE, verify_md5)

    magic, n, rows, cols = np.frombuffer(raw_img[:16], dtype=">u4")
    if magic != 2051 or rows != 28 or cols != 28 or len(raw_img) != 16 + n * rows * cols:
        raise MnistDataError(f"{data_dir / IMAGES_FILE}: bad IDX header {magic, n, rows, cols}")
    lmagic, ln = np.frombuffer(raw_lab[:8], dtype=">u4")
    if lmagic != 2049 or ln != n or len(raw_lab) != 8 + ln:
        raise MnistDataError(f"{data_dir / LABELS_FILE}: bad IDX header {lmagic, ln}")

    imgs = np.frombuffer(raw_img, dtype=np.uint8, offset=16).reshape(n, 1, 28, 28)
    labels = np.frombuffer(raw_lab, dtype=np.uint8, offset=8).astype(np.int64)
    x = imgs.astype(np.float32) / 127.5 - 1.0
    x = np.pad(x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)), constant_values=-1.0)
    logger.debug("loaded %d MNIST test images from %s", n, data_dir)
    return np.ascontiguousarray(x), labels
