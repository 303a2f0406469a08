"""The reward formulas and the moving-average baseline, checked by hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from iqa_env.rewards import (
    MovingAverageBaseline,
    fixed_reward,
    kept_by_rejection,
    selective_reward,
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
