"""Holdout evaluation of a controller and its task predictor, as in the paper (plain numpy / scipy).

Inputs are per-image arrays over the holdout set: the task predictor's
per-sample metric (accuracy 0/1 or Dice, from ``TaskAmenabilityEnv.evaluate``),
the controller's scores, the patient ids, and the ground-truth / human
amenability labels.  Every function here is pure: arrays in, numbers out.

Conventions (also in ``docs/reproduce.md``):

- **Rejection.** At ratio ``s`` the lowest-scored images are rejected
  *globally* (over the whole holdout set, not per patient) and
  ``max(1, floor((1 - s) N))`` are kept, ties broken by index: the rule of
  the selective reward and of ``iqa score``
  (:func:`iqa_env.rewards.kept_by_rejection`).
- **Across patients.** A figure "mean +- st.d. across patients" is the mean
  and the sample standard deviation (``ddof=1``) of the per-patient means,
  each over that patient's *kept* images.  A patient whose images are all
  rejected has no mean: it is left out of that ratio's figure, and counted in
  ``patients_without_images``.
- **Paired t-test** (:func:`paired_ttest`, ``scipy.stats.ttest_rel``,
  two-sided): pairs are patients; one side is the selective predictor's mean
  over the patient's kept images, the other the non-selective baseline
  predictor's mean over *all* the patient's images.  Patients with all images
  rejected have no pair and are dropped from both sides (``patients_dropped``).
  With fewer than two pairs, or identical pairs, ``p`` is ``None``.
- **Undefined figures** (an AUROC with one class present, a Spearman
  correlation of a constant, a kappa with chance agreement 1) are ``None``,
  never NaN, so that results stay valid JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: The rejection ratios of the paper's Figure 4: 0, 5, ..., 30 %.
REJECTION_RATIOS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(7))
#: The rejection ratio of the paper's Table 1 and Figure 3, per task.
PAPER_REJECTION_RATIO: dict[str, float] = {"classification": 0.05, "segmentation": 0.15}
#: Quantiles of the random-rejection band.
RANDOM_BAND_QUANTILES: tuple[float, float] = (0.05, 0.95)


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def kept_images(scores: np.ndarray, rejection_ratio: float) -> np.ndarray:
    """Boolean mask of the images kept after rejecting the ``rejection_ratio`` lowest-scored (globally)."""
    from iqa_env.rewards import check_rejection_ratio, kept_by_rejection

    return kept_by_rejection(np.asarray(scores, dtype=np.float64), check_rejection_ratio(rejection_ratio))


def _check_lengths(**arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-image arrays must have one length each, got {lengths}")
    return next(iter(lengths.values()))


def patient_means(values: np.ndarray, groups: np.ndarray, keep: np.ndarray | None = None) -> dict[int, float]:
    """Mean of ``values`` over each patient's kept images; patients with none kept are absent."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    keep = np.ones(len(values), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    _check_lengths(values=values, groups=groups, keep=keep)
    ids, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values * keep, minlength=ids.size)
    counts = np.bincount(inverse, weights=keep.astype(np.float64), minlength=ids.size)
    return {int(g): float(s / c) for g, s, c in zip(ids, sums, counts) if c > 0}


