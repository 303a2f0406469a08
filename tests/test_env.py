"""TaskAmenabilityEnv: the Gymnasium contract, determinism, vectorisation, bad input."""

from __future__ import annotations

import functools
import pickle
import re
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import iqa_env
from iqa_env.env import PAIRED_PROBES, TaskAmenabilityEnv
from tests.conftest import random_dataset

TASKS = ("classification", "segmentation")
REWARDS = ("fixed", "weighted", "selective")
TINY = dict(batch_size=8, train_steps=3, validation_size=20, device="cpu")


def make(dataset, **kwargs) -> TaskAmenabilityEnv:
    return gym.make("TaskAmenability-v0", dataset=dataset, **{**TINY, **kwargs}).unwrapped


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("reward", REWARDS)
def test_gymnasium_check_env(tiny_synthetic, task, reward):
    env = make(tiny_synthetic, task=task, reward=reward, render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning is expected from Gymnasium's checker
        check_env(env, skip_render_check=False)


def test_stable_baselines3_check_env(tiny_synthetic):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = make(tiny_synthetic)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env, warn=True)
    expected = (
        # SB3 wants image observations as (C, H, W) or (H, W, C) of one image; ours are a batch
        # of B images, (B, C, H, W), which its CNN policies cannot take as is: the agents
        # package brings per-sample policies for this observation.
        "has an unconventional shape (neither an image, nor a 1D vector)",
        # The action space is [0, 1] (probabilities); SB3 recommends symmetric [-1, 1]
        # spaces for its Gaussian policies, and the agents rescale.
        "We recommend you to use a symmetric and normalized Box action space",
    )
    messages = [str(w.message) for w in caught]
    unexpected = [m for m in messages if not any(e in m for e in expected)]
    assert not unexpected, unexpected
    assert all(any(e in m for m in messages) for e in expected), messages  # the checker did look at both


def _rollout(env: TaskAmenabilityEnv, seed: int, steps: int):
    rng = np.random.default_rng(123)
    obs, info = env.reset(seed=seed)
    trace = [(obs.copy(), 0.0, info)]
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(rng.random(env.batch_size).astype(np.float32))
        trace.append((obs.copy(), reward, info))
        if terminated or truncated:
            obs, info = env.reset()
            trace.append((obs.copy(), 0.0, info))
    return trace


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_rollout(tiny_synthetic, task):
    a = _rollout(make(tiny_synthetic, task=task), seed=7, steps=20)
    b = _rollout(make(tiny_synthetic, task=task), seed=7, steps=20)
    c = _rollout(make(tiny_synthetic, task=task), seed=8, steps=20)
    for (oa, ra, ia), (ob, rb, ib) in zip(a, b):
        np.testing.assert_array_equal(oa, ob)
        assert ra == rb
        assert ia.keys() == ib.keys()
        for key in ia:
            np.testing.assert_array_equal(ia[key], ib[key], err_msg=key)
    assert any(not np.array_equal(oa, oc) for (oa, _, _), (oc, _, _) in zip(a, c))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("reward", REWARDS)
def test_every_task_and_reward_runs_episodes(tiny_synthetic, task, reward):
    env = make(tiny_synthetic, task=task, reward=reward)
    env.reset(seed=0)
    ready = []
    for _episode in range(3):
        terminated, steps = False, 0
        while not terminated:
            _, reward_value, terminated, truncated, info = env.step(env.action_space.sample())
            assert np.isfinite(reward_value) and not truncated
            if info["reward_ready"]:
                ready.append(info["raw_reward"])
            steps += 1
        assert steps == env.episode_length
        env.reset()
    expected = 3 * max(1, env.validation_steps)
    assert len(ready) == expected and all(-1.0 <= r <= 0.0 for r in ready)


def test_episode_structure_and_info(tiny_synthetic):
    env = make(tiny_synthetic, reward="weighted")
    obs, info = env.reset(seed=0)
    assert info["phase"] == "train" and obs.shape == env.observation_space.shape
    phases = []
    terminated = False
    while not terminated:
        acted = info["batch_indices"]  # the batch of the observation the action answers
        source = env.train_set if info["phase"] == "train" else env.validation_set
        _, _, terminated, _, info = env.step(np.full(env.batch_size, 0.5, np.float32))
        phases.append(info["action_phase"])
        assert info["selection"].dtype == bool and info["selection"].shape == (env.batch_size,)
        assert info["num_selected"] == int(info["selection"][info["valid"]].sum())
        # The classes are those of the batch acted on, also on the step that starts validation.
        np.testing.assert_array_equal(info["classes"], source.labels[acted])
        assert info["classes"].dtype == np.int64
    assert phases == ["train"] * env.train_steps + ["validation"] * env.validation_steps
    # The validation images are padded up to whole batches; padding is marked invalid.
    assert env.validation_steps == int(np.ceil(20 / env.batch_size))
    assert int(info["valid"].sum()) == 20 - env.batch_size * (env.validation_steps - 1)


def test_shift_to_mean_keeps_the_ranking_and_sets_the_mean():
    from iqa_env.env import shift_to_mean

    p = np.array([0.0, 0.05, 0.3, 0.3, 0.6, 1.0])
    for rate in (0.1, 0.5, 0.8, 0.99):
        q = shift_to_mean(p, rate)
        assert abs(q.mean() - rate) < 1e-9 and np.all((q > 0) & (q < 1)), (rate, q)
        assert np.all(np.diff(q) >= 0) and q[2] == q[3]  # the same order, ties kept
    # Already at the rate: unchanged (to the clipping of 0 and 1).
    np.testing.assert_allclose(shift_to_mean(np.array([0.2, 0.4, 0.6]), 0.4), [0.2, 0.4, 0.6], atol=1e-9)


def test_training_selection_rate_draws_training_selections_at_that_rate_in_the_actions_order(tiny_synthetic):
    """Training steps draw from the action shifted to ``training_selection_rate``; validation steps from the action."""
    env = make(tiny_synthetic, reward="weighted", train_steps=4, training_selection_rate=0.8)
    env.reset(seed=0)
    action = np.linspace(0.05, 0.55, env.batch_size).astype(np.float32)  # mean 0.3, rising
    train, validation = [], []
    for _ in range(60):
        terminated = False
        while not terminated:
            _, _, terminated, _, info = env.step(action)
            (train if info["action_phase"] == "train" else validation).append(info["selection"][info["valid"]])
        env.reset()
    train_rate = np.mean([s.mean() for s in train])
    assert abs(train_rate - 0.8) < 0.03, train_rate
    per_image = np.mean(train, axis=0)  # higher-scored images are trained on more often
    assert per_image[-1] > per_image[0] + 0.3, per_image
    assert abs(np.concatenate(validation).mean() - action.mean()) < 0.05  # validation draws are the action's
    with pytest.raises(ValueError, match="use credit='validation', got credit='causal'"):
        from agents import make_agent

        make_agent("reinforce", env, seed=0, credit="causal")


