"""Checkpoints of a training run: written atomically, read back to resume where the run stopped.

A checkpoint is a folder, ``RUN/checkpoint/``:

| file | what | read with |
|------|------|-----------|
| ``checkpoint.json`` | format, step counter, AUROC curve so far, wall time, resumes, config | ``json`` |
| ``agent.zip`` | the stable-baselines3 agent (``agent.save``): policy, optimiser states, counters | ``Algo.load`` (unpickles: trusted files only) |
| ``env.pt`` | ``TaskAmenabilityEnv.state_dict()``: predictor, its optimiser, generators, baselines, episode position | ``torch.load(weights_only=True)`` |
| ``rng.pt`` | the global ``random`` / ``numpy`` / ``torch`` generators, the action space's and the Monitor's episode so far | ``torch.load(weights_only=True)`` |
| ``replay_buffer.npz`` | off-policy agents: the filled part of the replay buffer, images as pool indices | ``numpy.load(allow_pickle=False)`` |

It is written to a temporary folder beside it, which is then renamed into
place (the previous checkpoint is first renamed to ``checkpoint.old`` and
removed after), so a reader finds a whole checkpoint, old or new, never a
half-written one.  :func:`find_checkpoint` looks at ``checkpoint`` and then at
``checkpoint.old`` (the only one left if a run is killed between the two
renames).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.factory import without_log_folder
from agents.index_buffer import TRANSITION_ARRAYS

FORMAT = "iqa-train-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
OLD_DIR = "checkpoint.old"
TMP_PREFIX = ".checkpoint-"
TMP_SUFFIX = ".tmp"
META_NAME = "checkpoint.json"
AGENT_NAME = "agent.zip"
ENV_NAME = "env.pt"
RNG_NAME = "rng.pt"
BUFFER_NAME = "replay_buffer.npz"

#: Per-transition arrays of SB3's ReplayBuffer and of agents.index_buffer.IndexReplayBuffer.
_OBSERVATION_ARRAYS: tuple[str, ...] = ("observations", "next_observations")
_OTHER_ARRAYS: tuple[str, ...] = tuple(name for name in TRANSITION_ARRAYS if name not in _OBSERVATION_ARRAYS)


# ---------------------------------------------------------------- image pool
class ImagePool:
    """Finds the pool index of each image of a batch of observations, to store indices instead of pixels.

    An observation of ``TaskAmenability-v0`` is a batch of images from the
    env's training and validation images, so a replay buffer's observations
    are stored as ``int32`` indices into that pool (``4 * B`` bytes instead of
    ``B * C * H * W``) and rebuilt exactly on loading.  Images are matched by a
    64-bit fingerprint (a fixed random linear hash of their bytes), then
    compared in full; if any image is not in the pool, :meth:`indices` gives
    None and the pixels are stored as they are.
    """

    def __init__(self, images: np.ndarray) -> None:
        self.images = np.ascontiguousarray(images)
        self.image_shape = tuple(self.images.shape[1:])
        self._flat = self.images.reshape(len(self.images), -1)
        self._weights = np.random.default_rng(0).integers(
            0, 2**63, size=-(-self._flat.shape[1] // 8), dtype=np.uint64
        ) * np.uint64(2) + np.uint64(1)
        fingerprints = self._fingerprints(self._flat)
        self._order = np.argsort(fingerprints, kind="stable")
        self._sorted = fingerprints[self._order]

    def _fingerprints(self, flat: np.ndarray, chunk: int = 4096) -> np.ndarray:
        out = np.empty(len(flat), dtype=np.uint64)
        pad = (-flat.shape[1]) % 8
        for i in range(0, len(flat), chunk):
            part = flat[i : i + chunk]
            if part.dtype != np.uint8:
                part = part.view(np.uint8)
            if pad:
                part = np.pad(part, ((0, 0), (0, pad)))
            words = np.ascontiguousarray(part).view(np.uint64)
            with np.errstate(over="ignore"):
                out[i : i + chunk] = (words * self._weights).sum(axis=1, dtype=np.uint64)
        return out

    def indices(self, observations: np.ndarray, chunk: int = 4096) -> np.ndarray | None:
        """Pool indices, shape ``observations.shape[:-3]``, or None if some image is not in the pool."""
        if len(self.images) == 0 or tuple(observations.shape[-3:]) != self.image_shape:
            return None
        if observations.dtype != self.images.dtype:
            return None
        lead = observations.shape[:-3]
        flat = np.ascontiguousarray(observations).reshape(-1, self._flat.shape[1])
        dtype = np.int32 if len(self.images) <= np.iinfo(np.int32).max else np.int64
        out = np.empty(len(flat), dtype=dtype)
        for i in range(0, len(flat), chunk):
            part = flat[i : i + chunk]
            fp = self._fingerprints(part)
            pos = np.minimum(np.searchsorted(self._sorted, fp), len(self._sorted) - 1)
            if not np.array_equal(self._sorted[pos], fp):
                return None
            idx = self._order[pos]
            if not np.array_equal(self._flat[idx], part):
                return None
            out[i : i + chunk] = idx
        return out.reshape(lead)

    def take(self, indices: np.ndarray) -> np.ndarray:
        if indices.size and (indices.min() < 0 or indices.max() >= len(self.images)):
            raise ValueError(
                f"replay buffer indices outside the pool of {len(self.images)} images: the checkpoint was "
                "written for other data"
            )
        return self.images[indices]


def env_image_pool(env: Any) -> ImagePool:
    """The pool of a ``TaskAmenabilityEnv``: its training then its validation images."""
    base = getattr(env, "unwrapped", env)
    return ImagePool(np.concatenate([base.train_set.images, base.validation_set.images]))


# --------------------------------------------------------------- replay buffer
def _filled(buffer: Any) -> int:
    if getattr(buffer, "optimize_memory_usage", False):
        return int(buffer.buffer_size)  # next observations live one slot ahead: keep every slot
    return int(buffer.buffer_size) if buffer.full else int(buffer.pos)


def save_replay_buffer(buffer: Any, path: str | os.PathLike[str], pool: ImagePool | None = None) -> None:
    """Write the filled part of an SB3 ``ReplayBuffer`` (or ``IndexReplayBuffer``) to an ``.npz`` file.

    No pickle: plain arrays and a JSON header, read back with
    ``allow_pickle=False``.  With ``pool``, observations are stored as pool
    indices when every image is found there (see :class:`ImagePool`).
    """
    from stable_baselines3.common.buffers import ReplayBuffer

    if not isinstance(buffer, ReplayBuffer):
        raise TypeError(
            f"checkpoints support stable-baselines3 ReplayBuffer and its subclasses, got {type(buffer).__name__}"
        )
    n = _filled(buffer)
    arrays: dict[str, np.ndarray] = {}
    for name in _OBSERVATION_ARRAYS:
        data = getattr(buffer, name, None)
        if not isinstance(data, np.ndarray):
            continue
        indices = pool.indices(data[:n]) if pool is not None else None
        if indices is not None:
            arrays[f"{name}__pool"] = indices
        else:
            arrays[name] = data[:n]
    for name in _OTHER_ARRAYS:
        data = getattr(buffer, name, None)
        if isinstance(data, np.ndarray):
            arrays[name] = data[:n]
    header = {
        "class": type(buffer).__name__,
        "buffer_size": int(buffer.buffer_size),
        "n_envs": int(buffer.n_envs),
        "pos": int(buffer.pos),
        "full": bool(buffer.full),
        "filled": n,
    }
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_replay_buffer(buffer: Any, path: str | os.PathLike[str], pool: ImagePool | None = None) -> None:
    """Fill a freshly built replay buffer from :func:`save_replay_buffer`'s file."""
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(bytes(data["header"]).decode())
        mine = {"class": type(buffer).__name__, "buffer_size": int(buffer.buffer_size), "n_envs": int(buffer.n_envs)}
        differ = [f"{k}: saved {header.get(k)!r}, now {v!r}" for k, v in mine.items() if header.get(k) != v]
        if differ:
            raise ValueError(f"{path}: the replay buffer was saved from another buffer ({'; '.join(differ)})")
        n = int(header["filled"])
        for name in (*_OBSERVATION_ARRAYS, *_OTHER_ARRAYS):
            target = getattr(buffer, name, None)
            if f"{name}__pool" in data.files:
                if pool is None:
                    raise ValueError(f"{path}: observations are stored as pool indices; pass the env's image pool")
                values = pool.take(data[f"{name}__pool"])
            elif name in data.files:
                values = data[name]
            else:
                if isinstance(target, np.ndarray):
                    raise ValueError(f"{path}: no {name} saved for this replay buffer")
                continue
            if not isinstance(target, np.ndarray) or target[:n].shape != values.shape:
                got = None if not isinstance(target, np.ndarray) else target[:n].shape
                raise ValueError(f"{path}: {name} has shape {values.shape}, the buffer expects {got}")
            target[:n] = values
    buffer.pos, buffer.full = int(header["pos"]), bool(header["full"])


