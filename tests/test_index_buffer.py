"""IndexReplayBuffer: indices instead of images, the same samples as SB3's ReplayBuffer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer

from agents import make_agent
from agents.index_buffer import (
    IndexReplayBuffer,
    index_buffer_kwargs,
    replay_buffer_nbytes,
)
from iqa_env.env import TaskAmenabilityEnv
from tests.conftest import random_dataset


def _tiny_env() -> TaskAmenabilityEnv:
    return TaskAmenabilityEnv(random_dataset(), batch_size=8, train_steps=4, validation_size=16, device="cpu")


class _TeeBuffer(IndexReplayBuffer):
    """Stores every transition twice: as indices (itself) and as images (``self.reference``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference = ReplayBuffer(
            self.buffer_size, self.observation_space, self.action_space, device=self.device, n_envs=self.n_envs
        )

    def add(self, *args: Any, **kwargs: Any) -> None:
        super().add(*args, **kwargs)
        self.reference.add(*args, **kwargs)


def test_ddpg_learns_with_index_buffer_and_samples_match_image_buffer() -> None:
    env = _tiny_env()
    agent = make_agent(
        "ddpg", env, seed=0, buffer_size=250, device="cpu",
        replay_buffer_class=_TeeBuffer, replay_buffer_kwargs=index_buffer_kwargs(env),
    )
    agent.learn(200)
    buffer: _TeeBuffer = agent.replay_buffer  # type: ignore[assignment]
    reference = buffer.reference
    assert agent._n_updates > 0  # gradient steps did sample from the index buffer
    assert buffer.pos == reference.pos == 200

    # Every stored transition rebuilds to the very images SB3's buffer kept.
    np.testing.assert_array_equal(buffer.images[buffer.observation_indices[:200]], reference.observations[:200])
    np.testing.assert_array_equal(
        buffer.images[buffer.next_observation_indices[:200]], reference.next_observations[:200]
    )
    # And sampling, from the same np.random state, gives identical batches.
    for seed in range(3):
        np.random.seed(seed)
        ours = buffer.sample(32)
        np.random.seed(seed)
        theirs = reference.sample(32)
        for name in ours._fields:
            a, b = getattr(ours, name), getattr(theirs, name)
            if a is None or b is None:  # optional fields (n-step discounts) unused by both
                assert a is None and b is None, name
                continue
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), name


def test_index_buffer_is_under_a_kilobyte_per_transition() -> None:
    env = TaskAmenabilityEnv(random_dataset(size=64), batch_size=32, train_steps=2, validation_size=32, device="cpu")
    kwargs = index_buffer_kwargs(env)
    ours = IndexReplayBuffer(1000, env.observation_space, env.action_space, device="cpu", **kwargs)
    theirs = ReplayBuffer(1000, env.observation_space, env.action_space, device="cpu")
    mine, sb3 = replay_buffer_nbytes(ours), replay_buffer_nbytes(theirs)
    assert mine["per_transition"] <= 1024
    assert sb3["per_transition"] >= 2 * 32 * 64 * 64  # obs and next_obs as uint8 images
    assert mine["fixed"] == sum(p.nbytes for p in kwargs["images"])
    assert sb3["fixed"] == 0 and mine["capacity"] == sb3["capacity"] == 1000


def test_index_buffer_rejects_unknown_images_and_bad_arguments() -> None:
    images = np.arange(4 * 1 * 8 * 8, dtype=np.uint8).reshape(4, 1, 8, 8)
    obs_space = spaces.Box(0, 255, (2, 1, 8, 8), np.uint8)
    act_space = spaces.Box(0.0, 1.0, (2,), np.float32)
    buffer = IndexReplayBuffer(10, obs_space, act_space, device="cpu", images=images)
    stranger = np.full((1, 2, 1, 8, 8), 7, dtype=np.uint8)
    known = images[None, [1, 3]]
    with pytest.raises(ValueError, match="not one of the buffer's 4 pool images"):
        buffer.add(stranger, known, np.zeros((1, 2)), np.zeros(1), np.zeros(1), [{}])
    buffer.add(known, images[None, [0, 2]], np.zeros((1, 2)), np.zeros(1), np.zeros(1), [{}])
    np.testing.assert_array_equal(buffer.observation_indices[0, 0], [1, 3])
    with pytest.raises(ValueError, match="optimize_memory_usage"):
        IndexReplayBuffer(
            10, obs_space, act_space, optimize_memory_usage=True, handle_timeout_termination=False, images=images
        )
    with pytest.raises(ValueError, match="images="):
        IndexReplayBuffer(10, obs_space, act_space)
    with pytest.raises(ValueError, match=r"images\[0\] must be an \(N, 1, 8, 8\) uint8"):
        IndexReplayBuffer(10, obs_space, act_space, images=images.astype(np.float32))
