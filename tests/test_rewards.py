"""The reward formulas and the moving-average baseline, checked by hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from iqa_env.rewards import (
    LOG_LOSS_FLOOR,
    ClassMixCorrection,
    MovingAverageBaseline,
    class_log_losses,
    class_mix_contrast,
    fixed_reward,
    kept_by_rejection,
    leave_one_out_rewards,
    selective_reward,
    validation_reward,
    weighted_reward,
)

LOSSES = np.array([0.0, 1.0, 0.0, 1.0, 0.5])


def test_fixed_reward_is_minus_mean_loss():
    assert fixed_reward(LOSSES) == pytest.approx(-0.5)


def test_weighted_reward_is_normalised_by_the_weights():
    w = np.array([1.0, 0.0, 1.0, 0.0, 0.0])
    assert weighted_reward(LOSSES, w) == 0.0
    # Scaling every weight down does not change the reward: shrinking h is not rewarded.
    assert weighted_reward(LOSSES, 0.1 * np.ones(5)) == pytest.approx(weighted_reward(LOSSES, np.ones(5)))
    assert weighted_reward(LOSSES, np.zeros(5)) == pytest.approx(-0.5)


def test_selective_reward_rejects_the_lowest_scored():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.7])
    assert kept_by_rejection(scores, 0.4).tolist() == [True, False, True, False, True]
    assert selective_reward(LOSSES, scores, 0.4) == pytest.approx(-0.5 / 3)
    # With Bernoulli selections only the selected survivors count.
    selection = np.array([True, True, False, True, False])
    assert selective_reward(LOSSES, scores, 0.4, selection) == 0.0
    # At least one image is always kept.
    assert kept_by_rejection(scores, 0.99).sum() == 1


def test_moving_average_baseline_follows_the_paper():
    b = MovingAverageBaseline(0.9)
    assert b.update(-1.0) == 0.0  # Rbar_1 = R_1
    # Rbar_2 = 0.9 * -1 + 0.1 * 0 = -0.9, R_2 - Rbar_2 = 0.9
    assert b.update(0.0) == pytest.approx(0.9)
    assert b.value() == pytest.approx(-0.9)
    assert b.update(5.0, key=3) == 0.0 and b.value(3) == 5.0
    with pytest.raises(ValueError, match="decay"):
        MovingAverageBaseline(1.0)


def test_moving_average_baseline_would_give_what_update_gives_without_updating():
    b = MovingAverageBaseline(0.9)
    np.testing.assert_array_equal(b.would_give(np.array([-1.0, 3.0])), [0.0, 0.0])  # a first reward gives 0
    b.update(-1.0)
    np.testing.assert_allclose(b.would_give(np.array([0.0, -2.0])), [0.9, -0.9])
    assert b.value() == -1.0  # unchanged
    assert b.update(0.0) == pytest.approx(0.9)


@pytest.mark.parametrize("reward", ["weighted", "selective"])
def test_leave_one_out_rewards_flip_one_draw_and_keep_the_others(reward):
    rng = np.random.default_rng(0)
    losses, scores = rng.random(9), rng.random(9)
    selection = rng.random(9) < 0.5
    flipped = leave_one_out_rewards(reward, losses, scores, 0.3, selection)
    assert flipped.shape == (9, 2)
    for j in range(9):
        for value in (0, 1):
            draws = selection.copy()
            draws[j] = bool(value)
            expected = (
                -losses[draws].mean()
                if reward == "weighted"
                else -losses[kept_by_rejection(scores, 0.3) & draws].mean()
            )
            assert flipped[j, value] == pytest.approx(expected)
        # the draw that was made gives the batch's own reward
        assert flipped[j, int(selection[j])] == validation_reward(reward, losses, scores, 0.3, selection)
    if reward == "selective":  # a rejected image's draw changes nothing
        rejected = ~kept_by_rejection(scores, 0.3)
        np.testing.assert_array_equal(flipped[rejected, 0], flipped[rejected, 1])
    assert np.any(flipped[:, 0] != flipped[:, 1])


def test_leave_one_out_baselines_keep_the_policy_gradient_and_cut_its_variance():
    """On one batch drawn many times, ``(R - b_j)(a_j - h_j)`` with ``b_j = h_j R(a_j=1) + (1 - h_j)
    R(a_j=0)`` has the mean of ``(R - Rbar)(a_j - h_j)`` (the score-function gradient of each logit,
    with the batch's mean reward as its baseline, as a moving average gives) and a much smaller spread."""
    rng = np.random.default_rng(1)
    losses, h = rng.random(16), rng.uniform(0.2, 0.8, 16)
    rewards, scores, baselines = [], [], []
    for _ in range(20000):
        selection = rng.random(16) < h
        rewards.append(weighted_reward(losses, selection.astype(np.float64)))
        flipped = leave_one_out_rewards("weighted", losses, h, 0.0, selection)
        baselines.append(h * flipped[:, 1] + (1 - h) * flipped[:, 0])
        scores.append(selection - h)  # d log pi / d logit_j
    rewards, scores, baselines = np.array(rewards), np.array(scores), np.array(baselines)
    plain = (rewards - rewards.mean())[:, None] * scores
    loo = (rewards[:, None] - baselines) * scores
    error = np.hypot(plain.std(0), loo.std(0)) / np.sqrt(len(plain))
    assert np.all(np.abs(loo.mean(0) - plain.mean(0)) < 4 * error)
    assert np.all(loo.std(0) < 0.5 * plain.std(0))
    # ... and it points the way that ranks the images: towards the lower losses.
    assert np.corrcoef(loo.mean(0), -losses)[0, 1] > 0.95


def test_class_log_losses_compare_images_within_their_class():
    losses = np.array([0.1, 1.0, 0.01, 0.5, 0.05])
    classes = np.array([0, 0, 1, 1, 1])
    values = class_log_losses(losses, classes)
    # log(l) minus its class mean: each class averages to 0, order within a class is kept.
    expected = np.log(losses)
    expected[:2] -= np.log(losses[:2]).mean()
    expected[2:] -= np.log(losses[2:]).mean()
    assert values == pytest.approx(expected)
    # A class the predictor finds 10x harder gets the same values: a whole class is not "worse".
    harder = losses * np.where(classes == 1, 10.0, 1.0)
    assert class_log_losses(harder, classes) == pytest.approx(values)
    # Without it, the weighted reward prefers weighting the easier class.
    w_class0 = (classes == 0).astype(float)
    assert weighted_reward(harder, w_class0) > weighted_reward(harder, 1 - w_class0)
    # With it, keeping a whole class earns nothing over keeping the other: both average 0.
    normalised = class_log_losses(harder, classes)
    assert weighted_reward(normalised, w_class0) == pytest.approx(0.0, abs=1e-12)
    assert weighted_reward(normalised, 1 - w_class0) == pytest.approx(0.0, abs=1e-12)
    # A loss of exactly 0 (a float32 cross-entropy can be) is taken at the floor, not -inf.
    zero = class_log_losses(np.array([0.0, LOG_LOSS_FLOOR]), np.array([1, 1]))
    assert zero.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "losses, classes, message",
    [
        (np.array([0.1, np.nan]), np.array([0, 1]), "finite losses >= 0"),
        (np.array([0.1, -1.0]), np.array([0, 1]), "finite losses >= 0"),
        (np.array([0.1, 0.2]), np.array([0, 1, 1]), "one class per loss"),
    ],
)
def test_class_log_losses_refuses_bad_input(losses, classes, message):
    with pytest.raises(ValueError, match=message):
        class_log_losses(losses, classes)