@pytest.mark.parametrize("probe", ["linearised", "step"])
def test_paired_fixed_reward_with_a_training_rate_credits_the_actions_draws_and_trains_on_more(tiny_synthetic, probe):
    """The paired fixed reward with ``training_selection_rate``: ``info["selection"]`` and the probes keep
    the action's draws, the predictor's real step takes the same uniforms at the shifted probabilities
    (the action's draw and more, in the action's order), and each step's reward is what it is without the
    rate (the probes are taken before the real step); REINFORCE may credit those draws."""
    from agents import make_agent

    kwargs = dict(reward="fixed", reward_baseline="paired", reward_metric="loss", paired_probe=probe, train_steps=4)
    with_rate = make(tiny_synthetic, **kwargs, training_selection_rate=0.8)
    plain = make(tiny_synthetic, **kwargs)
    trained_on = []
    original = TaskAmenabilityEnv._train_predictor

    def recording(self, indices, batch_positions=None):
        if self is with_rate:
            trained_on.append(np.asarray(indices).copy())
        return original(self, indices, batch_positions)

    action = np.linspace(0.05, 0.55, with_rate.batch_size).astype(np.float32)  # mean 0.3, rising
    selected, trained, first_rewards = [], [], []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskAmenabilityEnv, "_train_predictor", recording)
        batch = with_rate.reset(seed=0)[1]["batch_indices"]
        plain.reset(seed=0)
        for step in range(40):
            _, reward, terminated, _, info = with_rate.step(action)
            _, plain_reward, plain_terminated, _, plain_info = plain.step(action)
            np.testing.assert_array_equal(info["selection"], plain_info["selection"])  # the same draws
            assert "training_selection" not in plain_info
            chosen, drawn = info["selection"], info["training_selection"]
            assert not np.any(chosen & ~drawn)  # every image of the action's draw is trained on
            np.testing.assert_array_equal(trained_on[-1], np.asarray(batch)[drawn])
            batch = info["batch_indices"]
            selected.append(chosen)
            trained.append(drawn)
            if step == 0:
                first_rewards.append((reward, plain_reward))  # same weights at the first probe
            assert terminated == plain_terminated
            if terminated:
                batch = with_rate.reset()[1]["batch_indices"]
                plain.reset()
    assert np.isclose(*first_rewards[0])
    assert abs(np.mean(selected) - action.mean()) < 0.06
    assert abs(np.mean(trained) - 0.8) < 0.05
    per_image = np.mean(trained, axis=0)
    assert per_image[-1] > per_image[0] + 0.3, per_image  # in the action's order
    make_agent("reinforce", with_rate, seed=0, credit="causal")  # the training steps' draws are the policy's
    assert with_rate.selection_reports_action_draws
    assert not make(tiny_synthetic, reward="weighted", training_selection_rate=0.8).selection_reports_action_draws


def test_paired_fixed_reward_with_linearised_probes_keeps_a_weight_average_for_evaluate_alone(tiny_synthetic):
    """With the ``linearised`` probes (which read the weights themselves) ``predictor_average`` changes what
    ``evaluate()`` reports and nothing of the run: the same draws, rewards and trained weights step for step."""
    import torch

    kwargs = dict(reward="fixed", reward_baseline="paired", reward_metric="loss", paired_probe="linearised",
                  train_steps=4, predictor_warmup_steps=5)
    averaged, plain = make(tiny_synthetic, **kwargs, predictor_average=0.9), make(tiny_synthetic, **kwargs)
    for env in (averaged, plain):
        env.reset(seed=0)
    action = np.linspace(0.1, 0.9, averaged.batch_size).astype(np.float32)
    for _ in range(12):
        _, reward, terminated, _, info = averaged.step(action)
        _, plain_reward, _, _, plain_info = plain.step(action)
        assert reward == plain_reward
        np.testing.assert_array_equal(info["selection"], plain_info["selection"])
        if terminated:
            averaged.reset()
            plain.reset()
    for a, b in zip(averaged.predictor.parameters(), plain.predictor.parameters()):
        assert torch.equal(a, b)  # the trained weights are the same
    assert averaged.evaluated_predictor is averaged.averaged_predictor and plain.evaluated_predictor is plain.predictor
    holdout = tiny_synthetic.subset(np.arange(20))
    assert not np.allclose(averaged.evaluate(holdout)["loss"], plain.evaluate(holdout)["loss"])


def test_validation_batch_size_rewards_part_of_each_validation_observation(tiny_synthetic):
    from iqa_env.rewards import weighted_reward

    def episode(env, invalid_score):
        _, info = env.reset(seed=3)
        seen, raws = [], []
        terminated = False
        while not terminated:
            acted, phase, k = info["batch_indices"], info["phase"], info["episode_step"] - env.train_steps
            p = np.full(env.batch_size, 0.5)
            if phase == "validation":
                p[~env._batch_valid] = invalid_score  # scores of images the step does not reward
                positions = env._validation_positions(k)[env._batch_valid]
                losses = env._validation_losses[positions]
            _, _, terminated, _, info = env.step(p)
            if phase == "train":
                assert info["valid"].all()
                continue
            valid = info["valid"]
            assert valid.sum() == min(3, 20 - len(seen)) and valid[: valid.sum()].all()
            seen.extend(acted[valid].tolist())
            # The reward is that of the valid images alone, with their own draws.
            assert info["raw_reward"] == weighted_reward(losses, info["selection"][valid].astype(np.float64))
            raws.append(info["raw_reward"])
        return seen, raws

    env = make(tiny_synthetic, reward="weighted", validation_batch_size=3)
    assert env.validation_steps == 7 and env.episode_length == env.train_steps + 7
    seen, raws = episode(env, 0.0)
    assert sorted(seen) == sorted(env._validation_order.tolist())  # every image rewarded once
    # What the action says of the images a step does not reward changes no reward.
    assert episode(make(tiny_synthetic, reward="weighted", validation_batch_size=3), 1.0)[1] == raws
    # The default is a whole batch per step.
    assert make(tiny_synthetic).validation_batch_size == TINY["batch_size"]


@pytest.mark.parametrize("value", [0, 9, 2.5, True])
def test_validation_batch_size_outside_the_batch_is_refused(tiny_synthetic, value):
    with pytest.raises(ValueError, match="validation_batch_size must be None"):
        make(tiny_synthetic, validation_batch_size=value)


def test_zero_selected_is_no_update(tiny_synthetic):
    import torch

    env = make(tiny_synthetic)
    env.reset(seed=0)
    before = [p.detach().clone() for p in env.predictor.parameters()]
    _, _, _, _, info = env.step(np.zeros(env.batch_size, np.float32))
    assert info["num_selected"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, env.predictor.parameters()))
    env.step(np.ones(env.batch_size, np.float32))
    assert any(not torch.equal(a, b) for a, b in zip(before, env.predictor.parameters()))


def test_predictor_persists_across_episodes_and_reinitialises_on_seed(tiny_synthetic):
    import torch

    env = make(tiny_synthetic, reward="fixed")
    env.reset(seed=0)
    initial = [p.detach().clone() for p in env.predictor.parameters()]
    for _ in range(env.train_steps):
        env.step(np.ones(env.batch_size, np.float32))
    trained = [p.detach().clone() for p in env.predictor.parameters()]
    env.reset()  # next episode, same predictor
    assert all(torch.equal(a, b) for a, b in zip(trained, env.predictor.parameters()))
    env.reset(seed=0)  # a seeded reset starts the run over
    assert all(torch.equal(a, b) for a, b in zip(initial, env.predictor.parameters()))
    env.reset(options={"reinitialise_predictor": True})
    assert any(not torch.equal(a, b) for a, b in zip(initial, env.predictor.parameters()))


