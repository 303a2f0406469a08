"""`iqa reproduce` and `iqa benchmark-algorithms` end to end on a tiny budget, and the evaluation statistics.

The pipeline tests check that every output exists and that results.json has
every field; they hold no figure to a threshold (a tiny budget learns nothing).
The statistics are checked on hand-made inputs whose answers are known.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re

import numpy as np
import pytest
from scipy import stats

from experiments import evaluation as ev
from experiments.cli import main

# ------------------------------------------------------------------ statistics


def test_kept_images_rejects_the_lowest_fraction_globally():
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4, 0.0])
    keep = ev.kept_images(scores, 0.3)
    assert keep.sum() == 7  # floor((1 - 0.3) * 10)
    assert set(np.flatnonzero(~keep)) == {1, 5, 9}
    assert ev.kept_images(scores, 0.0).all()


def test_metric_across_patients_uses_each_patients_kept_images():
    metric = np.array([1.0, 0.0, 1.0, 1.0, 0.5, 0.5])
    groups = np.array([0, 0, 1, 1, 2, 2])
    keep = np.array([True, True, True, False, False, False])
    assert ev.patient_means(metric, groups, keep) == {0: 0.5, 1: 1.0}
    out = ev.metric_across_patients(metric, groups, keep)
    assert out["mean"] == pytest.approx(0.75)
    assert out["std"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert out["patients"] == 2 and out["patients_without_images"] == 1 and out["images_kept"] == 3
    assert out["image_mean"] == pytest.approx(2 / 3)


def test_rejection_curve_of_a_perfect_ranking_rises():
    rng = np.random.default_rng(0)
    metric = np.ones(200)
    metric[rng.choice(200, 60, replace=False)] = 0.0
    groups = np.arange(200) // 20
    curve = ev.rejection_curve(metric, metric + 1e-3 * rng.random(200), groups)
    assert [c["ratio"] for c in curve] == list(ev.REJECTION_RATIOS)
    assert curve[0]["mean"] == pytest.approx(np.mean([metric[groups == g].mean() for g in range(10)]))
    assert curve[0]["images_kept"] == 200 and curve[-1]["images_kept"] == 140
    means = [c["mean"] for c in curve]
    assert means == sorted(means) and means[-1] == 1.0  # 30 % rejection removes all 60 failures


def test_the_baseline_predictor_rejecting_by_the_ground_truth_gains_what_a_perfect_ranking_can():
    from types import SimpleNamespace

    from experiments.reproduce import summarise_baseline

    rng = np.random.default_rng(0)
    n = 300
    truth = rng.random(n)
    groups = np.arange(n) % 10
    # The predictor fails on the 10 % least amenable images, and on a few others at random.
    metric = (truth >= np.quantile(truth, 0.10)).astype(np.float64)
    metric[rng.choice(n, 15, replace=False)] = 0.0
    confidence = rng.random(n)  # says nothing
    holdout = SimpleNamespace(groups=groups, amenability={"classification": truth}, images=rng.random((n, 1, 8, 8)))
    out = summarise_baseline("classification", holdout, {"metric": metric, "confidence": confidence}, seed=0, draws=20)
    oracle, conf = out["rejecting_by"]["ground_truth"], out["rejecting_by"]["predictor_confidence"]
    base = out["metric"]["mean"]
    at = oracle["at_paper_ratio"]
    assert at["ratio"] == 0.05 and at["mean"] > base and at["mean_difference"] > 0
    # 5 % of 300 = 15 images rejected, all of them failures: every patient's kept mean rises.
    assert at["mean"] == pytest.approx(ev.metric_across_patients(metric, groups, truth >= np.sort(truth)[15])["mean"])
    assert at["better_with_p_below_0.05"] and at["p"] < 0.05
    assert [c["mean"] for c in oracle["curve"]][:3] == sorted(c["mean"] for c in oracle["curve"][:3])
    assert abs(conf["at_paper_ratio"]["mean"] - base) < at["mean"] - base  # an uninformative score gains less
    no_truth = SimpleNamespace(groups=groups, amenability={}, images=holdout.images)
    assert set(summarise_baseline("classification", no_truth, {"metric": metric, "confidence": confidence}, 0, 20)["rejecting_by"]) == {
        "predictor_confidence"
    }


def test_the_ground_truth_reference_orders_its_ties_at_random_not_by_index():
    """Many images tied at the truth's lowest value: a perfect ranking's rejections are spread over them, not the last patients'."""
    from experiments.reproduce import rejecting_by_truth, tie_break_text, untied

    rng = np.random.default_rng(1)
    n = 400
    groups = np.repeat(np.arange(20), 20)  # patients in index order, as in a holdout split
    truth = rng.random(n)
    truth[rng.choice(n, 100, replace=False)] = 0.0  # a quarter tied at the lowest value
    ranks = untied(truth, np.random.default_rng(0))
    assert sorted(ranks) == list(range(n))
    distinct = truth > 0
    assert np.array_equal(np.argsort(truth[distinct]), np.argsort(ranks[distinct]))  # the same order where not tied
    assert ranks[~distinct].max() < ranks[distinct].min()  # ties stay below everything above them
    # An order by index rejects the 20 tied images of the last patients; a random order, of many patients.
    by_index = ~ev.kept_images(truth, 0.05)
    at_random = ~ev.kept_images(ranks, 0.05)
    assert by_index.sum() == at_random.sum() == 20 and np.all(truth[at_random] == 0)
    assert len(set(groups[at_random])) > 2 * len(set(groups[by_index]))
    # The predictor fails on half the tied images: most orders of the ties pass the test (0.84 of 50
    # with these seeds), not all, since some put the rejections on the images it gets right.
    metric = np.ones(n)
    metric[np.flatnonzero(~distinct)[::2]] = 0.0
    out = rejecting_by_truth(metric, truth, groups, 0.05, seed=0, draws=50)
    ties = out["tie_breaks"]
    assert ties["tied_at_lowest"] == 100 and ties["draws"] == 50
    assert ties["mean_difference_median"] > 0 and 0.5 < ties["better_with_p_below_0.05_fraction"] < 1
    # Failing on a tenth of them, the gain is small and few orders pass (0.04).
    rare = np.ones(n)
    rare[np.flatnonzero(~distinct)[::10]] = 0.0
    assert rejecting_by_truth(rare, truth, groups, 0.05, seed=0, draws=50)["tie_breaks"]["better_with_p_below_0.05_fraction"] < 0.2
    assert out["at_paper_ratio"]["mean"] > ev.metric_across_patients(metric, groups)["mean"]
    # The same seed gives the same order; no ties, nothing to say.
    again = rejecting_by_truth(metric, truth, groups, 0.05, seed=0, draws=50)
    assert again == out
    plain = rejecting_by_truth(metric, np.arange(n, dtype=float), groups, 0.05, seed=0, draws=5)
    summary = {"tie_breaks": {**plain["tie_breaks"], "p_median": {"mean": 0.5}, "better_with_p_below_0.05_fraction": {"mean": 0.0}}}
    assert plain["tie_breaks"]["tied_at_lowest"] == 1 and tie_break_text(summary) is None


def test_earlier_invocations_carry_over_and_a_bad_file_is_skipped_with_a_warning(tmp_path, caplog):
    from experiments.reproduce import earlier_invocations

    path = tmp_path / "results.json"
    assert earlier_invocations(path) == []  # no earlier run
    path.write_text(json.dumps({"wall_s": 600.5, "workers": 2}))  # written before the field existed
    assert earlier_invocations(path) == [{"wall_s": 600.5, "stages_run": None, "stages": None, "workers": 2}]
    recorded = [{"wall_s": 600.5, "stages_run": 16, "stages": 16, "workers": 2}, {"wall_s": 3.0, "stages_run": 0, "stages": 16, "workers": 2}]
    path.write_text(json.dumps({"wall_s": 3.0, "invocations": recorded}))
    assert earlier_invocations(path) == recorded
    path.write_text('{"wall_s": ')  # cut short
    with caplog.at_level(logging.WARNING, logger="experiments.reproduce"):
        assert earlier_invocations(path) == []
    assert "not readable" in caplog.text and path.read_text() == '{"wall_s": '  # left as it was
    path.write_text(json.dumps({"wall_s": -1.0}))  # not a wall time
    assert earlier_invocations(path) == []


