"""Shared fixtures: small synthetic datasets, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

#: The repository root (subprocesses run `python -m experiments.cli` from there).
REPO_ROOT = Path(__file__).resolve().parents[1]

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


def occluded_dataset(n: int = 800, size: int = 16, seed: int = 0, frac_bad: float = 0.4, hide_label: bool = True):
    """Data whose amenability is known and visible, for tests that an agent *learns*.

    The class is a bright square at the centre (present or not).  In a
    non-amenable image (``frac_bad``) a band of coarser noise covers the
    centre columns and hides the square, so the label cannot be read there
    and the task predictor's loss on it stays high; the band is visible to a
    controller.  The mean intensity is the same for both kinds; the band's
    extra texture makes the intensity st.d. a clue (AUROC about 0.19, i.e.
    0.81 inverted): this data tests whether the agents learn a ranking from
    the reward, not whether the method beats heuristics (the synthetic
    ultrasound set is the benchmark for that).

    ``hide_label=False`` puts the band's eight columns at the edges instead: the
    "non-amenable" images are degraded as visibly, but the square can still
    be read, so training on them costs the predictor nothing, and the fixed
    reward has nothing to teach, as on corrupted Fashion-MNIST
    (``docs/learning-status.md``, section 55).
    """
    from iqa_env.data import ImageDataset

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    bad = rng.random(n) < frac_bad
    img = rng.normal(110, 25, (n, size, size))
    c = size // 2
    img[labels == 1, c - 2 : c + 2, c - 2 : c + 2] += 70
    band = np.arange(c - 4, c + 4) if hide_label else np.r_[0:4, size - 4 : size]
    img[np.ix_(bad, np.arange(size), band)] = rng.normal(110, 36, (int(bad.sum()), size, 8))
    amenable = (~bad).astype(np.float32)
    return ImageDataset(
        images=np.clip(img, 0, 255).astype(np.uint8)[:, None],
        labels=labels,
        groups=np.arange(n) // 20,
        amenability={"classification": amenable},
        human_amenability={"classification": (~bad).astype(np.uint8)},
    )


def run_iqa_and_kill(argv: list[str], ready, log, timeout: float = 300.0) -> None:
    """Start ``python -m experiments.cli *argv`` and SIGKILL it as soon as ``ready()`` is true.

    Fails the test if the command exits first or ``ready()`` stays false for
    ``timeout`` seconds; its output goes to the file ``log``.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.cli", *argv], cwd=REPO_ROOT, env=env,
            stdout=out, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if proc.poll() is not None:
                    pytest.fail(f"iqa {argv[0]} exited ({proc.returncode}) before it could be killed:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"not ready to kill within {timeout} s:\n{log.read_text()}")
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"iqa {argv[0]} finished before it could be killed:\n{log.read_text()}"