@pytest.mark.parametrize(
    "action, message",
    [
        (np.full(8, np.nan, np.float32), "NaN or infinite"),
        (np.full(8, np.inf, np.float32), "NaN or infinite"),
        (np.zeros(7, np.float32), r"shape \(8,\)"),
        (np.zeros((8, 1), np.float32), r"shape \(8,\)"),
        ("abc", "selection probabilities"),
    ],
)
def test_bad_actions_raise_clear_errors(tiny_synthetic, action, message):
    env = make(tiny_synthetic)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(action)


def test_out_of_range_actions_are_clipped(tiny_synthetic):
    env = make(tiny_synthetic)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.full(8, 5.0, np.float32))
    assert info["num_selected"] == 8 and info["mean_selection_probability"] == 1.0
    _, _, _, _, info = env.step(np.full(8, -3.0, np.float32))
    assert info["num_selected"] == 0 and info["mean_selection_probability"] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="detection"), "task must be one of"),
        (dict(reward="best"), "reward must be one of"),
        (dict(rejection_ratio=1.0), r"rejection_ratio must be a number in \[0, 1\)"),
        (dict(rejection_ratio=-0.1), r"rejection_ratio must be a number in \[0, 1\)"),
        (dict(batch_size=10_000), "larger than the training set"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(mean_selection_bounds=(0.8, 0.2)), "mean_selection_bounds"),
        (dict(device="tpu"), "device must be"),
        (dict(predictor_average=1.0), r"predictor_average must be a decay in \[0, 1\)"),
        (dict(predictor_average=True), r"predictor_average must be a decay in \[0, 1\)"),
        (dict(reward_normalisation="z"), "reward_normalisation must be one of"),
        (dict(reward_normalisation="class_log"), "needs reward_metric='loss'"),
        (dict(reward_normalisation="class_log", reward_metric="loss", reward="fixed"), "the weighted or selective"),
        (dict(reward_baseline="paired"), "needs reward='fixed'"),
        (dict(reward="fixed", reward_baseline="paired", predictor_average=0.9),
         "with paired_probe='step', predictor_average=0"),
        (dict(probe_lr=0.0), "probe_lr must be a positive finite number"),
        (dict(probe_lr=float("nan")), "probe_lr must be a positive finite number"),
        (dict(training_selection_rate=1.0), r"training_selection_rate must be None or a probability in \(0, 1\)"),
        (dict(training_selection_rate=True), r"training_selection_rate must be None or a probability in \(0, 1\)"),
        (dict(training_selection_rate="0.8"), r"training_selection_rate must be None or a probability in \(0, 1\)"),
        (dict(training_selection_rate=0.8, reward="fixed"),
         "the fixed reward with reward_baseline='moving_average' rewards those selections themselves"),
        (dict(predictor_max_grad_norm=0.0), "predictor_max_grad_norm must be None or a positive number"),
        (dict(predictor_max_grad_norm=float("inf")), "predictor_max_grad_norm must be None or a positive number"),
        (dict(predictor_max_grad_norm="1"), "predictor_max_grad_norm must be None or a positive number"),
        (dict(predictor_max_grad_norm=True), "predictor_max_grad_norm must be None or a positive number"),
        # A number's setting refuses a bool, a string, None and NaN with the same error, not a TypeError from a
        # comparison or a bool read as 1.
        (dict(predictor_lr=True), "predictor_lr must be a positive finite number"),
        (dict(predictor_lr="0.1"), "predictor_lr must be a positive finite number"),
        (dict(predictor_lr=None), "predictor_lr must be a positive finite number"),
        (dict(predictor_lr=float("nan")), "predictor_lr must be a positive finite number"),
        (dict(predictor_warmup_steps=1.5), "predictor_warmup_steps must be a whole number >= 0"),
        (dict(predictor_warmup_steps=True), "predictor_warmup_steps must be a whole number >= 0"),
        (dict(predictor_warmup_steps="3"), "predictor_warmup_steps must be a whole number >= 0"),
        (dict(mean_selection_penalty=float("nan")), "mean_selection_penalty must be a finite number >= 0"),
        (dict(mean_selection_penalty=float("inf")), "mean_selection_penalty must be a finite number >= 0"),
        (dict(mean_selection_penalty="1"), "mean_selection_penalty must be a finite number >= 0"),
        (dict(mean_selection_bounds=(0.1,)), "mean_selection_bounds must be"),
        (dict(mean_selection_bounds="ab"), "mean_selection_bounds must be"),
        (dict(mean_selection_bounds=(float("nan"), 1.0)), "mean_selection_bounds must be"),
        (dict(baseline_decay="0.9"), r"baseline_decay must be a number in \[0, 1\)"),
        (dict(baseline_decay=1.0), r"baseline_decay must be a number in \[0, 1\)"),
        (dict(batch_size=True), "batch_size must be a positive integer"),
        (dict(train_steps=True), "train_steps must be a positive integer"),
        (dict(validation_size=True), "validation_size must be a positive integer or None"),
        (dict(split_seed=-1), "split_seed must be a whole number >= 0"),
        (dict(split_seed=1.5), "split_seed must be a whole number >= 0"),
        # A string is truthy: "no" would have turned the option on.
        (dict(validation_refresh="no"), "validation_refresh must be True or False"),
        (dict(stochastic_validation="yes"), "stochastic_validation must be True or False"),
        (dict(predictor_augment=0), "predictor_augment must be True or False"),
        (dict(reinitialise_predictor_on_seed=2), "reinitialise_predictor_on_seed must be True or False"),
    ],
)
def test_bad_settings_raise_clear_errors(tiny_synthetic, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskAmenabilityEnv(tiny_synthetic, **{**TINY, **kwargs})


def test_numpy_numbers_and_flags_are_settings_like_python_ones(tiny_synthetic):
    """Settings read from arrays or computed with numpy arrive as numpy scalars; they mean what Python's do."""
    env = TaskAmenabilityEnv(
        tiny_synthetic,
        **{**TINY, "batch_size": np.int64(8)},
        predictor_lr=np.float32(2e-3),
        predictor_average=np.float32(0.5),
        predictor_warmup_steps=np.int32(0),
        baseline_decay=np.float64(0.8),
        validation_refresh=np.bool_(True),
        mean_selection_bounds=[np.float32(0.1), 0.9],
        split_seed=np.int64(0),
    )
    assert env.batch_size == 8 and env.validation_refresh is True and env.mean_selection_bounds == (
        pytest.approx(0.1), 0.9
    )
    assert env.predictor_lr == pytest.approx(2e-3) and env.predictor_average == 0.5


def test_missing_cuda_is_a_clear_error(tiny_synthetic):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        TaskAmenabilityEnv(tiny_synthetic, **{**TINY, "device": "cuda"})


def test_segmentation_needs_masks_and_fixed_needs_human_labels():
    no_masks = random_dataset(masks=False)
    with pytest.raises(ValueError, match="needs segmentation masks"):
        TaskAmenabilityEnv(no_masks, task="segmentation", **TINY)
    ds = random_dataset()
    ds.human_amenability = {}
    with pytest.raises(ValueError, match="needs human amenability labels"):
        TaskAmenabilityEnv(ds, reward="fixed", **TINY)


def test_dataset_argument_accepts_a_path_and_rejects_other_types(tiny_synthetic_path):
    env = make(str(tiny_synthetic_path))
    assert env.reset(seed=0)[0].shape == env.observation_space.shape
    with pytest.raises(TypeError, match="dataset must be an ImageDataset"):
        TaskAmenabilityEnv(42, **TINY)


def test_explicit_validation_dataset(tiny_synthetic):
    train, validation = tiny_synthetic[:150], tiny_synthetic[150:]
    env = TaskAmenabilityEnv(train, validation_dataset=validation, **TINY)
    assert len(env.train_set) == 150 and len(env.validation_set) == len(tiny_synthetic) - 150


def test_holdout_is_out_of_reach(tiny_synthetic):
    from iqa_env.data import split_by_group

    env = make(tiny_synthetic)
    _, _, holdout = split_by_group(tiny_synthetic, seed=0)
    seen = set(np.unique(env.train_set.groups)) | set(np.unique(env.validation_set.groups))
    assert seen.isdisjoint(np.unique(holdout.groups))


def test_render_marks_selection(tiny_synthetic):
    env = make(tiny_synthetic, render_mode="rgb_array")
    env.reset(seed=0)
    before = env.render()
    env.step(np.array([1, 0] * 4, np.float32))
    after = env.render()
    assert before.dtype == np.uint8 and before.ndim == 3 and before.shape[2] == 3
    assert before.shape == after.shape
    # Frames: green for the selected (index 0), red for the rejected (index 1).
    assert tuple(after[0, 0]) == (40, 200, 80)
    tile_w = env.observation_space.shape[-1] + 4
    assert tuple(after[0, tile_w]) == (220, 50, 50)


def test_pickle_round_trip(tiny_synthetic):
    env = make(tiny_synthetic)
    env.reset(seed=3)
    clone = pickle.loads(pickle.dumps(env))
    action = np.full(env.batch_size, 0.5, np.float32)
    a = env.step(action)
    b = clone.step(action)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


def test_async_vector_env_with_spawn(tiny_synthetic_path):
    # Spawned workers start a fresh interpreter: the "iqa_env:" prefix imports the package there.
    make_one = functools.partial(gym.make, "iqa_env:TaskAmenability-v0", dataset=str(tiny_synthetic_path), **TINY)
    envs = gym.vector.AsyncVectorEnv([make_one, make_one], context="spawn")
    try:
        obs, _ = envs.reset(seed=[0, 1])
        assert obs.shape == (2, *envs.single_observation_space.shape)
        for _ in range(6):
            obs, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
        assert rewards.shape == (2,)
    finally:
        envs.close()


def test_sb3_subproc_vec_env(tiny_synthetic_path):
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    vec = make_vec_env(
        "iqa_env:TaskAmenability-v0",  # the worker processes import iqa_env through the prefix
        n_envs=2,
        seed=0,
        env_kwargs=dict(dataset=str(tiny_synthetic_path), **TINY),
        vec_env_cls=SubprocVecEnv,
        vec_env_kwargs=dict(start_method="spawn"),
    )
    try:
        vec.reset()
        for _ in range(6):
            _, rewards, dones, _ = vec.step(np.stack([vec.action_space.sample() for _ in range(2)]))
        assert rewards.shape == (2,)
    finally:
        vec.close()


def test_registration_is_silent_and_idempotent():
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(iqa_env)
    assert iqa_env.ENV_ID in gym.registry


def test_make_with_module_prefix_without_prior_import(tiny_synthetic_path):
    code = (
        "import gymnasium as gym, sys\n"
        "assert 'iqa_env' not in sys.modules\n"
        f"env = gym.make('iqa_env:TaskAmenability-v0', dataset={str(tiny_synthetic_path)!r}, batch_size=8, device='cpu')\n"
        "obs, info = env.reset(seed=0)\n"
        "print(obs.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(8, 1, 32, 32)"


def test_import_is_light():
    code = "import sys, iqa_env; print(sorted(m for m in ('torch', 'matplotlib', 'stable_baselines3', 'h5py') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_make_without_arguments_uses_the_built_in_dataset():
    env = gym.make("TaskAmenability-v0", device="cpu")
    obs, info = env.reset(seed=0)
    assert obs.shape[0] == 32 and obs.dtype == np.uint8
    assert env.unwrapped.train_set.metadata.get("source") == "synthetic-ultrasound"


def test_environment_page_matches_the_docstring():
    from experiments.docs import PAGE, environment_page

    assert PAGE.read_text() == environment_page(), "docs/environment.md is stale: run python -m experiments.docs"


def test_docstring_example_runs(tiny_synthetic_path):
    """The runnable example of the docs, with a small dataset instead of the built-in one."""
    import inspect
    import re

    doc = inspect.cleandoc(TaskAmenabilityEnv.__doc__)
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    code = code.replace("batch_size=16)", f"batch_size=16, dataset={str(tiny_synthetic_path)!r}, device='cpu')")
    namespace: dict = {}
    exec(compile(code, "environment-doc-example", "exec"), namespace)
    assert namespace["obs"].shape == (16, 1, 32, 32)


def _policy_run(dataset, reward: str, policy: str, seed: int, episodes: int = 6):
    """Mean raw reward, and the predictor's accuracy on clean validation images, under a fixed policy.

    ``oracle`` gives probability 0.9 to images that are amenable by the ground truth, 0.1 to the
    others; ``inverse`` does the opposite.
    """
    task = "classification"
    env = TaskAmenabilityEnv(dataset, task=task, reward=reward, batch_size=32, train_steps=25, device="cpu")
    _, info = env.reset(seed=seed)
    raw = []
    for _ in range(episodes):
        terminated = False
        while not terminated:
            source = env.train_set if info["phase"] == "train" else env.validation_set
            good = source.amenable(task)[info["batch_indices"]]
            if policy == "inverse":
                good = ~good
            _, _, terminated, _, info = env.step(np.where(good, 0.9, 0.1).astype(np.float32))
            if info["reward_ready"]:
                raw.append(info["raw_reward"])
        _, info = env.reset()
    validation = env.validation_set
    clean = validation.subset(np.flatnonzero(validation.amenable(task)))
    return float(np.mean(raw)), float(env.evaluate(clean)["metric"].mean())


@pytest.mark.parametrize("reward", REWARDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_reward_prefers_the_oracle_policy(small_synthetic, reward, seed):
    """The env measures what the paper says: selecting amenable images earns more raw reward.

    The raw reward R~ is compared (before the moving-average baseline, which absorbs any
    constant level), over the same seeded episodes.  For the fixed reward the signal comes
    only through what the predictor learned from the selected images, so the predictor
    trained under the oracle must also be better on the clean validation images.
    """
    oracle_reward, oracle_clean = _policy_run(small_synthetic, reward, "oracle", seed)
    inverse_reward, inverse_clean = _policy_run(small_synthetic, reward, "inverse", seed)
    assert oracle_reward > inverse_reward
    if reward == "fixed":
        assert oracle_clean > inverse_clean


def test_non_selective_baseline_measures_what_selection_adds(tiny_synthetic):
    """With reward_baseline="non_selective", a validation step's reward is its raw reward minus the
    same batch's reward without selection: selecting every image earns exactly 0."""
    env = make(tiny_synthetic, reward="weighted", reward_baseline="non_selective")
    env.reset(seed=0)
    for _ in range(env.train_steps):
        env.step(np.full(env.batch_size, 0.5, np.float32))
    rewards = []
    for _ in range(env.validation_steps):
        _, reward, _, _, info = env.step(np.ones(env.batch_size, np.float32))
        assert info["action_phase"] == "validation" and info["reward_ready"]
        rewards.append(reward)
    assert rewards == [0.0] * env.validation_steps
    with pytest.raises(ValueError, match="reward_baseline must be one of"):
        make(tiny_synthetic, reward_baseline="median")


@pytest.mark.parametrize("reward", ["weighted", "selective"])
@pytest.mark.parametrize("reward_baseline", ["moving_average", "non_selective", "none"])
def test_validation_steps_report_the_reward_of_each_draw_flipped(tiny_synthetic, reward, reward_baseline):
    """``info["image_rewards"][j]``: the step's reward had image ``j``'s draw been 0 or 1, the others kept,
    baselined and penalised as the reward returned; absent on training steps."""
    env = make(
        tiny_synthetic, reward=reward, reward_baseline=reward_baseline, validation_batch_size=5,
        mean_selection_bounds=(0.9, 1.0), mean_selection_penalty=0.5,
    )
    rng = np.random.default_rng(0)
    checked = 0
    for episode in range(2):  # a moving average's first reward of each batch position is 0, however drawn
        _, info = env.reset(seed=1) if episode == 0 else env.reset()
        checked += _check_image_rewards(env, info, rng, reward, reward_baseline)
    assert checked > 0
    # The scores themselves rewarded (no draws): nothing to flip.
    env = make(tiny_synthetic, reward=reward, stochastic_validation=False)
    env.reset(seed=1)
    infos = [env.step(np.full(env.batch_size, 0.5, np.float32))[-1] for _ in range(env.episode_length)]
    assert not any("image_rewards" in info for info in infos)


def _check_image_rewards(env, info, rng, reward: str, reward_baseline: str) -> int:
    """One episode of the test above; returns the validation steps where some draw mattered."""
    from iqa_env.rewards import leave_one_out_rewards

    terminated, checked = False, 0
    while not terminated:
        phase, k = info["phase"], info["episode_step"] - env.train_steps
        p = rng.uniform(0.2, 0.8, env.batch_size).astype(np.float32)
        if phase == "validation":
            losses = env._validation_losses[env._validation_positions(k)[env._batch_valid]]
            before = env.baseline.value(k)
        _, reward_, terminated, _, info = env.step(p)
        if phase == "train":
            assert "image_rewards" not in info
            continue
        valid, selection, flipped = info["valid"], info["selection"], info["image_rewards"]
        assert flipped.shape == (env.batch_size, 2) and info["penalty"] > 0
        # the draw made gives the step's reward; an image the step does not reward changes nothing
        np.testing.assert_allclose(flipped[np.arange(env.batch_size), selection.astype(int)], reward_)
        np.testing.assert_allclose(flipped[~valid], reward_)
        raw = leave_one_out_rewards(reward, losses, p[valid], env.rejection_ratio, selection[valid])
        if reward_baseline == "moving_average":
            expected = np.zeros_like(raw) if before is None else env.baseline.decay * (raw - before)
        elif reward_baseline == "non_selective":
            expected = raw + np.mean(losses)
        else:
            expected = raw
        np.testing.assert_allclose(flipped[valid], expected - info["penalty"])
        checked += int(np.any(flipped[valid, 0] != flipped[valid, 1]))
    return checked


def test_paired_baseline_rewards_a_selection_against_the_rest_of_its_batch(tiny_synthetic):
    """``reward_baseline="paired"`` (fixed reward): each training step's reward is the clean validation
    reward after a plain gradient step of ``probe_lr`` on the selected images minus that after the same
    step on the images not selected, both from the step's starting weights (recomputed here by hand);
    the probes leave no trace: the predictor trains exactly as without the pairing."""
    import copy

    import torch

    from iqa_env.networks import to_float

    kwargs = {**TINY, "reward": "fixed", "reward_metric": "loss"}
    paired = TaskAmenabilityEnv(tiny_synthetic, **kwargs, reward_baseline="paired", probe_lr=0.05)
    plain = TaskAmenabilityEnv(tiny_synthetic, **kwargs, reward_baseline="none")
    paired.reset(seed=0)
    plain.reset(seed=0)
    task = paired.task
    clean = torch.as_tensor(paired._validation_order)
    clean_images, clean_targets = to_float(paired._validation_images_t[clean]), paired._validation_targets_t[clean]

    def reward_after_probe(net: torch.nn.Module, indices: np.ndarray) -> float:
        net = copy.deepcopy(net)
        if len(indices):
            idx = torch.as_tensor(indices)
            net.train()
            loss = task.per_sample_loss(net(to_float(paired._train_images_t[idx])), paired._train_targets_t[idx])
            loss.mean().backward()
            with torch.no_grad():
                for parameter in net.parameters():
                    parameter -= 0.05 * parameter.grad
        with torch.no_grad():
            return -float(task.per_sample_loss(net.eval()(clean_images), clean_targets).double().mean())

    actions = [np.linspace(0.1, 0.9, 8), np.ones(8), np.zeros(8)]  # a mixed, a full and an empty selection
    for step, action in enumerate(actions):
        before, indices = copy.deepcopy(paired.predictor), paired._batch_indices.copy()
        _, reward, terminated, _, info = paired.step(action)
        _, _, plain_terminated, _, plain_info = plain.step(action)
        selection = info["selection"]
        assert np.array_equal(selection, plain_info["selection"])
        assert info["reward_ready"] and info["reward_scope"] == "step" and plain_info["reward_scope"] == "episode"
        on_selection = reward_after_probe(before, indices[selection])
        on_the_rest = reward_after_probe(before, indices[~selection])
        assert info["raw_reward"] == pytest.approx(on_selection, rel=1e-5)
        assert reward == pytest.approx(on_selection - on_the_rest, rel=1e-4, abs=1e-7)
        for mine, theirs in zip(paired.predictor.state_dict().values(), plain.predictor.state_dict().values()):
            assert torch.allclose(mine, theirs, atol=1e-6)
        assert terminated == plain_terminated == (step == len(actions) - 1)
    assert selection.sum() == 0  # the last step selected nothing: no real step, only the rest's probe


@pytest.mark.parametrize("probe", ["linear", "linearised"])
def test_first_order_probes_are_the_probe_steps_to_first_order(tiny_synthetic, probe):
    """``paired_probe="linear"`` and ``"linearised"``: each draw's reward is the probe steps' reward
    difference to first order in the step (``"linearised"`` keeps the loss's curvature in the outputs, a
    second-order term), from the predictor at the episode's start.  At the first step of an episode (where
    that is the current predictor) it agrees with the probe steps' rewards at a small ``probe_lr``; the
    predictor trains as with the probe steps; what is kept from the episode's start travels in
    ``state_dict`` so that a resumed env pays what the uninterrupted one pays."""
    import torch

    kwargs = {**TINY, "reward": "fixed", "reward_metric": "loss", "reward_baseline": "paired", "train_steps": 4,
              "paired_draws": 6}
    action = np.linspace(0.2, 0.8, 8)
    # Measured: the largest difference is 4 % of the largest reward at probe_lr 1e-3 and 1-2 % from 1e-4
    # down (the float32 probe steps' rounding); a wrong sign or scale would be 100 % or more.
    for probe_lr, tolerance in ((1e-4, 0.03), (1e-5, 0.03)):
        first_order = TaskAmenabilityEnv(tiny_synthetic, **kwargs, probe_lr=probe_lr, paired_probe=probe)
        stepped = TaskAmenabilityEnv(tiny_synthetic, **kwargs, probe_lr=probe_lr)
        first_order.reset(seed=0)
        stepped.reset(seed=0)
        _, reward, _, _, info = first_order.step(action)
        _, stepped_reward, _, _, stepped_info = stepped.step(action)
        assert np.array_equal(info["extra_selections"], stepped_info["extra_selections"])
        mine, theirs = np.r_[reward, info["extra_rewards"]], np.r_[stepped_reward, stepped_info["extra_rewards"]]
        assert np.abs(theirs).max() > 0
        assert np.abs(mine - theirs).max() <= tolerance * np.abs(theirs).max(), (probe_lr, mine, theirs)
        for a, b in zip(first_order.predictor.state_dict().values(), stepped.predictor.state_dict().values()):
            if probe == "linear":
                assert torch.equal(a, b)  # the real step is the same; the probes leave no trace
            else:  # the same, its gradient from the probes' per-image ones (to float rounding; see below)
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # A resumed env keeps what it took at the episode's start: the same rewards as the env that went on.
    env = TaskAmenabilityEnv(tiny_synthetic, **kwargs, paired_probe=probe)
    env.reset(seed=0)
    env.step(action)
    state = env.state_dict()
    resumed = TaskAmenabilityEnv(tiny_synthetic, **kwargs, paired_probe=probe)
    resumed.load_state_dict(state)
    for _ in range(2):
        _, reward, _, _, info = env.step(action)
        _, resumed_reward, _, _, resumed_info = resumed.step(action)
        assert reward == resumed_reward and np.array_equal(info["extra_rewards"], resumed_info["extra_rewards"])
    with pytest.raises(ValueError, match=f"paired_probe={probe!r} .* needs reward_baseline='paired' and reward_metric"):
        TaskAmenabilityEnv(tiny_synthetic, **{**kwargs, "reward_metric": "metric"}, paired_probe=probe)


@pytest.mark.parametrize("augment", [False, True])
def test_linearised_probes_give_the_real_step_its_gradient(tiny_synthetic, augment):
    """With the ``"linearised"`` probes, which take each batch image's gradient at the current weights, the
    predictor's real step takes the mean of those over the images it trains on, with no forward pass of its
    own; the weights after it are those of a step on the images themselves, to float rounding.  With
    ``predictor_augment`` the real step trains on shifted images, which the probes did not see: it takes
    them itself, and the weights are the same to the last digit."""
    import torch

    kwargs = {**TINY, "reward": "fixed", "reward_metric": "loss", "reward_baseline": "paired", "train_steps": 4,
              "paired_probe": "linearised", "training_selection_rate": 0.8, "predictor_augment": augment}
    original = TaskAmenabilityEnv._train_predictor
    forwards = {}

    def counting(self, indices, batch_positions=None):
        if self is plain:
            batch_positions = None  # the step on the images themselves
        calls = []
        handle = self.predictor.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            return original(self, indices, batch_positions)
        finally:
            handle.remove()
            forwards.setdefault(self is plain, []).append(len(calls))

    reusing, plain = make(tiny_synthetic, **kwargs), make(tiny_synthetic, **kwargs)
    action = np.linspace(0.2, 0.8, reusing.batch_size).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskAmenabilityEnv, "_train_predictor", counting)
        for env in (reusing, plain):
            env.reset(seed=0)
            env.step(action)
    assert forwards[True] == [1]
    assert forwards[False] == ([1] if augment else [0])
    assert reusing._batch_gradients is None  # taken once, by the step it was made for
    start = make(tiny_synthetic, **kwargs)
    start.reset(seed=0)
    for a, b, before in zip(reusing.predictor.parameters(), plain.predictor.parameters(), start.predictor.parameters()):
        assert float((a - before).detach().abs().max()) > 1e-4  # the step moved every tensor (Adam: about predictor_lr)
        if augment:
            assert torch.equal(a, b)
        else:
            # Float rounding.  Adam's first step divides each gradient by its own size, so a weight whose
            # gradient is near zero moves by rounding too (measured: 2.4e-6 at most, a 400th of the step).
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(reusing.optimizer.state_dict()["state"].values(), plain.optimizer.state_dict()["state"].values()):
        # The first moment is a tenth of the gradient: the same to float rounding (1e-4 of its largest value).
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=0, atol=1e-4 * float(b["exp_avg"].abs().max()))


def test_linearised_probes_keep_what_the_probe_steps_measure_at_the_default_step(tiny_synthetic):
    """At the default ``probe_lr`` (0.1) a probe step is far from its first-order term: the loss's curvature
    penalises steps on images with large gradients, which ``"linear"`` drops and ``"linearised"`` keeps.
    Over an episode after a short warm-up, the linearised rewards follow the probe steps' (measured:
    correlation 0.969, the linear ones' 0.412)."""
    kwargs = {**TINY, "reward": "fixed", "reward_metric": "loss", "reward_baseline": "paired", "train_steps": 4,
              "paired_draws": 6, "predictor_warmup_steps": 50}
    rewards = {}
    for probe in PAIRED_PROBES:
        env = TaskAmenabilityEnv(tiny_synthetic, **kwargs, paired_probe=probe)
        env.reset(seed=0)
        rng = np.random.default_rng(0)
        episode = []
        for _ in range(4):
            _, reward, _, _, info = env.step(rng.uniform(0.2, 0.8, 8))
            episode.append(np.r_[reward, info["extra_rewards"]])
        rewards[probe] = np.concatenate(episode)
    correlation = {probe: np.corrcoef(rewards[probe], rewards["step"])[0, 1] for probe in ("linear", "linearised")}
    assert correlation["linearised"] >= 0.9, correlation
    assert correlation["linearised"] >= correlation["linear"] + 0.3, correlation


def test_paired_probes_are_refused_where_they_do_not_apply(tiny_synthetic):
    kwargs = {**TINY, "reward": "fixed", "reward_metric": "loss", "reward_baseline": "paired"}
    with pytest.raises(ValueError, match="paired_probe must be one of \\('step', 'linear', 'linearised'\\), got 'exact'"):
        TaskAmenabilityEnv(tiny_synthetic, **kwargs, paired_probe="exact")
    with pytest.raises(ValueError, match="paired_probe='linearised' keeps the Jacobian .* segmentation predictor"):
        TaskAmenabilityEnv(tiny_synthetic, **kwargs, task="segmentation", paired_probe="linearised")
    TaskAmenabilityEnv(tiny_synthetic, **kwargs, task="segmentation", paired_probe="linear")  # first order: any task


def test_paired_class_correction_subtracts_the_fitted_class_term(tiny_synthetic):
    """``paired_class_correction=True``: the same seed and actions give the same selections and the same
    uncorrected rewards; each reward is the uncorrected one minus the class term fitted (by
    ``ClassMixCorrection``) on the earlier steps, and a seeded reset starts the fit afresh."""
    from iqa_env.rewards import ClassMixCorrection, class_mix_contrast

    kwargs = {**TINY, "reward": "fixed", "reward_baseline": "paired", "train_steps": 4}
    corrected = TaskAmenabilityEnv(tiny_synthetic, **kwargs, paired_class_correction=True)
    plain = TaskAmenabilityEnv(tiny_synthetic, **kwargs)
    reference = ClassMixCorrection(len(tiny_synthetic.class_names))
    rng = np.random.default_rng(1)
    differences = []
    for episode in range(3):
        for env in (corrected, plain):
            env.reset(seed=0 if episode == 0 else None)
        terminated = False
        while not terminated:
            action = rng.uniform(0.2, 0.8, 8)
            _, reward, terminated, _, info = corrected.step(action)
            _, plain_reward, _, _, plain_info = plain.step(action)
            assert np.array_equal(info["selection"], plain_info["selection"])
            contrast = class_mix_contrast(info["selection"], info["classes"], reference.num_classes)
            assert reward == pytest.approx(reference.correct(plain_reward, contrast), abs=1e-9)
            differences.append(reward - plain_reward)
    assert any(abs(d) > 1e-6 for d in differences)  # the correction did act
    corrected.reset(seed=0)
    assert corrected.class_correction.fitted == 0
    with pytest.raises(ValueError, match="paired_class_correction .* needs reward_baseline='paired'"):
        TaskAmenabilityEnv(tiny_synthetic, **{**TINY, "reward": "fixed"}, paired_class_correction=True)


def test_paired_class_correction_per_step_fits_the_steps_own_draws(tiny_synthetic):
    """``paired_class_correction="step"``: the same seed and actions as without the correction give the
    same selections and uncorrected rewards (the step's and the further draws'); the rewards are those
    less the class term fitted on that step's draws (``ClassMixCorrection.correct_step``)."""
    from iqa_env.rewards import ClassMixCorrection, class_mix_contrast

    kwargs = {**TINY, "reward": "fixed", "reward_baseline": "paired", "train_steps": 4, "paired_draws": 4}
    corrected = TaskAmenabilityEnv(tiny_synthetic, **kwargs, paired_class_correction="step")
    plain = TaskAmenabilityEnv(tiny_synthetic, **kwargs)
    reference = ClassMixCorrection(len(tiny_synthetic.class_names))
    rng = np.random.default_rng(1)
    for env in (corrected, plain):
        env.reset(seed=0)
    acted = 0
    for _ in range(4):
        action = rng.uniform(0.2, 0.8, 8)
        _, reward, _, _, info = corrected.step(action)
        _, plain_reward, _, _, plain_info = plain.step(action)
        draws = np.concatenate([info["selection"][None], info["extra_selections"]])
        assert np.array_equal(draws[1:], plain_info["extra_selections"])
        contrasts = [class_mix_contrast(d, info["classes"], reference.num_classes) for d in draws]
        expected = reference.correct_step(np.r_[plain_reward, plain_info["extra_rewards"]], contrasts)
        assert np.r_[reward, info["extra_rewards"]] == pytest.approx(expected, abs=1e-9)
        acted += not np.allclose(expected, np.r_[plain_reward, plain_info["extra_rewards"]])
    assert acted > 0  # the correction did act
    with pytest.raises(ValueError, match="with 2 classes it needs paired_draws >= 3, got paired_draws=2"):
        TaskAmenabilityEnv(tiny_synthetic, **{**kwargs, "paired_draws": 2}, paired_class_correction="step")
    with pytest.raises(ValueError, match=r"must be False, True \(= 'history'\) or one of \('history', 'step'\), got 'steps'"):
        TaskAmenabilityEnv(tiny_synthetic, **kwargs, paired_class_correction="steps")


def test_paired_draws_probe_further_selections_from_the_same_weights(tiny_synthetic):
    """``paired_draws=3``: the step's own draw, reward and training are those of ``paired_draws=1``; the two
    further draws come from the same probabilities, and each further reward is what a step with exactly that
    selection would have been paid, from the same starting weights (an env given the selection as 0/1
    probabilities draws it exactly)."""
    import torch

    kwargs = {**TINY, "reward": "fixed", "reward_baseline": "paired", "train_steps": 4}
    drawing = TaskAmenabilityEnv(tiny_synthetic, **kwargs, paired_draws=3)
    single, replay = TaskAmenabilityEnv(tiny_synthetic, **kwargs), TaskAmenabilityEnv(tiny_synthetic, **kwargs)
    for env in (drawing, single, replay):
        env.reset(seed=0)
    action = np.linspace(0.1, 0.9, 8)
    _, reward, _, _, info = drawing.step(action)
    _, single_reward, _, _, single_info = single.step(action)
    assert np.array_equal(info["selection"], single_info["selection"]) and reward == single_reward
    for mine, theirs in zip(drawing.predictor.state_dict().values(), single.predictor.state_dict().values()):
        assert torch.equal(mine, theirs)  # the predictor trained on the first draw only
    extra, extra_rewards = info["extra_selections"], info["extra_rewards"]
    assert extra.shape == (2, 8) and extra.dtype == bool and extra_rewards.shape == (2,)
    assert not all(np.array_equal(e, info["selection"]) for e in extra)
    for drawn, paid in zip(extra, extra_rewards):
        replay.reset(seed=0)
        _, replayed, _, _, replay_info = replay.step(drawn.astype(np.float64))
        assert np.array_equal(replay_info["selection"], drawn)
        assert paid == pytest.approx(replayed + replay_info["penalty"] - info["penalty"], abs=1e-9)
    assert "extra_selections" not in single_info
    # Further draws follow the probabilities: none where p = 0, all where p = 1.
    _, _, _, _, info = drawing.step(np.r_[np.zeros(4), np.ones(4)])
    assert not info["extra_selections"][:, :4].any() and info["extra_selections"][:, 4:].all()
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="paired_draws must be a whole number >= 1, got"):
            TaskAmenabilityEnv(tiny_synthetic, **kwargs, paired_draws=bad)
    with pytest.raises(ValueError, match="paired_draws probes .* needs reward_baseline='paired'"):
        TaskAmenabilityEnv(tiny_synthetic, **{**TINY, "reward": "fixed"}, paired_draws=2)


