"""Synthetic ultrasound-like B-mode data: the project's built-in default dataset.

Each simulated patient is a sweep of frames through a gland-like organ seen by
a convex probe.  A frame is made the way a B-mode scanner makes it:

1. an echogenicity map (mean backscattered power) of the tissue and the gland
   is drawn on the polar (depth x scan line) grid of the fan;
2. complex Gaussian scatterers, scaled by the square root of that map and by
   the depth attenuation, are convolved with a separable point-spread function
   (a Gaussian-modulated pulse axially, a Gaussian beam laterally), which gives
   fully developed Rayleigh speckle;
3. receiver noise is added, the time-gain compensation (TGC) and the receiver
   gain are applied, and the envelope ``|.|`` is detected;
4. the envelope is log-compressed to a dynamic range and scan-converted from the
   polar grid to the Cartesian fan (pixels outside the fan are 0).

Degradations act where they act on a real scanner: an acoustic shadow and a
loss of probe contact lower the transmission, reverberation adds clutter,
noise is added at the receiver, blur widens the point-spread function, gain
drift is an error in the receiver gain, and an out-of-view frame has the gland
partly or wholly outside the fan.  As a sonographer would, the simulated
operator turns the overall gain part of the way back when a degradation
brightens or darkens a frame, so that the frame's brightness says little
about its quality while the degradation stays visible locally.

The ground-truth amenability of a frame is computed from what the degradations
do to the *task*, not from their severity: the expected displayed contrast of
the gland (interior for classification, boundary for segmentation) with the
degradations is compared with the same frame without them.  For frames without
the organ the same is done for a hypothetical gland at the place the sweep
would show it, so an organ-absent frame is not amenable when the degradation
would hide an organ if there were one.  ``docs/synthetic-data.md`` describes
the generator and the checks it passes.

Everything is drawn from :class:`numpy.random.Generator` objects seeded from
``SyntheticConfig.seed`` (one stream per patient), so a dataset is fully
determined by its configuration, and the first patients of a larger dataset are
the same as those of a smaller one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.fft import next_fast_len
from scipy.special import ndtr

from iqa_env.checks import is_count, is_finite_number, is_flag, is_integer, is_whole_number
from iqa_env.data.dataset import ImageDataset

__all__ = [
    "CLASS_NAMES",
    "DEGRADATION_TYPES",
    "GENERATOR_VERSION",
    "RAYLEIGH_MEAN_TO_STD",
    "STRONG_SEVERITY",
    "FanGeometry",
    "SyntheticConfig",
    "expected_display",
    "generate_synthetic",
    "log_compress",
    "make_fan_geometry",
    "scan_convert",
    "shadow_loss_db",
    "simulate_envelope",
]

#: The simulated degradation types, in the order of ``ImageDataset.degradations``.
DEGRADATION_TYPES: tuple[str, ...] = (
    "shadow",
    "noise",
    "blur",
    "gain_drift",
    "reverberation",
    "contact_loss",
    "out_of_view",
)

#: Frames whose overall severity is at least this are "strongly degraded": the
#: degradation is aimed at the gland and hides it.
STRONG_SEVERITY: float = 0.75

#: ``labels`` 0 and 1.
CLASS_NAMES: tuple[str, str] = ("organ absent", "organ present")

#: Mean / standard deviation of a Rayleigh-distributed envelope, sqrt(pi / (4 - pi)).
RAYLEIGH_MEAN_TO_STD: float = math.sqrt(math.pi / (4.0 - math.pi))

#: Mean and standard deviation of ``10 log10(I)`` for exponentially distributed
#: speckle intensity ``I`` of unit mean (-10 gamma / ln 10 and 10 pi / (sqrt(6) ln 10) dB).
_LOG_SPECKLE_MEAN_DB: float = -10.0 * 0.5772156649015329 / math.log(10.0)
_LOG_SPECKLE_STD_DB: float = 10.0 * math.pi / (math.sqrt(6.0) * math.log(10.0))

#: Bumped whenever the same settings start to give different data (cached files
#: of the built-in dataset carry it in their name).
GENERATOR_VERSION: int = 2
_SOURCE = "synthetic-ultrasound"

# The display window is [top - dynamic range, top] dB relative to the mean tissue
# power; tying the top to the dynamic range keeps tissue near mid-grey for every range,
# so the dynamic range changes contrast and the gain changes brightness.
_DISPLAY_TOP_FRACTION = 0.55

# Degradation weights when a frame is strongly degraded: every one of these hides
# the gland when aimed at it.  Darkening (shadow, contact loss), brightening
# (noise, reverberation) and neutral (out of view) types are balanced so that
# the brightness of an image says little about its amenability.  Blur and gain
# drift only blur or re-shade the gland, so they come as milder degradations.
_HIDING_WEIGHTS: dict[str, float] = {
    "shadow": 0.22,
    "contact_loss": 0.18,
    "noise": 0.22,
    "reverberation": 0.2,
    "out_of_view": 0.18,
}


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SyntheticConfig:
    """Settings of the synthetic ultrasound generator; the defaults make the built-in dataset.

    Geometry is in centimetres, levels in decibels.  ``generate_synthetic(**overrides)``
    replaces fields by name.
    """

    n_patients: int = 100
    """Number of simulated patients; each is one sweep (one group id)."""

    frames_per_patient: int = 40
    """Frames per sweep; consecutive frames move through the gland."""

    size: int = 64
    """Output images are ``(1, size, size)`` uint8; at least 16."""

    seed: int = 0
    """Seed of every random draw; the same configuration gives identical arrays."""

    negative_fraction: float = 0.3
    """Target fraction of frames without the organ (the ends of each sweep)."""

    strong_fraction: float = 0.25
    """Target fraction of frames strongly degraded (gland hidden, label unrecoverable)."""

    graded_fraction: float = 0.40
    """Target fraction of frames with an intermediate degradation; the rest are mildly degraded or clean."""

    strong_present_fraction: float | None = None
    """Target fraction of organ-present frames among the strongly degraded ones.
    ``None`` draws the degradations without regard to the organ, so about
    ``1 - negative_fraction`` of them show it and a predictor that calls every
    hidden frame "present" is right that often.  0.5 gives the hidden frames
    an even class prior, so a predictor that cannot see the organ is at chance
    on them, as the method assumes of images that are not amenable (on
    generator version 1 the hiding degradations' footprint left a cue it
    could use: ``absent_reference`` and docs/synthetic-data.md)."""

    absent_reference: str = "sweep"
    """Where the degradations aimed at the gland go on an organ-absent frame,
    and the hypothetical gland its ground truth asks about.  An aimed
    degradation is sized to the gland it hides.  ``"sweep"`` (the built-in set
    since generator version 2): the size and place of one of the same sweep's
    organ-present sections, drawn at random, so a hiding degradation's
    footprint has the same distribution on both classes.  ``"fixed"``
    (version 1): a section of 0.6 of the full size where the sweep leaves the
    gland; the footprint is then the real section's on an organ-present frame
    and always that one on an organ-absent frame, so a predictor reads the
    label of a hidden frame from the footprint (docs/synthetic-data.md).  With
    ``"fixed"`` the arrays are version 1's, bit for bit."""

    max_depth_cm: float = 7.0
    """Imaging depth below the probe surface."""

    probe_radius_cm: float = 2.0
    """Radius of curvature of the convex probe (distance from the fan apex to the skin)."""

    fan_half_angle_deg: float = 35.0
    """Half the opening angle of the fan."""

    attenuation_db_per_cm: float = 5.0
    """Round-trip attenuation (about 0.5 dB/cm/MHz at 5 MHz); patients vary +-20 % around it."""

    tgc: bool = True
    """Apply time-gain compensation of the nominal attenuation; False leaves the depth fall-off."""

    psf_axial_samples: float = 1.0
    """Standard deviation of the axial pulse envelope, in depth samples of the polar grid."""

    psf_lateral_lines: float = 1.0
    """Standard deviation of the lateral beam profile, in scan lines."""

    gain_spread_db: float = 4.0
    """Standard deviation of the per-patient receiver gain; clean images vary this much in brightness."""

    dynamic_range_min_db: float = 35.0
    """Smallest per-patient dynamic range of the log compression."""

    dynamic_range_max_db: float = 75.0
    """Largest per-patient dynamic range of the log compression."""

    gland_contrast_min_db: float = -20.0
    """Darkest per-patient gland echogenicity relative to the tissue around it (the gland is hypoechoic)."""

    gland_contrast_max_db: float = -14.0
    """Least dark per-patient gland echogenicity relative to the tissue around it."""

    n_raters: int = 3
    """Simulated human raters whose majority vote makes ``human_amenability``; odd."""

    rater_noise: float = 0.25
    """Standard deviation of a rater's error when judging the amenability (scale 0-1)."""

    rater_severity_weight: float = 0.4
    """Weight raters give to how degraded a frame *looks* (1 - severity) against its true
    amenability; humans penalise visible artefacts that the task may not mind.  0 = raters
    judge the true amenability only."""