# ------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """The global ``random``, ``numpy`` and ``torch`` generators, as tensors and plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _action_space_rng(agent: Any) -> dict[str, Any] | None:
    """The state of the generator of the agent's action space (its random actions before ``learning_starts``)."""
    space = getattr(agent, "action_space", None)
    generator = getattr(space, "_np_random", None)
    return None if generator is None else generator.bit_generator.state


def _monitor(agent: Any) -> Any:
    from stable_baselines3.common.monitor import Monitor

    env = getattr(agent, "env", None)
    envs = getattr(env, "envs", None)
    if envs and len(envs) == 1 and isinstance(envs[0], Monitor):
        return envs[0]
    return None


# ---------------------------------------------------------------------- write
def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale(out: str | os.PathLike[str]) -> None:
    """Remove temporary checkpoint folders left by a run killed while writing one."""
    for path in Path(out).glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def remove_checkpoints(out: str | os.PathLike[str]) -> None:
    """Remove every checkpoint of the run folder ``out`` (current, previous and temporary)."""
    out = Path(out)
    remove_stale(out)
    for name in (CHECKPOINT_DIR, OLD_DIR):
        if (out / name).exists():
            shutil.rmtree(out / name)


def write_checkpoint(
    out: str | os.PathLike[str],
    agent: Any,
    env: Any,
    progress: dict[str, Any],
    pool: ImagePool | None = None,
) -> Path:
    """Write ``out/checkpoint/`` atomically; ``progress`` (JSON-serialisable) goes to ``checkpoint.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=TMP_PREFIX, suffix=TMP_SUFFIX))
    final, old = out / CHECKPOINT_DIR, out / OLD_DIR
    try:
        agent.save(tmp / AGENT_NAME)
        torch.save(getattr(env, "unwrapped", env).state_dict(), tmp / ENV_NAME)
        monitor = _monitor(agent)
        monitor_state = (
            None
            if monitor is None
            else {"rewards": [float(r) for r in monitor.rewards], "total_steps": int(monitor.total_steps)}
        )
        torch.save(
            {"rng": rng_state(), "monitor": monitor_state, "action_space": _action_space_rng(agent)}, tmp / RNG_NAME
        )
        files = [AGENT_NAME, ENV_NAME, RNG_NAME]
        buffer = getattr(agent, "replay_buffer", None)
        if buffer is not None:
            save_replay_buffer(buffer, tmp / BUFFER_NAME, pool)
            files.append(BUFFER_NAME)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files, **progress}
        # Written last: a folder with checkpoint.json is a whole checkpoint.
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, default=float))
        _fsync_tree(tmp)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)  # ``final`` is whole, so the previous one is no longer needed
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------- read
def find_checkpoint(out: str | os.PathLike[str]) -> Path | None:
    """The run folder's whole checkpoint (``checkpoint/``, else ``checkpoint.old/``), or None."""
    for name in (CHECKPOINT_DIR, OLD_DIR):
        folder = Path(out) / name
        if (folder / META_NAME).is_file():
            return folder
    return None


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    from iqa_env.files import read_versioned_json

    return read_versioned_json(
        Path(folder) / META_NAME, FORMAT, FORMAT_VERSION, "a training checkpoint",
        "remove the checkpoint folder to start again",
    )


