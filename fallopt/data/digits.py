"""scikit-learn's bundled handwritten digits: real data that needs no download."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from fallopt.data.dataset import Split

CLASS_NAMES = tuple(str(d) for d in range(10))


def load() -> Split:
    """1,797 8x8 images; their 0..16 intensities are scaled to uint8 0..255."""
    digits = load_digits()
    x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Split(x, digits.target.astype(np.int64))
