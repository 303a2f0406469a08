"""The synthetic ultrasound generator: physics, determinism, fields, and an honest benchmark.

The benchmark tests run on the built-in default set (100 patients x 40 frames,
64 x 64), generated once for this module (about 10 s on two cores).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import scipy.optimize

from iqa_env.data.dataset import ImageDataset
from iqa_env.data.synthetic import (
    CLASS_NAMES,
    DEGRADATION_TYPES,
    GENERATOR_VERSION,
    RAYLEIGH_MEAN_TO_STD,
    STRONG_SEVERITY,
    SyntheticConfig,
    expected_display,
    generate_synthetic,
    log_compress,
    make_fan_geometry,
    scan_convert,
    shadow_loss_db,
    simulate_envelope,
)
from iqa_env.metrics import auroc

TASKS = ("classification", "segmentation")
SMALL: dict[str, Any] = dict(n_patients=8, frames_per_patient=10, size=32, seed=1)


@pytest.fixture(scope="module")
def default_set() -> ImageDataset:
    return generate_synthetic()


@pytest.fixture(scope="module")
def medium_set() -> ImageDataset:
    return generate_synthetic(n_patients=24, frames_per_patient=20, size=32, seed=3)


def _uniform_envelope(
    rng: np.random.Generator, frames: int = 8, depth: int = 100, lines: int = 64, **kwargs: object
) -> tuple[np.ndarray, np.ndarray]:
    depth_cm = (np.arange(depth) + 0.5) * 0.07
    env = simulate_envelope(np.ones((frames, depth, lines)), rng, depth_cm=depth_cm, **kwargs)  # type: ignore[arg-type]
    return env, depth_cm


# ------------------------------------------------------------------------ physics
def test_speckle_envelope_is_rayleigh() -> None:
    env, _ = _uniform_envelope(np.random.default_rng(0))
    assert env.shape == (8, 100, 64) and env.dtype == np.float32
    ratio = env.mean() / env.std()
    assert ratio == pytest.approx(RAYLEIGH_MEAN_TO_STD, abs=0.05)
    # Unit-energy PSF: the mean speckle power equals the echogenicity.
    assert np.mean(env.astype(np.float64) ** 2) == pytest.approx(1.0, rel=0.05)


def test_blurred_speckle_is_still_rayleigh() -> None:
    env, _ = _uniform_envelope(np.random.default_rng(1), psf_axial=2.0, psf_lateral=4.0)
    assert env.mean() / env.std() == pytest.approx(RAYLEIGH_MEAN_TO_STD, abs=0.08)


@pytest.mark.parametrize("transmission", [0.3, 0.1])
def test_shadow_lowers_the_level_by_20_log10_transmission(transmission: float) -> None:
    geom = make_fan_geometry(64)
    frames = 8
    loss_db = -20.0 * math.log10(transmission)
    loss = shadow_loss_db(
        geom,
        theta_start=np.full(frames, -0.25),
        theta_end=np.full(frames, 0.25),
        depth_start_cm=np.full(frames, 3.0),
        loss_db=np.full(frames, loss_db),
    )
    assert loss.shape == (frames, geom.n_depth, geom.n_lines)
    reflectivity = 10 ** (loss / 10)  # two-way power transmission t^2
    env = simulate_envelope(reflectivity, np.random.default_rng(2), depth_cm=geom.depth_cm)
    level = 20 * np.log10(env)
    deep = geom.depth_cm > 3.5  # clear of the shadow's top edge (one PSF width)
    inside = np.abs(geom.theta) < 0.2
    outside = np.abs(geom.theta) > 0.35
    drop = level[:, deep][:, :, inside].mean() - level[:, deep][:, :, outside].mean()
    assert drop == pytest.approx(20 * math.log10(transmission), abs=0.6)


def test_without_tgc_the_log_level_falls_at_the_attenuation_slope() -> None:
    slope_db_per_cm = 5.0
    env, depth_cm = _uniform_envelope(np.random.default_rng(3), attenuation_db_per_cm=slope_db_per_cm)
    profile = (20 * np.log10(env)).mean(axis=(0, 2))
    keep = slice(5, -5)  # away from the padded ends of the convolution
    fitted = np.polyfit(depth_cm[keep], profile[keep], 1)[0]
    assert fitted == pytest.approx(-slope_db_per_cm, abs=0.25)
    # With matching time-gain compensation the level is flat.
    env, depth_cm = _uniform_envelope(
        np.random.default_rng(3), attenuation_db_per_cm=slope_db_per_cm, tgc_db_per_cm=slope_db_per_cm
    )
    flat = np.polyfit(depth_cm[keep], (20 * np.log10(env)).mean(axis=(0, 2))[keep], 1)[0]
    assert abs(flat) < 0.25


def test_generated_frames_without_tgc_darken_with_depth() -> None:
    def row_means(d: ImageDataset) -> np.ndarray:
        """Mean grey level of each image row, over the fan pixels of all frames."""
        img = d.images[:, 0].astype(np.float64)
        return img.sum(axis=(0, 2)) / np.maximum((img > 0).sum(axis=(0, 2)), 1)

    without = row_means(generate_synthetic(n_patients=2, frames_per_patient=6, size=32, tgc=False, seed=5))
    with_tgc = row_means(generate_synthetic(n_patients=2, frames_per_patient=6, size=32, seed=5))
    top, bottom = slice(6, 12), slice(22, 28)
    assert without[bottom].mean() < without[top].mean() - 20
    assert with_tgc[bottom].mean() > without[bottom].mean() + 20


def test_expected_display_matches_simulated_speckle() -> None:
    """The amenability model's display mean agrees with the images' (clipping included)."""
    rng = np.random.default_rng(4)
    for power, dr, gain in [(1.0, 50.0, 0.0), (0.01, 40.0, -5.0), (30.0, 60.0, 8.0), (1e-4, 50.0, 0.0)]:
        env, _ = _uniform_envelope(rng, frames=4)
        shown = log_compress(env * math.sqrt(power), dr, gain).mean()
        assert float(expected_display(np.array(power), dr, gain)) == pytest.approx(float(shown), abs=0.015)


def test_scan_conversion_fills_the_fan_and_nothing_else() -> None:
    geom = make_fan_geometry(32)
    polar = np.full((2, geom.n_depth, geom.n_lines), 0.5, dtype=np.float32)
    images = scan_convert(polar, geom)
    assert images.shape == (2, 32, 32)
    np.testing.assert_allclose(images[:, geom.fan_mask], 0.5, atol=1e-6)
    assert np.all(images[:, ~geom.fan_mask] == 0)
    assert 0.4 < geom.fan_mask.mean() < 0.8


# ---------------------------------------------------------------- determinism
def test_same_seed_same_dataset_different_seed_different() -> None:
    a, b = generate_synthetic(**SMALL), generate_synthetic(**SMALL)
    for name in ("images", "labels", "groups", "masks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for table in ("amenability", "human_amenability", "degradations"):
        for key, value in getattr(a, table).items():
            np.testing.assert_array_equal(value, getattr(b, table)[key])
    c = generate_synthetic(**{**SMALL, "seed": 2})
    assert not np.array_equal(a.images, c.images)


def test_a_larger_set_starts_with_the_same_patients() -> None:
    small = generate_synthetic(n_patients=2, frames_per_patient=5, size=16, seed=9)
    large = generate_synthetic(n_patients=4, frames_per_patient=5, size=16, seed=9)
    np.testing.assert_array_equal(small.images, large.images[:10])
    np.testing.assert_array_equal(small.amenability["segmentation"], large.amenability["segmentation"][:10])


def test_no_global_random_state_is_used() -> None:
    state = np.random.get_state()
    np.random.seed(123)
    a = generate_synthetic(**SMALL)
    np.random.seed(456)
    b = generate_synthetic(**SMALL)
    np.random.set_state(state)
    np.testing.assert_array_equal(a.images, b.images)


# ---------------------------------------------------------------------- fields
def test_fields_shapes_and_dtypes() -> None:
    ds = generate_synthetic(**SMALL)
    n = 8 * 10
    assert isinstance(ds, ImageDataset) and len(ds) == n
    assert ds.images.shape == (n, 1, 32, 32) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (n,) and set(np.unique(ds.labels)) <= {0, 1}
    assert ds.class_names == CLASS_NAMES == ("organ absent", "organ present")
    assert ds.masks is not None and ds.masks.shape == (n, 32, 32) and ds.masks.dtype == np.uint8
    assert set(np.unique(ds.masks)) <= {0, 1}
    np.testing.assert_array_equal(ds.groups, np.repeat(np.arange(8), 10))
    for task in TASKS:
        a = ds.amenability[task]
        assert a.dtype == np.float32 and a.shape == (n,) and a.min() >= 0 and a.max() <= 1
        h = ds.human_amenability[task]
        assert h.dtype == np.uint8 and set(np.unique(h)) <= {0, 1}
    assert set(ds.degradations) == {"severity", *DEGRADATION_TYPES}
    for name, values in ds.degradations.items():
        assert values.dtype == np.float32 and values.shape == (n,), name
        assert values.min() >= 0 and values.max() <= 1, name
    np.testing.assert_allclose(
        ds.degradations["severity"], np.max([ds.degradations[t] for t in DEGRADATION_TYPES], axis=0)
    )
    assert ds.metadata["source"] == "synthetic-ultrasound"
    assert ds.metadata["version"] == GENERATOR_VERSION == 2
    for field in dataclasses.fields(SyntheticConfig):
        assert field.name in ds.metadata
    assert ds.metadata["n_patients"] == 8 and ds.metadata["seed"] == 1
    # Outside the fan is black.
    geom = make_fan_geometry(32)
    assert np.all(ds.images[:, 0][:, ~geom.fan_mask] == 0)


def test_masks_are_empty_exactly_when_absent_or_out_of_view(medium_set: ImageDataset) -> None:
    ds = medium_set
    assert ds.masks is not None
    nonempty = ds.masks.reshape(len(ds), -1).any(axis=1)
    assert not np.any(nonempty & (ds.labels == 0)), "an organ-absent frame has a mask"
    empty_positive = ~nonempty & (ds.labels == 1)
    assert np.all(ds.degradations["out_of_view"][empty_positive] > 0), "an in-view gland has no mask"


def test_a_config_object_and_overrides() -> None:
    config = SyntheticConfig(n_patients=2, frames_per_patient=3, size=16)
    ds = generate_synthetic(config, seed=4)
    assert len(ds) == 6 and ds.metadata["seed"] == 4
    assert len(generate_synthetic(n_patients=1, frames_per_patient=1, size=16)) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"size": 8}, "size"),
        ({"size": 32.0}, "size"),
        ({"n_patients": 0}, "n_patients"),
        ({"frames_per_patient": -1}, "frames_per_patient"),
        ({"negative_fraction": 1.5}, "negative_fraction"),
        ({"strong_fraction": 0.7, "graded_fraction": 0.5}, "strong_fraction"),
        ({"dynamic_range_min_db": 60.0, "dynamic_range_max_db": 50.0}, "dynamic_range_max_db"),
        ({"n_raters": 2}, "n_raters"),
        ({"seed": -1}, "seed"),
        ({"strong_present_fraction": 1.0}, "strong_present_fraction"),
        ({"strong_present_fraction": float("nan")}, "strong_present_fraction"),
        ({"absent_reference": "random"}, "absent_reference must be 'sweep' or 'fixed'"),
    ],
)
def test_bad_settings_raise_value_errors_naming_them(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synthetic(**{**SMALL, **overrides})


def test_unknown_overrides_are_named() -> None:
    with pytest.raises(ValueError, match=r"n_patient'.*valid names"):
        generate_synthetic(n_patient=3)
    with pytest.raises(ValueError, match="SyntheticConfig"):
        generate_synthetic({"n_patients": 3})  # type: ignore[arg-type]


# ------------------------------------------------------------------ the dataset
def test_fractions_of_negatives_and_strongly_degraded(default_set: ImageDataset) -> None:
    ds = default_set
    assert 0.25 <= 1 - ds.labels.mean() <= 0.35
    strong = ds.degradations["severity"] >= STRONG_SEVERITY
    assert 0.2 <= strong.mean() <= 0.3
    for task in TASKS:
        a = ds.amenability[task]
        # Strong degradations hide the gland; mild ones barely hurt.
        assert np.mean(a[strong] < 0.5) > 0.95
        assert np.mean(a[ds.degradations["severity"] < 0.2] >= 0.5) > 0.98
        # The rest is graded: a real spread of values in between.
        assert np.mean((a > 0.1) & (a < 0.9)) > 0.08


def test_strong_present_fraction_balances_the_hidden_frames() -> None:
    """Set, it decides the class balance of the strongly degraded frames and nothing else."""
    settings: dict[str, Any] = dict(n_patients=40, frames_per_patient=30, size=32, seed=2)
    plain = generate_synthetic(**settings)
    for target in (0.5, 0.2):
        ds = generate_synthetic(**settings, strong_present_fraction=target)
        strong = ds.degradations["severity"] >= STRONG_SEVERITY
        assert abs(ds.labels[strong].mean() - target) < 0.08, target
        # The same sweeps (labels) and about the same share of strongly degraded frames.
        np.testing.assert_array_equal(ds.labels, plain.labels)
        assert abs(strong.mean() - (plain.degradations["severity"] >= STRONG_SEVERITY).mean()) < 0.04
        assert ds.metadata["strong_present_fraction"] == target
    # Unset, the degradations ignore the organ: hidden frames are as often present as all frames.
    strong = plain.degradations["severity"] >= STRONG_SEVERITY
    assert abs(plain.labels[strong].mean() - plain.labels.mean()) < 0.08


def test_absent_reference_sweep_hides_the_label_in_a_hiding_degradations_footprint() -> None:
    """A shadow or contact loss aimed at the gland is sized to it.  With the
    fixed reference (generator version 1) the organ-absent frames all get a
    0.6-size footprint, so how much of a hidden frame is black tells the label;
    with ``"sweep"`` (the default) they get one of the sweep's own sections and
    it hardly does.  Nothing else moves."""
    settings: dict[str, Any] = dict(n_patients=60, frames_per_patient=30, size=32, seed=2)
    sweep = generate_synthetic(**settings)
    fixed = generate_synthetic(**settings, absent_reference="fixed")

    def black_area_auroc(ds: ImageDataset) -> float:
        d = ds.degradations
        hiding = (d["contact_loss"] >= STRONG_SEVERITY) | (d["shadow"] >= STRONG_SEVERITY)
        hidden = hiding & (ds.amenability["classification"] < 0.05)
        assert hidden.sum() > 100
        fan = (ds.images[:, 0] > 0).mean(axis=0) > 0.5
        black = ((ds.images[hidden, 0] < 20) & fan).reshape(int(hidden.sum()), -1).mean(axis=1)
        return auroc(black, ds.labels[hidden])

    leak, fair = black_area_auroc(fixed), black_area_auroc(sweep)
    assert leak > 0.65 and fair < 0.6 and leak - fair > 0.1, (leak, fair)
    # The sweeps, the organ-present frames and every frame without an aimed degradation are as they were.
    np.testing.assert_array_equal(sweep.labels, fixed.labels)
    for name in DEGRADATION_TYPES:
        np.testing.assert_array_equal(sweep.degradations[name], fixed.degradations[name])
    present = fixed.labels == 1
    np.testing.assert_array_equal(sweep.images[present], fixed.images[present])
    changed = (sweep.images != fixed.images).reshape(len(fixed), -1).any(axis=1)
    assert changed.any() and not changed[present].any()
    assert sweep.metadata["absent_reference"] == "sweep" and fixed.metadata["absent_reference"] == "fixed"


def test_the_two_tasks_have_different_amenability(default_set: ImageDataset) -> None:
    ds = default_set
    cls, seg = ds.amenability["classification"], ds.amenability["segmentation"]
    assert np.mean(np.abs(cls - seg) > 0.3) > 0.05
    # A gland partly out of view, or blurred, can still be detected but not segmented.
    for name, lo, hi in (("out_of_view", 0.3, 0.5), ("blur", 0.4, 0.75)):
        only = (ds.degradations[name] >= lo) & (ds.degradations[name] < hi)
        only &= ds.degradations["severity"] == ds.degradations[name]
        for other in DEGRADATION_TYPES:
            if other != name:
                only &= ds.degradations[other] < 0.2
        assert only.sum() > 20, name
        assert cls[only].mean() > seg[only].mean() + 0.25, name


@pytest.mark.parametrize("task", TASKS)
def test_intensity_statistics_do_not_reveal_amenability(default_set: ImageDataset, task: str) -> None:
    """The prototype's flaw: mean intensity alone scored AUROC 0.96.  Here it must not."""
    pixels = default_set.images.reshape(len(default_set), -1).astype(np.float64)
    not_amenable = default_set.amenability[task] < 0.5
    assert 0.3 <= auroc(pixels.mean(axis=1), not_amenable) <= 0.7
    assert 0.3 <= auroc(pixels.std(axis=1), not_amenable) <= 0.7