@pytest.mark.parametrize("reward", ["weighted", "selective"])
def test_class_log_normalisation_is_what_the_rewards_use(tiny_synthetic, reward):
    """``reward_normalisation="class_log"``: the validation phase's losses are log-losses centred per class,
    and the rewards are computed from them (same seed, same actions: only the normalisation differs)."""
    from iqa_env.rewards import class_log_losses

    runs = {}
    for normalisation in ("none", "class_log"):
        env = TaskAmenabilityEnv(
            tiny_synthetic,
            **{**TINY, "reward": reward, "reward_metric": "loss", "reward_normalisation": normalisation},
        )
        env.reset(seed=0)
        for _ in range(env.train_steps):
            env.step(np.ones(8))
        losses = env._validation_losses.copy()
        _, _, _, _, info = env.step(np.linspace(0.05, 0.95, 8))
        runs[normalisation] = losses, info["raw_reward"], env
    (plain, plain_raw, env), (normalised, normalised_raw, _) = runs["none"], runs["class_log"]
    classes = env.validation_set.labels[env._validation_order]
    assert len(np.unique(classes)) == 2
    assert normalised == pytest.approx(class_log_losses(plain, classes))
    for c in (0, 1):
        assert normalised[classes == c].mean() == pytest.approx(0.0, abs=1e-9)
    assert normalised_raw != pytest.approx(plain_raw)


