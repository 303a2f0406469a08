"""Replay buffers that keep only the transitions whose reward says something.

In ``TaskAmenability-v0`` with the weighted or selective reward, an episode's
training steps return reward 0 (``info["reward_ready"]`` is False) and only
its validation steps return a reward, computed from *that* step's action on
*that* step's observation.  With ``gamma = 0`` (the validation reward is a
contextual bandit) a training-step transition has the target 0 whatever the
action: it carries no information and, stored, it teaches the critic that
half of all batches are worth nothing regardless of their images.  These
buffers drop such transitions; everything else is SB3's (or
:class:`~agents.index_buffer.IndexReplayBuffer`'s) behaviour.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.buffers import ReplayBuffer

from agents.index_buffer import IndexReplayBuffer


class _RewardReadyMixin:
    """Stores a transition only when every env's ``info["reward_ready"]`` is True (or absent)."""

    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        ready = [bool(info.get("reward_ready", True)) for info in infos]
        if all(ready):
            super().add(obs, next_obs, action, reward, done, infos)  # type: ignore[misc]
        elif any(ready):
            raise ValueError(
                "the envs of this VecEnv are in different phases (some steps have a reward, some not); "
                "a reward-ready replay buffer needs envs with the same episode structure, stepped in lockstep"
            )


class RewardReadyReplayBuffer(_RewardReadyMixin, ReplayBuffer):
    """SB3's :class:`ReplayBuffer` without the transitions that have no reward yet."""


class RewardReadyIndexReplayBuffer(_RewardReadyMixin, IndexReplayBuffer):
    """:class:`~agents.index_buffer.IndexReplayBuffer` without the transitions that have no reward yet."""
