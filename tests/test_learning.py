"""The agents *learn*: on data whose amenability is known, a controller that starts
with an inverted ranking (holdout AUROC < 0.5) ends with AUROC >= 0.8.

The data (``conftest.occluded_dataset``) is easy on purpose: these tests check
that each algorithm turns the env's scalar rewards into a per-image ranking,
with fixed seeds, in seconds to a minute on 2 CPU cores.  The same on the
harder built-in synthetic ultrasound set takes minutes per seed:
``tests/test_learning_builtin.py`` (marked slow) shows it for one seed of
REINFORCE (DDPG's needs hours on a CPU), and
``experiments/seed_study.py`` measures every seed (``docs/learning-status.md``).
"""

from __future__ import annotations

import pytest

from agents import Controller, make_agent, recommended_env_kwargs
from agents.factory import PAPER_FIXED_ENV_KWARGS
from iqa_env.data import split_by_group
from iqa_env.env import TaskAmenabilityEnv
from iqa_env.metrics import auroc
from tests.conftest import occluded_dataset


@pytest.fixture(scope="module")
def occluded_splits():
    return split_by_group(occluded_dataset(), seed=0)


def _learn(
    splits, algo: str, reward: str, seed: int, steps: int, agent_kwargs: dict | None = None, **env_kwargs
) -> tuple[float, float]:
    """(initial, final) holdout AUROC of the controller against the known amenability."""
    train, validation, holdout = splits
    settings = {"validation_size": 64, **recommended_env_kwargs(algo, reward)}
    settings.update(predictor_warmup_steps=100, batch_size=16, **env_kwargs)
    env = TaskAmenabilityEnv(train, validation_dataset=validation, reward=reward, train_steps=4, device="cpu", **settings)
    # learn() makes the seeded reset (and the predictor's warm-up) once.
    agent = make_agent(
        algo, env, seed=seed, **({} if algo == "reinforce" else {"learning_starts": 16}), **(agent_kwargs or {})
    )
    amenable = holdout.amenable("classification")

    def holdout_auroc() -> float:
        return auroc(Controller.from_agent(agent).score(holdout.images), amenable)

    initial = holdout_auroc()
    agent.learn(steps)
    return initial, holdout_auroc()


@pytest.mark.parametrize(("reward", "seed"), [("weighted", 0), ("weighted", 1), ("selective", 0)])
def test_reinforce_learns_the_ranking(occluded_splits, reward, seed):
    initial, final = _learn(occluded_splits, "reinforce", reward, seed, steps=400)
    assert initial < 0.5, f"seed {seed} should start inverted, started at {initial:.3f}"
    assert final >= 0.8, f"REINFORCE ({reward}, seed {seed}): {initial:.3f} -> {final:.3f}"


@pytest.mark.parametrize("reward_baseline", ["moving_average", "non_selective"])
def test_reinforce_learns_the_ranking_with_counterfactual_image_baselines(occluded_splits, reward_baseline):
    initial, final = _learn(
        occluded_splits, "reinforce", "weighted", 0, steps=400, reward_baseline=reward_baseline,
        agent_kwargs=dict(image_baseline="counterfactual"),
    )
    assert initial < 0.5, f"seed 0 should start inverted, started at {initial:.3f}"
    assert final >= 0.8, f"REINFORCE (weighted, {reward_baseline}, counterfactual): {initial:.3f} -> {final:.3f}"


@pytest.mark.parametrize("reward", ["weighted", "selective"])
def test_reinforce_learns_the_ranking_without_image_baselines(occluded_splits, reward):
    """The paper's form: every image of a step shares its reward (the default gives each
    validation image the leave-one-out baseline of its own draw, ``image_baseline="leave_one_out"``)."""
    initial, final = _learn(occluded_splits, "reinforce", reward, 0, steps=400, agent_kwargs=dict(image_baseline="none"))
    assert initial < 0.5, f"seed 0 should start inverted, started at {initial:.3f}"
    assert final >= 0.8, f"REINFORCE ({reward}, no image baselines): {initial:.3f} -> {final:.3f}"


#: The fixed reward's env in the paper's form (REINFORCE's default is the paired set-up with linearised probes),
#: on the validation images of the other tests.
PAPER_FIXED = {**PAPER_FIXED_ENV_KWARGS, "validation_size": 64}


def test_reinforce_with_the_fixed_reward_moves_towards_the_ranking(occluded_splits):
    # The fixed reward only sees the training selection's effect on clean validation
    # images, a weaker signal (as the paper's follow-up and our prototype found):
    # in the paper's form it learns, but not to 0.8 in this budget (measured: 0.273 -> 0.635).
    initial, final = _learn(occluded_splits, "reinforce", "fixed", 0, steps=400, **PAPER_FIXED)
    assert initial < 0.5
    assert final - initial >= 0.25, f"REINFORCE (fixed): {initial:.3f} -> {final:.3f}"


