"""scikit-learn's bundled handwritten digits: real data that needs no download."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fallopt.config import DatasetConfig, check_fraction
from fallopt.data.dataset import Loaded, Split
from fallopt.identity import file_digest

CLASS_NAMES = tuple(str(d) for d in range(10))


@dataclass
class DigitsConfig(DatasetConfig):
    """scikit-learn's bundled 8x8 handwritten digits; the test set is a stratified split."""

    name: str = "digits"
    test_split: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("dataset.test_split", self.test_split, allow_zero=False)

    def sources(self) -> dict[str, str]:
        """The file scikit-learn ships the digits in."""
        return {"data": file_digest(_data_file())}


SCHEMA = DigitsConfig


def _data_file() -> str:
    from importlib.resources import files

    return str(files("sklearn.datasets.data") / "digits.csv.gz")


def load(cfg: DigitsConfig) -> Loaded:
    """1,797 8x8 images; their 0..16 intensities are scaled to uint8 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Loaded(CLASS_NAMES, Split(x, digits.target.astype(np.int64)), origin=_data_file())