def _validate(cfg: SyntheticConfig) -> None:
    """Raise ``ValueError`` naming the first bad setting and what is expected."""

    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"SyntheticConfig.{name} must be {expected}, got {getattr(cfg, name)!r}")

    need(is_count(cfg.n_patients), "n_patients", "an integer >= 1")
    need(is_count(cfg.frames_per_patient), "frames_per_patient", "an integer >= 1")
    need(is_integer(cfg.size) and 16 <= cfg.size <= 1024, "size", "an integer in [16, 1024] (pixels)")
    need(is_whole_number(cfg.seed), "seed", "a non-negative integer")
    need(
        is_finite_number(cfg.negative_fraction) and 0 <= cfg.negative_fraction <= 0.9,
        "negative_fraction",
        "in [0, 0.9]",
    )
    need(is_finite_number(cfg.strong_fraction) and 0 <= cfg.strong_fraction <= 1, "strong_fraction", "in [0, 1]")
    need(is_finite_number(cfg.graded_fraction) and 0 <= cfg.graded_fraction <= 1, "graded_fraction", "in [0, 1]")
    need(
        cfg.strong_present_fraction is None
        or (is_finite_number(cfg.strong_present_fraction) and 0 < cfg.strong_present_fraction < 1),
        "strong_present_fraction",
        "None or in (0, 1)",
    )
    need(cfg.absent_reference in ("sweep", "fixed"), "absent_reference", "'sweep' or 'fixed'")
    if cfg.strong_fraction + cfg.graded_fraction > 1:
        raise ValueError(
            "SyntheticConfig.strong_fraction + graded_fraction must be at most 1, got "
            f"{cfg.strong_fraction} + {cfg.graded_fraction}"
        )
    need(is_finite_number(cfg.max_depth_cm) and 3 <= cfg.max_depth_cm <= 30, "max_depth_cm", "in [3, 30] cm")
    need(is_finite_number(cfg.probe_radius_cm) and 0 <= cfg.probe_radius_cm <= 10, "probe_radius_cm", "in [0, 10] cm")
    need(
        is_finite_number(cfg.fan_half_angle_deg) and 20 <= cfg.fan_half_angle_deg <= 60,
        "fan_half_angle_deg",
        "in [20, 60] degrees",
    )
    need(
        is_finite_number(cfg.attenuation_db_per_cm) and 0 <= cfg.attenuation_db_per_cm <= 20,
        "attenuation_db_per_cm",
        "in [0, 20] dB/cm",
    )
    need(is_flag(cfg.tgc), "tgc", "True or False")
    need(
        is_finite_number(cfg.psf_axial_samples) and 0.3 <= cfg.psf_axial_samples <= 5,
        "psf_axial_samples",
        "in [0.3, 5]",
    )
    need(
        is_finite_number(cfg.psf_lateral_lines) and 0.3 <= cfg.psf_lateral_lines <= 5,
        "psf_lateral_lines",
        "in [0.3, 5]",
    )
    need(is_finite_number(cfg.gain_spread_db) and 0 <= cfg.gain_spread_db <= 20, "gain_spread_db", "in [0, 20] dB")
    need(
        is_finite_number(cfg.dynamic_range_min_db) and 20 <= cfg.dynamic_range_min_db <= 100,
        "dynamic_range_min_db",
        "in [20, 100] dB",
    )
    need(
        is_finite_number(cfg.dynamic_range_max_db) and cfg.dynamic_range_min_db <= cfg.dynamic_range_max_db <= 100,
        "dynamic_range_max_db",
        f"in [dynamic_range_min_db={cfg.dynamic_range_min_db}, 100] dB",
    )
    need(
        is_finite_number(cfg.gland_contrast_min_db) and -40 <= cfg.gland_contrast_min_db <= 0,
        "gland_contrast_min_db",
        "in [-40, 0] dB",
    )
    need(
        is_finite_number(cfg.gland_contrast_max_db) and cfg.gland_contrast_min_db <= cfg.gland_contrast_max_db <= 0,
        "gland_contrast_max_db",
        f"in [gland_contrast_min_db={cfg.gland_contrast_min_db}, 0] dB",
    )
    need(
        is_count(cfg.n_raters) and cfg.n_raters % 2 == 1,
        "n_raters",
        "an odd integer >= 1",
    )
    need(is_finite_number(cfg.rater_noise) and 0 <= cfg.rater_noise <= 1, "rater_noise", "in [0, 1]")
    need(
        is_finite_number(cfg.rater_severity_weight) and 0 <= cfg.rater_severity_weight <= 1,
        "rater_severity_weight",
        "in [0, 1]",
    )


# ------------------------------------------------------------------------- geometry
@dataclass(frozen=True, eq=False)
class FanGeometry:
    """The polar acquisition grid of a convex probe and its scan conversion to pixels.

    The fan apex is the origin, ``z`` points down (depth) and ``x`` to the right;
    the probe surface is the arc of radius ``probe_radius_cm``.  Polar arrays are
    ``(n_depth, n_lines)``; images are ``(size, size)``.
    """

    size: int
    probe_radius_cm: float
    max_depth_cm: float
    half_angle: float
    """Half opening angle (radians)."""
    depth_cm: np.ndarray
    """``(n_depth,)`` depth of each sample below the probe surface."""
    theta: np.ndarray
    """``(n_lines,)`` angle of each scan line (radians, 0 = straight down)."""
    x_cm: np.ndarray
    """``(n_depth, n_lines)`` lateral position of each polar sample."""
    z_cm: np.ndarray
    """``(n_depth, n_lines)`` axial position of each polar sample (from the apex)."""
    pixel_cm: float
    """Pixel spacing of the output image."""
    pixel_x_cm: np.ndarray
    """``(size * size,)`` lateral position of each output pixel (row-major)."""
    pixel_z_cm: np.ndarray
    """``(size * size,)`` axial position of each output pixel."""
    fan_mask: np.ndarray
    """``(size, size)`` bool: pixel centre inside the fan."""
    fan_pixels: np.ndarray
    """``(K,)`` flat indices of the pixels inside the fan."""
    source_index: np.ndarray
    """``(4, K)`` flat polar indices of the bilinear neighbours of each fan pixel."""
    source_weight: np.ndarray
    """``(4, K)`` bilinear weights (sum to 1 per pixel)."""

    @property
    def n_depth(self) -> int:
        return int(self.depth_cm.size)

    @property
    def n_lines(self) -> int:
        return int(self.theta.size)

    @property
    def depth_step_cm(self) -> float:
        return float(self.max_depth_cm / self.n_depth)

    @property
    def line_step(self) -> float:
        """Angle between scan lines (radians)."""
        return float(2.0 * self.half_angle / self.n_lines)

    def contains(self, x_cm: np.ndarray, z_cm: np.ndarray) -> np.ndarray:
        """Whether points (any matching shapes) lie inside the fan."""
        r = np.hypot(x_cm, z_cm)
        theta = np.arctan2(x_cm, z_cm)
        r0 = self.probe_radius_cm
        return (r >= r0) & (r <= r0 + self.max_depth_cm) & (np.abs(theta) <= self.half_angle)


def make_fan_geometry(
    size: int,
    max_depth_cm: float = 7.0,
    probe_radius_cm: float = 2.0,
    fan_half_angle_deg: float = 35.0,
) -> FanGeometry:
    """The fan of a convex probe sampled on ``(round(1.25 size), size)`` polar points.

    The polar grid is slightly denser in depth than the image so that the
    speckle grain (set in polar samples) is about two pixels at every ``size``.
    The fan is centred in a square image whose side fits its widest extent.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    n_depth, n_lines = round(1.25 * size), int(size)
    half = math.radians(fan_half_angle_deg)
    r0, r1 = float(probe_radius_cm), float(probe_radius_cm + max_depth_cm)
    depth = (np.arange(n_depth) + 0.5) * (max_depth_cm / n_depth)
    theta = -half + (np.arange(n_lines) + 0.5) * (2 * half / n_lines)
    r_grid = r0 + depth[:, None]
    x = r_grid * np.sin(theta)[None, :]
    z = r_grid * np.cos(theta)[None, :]

    width = 2 * r1 * math.sin(half)
    z_top, z_bottom = r0 * math.cos(half), r1
    pixel = max(width, z_bottom - z_top) / size
    centre = (np.arange(size) + 0.5 - size / 2) * pixel
    px = np.broadcast_to(centre[None, :], (size, size)).ravel()
    pz = (np.broadcast_to(centre[:, None], (size, size)) + (z_top + z_bottom) / 2).ravel()
    pr = np.hypot(px, pz)
    pt = np.arctan2(px, pz)
    inside = (pr >= r0) & (pr <= r1) & (np.abs(pt) <= half)
    fan_pixels = np.flatnonzero(inside)
    # Fractional polar indices (sample centres at k + 0.5), clamped so the
    # bilinear neighbours exist; the clamp only touches the outermost half sample.
    fi = np.clip((pr[inside] - r0) / (max_depth_cm / n_depth) - 0.5, 0, n_depth - 1 - 1e-6)
    fj = np.clip((pt[inside] + half) / (2 * half / n_lines) - 0.5, 0, n_lines - 1 - 1e-6)
    i0, j0 = np.floor(fi).astype(np.int64), np.floor(fj).astype(np.int64)
    wi, wj = fi - i0, fj - j0
    i1, j1 = np.minimum(i0 + 1, n_depth - 1), np.minimum(j0 + 1, n_lines - 1)
    source_index = np.stack([i0 * n_lines + j0, i0 * n_lines + j1, i1 * n_lines + j0, i1 * n_lines + j1])
    source_weight = np.stack([(1 - wi) * (1 - wj), (1 - wi) * wj, wi * (1 - wj), wi * wj]).astype(np.float32)
    return FanGeometry(
        size=int(size),
        probe_radius_cm=r0,
        max_depth_cm=float(max_depth_cm),
        half_angle=half,
        depth_cm=depth,
        theta=theta,
        x_cm=x,
        z_cm=z,
        pixel_cm=float(pixel),
        pixel_x_cm=px,
        pixel_z_cm=pz,
        fan_mask=inside.reshape(size, size),
        fan_pixels=fan_pixels,
        source_index=source_index,
        source_weight=source_weight,
    )


def scan_convert(polar: np.ndarray, geometry: FanGeometry) -> np.ndarray:
    """Bilinear scan conversion of ``(F, n_depth, n_lines)`` polar frames to ``(F, size, size)``.

    Pixels outside the fan are 0.  Uses the index maps precomputed in ``geometry``.
    """
    frames = polar.reshape(polar.shape[0], -1)
    out = np.zeros((polar.shape[0], geometry.size * geometry.size), dtype=np.float32)
    acc = frames[:, geometry.source_index[0]] * geometry.source_weight[0]
    for k in range(1, 4):
        acc += frames[:, geometry.source_index[k]] * geometry.source_weight[k]
    out[:, geometry.fan_pixels] = acc
    return out.reshape(polar.shape[0], geometry.size, geometry.size)


# -------------------------------------------------------------------------- physics
def _psf_transfer(
    shape: tuple[int, int],
    sigma_axial: np.ndarray,
    sigma_lateral: np.ndarray,
    carrier: float,
) -> np.ndarray:
    """FFT of unit-energy separable PSFs, one per frame: ``(F, shape[0], shape[1])`` complex64.

    Axially a Gaussian-modulated pulse ``exp(-n^2 / 2 s^2) exp(2 pi i f n)`` (the
    analytic form of the RF pulse, ``f`` in cycles per sample), laterally a
    Gaussian beam.  Unit energy keeps the mean speckle power equal to the
    echogenicity.
    """

    def kernel(n: int, sigma: np.ndarray, f: float) -> np.ndarray:
        idx = np.fft.fftfreq(n, 1.0 / n)  # 0, 1, ..., -1: centred for circular convolution
        h = np.exp(-0.5 * (idx[None, :] / sigma[:, None]) ** 2) * np.exp(2j * np.pi * f * idx)[None, :]
        h /= np.sqrt(np.sum(np.abs(h) ** 2, axis=1, keepdims=True))
        return np.fft.fft(h, axis=1)

    ha = kernel(shape[0], np.asarray(sigma_axial, dtype=np.float64), carrier)
    hl = kernel(shape[1], np.asarray(sigma_lateral, dtype=np.float64), 0.0)
    return (ha[:, :, None] * hl[:, None, :]).astype(np.complex64)


def _complex_gaussian(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Circular complex Gaussian samples of unit mean power."""
    z = rng.standard_normal((2, *shape), dtype=np.float32)
    return (z[0] + 1j * z[1]).astype(np.complex64) * np.float32(math.sqrt(0.5))