def restore(
    folder: str | os.PathLike[str],
    agent_class: Any,
    env: Any,
    pool: ImagePool | None = None,
    device: str | torch.device = "auto",
    **load_kwargs: Any,
) -> Any:
    """The agent of a checkpoint, on ``env``, with the env, buffer, generators and episode restored.

    ``agent_class.load`` unpickles ``agent.zip``: only load checkpoints you
    (or someone you trust) wrote.  The env must be built with the same
    arguments as the one that was saved.  Call ``learn(remaining,
    reset_num_timesteps=False)`` next; stable-baselines3's ``learn`` resets the
    action noise, so put :func:`action_noise_restorer`'s callback in it to
    continue the noise where it was.
    """
    folder = Path(folder)
    agent = without_log_folder(
        agent_class.load(folder / AGENT_NAME, env=env, device=device, force_reset=False, **load_kwargs)
    )
    buffer = getattr(agent, "replay_buffer", None)
    if buffer is not None:
        if not (folder / BUFFER_NAME).is_file():
            raise ValueError(f"{folder}: no {BUFFER_NAME} for the off-policy agent's replay buffer")
        load_replay_buffer(buffer, folder / BUFFER_NAME, pool)
    # A fresh VecEnv / Monitor must be reset once before it steps; the env's state then replaces the reset's.
    agent.env.reset()
    base = getattr(env, "unwrapped", env)
    base.load_state_dict(torch.load(folder / ENV_NAME, map_location="cpu", weights_only=True))
    extra = torch.load(folder / RNG_NAME, map_location="cpu", weights_only=True)
    monitor = _monitor(agent)
    if monitor is not None and extra.get("monitor") is not None:
        monitor.rewards = list(extra["monitor"]["rewards"])
        monitor.total_steps = int(extra["monitor"]["total_steps"])
    set_rng_state(extra["rng"])
    # stable-baselines3's load seeds the action space again (``_setup_model``), which would repeat the
    # random actions of the first steps in a run resumed before ``learning_starts``.
    if extra.get("action_space") is not None and getattr(agent, "action_space", None) is not None:
        agent.action_space.np_random.bit_generator.state = extra["action_space"]
    return agent


def action_noise_restorer(agent: Any) -> Any:
    """A callback that puts the agent's action noise back as it is now when ``learn`` starts."""
    from stable_baselines3.common.callbacks import BaseCallback

    noise = getattr(agent, "action_noise", None)
    saved = None if noise is None else copy.deepcopy(noise.__dict__)

    class RestoreNoise(BaseCallback):
        def _on_training_start(self) -> None:
            if noise is not None and saved is not None:
                noise.__dict__.update(copy.deepcopy(saved))

        def _on_step(self) -> bool:
            return True

    return RestoreNoise()