def test_only_the_fixed_reward_has_no_validation_phase():
    from iqa_env.env import TaskAmenabilityEnv, validation_steps_of
    from iqa_env.rewards import has_validation_phase

    assert [has_validation_phase(r) for r in ("fixed", "weighted", "selective")] == [False, True, True]
    assert [validation_steps_of(r, 100, 32) for r in ("fixed", "weighted", "selective")] == [0, 4, 4]
    env = TaskAmenabilityEnv(batch_size=8, train_steps=2, validation_size=16, device="cpu", reward="selective")
    assert env.uses_validation_phase and env.validation_steps == 2
    with pytest.raises(ValueError, match=r"reward must be one of \('fixed', 'weighted', 'selective'\), got 'fixd'"):
        has_validation_phase("fixd")


def test_class_mix_contrast_is_each_class_share_selected_minus_the_rest():
    selection = np.array([True, True, False, False, False])
    classes = np.array([1, 0, 1, 1, 2])
    # selected: classes 1, 0 -> shares of 1 and 2: 1/2, 0; the rest: 1, 1, 2 -> 2/3, 1/3
    assert class_mix_contrast(selection, classes, 3) == pytest.approx([0.5 - 2 / 3, -1 / 3])
    assert class_mix_contrast(np.ones(5, bool), classes, 3) is None
    assert class_mix_contrast(np.zeros(5, bool), classes, 3) is None