def test_every_ratio_is_tested_and_summed_over_seeds():
    """``rejecting_by`` tests every ratio; ``by_ratio`` counts, ratio by ratio, the seeds better with p < 0.05."""
    from experiments.reproduce import by_ratio, rejecting_by

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 20)
    bad = rng.random(400) < 0.2  # a fifth of the images wrong, the rest right
    metric = (~bad).astype(float)
    perfect = rejecting_by(metric, metric + rng.random(400) * 0.5, groups, 0.05)  # rejects wrong images first
    useless = rejecting_by(metric, rng.random(400), groups, 0.05)
    assert [t["ratio"] for t in perfect["ttest"]] == list(ev.REJECTION_RATIOS)
    assert perfect["ttest"][0]["p"] is None  # no rejection: nothing differs
    assert all(t["mean_difference"] > 0 and t["p"] < 0.05 for t in perfect["ttest"][1:])
    rows = by_ratio([perfect["ttest"], perfect["ttest"], useless["ttest"]])
    assert [r["seeds"] for r in rows] == [3] * len(ev.REJECTION_RATIOS)
    assert rows[0]["seeds_better_with_p_below_0.05"] == 0
    useless_better = [t["p"] is not None and t["p"] < 0.05 and t["mean_difference"] > 0 for t in useless["ttest"]]
    assert [r["seeds_better_with_p_below_0.05"] for r in rows[1:]] == [2 + b for b in useless_better[1:]]
    for i, r in enumerate(rows):
        gains = [perfect["ttest"][i]["mean_difference"]] * 2 + [useless["ttest"][i]["mean_difference"]]
        assert r["mean_difference"]["mean"] == pytest.approx(np.mean(gains))


def test_the_tables_list_each_reference_then_each_controller_and_skip_what_is_missing():
    from experiments.reproduce import each_scorer

    task_result = {
        "baseline": {"summary": {"rejecting_by": {
            "predictor_confidence": {"x": 2},
            "ground_truth": {"x": 1},
            "unlisted": {"x": 9},
        }}},
        "runs": {"weighted": {"summary": {"y": 3}}, "selective": {"summary": {}}, "fixed": {"summary": {"y": 4}}},
    }
    references = (("ground_truth", "the truth (ties in random order)"), ("predictor_confidence", "its confidence"),
                  ("human", "the raters"))
    rows = each_scorer(task_result, lambda r: r.get("x"), lambda s: s.get("y"), references)
    # The references in the given order (not the file's), then the runs in theirs; empty values left out.
    assert rows == [("reference", "the truth (ties in random order)", 1), ("reference", "its confidence", 2),
                    ("controller", "controller, weighted", 3), ("controller", "controller, fixed", 4)]
    short = each_scorer(task_result, lambda r: r.get("x"), lambda s: s.get("y"), references, short=True)
    assert [label for _, label, _ in short][:2] == ["the truth", "its confidence"]
    assert each_scorer(task_result, lambda r: None, lambda s: None, references) == []


def test_the_untrained_controller_is_one_row_when_every_run_started_from_it():
    """Runs that started from the same controller (``iqa reproduce``'s rewards) share one row after the
    references; runs that started from different ones (the benchmark's algorithms) get one each."""
    from experiments.reproduce import UNTRAINED_TEXT, each_scorer

    def result(untrained):
        return {
            "baseline": {"summary": {"rejecting_by": {"ground_truth": {"x": 1}}}},
            "runs": {label: {"summary": {"y": i, "untrained": u}} for i, (label, u) in enumerate(untrained.items(), 5)},
        }

    references = (("ground_truth", "the truth"),)
    same = result({"fixed": {"x": 7}, "weighted": {"x": 7}})
    assert each_scorer(same, lambda r: r.get("x"), lambda s: s.get("y"), references) == [
        ("reference", "the truth", 1), ("untrained", UNTRAINED_TEXT, 7),
        ("controller", "controller, fixed", 5), ("controller", "controller, weighted", 6),
    ]
    assert each_scorer(same, lambda r: r.get("x"), lambda s: s.get("y"), references, short=True)[1] == (
        "untrained", "the untrained controller", 7
    )
    other = result({"reinforce": {"x": 7}, "ddpg": {"x": 8}, "ppo": None})  # ppo's evaluated before they were kept
    assert each_scorer(other, lambda r: r.get("x"), lambda s: s.get("y"), references) == [
        ("reference", "the truth", 1),
        ("untrained", "controller, reinforce, untrained", 7), ("controller", "controller, reinforce", 5),
        ("untrained", "controller, ddpg, untrained", 8), ("controller", "controller, ddpg", 6),
        ("controller", "controller, ppo", 7),
    ]


def test_what_a_score_rejects_is_described():
    """``rejected_describer``: the predictor's metric on the rejected images, their share at the truth's lowest
    value and each class's share, worked out by hand on eight images; summed over seeds by ``summarise_rejected``."""
    from types import SimpleNamespace

    from experiments.reproduce import rejected_describer, rejecting_by, summarise_rejected

    holdout = SimpleNamespace(
        amenability={"classification": np.array([0.0, 0.0, 0.5, 1.0, 0.0, 0.7, 0.9, 1.0])},
        labels=np.array([1, 1, 0, 0, 1, 0, 1, 0]),
        class_names=("absent", "present"),
    )
    metric = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    describe = rejected_describer("classification", holdout, metric)
    # Rejecting images 0, 1 and 2: truth 0, 0, 0.5; classes 1, 1, 0; metric 1, 0, 0.
    got = describe(np.array([True, True, True, False, False, False, False, False]))
    assert got["images"] == 3 and got["metric_rejected"] == pytest.approx(1 / 3) and got["metric_all"] == 0.75
    assert got["at_lowest_truth"] == pytest.approx(2 / 3)
    assert got["class_shares"] == pytest.approx({"absent": 1 / 3, "present": 2 / 3})
    assert got["holdout_class_shares"] == {"absent": 0.5, "present": 0.5}
    # Through rejecting_by: 25 % of 8 rejects the two lowest-scored images (5 and 3 here).
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.5, 0.4])
    via = rejecting_by(metric, scores, np.arange(8) // 2, 0.25, describe)["rejected"]
    assert via["images"] == 2 and via["metric_rejected"] == 1.0 and via["at_lowest_truth"] == 0.0
    assert via["class_shares"] == {"absent": 1.0, "present": 0.0}
    summary = summarise_rejected([got, via])
    assert summary["metric_rejected"]["mean"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["class_shares"]["present"]["values"] == pytest.approx([2 / 3, 0.0])
    assert summarise_rejected([got, None]) is None  # a seed without it: no summary
    # Without ground truth the share at its lowest value is undefined, not 0.
    no_truth = SimpleNamespace(amenability={}, labels=holdout.labels, class_names=())
    blind = rejected_describer("classification", no_truth, metric)(scores < 0.3)
    assert blind["at_lowest_truth"] is None and set(blind["class_shares"]) == {"0", "1"}
    unlabelled = rejected_describer("classification", SimpleNamespace(amenability={}), metric)(scores < 0.3)
    assert unlabelled["class_shares"] is None and unlabelled["holdout_class_shares"] is None


def test_paired_ttest_pairs_patients_and_drops_those_with_nothing_kept():
    metric = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    baseline = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    keep = np.array([True, True, False, True, True, True, False, False])
    out = ev.paired_ttest(metric, keep, baseline, groups)
    # Patient 3 has nothing kept: pairs are patients 0, 1, 2 (kept mean vs baseline mean over all images).
    expected = stats.ttest_rel([1.0, 1.0, 1.0], [0.5, 0.0, 0.5])
    assert out["patients"] == 3 and out["patients_dropped"] == 1
    assert out["p"] == pytest.approx(expected.pvalue) and out["t"] == pytest.approx(expected.statistic)
    assert out["mean_difference"] == pytest.approx(2 / 3)
    same = ev.paired_ttest(baseline, np.ones(8, bool), baseline, groups)
    assert same["p"] is None and same["mean_difference"] == 0.0
    # Two rejections compared: the baseline's side is its mean over the images it keeps, and a patient with
    # nothing kept on either side is dropped (patient 3 by keep, patient 0 by other).
    other = np.array([False, False, True, True, True, False, True, True])
    two = ev.paired_ttest(metric, keep, metric, groups, baseline_keep=other)
    expected = stats.ttest_rel([1.0, 1.0], [0.5, 1.0])  # patients 1 and 2: kept means 1, 1; other's 0.5, 1
    assert two["patients"] == 2 and two["patients_dropped"] == 2
    assert two["mean_difference"] == pytest.approx(0.25) and two["p"] == pytest.approx(expected.pvalue)
    with pytest.raises(ValueError):
        ev.paired_ttest(metric, keep, metric, groups, baseline_keep=other[:5])


def test_random_rejection_band():
    groups = np.arange(100) // 10
    flat = ev.random_rejection_band(np.full(100, 0.8), groups, draws=50)
    assert all(b["low"] == pytest.approx(0.8) and b["high"] == pytest.approx(0.8) for b in flat)
    metric = np.random.default_rng(1).random(100)
    band = ev.random_rejection_band(metric, groups, draws=200, seed=3)
    full = ev.metric_across_patients(metric, groups)["mean"]
    assert band[0]["low"] == pytest.approx(full) and band[0]["high"] == pytest.approx(full)
    assert all(b["low"] <= b["median"] <= b["high"] for b in band) and band[-1]["high"] > band[-1]["low"]
    assert band == ev.random_rejection_band(metric, groups, draws=200, seed=3)  # seeded


def test_cohen_kappa_and_contingency():
    assert ev.cohen_kappa([1, 1, 0, 0], [1, 1, 0, 0]) == pytest.approx(1.0)
    # observed 0.75, chance 0.5 * 0.25 + 0.5 * 0.75 = 0.5 -> kappa 0.5
    assert ev.cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    assert ev.cohen_kappa([1, 1], [1, 1]) is None
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.95])
    human = np.array([0, 1, 1, 1, 0, 1, 1, 1, 1, 1])
    table = ev.contingency(scores, human, 0.2)  # controller low: images 0 and 1
    assert table["table"] == [[1, 1], [1, 7]]
    assert table["kappa"] == pytest.approx(ev.cohen_kappa(scores <= 0.2, human == 0))
    assert table["agreement"] == pytest.approx(0.8)