def simulate_envelope(
    reflectivity: np.ndarray,
    rng: np.random.Generator,
    *,
    depth_cm: np.ndarray,
    attenuation_db_per_cm: float | np.ndarray = 0.0,
    tgc_db_per_cm: float | np.ndarray = 0.0,
    psf_axial: float | np.ndarray = 1.0,
    psf_lateral: float | np.ndarray = 1.0,
    noise_power: float | np.ndarray = 0.0,
    gain_error_db: np.ndarray | None = None,
    carrier_cycles_per_sample: float = 0.25,
) -> np.ndarray:
    """Envelope of the received echo before log compression: ``(F, n_depth, n_lines)`` float32.

    Args:
        reflectivity: ``(F, n_depth, n_lines)`` mean backscattered power of the
            object (echogenicity times the two-way transmission, plus clutter).
        rng: source of the scatterers and the noise.
        depth_cm: ``(n_depth,)`` depth below the probe surface of each sample.
        attenuation_db_per_cm: round-trip attenuation, scalar or ``(F,)``.
        tgc_db_per_cm: time-gain compensation slope, scalar or ``(F,)``.
        psf_axial: axial PSF standard deviation in samples, scalar or ``(F,)``.
        psf_lateral: lateral PSF standard deviation in lines, scalar or ``(F,)``.
        noise_power: receiver noise power before the TGC, scalar, ``(F,)`` or
            ``(F, n_depth)`` (noise that enters after part of the TGC is
            smaller there).
        gain_error_db: optional ``(F, n_depth, n_lines)`` receiver gain error (dB).
        carrier_cycles_per_sample: pulse centre frequency in cycles per depth sample.

    With uniform reflectivity and no noise the envelope is Rayleigh distributed
    (mean / std = :data:`RAYLEIGH_MEAN_TO_STD`) with mean power equal to the
    reflectivity times ``10^((tgc - attenuation) depth / 10)``.
    """
    refl = np.asarray(reflectivity, dtype=np.float32)
    if refl.ndim != 3:
        raise ValueError(f"reflectivity must have shape (F, n_depth, n_lines), got {refl.shape}")
    if np.any(refl < 0):
        raise ValueError("reflectivity is a power and must be non-negative")
    n_frames, n_depth, n_lines = refl.shape
    depth = np.asarray(depth_cm, dtype=np.float32)
    if depth.shape != (n_depth,):
        raise ValueError(f"depth_cm must have shape ({n_depth},), got {depth.shape}")

    def per_frame(v: float | np.ndarray, name: str) -> np.ndarray:
        a = np.broadcast_to(np.asarray(v, dtype=np.float32), (n_frames,))
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite")
        return a

    att = per_frame(attenuation_db_per_cm, "attenuation_db_per_cm")
    tgc = per_frame(tgc_db_per_cm, "tgc_db_per_cm")
    sa = per_frame(psf_axial, "psf_axial")
    sl = per_frame(psf_lateral, "psf_lateral")
    noise = np.asarray(noise_power, dtype=np.float32)
    noise = np.broadcast_to(noise[:, None] if noise.ndim == 1 else noise, (n_frames, n_depth))
    if not np.all(np.isfinite(noise)) or np.any(noise < 0):
        raise ValueError("noise_power must be finite and non-negative")
    if np.any(sa <= 0) or np.any(sl <= 0):
        raise ValueError("psf_axial and psf_lateral must be positive")

    # Pad by 4 PSF widths so the circular FFT convolution does not wrap echoes
    # from the bottom of the fan onto the top (and from one side onto the other).
    pad_a = math.ceil(4 * float(sa.max()))
    pad_l = math.ceil(4 * float(sl.max()))
    shape = (next_fast_len(n_depth + 2 * pad_a), next_fast_len(n_lines + 2 * pad_l))
    amp = np.sqrt(refl) * (10.0 ** (-att[:, None] * depth[None, :] / 20.0))[:, :, None]
    field = np.zeros((n_frames, *shape), dtype=np.complex64)
    field[:, pad_a : pad_a + n_depth, pad_l : pad_l + n_lines] = amp * _complex_gaussian(rng, refl.shape)
    field = np.fft.ifft2(np.fft.fft2(field) * _psf_transfer(shape, sa, sl, carrier_cycles_per_sample))
    echo = field[:, pad_a : pad_a + n_depth, pad_l : pad_l + n_lines].astype(np.complex64)
    echo += np.sqrt(noise)[:, :, None] * _complex_gaussian(rng, refl.shape)
    gain_db = tgc[:, None] * depth[None, :]
    gain = (10.0 ** (gain_db / 20.0))[:, :, None].astype(np.float32)
    if gain_error_db is not None:
        gain = gain * (10.0 ** (np.asarray(gain_error_db, dtype=np.float32) / 20.0))
    return (np.abs(echo) * gain).astype(np.float32)


def log_compress(
    envelope: np.ndarray,
    dynamic_range_db: float | np.ndarray,
    gain_db: float | np.ndarray = 0.0,
) -> np.ndarray:
    """Log compression of an envelope to display values in [0, 1] (same shape, float32).

    The window is ``[top - dynamic_range, top]`` dB with
    ``top = 0.55 * dynamic_range`` relative to unit mean tissue power, so tissue
    sits a little below mid-grey at every dynamic range.  ``dynamic_range_db`` and ``gain_db``
    are scalars or ``(F,)`` (one per frame of an ``(F, ...)`` envelope).
    """
    env = np.asarray(envelope, dtype=np.float32)
    shape = (-1,) + (1,) * (env.ndim - 1)
    dr = np.asarray(dynamic_range_db, dtype=np.float32).reshape(shape if np.ndim(dynamic_range_db) else ())
    gain = np.asarray(gain_db, dtype=np.float32).reshape(shape if np.ndim(gain_db) else ())
    level = 20.0 * np.log10(np.maximum(env, 1e-12)) + gain
    floor = (_DISPLAY_TOP_FRACTION - 1.0) * dr
    return np.clip((level - floor) / dr, 0.0, 1.0).astype(np.float32)


def expected_display(
    power: np.ndarray,
    dynamic_range_db: float | np.ndarray,
    gain_db: float | np.ndarray = 0.0,
) -> np.ndarray:
    """Mean of :func:`log_compress` over speckle, for a mean received power ``power``.

    The log of speckle intensity is approximated as Gaussian with the exact
    mean (-2.51 dB) and standard deviation (5.57 dB), so the mean of the clipped
    display value has a closed form.  Clipping matters: two regions that both
    fall below the display floor (or above its top) look the same.
    ``dynamic_range_db`` and ``gain_db`` broadcast against ``power``.
    """
    # Single precision when the power is: plenty for a display value, and faster
    # (numpy keeps float32 arrays float32 when combined with Python floats).
    dtype = np.float32 if np.asarray(power).dtype == np.float32 else np.float64
    dr: npt.NDArray[np.floating[Any]] = np.asarray(dynamic_range_db, dtype=dtype)
    gain: npt.NDArray[np.floating[Any]] = np.asarray(gain_db, dtype=dtype)
    mean_db = 10.0 * np.log10(np.maximum(np.asarray(power, dtype=dtype), 1e-30)) + _LOG_SPECKLE_MEAN_DB + gain
    m = (mean_db - (_DISPLAY_TOP_FRACTION - 1.0) * dr) / dr
    s = _LOG_SPECKLE_STD_DB / dr
    a, b = -m / s, (1.0 - m) / s
    pdf_a, pdf_b = np.exp(-0.5 * a * a), np.exp(-0.5 * b * b)
    cdf_a, cdf_b = ndtr(a), ndtr(b)
    return m * (cdf_b - cdf_a) + s * (pdf_a - pdf_b) / math.sqrt(2 * math.pi) + (1.0 - cdf_b)


