"""Fashion-MNIST with the authors' corruption protocol: real images of graded quality.

The binary task is **pullover vs. coat** (Fashion-MNIST classes 2 and 4):
two long-sleeved tops told apart by fine details (a coat's opening, zip,
buttons and collar) that pixel noise and edge occlusion destroy.  We compared
pairs with a two-layer CNN trained on 70 % of the pooled images of a pair,
half of them corrupted (one seed, 4 and 10 epochs).  Pullover / coat was
among those where corruption costs most: about 0.90 accuracy on clean images
against 0.76-0.82 for ``f`` in [0.5, 0.6), while sneaker / ankle boot kept
0.89-0.94 and T-shirt / shirt is hard even when clean (0.85).  The protocol
is mild for a CNN; raise ``max_severity`` for a harsher variant.  Any other
pair can be chosen with ``classes``.

Corruption protocol (Saeed et al., MedIA 2022 follow-up, public code
``pneumoniamnist_experiment/data_corruption.py``).  Each corrupted image gets,
with probability 0.7, *pixel noise*: ``floor(f * H * W)`` pixel positions
drawn uniformly (with replacement, as in the original) are set to uniform
random grey levels; otherwise *edge occlusion*: one edge (top, left, bottom
or right, uniformly) is blacked out over ``floor(f * H)`` rows or
``floor(f * W)`` columns.  In both cases ``f ~ uniform(0, 0.6)``.  The
original corrupted every image; here a ``corrupt_fraction`` of them is
corrupted and the rest stay clean, so the set has both ends of the quality
scale.

Ground truth and "human" labels (documented rules, not measurements):

- ``amenability["classification"] = 1 - severity / max_severity`` (1 for clean
  images), so an image is *not amenable* (``< 0.5``) when more than half the
  maximum fraction is corrupted.
- ``human_amenability["classification"]``: the majority vote of 3 simulated
  raters, each of whom sees the ground-truth amenability plus Gaussian noise
  (standard deviation 0.15) and calls the image amenable at ``>= 0.5``.

Groups: Fashion-MNIST has no patients, so consecutive blocks of
``group_size`` images (in the shuffled order) form pseudo-patients; the
patient-level splits of :mod:`iqa_env.data.splits` then work unchanged.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from iqa_env.data.dataset import ImageDataset

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

#: The ten Fashion-MNIST classes, by label id.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

#: The original split files; both splits are pooled (splits are made by group).
_FILES: tuple[tuple[str, str], ...] = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)

#: Codes of the categorical degradation fields, recorded in the metadata.
DEGRADATION_CODES: dict[str, dict[str, str]] = {
    "kind": {"0": "clean", "1": "pixel_noise", "2": "edge_occlusion"},
    "occluded_edge": {"-1": "none", "0": "top", "1": "left", "2": "bottom", "3": "right"},
}

#: The authors' protocol constants.
MAX_SEVERITY = 0.6
NOISE_PROBABILITY = 0.7
RATER_NOISE = 0.15
N_RATERS = 3


# ------------------------------------------------------------------- reading
def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file of bytes (``.gz`` or raw): ``(N,)`` labels or ``(N, H, W)`` images."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(
            f"{path}: cannot be read ({e}); expected a gzip-compressed IDX file"
        ) from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(
            f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()}); "
            "expected 0x000008NN"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(
            f"{path}: holds {len(raw)} bytes, expected {expected} for an IDX array of shape {dims} "
            "(truncated download?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _read_all(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images ``(N, 28, 28)`` and labels ``(N,)``, train then test."""
    paths = [(_find(root, img), _find(root, lab)) for img, lab in _FILES]
    missing = [
        stem + ".gz"
        for pair, found in zip(_FILES, paths)
        for stem, p in zip(pair, found)
        if p is None
    ]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {root}: {', '.join(missing)}. On Debian/Ubuntu run "
            "`sudo apt-get install dataset-fashion-mnist` (installs them under "
            f"{DEFAULT_ROOT}), or pass root= a folder holding the four idx files from "
            "https://github.com/zalandoresearch/fashion-mnist"
        )
    images, labels = [], []
    for image_path, label_path in paths:
        assert image_path is not None and label_path is not None
        x, y = read_idx(image_path), read_idx(label_path)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{image_path} / {label_path}: expected (N, H, W) images and (N,) labels of "
                f"the same N, got {x.shape} and {y.shape}"
            )
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