def test_ranking_agreement_and_heuristics():
    amenability = np.array([0.1, 0.2, 0.4, 0.6, 0.8, 0.9])
    assert ev.ranking_agreement(amenability, amenability) == {"auroc": 1.0, "spearman": pytest.approx(1.0)}
    assert ev.ranking_agreement(-amenability, amenability) == {"auroc": 0.0, "spearman": pytest.approx(-1.0)}
    assert ev.ranking_agreement(np.ones(6), amenability) == {"auroc": 0.5, "spearman": None}
    assert ev.ranking_agreement(amenability, np.full(6, 0.9))["auroc"] is None
    images = np.zeros((2, 1, 2, 2), np.uint8)
    images[1] = [[[0, 10], [20, 30]]]
    h = ev.heuristic_scores(images, confidence=np.array([0.6, 0.9]))
    assert h["mean_intensity"].tolist() == [0.0, 15.0]
    assert h["intensity_std"][1] == pytest.approx(np.std([0, 10, 20, 30]))
    assert h["predictor_confidence"].tolist() == [0.6, 0.9]


def test_averaged_ranks_ranks_each_score_then_averages():
    assert ev.averaged_ranks(np.array([3.0, 1.0, 2.0]), np.array([10.0, 30.0, 20.0])).tolist() == [2 / 3] * 3
    # Ties share their ranks; the scale of a score does not matter, only its order.
    assert ev.averaged_ranks(np.array([0.5, 0.5, 0.9, 0.1])).tolist() == [0.625, 0.625, 1.0, 0.25]
    assert ev.averaged_ranks(np.array([1e6, 2e6])).tolist() == ev.averaged_ranks(np.array([0.1, 0.2])).tolist()
    with pytest.raises(ValueError, match="one length"):
        ev.averaged_ranks(np.zeros(3), np.zeros(4))


def test_with_confidence_tells_a_controller_that_knows_what_the_confidence_misses_from_a_copy_of_it():
    # Two independent causes make an image not amenable; the confidence sees one, the trained controller the
    # other, the untrained one neither.  Averaging ranks then beats each alone, and only for the trained one.
    rng = np.random.default_rng(0)
    n = 2000
    a, b = rng.random(n) < 0.2, rng.random(n) < 0.2
    amenability = np.where(a | b, 0.1, 0.9)
    confidence = 0.9 - 0.3 * a + 0.1 * rng.standard_normal(n)
    trained = 0.9 - 0.3 * b + 0.1 * rng.standard_normal(n)
    untrained = rng.standard_normal(n)
    out = ev.with_confidence(trained, confidence, amenability, initial_scores=untrained)
    assert set(out) == {"spearman", "auroc", "confidence_auroc", "untrained_auroc"}
    assert out["confidence_auroc"] == pytest.approx(ev.ranking_agreement(confidence, amenability)["auroc"])
    alone = ev.ranking_agreement(trained, amenability)["auroc"]
    assert out["auroc"] > max(alone, out["confidence_auroc"]) + 0.05
    assert out["untrained_auroc"] < out["confidence_auroc"]
    assert abs(out["spearman"]) < 0.1  # they rank unalike
    # A controller that copies the confidence ranks as it does, and adds nothing.
    copy = ev.with_confidence(2.0 * confidence + 1.0, confidence, amenability)
    assert copy["spearman"] == pytest.approx(1.0)
    assert copy["auroc"] == pytest.approx(copy["confidence_auroc"])
    assert copy["untrained_auroc"] is None  # no untrained scores given
    assert ev.with_confidence(np.ones(4), np.array([0.1, 0.2, 0.3, 0.4]), np.full(4, 0.9))["auroc"] is None
    with pytest.raises(ValueError, match="one length"):
        ev.with_confidence(np.zeros(3), np.zeros(4), np.zeros(3))


def test_mean_and_std_skips_undefined_values():
    out = ev.mean_and_std([0.2, None, 0.4, float("nan")])
    assert out["mean"] == pytest.approx(0.3) and out["n"] == 2 and out["values"] == [0.2, None, 0.4, None]
    assert ev.mean_and_std([0.5])["std"] is None and ev.mean_and_std([])["mean"] is None


def test_against_initial_counts_the_seeds_that_moved_and_sign_tests_them():
    # Seed 2 has no initial figure and is left out; seed 1 did not move.
    out = ev.against_initial([0.4, 0.5, None, 0.6, 0.7], [0.6, 0.5, 0.9, 0.8, 0.65])
    assert (out["pairs"], out["higher"], out["lower"], out["equal"]) == (4, 2, 1, 1)
    assert out["initial"]["mean"] == pytest.approx(0.55) and out["final"]["mean"] == pytest.approx(0.6375)
    assert out["gain"]["mean"] == pytest.approx((0.2 + 0.0 + 0.2 - 0.05) / 4)
    # Two up and one down of three that moved: P(X <= 1 or X >= 2 | 3, 1/2) = 1.
    assert out["sign_test_p"] == pytest.approx(1.0)
    # Six of six up: 2 / 2**6; five up and one down: 2 (6 + 1) / 2**6.
    assert ev.against_initial([0.5] * 6, [0.6] * 6)["sign_test_p"] == pytest.approx(2 / 64)
    assert ev.against_initial([0.5] * 6, [0.6] * 5 + [0.4])["sign_test_p"] == pytest.approx(14 / 64)
    nothing = ev.against_initial([0.5, None], [0.5, 0.7])
    assert nothing["pairs"] == 1 and nothing["equal"] == 1 and nothing["sign_test_p"] is None
    with pytest.raises(ValueError, match="one figure per seed each, got 2 and 1"):
        ev.against_initial([0.5, 0.6], [0.7])
    # One wording for every report: the count, then the sign test where a seed moved.
    assert ev.seeds_higher_text(out) == "2 of 4 (sign test p 1)"
    assert ev.seeds_higher_text(ev.against_initial([0.5] * 6, [0.6] * 6)) == "6 of 6 (sign test p 0.031)"
    assert ev.seeds_higher_text(nothing) == "0 of 1"
    assert ev.seeds_higher_text(None) == ev.seeds_higher_text(ev.against_initial([None], [0.5])) == "n/a"