def mean_and_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}`` of the defined values (sample st.d., ``ddof=1``; None if n < 2)."""
    listed = [_float_or_none(v) for v in values]
    defined = np.array([v for v in listed if v is not None], dtype=np.float64)
    return {
        "mean": float(defined.mean()) if defined.size else None,
        "std": float(defined.std(ddof=1)) if defined.size > 1 else None,
        "n": int(defined.size),
        "values": listed,
    }


def seeds_higher_text(comparison: dict[str, Any] | None) -> str:
    """``"3 of 4 (sign test p 0.62)"``: how many seeds of an :func:`against_initial` result ended higher,
    and its sign test (left out where no seed moved); ``"n/a"`` without pairs (or without the result,
    as in files written before it existed).  The one wording of it, for every report that prints it."""
    if not comparison or not comparison["pairs"]:
        return "n/a"
    p = comparison["sign_test_p"]
    return f"{comparison['higher']} of {comparison['pairs']}" + ("" if p is None else f" (sign test p {p:.2g})")


def against_initial(initial: Sequence[float | None], final: Sequence[float | None]) -> dict[str, Any]:
    """Runs' final figures against their own initial ones, across seeds (e.g. a controller's AUROC).

    ``initial[k]`` and ``final[k]`` belong to seed ``k``; seeds missing
    either figure (None) are left out.  Over the others it returns ``pairs``
    (how many), ``initial`` and ``final`` (:func:`mean_and_std` of each
    side), ``higher`` / ``lower`` / ``equal`` (how many seeds ended above,
    below or at their initial figure), ``gain`` (:func:`mean_and_std` of
    final - initial) and ``sign_test_p``: the two-sided sign test over the
    seeds that moved (``scipy.stats.binomtest`` with probability 1/2; None
    if none moved).
    The sign test assumes nothing about how the gains are distributed; with
    n seeds its smallest p is ``2 ** (1 - n)`` (0.0078 for 8 seeds, 0.0625
    for 5), so a study of few seeds cannot show more than that.
    """
    from scipy import stats

    if len(initial) != len(final):
        raise ValueError(f"initial and final need one figure per seed each, got {len(initial)} and {len(final)}")
    pairs = [
        (a, b)
        for a, b in zip((_float_or_none(v) for v in initial), (_float_or_none(v) for v in final))
        if a is not None and b is not None
    ]
    higher = sum(b > a for a, b in pairs)
    lower = sum(b < a for a, b in pairs)
    moved = higher + lower
    return {
        "pairs": len(pairs),
        "initial": mean_and_std([a for a, _ in pairs]),
        "final": mean_and_std([b for _, b in pairs]),
        "higher": higher,
        "lower": lower,
        "equal": len(pairs) - moved,
        "gain": mean_and_std([b - a for a, b in pairs]),
        "sign_test_p": float(stats.binomtest(higher, moved, 0.5).pvalue) if moved else None,
    }


def metric_across_patients(metric: np.ndarray, groups: np.ndarray, keep: np.ndarray | None = None) -> dict[str, Any]:
    """Mean +- st.d. across patients of the per-patient mean metric over kept images."""
    keep = np.ones(len(metric), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    means = patient_means(metric, groups, keep)
    stats = mean_and_std(list(means.values()))
    return {
        "mean": stats["mean"],
        "std": stats["std"],
        "patients": stats["n"],
        "patients_without_images": int(np.unique(groups).size - len(means)),
        "images_kept": int(keep.sum()),
        "image_mean": float(np.mean(np.asarray(metric, dtype=np.float64)[keep])) if keep.any() else None,
    }


def rejection_curve(
    metric: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    ratios: Sequence[float] = REJECTION_RATIOS,
) -> list[dict[str, Any]]:
    """The metric across patients after rejecting each ratio of the lowest-scored images (Figure 4)."""
    _check_lengths(metric=metric, scores=scores, groups=groups)
    return [
        {"ratio": float(r), **metric_across_patients(metric, groups, kept_images(scores, r))} for r in ratios
    ]


def paired_ttest(
    metric: np.ndarray,
    keep: np.ndarray,
    baseline_metric: np.ndarray,
    groups: np.ndarray,
    baseline_keep: np.ndarray | None = None,
) -> dict[str, Any]:
    """Paired t-test across patients: kept images of the selective predictor vs all images of the baseline.

    Returns ``t``, two-sided ``p``, ``mean_difference`` (selective - baseline,
    over the pairs), ``patients`` (pairs) and ``patients_dropped`` (patients
    whose images were all rejected).  With ``baseline_keep`` the baseline's
    side is its mean over those images instead of all (two rejections
    compared), and a patient is dropped when either side kept none.
    """
    from scipy import stats

    _check_lengths(metric=metric, keep=keep, baseline_metric=baseline_metric, groups=groups)
    selective = patient_means(metric, groups, keep)
    baseline = patient_means(baseline_metric, groups, baseline_keep)
    paired = sorted(set(selective) & set(baseline))
    a = np.array([selective[g] for g in paired], dtype=np.float64)
    b = np.array([baseline[g] for g in paired], dtype=np.float64)
    t = p = None
    if len(paired) >= 2 and np.any(a != b):
        result = stats.ttest_rel(a, b)
        t, p = _float_or_none(result.statistic), _float_or_none(result.pvalue)
    return {
        "t": t,
        "p": p,
        "mean_difference": float(np.mean(a - b)) if len(paired) else None,
        "patients": len(paired),
        "patients_dropped": int(np.unique(groups).size) - len(paired),
    }


def random_rejection_band(
    metric: np.ndarray,
    groups: np.ndarray,
    ratios: Sequence[float] = REJECTION_RATIOS,
    draws: int = 1000,
    seed: int = 0,
    quantiles: tuple[float, float] = RANDOM_BAND_QUANTILES,
) -> list[dict[str, Any]]:
    """What rejecting *at random* does: quantiles of the across-patient mean over ``draws`` random rejections.

    Each draw rejects as many images as :func:`kept_images` would, chosen
    uniformly at random; the band is the ``quantiles`` (and the median) of the
    resulting across-patient means.
    """
    metric = np.asarray(metric, dtype=np.float64)
    n = _check_lengths(metric=metric, groups=groups)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(groups, return_inverse=True)
    onehot = np.zeros((n, inverse.max() + 1))
    onehot[np.arange(n), inverse] = 1.0
    band = []
    for r in ratios:
        n_keep = int(kept_images(np.zeros(n), r).sum())
        keep = np.zeros((draws, n))
        np.put_along_axis(keep, np.argsort(rng.random((draws, n)), axis=1)[:, :n_keep], 1.0, axis=1)
        counts = keep @ onehot
        sums = (keep * metric) @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.nanmean(np.where(counts > 0, sums / counts, np.nan), axis=1)
        lo, mid, hi = np.quantile(means, [quantiles[0], 0.5, quantiles[1]])
        band.append({"ratio": float(r), "low": float(lo), "median": float(mid), "high": float(hi)})
    return band


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's kappa of two binary ratings; None when chance agreement is 1 (kappa undefined)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    _check_lengths(a=a, b=b)
    if a.size == 0:
        return None
    observed = float(np.mean(a == b))
    pa, pb = float(a.mean()), float(b.mean())
    chance = pa * pb + (1 - pa) * (1 - pb)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


def contingency(scores: np.ndarray, human_amenable: np.ndarray, rejection_ratio: float) -> dict[str, Any]:
    """Figure 3: "controller says low" (rejected at ``rejection_ratio``) against "human label says not amenable".

    ``table[i][j]``: row ``i`` is the controller (0 = low / rejected, 1 = high
    / kept), column ``j`` the human label (0 = not amenable, 1 = amenable).
    ``kappa`` is Cohen's kappa between the two "low" ratings.
    """
    human_amenable = np.asarray(human_amenable).astype(bool)
    _check_lengths(scores=scores, human_amenable=human_amenable)
    controller_low = ~kept_images(scores, rejection_ratio)
    human_low = ~human_amenable
    table = [
        [int(np.sum(controller_low & human_low)), int(np.sum(controller_low & ~human_low))],
        [int(np.sum(~controller_low & human_low)), int(np.sum(~controller_low & ~human_low))],
    ]
    return {
        "ratio": float(rejection_ratio),
        "rows": ["controller low", "controller high"],
        "columns": ["human not amenable", "human amenable"],
        "table": table,
        "kappa": cohen_kappa(controller_low, human_low),
        "agreement": float(np.mean(controller_low == human_low)) if len(scores) else None,
    }


def ranking_agreement(scores: np.ndarray, amenability: np.ndarray) -> dict[str, float | None]:
    """AUROC of ``scores`` against the binary ground truth (amenability >= 0.5) and Spearman's rho against it."""
    from iqa_env.metrics import auroc_or_none

    scores = np.asarray(scores, dtype=np.float64)
    amenability = np.asarray(amenability, dtype=np.float64)
    _check_lengths(scores=scores, amenability=amenability)
    value = auroc_or_none(scores, amenability >= 0.5)
    return {"auroc": value, "spearman": spearman_or_none(scores, amenability)}