@pytest.mark.parametrize("task", TASKS)
def test_predictor_max_grad_norm_clips_what_the_optimiser_steps_on(tiny_synthetic, task):
    """Each predictor update's gradient reaches Adam with its norm at most ``predictor_max_grad_norm``; without
    the option it reaches it whole.  The clip is recorded in the env's settings."""
    import torch

    norms: dict[str | None, list[float]] = {}
    for limit in (None, 1e-3):
        env = TaskAmenabilityEnv(tiny_synthetic, **{**TINY, "task": task, "predictor_max_grad_norm": limit})
        env.reset(seed=0)
        step, seen = env.optimizer.step, norms.setdefault(limit, [])

        def recording_step(*args, **kwargs):
            grads = [p.grad.flatten() for p in env.predictor.parameters() if p.grad is not None]
            seen.append(float(torch.cat(grads).norm()))
            return step(*args, **kwargs)

        env.optimizer.step = recording_step
        for _ in range(3):  # the episode's training steps, every image selected
            env.step(np.ones(8))
        assert ("predictor_max_grad_norm" in env._state_settings()) == (limit is not None)
    assert len(norms[None]) == len(norms[1e-3]) == 3
    assert norms[None][0] > 1e-2  # the first gradients are the same; unclipped, it is far above the limit
    assert max(norms[1e-3]) <= 1e-3 * (1 + 1e-4)


