"""Shared fixtures: small synthetic datasets, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Two cores: one torch thread per process keeps parallel workers from fighting.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the built-in dataset cache out of the user's home, but share it across tests."""
    if "IQA_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("IQA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "iqa-cache"))


@pytest.fixture(scope="session")
def tiny_synthetic():
    """A small synthetic ultrasound set: 16 patients x 12 frames of 32 x 32 pixels."""
    from iqa_env.data import generate_synthetic

    return generate_synthetic(n_patients=16, frames_per_patient=12, size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_synthetic_path(tiny_synthetic, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from iqa_env.data import save_dataset

    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    save_dataset(tiny_synthetic, path)
    return path


@pytest.fixture(scope="session")
def small_synthetic():
    """A synthetic set large enough for learning tests: 60 patients x 20 frames, 32 x 32."""
    from iqa_env.data import generate_synthetic

    return generate_synthetic(n_patients=60, frames_per_patient=20, size=32, seed=0)


def random_dataset(n: int = 120, size: int = 16, seed: int = 0, masks: bool = True):
    """Random pixels with all fields set: for shape and API tests that need no realism."""
    from iqa_env.data import ImageDataset

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    amenability = rng.random(n).astype(np.float32)
    human = (amenability > 0.3).astype(np.uint8)
    return ImageDataset(
        images=rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8),
        labels=labels,
        groups=np.arange(n) // 6,
        masks=rng.integers(0, 2, (n, size, size), dtype=np.uint8) if masks else None,
        amenability={"classification": amenability, "segmentation": amenability},
        human_amenability={"classification": human, "segmentation": human},
    )
