"""Agents: per-sample policies, every algorithm's learn(), the Controller product."""

from __future__ import annotations

import json
import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents import ALGORITHMS, Controller, ProbabilityOUNoise, make_agent
from agents.policies import PerSampleActorCriticPolicy
from iqa_env.env import TaskAmenabilityEnv
from tests.conftest import random_dataset

TINY = dict(batch_size=8, train_steps=3, validation_size=16, device="cpu")


@pytest.fixture(scope="module")
def dataset():
    return random_dataset(n=240, size=16)


def _env(dataset, **kwargs) -> TaskAmenabilityEnv:
    return TaskAmenabilityEnv(dataset, **{**TINY, **kwargs})


def _probabilities(agent, obs: torch.Tensor) -> torch.Tensor:
    """The policy's selection probabilities for a stack of observations, in [0, 1]."""
    policy = agent.policy
    with torch.no_grad():
        if isinstance(policy, PerSampleActorCriticPolicy):
            return policy.get_distribution(obs).distribution.mean.clamp(0, 1)
        if hasattr(policy, "actor"):
            return (policy.actor(obs) + 1) / 2  # DDPG/TD3 tanh output, or SAC's squashed mean
        return policy(obs)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_runs_learn_for_a_few_hundred_steps_and_updates_its_controller(dataset, name):
    """A smoke test of each algorithm's ``learn()``; what they learn is tests/test_learning*.py's."""
    env = _env(dataset)
    agent = make_agent(name, env, seed=0)
    before = Controller.from_agent(agent).score(dataset.images[:20])
    agent.learn(200)
    assert agent.num_timesteps >= 200  # on-policy algorithms finish their last rollout
    scores = Controller.from_agent(agent).score(dataset.images[:20])
    assert scores.shape == (20,) and np.all((scores >= 0) & (scores <= 1))
    # Its updates reached the controller: the same images score differently.
    assert np.abs(scores - before).max() > 1e-4


def test_learn_without_tensorboard_leaves_no_folder_in_the_temporary_folder(dataset, tmp_path, monkeypatch, capsys):
    """stable-baselines3's ``learn()`` without ``tensorboard_log`` makes an empty ``SB3-<date-time>`` folder
    in the system's temporary folder on every call; an agent of ``make_agent`` logs without one,
    printing SB3's table with ``verbose=1`` as before.  With ``tensorboard_log`` the logs still go there."""
    import tempfile

    from stable_baselines3 import PPO

    temporary = tmp_path / "temporary"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    env = _env(dataset)
    make_agent("reinforce", env, seed=0).learn(10)
    make_agent("ddpg", env, seed=0).learn(10)
    capsys.readouterr()
    make_agent("ppo", env, seed=0, verbose=1).learn(10)
    assert "total_timesteps" in capsys.readouterr().out

    def sb3_folders() -> list[str]:
        return [p.name for p in temporary.iterdir() if p.name.startswith("SB3-")]  # torch may keep its own there

    assert sb3_folders() == []
    # stable-baselines3's own agent does make one: what the test guards against is there to be seen.
    PPO("MlpPolicy", gym.make("Pendulum-v1"), n_steps=16, batch_size=16, device="cpu").learn(16)
    assert len(sb3_folders()) == 1
    make_agent("reinforce", env, seed=0, tensorboard_log=str(tmp_path / "tb")).learn(10)
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_actor_is_equivariant_and_controller_matches_it(dataset, name):
    env = _env(dataset)
    agent = make_agent(name, env, seed=0)
    if name == "sac":  # SAC's deterministic action is the squashed mean: compare that
        agent.policy.actor.forward = lambda obs, deterministic=True, _f=agent.policy.actor.forward: _f(obs, True)
    obs = torch.as_tensor(dataset.images[:16].reshape(2, 8, 1, 16, 16)).float()
    perm = torch.randperm(8)
    p = _probabilities(agent, obs)
    p_perm = _probabilities(agent, obs[:, perm])
    torch.testing.assert_close(p[:, perm], p_perm, atol=1e-5, rtol=1e-5)
    scores = Controller.from_agent(agent).score(dataset.images[:16])
    if name in ("reinforce", "ddpg", "td3"):
        # These policies centre their logits on the batch (REINFORCE always, DDPG/TD3 by default
        # on envs with validation rewards): the controller's per-image logits differ from the
        # policy's by one constant per batch (the same ranking).
        diff = torch.logit(torch.as_tensor(scores).reshape(2, 8)) - torch.logit(p)
        torch.testing.assert_close(diff, diff[:, :1].expand(2, 8), atol=1e-4, rtol=1e-4)
    else:
        np.testing.assert_allclose(scores, p.reshape(-1).numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["ddpg", "td3", "sac"])
def test_critic_is_permutation_invariant(dataset, name):
    env = _env(dataset)
    agent = make_agent(name, env, seed=0)
    obs = torch.as_tensor(dataset.images[:16].reshape(2, 8, 1, 16, 16)).float()
    actions = torch.rand(2, 8) * 2 - 1
    perm = torch.randperm(8)
    with torch.no_grad():
        q = agent.policy.critic(obs, actions)[0]
        q_perm = agent.policy.critic(obs[:, perm], actions[:, perm])[0]
    torch.testing.assert_close(q, q_perm, atol=1e-5, rtol=1e-5)
    # And it is not blind to which image got which action.
    swapped = actions.clone()
    swapped[:, [0, 1]] = actions[:, [1, 0]]
    with torch.no_grad():
        assert not torch.allclose(q, agent.policy.critic(obs, swapped)[0])


def test_policy_kwargs_are_not_shared_between_models(dataset):
    kwargs = {"features_extractor_kwargs": {"embed_dim": 32}}
    make_agent("ddpg", _env(dataset), seed=0, policy_kwargs=kwargs)
    make_agent("td3", _env(dataset), seed=0, policy_kwargs=kwargs)
    assert kwargs == {"features_extractor_kwargs": {"embed_dim": 32}}


def test_a_learning_rate_schedule_given_as_json_decays_over_the_run_and_bad_ones_are_refused(dataset):
    env = _env(dataset)

    class Rates(BaseCallback):  # the optimiser's rate as each rollout starts, i.e. after the previous update
        def __init__(self) -> None:
            super().__init__()
            self.rates: list[float] = []

        def _on_rollout_start(self) -> None:
            self.rates.append(self.model.policy.optimizer.param_groups[0]["lr"])

        def _on_step(self) -> bool:
            return True

    agent = make_agent("reinforce", env, seed=0, learning_rate={"start": 1e-3, "end": 1e-4})
    episode = env.unwrapped.episode_length
    rates = Rates()
    agent.learn(4 * episode, callback=rates)  # one rollout and one policy update per episode
    line = [1e-3 + done * (1e-4 - 1e-3) for done in (0.0, 0.25, 0.5, 0.75)]
    assert rates.rates == pytest.approx(line)
    assert agent.policy.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    rates = Rates()  # a resumed run goes on along one line over the whole run (8 episodes)
    agent = make_agent("reinforce", env, seed=0, learning_rate={"start": 1e-3, "end": 1e-4})
    agent.learn(4 * episode)
    agent.learn(4 * episode, callback=rates, reset_num_timesteps=False)
    assert rates.rates[1:] == pytest.approx([1e-3 + done / 8 * (1e-4 - 1e-3) for done in (5, 6, 7)])
    assert make_agent("reinforce", env, seed=0, learning_rate=5e-4).lr_schedule(0.3) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match=r'keys "start" and "end" \(a linear schedule\), got \[\'begin\', \'end\'\]'):
        make_agent("reinforce", env, seed=0, learning_rate={"begin": 1e-3, "end": 1e-4})
    with pytest.raises(ValueError, match=r"learning_rate\['end'\] must be a positive finite number, got nan"):
        make_agent("ppo", env, seed=0, learning_rate={"start": 1e-3, "end": float("nan")})


def test_unknown_algorithm_is_a_clear_error(dataset):
    with pytest.raises(ValueError, match="algorithm must be one of"):
        make_agent("dqn", _env(dataset))


def test_ou_noise_explores_in_probability_units_from_the_first_step():
    noise = ProbabilityOUNoise(64, sigma=0.2, theta=0.15, seed=0)
    first_steps = []
    for _ in range(200):
        noise.reset()
        first_steps.append(noise())
    first = np.concatenate(first_steps) / 2.0  # back to probability units
    # Stationary from the first step: st.d. 0.2 probability units (SB3's scaled space is 2x).
    assert abs(first.std() - 0.2) < 0.01
    noise.reset()
    long_run = np.concatenate([noise() for _ in range(2000)]) / 2.0
    assert abs(long_run.std() - 0.2) < 0.01
    # Mean reversion: the lag-1 autocorrelation is 1 - theta.
    noise.reset()
    series = np.stack([noise()[0] for _ in range(20000)])
    assert abs(np.corrcoef(series[:-1], series[1:])[0, 1] - 0.85) < 0.02


def test_ddpg_actions_do_not_saturate(dataset):
    """The saturation guard keeps DDPG's actor logits in the range where they still get gradients.

    The same run without it saturates: on seed 0, 22 % of these actions at 0 or 1 after 300 steps
    (36 % on seed 1), against none with the default guard.
    """
    obs = torch.as_tensor(dataset.images[:64].reshape(8, 8, 1, 16, 16)).float()
    saturated = {}
    for penalty in (None, 0.0):
        kwargs = {} if penalty is None else {"policy_kwargs": {"saturation_penalty": penalty}}
        agent = make_agent("ddpg", _env(dataset), seed=0, learning_starts=20, **kwargs)
        agent.learn(300)
        p = _probabilities(agent, obs)
        saturated[penalty] = float(((p < 0.005) | (p > 0.995)).float().mean())
    assert saturated[None] < 0.05 and saturated[0.0] > 0.1, saturated


@pytest.mark.parametrize("name", ["ddpg", "td3"])
@pytest.mark.parametrize("gamma", [0.0, 0.9])
def test_ddpg_and_td3_skip_the_target_networks_only_when_the_target_ignores_them(dataset, monkeypatch, name, gamma):
    """With gamma = 0 the target networks are not run, and the update is stable-baselines3's, bit for bit."""
    import stable_baselines3
    from stable_baselines3.common.logger import Logger

    from agents import factory

    def build(sb3_class: bool):
        if sb3_class:
            monkeypatch.setitem(factory._CLASSES, name, (getattr(stable_baselines3, name.upper()), factory._CLASSES[name][1]))
        agent = make_agent(name, _env(dataset), seed=0, gamma=gamma, learning_starts=0)
        monkeypatch.undo()
        calls = []
        for target in (agent.policy.actor_target, agent.policy.critic_target):
            target.register_forward_hook(lambda *_: calls.append(1))
        return agent, calls

    (ours, our_calls), (sb3, sb3_calls) = build(False), build(True)
    assert type(ours).__module__ == "agents.deterministic" and type(sb3).__module__.startswith("stable_baselines3")
    rng = np.random.default_rng(0)
    for _ in range(12):
        obs = rng.integers(0, 256, size=(1, 8, 1, 16, 16), dtype=np.uint8)
        next_obs = rng.integers(0, 256, size=(1, 8, 1, 16, 16), dtype=np.uint8)
        action = rng.uniform(-1, 1, size=(1, 8)).astype(np.float32)
        reward, done = rng.normal(size=1).astype(np.float32), np.zeros(1, dtype=np.float32)
        for agent in (ours, sb3):
            agent.replay_buffer.add(obs, next_obs, action, reward, done, [{"reward_ready": True}])
    for agent in (ours, sb3):
        agent.set_logger(Logger(None, []))  # no SB3-<time> folder in the temporary folder
        np.random.seed(1)  # the replay buffer's draws
        torch.manual_seed(1)  # the target-policy noise
        agent.train(gradient_steps=3, batch_size=4)
    for (key, a), b in zip(ours.policy.state_dict().items(), sb3.policy.state_dict().values()):
        assert torch.equal(a, b), key
    assert len(sb3_calls) == 6  # target actor and target critic, 3 gradient steps
    assert len(our_calls) == (0 if gamma == 0.0 else 6)