def test_predictor_average_is_what_the_rewards_and_evaluate_use(tiny_synthetic):
    """``predictor_average``: a warm-started moving average of the weights, updated at every predictor step."""
    import torch

    env = TaskAmenabilityEnv(tiny_synthetic, **{**TINY, "predictor_average": 0.9, "reward_metric": "loss"})
    env.reset(seed=0)
    expected = [p.detach().clone() for p in env.predictor.parameters()]
    for n in range(1, 4):  # the episode's three training steps, every image selected
        env.step(np.ones(8))
        decay = min(0.9, (1 + n) / (10 + n))
        expected = [e.lerp(p.detach(), 1 - decay) for e, p in zip(expected, env.predictor.parameters())]
    for average, e, p in zip(env.averaged_predictor.parameters(), expected, env.predictor.parameters()):
        assert torch.allclose(average, e, atol=1e-6)
    assert any(not torch.equal(a, p) for a, p in zip(env.averaged_predictor.parameters(), env.predictor.parameters()))
    assert env.evaluated_predictor is env.averaged_predictor

    # The validation losses of the rewards and evaluate() are the average's, not the trained weights'.
    images = torch.as_tensor(env.validation_set.images[env._validation_order])
    targets = torch.as_tensor(env.task.targets(env.validation_set)[env._validation_order])
    with torch.no_grad():
        from iqa_env.networks import to_float

        by = {name: env.task.per_sample_loss(net.eval()(to_float(images)), targets).double().numpy()
              for name, net in (("average", env.averaged_predictor), ("weights", env.predictor))}
    assert np.allclose(env._validation_losses, by["average"], atol=1e-5)
    assert not np.allclose(by["average"], by["weights"], atol=1e-5)
    assert np.allclose(env.evaluate(env.validation_set)["loss"][env._validation_order], by["average"], atol=1e-5)

    plain = TaskAmenabilityEnv(tiny_synthetic, **TINY)
    plain.reset(seed=0)
    assert plain.averaged_predictor is None and plain.evaluated_predictor is plain.predictor