def shadow_loss_db(
    geometry: FanGeometry,
    theta_start: np.ndarray,
    theta_end: np.ndarray,
    depth_start_cm: np.ndarray,
    loss_db: np.ndarray,
) -> np.ndarray:
    """Two-way power loss (dB, <= 0) of acoustic shadows: ``(F, n_depth, n_lines)``.

    Frame ``f`` loses ``loss_db[f]`` below ``depth_start_cm[f]`` on the lines
    between ``theta_start[f]`` and ``theta_end[f]`` (radians).  A shadow of
    amplitude transmission ``t`` has ``loss_db = -20 log10(t)``; the edges are
    one sample / one line wide so that the scan-converted border is smooth.
    """
    t0, t1 = np.asarray(theta_start, float), np.asarray(theta_end, float)
    d0, loss = np.asarray(depth_start_cm, float), np.asarray(loss_db, float)
    lateral = _soft_interval(geometry.theta[None, :], t0[:, None], t1[:, None], geometry.line_step)
    axial = _soft_step(geometry.depth_cm[None, :] - d0[:, None], geometry.depth_step_cm)
    return (-loss[:, None, None] * axial[:, :, None] * lateral[:, None, :]).astype(np.float32)


def _soft_step(x: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """0 below -width/2, 1 above +width/2, linear between (anti-aliased edge)."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def _soft_interval(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, width: float) -> np.ndarray:
    return _soft_step(x - lo, width) * _soft_step(hi - x, width)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


# -------------------------------------------------------------------------- anatomy
_DISC_POINTS = 256
_EDGE_POINTS = 96


def _unit_disc_points(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` evenly spread points of the unit disc (Fibonacci spiral): radius and angle."""
    k = np.arange(n) + 0.5
    return np.sqrt(k / n), k * math.pi * (3.0 - math.sqrt(5.0))


@dataclass(frozen=True)
class _GlandShape:
    """A patient's gland: a tilted ellipse with a few smooth bumps, scaled per frame."""

    semi_lateral_cm: float
    semi_axial_cm: float
    tilt: float
    harmonics: np.ndarray  # (3,) relative amplitudes of the k = 2, 3, 4 bumps
    phases: np.ndarray  # (3,)

    def _bump_from_direction(self, cos_phi: np.ndarray, sin_phi: np.ndarray) -> np.ndarray:
        """``1 + sum_k h_k cos(k phi + p_k)`` from the direction cosines (no trig on big arrays)."""
        w = (cos_phi + 1j * sin_phi).astype(np.complex64)
        w2 = w * w
        out = np.ones(w.shape, dtype=np.float32)
        for amp, phase, wk in zip(self.harmonics, self.phases, (w2, w2 * w, w2 * w2), strict=True):
            c = np.complex64(amp * np.exp(1j * phase))
            out += (wk * c).real
        return out

    def _bump(self, phi: np.ndarray) -> np.ndarray:
        return self._bump_from_direction(np.cos(phi), np.sin(phi))

    def normalised_radius(
        self, x: np.ndarray, z: np.ndarray, cx: np.ndarray, cz: np.ndarray, scale: np.ndarray
    ) -> np.ndarray:
        """``(F, M)`` radius of points ``(M,)`` in units of the gland outline (< 1 inside).

        Frames with ``scale == 0`` (no gland) get ``inf``.
        """
        dx = (x[None, :] - cx[:, None]).astype(np.float32)
        dz = (z[None, :] - cz[:, None]).astype(np.float32)
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        u = (c * dx + s * dz) * np.float32(1.0 / self.semi_lateral_cm)
        v = (-s * dx + c * dz) * np.float32(1.0 / self.semi_axial_cm)
        rho = np.hypot(u, v)
        safe = np.maximum(rho, np.float32(1e-6))
        rho /= self._bump_from_direction(u / safe, v / safe)
        with np.errstate(divide="ignore"):
            return rho / np.where(scale > 0, scale, 0.0).astype(np.float32)[:, None]

    def points(
        self, radius: np.ndarray, angle: np.ndarray, cx: np.ndarray, cz: np.ndarray, scale: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(F, M)`` positions of the points at (normalised radius, angle) of each frame's gland."""
        r = radius * self._bump(angle)
        u, v = r * np.cos(angle) * self.semi_lateral_cm, r * np.sin(angle) * self.semi_axial_cm
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        x = (c * u - s * v)[None, :] * scale[:, None] + cx[:, None]
        z = (s * u + c * v)[None, :] * scale[:, None] + cz[:, None]
        return x, z

    @property
    def mean_radius_cm(self) -> float:
        return math.sqrt(self.semi_lateral_cm * self.semi_axial_cm)


@dataclass(frozen=True)
class _Patient:
    """Per-patient anatomy and scanner settings."""

    gland: _GlandShape
    gland_x_cm: float
    gland_depth_cm: float
    gland_bend_cm: tuple[float, float]  # lateral / axial drift of the centre at the sweep ends
    gland_contrast_db: float
    inner_contrast_db: float
    capsule_db: float
    sweep_y: np.ndarray  # (F,) elevation of each frame in units of the gland half-length
    texture_db: float
    texture_waves: np.ndarray  # (K, 4): kx, kz, ky (rad/cm or per unit y) and phase
    texture_weights: np.ndarray  # (K,)
    fat_cm: float
    interface_depth_cm: float | None
    interface_db: float
    interface_curve: float
    bladder: tuple[float, float, float, float, float, float] | None  # x, depth, a, b, y centre, y half-length
    bone: (
        tuple[float, float, float, float, float] | None
    )  # side, edge angle, drift per unit y, depth, loss dB
    cysts: np.ndarray  # (C, 5): x, depth, radius, y centre, y half-length
    attenuation_db_per_cm: float
    gain_db: float
    dynamic_range_db: float
    auto_gain: float  # fraction of a brightness change that the operator / auto-gain undoes


# The gland cross-section shrinks towards the sweep ends as a super-ellipse
# profile; it counts as present while at least this fraction of its full size.
_MIN_SCALE = 0.45
_PROFILE_POWER = 3.0
_PRESENT_Y = float((1.0 - _MIN_SCALE**_PROFILE_POWER) ** (1.0 / _PROFILE_POWER))
# A hypothetical gland of this scale stands in for the organ on organ-absent
# frames when asking whether the frame would show an organ if there were one.
_REFERENCE_SCALE = 0.6


def _sample_patient(rng: np.random.Generator, cfg: SyntheticConfig, geom: FanGeometry) -> _Patient:
    """Anatomy and scanner settings of one patient; sizes scale with the imaging depth."""
    depth = cfg.max_depth_cm
    a = rng.uniform(0.24, 0.33) * depth
    b = rng.uniform(0.16, 0.22) * depth
    gland = _GlandShape(
        semi_lateral_cm=a,
        semi_axial_cm=b,
        tilt=rng.uniform(-0.25, 0.25),
        harmonics=rng.uniform(0.0, 0.07, 3) * np.array([1.0, 0.7, 0.5]),
        phases=rng.uniform(0, 2 * math.pi, 3),
    )
    # Gland centre kept well inside the fan so only the out-of-view degradation cuts it.
    gland_depth = rng.uniform(0.52, 0.62) * depth
    r_centre = cfg.probe_radius_cm + gland_depth
    max_x = max(0.0, r_centre * math.sin(geom.half_angle) - 1.3 * a)
    gland_x = rng.uniform(-1.0, 1.0) * min(0.15 * depth, max_x)

    # Sweep: the gland shows for |y| < _PRESENT_Y; the sweep runs past it on
    # both sides (unevenly) so that about `negative_fraction` of frames miss it.
    n = cfg.frames_per_patient
    neg = float(np.clip(cfg.negative_fraction + rng.uniform(-0.08, 0.08), 0.0, 0.95))
    length = 2 * _PRESENT_Y / max(1.0 - neg, 0.05)
    start = -_PRESENT_Y - rng.uniform(0.3, 0.7) * (length - 2 * _PRESENT_Y)
    step = length / max(n - 1, 1)
    # Hand-held sweeps are not evenly spaced: jitter each frame by a quarter step.
    y = start + step * np.arange(n) + rng.uniform(-0.25, 0.25, n) * step if n > 1 else np.zeros(1)

    k_waves = 8
    wavelength = rng.uniform(0.05, 0.2, k_waves) * depth
    direction = rng.uniform(0, 2 * math.pi, k_waves)
    waves = np.stack(
        [
            2 * math.pi / wavelength * np.cos(direction),
            2 * math.pi / wavelength * np.sin(direction),
            rng.uniform(-3.0, 3.0, k_waves),
            rng.uniform(0, 2 * math.pi, k_waves),
        ],
        axis=1,
    )
    weights = rng.uniform(0.5, 1.0, k_waves)
    weights /= np.sqrt(np.sum(weights**2) / 2.0)  # unit standard deviation of the sum

    bladder = None
    if rng.random() < 0.6:
        ba, bb = rng.uniform(0.2, 0.35) * depth, rng.uniform(0.1, 0.16) * depth
        bx = gland_x + rng.uniform(-0.5, 0.5)
        bdepth = max(gland_depth - b - bb - rng.uniform(0.0, 0.06) * depth, 0.6 * bb)
        side = rng.choice([-1.0, 1.0])
        bladder = (bx, bdepth, ba, bb, side * rng.uniform(0.7, 1.1), rng.uniform(0.6, 1.0))
    n_cysts = int(rng.integers(0, 4))
    cysts = (
        np.stack(
            [
                rng.uniform(-0.3, 0.3, n_cysts) * depth,
                rng.uniform(0.15, 0.95, n_cysts) * depth,
                rng.uniform(0.02, 0.05, n_cysts) * depth,
                rng.uniform(-1.5, 1.5, n_cysts),
                rng.uniform(0.15, 0.5, n_cysts),
            ],
            axis=1,
        )
        if n_cysts
        else np.zeros((0, 5))
    )
    has_interface = rng.random() < 0.5
    # A bone (the pubic arch) at the side of the fan casts a shadow that is
    # anatomy, not a degradation: it never covers the gland.
    bone = None
    side = -1.0 if gland_x > 0 else 1.0  # the side the gland leaves most room on
    gland_edge = math.atan2(1.3 * a + side * gland_x, r_centre - b)
    lo, hi = max(gland_edge + 0.05, 0.6 * geom.half_angle), 0.9 * geom.half_angle
    u = rng.random(5)  # drawn whether or not there is a bone, to keep the stream fixed
    if u[0] < 0.5 and lo < hi:
        bone = (
            side,
            lo + u[1] * (hi - lo),
            0.05 * (2 * u[2] - 1),
            (0.1 + 0.3 * u[3]) * depth,
            15.0 + 20.0 * u[4],
        )
    return _Patient(
        gland=gland,
        gland_x_cm=gland_x,
        gland_depth_cm=gland_depth,
        gland_bend_cm=(rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3)),
        gland_contrast_db=rng.uniform(cfg.gland_contrast_min_db, cfg.gland_contrast_max_db),
        inner_contrast_db=rng.uniform(-2.0, 2.0),
        capsule_db=rng.uniform(4.0, 9.0),
        sweep_y=y,
        texture_db=rng.uniform(1.0, 3.0),
        texture_waves=waves,
        texture_weights=weights,
        fat_cm=rng.uniform(0.03, 0.12) * depth,
        interface_depth_cm=rng.uniform(0.85, 0.97) * depth if has_interface else None,
        interface_db=rng.uniform(4.0, 10.0),
        interface_curve=rng.uniform(-0.04, 0.04),
        bladder=bladder,
        bone=bone,
        cysts=cysts,
        attenuation_db_per_cm=cfg.attenuation_db_per_cm * rng.uniform(0.8, 1.2),
        gain_db=rng.normal(0.0, cfg.gain_spread_db),
        dynamic_range_db=rng.uniform(cfg.dynamic_range_min_db, cfg.dynamic_range_max_db),
        auto_gain=rng.uniform(0.3, 0.9),
    )


def _gland_scale(y: np.ndarray) -> np.ndarray:
    s = np.clip(1.0 - np.abs(y) ** _PROFILE_POWER, 0.0, None) ** (1.0 / _PROFILE_POWER)
    return np.where(s >= _MIN_SCALE, s, 0.0)


def _gland_centre(p: _Patient, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, z from the apex) of the gland section at elevation ``y``: the gland is bent."""
    yy = np.clip(y, -1.0, 1.0) ** 2
    return p.gland_x_cm + p.gland_bend_cm[0] * yy, p.gland_depth_cm + p.gland_bend_cm[1] * yy


# ----------------------------------------------------------------------- sweep frames
@dataclass
class _Frames:
    """Per-frame arrays of one patient (``F`` frames)."""

    present: np.ndarray  # (F,) bool
    ref_scale: np.ndarray  # (F,) scale of the reference gland (actual or hypothetical)
    ref_x: np.ndarray  # (F,) reference gland centre after any out-of-view shift
    ref_z: np.ndarray
    severity: np.ndarray  # (F, T) severity per degradation type
    aimed: np.ndarray  # (F, T) bool: placed over the (reference) gland
    gain_db: np.ndarray  # (F,)
    dynamic_range_db: np.ndarray  # (F,)


def _draw_degradations(
    rng: np.random.Generator, cfg: SyntheticConfig, present: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Severity ``(F, T)`` and aiming ``(F, T)`` of each degradation type.

    A frame is strongly degraded (one hiding degradation aimed at the gland,
    severity >= 0.75, maybe a milder second one), graded (one or two types of
    severity 0.2-0.75, mostly aimed at the gland) or mild (none to two
    types of severity < 0.2), with patient-specific propensities.  With
    ``cfg.strong_present_fraction`` set, the chance of a strong degradation
    differs between organ-present and organ-absent frames so that about that
    fraction of the strongly degraded frames show the organ, the patient's
    share of strongly degraded frames unchanged (as far as a chance of 0.95
    allows).
    """
    n = present.size
    t = len(DEGRADATION_TYPES)
    propensity = rng.uniform(0.5, 1.5)
    p_strong = min(cfg.strong_fraction * propensity, 0.95)
    p_graded = min(cfg.graded_fraction * rng.uniform(0.7, 1.3), 1.0 - p_strong)
    pi = present.mean()
    if cfg.strong_present_fraction is not None and 0 < pi < 1:
        b = cfg.strong_present_fraction
        p_strong = np.where(present, min(b * p_strong / pi, 0.95), min((1 - b) * p_strong / (1 - pi), 0.95))
        p_graded = np.minimum(p_graded, 1.0 - p_strong)
    u = rng.random(n)
    strong, graded = u < p_strong, (u >= p_strong) & (u < p_strong + p_graded)
    mild = ~(strong | graded)

    order = np.argsort(rng.random((n, t)), axis=1)  # a random permutation of the types per frame
    severity = np.zeros((n, t))
    aimed = np.zeros((n, t), dtype=bool)
    rows = np.arange(n)

    # Mild: none, one or two types, each below 0.2.
    n_mild = rng.choice(3, size=n, p=[0.3, 0.45, 0.25])
    s_mild = rng.uniform(0.05, 0.2, n)
    for k in range(2):
        use = mild & (n_mild > k)
        severity[rows[use], order[use, k]] = s_mild[use] * rng.uniform(0.5, 1.0, int(use.sum()))

    # Graded: a primary type at the frame's severity, sometimes a weaker second one.
    s_graded = rng.uniform(0.2, STRONG_SEVERITY - 1e-3, n)
    severity[rows[graded], order[graded, 0]] = s_graded[graded]
    aimed[rows[graded], order[graded, 0]] = rng.random(int(graded.sum())) < 0.7
    second = graded & (rng.random(n) < 0.4)
    severity[rows[second], order[second, 1]] = s_graded[second] * rng.uniform(0.3, 0.8, int(second.sum()))

    # Strong: one hiding type aimed at the gland, sometimes a milder second type.
    names = list(_HIDING_WEIGHTS)
    w = np.array([_HIDING_WEIGHTS[k] for k in names])
    hide = np.array([DEGRADATION_TYPES.index(k) for k in names])[
        rng.choice(len(names), size=n, p=w / w.sum())
    ]
    s_strong = rng.uniform(STRONG_SEVERITY, 1.0, n)
    severity[rows[strong], hide[strong]] = s_strong[strong]
    aimed[rows[strong], hide[strong]] = True
    extra = order[:, 0]
    extra = np.where(extra == hide, order[:, 1], extra)
    second = strong & (rng.random(n) < 0.5)
    severity[rows[second], extra[second]] = rng.uniform(0.1, 0.5, int(second.sum()))
    return severity, aimed


_T = {name: i for i, name in enumerate(DEGRADATION_TYPES)}


def _out_of_view_shift(
    rng: np.random.Generator,
    geom: FanGeometry,
    gland: _GlandShape,
    cx: np.ndarray,
    cz: np.ndarray,
    scale: np.ndarray,
    fraction_out: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Move each gland so that ``fraction_out`` of its area leaves the fan.

    Two thirds of the frames slide sideways past the fan edge (the probe is
    aimed off the gland), the others deeper than the imaging depth.  The shift
    is found by bisection on points spread over the gland.
    """
    n = cx.size
    radius, angle = _unit_disc_points(_DISC_POINTS)
    r_c, th_c = np.hypot(cx, cz), np.arctan2(cx, cz)
    lateral = rng.random(n) < 2 / 3
    side = np.where(th_c > 0, 1.0, -1.0) * np.where(rng.random(n) < 0.8, 1.0, -1.0)
    extent = gland.semi_lateral_cm * max(1.0, gland.semi_axial_cm / gland.semi_lateral_cm) * 1.3 * scale
    hi = np.where(lateral, 2 * geom.half_angle + np.arctan2(extent, r_c), geom.max_depth_cm + 2 * extent)
    lo = np.zeros(n)

    def moved(step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        th = th_c + np.where(lateral, side * step, 0.0)
        r = r_c + np.where(lateral, 0.0, step)
        return r * np.sin(th), r * np.cos(th)

    for _ in range(22):
        mid = 0.5 * (lo + hi)
        x, z = gland.points(radius, angle, *moved(mid), scale)
        out = 1.0 - geom.contains(x, z).mean(axis=1)
        too_far = out > fraction_out
        hi = np.where(too_far, mid, hi)
        lo = np.where(too_far, lo, mid)
    step = np.where(fraction_out > 0, 0.5 * (lo + hi), 0.0)
    return moved(step)


def _degradation_fields(
    rng: np.random.Generator,
    geom: FanGeometry,
    fr: _Frames,
    gland_span: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, np.ndarray]:
    """Polar fields of the degradations of one patient's frames.

    Returns ``loss_db`` (two-way transmission loss), ``clutter`` (reverberation
    power, display-level), ``specular`` (bright calcification echoes, added to
    the echogenicity), ``gain_error_db``, the noise (display level at a
    reference depth, thermal fraction, baseline) and the PSF widening factors.  Every
    parameter is drawn for every frame so that the random stream does not
    depend on which degradations a frame has.
    """
    n: int = fr.severity.shape[0]
    sev, aim = fr.severity, fr.aimed
    th_lo, th_hi, d_lo, d_hi = gland_span
    half, depth, theta = geom.half_angle, geom.depth_cm, geom.theta
    d_max = geom.max_depth_cm
    shape = (n, geom.n_depth, geom.n_lines)
    loss_db = np.zeros(shape, dtype=np.float32)
    clutter = np.zeros(shape, dtype=np.float32)
    specular = np.zeros(shape, dtype=np.float32)
    margin = rng.uniform(0.05, 0.15, (4, n))
    # Aimed degradations below the strong level cover only part of the gland's
    # width, from one side, so they hide a graded part of it (a shadow over
    # the gland edge hurts the segmentation before the presence detection).
    cover = rng.uniform(0.15, 0.85, (3, n))
    from_left = rng.random((3, n)) < 0.5

    def aimed_span(k: int, sev_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full = sev_k >= STRONG_SEVERITY
        lo, hi = th_lo - margin[k], th_hi + margin[k]
        cut = th_lo + cover[k] * (th_hi - th_lo)
        part_lo = np.where(from_left[k], lo, cut)
        part_hi = np.where(from_left[k], cut, hi)
        return np.where(full, lo, part_lo), np.where(full, hi, part_hi)

    # Acoustic shadow: behind a calcification, aimed ones start above the gland and cover its width.
    s = sev[:, _T["shadow"]]
    a = aim[:, _T["shadow"]]
    span_lo, span_hi = aimed_span(0, s)
    centre = rng.uniform(-0.8, 0.8, n) * half
    width = (0.25 + 0.45 * s) * half * rng.uniform(0.7, 1.3, n)
    t0 = np.where(a, span_lo, centre - width)
    t1 = np.where(a, span_hi, centre + width)
    start = np.where(a, np.maximum(d_lo - rng.uniform(0.3, 1.2, n), 0.3), rng.uniform(0.15, 0.7, n) * d_max)
    loss_db += shadow_loss_db(geom, t0, t1, start, 60.0 * s) * (s > 0)[:, None, None]
    calc = (
        _soft_interval(theta[None, :], t0[:, None], t1[:, None], geom.line_step)[:, None, :]
        * np.exp(-0.5 * ((depth[None, :] - start[:, None]) / (0.7 * geom.depth_step_cm)) ** 2)[:, :, None]
    )
    specular += (
        (10 ** (rng.uniform(0.8, 1.4, n) * np.minimum(s * 4, 1.0)) - 1)[:, None, None]
        * calc
        * (s > 0)[:, None, None]
    )

    # Probe-contact loss: a dark sector from the skin down, with ring-down echoes of the air gap.
    s = sev[:, _T["contact_loss"]]
    a = aim[:, _T["contact_loss"]]
    span_lo, span_hi = aimed_span(1, s)
    width = (0.2 + 0.8 * s) * half * rng.uniform(0.7, 1.3, n)
    edge = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    t0 = np.where(a, span_lo, np.where(edge < 0, -2 * half, half - width))
    t1 = np.where(a, span_hi, np.where(edge < 0, -half + width, 2 * half))
    sector = _soft_interval(theta[None, :], t0[:, None], t1[:, None], geom.line_step)  # (F, L)
    loss_db -= ((60.0 * s)[:, None] * sector)[:, None, :]
    spacing = rng.uniform(0.04, 0.07, n) * d_max
    ring = _bands(depth, spacing, np.full(n, 0.35 * d_max), decay_db=4.0)
    clutter += (
        (10 ** ((-8.0 + 10.0 * s) / 10) * (s > 0))[:, None, None] * ring[:, :, None] * sector[:, None, :]
    )

    # Reverberation: bright bands at multiples of a shallow interface over a haze of clutter.
    s = sev[:, _T["reverberation"]]
    a = aim[:, _T["reverberation"]]
    span_lo, span_hi = aimed_span(2, s)
    centre = rng.uniform(-0.6, 0.6, n) * half
    width = rng.uniform(0.4, 1.0, n) * half
    t0 = np.where(a, span_lo, centre - width)
    t1 = np.where(a, span_hi, centre + width)
    end = np.where(a, d_hi + rng.uniform(0.3, 0.8, n), rng.uniform(0.25, 0.65, n) * d_max)
    spacing = rng.uniform(0.06, 0.11, n) * d_max
    bands = _bands(depth, spacing, end, decay_db=0.6) + 0.5 * _soft_step(end[:, None] - depth[None, :], 0.3)
    level = 10 ** ((-25.0 + 50.0 * s) / 10) * (s > 0)
    sector = _soft_interval(theta[None, :], t0[:, None], t1[:, None], 2 * geom.line_step)
    clutter += level[:, None, None] * bands[:, :, None] * sector[:, None, :]

    # Gain drift: a mis-set TGC slider (a bright or dark band in depth) plus a lateral tilt.
    s = sev[:, _T["gain_drift"]]
    a = aim[:, _T["gain_drift"]]
    centre = np.where(a, 0.5 * (d_lo + d_hi), rng.uniform(0.1, 0.9, n) * d_max)
    width = np.where(a, np.maximum(0.6 * (d_hi - d_lo), 0.1 * d_max), rng.uniform(0.07, 0.2, n) * d_max)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    bump = np.exp(-0.5 * ((depth[None, :] - centre[:, None]) / width[:, None]) ** 2)
    tilt = rng.uniform(-0.25, 0.25, n)
    gain_error_db = (60.0 * s * sign)[:, None, None] * bump[:, :, None] + (60.0 * s * tilt)[:, None, None] * (
        theta / half
    )[None, None, :]

    # Noise: given as its display level (after the TGC) at a reference depth;
    # aimed noise is referenced to the gland so that it hides it.  Part of it is
    # thermal receiver noise, amplified by the TGC with depth, the rest
    # electrical interference that enters after the TGC and is flat in depth.
    s = sev[:, _T["noise"]]
    a = aim[:, _T["noise"]]
    baseline = -32.0 - rng.uniform(0.0, 6.0, n)
    ref_depth = np.where(a, 0.5 * (d_lo + d_hi), d_max)
    level_db = np.where(s > 0, np.where(a, -30.0 + 50.0 * s, -30.0 + 60.0 * s), -np.inf)
    thermal = rng.uniform(0.0, 1.0, n)

    # Blur / defocus: a wider lateral beam (up to 6x) and a longer pulse (up to 3x).
    s = sev[:, _T["blur"]]
    return {
        "loss_db": loss_db,
        "clutter": clutter,
        "specular": specular,
        "gain_error_db": gain_error_db.astype(np.float32),
        "noise_db": level_db,
        "noise_thermal_fraction": thermal,
        "noise_ref_depth": ref_depth,
        "baseline_noise_db": baseline,
        "blur_lateral": 1.0 + 5.0 * s,
        "blur_axial": 1.0 + 2.0 * s,
    }


def _bands(depth: np.ndarray, spacing: np.ndarray, end: np.ndarray, decay_db: float) -> np.ndarray:
    """``(F, n_depth)`` reverberation bands at multiples of ``spacing`` up to ``end``, fading with order."""
    order = depth[None, :] / spacing[:, None]
    k = np.round(order)
    profile = np.exp(-0.5 * ((order - k) / 0.12) ** 2) * (k >= 1) * 10 ** (-decay_db * (k - 1) / 10)
    return profile * _soft_step(end[:, None] - depth[None, :], 0.3)


# ------------------------------------------------------------------ echogenicity maps
def _tissue_db(p: _Patient, geom: FanGeometry, y: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``(F, M)`` background echogenicity (dB re 1) at points ``(M,)``: no gland."""
    # Plane waves cos(k.x + k_y y + phase) = cos(a) cos(b) - sin(a) sin(b), with a
    # the spatial and b the per-frame phase: two small real products.  einsum
    # rather than BLAS: a threaded BLAS is slower than this on shared cores.
    w = p.texture_waves
    a = (np.outer(w[:, 0], x) + np.outer(w[:, 1], z)).astype(np.float32)  # (K, M)
    b = np.outer(y, w[:, 2]) + w[:, 3]  # (F, K)
    amp = p.texture_db * p.texture_weights
    cos_b, sin_b = (np.cos(b) * amp).astype(np.float32), (np.sin(b) * amp).astype(np.float32)
    out = np.einsum("fk,km->fm", cos_b, np.cos(a)) - np.einsum("fk,km->fm", sin_b, np.sin(a))
    r = np.hypot(x, z)
    d = r - geom.probe_radius_cm
    skin = 0.08 * geom.max_depth_cm / 7.0
    out += (
        6.0 * _soft_step(skin - d, 0.05) - 4.0 * _soft_step(d - skin, 0.1) * _soft_step(p.fat_cm - d, 0.2)
    )[None]
    if p.interface_depth_cm is not None:
        zi = geom.probe_radius_cm + p.interface_depth_cm + p.interface_curve * x**2
        out += p.interface_db * np.exp(-0.5 * ((z - zi) / (0.6 * geom.depth_step_cm)) ** 2)[None]
    if p.bladder is not None:
        bx, bdepth, ba, bb, yc, yh = p.bladder
        sb = np.sqrt(np.clip(1.0 - ((y - yc) / yh) ** 2, 0.0, None))
        rho = np.hypot((x[None] - bx) / ba, (z[None] - geom.probe_radius_cm - bdepth) / bb)
        with np.errstate(divide="ignore"):
            rho = rho / np.where(sb > 0, sb, 0.0)[:, None]
        edge_width = geom.depth_step_cm / (min(ba, bb) * np.maximum(sb, 1e-3))[:, None]
        out -= 35.0 * _soft_step(1.0 - rho, edge_width)
    if p.bone is not None:
        side, edge, drift, bone_depth, loss = p.bone
        theta = np.arctan2(x, z)
        beyond = _soft_step(side * theta[None, :] - (edge + drift * y)[:, None], 0.02)
        below = d[None, :] - bone_depth
        out += beyond * (
            12.0 * np.exp(-0.5 * (below / (0.7 * geom.depth_step_cm)) ** 2)
            - loss * _soft_step(below, geom.depth_step_cm)
        )
    for cx, cdepth, cr, cy, ch in p.cysts:
        sc = np.sqrt(np.clip(1.0 - ((y - cy) / ch) ** 2, 0.0, None))
        dist = np.hypot(x - cx, z - geom.probe_radius_cm - cdepth)[None] - cr * sc[:, None]
        out -= 30.0 * _soft_step(-dist, geom.depth_step_cm) * (sc > 0)[:, None]
    return out


def _gland_db(p: _Patient, rho: np.ndarray, size_cm: np.ndarray, step_cm: float) -> np.ndarray:
    """``(F, M)`` echogenicity change (dB) of the gland: darker interior, inner zone, bright capsule."""
    dist = (rho - 1.0) * size_cm[:, None]  # ~ signed distance to the outline (cm)
    dist = np.where(np.isfinite(dist), dist, 1e3)
    inside = _soft_step(-dist, step_cm)
    inner = _soft_step(0.55 - rho, step_cm / np.maximum(size_cm, 1e-3)[:, None])
    capsule = np.clip(1.0 - np.abs(dist) / (1.5 * step_cm), 0.0, 1.0)
    return p.gland_contrast_db * inside + p.inner_contrast_db * inner + p.capsule_db * capsule


# ------------------------------------------------------------------- receive chain
@dataclass
class _ReceiveChain:
    """How an object power map becomes received power, with and without the degradations.

    Shared by the image simulation and the amenability model so that both see
    exactly the same physics.  Maps are ``(F, n_depth, n_lines)``.
    """

    depth_cm: np.ndarray  # (1, D, 1)
    attenuation: float  # round-trip, dB/cm
    tgc: float  # dB/cm
    loss_db: np.ndarray  # two-way transmission loss of shadows / contact loss
    specular: np.ndarray  # calcification echoes (object power)
    clutter: np.ndarray  # reverberation (object power)
    gain_error_db: np.ndarray  # receiver gain error, incl. the operator's correction
    noise_pre: np.ndarray  # (F, D) receiver noise before the TGC, degraded
    baseline_pre: np.ndarray  # (F, D) receiver noise of the undegraded scanner

    @classmethod
    def build(
        cls, geom: FanGeometry, cfg: SyntheticConfig, p: _Patient, deg: dict[str, np.ndarray]
    ) -> _ReceiveChain:
        tgc = cfg.attenuation_db_per_cm if cfg.tgc else 0.0
        # Noise is specified at display level at a reference depth; the thermal
        # receiver noise before the TGC is that level divided by the TGC gain
        # there, the interference is flat after the TGC.
        depth = geom.depth_cm[None, :]
        level = 10 ** (deg["noise_db"] / 10)[:, None]
        thermal = deg["noise_thermal_fraction"][:, None]
        baseline = 10 ** ((deg["baseline_noise_db"][:, None] - tgc * geom.max_depth_cm) / 10) * np.ones_like(
            depth
        )
        degraded = level * (
            thermal * 10 ** (-tgc * deg["noise_ref_depth"][:, None] / 10)
            + (1.0 - thermal) * 10 ** (-tgc * depth / 10)
        )
        return cls(
            depth_cm=geom.depth_cm[None, :, None],
            attenuation=p.attenuation_db_per_cm,
            tgc=tgc,
            loss_db=deg["loss_db"],
            specular=deg["specular"],
            clutter=deg["clutter"],
            gain_error_db=deg["gain_error_db"].copy(),
            noise_pre=(baseline + degraded).astype(np.float32),
            baseline_pre=baseline.astype(np.float32),
        )

    def reflectivity(self, echogenicity: np.ndarray) -> np.ndarray:
        """Object power seen through the shadows, plus clutter (input of :func:`simulate_envelope`)."""
        return ((echogenicity + self.specular) * 10 ** (self.loss_db / 10) + self.clutter).astype(np.float32)

    def power(self, echogenicity: np.ndarray, degraded: bool, index: Any = ...) -> np.ndarray:
        """Mean received power after attenuation, TGC, gain error and noise.

        ``index`` selects points of the ``(F, n_depth, n_lines)`` maps (a slice
        tuple or a boolean mask) so that only those are computed.
        """
        shape = echogenicity.shape

        def pick(a: Any) -> np.ndarray:
            return np.broadcast_to(np.asarray(a, dtype=np.float32), shape)[index]

        gain_err: np.ndarray | np.float32
        if degraded:
            gain_err = pick(self.gain_error_db)
            obj = (pick(echogenicity) + pick(self.specular)) * 10 ** (pick(self.loss_db) / 10) + pick(
                self.clutter
            )
            noise = pick(self.noise_pre[:, :, None])
        else:
            gain_err = np.float32(0.0)
            obj = pick(echogenicity)
            noise = pick(self.baseline_pre[:, :, None])
        depth = pick(self.depth_cm)
        rx_gain = 10 ** ((self.tgc * depth + gain_err) / 10)
        path = 10 ** (-self.attenuation * depth / 10)
        return ((obj * path + noise) * rx_gain).astype(np.float32)


def _weighted_mean(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``(F,)`` mean of ``(F, ...)`` maps with a broadcastable weight (the polar area element)."""
    w = np.broadcast_to(weight, x.shape[1:])
    return np.sum(x * w, axis=tuple(range(1, x.ndim))) / np.sum(w)


# --------------------------------------------------------------------------- patient
def _simulate_patient(
    rng: np.random.Generator, cfg: SyntheticConfig, geom: FanGeometry
) -> dict[str, np.ndarray]:
    """All per-frame outputs of one patient (one sweep)."""
    p = _sample_patient(rng, cfg, geom)
    n = cfg.frames_per_patient
    y = p.sweep_y
    scale = _gland_scale(y)

    # Label: the gland section is big enough and covers at least one pixel centre.
    cx, cz = _gland_centre(p, y)
    cz_apex = cz + geom.probe_radius_cm
    rho_pix = p.gland.normalised_radius(geom.pixel_x_cm, geom.pixel_z_cm, cx, cz_apex, scale)
    present = (scale > 0) & np.any(rho_pix < 1.0, axis=1)
    scale = np.where(present, scale, 0.0)

    severity, aimed = _draw_degradations(rng, cfg, present)
    overall = severity.max(axis=1)
    gain_db = p.gain_db + rng.normal(0.0, 1.5, n)
    dr_db = np.clip(p.dynamic_range_db + rng.normal(0.0, 2.0, n), 20.0, 100.0)

    # Reference gland: the actual section, or for organ-absent frames one the
    # sweep would show (cfg.absent_reference); moved out of view where required.
    ref_y = np.clip(y, -_PRESENT_Y, _PRESENT_Y)
    ref_scale = np.where(present, scale, _REFERENCE_SCALE)
    if cfg.absent_reference == "sweep" and present.any():
        # One of this sweep's own sections, from a stream of its own so that
        # every other draw of the patient stays as it is with "fixed".
        own = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
        pick = own.choice(np.flatnonzero(present), size=n)
        ref_y = np.where(present, ref_y, y[pick])
        ref_scale = np.where(present, scale, scale[pick])
    rx, rz = _gland_centre(p, ref_y)
    rz = rz + geom.probe_radius_cm
    oov = severity[:, _T["out_of_view"]]
    fraction_out = np.clip(1.3 * oov - 0.15, 0.0, 1.0)
    rx, rz = _out_of_view_shift(rng, geom, p.gland, rx, rz, ref_scale, fraction_out)
    fr = _Frames(present, ref_scale, rx, rz, severity, aimed, gain_db, dr_db)

    # Polar extent of the reference gland, for degradations aimed at it.
    bx, bz = p.gland.points(
        np.ones(_EDGE_POINTS), np.linspace(0, 2 * math.pi, _EDGE_POINTS, endpoint=False), rx, rz, ref_scale
    )
    b_theta = np.arctan2(bx, bz)
    b_depth = np.hypot(bx, bz) - geom.probe_radius_cm
    span = (b_theta.min(1), b_theta.max(1), b_depth.min(1), b_depth.max(1))
    deg = _degradation_fields(rng, geom, fr, span)

    # Echogenicity on the polar grid.
    xs, zs = geom.x_cm.ravel(), geom.z_cm.ravel()
    tissue_db = _tissue_db(p, geom, y, xs, zs)
    size_cm = ref_scale * p.gland.mean_radius_cm
    rho_ref = p.gland.normalised_radius(xs, zs, rx, rz, ref_scale)
    with_ref_db = tissue_db + _gland_db(p, rho_ref, size_cm, geom.depth_step_cm)
    image_db = np.where(present[:, None], with_ref_db, tissue_db)
    shape = (n, geom.n_depth, geom.n_lines)
    e_tissue = (10 ** (tissue_db / 10)).reshape(shape)
    e_ref = (10 ** (with_ref_db / 10)).reshape(shape)
    e_image = (10 ** (image_db / 10)).reshape(shape)

    chain = _ReceiveChain.build(geom, cfg, p, deg)
    # The operator (or the scanner's auto-gain) turns the gain part of the way
    # back when a degradation brightens or darkens the frame, as on a real
    # scanner; the degradation stays visible locally but the frame's overall
    # brightness says less about it.
    sub = (slice(None), slice(None, None, 2), slice(None, None, 2))
    weight = (geom.probe_radius_cm + geom.depth_cm)[::2, None]  # polar area element ~ r

    def mean_display(degraded: bool, offset_db: np.ndarray) -> np.ndarray:
        level = expected_display(
            chain.power(e_image, degraded, sub), dr_db[:, None, None], (gain_db + offset_db)[:, None, None]
        )
        return _weighted_mean(level, weight)

    clean = mean_display(False, np.zeros(n))
    target = clean + (1.0 - p.auto_gain) * (mean_display(True, np.zeros(n)) - clean)
    offset = np.zeros(n)
    # Fixed-point steps with the unclipped slope (1 / dynamic range); clipping
    # only flattens the slope, so the steps approach the target from one side.
    for _ in range(3):
        offset -= (mean_display(True, offset) - target) * dr_db
    chain.gain_error_db += offset[:, None, None].astype(np.float32)

    envelope = simulate_envelope(
        chain.reflectivity(e_image),
        rng,
        depth_cm=geom.depth_cm,
        attenuation_db_per_cm=chain.attenuation,
        tgc_db_per_cm=chain.tgc,
        psf_axial=cfg.psf_axial_samples * deg["blur_axial"],
        psf_lateral=cfg.psf_lateral_lines * deg["blur_lateral"],
        noise_power=chain.noise_pre,
        gain_error_db=chain.gain_error_db,
    )
    display = log_compress(envelope, dr_db, gain_db)
    images = np.rint(255.0 * scan_convert(display, geom)).astype(np.uint8)

    # Masks: the visible part of the gland (inside the fan), empty when absent.
    rho_mask = p.gland.normalised_radius(geom.pixel_x_cm, geom.pixel_z_cm, rx, rz, ref_scale)
    masks = (rho_mask < 1.0) & geom.fan_mask.ravel()[None, :] & present[:, None]

    blur = (deg["blur_lateral"], deg["blur_axial"])
    amen = _amenability(geom, p, fr, chain, blur, e_tissue, e_ref, rho_ref.reshape(shape))
    degradations = {"severity": overall}
    for name, i in _T.items():
        degradations[name] = severity[:, i]
    return {
        "images": images,
        "masks": masks.reshape(n, geom.size, geom.size).astype(np.uint8),
        "labels": present.astype(np.int64),
        **{f"amenability/{k}": v for k, v in amen.items()},
        **{f"degradations/{k}": v for k, v in degradations.items()},
    }


# ----------------------------------------------------------------------- amenability
def _amenability(
    geom: FanGeometry,
    p: _Patient,
    fr: _Frames,
    chain: _ReceiveChain,
    blur: tuple[np.ndarray, np.ndarray],
    e_tissue: np.ndarray,
    e_ref: np.ndarray,
    rho_ref: np.ndarray,
) -> dict[str, np.ndarray]:
    """Ground-truth amenability per task from the visibility of the (reference) gland.

    The expected displayed contrast between the frame with the gland and the
    same frame without it is computed with the degradations and without them
    (same patient, gain and dynamic range).  The fraction of that contrast that
    survives, over the gland interior (classification) or over a band around
    its outline (segmentation), times the fraction of the gland (or outline)
    inside the fan and a blur factor, is mapped to [0, 1].  Presence detection
    tolerates a partly hidden gland; segmentation needs its whole outline.
    ``blur`` is the (lateral, axial) PSF widening factor per frame.
    """
    n = fr.present.size
    depth = geom.depth_cm[None, :, None]
    # Only points near the gland matter; evaluate the display model there.
    near = rho_ref < 1.25
    half_band = np.maximum(0.12, 1.5 * geom.depth_step_cm / (fr.ref_scale * p.gland.mean_radius_cm))
    band = near & (np.abs(rho_ref - 1.0) < half_band[:, None, None])
    interior = rho_ref < 1.0
    frame_index = np.broadcast_to(np.arange(n)[:, None, None], rho_ref.shape)[near]
    area_w = np.broadcast_to((geom.probe_radius_cm + depth), rho_ref.shape)[near]  # polar area element ~ r

    def displayed(e: np.ndarray, degraded: bool) -> np.ndarray:
        power = chain.power(e, degraded, near)
        return expected_display(power, fr.dynamic_range_db[frame_index], fr.gain_db[frame_index])

    contrast_deg = np.abs(displayed(e_ref, True) - displayed(e_tissue, True))
    contrast_clean = np.abs(displayed(e_ref, False) - displayed(e_tissue, False))
    kept = np.minimum(contrast_deg, contrast_clean) * area_w
    total = contrast_clean * area_w

    def survive(region: np.ndarray) -> np.ndarray:
        sel = region[near]
        num = np.bincount(frame_index[sel], kept[sel], minlength=n)
        den = np.bincount(frame_index[sel], total[sel], minlength=n)
        return np.divide(num, den, out=np.zeros(n), where=den > 1e-9)

    v_area, v_edge = survive(interior), survive(band)

    # Fractions of the gland area and outline inside the fan (out of view).
    radius, angle = _unit_disc_points(_DISC_POINTS)
    f_area = geom.contains(*p.gland.points(radius, angle, fr.ref_x, fr.ref_z, fr.ref_scale)).mean(1)
    edge_angle = np.linspace(0, 2 * math.pi, _EDGE_POINTS, endpoint=False)
    f_edge = geom.contains(
        *p.gland.points(np.ones(_EDGE_POINTS), edge_angle, fr.ref_x, fr.ref_z, fr.ref_scale)
    ).mean(1)

    # Blur: the extra PSF width relative to the gland size blurs its outline
    # (boundary error ~ width, Dice loss ~ width / radius) but barely hides it.
    r_gland = np.hypot(fr.ref_x, fr.ref_z)
    extra_lateral_sq = (geom.line_step * r_gland) ** 2 * (blur[0] ** 2 - 1.0)
    extra_axial_sq = geom.depth_step_cm**2 * (blur[1] ** 2 - 1.0)
    extra_cm = np.sqrt(0.5 * (extra_lateral_sq + extra_axial_sq))  # rms over the two axes
    rel = extra_cm / (fr.ref_scale * p.gland.mean_radius_cm)
    blur_cls = 1.0 / (1.0 + (rel / 0.8) ** 2)
    blur_seg = 1.0 / (1.0 + (rel / 0.25) ** 2)

    vis_cls = v_area * f_area * blur_cls
    vis_seg = v_edge * f_edge * blur_seg
    return {
        "classification": _smoothstep((vis_cls - 0.05) / 0.75).astype(np.float32),
        "segmentation": _smoothstep((vis_seg - 0.2) / 0.75).astype(np.float32),
    }


# ------------------------------------------------------------------------ the source
def _human_labels(
    rng: np.random.Generator,
    amenability: dict[str, np.ndarray],
    severity: np.ndarray,
    cfg: SyntheticConfig,
) -> dict[str, np.ndarray]:
    """Majority vote of ``cfg.n_raters`` raters, per task: ``task -> (N,)`` uint8.

    Each rater judges ``(1 - w) * amenability + w * (1 - severity)`` (what the
    task needs, mixed with how degraded the frame looks), adds a personal bias
    and per-image noise, and calls the frame amenable at 0.5 or above.
    """
    w = cfg.rater_severity_weight
    out = {}
    for task, a in amenability.items():
        seen = (1.0 - w) * a + w * (1.0 - severity)
        bias = rng.normal(0.0, 0.3 * cfg.rater_noise, (cfg.n_raters, 1))
        votes = (seen[None, :] + bias + rng.normal(0.0, cfg.rater_noise, (cfg.n_raters, a.size))) >= 0.5
        out[task] = (votes.sum(0) * 2 > cfg.n_raters).astype(np.uint8)
    return out


def generate_synthetic(config: SyntheticConfig | None = None, **overrides: Any) -> ImageDataset:
    """Simulate the synthetic ultrasound dataset.

    Args:
        config: the settings; ``None`` means :class:`SyntheticConfig` defaults
            (the built-in default dataset: 100 patients x 40 frames, 64 x 64).
        **overrides: fields of :class:`SyntheticConfig` to replace, e.g.
            ``generate_synthetic(n_patients=8, size=32, seed=1)``.

    Returns:
        An :class:`~iqa_env.data.dataset.ImageDataset` with ``N = n_patients *
        frames_per_patient`` frames: ``images`` ``(N, 1, S, S)`` uint8,
        ``labels`` ``(N,)`` (1 = organ present), ``masks`` ``(N, S, S)`` of the
        visible gland, ``groups`` = patient id, ground-truth ``amenability`` and
        majority-vote ``human_amenability`` for ``"classification"`` and
        ``"segmentation"``, per-image ``degradations`` (``"severity"`` and one
        severity per type in :data:`DEGRADATION_TYPES`) and the settings in
        ``metadata``.

    Raises:
        ValueError: an unknown override name or a setting out of range.
    """
    if config is None:
        config = SyntheticConfig()
    elif not isinstance(config, SyntheticConfig):
        raise ValueError(f"config must be a SyntheticConfig or None, got {type(config).__name__}")
    if overrides:
        known = {f.name for f in dataclasses.fields(SyntheticConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown SyntheticConfig field(s) {unknown}; valid names are {sorted(known)}")
        config = dataclasses.replace(config, **overrides)
    _validate(config)

    geom = make_fan_geometry(
        config.size, config.max_depth_cm, config.probe_radius_cm, config.fan_half_angle_deg
    )
    seeds = np.random.SeedSequence(config.seed).spawn(config.n_patients + 1)
    parts = [_simulate_patient(np.random.default_rng(s), config, geom) for s in seeds[:-1]]
    joined = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    amenability = {task: joined[f"amenability/{task}"] for task in ("classification", "segmentation")}
    metadata: dict[str, Any] = dataclasses.asdict(config)
    metadata.update({"source": _SOURCE, "version": GENERATOR_VERSION})
    return ImageDataset(
        images=joined["images"][:, None],
        labels=joined["labels"],
        groups=np.repeat(np.arange(config.n_patients, dtype=np.int64), config.frames_per_patient),
        masks=joined["masks"],
        amenability=amenability,
        human_amenability=_human_labels(
            np.random.default_rng(seeds[-1]), amenability, joined["degradations/severity"], config
        ),
        degradations={
            k.split("/", 1)[1]: v.astype(np.float32)
            for k, v in joined.items()
            if k.startswith("degradations/")
        },
        class_names=CLASS_NAMES,
        metadata=metadata,
    )
