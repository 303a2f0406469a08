"""Patient-level (group-level) splits, as in the paper: 70 / 15 / 15 % train / validation / holdout."""

from __future__ import annotations

import numpy as np

from iqa_env.data.dataset import ImageDataset

SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "holdout")


def split_indices_by_group(
    groups: np.ndarray,
    fractions: tuple[float, ...] = (0.70, 0.15, 0.15),
    seed: int = 0,
) -> list[np.ndarray]:
    """Image indices of each part; every group lands in exactly one part.

    Groups are shuffled with ``seed`` and dealt to the parts so that each part
    gets about its fraction of the *images* (not of the groups), and every
    part gets at least one group.  Deterministic given ``seed``.
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.ndim != 1 or fr.size < 1 or np.any(~np.isfinite(fr)) or np.any(fr <= 0):
        raise ValueError(f"fractions must be positive numbers, got {tuple(fractions)}")
    if abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)} (sum {fr.sum():g})")
    groups = np.asarray(groups)
    unique, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if unique.size < fr.size:
        raise ValueError(
            f"a {fr.size}-way split needs at least {fr.size} groups (patients), but the dataset has "
            f"{unique.size}; expected at least one patient per part: give each patient its own group "
            "id (field 'groups'), add patients, or use fewer parts"
        )
    order = np.random.default_rng(seed).permutation(unique.size)
    # Deal groups in shuffled order; the cut points follow the cumulative image count.
    cum = np.cumsum(counts[order]) / counts.sum()
    bounds = np.cumsum(fr)[:-1]
    cuts = np.searchsorted(cum, bounds - 1e-12, side="left") + 1
    # Every part gets at least one group.
    for k in range(cuts.size):
        lo = (cuts[k - 1] if k else 0) + 1
        hi = unique.size - (cuts.size - k)
        cuts[k] = int(np.clip(cuts[k], lo, hi))
    part_of_group = np.empty(unique.size, dtype=np.int64)
    for k, chunk in enumerate(np.split(order, cuts)):
        part_of_group[chunk] = k
    part = part_of_group[inverse]
    return [np.flatnonzero(part == k) for k in range(fr.size)]


def split_by_group(
    ds: ImageDataset,
    fractions: tuple[float, ...] = (0.70, 0.15, 0.15),
    seed: int = 0,
) -> tuple[ImageDataset, ...]:
    """Split ``ds`` into parts (by default train / validation / holdout) at group level."""
    return tuple(ds.subset(idx) for idx in split_indices_by_group(ds.groups, fractions, seed))
