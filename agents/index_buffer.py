"""A replay buffer that stores image indices instead of images.

An observation of ``TaskAmenability-v0`` is a mini-batch of ``B`` images drawn
from a fixed pool (the training and validation images), so a transition is
fully described by the pool indices of its observation and next observation.
SB3's :class:`~stable_baselines3.common.buffers.ReplayBuffer` stores both
observations as ``uint8`` arrays, ``2 * B * C * H * W`` bytes a transition
(256 KiB at ``B = 32`` and 64 x 64 images); :class:`IndexReplayBuffer` stores
``2 * B`` integer indices instead (about 400 bytes in all) and rebuilds the
images when it samples, bit for bit the same.

Observations are matched to pool images by content (a 16-byte BLAKE2b digest
per image, then an exact comparison), so the buffer needs nothing from the
env but its images: it works with any VecEnv, with ``n_envs > 1``, and with
the terminal observations SB3 passes on episode ends.

```python
from agents import make_agent
from agents.index_buffer import IndexReplayBuffer, index_buffer_kwargs

agent = make_agent(
    "ddpg", env, replay_buffer_class=IndexReplayBuffer, replay_buffer_kwargs=index_buffer_kwargs(env)
)
```
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer, ReplayBuffer
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

#: Per-transition arrays of SB3's ReplayBuffer and of IndexReplayBuffer (those present are counted).
TRANSITION_ARRAYS: tuple[str, ...] = (
    "observations",
    "next_observations",
    "observation_indices",
    "next_observation_indices",
    "actions",
    "rewards",
    "dones",
    "timeouts",
    "classes",  # the class-label buffers of agents.buffers
    "valid",
)


def _digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


class IndexReplayBuffer(ReplayBuffer):
    """SB3 replay buffer for observations that are batches of images from a fixed pool.

    Stores, per transition, the pool indices of the observation's and the
    next observation's images ``(B,)`` each, plus SB3's actions, rewards,
    dones and timeouts; :meth:`sample` returns the same
    :class:`~stable_baselines3.common.type_aliases.ReplayBufferSamples` as
    SB3's buffer would for the same transitions (same dtypes, same values,
    same use of ``np.random``).  Use it through an off-policy algorithm's
    ``replay_buffer_class`` / ``replay_buffer_kwargs`` (see
    :func:`index_buffer_kwargs`).

    :param buffer_size: most transitions kept (over all envs)
    :param observation_space: ``Box`` of ``(B, C, H, W)`` images
    :param action_space: the action space
    :param device: torch device of the sampled tensors
    :param n_envs: number of parallel envs
    :param optimize_memory_usage: must be False (indices are already small)
    :param handle_timeout_termination: treat truncations as non-terminal, as SB3 does
    :param images: the pool: one ``(N, C, H, W)`` array, or several that are concatenated
        (e.g. the training and the validation images); every observed image must be in it
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        *,
        images: np.ndarray | Sequence[np.ndarray] | None = None,
    ) -> None:
        if optimize_memory_usage:
            raise ValueError(
                "optimize_memory_usage must be False for IndexReplayBuffer: it stores indices, not "
                "observations, so there is nothing left to share between obs and next_obs"
            )
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 4:
            raise ValueError(
                "IndexReplayBuffer needs observations that are batches of images, a Box of shape "
                f"(B, C, H, W) (as TaskAmenability-v0 gives), got {observation_space}"
            )
        if images is None:
            raise ValueError(
                "IndexReplayBuffer needs images=: the pool of images the observations are drawn from; "
                "pass replay_buffer_kwargs=index_buffer_kwargs(env)"
            )
        # SB3's ReplayBuffer.__init__ would allocate the image arrays this class exists to avoid.
        BaseBuffer.__init__(self, buffer_size, observation_space, action_space, device, n_envs=n_envs)
        self.buffer_size = max(buffer_size // n_envs, 1)
        self.optimize_memory_usage = False
        self.handle_timeout_termination = handle_timeout_termination

        parts = [images] if isinstance(images, np.ndarray) else list(images)
        if not parts:
            raise ValueError("images must hold at least one (N, C, H, W) array, got an empty sequence")
        image_shape = tuple(observation_space.shape[1:])
        for k, part in enumerate(parts):
            part = np.asarray(part)
            if part.ndim != 4 or tuple(part.shape[1:]) != image_shape or part.dtype != observation_space.dtype:
                raise ValueError(
                    f"images[{k}] must be an (N, {', '.join(map(str, image_shape))}) {observation_space.dtype} "
                    f"array to match the observation space, got shape {part.shape} and dtype {part.dtype}"
                )
        self.images = np.ascontiguousarray(np.concatenate([np.asarray(p) for p in parts]))
        if len(self.images) == 0:
            raise ValueError("images is empty: the pool needs at least one image")
        self._index: dict[bytes, int] = {}
        for i, image in enumerate(self.images):
            self._index.setdefault(_digest(image), i)  # identical images share one index
        index_dtype = np.int32 if len(self.images) <= np.iinfo(np.int32).max else np.int64
        batch = int(observation_space.shape[0])

        self.observation_indices = np.zeros((self.buffer_size, self.n_envs, batch), dtype=index_dtype)
        self.next_observation_indices = np.zeros((self.buffer_size, self.n_envs, batch), dtype=index_dtype)
        self.actions = np.zeros(
            (self.buffer_size, self.n_envs, self.action_dim), dtype=self._maybe_cast_dtype(action_space.dtype)
        )
        self.rewards = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)
        self.dones = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)
        self.timeouts = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)

    # ------------------------------------------------------------------ sizes
    @property
    def fixed_nbytes(self) -> int:
        """Bytes held whatever the number of transitions: the image pool (the digest map not counted)."""
        return int(self.images.nbytes)

    # ------------------------------------------------------------------ store
    def _lookup(self, batch: np.ndarray, what: str) -> np.ndarray:
        """Pool indices ``(B,)`` of the images of one observation ``(B, C, H, W)``."""
        indices = np.empty(len(batch), dtype=self.observation_indices.dtype)
        for j, image in enumerate(batch):
            i = self._index.get(_digest(image))
            if i is None:
                raise ValueError(
                    f"image {j} of the {what} is not one of the buffer's {len(self.images)} pool images; "
                    "IndexReplayBuffer can only store observations made of the images it was given "
                    "(index_buffer_kwargs(env) gives the env's training and validation images)"
                )
            indices[j] = i
        # A digest collision would silently store the wrong image: rule it out exactly.
        if not np.array_equal(self.images[indices], batch):
            raise RuntimeError(f"the {what} does not match the pool images its digests point to")
        return indices

    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        """Store one transition per env: image indices for ``obs`` and ``next_obs``, the rest as SB3 does."""
        obs = np.asarray(obs).reshape((self.n_envs, *self.obs_shape))
        next_obs = np.asarray(next_obs).reshape((self.n_envs, *self.obs_shape))
        for e in range(self.n_envs):
            self.observation_indices[self.pos, e] = self._lookup(obs[e], f"observation of env {e}")
            self.next_observation_indices[self.pos, e] = self._lookup(next_obs[e], f"next observation of env {e}")
        self.actions[self.pos] = np.array(action).reshape((self.n_envs, self.action_dim))
        self.rewards[self.pos] = np.array(reward)
        self.dones[self.pos] = np.array(done)
        if self.handle_timeout_termination:
            self.timeouts[self.pos] = np.array([info.get("TimeLimit.truncated", False) for info in infos])
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True
            self.pos = 0

    # ----------------------------------------------------------------- sample
    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> ReplayBufferSamples:
        # The same draw as SB3's ReplayBuffer, so both buffers sample alike from one seed.
        env_indices = np.random.randint(0, high=self.n_envs, size=(len(batch_inds),))
        observations = self.images[self.observation_indices[batch_inds, env_indices]]
        next_observations = self.images[self.next_observation_indices[batch_inds, env_indices]]
        data = (
            self._normalize_obs(observations, env),
            self.actions[batch_inds, env_indices, :],
            self._normalize_obs(next_observations, env),
            (self.dones[batch_inds, env_indices] * (1 - self.timeouts[batch_inds, env_indices])).reshape(-1, 1),
            self._normalize_reward(self.rewards[batch_inds, env_indices].reshape(-1, 1), env),
        )
        return ReplayBufferSamples(*tuple(map(self.to_torch, data)))