# ---------------------------------------------------------------- corruption
def corrupt_images(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    corrupt_fraction: float,
    max_severity: float = MAX_SEVERITY,
    noise_probability: float = NOISE_PROBABILITY,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Apply the authors' corruption protocol to ``round(corrupt_fraction * N)`` random images.

    Args:
        images: ``(N, C, H, W)`` uint8; not modified.
        rng: the source of every random draw.
        corrupt_fraction: share of images corrupted, in [0, 1].
        max_severity: ``f`` is drawn from ``uniform(0, max_severity)``; 0.6 in
            the original protocol, at most 1.
        noise_probability: chance that a corrupted image gets pixel noise
            rather than edge occlusion; 0.7 in the original protocol.

    Returns:
        The corrupted copy ``(N, C, H, W)`` uint8 and the per-image
        degradation records, each ``(N,)`` float32: ``severity`` (``f``, 0 when
        clean), ``pixel_noise`` and ``edge_occlusion`` (``f`` for the kind
        applied, else 0), ``kind`` and ``occluded_edge`` (codes in
        :data:`DEGRADATION_CODES`).
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    for name, value in (
        ("corrupt_fraction", corrupt_fraction),
        ("noise_probability", noise_probability),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not 0.0 < max_severity <= 1.0:
        raise ValueError(f"max_severity must be in (0, 1], got {max_severity}")
    n, _, h, w = images.shape
    out = images.copy()
    severity = np.zeros(n, np.float32)
    kind = np.zeros(n, np.float32)
    edge = np.full(n, -1.0, np.float32)
    chosen = np.sort(rng.choice(n, size=int(round(corrupt_fraction * n)), replace=False))
    for i in chosen.tolist():
        f = float(rng.uniform(0.0, max_severity))
        severity[i] = f
        if rng.random() < noise_probability:
            kind[i] = 1
            count = int(f * h * w)
            rows, cols = rng.integers(0, h, count), rng.integers(0, w, count)
            # One grey level per position, shared by the channels, as in the
            # single-channel original.
            out[i][:, rows, cols] = rng.integers(0, 256, count, dtype=np.uint8)
        else:
            kind[i] = 2
            side = int(rng.integers(0, 4))
            edge[i] = side
            depth = int(f * (h if side in (0, 2) else w))
            if depth:
                region = {
                    0: np.s_[:, :depth, :],
                    1: np.s_[:, :, :depth],
                    2: np.s_[:, h - depth :, :],
                    3: np.s_[:, :, w - depth :],
                }[side]
                out[i][region] = 0
    degradations = {
        "severity": severity,
        "pixel_noise": np.where(kind == 1, severity, 0).astype(np.float32),
        "edge_occlusion": np.where(kind == 2, severity, 0).astype(np.float32),
        "kind": kind,
        "occluded_edge": edge,
    }
    return out, degradations


def amenability_from_severity(
    severity: np.ndarray, max_severity: float = MAX_SEVERITY
) -> np.ndarray:
    """Ground-truth amenability ``1 - severity / max_severity``, ``(N,)`` float32 in [0, 1]."""
    return np.clip(1.0 - np.asarray(severity, np.float64) / max_severity, 0.0, 1.0).astype(
        np.float32
    )


def simulate_raters(
    amenability: np.ndarray,
    rng: np.random.Generator,
    *,
    n_raters: int = N_RATERS,
    rater_noise: float = RATER_NOISE,
) -> np.ndarray:
    """Majority vote of ``n_raters`` noisy raters: ``(N,)`` uint8, 1 = amenable.

    Each rater perceives ``amenability + normal(0, rater_noise)`` and calls the
    image amenable at ``>= 0.5``; ties (even ``n_raters``) count as amenable.
    """
    if n_raters < 1:
        raise ValueError(f"n_raters must be at least 1, got {n_raters}")
    if rater_noise < 0:
        raise ValueError(f"rater_noise must be >= 0, got {rater_noise}")
    perceived = amenability[None, :] + rng.normal(0.0, rater_noise, (n_raters, amenability.size))
    votes = (perceived >= 0.5).sum(axis=0)
    return (2 * votes >= n_raters).astype(np.uint8)


# -------------------------------------------------------------------- loader
def load_fashion_mnist(
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    *,
    classes: tuple[int, int] = (2, 4),
    corrupt_fraction: float = 0.5,
    n_images: int | None = None,
    seed: int = 0,
    group_size: int = 20,
    max_severity: float = MAX_SEVERITY,
    noise_probability: float = NOISE_PROBABILITY,
) -> ImageDataset:
    """A binary Fashion-MNIST task with graded corruption, as an :class:`ImageDataset`.

    Args:
        root: folder with the four IDX files (``.gz`` or uncompressed); the
            default is where ``apt-get install dataset-fashion-mnist`` puts them.
        classes: the two Fashion-MNIST class ids of the task, negative first;
            ``(2, 4)`` = pullover (label 0) vs. coat (label 1).
        corrupt_fraction: share of images corrupted, in [0, 1].  At 0.5 half the
            images are corrupted and, with severities uniform in [0, 0.6], about a
            quarter are not amenable.
        n_images: how many images to keep (class-balanced, at random); ``None``
            keeps all 14,000 of the two classes (train and test pooled).
        seed: seeds every random draw (selection, order, corruption, raters).
        group_size: images per pseudo-patient group.
        max_severity: upper end of the corrupted fraction ``f``.
        noise_probability: chance of pixel noise (else edge occlusion).

    Returns:
        ``N`` images ``(N, 1, 28, 28)`` uint8 in a shuffled order, labels
        ``(N,)``, groups ``(N,)``, ``amenability["classification"]``,
        ``human_amenability["classification"]`` and the degradations of
        :func:`corrupt_images`.  No masks.

    Raises:
        FileNotFoundError: the IDX files are missing (the message says how to
            install them).
        ValueError: an argument is out of range.
    """
    if len(classes) != 2 or classes[0] == classes[1] or not all(0 <= c < 10 for c in classes):
        raise ValueError(f"classes must be two different Fashion-MNIST ids in 0..9, got {classes}")
    if group_size < 1:
        raise ValueError(f"group_size must be a positive number of images, got {group_size}")
    if n_images is not None and n_images < 2:
        raise ValueError(
            f"n_images must be at least 2 (one per class) or None (all), got {n_images}"
        )
    root = Path(root)
    all_images, all_labels = _read_all(root)
    rng = np.random.default_rng(seed)

    per_class = [np.flatnonzero(all_labels == c) for c in classes]
    available = sum(idx.size for idx in per_class)
    if n_images is not None and n_images > available:
        raise ValueError(
            f"n_images={n_images} exceeds the {available} images of classes {classes} in {root}"
        )
    if n_images is None:
        keep = np.concatenate(per_class)
    else:
        # Class-balanced: the first class gets the extra image of an odd count.
        counts = (n_images - n_images // 2, n_images // 2)
        keep = np.concatenate(
            [rng.choice(idx, k, replace=False) for idx, k in zip(per_class, counts)]
        )
    keep = keep[rng.permutation(keep.size)]
    images = all_images[keep][:, None, :, :]
    labels = (all_labels[keep] == classes[1]).astype(np.int64)

    images, degradations = corrupt_images(
        images,
        rng,
        corrupt_fraction=corrupt_fraction,
        max_severity=max_severity,
        noise_probability=noise_probability,
    )
    amenability = amenability_from_severity(degradations["severity"], max_severity)
    human = simulate_raters(amenability, rng)
    return ImageDataset(
        images=images,
        labels=labels,
        groups=np.arange(images.shape[0], dtype=np.int64) // group_size,
        amenability={"classification": amenability},
        human_amenability={"classification": human},
        degradations=degradations,
        class_names=tuple(FASHION_MNIST_CLASSES[c] for c in classes),
        metadata={
            "source": "fashion-mnist",
            "fashion_mnist_classes": list(classes),
            "corrupt_fraction": corrupt_fraction,
            "max_severity": max_severity,
            "noise_probability": noise_probability,
            "seed": seed,
            "group_size": group_size,
            "groups": "pseudo-patients: consecutive blocks of group_size images",
            "amenability_rule": "classification: 1 - severity / max_severity",
            "human_amenability_rule": (
                f"majority of {N_RATERS} raters seeing amenability + normal(0, {RATER_NOISE}), "
                "amenable at >= 0.5"
            ),
            "degradation_codes": DEGRADATION_CODES,
        },
    )