# ------------------------------------------------------------------ pipeline
SUMMARY_KEYS = {
    "metric_at_paper_ratio", "patient_std_at_paper_ratio", "p_value", "seeds_better_with_p_below_0.05",
    "initial_auroc", "final_auroc", "spearman", "seeds_beating_heuristics", "wall_time_s", "curve", "kappa",
    "contingency_summed", "baseline_predictor_at_paper_ratio", "baseline_predictor_p_value",
    "baseline_predictor_seeds_better_with_p_below_0.05", "auroc_against_initial", "by_ratio", "margin_over_heuristics",
    "untrained", "baseline_predictor_against_untrained", "with_confidence",
}
RUN_KEYS = {
    "seed", "folder", "algo", "reward", "steps", "wall_time_s", "initial_auroc", "final_auroc", "auroc_curve",
    "initial_auroc_by_class", "final_auroc_by_class", "mean_score", "curve", "ttest", "at_paper_ratio", "baseline_predictor", "random_band", "contingency", "controller",
    "beats_heuristics", "margin_over_heuristics", "untrained_baseline_predictor", "with_confidence",
}
TASK_KEYS = {"metric", "paper_rejection_ratio", "holdout", "human_labels", "heuristics", "baseline", "runs", "figures"}


def check_task_result(t, labels, seeds):
    assert TASK_KEYS <= set(t)
    assert set(t["heuristics"]) == {"mean_intensity", "intensity_std", "predictor_confidence"}
    for h in t["heuristics"].values():
        assert {"auroc", "auroc_either_sign", "spearman"} <= set(h)
    assert set(t["human_labels"]) == {"auroc", "spearman"}
    baseline = t["baseline"]
    assert [b["seed"] for b in baseline["runs"]] == seeds
    assert {"metric", "random_band", "rejecting_by", "heuristics", "predictor_updates", "folder"} <= set(baseline["runs"][0])
    assert {"metric", "patient_std", "random_band", "rejecting_by"} <= set(baseline["summary"])
    references = {"predictor_confidence", "ground_truth"}  # the synthetic holdout knows its truth
    for b in baseline["runs"]:
        assert set(b["rejecting_by"]) == references
        for r in b["rejecting_by"].values():
            assert len(r["curve"]) == len(ev.REJECTION_RATIOS)
            assert {"ratio", "mean", "std", "p", "t", "mean_difference", "better_with_p_below_0.05"} <= set(r["at_paper_ratio"])
        ties = b["rejecting_by"]["ground_truth"]["tie_breaks"]
        assert {"draws", "tied_at_lowest", "mean_difference_median", "p_median", "better_with_p_below_0.05_fraction"} <= set(ties)
    assert set(baseline["summary"]["rejecting_by"]) == references
    assert {"p_median", "better_with_p_below_0.05_fraction", "tied_at_lowest", "draws"} <= set(
        baseline["summary"]["rejecting_by"]["ground_truth"]["tie_breaks"]
    )
    for r in baseline["summary"]["rejecting_by"].values():
        assert r["at_paper_ratio"]["n"] == len(seeds) and "median" in r["p_value"]
        check_by_ratio(r["by_ratio"], seeds)
        check_rejected(r["rejected"], seeds)
        assert len(r["curve"]) == len(ev.REJECTION_RATIOS) and "seeds_better_with_p_below_0.05" in r
    assert list(t["runs"]) == labels
    for entry in t["runs"].values():
        assert SUMMARY_KEYS <= set(entry["summary"])
        assert [r["seed"] for r in entry["runs"]] == seeds  # every seed reported
        moved = entry["summary"]["auroc_against_initial"]
        assert {"pairs", "higher", "lower", "equal", "gain", "sign_test_p"} == set(moved)
        assert moved["higher"] == sum(
            r["controller"]["auroc"] > r["initial_auroc"] for r in entry["runs"]
            if r["initial_auroc"] is not None and (r["controller"] or {}).get("auroc") is not None
        )
        assert set(entry["summary"]["by_ratio"]) == {"co_trained", "baseline_predictor", "against_untrained"}
        against = entry["summary"]["baseline_predictor_against_untrained"]
        assert against["mean_difference"]["n"] == len(seeds) and "median" in against["p_value"]
        assert 0 <= against["seeds_better_with_p_below_0.05"] + against["seeds_worse_with_p_below_0.05"] <= len(seeds)
        for rows in entry["summary"]["by_ratio"].values():
            check_by_ratio(rows, seeds)
        check_rejected(entry["summary"]["baseline_predictor_rejected"], seeds)
        # The baseline predictor rejecting by the controller each run started from: a reference's summary.
        untrained = entry["summary"]["untrained"]
        assert untrained["at_paper_ratio"]["n"] == len(seeds) and "median" in untrained["p_value"]
        check_by_ratio(untrained["by_ratio"], seeds)
        check_rejected(untrained["rejected"], seeds)
        for run in entry["runs"]:
            assert RUN_KEYS <= set(run)
            assert [t["ratio"] for t in run["untrained_baseline_predictor"]["ttest"]] == list(ev.REJECTION_RATIOS)
            against = run["baseline_predictor"]["against_untrained"]
            assert [t["ratio"] for t in against["ttest"]] == list(ev.REJECTION_RATIOS)
            # Its gain is the difference of the two gains over no rejection, patient by patient.
            gains = [run[k]["at_paper_ratio"]["mean_difference"] for k in ("baseline_predictor", "untrained_baseline_predictor")]
            at = against["at_paper_ratio"]
            if next(t for t in against["ttest"] if t["ratio"] == at["ratio"])["patients_dropped"] == 0:  # same patients
                assert at["mean_difference"] == pytest.approx(gains[0] - gains[1])
            assert [t["ratio"] for t in run["baseline_predictor"]["ttest"]] == list(ev.REJECTION_RATIOS)
            assert len(run["curve"]) == len(ev.REJECTION_RATIOS) == len(run["ttest"]) == len(run["random_band"])
            assert {"ratio", "mean", "std", "p", "t", "mean_difference"} <= set(run["at_paper_ratio"])
            assert {"ratio", "mean", "std", "p", "t", "mean_difference"} <= set(run["baseline_predictor"]["at_paper_ratio"])
            assert len(run["baseline_predictor"]["curve"]) == len(ev.REJECTION_RATIOS)
            assert {"table", "kappa", "ratio"} <= set(run["contingency"])
            assert set(run["controller"]) == {"auroc", "spearman"}
            assert 0.0 <= run["initial_auroc"] <= 1.0 and 0.0 <= run["final_auroc"] <= 1.0
            # How far ahead of the same seed's best heuristic (either sign) the controller ends.
            best = max(h["auroc_either_sign"] for h in next(b for b in baseline["runs"] if b["seed"] == run["seed"])["heuristics"].values())
            assert run["margin_over_heuristics"] == pytest.approx(run["controller"]["auroc"] - best)
            assert run["beats_heuristics"] == (run["margin_over_heuristics"] > 0)
            # Within each class of the synthetic set, as the stage's summary.json has them.
            assert set(run["initial_auroc_by_class"]) == set(run["final_auroc_by_class"]) == {
                "organ absent", "organ present"
            }
        margins = [r["margin_over_heuristics"] for r in entry["runs"]]
        assert entry["summary"]["margin_over_heuristics"]["mean"] == pytest.approx(np.mean(margins))
        # The controller beside the same seed's baseline predictor's confidence, seed by seed and across seeds.
        with_confidence = entry["summary"]["with_confidence"]
        assert set(with_confidence) == {"spearman", "auroc", "confidence_auroc", "untrained_auroc", "against_confidence"}
        for key in ("auroc", "confidence_auroc", "untrained_auroc"):
            assert with_confidence[key]["values"] == [r["with_confidence"][key] for r in entry["runs"]]
        confidence = [next(b for b in baseline["runs"] if b["seed"] == r["seed"])["heuristics"]["predictor_confidence"]["auroc"]
                      for r in entry["runs"]]
        assert with_confidence["confidence_auroc"]["values"] == pytest.approx(confidence)
        assert with_confidence["against_confidence"]["higher"] == sum(
            r["with_confidence"]["auroc"] > r["with_confidence"]["confidence_auroc"] for r in entry["runs"]
        )


