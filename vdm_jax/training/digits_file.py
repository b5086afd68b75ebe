"""The 8x8 handwritten digits scikit-learn ships, read from its file.

Importing scikit-learn takes about a second, and every command-line run on the digits would
pay it for one small CSV file. :func:`read_digits` reads that file where the installed
scikit-learn keeps it, without importing the package, and falls back to
``sklearn.datasets.load_digits`` if the file is not there (a future layout).
:func:`vdm_jax.training.sources.digits_source` splits what it returns.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from vdm_jax.errors import UserError

__all__ = ["digits_csv_path", "read_digits"]


def digits_csv_path() -> str | None:
    """The path of scikit-learn's ``datasets/data/digits.csv.gz``, or None if scikit-learn is
    installed without it. Raises :class:`~vdm_jax.errors.UserError` without scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise UserError("the digits data set needs scikit-learn: pip install scikit-learn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    return path if os.path.isfile(path) else None


def read_digits(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits in the file's order (that of ``sklearn.datasets.load_digits``).

    Args:
      path: the gzipped CSV (64 pixel values then the label per row); None for
        scikit-learn's (:func:`digits_csv_path`), or ``load_digits`` where this scikit-learn
        has no such file.

    Returns:
      ``(images, labels)``: uint8 [1797, 8, 8] with values 0..16 (exact: the file holds
      integers) and int32 [1797] with values 0..9.
    """
    path = path or digits_csv_path()
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        data = np.concatenate([digits.data, digits.target[:, None]], axis=1)
    else:
        data = np.loadtxt(path, delimiter=",")
    images = data[:, :-1].reshape(-1, 8, 8).astype(np.uint8)
    return images, data[:, -1].astype(np.int32)