@pytest.mark.parametrize("index_buffer", [False, True])
def test_class_label_buffers_sample_the_labels_of_the_sampled_transitions(tmp_path, index_buffer):
    """The labels come back with their own transitions (n_envs = 2), only stored ones are kept, and a checkpoint keeps them."""
    from gymnasium import spaces

    from agents.buffers import RewardReadyClassLabelsIndexReplayBuffer, RewardReadyClassLabelsReplayBuffer
    from experiments import checkpoint as ckpt

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (40, 1, 6, 6), dtype=np.uint8)
    obs_space = spaces.Box(0, 255, (4, 1, 6, 6), np.uint8)
    act_space = spaces.Box(-1.0, 1.0, (4,), np.float32)

    def make():
        if index_buffer:
            return RewardReadyClassLabelsIndexReplayBuffer(20, obs_space, act_space, "cpu", n_envs=2, images=pool)
        return RewardReadyClassLabelsReplayBuffer(20, obs_space, act_space, "cpu", n_envs=2)

    buffer = make()
    stored = 0
    for t in range(16):
        ready = t % 2 == 0
        obs, nxt = pool[rng.integers(0, 40, (2, 4))], pool[rng.integers(0, 40, (2, 4))]
        tag = np.array([[t, t], [t + 100, t + 100]], dtype=np.float32)  # the transition, in its first action entries
        actions = np.concatenate([tag / 1000, np.zeros((2, 2), np.float32)], axis=1)
        infos = [
            {"reward_ready": ready, "classes": np.array([t, t + 1, 0, 1]) + 100 * e, "valid": np.array([1, 1, 1, e == 0], bool)}
            for e in range(2)
        ]
        buffer.add(obs, nxt, actions, np.zeros(2), np.zeros(2), infos)
        stored += ready
    assert buffer.pos == stored == 8
    np.random.seed(3)
    sample = buffer.sample(64)
    tags = np.rint(sample.actions[:, 0].numpy() * 1000).astype(int)
    assert set(tags) >= {0, 114} and all(t % 2 == 0 or t >= 100 for t in tags)  # both envs; only stored steps
    assert np.array_equal(sample.classes[:, 0].numpy(), tags)
    assert np.array_equal(sample.classes[:, 1].numpy(), tags + 1)
    assert np.array_equal(sample.valid[:, 3].numpy(), tags < 100)
    assert buffer.last_samples is sample

    path = tmp_path / "buffer.npz"
    ckpt.save_replay_buffer(buffer, path, ckpt.ImagePool(pool))
    loaded = make()
    ckpt.load_replay_buffer(loaded, path, ckpt.ImagePool(pool))
    assert np.array_equal(loaded.classes, buffer.classes) and np.array_equal(loaded.valid, buffer.valid)

    with pytest.raises(ValueError, match=r"info\['classes'\].*envs \[1\]"):
        buffer.add(obs, nxt, actions, np.zeros(2), np.zeros(2), [{**infos[0], "reward_ready": True}, {"reward_ready": True}])


def _class_separation(agent, obs: torch.Tensor, classes: torch.Tensor) -> float:
    from agents.policies import action_logits
    from agents.reinforce import between_class_variance

    with torch.no_grad():
        logits = action_logits(agent.policy.actor(obs))
    return float(between_class_variance(logits, classes, torch.ones_like(classes, dtype=torch.bool)).mean())


@pytest.mark.parametrize("name", ["ddpg", "td3"])
def test_ddpg_class_balance_pulls_the_classes_scores_together_and_leaves_the_critic_alone(dataset, tmp_path, name):
    """``class_balance``: the actor's loss penalises the class separation of its logits, and nothing else changes."""
    from stable_baselines3.common.logger import Logger

    from agents.deterministic import _ClassBalancedCritic

    # Class 1 images bright, class 0 dark: a random actor separates the classes by brightness.
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 2, (12, 8))
    images = np.where(classes[..., None, None, None] == 1, 200, 40) + rng.integers(0, 50, (12, 8, 1, 16, 16))
    images = images.astype(np.uint8)

    def separating(agent):  # a larger actor head: the initial logits differ by brightness, so by class
        with torch.no_grad():
            agent.policy.actor.mu.linear.weight.mul_(100.0)
        return agent

    def trained(class_balance: float, labels: np.ndarray):
        agent = separating(make_agent(name, _env(dataset), seed=0, learning_starts=0, class_balance=class_balance,
                                      policy_kwargs={"saturation_penalty": 0.0}))
        actions = np.random.default_rng(1).uniform(-1, 1, size=(12, 1, 8)).astype(np.float32)
        for i, action in enumerate(actions):
            info = {"reward_ready": True, "classes": labels[i], "valid": np.ones(8, bool)}
            agent.replay_buffer.add(images[i : i + 1], images[i : i + 1], action, np.zeros(1, np.float32),
                                    np.zeros(1, np.float32), [info])
        agent.set_logger(Logger(None, []))  # no SB3-<time> folder in the temporary folder
        np.random.seed(1)
        torch.manual_seed(1)
        agent.train(gradient_steps=30, batch_size=4)
        return agent

    obs, labels = torch.as_tensor(images).float(), torch.as_tensor(classes)
    before = _class_separation(separating(make_agent(name, _env(dataset), seed=0)), obs, labels)
    with_penalty, without = trained(100.0, classes), trained(0.0, classes)
    assert isinstance(with_penalty.critic, _ClassBalancedCritic) and not isinstance(without.critic, _ClassBalancedCritic)
    assert before > 0.05  # the classes start apart
    separation, plain = _class_separation(with_penalty, obs, labels), _class_separation(without, obs, labels)
    assert separation < 0.2 * before and separation < 0.2 * plain, (before, separation, plain)

    # The critic's update does not involve the actor here (gamma = 0): through the wrapper it is the same, bit for bit.
    for (key, a), b in zip(with_penalty.policy.critic.state_dict().items(), without.policy.critic.state_dict().values()):
        assert torch.equal(a, b), key

    with_penalty.save(tmp_path / name)
    loaded = type(with_penalty).load(tmp_path / name, device="cpu")
    assert loaded.class_balance == 100.0 and isinstance(loaded.critic, _ClassBalancedCritic)


def test_ddpg_class_balance_trains_on_the_env_and_refuses_bad_settings(dataset):
    from stable_baselines3.common.buffers import DictReplayBuffer

    from agents.buffers import RewardReadyClassLabelsReplayBuffer

    agent = make_agent("ddpg", _env(dataset), seed=0, class_balance=1.0)
    assert type(agent.replay_buffer) is RewardReadyClassLabelsReplayBuffer  # the default buffer's variant
    agent.learn(120)
    assert agent.replay_buffer.last_samples is not None and agent.replay_buffer.pos > 0
    for bad in (-1.0, float("nan"), True, "1", None):
        with pytest.raises(ValueError, match="class_balance must be a finite number >= 0"):
            make_agent("ddpg", _env(dataset), seed=0, class_balance=bad)
    with pytest.raises(ValueError, match="class_balance > 0 needs a replay buffer that keeps"):
        make_agent("ddpg", _env(dataset), seed=0, class_balance=1.0, replay_buffer_class=DictReplayBuffer)


@pytest.mark.parametrize("name", ["ddpg", "td3"])
def test_store_selections_keeps_the_draws_that_the_rewards_measured(dataset, tmp_path, name):
    """``store_selections``: a step whose reward measures the env's Bernoulli draws is stored with the draws
    (1 selected, -1 not, in the scaled action space), one whose reward measures the probabilities themselves
    (weighted reward, deterministic validation) with the probabilities, as without the option."""
    from stable_baselines3.common.buffers import ReplayBuffer

    env = _env(dataset, reward="weighted", stochastic_validation=False)
    kwargs = dict(seed=0, learning_starts=100, replay_buffer_class=ReplayBuffer, gamma=0.0)
    agent = make_agent(name, env, store_selections=True, **kwargs)
    infos = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            infos.append(self.locals["infos"][0])
            return True

    agent.learn(2 * env.episode_length, callback=Record())
    stored = agent.replay_buffer.actions[: agent.replay_buffer.pos, 0]
    assert len(stored) == len(infos) == 2 * env.episode_length
    phases = {info["rewarded_action"] for info in infos}
    assert phases == {"selection", "probabilities"}
    for action, info in zip(stored, infos):
        if info["rewarded_action"] == "selection":
            np.testing.assert_array_equal(action, np.where(info["selection"], 1.0, -1.0))
        else:
            assert not np.all(np.isin(action, (-1.0, 1.0)))  # the probabilities, scaled
    plain = make_agent(name, _env(dataset, reward="weighted", stochastic_validation=False), **kwargs)
    plain.learn(2 * env.episode_length)
    stored_plain = plain.replay_buffer.actions[: plain.replay_buffer.pos, 0]
    kept = np.array([info["rewarded_action"] == "probabilities" for info in infos])
    np.testing.assert_allclose(stored_plain[kept], stored[kept])  # the same run, the same probabilities
    assert not np.allclose(stored_plain[~kept], stored[~kept])
    agent.save(tmp_path / name)
    assert type(agent).load(tmp_path / name, device="cpu").store_selections is True
    with pytest.raises(TypeError, match="store_selections must be True or False, got str"):
        make_agent(name, env, seed=0, store_selections="yes")

    class Silent(gym.Wrapper):  # an env that does not say what its rewards measure
        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, reward, terminated, truncated, {k: v for k, v in info.items() if k != "rewarded_action"}

    silent = make_agent(name, Silent(_env(dataset, reward="fixed")), store_selections=True, **kwargs)
    with pytest.raises(ValueError, match=r"store_selections needs the env to report each step's Bernoulli draws"):
        silent.learn(4)


def test_store_selections_keeps_every_further_draw_of_a_step_as_its_own_transition(dataset):
    """With the env's ``paired_draws=3`` each step is stored three times, with the same observations: its own
    draw with its reward, then each further draw with the reward the env measured for it."""
    from stable_baselines3.common.buffers import ReplayBuffer

    env = _env(dataset, reward="fixed", reward_baseline="paired", paired_draws=3)
    agent = make_agent("ddpg", env, seed=0, learning_starts=10, replay_buffer_class=ReplayBuffer, gamma=0.0,
                       store_selections=True)
    infos, rewards = [], []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            infos.append(self.locals["infos"][0])
            rewards.append(float(self.locals["rewards"][0]))
            return True

    agent.learn(12, callback=Record())
    buffer = agent.replay_buffer
    assert buffer.pos == 3 * len(infos) == 36
    actions, stored_rewards = buffer.actions[: buffer.pos, 0], buffer.rewards[: buffer.pos, 0]
    observations = buffer.observations[: buffer.pos, 0]
    for k, (info, reward) in enumerate(zip(infos, rewards)):
        draws = [info["selection"], *info["extra_selections"]]
        paid = [reward, *info["extra_rewards"]]
        for j in range(3):
            np.testing.assert_array_equal(actions[3 * k + j], np.where(draws[j], 1.0, -1.0))
            assert stored_rewards[3 * k + j] == pytest.approx(paid[j], rel=1e-6, abs=1e-9)
            np.testing.assert_array_equal(observations[3 * k + j], observations[3 * k])
    # Without store_selections (on by default on this env, agents.factory.PAIRED_DEFAULTS) the further draws
    # are not what the buffer holds: one transition per step.
    plain = make_agent("ddpg", _env(dataset, reward="fixed", reward_baseline="paired", paired_draws=3), seed=0,
                       learning_starts=10, replay_buffer_class=ReplayBuffer, gamma=0.0, store_selections=False)
    plain.learn(12)
    assert plain.replay_buffer.pos == 12


