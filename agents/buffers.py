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

The ``ClassLabels`` variants also keep each stored transition's
``info["classes"]`` and ``info["valid"]`` (the class label and validity of
every image of its batch) and sample them with it
(:class:`ClassLabelledSamples`), for DDPG's and TD3's ``class_balance``
(:mod:`agents.deterministic`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.vec_env import VecNormalize

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


class ClassLabelledSamples(NamedTuple):
    """SB3's ``ReplayBufferSamples`` with the class label and validity of every image of each observation."""

    observations: torch.Tensor
    actions: torch.Tensor
    next_observations: torch.Tensor
    dones: torch.Tensor
    rewards: torch.Tensor
    discounts: torch.Tensor | None
    classes: torch.Tensor
    """``(n, B)`` int64 class labels."""
    valid: torch.Tensor
    """``(n, B)`` bool: False for the padding of a batch at the end of the validation set."""


class _ClassLabelsMixin:
    """Keeps ``info["classes"]`` and ``info["valid"]`` of every stored transition and samples them with it.

    The env indices of a sample are the ones the buffer's own ``_get_samples``
    drew: it is run as it is, and its first draw from ``np.random`` (SB3's
    ``np.random.randint(0, n_envs, size=n)``, which
    :class:`~agents.index_buffer.IndexReplayBuffer` repeats) is drawn again
    from the same generator state; ``tests/test_agents.py`` checks that they
    line up with ``n_envs > 1``.
    """

    buffer_size: int
    n_envs: int
    pos: int
    action_space: spaces.Box

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        #: What :meth:`sample` returned last (DDPG's and TD3's ``class_balance`` reads its labels).
        self.last_samples: ClassLabelledSamples | None = None
        b = int(np.prod(self.action_space.shape))
        self.classes = np.zeros((self.buffer_size, self.n_envs, b), dtype=np.int64)
        self.valid = np.ones((self.buffer_size, self.n_envs, b), dtype=bool)

    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        missing = [i for i, info in enumerate(infos) if "classes" not in info]
        if missing:
            raise ValueError(
                f"a replay buffer that keeps class labels needs info['classes'] from every env (the class "
                f"label of each image of the batch, as TaskAmenability-v0 reports); envs {missing} did not"
            )
        b = self.classes.shape[-1]
        classes = np.stack([np.asarray(info["classes"], dtype=np.int64).reshape(-1) for info in infos])
        valid = np.stack([np.asarray(info.get("valid", np.ones(b, dtype=bool)), dtype=bool).reshape(-1) for info in infos])
        if classes.shape != (self.n_envs, b) or valid.shape != classes.shape:
            raise ValueError(
                f"info['classes'] and info['valid'] must hold one entry per image of the batch ({b}), got "
                f"shapes {classes.shape[1:]} and {valid.shape[1:]}"
            )
        if (classes[valid] < 0).any():
            raise ValueError(f"class labels must be integers >= 0, got {sorted(set(classes[valid].tolist()))}")
        self.classes[self.pos], self.valid[self.pos] = classes, valid
        super().add(obs, next_obs, action, reward, done, infos)  # type: ignore[misc]

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> ClassLabelledSamples:
        state = np.random.get_state()
        samples = super()._get_samples(batch_inds, env)  # type: ignore[misc]
        after = np.random.get_state()
        np.random.set_state(state)
        env_indices = np.random.randint(0, high=self.n_envs, size=(len(batch_inds),))
        np.random.set_state(after)
        to_torch = self.to_torch  # type: ignore[attr-defined]
        self.last_samples = ClassLabelledSamples(
            *samples,
            classes=to_torch(self.classes[batch_inds, env_indices]),
            valid=to_torch(self.valid[batch_inds, env_indices]),
        )
        return self.last_samples


class ClassLabelsReplayBuffer(_ClassLabelsMixin, ReplayBuffer):
    """SB3's :class:`ReplayBuffer` that also keeps each transition's class labels."""


class RewardReadyClassLabelsReplayBuffer(_RewardReadyMixin, _ClassLabelsMixin, ReplayBuffer):
    """:class:`RewardReadyReplayBuffer` that also keeps each transition's class labels."""


class ClassLabelsIndexReplayBuffer(_ClassLabelsMixin, IndexReplayBuffer):
    """:class:`~agents.index_buffer.IndexReplayBuffer` that also keeps each transition's class labels."""


class RewardReadyClassLabelsIndexReplayBuffer(_RewardReadyMixin, _ClassLabelsMixin, IndexReplayBuffer):
    """:class:`RewardReadyIndexReplayBuffer` that also keeps each transition's class labels."""


#: The class-keeping variant of each buffer, for ``class_balance > 0``.
WITH_CLASS_LABELS: dict[type[ReplayBuffer], type[ReplayBuffer]] = {
    ReplayBuffer: ClassLabelsReplayBuffer,
    RewardReadyReplayBuffer: RewardReadyClassLabelsReplayBuffer,
    IndexReplayBuffer: ClassLabelsIndexReplayBuffer,
    RewardReadyIndexReplayBuffer: RewardReadyClassLabelsIndexReplayBuffer,
}