def check_rejected(summary, seeds):
    """``summarise_rejected``: what a score rejects at the paper's ratio, every seed counted."""
    assert {"images", "metric_rejected", "metric_all", "at_lowest_truth", "class_shares", "holdout_class_shares"} == set(summary)
    assert summary["images"]["n"] == len(seeds) and summary["images"]["mean"] >= 1
    assert set(summary["class_shares"]) == set(summary["holdout_class_shares"]) == {"organ absent", "organ present"}
    assert sum(c["mean"] for c in summary["class_shares"].values()) == pytest.approx(1.0)
    assert 0.0 <= summary["at_lowest_truth"]["mean"] <= 1.0


def check_by_ratio(rows, seeds):
    assert [r["ratio"] for r in rows] == list(ev.REJECTION_RATIOS)
    for r in rows:
        assert {"mean_difference", "p_median", "seeds_better_with_p_below_0.05", "seeds"} <= set(r)
        assert r["seeds"] == len(seeds) and 0 <= r["seeds_better_with_p_below_0.05"] <= len(seeds)


def results_of(out):
    return json.loads((out / "results.json").read_text())


def markers(out):
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("stage.done")}


def test_reproduce_end_to_end_then_resume(tiny_synthetic_path, tmp_path, caplog, capsys, monkeypatch):
    out = tmp_path / "rep"
    # A short predictor warm-up (REINFORCE's recommended 2,000 updates of the U-Net were most of this test's time).
    argv = ["reproduce", "--quick", "--task", "both", "--seeds", "1", "--steps", "16", "--workers", "1",
            "--device", "cpu", "--dataset", str(tiny_synthetic_path), "--env-kwargs", '{"predictor_warmup_steps": 30}',
            "--out", str(out)]
    caplog.set_level(logging.INFO, logger="iqa_env.env")
    assert main(argv) == 0
    # A task's baseline warms its predictor up as the weighted and selective runs do: they load what it kept.
    # The fixed reward's warm-up is another one (its own length, its clean validation images).
    assert len(list((out / "warmup").iterdir())) == 4
    assert sum("predictor warm-up of 30 updates loaded from" in r.getMessage() for r in caplog.records) == 4
    captured = capsys.readouterr()
    printed = captured.out
    assert "baseline" in printed
    # Each stage says how far it is as it runs (here the baselines' last update; the controller runs'
    # 16 steps are short of the quick budget's evaluation interval).
    for task in ("classification", "segmentation"):
        assert re.search(rf"^  {task}-baseline-seed0: predictor update 16 of 16 \(\d+ s\)$", captured.err, re.M)
    # The controllers' AUROC against the truth, each against its untrained start, beside the heuristics.
    assert "controller AUROC against the ground truth, at initialisation -> at the end" in printed
    assert re.search(r"^    fixed +\S+ -> \S+; seeds higher than at initialisation: (n/a|[01] of 1.*); "
                     r"beating every heuristic: [01] of 1 \(AUROC minus the best heuristic's, same seed: [+-]\d\.\d{3}\)$",
                     printed, re.M), printed
    assert re.search(r"^    heuristics: mean_intensity \S+, intensity_std \S+, predictor_confidence \S+$", printed, re.M)
    # Every ratio's count of seeds better with p < 0.05, for the references and each controller.
    assert "seeds better than no rejection with p < 0.05 at 5% 10% 15% 20% 25% 30%:" in printed
    for name in ("the ground truth", "its own confidence", "the untrained controller", "controller, fixed", "controller, selective"):
        assert re.search(rf"^    {name} +([01] +){{5}}[01]  of 1$", printed, re.M), (name, printed)
    assert re.search(r"^  baseline predictor rejecting by the untrained controller \(each seed's, before any training\): \S+",
                     printed, re.M), printed
    assert re.search(r"^  baseline predictor on the images each controller keeps at 5%, against on those its untrained start "
                     r"keeps: fixed \S+ \(median p \S+; better with p < 0.05 on [01] of 1, worse on [01]\); weighted ",
                     printed, re.M), printed
    # The baseline predictor's metric on what each rejects, beside its metric on every image.
    assert re.search(r"^  baseline predictor's accuracy on the images each rejects at 5% \(on all: \S+\): "
                     r"the ground truth \S+; its own confidence \S+; the untrained controller \S+; controller, fixed \S+; "
                     r".*controller, selective \S+$",
                     printed, re.M), printed
    assert re.search(r"^  baseline predictor's Dice on the images each rejects at 15% \(on all: \S+\): ", printed, re.M)

    names = ["results.json", "report.md", "settings.json"] + [
        f"{kind}_{task}.png" for kind in ("figure3", "figure4", "auroc") for task in ("classification", "segmentation")
    ]
    for name in names:
        assert (out / name).is_file(), name
    from experiments.training import load_splits, scores_auroc

    holdout = load_splits(str(tiny_synthetic_path))[1][2]
    for task in ("classification", "segmentation"):
        stage = out / task / "baseline" / "seed0"
        assert all((stage / f).is_file() for f in ("predictor.pt", "evaluation.npz", "stage.done"))
        for reward in ("fixed", "weighted", "selective"):
            stage = out / task / reward / "seed0"
            for f in ("config.json", "summary.json", "predictor.pt", "controller/controller.json",
                      "controller/controller.pt", "evaluation.npz", "stage.done"):
                assert (stage / f).is_file(), f"{stage}/{f}"
            assert any((stage / "tensorboard").iterdir())
            # The untrained controller's scores, built again: the ranking the run recorded at its start.
            summary = json.loads((stage / "summary.json").read_text())
            with np.load(stage / "evaluation.npz") as arrays:
                assert arrays["initial_scores"].shape == arrays["scores"].shape
                initial = scores_auroc(arrays["initial_scores"], holdout, task)
            assert initial == pytest.approx(summary["initial_auroc"], abs=1e-9)

    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "iqa-reproduce/1" and results["command"].startswith("iqa reproduce --dataset")
    assert results["wall_s"] > 0 and results["workers"] == 1
    settings = results["settings"]
    assert settings["seeds"] == [0] and settings["tasks"] == ["classification", "segmentation"]
    assert settings["config"]["steps"] == 16 and settings["config"]["algo"] == "reinforce"
    assert {"dataset_fingerprint", "rejection_ratios", "random_draws", "versions", "quick"} <= set(settings)
    # Every controller scores an image with its mirror image unless told --no-mirror-average.
    assert settings["config"]["mirror_average"] is True
    for stage in out.glob("*/*/seed0/controller"):
        assert json.loads((stage / "controller.json").read_text())["mirror_average"] is True, stage
    for task, t in results["tasks"].items():
        check_task_result(t, ["fixed", "weighted", "selective"], [0])
        assert [r["method"] for r in t["table1"]] == ["baseline", "fixed", "weighted", "selective"]
        assert {"metric_mean", "metric_std_across_seeds", "metric_std_across_patients", "p_value_median",
                "paper"} <= set(t["table1"][1])
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "figure4_classification.png" in report and results["command"] in report
    assert "| rejecting by (predictor) | 0% | 5% | 10% | 15% | 20% | 25% | 30% |" in report
    assert re.search(r"^\| controller, weighted \(co-trained\) \| [+-]\d\.\d{3} \([01] of 1\) \|", report, re.M)
    assert re.search(r"^\| the untrained controller \(each seed's, before any training\) \(baseline\) \| — \| [+-]\d\.\d{3} \([01] of 1\) \|",
                     report, re.M), report
    assert re.search(r"^\| controller, weighted \(baseline, against its untrained start\) \| — \| [+-]\d\.\d{3} \([01] of 1\) \|",
                     report, re.M), report
    # Every seed: the baseline predictor's gain on what the trained controller keeps, beside its untrained one's.
    assert "| baseline predictor at 5% on what the controller keeps: gain (p) | the same, its untrained controller |" in report
    assert re.search(r"^\| weighted \| 0 \| [^|]+ \| [^|]+ \| [+-]\d\.\d{3} \((\d\.\d{3}|n/a)\) \| [+-]\d\.\d{3} \((\d\.\d{3}|n/a)\) \|",
                     report, re.M), report
    # The tiny set's holdout has a handful of patients: said at the start, and in the report.
    patients = results["tasks"]["classification"]["holdout"]["patients"]
    assert patients < 10
    assert f"the holdout has {patients} patient(s)" in caplog.text
    assert f"{patients} patients (too few for the paired t-tests" in report

    # The same command again: every stage is skipped, the summaries are rewritten.
    before = markers(out)
    assert len(before) == 8
    caplog.set_level(logging.INFO, logger="experiments.reproduce")
    assert main(argv) == 0
    assert markers(out) == before
    assert sum("already done, skipped" in r.getMessage() for r in caplog.records) == 8
    # That rerun ran no stage: the results keep the first invocation's wall time beside its own.
    rerun = json.loads((out / "results.json").read_text())
    first = results["invocations"]
    assert len(first) == 1 and first[0]["stages_run"] == first[0]["stages"] == 8
    assert rerun["invocations"][0] == first[0]
    assert rerun["invocations"][1]["stages_run"] == 0 and rerun["invocations"][1]["wall_s"] == rerun["wall_s"]
    assert rerun["wall_s_total"] == pytest.approx(first[0]["wall_s"] + rerun["wall_s"])

    # An interrupted stage (no stage.done) is run again, and only that one.
    (out / "classification" / "weighted" / "seed0" / "stage.done").unlink()
    assert main(argv) == 0
    after = markers(out)
    assert {k for k in after if after[k] != before.get(k)} == {"classification/weighted/seed0/stage.done"}

    # Other settings in the same folder: a one-line error.
    capsys.readouterr()
    assert main([*argv[:-2], "--steps", "17", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "steps" in err and len(err.splitlines()) == 1
    # --env-kwargs / --agent-kwargs reach every stage's settings: these are other settings too.
    assert main([*argv, "--agent-kwargs", '{"learning_rate": 0.002}', "--env-kwargs", '{"validation_size": 8}']) == 2
    err = capsys.readouterr().err.strip()
    assert "agent_kwargs" in err and "env_kwargs" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main([*argv, "--agent-kwargs", "[1]"])
    assert "argument --agent-kwargs: must be a JSON object" in capsys.readouterr().err

    # Stages finished under other default env settings (an older checkout): refused, not reused.
    import agents

    recommended = agents.recommended_env_kwargs
    monkeypatch.setattr(agents, "recommended_env_kwargs", lambda *args: {**recommended(*args), "predictor_lr": 0.0123})
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "finished with other settings" in err and "env_settings.predictor_lr" in err
    assert len(err.splitlines()) == 1
    # ... and under other default algorithm settings.
    from agents import factory

    monkeypatch.setattr(agents, "recommended_env_kwargs", recommended)
    changed = {**factory.VALIDATION_REWARD_DEFAULTS["reinforce"], "class_balance": 0.5}
    monkeypatch.setitem(factory.VALIDATION_REWARD_DEFAULTS, "reinforce", changed)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "finished with other settings" in err and "agent_settings.class_balance" in err
    # ... and under any other algorithm default: the table of default_kwargs, not only the rewards' part.
    monkeypatch.undo()
    default_kwargs = factory.default_kwargs
    monkeypatch.setattr(factory, "default_kwargs", lambda *a, **k: {**default_kwargs(*a, **k), "learning_rate": 0.002})
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "finished with other settings" in err and "agent_settings.learning_rate" in err
    monkeypatch.undo()
    assert main(argv) == 0  # the checkout's own defaults: every stage is reused again
    assert markers(out) == after
    # A stage recorded by a checkout before an algorithm setting existed: reused while the setting is at its
    # class default (the behaviour of before), refused when the defaults now give it another value.
    done = out / "classification/fixed/seed0/stage.done"  # the first trained stage checked
    record = json.loads(done.read_text())
    del record["identity"]["agent_settings"]["return_scale_prior"]
    del record["identity"]["agent_settings"]["policy_kwargs"]["centre_logits"]
    done.write_text(json.dumps(record))
    unchanged = markers(out)
    assert main(argv) == 0 and capsys.readouterr()
    assert markers(out) == unchanged  # reused, not run again
    monkeypatch.setattr(factory, "default_kwargs", lambda *a, **k: {**default_kwargs(*a, **k), "return_scale_prior": None})
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "finished with other settings (agent_settings.return_scale_prior: '<unset>' there, None now)" in err
    monkeypatch.undo()

    # A checkout that builds the untrained controller otherwise than the run did: said, and its scores left out.
    from experiments.reproduce import evaluate_stage
    from experiments.training import TrainConfig, load_splits

    stage = out / "classification" / "weighted" / "seed0"
    config = TrainConfig(**json.loads((stage / "config.json").read_text()))
    recorded = json.loads((stage / "summary.json").read_text())["initial_auroc"]
    splits = load_splits(config.dataset, config.split_seed)[1]
    caplog.clear()
    arrays = evaluate_stage(config, stage, splits, controller=True, initial_auroc=recorded - 0.25)
    assert "initial_scores" not in arrays and "scores" in arrays
    assert "the untrained controller built again ranks the holdout at AUROC" in caplog.text
    # A report collected from it says which stage lacks the row and how to evaluate it again.
    caplog.clear()
    assert main(argv) == 0
    assert "classification/weighted/seed0: evaluated without the untrained controller's scores" in caplog.text
    assert results_of(out)["tasks"]["classification"]["runs"]["weighted"]["summary"]["untrained"] is None
    assert results_of(out)["tasks"]["classification"]["runs"]["fixed"]["summary"]["untrained"] is not None
    assert "initial_scores" in evaluate_stage(config, stage, splits, controller=True, initial_auroc=recorded)


def test_worker_processes_take_one_seeds_stages_far_apart(tmp_path):
    """Train runs first, then the baselines; each round takes one stage of every (task, seed), so that the
    stages of a seed that share a warm-up do not start together (the first keeps it, the others load it)."""
    from experiments.reproduce import plan_stages, spread_out
    from experiments.training import TrainConfig

    runs = [{"label": r, "reward": r} for r in ("fixed", "weighted", "selective")]
    stages = plan_stages(tmp_path, TrainConfig(), ["classification", "segmentation"], [0, 1], runs, 100)
    order = [s.name.replace("classification", "c").replace("segmentation", "s") for s in spread_out(stages)]
    assert order == [
        *(f"{t}/fixed/seed{n}" for t in "cs" for n in (0, 1)),
        *(f"{t}/weighted/seed{n}" for t in "cs" for n in (0, 1)),
        *(f"{t}/selective/seed{n}" for t in "cs" for n in (0, 1)),
        *(f"{t}/baseline/seed{n}" for t in "cs" for n in (0, 1)),
    ]
    assert sorted(map(id, spread_out(stages))) == sorted(map(id, stages))


@pytest.mark.parametrize("algo, reward", [("ddpg", "weighted"), ("ddpg", "fixed"), ("ppo", "selective"), ("reinforce", "weighted")])
def test_a_stages_recorded_algorithm_settings_are_those_its_agent_gets(tiny_synthetic, algo, reward, tmp_path):
    """The settings a stage records without building an env are what make_agent gives the real env's agent."""
    from agents import make_agent
    from experiments.reproduce import plan_stages
    from experiments.training import TrainConfig, make_env
    from iqa_env.data import split_by_group

    train, validation, _ = split_by_group(tiny_synthetic, seed=0)
    base = TrainConfig(algo=algo, reward=reward, batch_size=8, validation_size=None, device="cpu")
    [_, stage] = plan_stages(tmp_path, base, ["classification"], [0], [{"label": reward}], len(validation))
    recorded = stage.identity()["agent_settings"]
    env = make_env(stage.config, train, validation)
    agent = make_agent(algo, env, seed=0)
    assert recorded["learning_rate"] == agent.learning_rate
    if algo == "ddpg":
        assert recorded["learning_starts"] == agent.learning_starts == 2 * env.episode_length
        assert recorded["gamma"] == agent.gamma and recorded["gradient_steps"] == agent.gradient_steps
    elif algo == "ppo":
        assert recorded["n_steps"] == agent.n_steps == max(env.episode_length, 16)
    else:
        assert recorded["controller_average"] == agent.controller_average
        assert recorded["class_balance"] == agent.class_balance
        assert recorded["policy_kwargs"]["initial_selection_probability"] == 0.3


def test_reproduce_killed_mid_run_resumes_from_the_last_finished_stage(tiny_synthetic_path, tmp_path):
    """SIGKILL `iqa reproduce` once a stage has finished; the rerun keeps that stage and completes the rest."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, run_iqa_and_kill

    out = tmp_path / "rep"
    argv = ["reproduce", "--task", "classification", "--seeds", "1", "--steps", "16", "--workers", "1",
            "--device", "cpu", "--dataset", str(tiny_synthetic_path), "--out", str(out)]
    run_iqa_and_kill(argv, lambda: out.exists() and bool(markers(out)), tmp_path / "killed.log")
    before = markers(out)
    assert 1 <= len(before) < 4 and not (out / "results.json").exists()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "experiments.cli", *argv], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    after = markers(out)
    assert len(after) == 4
    assert all(after[k] == v for k, v in before.items()), "a finished stage was run again"
    assert sum("already done, skipped" in line for line in done.stderr.splitlines()) == len(before)
    results = json.loads((out / "results.json").read_text())
    check_task_result(results["tasks"]["classification"], ["fixed", "weighted", "selective"], [0])


def test_benchmark_algorithms_smoke(tiny_synthetic_path, tmp_path, capsys):
    from experiments.benchmark_algorithms import main as bench_main

    out = tmp_path / "bench"
    argv = ["--algos", "reinforce", "a2c", "--seeds", "1", "--steps", "16", "--workers", "1",
            "--device", "cpu", "--dataset", str(tiny_synthetic_path), "--out", str(out)]
    # --agent-kwargs goes to every algorithm: a name one of them does not take is refused before any file.
    assert bench_main([*argv, "--agent-kwargs", '{"n_steps": 4, "class_balance": 1.0}']) == 2
    assert "cannot build a2c with agent_kwargs" in capsys.readouterr().err and not out.exists()
    code = bench_main([*argv, "--agent-kwargs", '{"learning_rate": 0.0005}', "--env-kwargs", '{"validation_size": 24}'])
    assert code == 0
    assert "reinforce" in capsys.readouterr().out
    for name in ("results.json", "report.md", "learning_curves_classification.png", "rejection_classification.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "iqa-benchmark-algorithms/1"
    config = results["settings"]["config"]
    assert config["agent_kwargs"] == {"learning_rate": 0.0005} and config["env_kwargs"]["validation_size"] == 24
    assert """--agent-kwargs '{"learning_rate": 0.0005}'""" in results["command"]
    t = results["tasks"]["classification"]
    check_task_result(t, ["reinforce", "a2c"], [0])
    assert [r["algorithm"] for r in t["table"]] == ["reinforce", "a2c"]
    assert {"metric_mean", "p_value_median", "initial_auroc", "final_auroc", "wall_time_s", "env_steps_per_s",
            "seeds_higher_than_initial"} <= set(t["table"][0])
    for row in t["table"]:
        moved = t["runs"][row["algorithm"]]["summary"]["auroc_against_initial"]
        expected = "n/a" if moved["pairs"] == 0 else f"{moved['higher']} of 1"
        assert row["seeds_higher_than_initial"].startswith(expected), (row, moved)
    assert "| reinforce |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "--dataset", "missing.h5", "--out", "x"], "does not exist"),
        (["benchmark-algorithms", "--dataset", "missing.h5", "--out", "x"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_masks_fail_before_any_training(tmp_path, capsys):
    from iqa_env.data import save_dataset
    from tests.conftest import random_dataset

    path = tmp_path / "nomasks.h5"
    save_dataset(random_dataset(masks=False), path)
    out = tmp_path / "rep"
    assert main(["reproduce", "--task", "both", "--dataset", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "masks" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_budgets_live_in_one_place():
    from experiments.reproduce import FULL, QUICK, budget_config
    from experiments.training import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    assert set(QUICK) - {"seeds"} <= fields and set(FULL) - {"seeds"} <= fields
    config, seeds = budget_config(quick=True, steps=7, algo="ddpg")
    assert (config.steps, config.algo, seeds) == (7, "ddpg", QUICK["seeds"])
    with pytest.raises(TypeError):
        budget_config(overrides={"no_such_field": 1})


def test_a_folder_records_the_validation_size_that_auto_stands_for():
    """``validation_size="auto"`` is recorded as its number where every stage has the same one (REINFORCE's
    256 across the weighted and selective rewards, what folders made before "auto" recorded), as "auto" where
    the stages differ (DDPG's and REINFORCE's fixed reward have 32), and each train stage records its own
    number."""
    from pathlib import Path

    from experiments.reproduce import _identity, make_stage
    from experiments.training import TrainConfig

    stages = ("task", "reward", "seed")
    assert _identity(TrainConfig(), stages)["validation_size"] == "auto"
    assert _identity(TrainConfig(), ("task", "seed"))["validation_size"] == 256  # the weighted reward's
    assert _identity(TrainConfig(algo="ddpg"), stages)["validation_size"] == "auto"
    assert _identity(TrainConfig(reward="fixed"), ("task", "algo", "seed"))["validation_size"] == "auto"
    assert _identity(TrainConfig(reward="weighted"), ("task", "algo", "seed"))["validation_size"] == 256
    stage = make_stage(Path("out"), "train", TrainConfig(algo="ddpg", reward="fixed"), "fixed", 600)
    identity = stage.identity()
    assert identity["validation_size"] == 32 and identity["env_settings"]["reward_baseline"] == "paired"
    assert identity["agent_settings"]["store_selections"] is True and identity["agent_settings"]["gamma"] == 0.0
    # batch_size="auto" the same way: REINFORCE's 16 for every reward, DDPG's 32, "auto" across algorithms.
    assert _identity(TrainConfig(), stages)["batch_size"] == 16
    assert _identity(TrainConfig(reward="fixed"), ("task", "reward", "seed"))["batch_size"] == 16
    assert _identity(TrainConfig(algo="ddpg"), stages)["batch_size"] == 32
    assert _identity(TrainConfig(), ("task", "algo", "seed"))["batch_size"] == "auto"
    assert make_stage(Path("out"), "train", TrainConfig(), "weighted", 600).identity()["batch_size"] == 16


def test_a_stage_counts_the_validation_steps_of_its_validation_batch_size():
    """A stage's agent settings follow its env's episode: with ``validation_batch_size`` 16 of a batch of 32,
    256 validation images make 16 validation steps, not 8 (DDPG waits two episodes before learning)."""
    from pathlib import Path

    from experiments.reproduce import make_stage
    from experiments.training import TrainConfig

    def learning_starts(**env_kwargs) -> int:
        config = TrainConfig(algo="ddpg", batch_size=32, env_kwargs=env_kwargs)
        return make_stage(Path("out"), "train", config, "weighted", 600).identity()["agent_settings"]["learning_starts"]

    assert learning_starts() == 2 * (8 + 8)
    assert learning_starts(validation_batch_size=16) == 2 * (8 + 16)


def test_reproduce_trains_the_rewards_asked_for_and_adds_more_on_resume(tiny_synthetic_path, tmp_path, capsys):
    """``--rewards`` trains those rewards only, in Table 1's order; rerun with more into the same folder,
    it runs only the new rewards' stages and reports every reward."""
    out = tmp_path / "rep"
    argv = ["reproduce", "--task", "classification", "--seeds", "1", "--steps", "8", "--workers", "1",
            "--device", "cpu", "--dataset", str(tiny_synthetic_path), "--out", str(out)]
    assert main([*argv, "--rewards", "selective", "weighted"]) == 0
    first = json.loads((out / "results.json").read_text())
    t = first["tasks"]["classification"]
    check_task_result(t, ["weighted", "selective"], [0])
    assert [row["method"] for row in t["table1"]] == ["baseline", "weighted", "selective"]
    assert "--rewards weighted selective" in first["command"]
    assert not (out / "classification" / "fixed").exists()
    done = markers(out)
    assert len(done) == 3  # the baseline and two rewards

    capsys.readouterr()
    assert main(argv) == 0  # all three rewards: only the fixed reward's stage is new
    after = markers(out)
    assert set(after) - set(done) == {"classification/fixed/seed0/stage.done"}
    assert all(after[k] == v for k, v in done.items()), "a finished stage was run again"
    second = json.loads((out / "results.json").read_text())
    check_task_result(second["tasks"]["classification"], ["fixed", "weighted", "selective"], [0])
    assert "--rewards" not in second["command"]
    assert second["invocations"][-1]["stages_run"] == 1
    assert "    fixed " in capsys.readouterr().out


def test_settings_refused_when_the_agent_is_built_fail_before_the_folder_is_written(tiny_synthetic_path, tmp_path, capsys):
    """A setting that only the algorithm's constructor refuses fails before any stage or file (before,
    it failed in the first trained stage after the baselines, and the folder's settings.json then turned the
    corrected command away as "a run with other settings")."""
    out = tmp_path / "rep"
    argv = ["reproduce", "--task", "classification", "--seeds", "1", "--steps", "8", "--workers", "1",
            "--device", "cpu", "--rewards", "weighted", "--dataset", str(tiny_synthetic_path), "--out", str(out)]
    # A value and a name the settings' checks know, and a value only REINFORCE's constructor refuses.
    assert main([*argv, "--agent-kwargs", '{"policy_kwargs": {"centre_logits": "no"}}']) == 2
    assert capsys.readouterr().err.strip().endswith("agent_kwargs: centre_logits must be True or False, got 'no'")
    assert main([*argv, "--agent-kwargs", '{"policy_kwargs": {"nope": 1}}']) == 2
    assert "error: agent_kwargs: policy_kwargs takes no setting 'nope'" in capsys.readouterr().err
    assert main([*argv, "--agent-kwargs", '{"image_baseline": "nope"}']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot build reinforce with agent_kwargs" in err
    assert "image_baseline must be one of" in err
    assert not out.exists()
    assert main(argv) == 0
    check_task_result(json.loads((out / "results.json").read_text())["tasks"]["classification"], ["weighted"], [0])
    # Into the finished folder: refused the same way, and the run is left as it was.
    done = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*argv, "--agent-kwargs", '{"image_baseline": "nope"}']) == 2
    assert "image_baseline must be one of" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == done


def test_benchmark_agent_kwargs_are_checked_against_each_algorithm_of_the_benchmark(tiny_synthetic_path, tmp_path):
    """A setting of the benchmark's own algorithms (TD3's policy delay) is not refused as a setting of
    TrainConfig's default algorithm; one that an algorithm of the benchmark does not take is refused, naming it."""
    from experiments.benchmark_algorithms import benchmark_algorithms

    out = tmp_path / "bench"
    with pytest.raises(ValueError) as refused:
        benchmark_algorithms(
            out, algos=["td3", "ddpg"], dataset=tiny_synthetic_path, seeds=1, steps=8, device="cpu",
            overrides={"agent_kwargs": {"policy_delay": 3}},
        )
    message = str(refused.value)
    assert "cannot build ddpg with agent_kwargs" in message and "ddpg takes no setting 'policy_delay'" in message
    assert "reinforce" not in message and not out.exists()


@pytest.mark.parametrize(
    "rewards, message",
    [(("weighted", "random"), "rewards must be among ('fixed', 'weighted', 'selective'), got 'random'"),
     ((), "give at least one reward")],
)
def test_reproduce_names_a_reward_it_does_not_know(tmp_path, rewards, message):
    from experiments.reproduce import reproduce

    with pytest.raises(ValueError, match=re.escape(message)):
        reproduce(tmp_path / "rep", rewards=rewards)
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize(
    "given, message",
    [({"seeds": True}, "seeds must be a positive integer, got True"),
     ({"seeds": 0}, "seeds must be a positive integer, got 0"),
     ({"workers": True}, "workers must be a positive integer, got True"),
     ({"workers": 1.0}, "workers must be a positive integer, got 1.0")],
)
def test_reproduce_refuses_a_number_of_seeds_or_workers_that_is_not_a_count(tiny_synthetic_path, tmp_path, given, message):
    """``True`` is not one seed or one worker: refused, naming it, before the folder is made."""
    from experiments.reproduce import reproduce

    with pytest.raises(ValueError, match=re.escape(message)):
        reproduce(tmp_path / "rep", dataset=tiny_synthetic_path, device="cpu", **given)
    assert not (tmp_path / "rep").exists()


def test_the_baseline_trains_on_every_image_whatever_training_selection_rate_the_controllers_get(tiny_synthetic, tmp_path):
    """``--env-kwargs '{"training_selection_rate": ...}'`` is for the controllers' runs: the non-selective
    baseline is trained on every image of every batch all the same (the same weights as without it: REINFORCE's
    classification runs get a rate by default, so "without" says None)."""
    import torch

    from experiments.reproduce import train_baseline
    from experiments.training import TrainConfig
    from iqa_env.data import split_by_group

    train_set, validation_set, _ = split_by_group(tiny_synthetic, seed=0)
    weights = []
    for name, extra in (("plain", {"training_selection_rate": None}), ("rate", {"training_selection_rate": 0.5})):
        config = TrainConfig(algo="reinforce", reward="weighted", seed=0, steps=6, batch_size=8, validation_size=16,
                             device="cpu", env_kwargs=extra)
        folder = tmp_path / name
        folder.mkdir()
        assert train_baseline(config, folder, train_set, validation_set) == 6
        weights.append(torch.load(folder / "predictor.pt", weights_only=True))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("workers", [2, 1])
def test_a_stage_run_here_has_the_thread_count_of_the_pools_stages(tmp_path, monkeypatch, workers):
    """Every stage runs on one torch thread: the last one left of a resumed run, and every stage of
    ``workers=1``, which run in this process, too.  Before, those ran on the default threads, whose sums in
    another order gave other figures than the same stage run in the pool.  A stage run in this process
    leaves its thread count as it was."""
    import torch

    import experiments.reproduce as rp
    from experiments.training import TrainConfig

    seen = []
    monkeypatch.setattr(rp, "_run_stage", lambda stage: seen.append(torch.get_num_threads()) or {"predictor_updates": 1, "elapsed_s": 0.0})
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what the stages must not inherit
    try:
        # With workers=1 both stages run here; with 2, the pool's processes are not this one: one stage left.
        stages = [rp.make_stage(tmp_path, "baseline", TrainConfig(steps=1, seed=s), "baseline", 16) for s in range(3 - workers)]
        assert rp.run_stages(stages, workers) == len(stages)
        assert seen == [rp.STAGE_THREADS] * len(stages) == [1] * len(stages)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_no_mirror_average_reaches_every_stages_config_and_the_recorded_options():
    """``--no-mirror-average`` (``mirror_average=False``): a TrainConfig field of every stage, off; on by default."""
    from experiments.commands import add_mirror_argument
    from experiments.reproduce import budget_config, with_kwargs

    parser = argparse.ArgumentParser()
    add_mirror_argument(parser)
    assert parser.parse_args([]).mirror_average is True
    assert parser.parse_args(["--no-mirror-average"]).mirror_average is False
    assert with_kwargs(None, None, None) == {}
    assert with_kwargs({"steps": 3}, None, None, mirror_average=False) == {"steps": 3, "mirror_average": False}
    on, _ = budget_config(True, None, None, None, "cpu", with_kwargs(None, None, None))
    off, _ = budget_config(True, None, None, None, "cpu", with_kwargs(None, None, None, mirror_average=False))
    assert on.mirror_average is True and off.mirror_average is False
    assert dataclasses.replace(off, mirror_average=True) == on


def test_a_folder_made_before_mirror_average_resumes_only_without_it(tmp_path):
    """A folder whose settings and stages lack ``mirror_average`` scored each image alone: the default is other
    settings, named; ``--no-mirror-average`` is the same settings, and its stages are the same stages."""
    from experiments.reproduce import SETTINGS_FILE, check_settings, with_settings_added_since

    now = {"kind": "reproduce", "config": {"steps": 3, "mirror_average": True}}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"kind": "reproduce", "config": {"steps": 3}}))
    with pytest.raises(ValueError, match=r"config\.mirror_average: False there, True now"):
        check_settings(tmp_path, now)
    check_settings(tmp_path, {"kind": "reproduce", "config": {"steps": 3, "mirror_average": False}})
    identity = {"kind": "train", "steps": 3}
    assert with_settings_added_since(identity, {**identity, "mirror_average": False}, "reinforce") == {
        **identity, "mirror_average": False
    }
    assert with_settings_added_since({**identity, "mirror_average": True}, identity, "reinforce") == {
        **identity, "mirror_average": True
    }  # a field the current identity lacks is not filled in, and one recorded is kept