def test_store_selections_refuses_further_draws_it_cannot_store_alike(dataset):
    from stable_baselines3.common.buffers import ReplayBuffer
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    def paired(draws: int):
        return lambda: _env(dataset, reward="fixed", reward_baseline="paired", paired_draws=draws)

    kwargs = dict(seed=0, learning_starts=100, replay_buffer_class=ReplayBuffer, gamma=0.0, store_selections=True)
    mixed = make_agent("ddpg", DummyVecEnv([paired(3), paired(1)]), **kwargs)
    with pytest.raises(ValueError, match=r"as many further draws per step, got \[0, 2\]"):
        mixed.learn(4)
    normalised = make_agent("ddpg", VecNormalize(DummyVecEnv([paired(2)]), norm_obs=False), **kwargs)
    with pytest.raises(ValueError, match="cannot store the env's further draws .* under VecNormalize"):
        normalised.learn(4)
    # Another env's malformed further draws: the same error as REINFORCE's (one reader, iqa_env.env.extra_draws).
    agent = make_agent("ddpg", paired(3)(), **kwargs)
    bad = {"extra_selections": np.zeros((2, 8), dtype=bool), "extra_rewards": np.zeros(3)}
    with pytest.raises(ValueError, match=r"must be \(K - 1, batch\) with one info\['extra_rewards'\] per row"):
        agent._extra_draws(np.zeros((1, 8)), [bad])


def test_a_standardising_ratio_critic_keeps_its_action_gradient_when_the_embeddings_shrink(dataset, tmp_path):
    """``critic_standardise``: the ratio critic sees the images' differences at a scale its trunk cannot shrink."""
    from agents.policies import RatioQNetwork

    torch.manual_seed(0)
    b, d = 8, 6
    plain, standard = RatioQNetwork(b, d), RatioQNetwork(b, d, standardise=True)
    standard.load_state_dict(plain.state_dict())
    embeddings = torch.randn(3, b, d) + 5.0
    actions = torch.rand(3, b) * 2 - 1

    def action_gradient(net, scale):
        a = actions.clone().requires_grad_(True)
        net(torch.cat([(embeddings * scale).reshape(3, -1), a], dim=1)).sum().backward()
        return a.grad

    # Embeddings that barely differ between images (a trunk pulled towards collapse): the plain critic's
    # action gradient shrinks with them towards nothing; the standardising one's does not change.
    assert action_gradient(plain, 1e-4).abs().max() < 1e-2 * action_gradient(plain, 1.0).abs().max()
    full = action_gradient(standard, 1.0)
    assert full.abs().max() > 0 and torch.allclose(action_gradient(standard, 0.5), full, rtol=0.01, atol=1e-5)
    assert action_gradient(standard, 1e-2).abs().max() > 0.8 * full.abs().max()  # eps = 1e-3 against a st.d. of 0.01
    # Permutation-invariant, as the critic must be.
    perm = torch.randperm(b)
    x = torch.cat([embeddings.reshape(3, -1), actions], dim=1)
    xp = torch.cat([embeddings[:, perm].reshape(3, -1), actions[:, perm]], dim=1)
    assert torch.allclose(standard(x), standard(xp), atol=1e-5)
    # Through make_agent, saved and loaded with the agent; only with the ratio head.
    agent = make_agent("ddpg", _env(dataset), seed=0, policy_kwargs={"critic_standardise": True})
    assert agent.policy.critic.qf0.standardise == "dim" and agent.policy.critic_target.qf0.standardise == "dim"
    agent.save(tmp_path / "ddpg")
    assert type(agent).load(tmp_path / "ddpg", device="cpu").policy.critic.qf0.standardise == "dim"
    with pytest.raises(ValueError, match="ratio"):
        make_agent("ddpg", _env(dataset), seed=0, policy_kwargs={"critic_standardise": True, "critic_head": "pooled"})
    with pytest.raises(ValueError, match=r"critic_standardise must be true, false, 'dim', 'global' or 'floor', got 'batch'"):
        make_agent("ddpg", _env(dataset), seed=0, policy_kwargs={"critic_standardise": "batch"})


def test_a_globally_standardising_ratio_critic_keeps_the_trunks_relative_scales(dataset, tmp_path):
    """``critic_standardise="global"``: one scale for all the embedding's dimensions, not one per dimension."""
    from agents.policies import RatioQNetwork

    torch.manual_seed(0)
    b, d = 8, 6
    per_dim, one_scale = RatioQNetwork(b, d, standardise=True), RatioQNetwork(b, d, standardise="global")
    one_scale.load_state_dict(per_dim.state_dict())
    embeddings = torch.randn(3, b, d) + 5.0
    actions = torch.rand(3, b) * 2 - 1

    def q(net, emb):
        return net(torch.cat([emb.reshape(3, -1), actions], dim=1))

    # Both ignore a common offset and a common scale, so a trunk cannot remove the images' differences by
    # shrinking them all (the collapse of section 20) ...
    for net in (per_dim, one_scale):
        assert torch.allclose(q(net, 0.25 * embeddings + 3.0), q(net, embeddings), atol=1e-3)
    # ... but only the per-dimension one also undoes the trunk's making one dimension's differences larger
    # than another's: the global one keeps those relative scales, as a plain critic does.
    stretched = embeddings.clone()
    stretched[..., 0] = 5.0 + 20.0 * (stretched[..., 0] - 5.0)
    assert torch.allclose(q(per_dim, stretched), q(per_dim, embeddings), atol=1e-4)
    assert not torch.allclose(q(one_scale, stretched), q(one_scale, embeddings), atol=1e-2)
    # Permutation-invariant.
    perm = torch.randperm(b)
    x = torch.cat([embeddings.reshape(3, -1), actions], dim=1)
    xp = torch.cat([embeddings[:, perm].reshape(3, -1), actions[:, perm]], dim=1)
    assert torch.allclose(one_scale(x), one_scale(xp), atol=1e-5)
    # Through make_agent (JSON-plain, as `--agent-kwargs` passes it), saved and loaded with the agent.
    agent = make_agent("ddpg", _env(dataset), seed=0, policy_kwargs={"critic_standardise": "global"})
    assert agent.policy.critic.qf0.standardise == "global" == agent.policy.critic_target.qf0.standardise
    agent.save(tmp_path / "ddpg")
    assert type(agent).load(tmp_path / "ddpg", device="cpu").policy.critic.qf0.standardise == "global"


def test_a_ratio_critic_with_a_spread_floor_is_the_plain_one_until_the_embeddings_shrink(dataset):
    """``critic_standardise="floor"``: plain embeddings while they differ; rescaled only below a floor."""
    from agents.policies import RatioQNetwork

    torch.manual_seed(0)
    b, d = 8, 6
    plain, floored = RatioQNetwork(b, d), RatioQNetwork(b, d, standardise="floor")
    floored.load_state_dict(plain.state_dict())
    actions = torch.rand(3, b) * 2 - 1
    centre = torch.randn(3, 1, d)
    differences = torch.randn(3, b, d)
    differences = differences - differences.mean(dim=1, keepdim=True)
    differences = differences / differences.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()  # spread 1 per batch

    def q(net, spread):
        a = actions.clone().requires_grad_(True)
        out = net(torch.cat([(centre + spread * differences).reshape(3, -1), a], dim=1))
        out.sum().backward()
        return out.detach(), a.grad

    # At or above the floor (0.05) it is the plain critic, value and action gradient.
    for spread in (1.0, 0.2, 0.06):
        (qp, gp), (qf, gf) = q(plain, spread), q(floored, spread)
        assert torch.allclose(qf, qp, atol=1e-6) and torch.allclose(gf, gp, atol=1e-6), spread
    # Below it the images' differences are scaled back up to the floor: a trunk that shrinks them further
    # changes nothing, where the plain critic's action gradient vanishes with them.
    at_floor = q(floored, 0.05)
    for spread in (0.01, 1e-4):
        qf, gf = q(floored, spread)
        assert torch.allclose(qf, at_floor[0], atol=1e-5) and torch.allclose(gf, at_floor[1], atol=1e-5), spread
    assert q(plain, 1e-4)[1].abs().max() < 1e-2 * at_floor[1].abs().max()
    agent = make_agent("ddpg", _env(dataset), seed=0, policy_kwargs={"critic_standardise": "floor"})
    assert agent.policy.critic.qf0.standardise == "floor"


def test_reinforce_selection_rate_cannot_drift_through_the_head_bias(dataset):
    """Centred REINFORCE logits: the mean selection logit is the constant logit(p0), whatever the head's bias.

    Before, the centred logits were shifted by the head's learnable bias, and the training-step
    credit ("select more, the predictor trains more") pushed it until every image was selected
    (h = 1), where the ranking no longer changes the selections and learning stops.
    """
    agent = make_agent("reinforce", _env(dataset), seed=0, policy_kwargs=dict(initial_selection_probability=0.3))
    obs = torch.as_tensor(dataset.images[:64].reshape(8, 8, 1, 16, 16)).float()
    policy = agent.policy
    with torch.no_grad():
        before = policy.logits(obs)
        policy.head.linear.bias.add_(25.0)
        after = policy.logits(obs)
    torch.testing.assert_close(after, before)
    torch.testing.assert_close(before.mean(dim=1), torch.full((8,), float(np.log(0.3 / 0.7))))


def test_reinforce_controller_average_is_the_exported_controller_and_is_saved(dataset, tmp_path):
    """``controller_average``: an exponential moving average of the policy's weights, one step per update.

    The average is replayed by hand from the policy's weights after every gradient step, and must
    be what ``Controller.from_agent`` exports and what a saved agent brings back.
    """
    from agents.reinforce import REINFORCE

    agent = make_agent("reinforce", _env(dataset), seed=0, controller_average=0.8)
    expected = [p.detach().clone() for p in agent.policy.parameters()]
    step = agent.policy.optimizer.step

    def step_and_replay(*args, **kwargs):
        out = step(*args, **kwargs)
        n = agent._n_updates + 1  # the update this step makes
        d = min(0.8, (1 + n) / (10 + n))
        for e, p in zip(expected, agent.policy.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        return out

    agent.policy.optimizer.step = step_and_replay
    agent.learn(60)
    assert agent._n_updates >= 3
    for e, a, p in zip(expected, agent.average_policy.parameters(), agent.policy.parameters()):
        torch.testing.assert_close(a, e)
    assert any(not torch.equal(a, p) for a, p in zip(agent.average_policy.parameters(), agent.policy.parameters()))
    images = dataset.images[:40]
    exported = Controller.from_agent(agent).score(images)
    raw = Controller.from_agent(agent.policy).score(images)
    average = Controller.from_agent(agent.average_policy).score(images)
    np.testing.assert_array_equal(exported, average)
    assert not np.array_equal(exported, raw)
    agent.save(tmp_path / "agent.zip")
    loaded = REINFORCE.load(tmp_path / "agent.zip", env=_env(dataset))
    np.testing.assert_array_equal(Controller.from_agent(loaded).score(images), exported)
    # Without an env too, as stable-baselines3's algorithms load (to score or predict, not to train on).
    alone = REINFORCE.load(tmp_path / "agent.zip", device="cpu")
    assert alone.n_steps == agent.n_steps and alone.env is None
    np.testing.assert_array_equal(Controller.from_agent(alone).score(images), exported)
    with pytest.raises(ValueError, match="n_steps is needed without an env"):
        REINFORCE(type(agent.policy), None)


def test_between_class_variance_values():
    from agents.reinforce import between_class_variance

    logits = torch.tensor([[1.0, 3.0, 0.0, 2.0, 9.0], [5.0, 1.0, 5.0, 1.0, 0.0]])
    classes = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 1, 2]])
    valid = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    # Batch 0: class means 2 and 1 (the invalid 9 is left out), overall mean 1.5 -> 0.5*0.25 + 0.5*0.25.
    # Batch 1: class means 5, 1, 0 with 2, 2, 1 images, overall 2.4 -> (2*2.6^2 + 2*1.4^2 + 2.4^2) / 5.
    expected = torch.tensor([0.25, (2 * 2.6**2 + 2 * 1.4**2 + 2.4**2) / 5])
    torch.testing.assert_close(between_class_variance(logits, classes, valid), expected)
    # The ranking within each class is free: reordering within a class changes nothing.
    swapped = logits[:, [1, 0, 3, 2, 4]]
    torch.testing.assert_close(between_class_variance(swapped, classes, valid), expected)
    same_means = torch.tensor([[0.0, 4.0, 1.0, 3.0, 7.0]])
    assert float(between_class_variance(same_means, classes[:1], valid[:1])) == 0.0