def test_strongly_degraded_frames_hide_the_label(default_set: ImageDataset) -> None:
    """A linear probe finds the organ in clean frames, not in strongly degraded ones."""
    ds = default_set
    n = len(ds)
    x = ds.images[:, 0].astype(np.float64).reshape(n, 16, 4, 16, 4).mean(axis=(2, 4)).reshape(n, -1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = ds.labels.astype(np.float64)
    test = ds.groups % 4 == 0  # held-out patients
    severity = ds.degradations["severity"]
    clean, strong = severity < 0.2, severity >= STRONG_SEVERITY

    def probe(train: np.ndarray) -> np.ndarray:
        def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
            z = x[train] @ w[1:] + w[0]
            p = 1.0 / (1.0 + np.exp(-z))
            grad = np.concatenate([[np.sum(p - y[train])], x[train].T @ (p - y[train]) + 20.0 * w[1:]])
            return float(np.sum(np.logaddexp(0, z) - y[train] * z) + 10.0 * w[1:] @ w[1:]), grad

        w = scipy.optimize.minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x
        return (x @ w[1:] + w[0]) > 0

    def accuracy(pred: np.ndarray, rows: np.ndarray) -> float:
        return float(np.mean(pred[rows] == (y[rows] > 0)))

    held_strong = test & strong
    majority = max(y[held_strong].mean(), 1 - y[held_strong].mean())
    on_clean = probe(~test & clean)
    assert accuracy(on_clean, test & clean) > 0.85
    assert accuracy(on_clean, held_strong) < majority + 0.05
    # Even a probe trained on strongly degraded frames barely beats the majority class.
    assert accuracy(probe(~test & strong), held_strong) < majority + 0.1


@pytest.mark.parametrize("task", TASKS)
def test_human_labels_mostly_agree_with_the_truth(default_set: ImageDataset, task: str) -> None:
    truth = default_set.amenability[task] >= 0.5
    agreement = np.mean(default_set.human_amenability[task] == truth)
    assert 0.75 <= agreement <= 0.97


def test_raters_without_severity_bias_or_noise_reproduce_the_truth() -> None:
    ds = generate_synthetic(**SMALL, rater_noise=0.0, rater_severity_weight=0.0)
    for task in TASKS:
        np.testing.assert_array_equal(ds.human_amenability[task], ds.amenability[task] >= 0.5)