def _run(env: TaskAmenabilityEnv, steps: int = 7) -> tuple[list[np.ndarray], list[float], dict]:
    """Observations and rewards of ``steps`` steps with fixed actions from ``reset(seed=1)``; the predictor's weights."""
    observations, rewards = [env.reset(seed=1)[0]], []
    actions = np.random.default_rng(0).random((steps, env.batch_size))
    for action in actions:
        obs, reward, terminated, _, _ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        if terminated:
            observations.append(env.reset()[0])
    return observations, rewards, {k: v.clone() for k, v in env.predictor.state_dict().items()}


def _same(a, b) -> bool:
    import torch

    return (
        all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
        and a[1] == b[1]
        and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    )


def test_a_kept_warm_up_is_loaded_by_an_env_that_would_compute_the_same_one(tiny_synthetic, tmp_path, caplog):
    """``warmup_cache``: an env whose warm-up would start from the same state (another reward) loads the kept
    one, and from then on does exactly what it would have done warming up itself; other settings do not."""
    warm = {"predictor_warmup_steps": 12, "predictor_augment": True}
    cache = tmp_path / "warmup"
    with caplog.at_level("INFO", logger="iqa_env.env"):
        weighted = _run(make(tiny_synthetic, reward="weighted", warmup_cache=cache, **warm))
        kept = sorted(cache.iterdir())
        assert len(kept) == 1 and "loaded" not in caplog.text
        selective = _run(make(tiny_synthetic, reward="selective", warmup_cache=str(cache), **warm))
        assert "predictor warm-up of 12 updates loaded" in caplog.text and sorted(cache.iterdir()) == kept
    assert _same(selective, _run(make(tiny_synthetic, reward="selective", **warm)))
    assert _same(weighted, _run(make(tiny_synthetic, reward="weighted", **warm)))
    assert not _same(weighted, _run(make(tiny_synthetic, reward="weighted", **{**warm, "predictor_warmup_steps": 0})))

    # What the warm-up depends on makes another key: nothing kept is loaded, a file is added.
    for other in ({"predictor_lr": 3e-3}, {"predictor_warmup_steps": 11}, {"batch_size": 6}):
        caplog.clear()
        with caplog.at_level("INFO", logger="iqa_env.env"):
            env = make(tiny_synthetic, warmup_cache=cache, **{**warm, **other})
            env.reset(seed=1)
        assert "loaded" not in caplog.text, other
    env.reset(seed=2)
    assert len(list(cache.iterdir())) == 5
    # Code that would train otherwise (an edited source file) is another key too.
    edited = make(tiny_synthetic, reward="selective", warmup_cache=cache, **warm)
    edited._code_digest = lambda: "an edited env.py"
    caplog.clear()
    with caplog.at_level("INFO", logger="iqa_env.env"):
        edited.reset(seed=1)
    assert "loaded" not in caplog.text and len(list(cache.iterdir())) == 6