def _class_rollout(dataset, agent, n_batches: int = 6):
    """A rollout with zero returns on batches of two visibly different classes (dark 0, bright 1)."""
    rng = np.random.default_rng(0)
    batch = agent.action_space.shape[0]
    classes = np.tile(np.arange(batch) % 2, (n_batches, 1))
    images = np.where(classes[..., None, None, None] == 1, 200, 40).astype(np.uint8)
    images = images + rng.integers(0, 30, (n_batches, batch, *dataset.images.shape[1:]), dtype=np.uint8)
    return {
        "observations": images[:, None],
        "selections": rng.random((n_batches, 1, batch)) < 0.5,
        "valid": np.ones((n_batches, 1, batch), dtype=bool),
        "returns": np.zeros((n_batches, 1)),
        "classes": classes[:, None],
    }


@pytest.mark.parametrize("class_balance", [0.0, 1.0])
def test_reinforce_class_balance_pulls_the_class_means_together(dataset, class_balance):
    """With zero returns the only gradient is the class penalty: it must close the classes' gap, or do nothing."""
    from stable_baselines3.common.logger import Logger

    from agents.reinforce import between_class_variance

    agent = make_agent("reinforce", _env(dataset), seed=0, class_balance=class_balance, controller_average=0.0)
    agent.set_logger(Logger(folder=None, output_formats=[]))
    rollout = _class_rollout(dataset, agent)
    obs = torch.as_tensor(rollout["observations"][:, 0]).float()
    classes, valid = torch.as_tensor(rollout["classes"][:, 0]), torch.ones(obs.shape[:2], dtype=torch.bool)

    def variance() -> float:
        with torch.no_grad():
            return float(between_class_variance(agent.policy.logits(obs), classes, valid).mean())

    with torch.no_grad():  # make the classes' scores differ clearly to begin with
        agent.policy.head.linear.weight.mul_(20.0)
    before = variance()
    assert before > 0.05
    for _ in range(30):
        agent.train(rollout)
    if class_balance > 0:
        assert variance() < 0.05 * before
    else:
        assert variance() == pytest.approx(before, rel=1e-6)


def test_reinforce_class_balance_needs_the_classes(dataset):
    env = _env(dataset)
    agent = make_agent("reinforce", env, seed=0, class_balance=1.0)
    agent.learn(40)  # TaskAmenability-v0 reports them
    assert agent._n_updates > 0
    with pytest.raises(ValueError, match=r"class_balance must be a finite number >= 0, got -1"):
        make_agent("reinforce", env, seed=0, class_balance=-1)

    class NoClasses(gym.Wrapper):
        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, reward, terminated, truncated, {k: v for k, v in info.items() if k != "classes"}

    agent = make_agent("reinforce", NoClasses(_env(dataset)), seed=0, class_balance=1.0)
    with pytest.raises(ValueError, match=r"needs the env to report the class labels .* info\['classes'\]"):
        agent.learn(40)
    make_agent("reinforce", NoClasses(_env(dataset)), seed=0, class_balance=0.0).learn(40)  # not needed then


def test_reinforce_return_scale_starts_from_its_prior_or_from_the_returns_themselves(dataset, tmp_path):
    """``return_scale_prior=1.0`` (the default): the running mean square of the returns moves from 1 by 1 % per
    rollout; None: it is the bias-corrected mean of the rollouts' mean squares, the returns' own scale at once."""
    env = _env(dataset, reward="fixed", reward_baseline="paired", paired_draws=3, validation_size=8, reward_metric="loss")
    reference = make_agent("reinforce", env, seed=0)
    _, callback = reference._setup_learn(env.episode_length, None)
    rollouts = [reference.collect_rollout(callback) for _ in range(2)]
    squares = [float(np.mean(r["returns"] ** 2)) for r in rollouts]
    assert squares[0] > 0 and abs(squares[0] - 1) > 0.01 and squares[0] != squares[1]

    def moments(prior):
        agent = make_agent("reinforce", env, seed=0, return_scale_prior=prior)
        agent.set_logger(reference.logger)
        seen = []
        for rollout in rollouts:
            agent.train(rollout)
            seen.append(agent._return_sq)
        return agent, seen

    _, default = moments(1.0)
    assert default == pytest.approx([0.99 + 0.01 * squares[0], 0.99 * (0.99 + 0.01 * squares[0]) + 0.01 * squares[1]])
    agent, unbiased = moments(None)
    assert unbiased[0] == pytest.approx(squares[0])
    assert unbiased[1] == pytest.approx((0.99 * 0.01 * squares[0] + 0.01 * squares[1]) / (1 - 0.99**2))
    agent.save(tmp_path / "agent.zip")  # a saved agent goes on from the same scale
    loaded = type(agent).load(tmp_path / "agent.zip", env=env)
    assert loaded.return_scale_prior is None and loaded._return_updates == 2 and loaded._return_sq == unbiased[1]


def test_reinforce_credited_classes_reinforce_those_classes_images_alone(dataset, tmp_path):
    """``credited_classes``: the other classes' images get no share of a step's credit (their
    log-probabilities are left out of the policy gradient); naming every class is the default."""
    env = _env(dataset, reward="fixed", reward_baseline="paired", paired_draws=3, validation_size=8, reward_metric="loss")

    def agent_with(credited):
        return make_agent("reinforce", env, seed=0, normalize_returns=False, class_balance=0.0, credited_classes=credited)

    reference = agent_with([0, 1])
    _, callback = reference._setup_learn(env.episode_length, None)
    rollout = reference.collect_rollout(callback)
    assert set(np.unique(rollout["classes"])) == {0, 1}  # kept for credited_classes, as for class_balance

    def trained(credited, classes=None):
        agent = agent_with(credited)
        agent.set_logger(reference.logger)
        agent.train(rollout if classes is None else dict(rollout, classes=classes))
        return [p.detach().clone() for p in agent.policy.parameters()]

    start = [p.detach().clone() for p in agent_with(None).policy.parameters()]
    everything = trained(None)
    assert not all(torch.equal(a, b) for a, b in zip(start, everything))
    assert all(torch.equal(a, b) for a, b in zip(everything, trained([0, 1])))
    # Every image of the rollout of the other class: nothing is reinforced; all of the credited one: all is.
    zeros, ones = np.zeros_like(rollout["classes"]), np.ones_like(rollout["classes"])
    assert all(torch.equal(a, b) for a, b in zip(start, trained([1], zeros)))
    assert all(torch.equal(a, b) for a, b in zip(everything, trained([1], ones)))
    mixed = trained([1])  # the rollout's own mix: something between
    assert not all(torch.equal(a, b) for a, b in zip(start, mixed))
    assert not all(torch.equal(a, b) for a, b in zip(everything, mixed))
    assert agent_with((1,)).credited_classes == (1,)
    trained_agent = agent_with([1])
    trained_agent.save(tmp_path / "agent.zip")
    assert type(trained_agent).load(tmp_path / "agent.zip", env=env).credited_classes == (1,)  # kept by save and load


@pytest.mark.parametrize(
    "bad, words",
    [
        ([], r"credited_classes must be None or a non-empty list of class labels .*, got \[\]"),
        (1, r"credited_classes must be None or a non-empty list of class labels .*, got 1"),
        ([1, -1], r"credited_classes must be None or a non-empty list .*; -1 is not"),
        ([True], r"credited_classes must be None or a non-empty list .*; True is not"),
        ([1, 1], r"credited_classes names a class twice: \[1, 1\]"),
        ([2], r"credited_classes \[2\] names class 2, and this env's data has 2 classes \(labels 0 to 1"),
    ],
)
def test_reinforce_credited_classes_refuses_what_is_not_a_class_of_the_data(dataset, bad, words):
    with pytest.raises(ValueError, match=words):
        make_agent("reinforce", _env(dataset), seed=0, credited_classes=bad)


def test_reinforce_credited_classes_needs_the_classes(dataset):
    class NoClasses(gym.Wrapper):
        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, reward, terminated, truncated, {k: v for k, v in info.items() if k != "classes"}

    agent = make_agent("reinforce", NoClasses(_env(dataset)), seed=0, class_balance=0.0, credited_classes=[1])
    with pytest.raises(ValueError, match=r"REINFORCE with credited_classes needs the env to report the class labels"):
        agent.learn(40)


def test_reinforce_credits_each_step_whose_reward_is_its_own_with_that_reward(dataset):
    """Causal credit: a step whose reward measures its own action alone (validation steps, and the
    training steps of the env's ``paired`` baseline, ``info["reward_scope"] == "step"``) is credited
    with its own reward; another training step with the mean of the validation rewards after it."""
    agent = make_agent("reinforce", _env(dataset), seed=0)
    # One episode of the paired fixed reward: three training steps, each rewarded for itself.
    rewards = np.array([[0.2], [-0.1], [0.4]])
    dones = np.array([[False], [False], [True]])
    training = np.zeros((3, 1), dtype=bool)
    own = np.ones((3, 1), dtype=bool)
    assert agent._returns(rewards, dones, training, own) == pytest.approx(rewards)
    assert agent._returns(rewards, dones, training, ~own)[:, 0] == pytest.approx([0.5, 0.3, 0.4])  # reward-to-go
    # One episode of the weighted reward: two training steps (reward 0), then two validation steps.
    rewards = np.array([[0.0], [0.0], [1.0], [3.0]])
    dones = np.array([[False], [False], [False], [True]])
    validation = np.array([[False], [False], [True], [True]])
    assert agent._returns(rewards, dones, validation, validation)[:, 0] == pytest.approx([2.0, 2.0, 1.0, 3.0])


def test_reinforce_gradient_step_in_passes_is_the_one_pass_step(dataset):
    """``images_per_pass`` splits a gradient step's forward-backward into passes of whole env steps; the
    accumulated gradient, hence the step, is the one-pass one (class penalty and entropy included)."""
    from stable_baselines3.common.logger import Logger

    rollout = _class_rollout(dataset, make_agent("reinforce", _env(dataset), seed=0), n_batches=6)
    rng = np.random.default_rng(1)
    rollout["returns"] = rng.normal(size=(6, 1))
    rollout["valid"][2, 0, -3:] = False  # a padded batch weighs its valid images only

    def trained(images_per_pass):
        agent = make_agent(  # plain SGD steps of rate 1: the step is the (clipped) gradient itself
            "reinforce", _env(dataset), seed=0, class_balance=1.0, ent_coef=0.1, images_per_pass=images_per_pass,
            learning_rate=1.0, policy_kwargs={"optimizer_class": torch.optim.SGD},
        )
        agent.set_logger(Logger(folder=None, output_formats=[]))
        before = [p.detach().clone() for p in agent.policy.parameters()]
        passes = []
        agent.policy.features_extractor.register_forward_hook(lambda *_: passes.append(1))
        np.random.seed(0)  # the rollout's step order
        agent.train(rollout)
        return before, [p.detach().clone() for p in agent.policy.parameters()], len(passes)

    before, one, n_one = trained(None)
    _, per_step, n_per_step = trained(8)  # TINY's batch of 8: one env step per pass
    _, auto, n_auto = trained("auto")  # on a CPU 32 images: 4 steps per pass
    assert (n_one, n_per_step, n_auto) == (1, 6, 2)
    assert max(float((a - b).abs().max()) for a, b in zip(one, before)) > 1e-2  # the step moved the controller
    for a, b, c in zip(one, per_step, auto):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("images", [0, -4, 2.5, True, "all"])