def test_class_mix_correction_removes_a_class_term_and_keeps_the_rest():
    """Rewards made of a class term plus an image term: after the first steps, the corrected rewards no
    longer follow the class mix and still follow the image term; the fit uses earlier steps only."""
    rng = np.random.default_rng(0)
    correction = ClassMixCorrection(num_classes=2, decay=0.99)
    contrasts, images, corrected = [], [], []
    for _ in range(400):
        selection, classes = rng.random(32) < 0.5, rng.integers(0, 2, 32)
        contrast = class_mix_contrast(selection, classes, 2)
        image_term = rng.normal()
        first = correction.weights
        corrected.append(correction.correct(-1.0 * contrast[0] + 0.2 * image_term, contrast))
        if first is None:
            assert corrected[-1] == pytest.approx(-1.0 * contrast[0] + 0.2 * image_term)  # nothing to fit yet
        contrasts.append(contrast[0])
        images.append(image_term)
    assert correction.weights[0] == pytest.approx(-1.0, abs=0.1)
    late = slice(50, None)
    assert abs(np.corrcoef(contrasts[late], corrected[late])[0, 1]) < 0.1
    assert np.corrcoef(images[late], corrected[late])[0, 1] > 0.95
    # A step without a contrast passes unchanged and does not join the fit.
    fitted = correction.fitted
    assert correction.correct(0.3, None) == 0.3 and correction.fitted == fitted
    correction.reset()
    assert correction.weights is None and correction.fitted == 0
    with pytest.raises(ValueError, match="decay must be in"):
        ClassMixCorrection(2, decay=0.0)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"num_classes must be a positive integer, got {bad!r}"):
            ClassMixCorrection(bad)


def test_class_mix_correction_per_step_follows_a_class_term_that_changes_every_step():
    """Eight draws of each step's batch, paid a class term whose weight changes from step to step (the
    predictor's class bias) plus an image term.  The running fit only removes the class term's average;
    the fit on each step's own draws removes it within the step and keeps the image term."""
    rng = np.random.default_rng(0)
    running, per_step = ClassMixCorrection(2), ClassMixCorrection(2)
    residual = {"running": [], "step": []}
    contrasts, images = [], []
    for _ in range(200):
        classes, weight = rng.integers(0, 2, 32), rng.normal(-1.0, 1.0)
        draws = rng.random((8, 32)) < 0.5
        step_contrasts = [class_mix_contrast(d, classes, 2) for d in draws]
        image_terms = rng.normal(size=8)
        rewards = np.array([weight * c[0] for c in step_contrasts]) + 0.2 * image_terms
        residual["running"].append([running.correct(r, c) for r, c in zip(rewards, step_contrasts)])
        residual["step"].append(per_step.correct_step(rewards, step_contrasts))
        contrasts.append([c[0] for c in step_contrasts])
        images.append(image_terms)
    late = slice(50, None)
    c, i = np.ravel(contrasts[late]), np.ravel(images[late])
    running_r, step_r = np.ravel(residual["running"][late]), np.ravel(residual["step"][late])
    # Within each step, how much of the corrected rewards' spread the class mix still explains:
    def class_share(r):
        r, cs = np.reshape(r, (-1, 8)), np.reshape(c, (-1, 8))
        r, cs = r - r.mean(1, keepdims=True), cs - cs.mean(1, keepdims=True)
        slopes = (r * cs).sum(1) / (cs**2).sum(1)
        return float(((slopes[:, None] * cs) ** 2).sum() / (r**2).sum())
    assert class_share(step_r) < 1e-9 and class_share(running_r) > 0.3
    assert np.corrcoef(i, step_r)[0, 1] > 0.8 > np.corrcoef(i, running_r)[0, 1]
    # Both fits learn the average class weight from every draw.
    assert running.fitted == per_step.fitted == 200 * 8
    assert running.weights[0] == pytest.approx(-1.0, abs=0.3) and per_step.weights[0] == pytest.approx(-1.0, abs=0.3)


def test_class_mix_correction_per_step_falls_back_to_the_running_fit():
    """Draws that do not determine the step's class weight (too few with a contrast, or one contrast for
    all) are corrected by the running fit, or not at all before it has enough steps."""
    same = [np.array([0.25])] * 4
    assert np.array_equal(ClassMixCorrection(2).correct_step(np.array([0.1, 0.2, 0.3, 0.4]), same), [0.1, 0.2, 0.3, 0.4])
    correction = ClassMixCorrection(2)
    for _ in range(10):  # a running fit of weight 2
        for c in (-0.5, 0.5):
            correction.correct(2.0 * c, np.array([c]))
    assert correction.weights[0] == pytest.approx(2.0)
    out = correction.correct_step(np.array([1.0, 1.0, 1.0, 5.0]), [np.array([0.5])] * 3 + [None])
    assert out == pytest.approx([0.0, 0.0, 0.0, 5.0], abs=1e-6)  # None: no contrast, passed unchanged
    # Two draws with a contrast do not determine a slope and an intercept with anything left over.
    out = correction.correct_step(np.array([0.0, 1.0]), [np.array([0.1]), np.array([0.3])])
    assert out == pytest.approx([-0.2, 0.4], abs=1e-6)
    with pytest.raises(ValueError, match="got 2 rewards and 1 contrasts; expected one per draw"):
        correction.correct_step(np.array([0.0, 1.0]), [np.array([0.1])])