def test_an_unreadable_kept_warm_up_is_computed_again_with_the_same_result(tiny_synthetic, tmp_path, caplog):
    warm = {"predictor_warmup_steps": 12}
    cache = tmp_path / "warmup"
    first = _run(make(tiny_synthetic, warmup_cache=cache, **warm))
    (kept,) = cache.iterdir()
    good = kept.read_bytes()
    kept.write_bytes(good[: len(good) // 2])  # a copy cut short
    with caplog.at_level("WARNING", logger="iqa_env.env"):
        again = _run(make(tiny_synthetic, warmup_cache=cache, **warm))
    assert "could not be read" in caplog.text and kept.name in caplog.text
    assert _same(first, again)
    assert kept.read_bytes() != good[: len(good) // 2]  # written again whole
    caplog.clear()
    with caplog.at_level("INFO", logger="iqa_env.env"):
        assert _same(first, _run(make(tiny_synthetic, warmup_cache=cache, **warm)))
    assert "loaded" in caplog.text

    with pytest.raises(ValueError, match="warmup_cache must be None or a folder path, got int"):
        make(tiny_synthetic, warmup_cache=3)
    # A file where the folder (or one above it) would be: refused when the env is made, not after a warm-up.
    for where in (kept, kept / "sub"):
        with pytest.raises(ValueError, match=f"warmup_cache must be a folder .*: {re.escape(str(kept))} is a file, not a folder"):
            make(tiny_synthetic, warmup_cache=where, **warm)