def test_reinforce_refuses_an_impossible_images_per_pass(dataset, images):
    with pytest.raises(ValueError, match=r"images_per_pass must be an integer >= 1, 'auto' or None, got"):
        make_agent("reinforce", _env(dataset), seed=0, images_per_pass=images)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gamma=1.5), r"gamma must be a number in \[0, 1\]"),
        (dict(gamma="1"), r"gamma must be a number in \[0, 1\]"),
        (dict(gamma=float("nan")), r"gamma must be a number in \[0, 1\]"),
        # "false" is a truthy string: it would have left the normalisation on.
        (dict(normalize_returns="false"), "normalize_returns must be True or False"),
        (dict(ent_coef=float("nan")), "ent_coef must be a finite number"),
        (dict(ent_coef="0.01"), "ent_coef must be a finite number"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be a positive finite number"),
        (dict(max_grad_norm=None), "max_grad_norm must be a positive finite number"),
        (dict(class_balance="1"), "class_balance must be a finite number >= 0"),
        (dict(class_balance=True), "class_balance must be a finite number >= 0"),
        (dict(n_steps=2.5), "n_steps must be a whole number >= 1"),
        (dict(n_steps=True), "n_steps must be a whole number >= 1"),
        (dict(minibatch_steps=0), "minibatch_steps must be a whole number >= 1 or None"),
        (dict(minibatch_steps="4"), "minibatch_steps must be a whole number >= 1 or None"),
        (dict(return_scale_prior=0.0), "return_scale_prior must be None or a positive finite number, got 0.0"),
        (dict(return_scale_prior=True), "return_scale_prior must be None or a positive finite number, got True"),
        (dict(return_scale_prior="1"), "return_scale_prior must be None or a positive finite number, got '1'"),
    ],
)
def test_reinforce_refuses_bad_settings_by_name(dataset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_agent("reinforce", _env(dataset), seed=0, **kwargs)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        # stable-baselines3 took each of these and trained (or failed much later, naming no setting).
        ("ddpg", dict(gamma="0.9"), r"gamma must be a number in \[0, 1\], got '0.9'"),
        ("ddpg", dict(gamma=1.5), r"gamma must be a number in \[0, 1\], got 1.5"),
        ("sac", dict(gamma=float("nan")), r"gamma must be a number in \[0, 1\], got nan"),
        ("td3", dict(tau=0), r"tau must be a number in \(0, 1\] \(the target networks' soft-update rate\), got 0"),
        ("ddpg", dict(tau=2.0), r"tau must be a number in \(0, 1\]"),
        ("ddpg", dict(batch_size=0), "batch_size must be a whole number >= 1, got 0"),
        ("ppo", dict(batch_size=1.5), "batch_size must be a whole number >= 1, got 1.5"),
        ("ddpg", dict(buffer_size=-1), "buffer_size must be a whole number >= 1, got -1"),
        ("ddpg", dict(learning_starts=-5), "learning_starts must be a whole number >= 0, got -5"),
        ("ddpg", dict(train_freq=0), r"train_freq must be a whole number >= 1 or a pair \[n >= 1, \"step\" or"),
        ("td3", dict(train_freq=[1, "epoch"]), r"train_freq must be .*, got \[1, 'epoch'\]"),
        ("ddpg", dict(gradient_steps=0), r"gradient_steps must be a whole number >= 1, or -1 \(as many as"),
        ("ppo", dict(n_steps=0), "n_steps must be a whole number >= 1, got 0"),
        ("a2c", dict(gae_lambda=1.5), r"gae_lambda must be a number in \[0, 1\], got 1.5"),
        ("ppo", dict(clip_range=-0.1), "clip_range must be a positive finite number or a schedule, got -0.1"),
        ("ppo", dict(ent_coef="x"), r"ent_coef must be a finite number \(the entropy bonus's weight\), got 'x'"),
        ("ppo", dict(n_epochs=0), "n_epochs must be a whole number >= 1, got 0"),
        ("a2c", dict(vf_coef=-1.0), "vf_coef must be a finite number >= 0, got -1.0"),
        ("a2c", dict(max_grad_norm=float("inf")), "max_grad_norm must be a positive finite number, got inf"),
        ("ppo", dict(normalize_advantage="no"), "normalize_advantage must be True or False, got 'no'"),
        ("sac", dict(ent_coef="autox"), "ent_coef must be 'auto', 'auto_<initial value>' or a positive finite number"),
        ("sac", dict(ent_coef=0.0), "ent_coef must be 'auto', 'auto_<initial value>' or a positive finite number"),
        ("td3", dict(policy_delay=0), "policy_delay must be a whole number >= 1, got 0"),
        ("td3", dict(target_policy_noise=-0.2), "target_policy_noise must be a finite number >= 0, got -0.2"),
        ("ddpg", dict(learning_rate="1e-3"), r'learning_rate must be a positive finite number, \{"start": a, "end": b\}'),
        ("reinforce", dict(learning_rate=-1.0), "learning_rate must be a positive finite number, .* got -1.0"),
        ("a2c", dict(learning_rate=True), "learning_rate must be a positive finite number, .* got True"),
        # SAC's constructor failed with a TypeError naming no setting; PPO's exploration stopped being per image.
        ("sac", dict(use_sde=True), r"use_sde must be False \(the per-sample policies explore each image on its own"),
        ("ppo", dict(use_sde=True), "use_sde must be False"),
        ("ppo", dict(sde_sample_freq=-3), "sde_sample_freq must be a whole number >= -1, got -3"),
        # an AttributeError inside learn(); a ValueError naming no setting; NaN failed inside learn()
        ("ddpg", dict(action_noise="x"), "action_noise must be None or a stable-baselines3 ActionNoise"),
        ("sac", dict(target_entropy="x"), "target_entropy must be 'auto' or a finite number, got 'x'"),
        ("sac", dict(target_entropy=float("nan")), "target_entropy must be 'auto' or a finite number, got nan"),
        ("a2c", dict(use_rms_prop="no"), "use_rms_prop must be True or False, got 'no'"),
        ("ppo", dict(stats_window_size=0), "stats_window_size must be a whole number >= 1, got 0"),
        ("td3", dict(policy_kwargs="x"), "policy_kwargs must be None or a dict of the policy's arguments, got 'x'"),
        # an AttributeError, a TypeError or torch's list of every device type it knows: none named the setting
        ("ddpg", dict(replay_buffer_kwargs="x"), "replay_buffer_kwargs must be None or a dict of the replay buffer's"),
        ("ppo", dict(rollout_buffer_kwargs="x"), "rollout_buffer_kwargs must be None or a dict of the rollout buffer's"),
        ("ddpg", dict(verbose="x"), r"verbose must be a whole number >= 0 \(0: quiet, 1: info, 2: debug\), got 'x'"),
        ("ddpg", dict(tensorboard_log=3), "tensorboard_log must be None or a folder path, got 3"),
        # a TypeError from inside the buffer's constructor or issubclass(), naming no setting
        ("ddpg", dict(replay_buffer_class=dict), "replay_buffer_class must be None, a stable-baselines3 ReplayBuffer class or a name"),
        ("td3", dict(replay_buffer_class=3), "replay_buffer_class must be None, a stable-baselines3 ReplayBuffer class .*, got 3"),
        ("ddpg", dict(replay_buffer_class="nope"), r"replay_buffer_class must be None, .* or one of \('default', 'reward_ready'"),
        ("ppo", dict(rollout_buffer_class=dict), "rollout_buffer_class must be None or a stable-baselines3 RolloutBuffer class"),
        ("reinforce", dict(device="tpu"), "device must be 'auto', 'cpu' or 'cuda\\[:N\\]', got 'tpu'"),
        ("sac", dict(device=0), "device must be 'auto', 'cpu' or 'cuda\\[:N\\]', got int"),
    ],
)
def test_algorithm_settings_are_refused_by_name_before_the_agent_is_built(dataset, name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_agent(name, _env(dataset), seed=0, **kwargs)


@pytest.mark.parametrize(
    "name, policy_kwargs, message",
    [
        # "no" and "false" are truthy: both had turned the centring on.
        ("reinforce", dict(centre_logits="no"), "centre_logits must be True or False, got 'no'"),
        ("ddpg", dict(centre_logits="false"), "centre_logits must be True or False, got 'false'"),
        ("reinforce", dict(initial_selection_probability="0.3"), r"initial_selection_probability must be a number in \(0, 1\), got '0.3'"),
        ("reinforce", dict(initial_selection_probability=1.0), r"initial_selection_probability must be a number in \(0, 1\), got 1.0"),
        # a negative penalty had rewarded the critic for saturated actions
        ("ddpg", dict(saturation_penalty=-1.0), "saturation_penalty must be a finite number >= 0, got -1.0"),
        ("td3", dict(critic_hidden=0), "critic_hidden must be a whole number >= 1, got 0"),
        ("sac", dict(critic_hidden=2.5), "critic_hidden must be a whole number >= 1, got 2.5"),
        ("ppo", dict(features_extractor_kwargs=dict(width=0)), r"width must be a whole number >= 1 \(the controller's channels\), got 0"),
        ("reinforce", dict(features_extractor_kwargs=dict(embed_dim=2.5)), "embed_dim must be a whole number >= 1"),
        # stable-baselines3's own policy settings: net_arch had been dropped without a word (no hidden layers here) ...
        ("ddpg", dict(net_arch=[64, 64]), r"net_arch must be left out \(None or \[\]\): the per-sample policies put one"),
        ("ppo", dict(net_arch=dict(pi=[8], vf=[8])), "net_arch must be left out"),
        ("sac", dict(net_arch=[8]), "net_arch must be left out"),
        # ... and these failed inside learn() or the constructor with errors that named no setting
        ("ppo", dict(log_std_init="x"), r"log_std_init must be a finite number \(the log of the exploration's"),
        ("a2c", dict(log_std_init=float("inf")), "log_std_init must be a finite number .*, got inf"),
        ("td3", dict(n_critics=0), "n_critics must be a whole number >= 1, got 0"),
        ("ppo", dict(ortho_init="no"), "ortho_init must be True or False, got 'no'"),
        ("ddpg", dict(activation_fn="relu"), r"activation_fn must be a torch.nn.Module class \(e.g. torch.nn.ReLU\)"),
        ("ddpg", dict(optimizer_kwargs="x"), "optimizer_kwargs must be None or a dict of the optimiser's arguments"),
        ("sac", dict(features_extractor_kwargs=[16]), "features_extractor_kwargs must be None or a dict"),
        # state-dependent exploration's own settings: ignored without it, or an AssertionError in the constructor
        ("ppo", dict(squash_output=True), r"squash_output must be False \(stable-baselines3 squashes only with state-dependent"),
        ("sac", dict(use_expln=True), r"use_expln must be False \(a setting of state-dependent exploration, use_sde"),
        ("a2c", dict(full_std=False), r"full_std must be True \(a setting of state-dependent exploration, use_sde"),
    ],
)
def test_policy_settings_are_refused_by_name(dataset, name, policy_kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_agent(name, _env(dataset), seed=0, policy_kwargs=policy_kwargs)


def test_algorithm_settings_in_every_form_the_algorithms_take_are_accepted(dataset):
    env = _env(dataset)
    assert make_agent("sac", env, seed=0, ent_coef="auto_0.1", tau=1, gradient_steps=-1).ent_coef == "auto_0.1"
    assert make_agent("sac", env, seed=0, ent_coef=np.float32(0.05)).ent_coef_tensor.item() == pytest.approx(0.05)
    assert make_agent("td3", env, seed=0, train_freq=[2, "episode"]).train_freq.frequency == 2
    from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

    assert make_agent("td3", env, seed=0, train_freq=TrainFreq(3, TrainFrequencyUnit.STEP)).train_freq.frequency == 3
    assert make_agent("ddpg", env, seed=0, train_freq=(4, "step"), gamma=np.float64(0.5)).gamma == 0.5
    assert make_agent("ppo", env, seed=0, n_steps=np.int64(16), batch_size=8, clip_range_vf=None).n_steps == 16
    assert make_agent("ppo", env, seed=0, clip_range=lambda progress: 0.1 * progress).clip_range(0.5) == 0.05
    rate = make_agent("a2c", env, seed=0, learning_rate={"start": np.float32(1e-3), "end": 1e-4}).lr_schedule(1.0)
    assert rate == pytest.approx(1e-3)
    # stable-baselines3's own policy settings, in the forms it takes
    from stable_baselines3.common.noise import NormalActionNoise

    noise = NormalActionNoise(np.zeros(8), np.full(8, 0.1))
    assert make_agent("ddpg", env, seed=0, action_noise=noise, policy_kwargs=dict(net_arch=[])).action_noise is noise
    assert make_agent("ddpg", env, seed=0, action_noise=None).action_noise is None
    ppo = make_agent("ppo", env, seed=0, policy_kwargs=dict(log_std_init=np.float32(-1.0), net_arch=None, ortho_init=False))
    assert ppo.policy.log_std.detach().numpy() == pytest.approx(-1.0)
    sac = make_agent("sac", env, seed=0, target_entropy=-4, use_sde=False, policy_kwargs=dict(activation_fn=torch.nn.Tanh))
    assert sac.target_entropy == -4.0
    td3 = make_agent("td3", env, seed=0, policy_kwargs=dict(n_critics=1, optimizer_class=torch.optim.SGD))
    assert len(td3.critic.q_networks) == 1 and isinstance(td3.actor.optimizer, torch.optim.SGD)
    assert make_agent("a2c", env, seed=0, device=torch.device("cpu"), verbose=0).device == torch.device("cpu")
    assert make_agent("reinforce", env, seed=0, device="auto", tensorboard_log=None).device.type in ("cpu", "cuda")
    from stable_baselines3.common.buffers import ReplayBuffer, RolloutBuffer

    from agents.factory import REPLAY_BUFFERS

    assert type(make_agent("ddpg", env, seed=0, replay_buffer_class=ReplayBuffer).replay_buffer) is ReplayBuffer
    reward_ready = make_agent("td3", env, seed=0, replay_buffer_class="reward_ready").replay_buffer
    assert type(reward_ready) is REPLAY_BUFFERS["reward_ready"]
    assert type(make_agent("a2c", env, seed=0, rollout_buffer_class=RolloutBuffer).rollout_buffer) is RolloutBuffer
    make_agent("ppo", env, seed=0, policy_kwargs=dict(squash_output=False, use_expln=False, full_std=True))


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        # Python's "unexpected keyword argument" named neither the place nor the name meant.
        ("ppo", dict(n_step=8), "ppo takes no setting 'n_step'; did you mean 'n_steps'?"),
        ("ppo", dict(width=8), "ppo takes no setting 'width'; it is a setting of features_extractor_kwargs: give it in policy_kwargs' features_extractor_kwargs"),
        ("reinforce", dict(policy_kwargs=dict(class_balance=1.0)), "policy_kwargs takes no setting 'class_balance'; it is a setting of reinforce: give it outside policy_kwargs"),
        ("td3", dict(policy_kwargs=dict(gamma=0.9)), "policy_kwargs takes no setting 'gamma'; it is a setting of td3: give it outside policy_kwargs"),
        ("ddpg", dict(policy_kwargs=dict(embed_dim=32)), "policy_kwargs takes no setting 'embed_dim'; it is a setting of features_extractor_kwargs"),
        ("sac", dict(policy_kwargs=dict(features_extractor_kwargs=dict(embed_dims=32))), "features_extractor_kwargs takes no setting 'embed_dims'; did you mean 'embed_dim'?"),
        # DDPG has no policy delay (TD3 has): no close name, so every name it takes
        ("ddpg", dict(policy_delay=2), "ddpg takes no setting 'policy_delay'; the names it takes: action_noise, batch_size, buffer_size"),
    ],
)
def test_setting_names_an_algorithm_does_not_take_are_refused_with_where_they_belong(dataset, name, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_agent(name, _env(dataset), seed=0, **kwargs)
    # the same words, before any file, from a run's settings
    from experiments.training import TrainConfig

    with pytest.raises(ValueError, match="agent_kwargs: " + re.escape(message)):
        TrainConfig(algo=name, agent_kwargs=kwargs).validate()


@pytest.mark.parametrize("decay", [1.0, -0.1, True, "0.9"])
def test_reinforce_refuses_an_impossible_controller_average(dataset, decay):
    with pytest.raises(ValueError, match=r"controller_average must be a decay in \[0, 1\)"):
        make_agent("reinforce", _env(dataset), seed=0, controller_average=decay)


def test_controller_scores_keep_the_ranking_of_large_logits(dataset):
    """Scores near 1 still rank the images: float32 would round every logit above about 17 to exactly 1.0."""
    controller = Controller.from_agent(make_agent("reinforce", _env(dataset), seed=0))
    with torch.no_grad():
        controller.backbone.head.bias.add_(25.0)
    scores = controller.score(dataset.images[:32])
    logits = controller.backbone(torch.as_tensor(dataset.images[:32]).float() / 255.0).detach().numpy()
    assert scores.dtype == np.float64 and np.all(scores < 1.0)
    np.testing.assert_array_equal(np.argsort(scores, kind="stable"), np.argsort(logits, kind="stable"))


def test_controller_save_load_round_trip(dataset, tmp_path):
    agent = make_agent("reinforce", _env(dataset), seed=0)
    agent.learn(60)
    controller = Controller.from_agent(agent, metadata={"task": "classification"})
    controller.save(tmp_path / "ctrl")
    loaded = Controller.load(tmp_path / "ctrl")
    np.testing.assert_array_equal(controller.score(dataset.images), loaded.score(dataset.images))
    assert loaded.metadata["task"] == "classification" and loaded.metadata["algorithm"] == "REINFORCE"
    # Any batch size; float input in [0, 1] scores like uint8; (N, H, W) is taken as one channel.
    np.testing.assert_allclose(loaded.score(dataset.images[:3] / 255.0), loaded.score(dataset.images[:3]), atol=1e-6)
    assert loaded.score(dataset.images[:5, 0]).shape == (5,)
    assert loaded.score(dataset.images[:0]).shape == (0,)


def test_controller_mirror_average_scores_an_image_and_its_mirror_alike_and_is_saved(dataset, tmp_path):
    """``mirror_average``: each score is the mean of the network's scores of the image and of its mirror image,
    so an image and its mirror score the same; saved and loaded with the controller; off by default and for a
    controller saved before the field existed."""
    import json

    agent = make_agent("reinforce", _env(dataset), seed=0)
    agent.learn(60)
    plain = Controller.from_agent(agent)
    both = Controller.from_agent(agent, mirror_average=True)
    assert not plain.mirror_average and both.mirror_average
    images = dataset.images[:40]
    mirrored = np.ascontiguousarray(images[..., ::-1])
    one, other = plain.score(images), plain.score(mirrored)  # float32 network: equal to about 1e-7
    assert not np.allclose(one, other, atol=1e-4)  # the network alone scores a mirror image otherwise
    np.testing.assert_allclose(both.score(images), (one + other) / 2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(both.score(mirrored), both.score(images), rtol=0, atol=1e-6)
    np.testing.assert_allclose(both.score(images, batch_size=7), both.score(images), rtol=0, atol=1e-6)

    both.save(tmp_path / "both")
    assert json.loads((tmp_path / "both" / "controller.json").read_text())["mirror_average"] is True
    np.testing.assert_array_equal(Controller.load(tmp_path / "both").score(images), both.score(images))
    plain.save(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "controller.json").read_text())
    del config["mirror_average"]  # as a controller saved before the field
    (tmp_path / "plain" / "controller.json").write_text(json.dumps(config))
    assert not Controller.load(tmp_path / "plain").mirror_average
    (tmp_path / "plain" / "controller.json").write_text(json.dumps({**config, "mirror_average": "yes"}))
    with pytest.raises(ValueError, match="field 'mirror_average' must be true or false, got 'yes'"):
        Controller.load(tmp_path / "plain")
    with pytest.raises(ValueError, match="mirror_average must be True or False"):
        Controller(plain.backbone, mirror_average=1)


@pytest.mark.parametrize("name", ["reinforce", "ddpg"])
def test_the_agent_lives_on_the_envs_device(dataset, tmp_path, name):
    """The controller is made where the env's data and predictor are, not on stable-baselines3's "auto".

    Before, a CPU env on a machine with a GPU got a CUDA agent: every test here that feeds
    the policy a CPU tensor failed on a GPU machine, and ``iqa train --device cpu`` trained
    its controller on the GPU.
    """
    from agents import default_kwargs

    env = _env(dataset)
    assert default_kwargs(name, env)["device"] == env.device == torch.device("cpu")
    assert make_agent(name, env, seed=0).device == torch.device("cpu")
    assert make_agent(name, env, seed=0, device="cpu").device == torch.device("cpu")  # an explicit device stays
    agent = make_agent(name, env, seed=0)
    agent.save(tmp_path / "cpu.zip")
    assert type(agent).load(tmp_path / "cpu.zip", env=env).device == torch.device("cpu")  # so does loading one
    if not torch.cuda.is_available():
        return
    env = _env(dataset, device="cuda")
    agent = make_agent(name, env, seed=0)
    assert agent.device.type == "cuda" and default_kwargs(name, env)["device"].type == "cuda"
    agent.learn(40)
    controller = Controller.from_agent(agent)
    assert controller.device.type == "cuda"
    on_gpu = controller.score(dataset.images)
    np.testing.assert_allclose(controller.to("cpu").score(dataset.images), on_gpu, rtol=0, atol=1e-5)
    agent.save(tmp_path / "cuda.zip")
    assert type(agent).load(tmp_path / "cuda.zip", env=env).device.type == "cuda"
    assert type(agent).load(tmp_path / "cuda.zip", env=_env(dataset)).device == torch.device("cpu")
    assert type(agent).load(tmp_path / "cuda.zip", env=_env(dataset), device="cuda").device.type == "cuda"


def test_controller_percentiles_and_threshold_against_its_reference(dataset, tmp_path):
    """Percentiles are the mid-rank among the reference images' scores; they survive save/load, and ride any scale."""
    controller = Controller.from_agent(make_agent("reinforce", _env(dataset), seed=0))
    with pytest.raises(ValueError, match="no reference scores"):
        controller.percentile(dataset.images[:2])
    reference, others = dataset.images[:40], dataset.images[40:]
    controller.calibrate(reference, source="test images")
    ref = np.sort(controller.score(reference))
    assert controller.reference == {"source": "test images", "images": 40, "scores": ref.tolist()}
    # The reference images themselves: (rank + 0.5) / 40 when their scores are distinct.
    assert len(np.unique(ref)) == 40
    np.testing.assert_allclose(np.sort(controller.percentile(reference)), (np.arange(40) + 0.5) / 40)
    p = controller.percentile(others)
    assert np.all((p >= 0) & (p <= 1))
    s = controller.score(others)
    assert np.all(np.diff(p[np.argsort(s)]) >= 0)  # monotone in the score
    # threshold(r): the images scored below it are the lowest r of the reference.
    assert np.mean(controller.score(reference) < controller.threshold(0.25)) == pytest.approx(0.25, abs=1 / 40)
    assert controller.threshold(0.0) == float("-inf")
    with pytest.raises(ValueError, match="rejection"):
        controller.threshold(1.5)
    # A controller whose scores all sit near 1 (another seed's level) gives the same percentiles.
    shifted = Controller.load(controller.save(tmp_path / "c"))
    with torch.no_grad():
        shifted.backbone.head.bias.add_(8.0)
    shifted.calibrate(reference)
    assert np.mean(shifted.score(others)) > np.mean(s)
    np.testing.assert_allclose(shifted.percentile(others), p)
    # Saved and loaded with the weights; a malformed reference is refused on load, naming the field.
    loaded = Controller.load(controller.save(tmp_path / "ctrl"))
    assert loaded.reference == controller.reference
    np.testing.assert_array_equal(loaded.percentile(others), p)
    config = json.loads((tmp_path / "ctrl" / "controller.json").read_text())
    for bad, message in [
        ({**config["reference"], "scores": config["reference"]["scores"][::-1]}, "sorted"),
        ({**config["reference"], "scores": [0.5]}, "at least 2"),
        ({**config["reference"], "scores": [0.1, float("nan")]}, "finite"),
        ({**config["reference"], "images": 3}, "'images'"),
        ([0.1, 0.2], "expected an object"),
    ]:
        (tmp_path / "ctrl" / "controller.json").write_text(json.dumps({**config, "reference": bad}))
        with pytest.raises(ValueError, match=f"field 'reference'.*{message}"):
            Controller.load(tmp_path / "ctrl")
    with pytest.raises(ValueError, match="at least 2 images"):
        controller.calibrate(reference[:1])


@pytest.mark.parametrize(
    "images, error, message",
    [
        (np.zeros((2, 3, 16, 16), np.uint8), ValueError, r"shape \(N, 1, 16, 16\)"),
        (np.full((2, 1, 16, 16), 2.0), ValueError, r"scaled to \[0, 1\]"),
        (np.full((2, 1, 16, 16), np.nan), ValueError, "NaN"),
        (np.zeros((2, 1, 16, 16), np.int32), TypeError, "uint8"),
    ],
)
def test_controller_rejects_bad_images(dataset, images, error, message):
    controller = Controller.from_agent(make_agent("reinforce", _env(dataset), seed=0))
    with pytest.raises(error, match=message):
        controller.score(images)


def test_controller_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="controller.json"):
        Controller.load(tmp_path)
    (tmp_path / "controller.json").write_text("{not json")
    (tmp_path / "controller.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not valid JSON"):
        Controller.load(tmp_path)