@pytest.mark.parametrize("seed", [0, 1])
def test_reinforce_learns_the_ranking_with_the_fixed_reward_and_the_paired_baseline(occluded_splits, seed):
    # Each training step rewarded against a step on the rest of its batch (reward_baseline="paired")
    # carries the training-selection signal that the moving average above loses
    # (measured: seed 0 0.273 -> 0.954, seed 1 0.441 -> 0.989 in 500 steps).
    initial, final = _learn(occluded_splits, "reinforce", "fixed", seed, steps=500, agent_kwargs=dict(class_balance=0.0),
                            **{**PAPER_FIXED, "reward_baseline": "paired"})
    assert initial < 0.5, f"seed {seed} should start inverted, started at {initial:.3f}"
    assert final >= 0.8, f"REINFORCE (fixed, paired, seed {seed}): {initial:.3f} -> {final:.3f}"


def test_reinforce_learns_the_ranking_with_the_fixed_reward_and_each_draw_credited_against_the_others(occluded_splits):
    # DDPG's fixed-reward env set-up (8 draws per paired step, the class term fitted on them); REINFORCE
    # credits each draw with its reward less the mean of the other seven (draws="leave_one_out").
    # Measured: seed 0 0.273 -> 0.855 in 200 steps; crediting only the trained draw, 0.607.
    paired = dict(reward_baseline="paired", validation_size=32, paired_draws=8, paired_class_correction="step",
                  paired_probe="step", predictor_average=0.0, training_selection_rate=None)
    initial, final = _learn(occluded_splits, "reinforce", "fixed", 0, steps=200, agent_kwargs=dict(class_balance=0.0), **paired)
    assert initial < 0.5, f"seed 0 should start inverted, started at {initial:.3f}"
    assert final >= 0.8, f"REINFORCE (fixed, 8 draws credited against each other): {initial:.3f} -> {final:.3f}"


def test_reinforce_learns_the_ranking_with_the_fixed_reward_and_its_defaults(occluded_splits):
    # REINFORCE's fixed-reward default: the paired set-up of the test above with the probes' rewards computed
    # from the predictor linearised at each episode's start (paired_probe="linearised"), the class penalty and
    # the exported weight average of the policy (agents.PAIRED_DEFAULTS), the predictor's real step on 80 % of
    # each batch (section 79), whose gradient comes from the probes' per-image ones (section 80).  Measured (one
    # torch thread, as the tests run): this test's run 0.441 -> 0.995, seeds 0, 2, 3 0.997 0.997 0.985; before
    # section 80 (the real step's own pass) 0.995 and 0.995 0.996 0.984.  Without the 80 %: 0.984 (0.986 for the last policy), seeds 0, 2, 3 0.998 1.000 0.988, and seeds 0-3 in
    # runs evaluated every 100 env steps 0.993 0.984 0.998 0.984 at 400 and 0.996 0.985 0.984 0.982 at 800
    # (the last policy: 0.997 0.973 0.986 0.982).  Seed 1 is where the
    # first-order probes (paired_probe="linear") had lost the ranking by then: 0.898 at 100 env steps, 0.393
    # at 400 (docs/learning-status.md, section 54).
    initial, final = _learn(occluded_splits, "reinforce", "fixed", 1, steps=400)
    assert initial < 0.5, f"seed 1 should start inverted, started at {initial:.3f}"
    assert final >= 0.9, f"REINFORCE (fixed, its defaults, seed 1): {initial:.3f} -> {final:.3f}"


def test_ddpg_learns_the_ranking(occluded_splits):
    initial, final = _learn(occluded_splits, "ddpg", "weighted", 0, steps=200)
    assert initial < 0.5, f"seed 0 should start inverted, started at {initial:.3f}"
    assert final >= 0.8, f"DDPG (weighted, seed 0): {initial:.3f} -> {final:.3f}"


def test_ddpg_learns_the_ranking_with_the_fixed_reward_and_its_defaults(occluded_splits):
    # DDPG's recommended fixed-reward set-up (reward_baseline="paired", 8 draws per step with the class
    # term fitted on them, 32 validation images, a bandit critic fitted on the draws; agents.factory).
    # Measured: seed 0 0.423 -> 0.873 in 100 steps, 0.945 in 200; seed 1 0.395 -> 0.687 and 0.642.
    initial, final = _learn(occluded_splits, "ddpg", "fixed", 0, steps=100)
    assert initial < 0.5, f"seed 0 should start inverted, started at {initial:.3f}"
    assert final >= 0.8, f"DDPG (fixed, its defaults, seed 0): {initial:.3f} -> {final:.3f}"
