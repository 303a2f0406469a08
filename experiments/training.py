"""One training loop for every algorithm: ``train(TrainConfig(...), out_dir)``.

It builds the env on the patient-level train/validation split, trains the
agent, scores the (untouched) holdout images with the controller before and
after training, and saves the controller, the task predictor and a summary.
``iqa train`` and the experiment scripts call it; tests call it with a tiny
budget.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one training run (logged at its start and saved with its results)."""

    algo: str = "reinforce"
    """RL algorithm: ddpg, reinforce, ppo, a2c, sac or td3."""
    task: str = "classification"
    """Target task: classification or segmentation."""
    reward: str = "weighted"
    """Reward: fixed, weighted or selective."""
    dataset: str | None = None
    """HDF5 dataset path; None for the built-in synthetic ultrasound set."""
    steps: int = 4000
    """Env steps to train for."""
    seed: int = 0
    """Seed of the agent and the env (the patient split uses ``split_seed``)."""
    split_seed: int = 0
    """Seed of the 70/15/15 patient-level split."""
    batch_size: int = 32
    """Images per env step."""
    train_steps: int = 8
    """Predictor training steps per episode."""
    validation_size: int | None = 256
    """Validation images per reward (None: all)."""
    rejection_ratio: float = 0.05
    """Rejection ratio of the selective reward."""
    device: str = "auto"
    """auto, cpu or cuda."""
    eval_every: int = 500
    """Env steps between holdout evaluations of the controller (logged to TensorBoard)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further TaskAmenabilityEnv arguments (they override the fields above)."""
    agent_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further arguments of the algorithm (see agents.default_kwargs)."""

    def validate(self) -> TrainConfig:
        from agents import ALGORITHMS
        from iqa_env.rewards import REWARD_NAMES
        from iqa_env.tasks import TASK_NAMES

        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo must be one of {ALGORITHMS}, got {self.algo!r}")
        if self.task not in TASK_NAMES:
            raise ValueError(f"task must be one of {TASK_NAMES}, got {self.task!r}")
        if self.reward not in REWARD_NAMES:
            raise ValueError(f"reward must be one of {REWARD_NAMES}, got {self.reward!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.dataset is not None and not Path(self.dataset).exists():
            raise FileNotFoundError(f"dataset file {self.dataset} does not exist")
        return self

    @property
    def run_name(self) -> str:
        return f"{self.task}-{self.reward}-{self.algo}-seed{self.seed}"


def load_splits(dataset: str | None, split_seed: int = 0):
    """The dataset (built-in if None) and its train / validation / holdout parts."""
    from iqa_env.data import default_dataset, load_dataset, split_by_group

    full = default_dataset() if dataset is None else load_dataset(dataset)
    return full, split_by_group(full, seed=split_seed)


def make_env(config: TrainConfig, train_set, validation_set):
    """The env of ``config`` on explicit train / validation parts (``env_kwargs`` override the fields)."""
    from iqa_env.env import TaskAmenabilityEnv

    settings = dict(
        task=config.task,
        reward=config.reward,
        rejection_ratio=config.rejection_ratio,
        batch_size=config.batch_size,
        train_steps=config.train_steps,
        validation_size=config.validation_size,
        device=config.device,
    )
    settings.update(config.env_kwargs)
    return TaskAmenabilityEnv(train_set, validation_dataset=validation_set, **settings)


def controller_auroc(controller, holdout, task: str) -> float | None:
    """AUROC of the controller's holdout scores against the ground-truth amenable label (None if unknown)."""
    from iqa_env.metrics import auroc

    if task not in holdout.amenability:
        return None
    amenable = holdout.amenable(task)
    if amenable.all() or not amenable.any():
        return None
    return auroc(controller.score(holdout.images), amenable)


def _atomic_json(path: Path, data: Any) -> None:
    from iqa_env.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=float))


def train(config: TrainConfig, out_dir: str | os.PathLike[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Train one controller; returns (and, with ``out_dir``, saves) the run's summary.

    The summary has the holdout AUROC of the controller against ground-truth
    amenability at initialisation and at the end, and the AUROC curve over
    training (``auroc_curve``: ``[[step, auroc], ...]``).
    """
    from stable_baselines3.common.callbacks import BaseCallback

    from agents import Controller, make_agent

    config.validate()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_json(out / "config.json", dataclasses.asdict(config))
    logger.info("training %s: %s", config.run_name, dataclasses.asdict(config))
    _, (train_set, validation_set, holdout) = load_splits(config.dataset, config.split_seed)
    env = make_env(config, train_set, validation_set)
    agent_kwargs = dict(config.agent_kwargs)
    if out is not None:
        agent_kwargs.setdefault("tensorboard_log", str(out / "tensorboard"))
    agent = make_agent(config.algo, env, seed=config.seed, **agent_kwargs)
    env.reset(seed=config.seed)

    def current_auroc() -> float | None:
        return controller_auroc(Controller.from_agent(agent), holdout, config.task)

    curve: list[tuple[int, float | None]] = [(0, current_auroc())]

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % config.eval_every == 0:
                value = current_auroc()
                curve.append((self.num_timesteps, value))
                if value is not None:
                    self.logger.record("eval/holdout_auroc", value)
            return True

    start = time.perf_counter()
    agent.learn(config.steps, callback=Evaluate(), tb_log_name=config.run_name, progress_bar=progress)
    wall = time.perf_counter() - start
    controller = Controller.from_agent(
        agent, metadata={"task": config.task, "reward": config.reward, "seed": config.seed}
    )
    final = controller_auroc(controller, holdout, config.task)
    if curve[-1][0] != agent.num_timesteps:
        curve.append((agent.num_timesteps, final))
    summary = {
        "run": config.run_name,
        "config": dataclasses.asdict(config),
        "steps": int(agent.num_timesteps),
        "wall_time_s": wall,
        "steps_per_s": agent.num_timesteps / max(wall, 1e-9),
        "initial_auroc": curve[0][1],
        "final_auroc": final,
        "auroc_curve": [[s, a] for s, a in curve],
    }
    if out is not None:
        controller.save(out / "controller")
        state = {k: v.detach().cpu() for k, v in env.predictor.state_dict().items()}
        from iqa_env.files import atomic_write

        atomic_write(out / "predictor.pt", lambda tmp: torch.save(state, tmp))
        _atomic_json(out / "summary.json", summary)
    env.close()
    return summary


def holdout_heuristics(holdout, task: str) -> dict[str, float]:
    """AUROC of simple image statistics against ground-truth amenability: what the RL must beat."""
    from iqa_env.metrics import auroc

    amenable = holdout.amenable(task)
    flat = holdout.images.reshape(len(holdout), -1).astype(np.float64)
    return {
        "mean_intensity": auroc(flat.mean(1), amenable),
        "intensity_std": auroc(flat.std(1), amenable),
    }