def _reward_model_batch(seed: int = 0, steps: int = 400, batch: int = 12, dim: int = 5, same_images: bool = False):
    """Features, selections (h = 0.4), validity and a reward of the weighted form with known per-image losses.

    ``same_images``: every step shows the same batch (only the selections are drawn anew), so
    that each image has one expected policy gradient.
    """
    rng = np.random.default_rng(seed)
    shape = (1 if same_images else steps, batch, dim)
    features = torch.as_tensor(rng.normal(size=shape), dtype=torch.float32).expand(steps, batch, dim)
    probabilities = torch.full((steps, batch), 0.4)
    selections = torch.as_tensor(rng.random((steps, batch)) < 0.4)
    valid = torch.ones(steps, batch, dtype=torch.bool)
    valid[:, -2:] = False  # a short last batch: padding never counts
    weight = torch.as_tensor(rng.normal(size=dim), dtype=torch.float32)
    losses = features @ weight
    v, a = valid.float(), (selections & valid).float()
    mean = (losses * v).sum(1) / v.sum(1)
    chosen = (losses * a).sum(1) / a.sum(1).clamp_min(1.0)
    rewards = 0.3 + torch.where(a.sum(1) > 0, mean - chosen, torch.zeros_like(mean))
    return features, selections, valid, probabilities, rewards, weight


