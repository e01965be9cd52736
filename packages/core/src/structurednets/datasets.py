"""Small real data sets shipped with the package, so examples and the demo need no download."""

from __future__ import annotations

import gzip
import importlib.resources

import numpy as np

__all__ = ["load_digits"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI optical handwritten digits: 1,797 images of 8 x 8 pixels, classes 0-9.

    Returns:
        ``X`` of shape ``(1797, 64)``, float32 pixel intensities scaled to [0, 1], and
        ``y`` of shape ``(1797,)``, int64 class labels.

    Source: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI
    Machine Learning Repository (1998), CC BY 4.0; the test part of the set, as distributed
    with scikit-learn.
    """
    resource = importlib.resources.files("structurednets") / "data" / "digits.csv.gz"
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    return table[:, :-1] / 16.0, table[:, -1].astype(np.int64)
