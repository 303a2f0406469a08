"""Ranking metrics shared by the data checks, the tests and the experiments."""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary labels ``positive``.

    Rank-based (Mann-Whitney U) with ties counted as one half.  It is the
    probability that a random positive scores higher than a random negative:
    0.5 is chance, 1.0 a perfect ranking, 0.0 a perfectly *inverted* one.
    Raises ``ValueError`` when one class is absent (the AUROC is undefined).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive).astype(bool).ravel()
    if scores.shape != positive.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape} vs {positive.shape}")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative labels"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc_or_none(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """:func:`auroc`, or None where it is undefined because one class is absent."""
    positive = np.asarray(positive).astype(bool)
    if positive.all() or not positive.any():
        return None
    return auroc(scores, positive)