def test_selection_reward_model_fits_the_weighted_form_and_its_baseline_ignores_the_own_selection():
    from agents.reinforce import SelectionRewardModel

    features, selections, valid, probabilities, rewards, weight = _reward_model_batch()
    model = SelectionRewardModel(features.shape[-1], ridge=1e-6)
    explained = model.fit(features, selections, valid, rewards)
    assert explained > 0.999
    torch.testing.assert_close(model.weight, weight, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(model(features, selections, valid), rewards, atol=1e-3, rtol=1e-3)
    baseline = model.counterfactual(features, selections, valid, probabilities)
    # Image j's baseline is the same whichever a_j was drawn ...
    flipped = selections.clone()
    flipped[:, 3] = ~flipped[:, 3]
    torch.testing.assert_close(model.counterfactual(features, flipped, valid, probabilities)[:, 3], baseline[:, 3])
    # ... and is the expectation of the model's reward over a_j ~ Bernoulli(h_j), the others kept.
    with_one, with_none = selections.clone(), selections.clone()
    with_one[:, 3], with_none[:, 3] = True, False
    expected = 0.4 * model(features, with_one, valid) + 0.6 * model(features, with_none, valid)
    torch.testing.assert_close(baseline[:, 3], expected)


def test_counterfactual_baselines_keep_the_policy_gradient_and_cut_its_variance():
    """On one batch drawn many times, ``(R - b_j)(a_j - h_j)`` has the mean of ``R (a_j - h_j)`` (no
    bias) and a smaller spread; a baseline that sees ``a_j`` itself (the model's ``Q(a)``) is biased."""
    from agents.reinforce import SelectionRewardModel

    features, selections, valid, probabilities, rewards, _ = _reward_model_batch(seed=1, steps=20000, same_images=True)
    model = SelectionRewardModel(features.shape[-1])
    model.fit(*(t[:300] for t in (features, selections, valid)), rewards[:300])  # fitted on other draws
    score = (selections.float() - probabilities)[:, :-2]  # d log pi / d logit of each valid image

    def gradients(baseline: torch.Tensor) -> torch.Tensor:
        return ((rewards[:, None] - baseline) * score)[300:]

    plain = gradients(torch.zeros(()))
    counterfactual = gradients(model.counterfactual(features, selections, valid, probabilities)[:, :-2])
    own = gradients(model(features, selections, valid)[:, None])
    error = plain.std(0) / np.sqrt(len(plain))  # standard error of each image's mean gradient
    assert torch.all(plain.mean(0).abs() > 5 * error)  # each image has a clear gradient to keep
    assert torch.all((counterfactual.mean(0) - plain.mean(0)).abs() < 4 * error)
    assert torch.all(counterfactual.std(0) < 0.5 * plain.std(0))
    assert torch.all((own.mean(0) - plain.mean(0)).abs() > 5 * error)


def test_reinforce_with_counterfactual_baselines_trains_saves_and_refuses_bad_settings(dataset, tmp_path):
    from agents.reinforce import REINFORCE

    env = _env(dataset, reward="weighted")
    agent = make_agent("reinforce", env, seed=0, image_baseline="counterfactual", reward_model_memory=4)
    agent.learn(120)
    assert len(agent._reward_memory) == 4  # the last 4 rollouts' validation steps
    assert bool(agent.reward_model.weight.abs().sum() > 0)  # fitted
    agent.save(tmp_path / "agent.zip")
    loaded = REINFORCE.load(tmp_path / "agent.zip", env=_env(dataset, reward="weighted"))
    torch.testing.assert_close(loaded.reward_model.weight, agent.reward_model.weight)
    # ... and the rollouts it was fitted on, so that a resumed run refits on the same memory.
    assert len(loaded._reward_memory) == 4
    torch.testing.assert_close(loaded._reward_memory[-1][3], agent._reward_memory[-1][3])
    with pytest.raises(
        ValueError, match=r"image_baseline must be one of \('none', 'counterfactual', 'leave_one_out'\), got 'loo'"
    ):
        make_agent("reinforce", env, seed=0, image_baseline="loo")
    with pytest.raises(ValueError, match=r"reward_model_memory must be an integer >= 1, got 0"):
        make_agent("reinforce", env, seed=0, image_baseline="counterfactual", reward_model_memory=0)
    with pytest.raises(
        ValueError, match=r"image_baseline='counterfactual' is a baseline for the rewards of validation steps"
    ):
        make_agent("reinforce", _env(dataset, reward="fixed"), seed=0, image_baseline="counterfactual")


def test_reinforce_with_leave_one_out_baselines_takes_each_images_own_draw_and_refuses_bad_settings(dataset):
    """Validation steps' image advantages are the step's reward less ``h_j r_j(1) + (1 - h_j) r_j(0)``
    from ``info["image_rewards"]``; training steps keep the step's return."""
    env = _env(dataset, reward="weighted")
    agent = make_agent("reinforce", env, seed=0, image_baseline="leave_one_out", normalize_returns=False)
    _, callback = agent._setup_learn(env.episode_length * 2, None)
    agent.collect_rollout(callback)  # the moving average's first episode rewards 0, however drawn
    rollout = agent.collect_rollout(callback)
    baselines, validation = rollout["image_baselines"][..., 0, :], rollout["validation"][:, 0]
    assert np.isnan(baselines[~validation]).all() and np.isfinite(baselines[validation]).all()
    # a validation step's return, less image j's baseline, is (a_j - h_j) (r_j(1) - r_j(0))
    obs = torch.as_tensor(rollout["observations"][validation][:, 0])
    with torch.no_grad():
        h = agent.policy(obs).numpy().astype(np.float64)
    a = rollout["selections"][validation][:, 0]
    advantage = rollout["returns"][validation][:, 0, None] - baselines[validation]
    effect = (advantage / np.where(a, 1 - h, -h))  # r_j(1) - r_j(0), the same for either draw
    assert np.all(np.isfinite(effect)) and np.any(np.abs(effect) > 1e-6)
    np.testing.assert_allclose(advantage, (a - h) * effect, atol=1e-9)
    agent.train(rollout)  # and a gradient step takes them
    with pytest.raises(
        ValueError, match=r"image_baseline='leave_one_out' is a baseline for the rewards of validation steps"
    ):
        make_agent("reinforce", _env(dataset, reward="fixed"), seed=0, image_baseline="leave_one_out")
    with pytest.raises(ValueError, match=r"stochastic_validation=False\): use stochastic_validation=True"):
        make_agent(
            "reinforce", _env(dataset, reward="weighted", stochastic_validation=False), seed=0,
            image_baseline="leave_one_out",
        )
    # The default with the validation rewards, where the env draws; not where it rewards the scores
    # themselves, nor with the fixed reward; and default_settings records the same.
    from agents.factory import default_settings

    scores_env = _env(dataset, reward="selective", stochastic_validation=False)
    assert make_agent("reinforce", _env(dataset, reward="selective"), seed=0).image_baseline == "leave_one_out"
    assert make_agent("reinforce", scores_env, seed=0).image_baseline == "none"
    assert make_agent("reinforce", _env(dataset, reward="fixed"), seed=0).image_baseline == "none"
    assert default_settings("reinforce", "weighted", 8, 10)["image_baseline"] == "leave_one_out"
    assert default_settings("reinforce", "weighted", 8, 10, stochastic_validation=False)["image_baseline"] == "none"
    # ... and learn from a predictor warmed up for longer than the other algorithms' (section 51).
    from agents import recommended_env_kwargs

    warmups = {(a, r): recommended_env_kwargs(a, r)["predictor_warmup_steps"] for a in ("reinforce", "ddpg") for r in ("fixed", "weighted", "selective")}
    assert warmups == {("reinforce", "fixed"): 400, ("reinforce", "weighted"): 2000, ("reinforce", "selective"): 2000,
                       ("ddpg", "fixed"): 400, ("ddpg", "weighted"): 400, ("ddpg", "selective"): 400}


def test_reinforce_trains_the_predictor_on_more_of_each_batch_and_credits_validation_steps(dataset, tmp_path):
    """REINFORCE's recommended env (weighted and selective rewards) draws the predictor's training selections
    at its task's ``training_selection_rate`` (sections 60 and 64), and so does its paired fixed reward in
    classification (section 79); not the other algorithms.  On a weighted or selective env with the rate
    REINFORCE credits its validation steps only (the one credit it allows there), elsewhere every step
    (``"causal"``: the paired fixed reward's draws and rewards are the action's own); default_settings records
    the same."""
    from agents import recommended_env_kwargs
    from agents.factory import REINFORCE_FIXED_TRAINING_SELECTION_RATES, REINFORCE_TRAINING_SELECTION_RATES, default_settings
    from iqa_env.tasks import TASK_NAMES

    rates = {
        (a, r, t): recommended_env_kwargs(a, r, t).get("training_selection_rate")
        for a in ("reinforce", "ddpg", "ppo") for r in ("fixed", "weighted", "selective")
        for t in ("classification", "segmentation")
    }
    chosen = {key: rate for key, rate in rates.items() if rate is not None}
    assert chosen == {
        **{("reinforce", r, t): REINFORCE_TRAINING_SELECTION_RATES[t]
           for r in ("weighted", "selective") for t in ("classification", "segmentation")},
        ("reinforce", "fixed", "classification"): REINFORCE_FIXED_TRAINING_SELECTION_RATES["classification"],
    }
    # In segmentation the fixed reward's action already selects half of each batch, the other rewards' rate there.
    assert REINFORCE_FIXED_TRAINING_SELECTION_RATES["segmentation"] is None
    # One rate per task, above the controller's own selection rate (its scores keep 0.3), below every image.
    assert set(REINFORCE_TRAINING_SELECTION_RATES) == set(TASK_NAMES)
    assert all(0.3 < rate < 1.0 for rate in REINFORCE_TRAINING_SELECTION_RATES.values())
    with pytest.raises(ValueError, match="task must be one of .*'classification'.*got 'detection'"):
        recommended_env_kwargs("reinforce", "weighted", "detection")
    drawn = make_agent("reinforce", _env(dataset, reward="weighted", training_selection_rate=0.8), seed=0)
    assert drawn.credit == "validation"
    assert make_agent("reinforce", _env(dataset, reward="weighted"), seed=0).credit == "causal"
    assert make_agent("reinforce", _env(dataset, reward="fixed"), seed=0).credit == "causal"
    paired = _env(dataset, reward="fixed", **{**recommended_env_kwargs("reinforce", "fixed"), **TINY})
    assert paired.training_selection_rate == 0.8 and make_agent("reinforce", paired, seed=0).credit == "causal"
    assert default_settings("reinforce", "selective", 8, 10, training_selection_rate=0.8)["credit"] == "validation"
    assert default_settings("reinforce", "selective", 8, 10)["credit"] == "causal"

    # A saved agent loads onto such an env with its credit (what resuming a run does), and one saved with
    # another credit is refused there.
    from agents import REINFORCE

    drawn.save(tmp_path / "drawn.zip")
    rate_env = _env(dataset, reward="weighted", training_selection_rate=0.8)
    assert REINFORCE.load(tmp_path / "drawn.zip", env=rate_env).credit == "validation"
    make_agent("reinforce", _env(dataset, reward="weighted"), seed=0).save(tmp_path / "causal.zip")
    with pytest.raises(ValueError, match="use credit='validation', got credit='causal'"):
        REINFORCE.load(tmp_path / "causal.zip", env=rate_env)


def test_every_recommended_env_clips_the_predictors_gradient():
    """The guard against one huge gradient wrecking a co-trained predictor (section 63) is in every recommended
    env (``tests/test_env.py`` checks that the env clips at it)."""
    from agents import ALGORITHMS, recommended_env_kwargs
    from agents.factory import PREDICTOR_MAX_GRAD_NORM

    limits = {
        recommended_env_kwargs(a, r, t).get("predictor_max_grad_norm")
        for a in ALGORITHMS for r in ("fixed", "weighted", "selective") for t in ("classification", "segmentation")
    }
    assert limits == {PREDICTOR_MAX_GRAD_NORM} and PREDICTOR_MAX_GRAD_NORM > 0


def test_recommended_envs_keep_a_predictor_weight_average_where_it_is_measured_to_help(dataset):
    """The weighted and selective rewards (every algorithm) come from a weight average of the co-trained
    predictor; REINFORCE's paired fixed reward keeps one for ``evaluate()`` alone, its probes reading the
    weights themselves (section 78); DDPG's probe steps would read the average, so its fixed reward has none.
    Every recommended env builds, and so does REINFORCE's with the paper's fixed-reward form on top, which
    takes the weights themselves again (an average would delay the moving-average reward)."""
    from agents import ALGORITHMS, recommended_env_kwargs
    from agents.factory import PAPER_FIXED_ENV_KWARGS, PREDICTOR_AVERAGE

    averaged = set()
    for a in ALGORITHMS:
        for r in ("fixed", "weighted", "selective"):
            for t in ("classification", "segmentation"):
                kwargs = recommended_env_kwargs(a, r, t)
                if kwargs.get("predictor_average", 0.0) > 0:
                    assert kwargs["predictor_average"] == PREDICTOR_AVERAGE
                    averaged.add((a, r, t))
                env = _env(dataset, reward=r, task=t, **{**kwargs, **TINY})
                assert env.predictor_average == kwargs.get("predictor_average", 0.0)
    assert averaged == {
        *((a, r, t) for a in ALGORITHMS for r in ("weighted", "selective") for t in ("classification", "segmentation")),
        ("reinforce", "fixed", "classification"), ("reinforce", "fixed", "segmentation"),
    }
    paper = _env(dataset, reward="fixed", **{**recommended_env_kwargs("reinforce", "fixed"), **PAPER_FIXED_ENV_KWARGS, **TINY})
    assert (paper.reward_baseline, paper.paired_probe, paper.predictor_average) == ("moving_average", "step", 0.0)
    assert paper.training_selection_rate is None


def test_reinforce_credits_each_of_a_steps_draws_against_the_others(dataset):
    """With the env's ``paired_draws=K`` a step's K draws are K samples of the policy: the rollout keeps
    the further ones with their rewards, each draw's credit is its reward less the mean of the others'
    (over K), and a step whose draws were all paid the same moves the policy not at all."""
    from agents.reinforce import REINFORCE

    env = _env(dataset, reward="fixed", reward_baseline="paired", paired_draws=3, validation_size=8, reward_metric="loss")
    agent = make_agent("reinforce", env, seed=0, normalize_returns=False, class_balance=0.0)
    assert agent.draws == "leave_one_out"
    _, callback = agent._setup_learn(env.episode_length, None)
    rollout = agent.collect_rollout(callback)
    extra, extra_returns = rollout["extra_selections"], rollout["extra_returns"]
    assert extra.shape == (env.episode_length, 1, 2, env.batch_size) and extra.dtype == bool
    assert extra_returns.shape == (env.episode_length, 1, 2) and np.isfinite(extra_returns).all()
    assert np.ptp(np.concatenate([rollout["returns"][..., None], extra_returns], axis=-1), axis=-1).min() > 0
    assert not np.array_equal(extra[:, 0, 0], rollout["selections"][:, 0])  # further draws, not copies
    # The credit of each draw: its reward less the mean of the others', over K.
    own, further = REINFORCE._leave_one_out_draws(np.array([3.0, 5.0]), np.array([[1.0, 2.0], [np.nan, np.nan]]))
    np.testing.assert_allclose(own, [(3 - 1.5) / 3, 5.0])  # a step without further draws keeps its return
    np.testing.assert_allclose(further, [[(1 - 2.5) / 3, (2 - 2) / 3], [0.0, 0.0]])
    # Every draw of every step paid the same: no gradient at all.
    flat = dict(rollout, returns=np.full_like(rollout["returns"], 2.0), extra_returns=np.full_like(extra_returns, 2.0))
    before = [p.detach().clone() for p in agent.policy.parameters()]
    agent.train(flat)
    assert all(torch.equal(b, p) for b, p in zip(before, agent.policy.parameters()))
    agent.train(rollout)  # and different rewards do move it
    assert not all(torch.equal(b, p) for b, p in zip(before, agent.policy.parameters()))
    # draws="own" ignores them, as before the option; bad values are refused.
    own_only = make_agent("reinforce", env, seed=0, draws="own")
    _, callback = own_only._setup_learn(env.episode_length, None)
    assert "extra_returns" not in own_only.collect_rollout(callback)
    with pytest.raises(ValueError, match=r"draws must be one of \('leave_one_out', 'own'\), got 'all'"):
        make_agent("reinforce", env, seed=0, draws="all")
    # Another env's malformed further draws are named, not silently misread.
    bad = {"extra_selections": np.zeros((2, 8), dtype=bool), "extra_rewards": np.zeros(3)}
    with pytest.raises(ValueError, match=r"must be \(K - 1, batch\) with one info\['extra_rewards'\] per row"):
        REINFORCE._extra_draws(bad, own=True)
    with pytest.raises(ValueError, match=r"info\['extra_rewards'\] must be finite"):
        REINFORCE._extra_draws({**bad, "extra_rewards": np.array([0.1, np.nan])}, own=True)


def test_leave_one_out_credit_is_each_draw_against_the_mean_of_its_steps_others():
    """The one definition of the draws' credit, shared by REINFORCE and experiments/reward_ceiling.py."""
    from agents.reinforce import REINFORCE, leave_one_out_credit

    rewards = np.array([[1.0, 2.0, 6.0], [4.0, np.nan, np.nan], [0.5, np.nan, 1.5]])
    credit = leave_one_out_credit(rewards)
    np.testing.assert_allclose(credit[0], [1 - 4, 2 - 3.5, 6 - 1.5])
    np.testing.assert_allclose(credit[1], [4.0, np.nan, np.nan])  # one draw: nothing to compare it with
    np.testing.assert_allclose(credit[2], [0.5 - 1.5, np.nan, 1.5 - 0.5])  # a missing draw is left out
    # REINFORCE's credit is the same divided by the step's number of draws, with 0 for a missing draw.
    own, further = REINFORCE._leave_one_out_draws(rewards[:, 0], rewards[:, 1:])
    np.testing.assert_allclose(own, credit[:, 0] / [3, 1, 2])
    np.testing.assert_allclose(further, [[-1.5 / 3, 4.5 / 3], [0.0, 0.0], [0.0, 1.0 / 2]])
    with pytest.raises(ValueError, match=r"rewards must be \(steps, draws\) with at least one draw, got shape \(3,\)"):
        leave_one_out_credit(np.array([1.0, 2.0, 3.0]))


def test_leave_one_out_credit_over_draws_keeps_the_policy_gradient_and_cuts_its_variance():
    """K draws of Bernoulli(h) with the reward ``w . a``: the draws' leave-one-out credit times
    ``a_k - h`` (the gradient of ``log pi(a_k)`` in the logits) averages to the exact gradient
    ``w h (1 - h)``, with a smaller spread than one draw credited with its plain reward."""
    from agents.reinforce import REINFORCE

    rng = np.random.default_rng(0)
    h, w, k, n = np.array([0.2, 0.5, 0.7, 0.9]), np.array([1.0, -2.0, 0.5, 3.0]), 8, 20_000
    draws = rng.random((n, k, h.size)) < h
    rewards = draws @ w + 5.0  # an offset that a baseline must remove
    own, further = REINFORCE._leave_one_out_draws(rewards[:, 0], rewards[:, 1:])
    credit = np.concatenate([own[:, None], further], axis=1)
    estimates = (credit[..., None] * (draws - h)).sum(axis=1)  # (n, images)
    exact = w * h * (1 - h)
    error = np.abs(estimates.mean(axis=0) - exact) / (estimates.std(axis=0) / np.sqrt(n))
    assert np.all(error < 4), error
    plain = rewards[:, 0, None] * (draws[:, 0] - h)
    assert np.all(estimates.std(axis=0) < 0.5 * plain.std(axis=0))


def test_reinforce_with_the_paired_fixed_reward_takes_smaller_steady_steps_in_segmentation_alone(dataset):
    """agents.factory.PAIRED_TASK_DEFAULTS (learning-status section 72), as built and as recorded; the caller's own wins."""
    from agents.factory import PAIRED_TASK_DEFAULTS, default_settings

    expected = {"classification": (1e-3, 1.0), "segmentation": (2.5e-4, None)}
    assert PAIRED_TASK_DEFAULTS == {"segmentation": {"reinforce": {"learning_rate": 2.5e-4, "return_scale_prior": None}}}
    for task, (rate, prior) in expected.items():
        env = _env(dataset, task=task, reward="fixed", reward_baseline="paired", predictor_warmup_steps=0)
        agent = make_agent("reinforce", env, seed=0)
        assert (agent.learning_rate, agent.return_scale_prior) == (rate, prior), task
        recorded = default_settings("reinforce", "fixed", env.batch_size, env.episode_length, "paired", task=task)
        assert (recorded["learning_rate"], recorded["return_scale_prior"]) == (rate, prior), task
        assert make_agent("reinforce", env, seed=0, learning_rate=5e-4).learning_rate == 5e-4
    # Not without the paired baseline (the paper's form), nor for another algorithm or reward.
    plain = make_agent("reinforce", _env(dataset, task="segmentation", reward="fixed", predictor_warmup_steps=0), seed=0)
    assert (plain.learning_rate, plain.return_scale_prior) == (1e-3, 1.0)
    weighted = default_settings("reinforce", "weighted", 8, 10, task="segmentation")
    assert (weighted["learning_rate"], weighted["return_scale_prior"]) == (1e-3, 1.0)


@pytest.mark.parametrize("name", ["ddpg", "td3"])
def test_the_ratio_critic_standardises_with_the_weighted_reward_and_not_with_the_selective_one(dataset, name):
    """The bandit defaults' one reward-dependent setting (learning-status section 22), as built and as recorded."""
    from agents.factory import default_settings

    for reward, standardise in [("weighted", True), ("selective", False)]:
        env = _env(dataset, reward=reward)
        agent = make_agent(name, env, seed=0)
        assert agent.policy.critic.qf0.standardise == ("dim" if standardise else None), reward
        assert agent.policy.critic.qf0.__class__.__name__ == "RatioQNetwork" and agent.gamma == 0.0
        recorded = default_settings(name, reward, env.batch_size, env.episode_length)["policy_kwargs"]
        assert recorded["critic_standardise"] is standardise and recorded["critic_head"] == "ratio", reward
        # The caller's own choice still wins.
        flipped = make_agent(name, env, seed=0, policy_kwargs={"critic_standardise": not standardise})
        assert flipped.policy.critic.qf0.standardise == (None if standardise else "dim")