def index_buffer_kwargs(env: Any) -> dict[str, Any]:
    """``replay_buffer_kwargs`` for :class:`IndexReplayBuffer` on a ``TaskAmenability-v0`` env.

    The pool is the env's training and validation images (every observation
    is drawn from one of the two).  ``env`` may be the env, a wrapper of it,
    or a VecEnv of envs on the same data.
    """
    try:
        if isinstance(env, VecEnv):
            train_set, validation_set = env.get_attr("train_set")[0], env.get_attr("validation_set")[0]
        else:
            base = getattr(env, "unwrapped", env)
            train_set, validation_set = base.train_set, base.validation_set
        pools = [train_set.images, validation_set.images]
    except AttributeError as e:
        raise ValueError(
            f"{type(env).__name__} has no train_set / validation_set images; pass "
            "replay_buffer_kwargs={'images': ...} with the pool of observation images yourself"
        ) from e
    return {"images": pools}


def replay_buffer_nbytes(buffer: ReplayBuffer) -> dict[str, float]:
    """Memory of a replay buffer: ``per_transition`` bytes, ``fixed`` bytes and ``capacity`` (transitions).

    ``per_transition`` is the size of the per-transition arrays (allocated for
    the whole capacity, whether filled or not) divided by the capacity;
    ``fixed`` is what does not grow with the capacity (the image pool of an
    :class:`IndexReplayBuffer`, 0 for SB3's buffer).
    """
    capacity = int(buffer.buffer_size) * int(buffer.n_envs)
    total = sum(
        int(array.nbytes)
        for name in TRANSITION_ARRAYS
        if isinstance(array := getattr(buffer, name, None), np.ndarray)
    )
    fixed = buffer.fixed_nbytes if isinstance(buffer, IndexReplayBuffer) else 0
    return {"per_transition": total / capacity, "fixed": float(fixed), "capacity": float(capacity)}
