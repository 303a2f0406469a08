"""Patient-level splits: no group in two parts, deterministic, fractions of images respected."""

from __future__ import annotations

import numpy as np
import pytest

from iqa_env.data import SPLIT_NAMES, ImageDataset, split_by_group, split_indices_by_group


def groups_of(sizes: list[int]) -> np.ndarray:
    """Group ids ``0, 0, ..., 1, ...`` with the given group sizes, in a shuffled row order."""
    groups = np.repeat(np.arange(len(sizes)), sizes)
    return groups[np.random.default_rng(123).permutation(groups.size)]


def assert_partition(parts: list[np.ndarray], groups: np.ndarray) -> None:
    every = np.concatenate(parts)
    assert np.array_equal(np.sort(every), np.arange(groups.size)), "each image in exactly one part"
    owner: dict[int, int] = {}
    for k, idx in enumerate(parts):
        assert idx.size > 0, f"part {k} is empty"
        for g in np.unique(groups[idx]).tolist():
            assert owner.setdefault(g, k) == k, f"group {g} is in parts {owner[g]} and {k}"


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_no_group_is_in_two_parts(seed: int) -> None:
    groups = groups_of(list(np.random.default_rng(seed).integers(1, 30, 80)))
    assert_partition(split_indices_by_group(groups, seed=seed), groups)


def test_same_seed_same_split_other_seed_other_split() -> None:
    groups = groups_of([10] * 50)
    a = split_indices_by_group(groups, seed=3)
    b = split_indices_by_group(groups, seed=3)
    c = split_indices_by_group(groups, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("fractions", [(0.70, 0.15, 0.15), (0.5, 0.5), (0.6, 0.2, 0.1, 0.1)])
def test_fractions_of_images_are_roughly_respected(fractions: tuple[float, ...]) -> None:
    groups = groups_of([20] * 100)  # 2,000 images; one group is 1 % of them
    parts = split_indices_by_group(groups, fractions, seed=0)
    assert len(parts) == len(fractions)
    got = np.array([p.size for p in parts]) / groups.size
    np.testing.assert_allclose(got, fractions, atol=0.02)


def test_fractions_count_images_not_groups() -> None:
    # 10 large groups hold 1,000 images, 90 small ones 90: a split of groups
    # would give the holdout ~15 % of the groups but far from 15 % of the images.
    groups = groups_of([100] * 10 + [1] * 90)
    parts = split_indices_by_group(groups, (0.70, 0.15, 0.15), seed=0)
    got = np.array([p.size for p in parts]) / groups.size
    np.testing.assert_allclose(got, (0.70, 0.15, 0.15), atol=0.10)


def test_every_part_gets_a_group_even_with_tiny_fractions() -> None:
    groups = groups_of([5, 5, 5, 5])
    parts = split_indices_by_group(groups, (0.98, 0.01, 0.01), seed=0)
    assert_partition(parts, groups)


def test_fewer_groups_than_parts_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"3-way split needs at least 3 groups .* has 2"):
        split_indices_by_group(np.array([0, 0, 1, 1]))


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ((0.7, 0.2), "must sum to 1"),
        ((0.7, 0.4, -0.1), "must be positive"),
        ((1.0, 0.0), "must be positive"),
        ((float("nan"), 0.5, 0.5), "must be positive"),
        ((), "must be positive"),
    ],
)
def test_invalid_fractions_are_refused(fractions: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_indices_by_group(np.arange(10), fractions)


def test_split_by_group_returns_datasets_with_disjoint_groups() -> None:
    n = 240
    rng = np.random.default_rng(0)
    ds = ImageDataset(
        images=rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8),
        labels=np.arange(n) % 2,
        groups=np.arange(n) // 8,
        amenability={"classification": rng.random(n).astype(np.float32)},
        class_names=("a", "b"),
    )
    parts = split_by_group(ds, seed=1)
    assert len(parts) == len(SPLIT_NAMES) == 3
    assert sum(len(p) for p in parts) == n
    seen = [set(p.groups.tolist()) for p in parts]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    for part in parts:
        assert isinstance(part, ImageDataset) and part.class_names == ("a", "b")
        assert part.amenability["classification"].shape == (len(part),)
    # Rows travel together: image i keeps its label and amenability.
    idx = split_indices_by_group(ds.groups, seed=1)[1]
    np.testing.assert_array_equal(parts[1].images, ds.images[idx])
    np.testing.assert_array_equal(
        parts[1].amenability["classification"], ds.amenability["classification"][idx]
    )