def spearman_or_none(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho between two per-image arrays of one length; None where it is undefined (fewer
    than two images, or either array constant)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) > 1 and np.ptp(a) > 0 and np.ptp(b) > 0:
        return _float_or_none(stats.spearmanr(a, b).statistic)
    return None


def averaged_ranks(*scores: np.ndarray) -> np.ndarray:
    """The mean of each score's ranks (ties averaged), scaled to (0, 1]: one score that ranks as the
    scores do on average, whatever their scales."""
    from scipy import stats

    arrays = [np.asarray(s, dtype=np.float64) for s in scores]
    if not arrays:
        raise ValueError("averaged_ranks needs at least one score array")
    n = _check_lengths(**{f"scores_{k}": a for k, a in enumerate(arrays)})
    return np.mean([stats.rankdata(a) for a in arrays], axis=0) / max(n, 1)


def with_confidence(
    scores: np.ndarray,
    confidence: np.ndarray,
    amenability: np.ndarray,
    initial_scores: np.ndarray | None = None,
) -> dict[str, float | None]:
    """A controller's scores beside the baseline predictor's confidence: what the controller knows that the
    confidence does not.

    The confidence is the heuristic a controller has the hardest time
    beating (``docs/learning-status.md``, section 82: the weighted and
    selective rewards teach the controller the predictor's validation
    losses, and a predictor is least confident where its losses are
    high). Two scores can rank as well as each other and still differ;
    this measures how.  Returns ``spearman``: their rank correlation;
    ``auroc``: the AUROC against the ground truth (amenability >= 0.5) of
    their ranks averaged (:func:`averaged_ranks`); ``confidence_auroc``:
    the confidence's alone; ``untrained_auroc``: ``initial_scores`` (the
    run's untrained controller) averaged with the confidence, the
    reference that says whether the training put it there (an untrained
    network's ranks only add noise).  Where ``auroc`` is above both, the
    trained controller knows of the truth something the confidence does
    not.
    """
    from iqa_env.metrics import auroc_or_none

    scores = np.asarray(scores, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    amenable = np.asarray(amenability, dtype=np.float64) >= 0.5
    _check_lengths(scores=scores, confidence=confidence, amenability=amenable)
    untrained = None
    if initial_scores is not None:
        untrained = auroc_or_none(averaged_ranks(initial_scores, confidence), amenable)
    return {
        "spearman": spearman_or_none(scores, confidence),
        "auroc": auroc_or_none(averaged_ranks(scores, confidence), amenable),
        "confidence_auroc": auroc_or_none(confidence, amenable),
        "untrained_auroc": untrained,
    }


def heuristic_scores(images: np.ndarray, confidence: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Simple per-image quality heuristics that the controller should beat.

    ``mean_intensity`` and ``intensity_std`` of the pixels, and, given the
    baseline predictor's ``confidence`` (max softmax probability, or mean
    pixel confidence for segmentation), ``predictor_confidence``.
    """
    flat = np.asarray(images).reshape(len(images), -1).astype(np.float64)
    out = {"mean_intensity": flat.mean(1), "intensity_std": flat.std(1)}
    if confidence is not None:
        out["predictor_confidence"] = np.asarray(confidence, dtype=np.float64)
    return out
