"""``make_agent(name, env)``: any supported algorithm, with per-sample policies and sensible defaults."""

from __future__ import annotations

import copy
from typing import Any

from stable_baselines3 import A2C, DDPG, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.type_aliases import GymEnv

from agents.noise import ProbabilityOUNoise
from agents.policies import PerSampleActorCriticPolicy, PerSampleSACPolicy, PerSampleTD3Policy
from agents.reinforce import REINFORCE

ALGORITHMS: tuple[str, ...] = ("ddpg", "reinforce", "ppo", "a2c", "sac", "td3")


def _episode_length(env: GymEnv) -> int:
    try:
        return int(env.get_attr("episode_length")[0])  # type: ignore[union-attr]
    except AttributeError:
        return int(getattr(getattr(env, "unwrapped", env), "episode_length", 32))


def default_kwargs(name: str, env: GymEnv, seed: int | None = None) -> dict[str, Any]:
    """The defaults :func:`make_agent` uses for ``name`` (a fresh dict on every call)."""
    batch = int(env.action_space.shape[0])  # type: ignore[index]
    episode = _episode_length(env)
    off_policy = dict(buffer_size=5_000, learning_starts=2 * episode, batch_size=16, train_freq=1, gradient_steps=1)
    table: dict[str, dict[str, Any]] = {
        # The paper's DDPG: tau = 0.001, OU noise (0.2, 0.15) in probability units.
        "ddpg": dict(
            learning_rate=1e-3,
            tau=0.001,
            gamma=0.9,
            action_noise=ProbabilityOUNoise(batch, sigma=0.2, theta=0.15, seed=seed),
            **off_policy,
        ),
        "td3": dict(
            learning_rate=1e-3,
            gamma=0.9,
            action_noise=ProbabilityOUNoise(batch, sigma=0.2, theta=0.15, seed=seed),
            **off_policy,
        ),
        "sac": dict(learning_rate=1e-3, gamma=0.9, **off_policy),
        "ppo": dict(learning_rate=3e-4, n_steps=max(episode, 16), batch_size=max(episode, 16), n_epochs=4, gamma=0.9),
        "a2c": dict(learning_rate=7e-4, n_steps=max(episode, 16), gamma=0.9),
        "reinforce": dict(learning_rate=1e-3),
    }
    if name not in table:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {name!r}")
    return table[name]


_CLASSES: dict[str, tuple[type[BaseAlgorithm], Any]] = {
    "ddpg": (DDPG, PerSampleTD3Policy),
    "td3": (TD3, PerSampleTD3Policy),
    "sac": (SAC, PerSampleSACPolicy),
    "ppo": (PPO, PerSampleActorCriticPolicy),
    "a2c": (A2C, PerSampleActorCriticPolicy),
    "reinforce": (REINFORCE, "PerSamplePolicy"),
}


def make_agent(name: str, env: GymEnv, seed: int | None = None, **kwargs: Any) -> BaseAlgorithm:
    """A stable-baselines3 algorithm (or :class:`~agents.reinforce.REINFORCE`) for ``TaskAmenability-v0``.

    Every algorithm gets a per-sample policy from :mod:`agents.policies`, so
    its controller can be exported with :meth:`agents.Controller.from_agent`.
    ``kwargs`` override the defaults of :func:`default_kwargs`; ``policy_kwargs``
    is deep-copied (SB3 mutates the dict it is given).
    """
    name = name.lower()
    options = default_kwargs(name, env, seed)
    options.update(kwargs)
    options["policy_kwargs"] = copy.deepcopy(options.get("policy_kwargs") or {})
    algorithm, policy = _CLASSES[name]
    return algorithm(policy, env, seed=seed, **options)
