"""Pareto fronts: the runs no other run beats on every objective at once."""

from __future__ import annotations

import numpy as np


def pareto_mask(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """Which rows of `values` (runs x objectives) are Pareto-optimal.

    A row is dominated when another is at least as good on every objective and strictly
    better on one. Rows with a NaN are never optimal. Exact ties are all kept.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(maximize):
        raise ValueError(f"values of shape {values.shape} for {len(maximize)} objectives")
    signs = np.where(maximize, 1.0, -1.0)
    scores = values * signs  # larger is better in every column now
    valid = ~np.isnan(scores).any(axis=1)
    mask = valid.copy()
    for i in np.flatnonzero(valid):
        others = scores[valid]
        dominated = (others >= scores[i]).all(axis=1) & (others > scores[i]).any(axis=1)
        mask[i] = not dominated.any()
    return mask
