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
import pickle
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)
#: One DEBUG line per holdout evaluation of a run (``<run>: step N, holdout AUROC x (T s)``):
#: ``iqa -v train`` and ``iqa train --no-progress`` show them; ``experiments/seed_study.py`` and
#: ``iqa reproduce`` show them for each of their runs (:func:`show_evaluations`), and the latter also
#: logs its baseline predictors' updates here.
evaluation_logger = logging.getLogger(__name__ + ".evaluations")


class _CurrentStderr(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a line is logged, not when it was made
    (a caller that replaces ``sys.stderr`` later, as pytest does for each test, still gets the lines)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_evaluations() -> None:
    """Print :data:`evaluation_logger`'s lines on stderr, indented, whatever the logging set-up.

    For the runs of long studies, in their worker processes (spawned: they do not inherit the
    caller's logging) or in the caller: each run then says where it stands as it goes.  Calling it
    again adds no second handler.
    """
    if not any(isinstance(h, _CurrentStderr) for h in evaluation_logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("  %(message)s"))
        evaluation_logger.addHandler(handler)
    evaluation_logger.setLevel(logging.DEBUG)
    evaluation_logger.propagate = False


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
    batch_size: int | str = "auto"
    """Images per env step ("auto": the number ``agents.recommended_env_kwargs`` gives the algorithm,
    16 for REINFORCE, else 32; a run records the number)."""
    train_steps: int = 8
    """Predictor training steps per episode."""
    validation_size: int | str | None = "auto"
    """Validation images per reward (None: all; "auto": the number ``agents.recommended_env_kwargs``
    gives the algorithm and reward, 32 for DDPG with the fixed reward, else 256; a run records the number)."""
    rejection_ratio: float = 0.05
    """Rejection ratio of the selective reward."""
    device: str = "auto"
    """auto, cpu or cuda."""
    eval_every: int = 500
    """Env steps between holdout evaluations of the controller (logged to TensorBoard)."""
    mirror_average: bool = True
    """Score each image as the mean of the controller's scores of it and of its mirror image (left-right):
    the exported controller's ``mirror_average``, used for every score of the run (``docs/learning-status.md``,
    section 86). False for images whose mirror is another kind of image."""
    checkpoint_every: int = 500
    """Env steps between checkpoints of the run folder (0: none); see docs/reliability.md."""
    time_limit_s: float | None = None
    """Wall-clock limit of the training in seconds (None: none): the run stops at the first env step
    past it and is then finished, with fewer than ``steps`` steps (its summary says ``time_limited``), or
    paused, to go on later (``train(..., pause_at_time_limit=True)``)."""
    warmup_cache: str | None = None
    """A folder where the env keeps its predictor warm-up, so that runs whose warm-up would be the same
    (same seed, data and predictor settings, other rewards) load it instead of computing it again; the
    results do not change (TaskAmenabilityEnv's ``warmup_cache``).  None: every run warms up itself."""
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
        from iqa_env.checks import is_count, is_positive_number, is_whole_number
        from iqa_env.env import resolve_device

        if not is_count(self.steps):
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps!r}")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if not is_whole_number(value):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        from iqa_env.rewards import check_rejection_ratio

        if self.batch_size != "auto" and not is_count(self.batch_size):
            raise ValueError(
                f"batch_size must be a positive integer or 'auto' (the algorithm's recommended number), "
                f"got {self.batch_size!r}"
            )
        if not is_count(self.train_steps):
            raise ValueError(f"train_steps must be a positive integer, got {self.train_steps!r}")
        if self.validation_size is not None and self.validation_size != "auto" and not is_count(self.validation_size):
            raise ValueError(
                f"validation_size must be a positive integer, None (all) or 'auto' (the algorithm's "
                f"recommended number), got {self.validation_size!r}"
            )
        check_rejection_ratio(self.rejection_ratio)
        resolve_device(self.device)
        if not is_whole_number(self.checkpoint_every):
            raise ValueError(
                f"checkpoint_every must be an integer >= 0 (0: no checkpoints), got {self.checkpoint_every!r}"
            )
        if not is_count(self.eval_every):
            raise ValueError(f"eval_every must be a positive integer, got {self.eval_every!r}")
        if not isinstance(self.mirror_average, bool):  # a numpy bool would be written to config.json as 1.0
            raise ValueError(
                f"mirror_average must be True or False, got {type(self.mirror_average).__name__} {self.mirror_average!r}"
            )
        if self.time_limit_s is not None and not is_positive_number(self.time_limit_s):
            raise ValueError(
                f"time_limit_s must be a positive number of seconds or None (no limit), got {self.time_limit_s!r}"
            )
        self._check_agent_kwargs()
        if self.warmup_cache is not None:
            if not isinstance(self.warmup_cache, (str, os.PathLike)):
                raise ValueError(f"warmup_cache must be None or a folder path, got {self.warmup_cache!r}")
            from iqa_env.files import check_warmup_cache

            check_warmup_cache(self.warmup_cache)  # before any file of the run is written
        if self.dataset is not None and not Path(self.dataset).exists():
            raise FileNotFoundError(f"dataset file {self.dataset} does not exist")
        return self

    def _check_agent_kwargs(self) -> None:
        """``agent_kwargs``' names and values (:func:`agents.factory.check_agent_kwargs`), before any file.

        The ``agent_kwargs: `` in front tells them from the env's settings of the same name (``batch_size``).
        """
        from agents.factory import check_agent_kwargs, learning_rate_schedule

        if not isinstance(self.agent_kwargs, dict):
            raise ValueError(f"agent_kwargs must be a dict of the algorithm's arguments, got {self.agent_kwargs!r}")
        try:
            # names and values, of the algorithm's, its per-sample policy's and their extractor's settings
            check_agent_kwargs(self.algo, self.agent_kwargs)
            if "learning_rate" in self.agent_kwargs:
                learning_rate_schedule(self.agent_kwargs["learning_rate"])
        except ValueError as e:
            raise ValueError(f"agent_kwargs: {e}") from None

    def resolved(self) -> TrainConfig:
        """A copy with ``"auto"`` sizes replaced by the numbers they stand for (what a run records)."""
        if self.validation_size != "auto" and self.batch_size != "auto":
            return self
        from agents import recommended_env_kwargs
        from agents.factory import DEFAULT_BATCH_SIZE, DEFAULT_VALIDATION_SIZE

        recommended = recommended_env_kwargs(self.algo, self.reward, self.task)
        fields: dict[str, Any] = {}
        if self.validation_size == "auto":
            fields["validation_size"] = recommended.get("validation_size", DEFAULT_VALIDATION_SIZE)
        if self.batch_size == "auto":
            fields["batch_size"] = recommended.get("batch_size", DEFAULT_BATCH_SIZE)
        return dataclasses.replace(self, **fields)

    @property
    def run_name(self) -> str:
        return f"{self.task}-{self.reward}-{self.algo}-seed{self.seed}"


def load_splits(dataset: str | None, split_seed: int = 0):
    """The dataset (built-in if None) and its train / validation / holdout parts."""
    from iqa_env.data import default_dataset, load_dataset, split_by_group

    full = default_dataset() if dataset is None else load_dataset(dataset)
    return full, split_by_group(full, seed=split_seed)


def env_settings(config: TrainConfig) -> dict[str, Any]:
    """The ``TaskAmenabilityEnv`` arguments of ``config`` (see :func:`make_env`)."""
    from agents import recommended_env_kwargs

    settings = recommended_env_kwargs(config.algo, config.reward, config.task)
    resolved = config.resolved()
    settings.update(
        task=config.task,
        reward=config.reward,
        rejection_ratio=config.rejection_ratio,
        batch_size=resolved.batch_size,
        train_steps=config.train_steps,
        validation_size=resolved.validation_size,
        device=config.device,
    )
    settings.update(config.env_kwargs)
    return settings


def make_env(config: TrainConfig, train_set, validation_set):
    """The env of ``config`` on explicit train / validation parts.

    Settings (:func:`env_settings`), each overriding the one before: the
    algorithm's recommended env settings
    (:func:`agents.recommended_env_kwargs`), the fields of ``config``, then
    ``config.env_kwargs``.
    """
    import inspect

    from iqa_env.env import TaskAmenabilityEnv

    settings = env_settings(config)
    known = set(inspect.signature(TaskAmenabilityEnv).parameters)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(
            f"env_kwargs: unknown TaskAmenabilityEnv argument(s) {', '.join(map(repr, unknown))}; "
            "docs/environment.md lists them"
        )
    if config.warmup_cache is not None:  # where, not what: not one of the settings a run records
        settings["warmup_cache"] = config.warmup_cache
    return TaskAmenabilityEnv(train_set, validation_dataset=validation_set, **settings)


def build_agent(config: TrainConfig, env, agent_kwargs: dict[str, Any] | None = None):
    """``make_agent`` for ``config`` on ``env`` (``agent_kwargs``: ``config.agent_kwargs`` with run-management
    additions such as ``tensorboard_log``); what the algorithm or its policy refuses is a ``ValueError`` that
    names the ``agent_kwargs`` given."""
    from agents import make_agent

    try:
        return make_agent(config.algo, env, seed=config.seed, **(config.agent_kwargs if agent_kwargs is None else agent_kwargs))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"cannot build {config.algo} with agent_kwargs {json.dumps(config.agent_kwargs)}: {e} "
            f"(agents.default_kwargs({config.algo!r}, env) and the algorithm's constructor list its arguments)"
        ) from e


def check_agent_builds(config: TrainConfig, train_set, validation_set) -> None:
    """Build ``config``'s env and agent once and drop them (no warm-up, no file): a setting that only the
    env, the algorithm or its policy refuses fails here, before a command that runs many stages writes
    anything (``iqa reproduce`` would otherwise keep a folder whose settings turn the corrected command away)."""
    env = make_env(dataclasses.replace(config, warmup_cache=None), train_set, validation_set)
    try:
        build_agent(config, env)
    finally:
        env.close()


def controller_auroc(controller, holdout, task: str) -> float | None:
    """AUROC of the controller's holdout scores against the ground-truth amenable label (None if unknown)."""
    if task not in holdout.amenability:
        return None
    return scores_auroc(controller.score(holdout.images), holdout, task)


def scores_auroc(scores: np.ndarray, holdout, task: str) -> float | None:
    """:func:`controller_auroc` of scores already computed on ``holdout.images``."""
    from iqa_env.metrics import auroc_or_none

    if task not in holdout.amenability:
        return None
    return auroc_or_none(scores, holdout.amenable(task))


def scores_auroc_by_class(scores: np.ndarray, holdout, task: str) -> dict[str, float | None] | None:
    """:func:`scores_auroc` within each class of ``holdout``: ``{class name: AUROC}``.

    A controller can rank the truth well overall by scoring one class low as
    a whole; within each class it has to rank the images themselves
    (``docs/learning-status.md``, sections 8 and 28). None where the truth is
    unknown or the dataset has one class; a class whose images are all (or
    none) amenable gets None.
    """
    from iqa_env.metrics import auroc_or_none

    if task not in holdout.amenability or holdout.num_classes < 2:
        return None
    amenable = holdout.amenable(task)
    labels = np.asarray(holdout.labels)
    return {
        name: auroc_or_none(scores[labels == k], amenable[labels == k]) if (labels == k).any() else None
        for k, name in enumerate(holdout.class_names)
    }


def class_variance_share(scores: np.ndarray, holdout) -> float | None:
    """The share of the scores' variance that lies between the classes of ``holdout``, in [0, 1].

    0: every class has the same mean score (the scores rank images, not classes); 1: the scores
    are constant within each class.  A controller that scores a class as a whole shows here
    (``docs/learning-status.md``, sections 27 and 32).  None with one class or constant scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(holdout.labels)
    if holdout.num_classes < 2 or len(np.unique(labels)) < 2 or scores.var() == 0:
        return None
    means = np.zeros_like(scores)
    for k in np.unique(labels):
        means[labels == k] = scores[labels == k].mean()
    return float(means.var() / scores.var())


def _atomic_json(path: Path, data: Any) -> None:
    from iqa_env.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=float))


#: TrainConfig fields that may differ when a run is resumed: they say how or where it runs, not what it trains.
#: (``dataset`` may differ too, if the file's content is the one the run recorded: see :func:`dataset_fingerprint`.)
RUN_MANAGEMENT_FIELDS: tuple[str, ...] = ("checkpoint_every", "device", "time_limit_s", "warmup_cache")

#: What ``train`` writes in a run folder (``overwrite=True`` removes these, and nothing else).
RUN_ARTEFACTS: tuple[str, ...] = ("summary.json", "controller", "predictor.pt", "tensorboard")


def _json_config(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    data = dataclasses.asdict(config) if isinstance(config, TrainConfig) else config
    return json.loads(json.dumps(data, default=float))


#: What a run recorded before these fields existed did: its controller scored each image alone.
SETTINGS_BEFORE_THEY_EXISTED: dict[str, Any] = {"mirror_average": False}


def config_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """``"field: saved X, now Y"`` for every training setting of ``config`` that differs from ``saved``.

    Fields missing from ``saved`` (written by an older version) count as their
    defaults, or as :data:`SETTINGS_BEFORE_THEY_EXISTED` where the run did
    otherwise before the field existed; :data:`RUN_MANAGEMENT_FIELDS` are not compared.
    """
    defaults = _json_config(TrainConfig().resolved())
    now = _json_config(config.resolved())
    before = {**defaults, **SETTINGS_BEFORE_THEY_EXISTED, **saved}
    return [
        f"{name}: saved {before.get(name)!r}, now {value!r}"
        for name, value in now.items()
        if name not in RUN_MANAGEMENT_FIELDS and before.get(name) != value
    ]


def env_settings_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"name: saved X, now Y"`` for every env argument in ``now`` or ``saved`` that differs between them.

    ``saved`` is a run's recorded :func:`env_settings`, ``now`` the current
    config's (JSON-normalised). ``device`` is not compared (a run may move
    between devices). A setting missing on either side counts as differing:
    the defaults of :func:`agents.recommended_env_kwargs` changed between the
    checkout that made the run and this one.
    """
    names = sorted((set(now) | set(saved)) - {"device"})
    missing = object()
    return [
        f"env setting {name}: saved {saved.get(name, '(not set)')!r}, now {now.get(name, '(not set)')!r}"
        for name in names
        if saved.get(name, missing) != now.get(name, missing)
    ]


def dataset_fingerprint(dataset: str | os.PathLike[str] | None) -> str:
    """What identifies the data: the built-in set's cache name (generator version + settings hash), else a file's SHA-256.

    ``"built-in:synthetic-default-v<version>-<hash>.h5"`` for the built-in set
    (runs made before it carried its version recorded ``"builtin"``), else
    ``"sha256:..."`` of the dataset file's bytes.
    """
    import hashlib

    if dataset is None:
        from iqa_env.data import default_dataset_name

        return f"built-in:{default_dataset_name()}"
    path = Path(dataset).resolve()
    stat = path.stat()
    # A study checks every run's folder against the same file: hash it once while it is unchanged.
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[key] = f"sha256:{digest.hexdigest()}"
    return _FINGERPRINTS[key]


#: Dataset files hashed in this process, by resolved path, inode, size and modification and change times.
_FINGERPRINTS: dict[tuple[str, int, int, int, int], str] = {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished_summary(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The summary of the finished run in ``out`` (``summary.json``, written last), or None."""
    summary = _read_json(Path(out) / "summary.json")
    if isinstance(summary, dict) and isinstance(summary.get("config"), dict) and "steps" in summary:
        return summary
    return None


def _prepare_run_dir(config: TrainConfig, settings: dict[str, Any], out: Path, overwrite: bool) -> tuple[str, Any]:
    """``("finished", summary)``, ``("resume", checkpoint folder)`` or ``("fresh", None)`` for ``out``.

    ``settings``: the env arguments of ``config``, JSON-normalised (compared with those the run recorded).
    """
    from experiments import checkpoint as ckpt

    if overwrite:
        ckpt.remove_checkpoints(out)
        for name in RUN_ARTEFACTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        return "fresh", None
    ckpt.remove_stale(out)
    summary = finished_summary(out)
    folder = ckpt.find_checkpoint(out)
    # What the run recorded: its summary once finished, else its last checkpoint's metadata.
    recorded = summary if summary is not None else ckpt.read_meta(folder) if folder is not None else {}
    saved = summary["config"] if summary is not None else _read_json(out / "config.json")
    if not isinstance(saved, dict):
        saved = recorded.get("config")
    if isinstance(saved, dict):
        differ = config_differences(saved, config)
        moved = [d for d in differ if d.startswith("dataset: ")]
        # The data's content, not its path, is what the run trained on: a file moved (or named relative to
        # another folder) is the same run; a file rewritten at the same path, or the built-in set of
        # another generator version, is not.
        fingerprint = recorded.get("dataset_fingerprint")
        if fingerprint is not None and (moved or not differ):
            now = dataset_fingerprint(config.dataset)
            if fingerprint == now:
                if moved:
                    logger.info("%s: the dataset is now at %s (same content as the run's)", out, config.dataset)
                differ = [d for d in differ if d not in moved]
            elif not moved:
                changed = "the built-in set changed" if config.dataset is None else f"{config.dataset} changed since the run"
                differ.append(f"dataset_fingerprint: {fingerprint!r} there, {now!r} now ({changed})")
        # The env arguments the run recorded, defaults included: the same config gives other settings
        # once agents.recommended_env_kwargs changes, and a run must not go on (or count as done) with them.
        # (Compared when the config matches: a config field that differs is named once, as itself.)
        recorded_env = recorded.get("env_settings")
        if not differ and isinstance(recorded_env, dict):
            differ = env_settings_differences(recorded_env, settings)
        elif not differ and (summary is not None or folder is not None):
            logger.warning("%s: the run did not record its env settings (an older version made it); "
                           "its config matches, but whether the defaults changed since cannot be checked", out)
        if differ:
            raise ValueError(
                f"{out} holds a run with other settings ({'; '.join(differ)}); rerun with the same settings "
                "to resume or keep it, choose another output folder, or overwrite it "
                "(train(..., overwrite=True), iqa train --overwrite)"
            )
    if summary is not None:
        return "finished", summary
    if folder is not None:
        return "resume", folder
    return "fresh", None


def run_folder_state(config: TrainConfig, out: str | os.PathLike[str]) -> str:
    """What :func:`train` would do with the run folder ``out``: ``"fresh"``, ``"resume"`` or ``"finished"``.

    The check ``train`` makes before it trains, without loading data or building an env, so that a study
    of many runs refuses a folder with other settings before any run starts: ``ValueError`` as ``train``
    raises it.  Nothing is written (temporary folders that a killed checkpoint write left are removed).
    """
    folder = Path(out)
    if not folder.exists():
        return "fresh"
    return _prepare_run_dir(config, _json_config(env_settings(config)), folder, overwrite=False)[0]


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    *,
    overwrite: bool = False,
    pause_at_time_limit: bool = False,
) -> dict[str, Any]:
    """Train one controller; returns (and, with ``out_dir``, saves) the run's summary.

    The summary has the holdout AUROC of the controller against ground-truth
    amenability at initialisation and at the end (and within each class:
    ``initial_auroc_by_class``, ``final_auroc_by_class``, see
    :func:`scores_auroc_by_class`), and the AUROC curve over
    training (``auroc_curve``: ``[[step, auroc], ...]``), and the mean and
    standard deviation of the final holdout scores (``final_score_mean``,
    ``final_score_sd``).  A curve point at step N is measured as env step N is
    taken, before the updates that step completes (an off-policy agent trains
    after each step, an on-policy one after its rollout); ``final_auroc`` is
    measured after them, so where the curve ends at the last step the two can
    differ (by 0.09 in one DDPG run, ``docs/learning-status.md`` section 21).

    With ``out_dir``, a checkpoint (``out_dir/checkpoint/``, see
    :mod:`experiments.checkpoint`) is written atomically at the first rollout
    boundary after every ``config.checkpoint_every`` env steps, and the same
    call on the same folder picks the run up again:

    - a checkpoint there: the run resumes from it (the step counter goes on;
      only the steps after the checkpoint are redone); the summary's
      ``resumed_from`` lists the steps it resumed at;
    - a finished run there (``summary.json``): nothing is trained, and its
      summary is returned with ``"already_finished": True`` added;
    - a run with other settings there: ``ValueError`` naming the fields
      that differ (the config's, and the env settings the run recorded,
      defaults included: a checkout with other defaults does not go on
      with a run made under the old ones), unless ``overwrite=True``, which removes the folder's run
      files and starts again.  :data:`RUN_MANAGEMENT_FIELDS` may differ, and
      so may ``dataset`` when the file has the content the run recorded
      (``dataset_fingerprint`` in its checkpoint or summary).

    Settings, datasets and envs that are refused (``TrainConfig.validate``,
    a bad dataset file, a dataset the task or reward cannot use, a batch
    larger than the training set, an unknown env argument) raise before
    ``out_dir`` is created or changed; algorithm arguments the agent
    refuses raise before anything is written in it (``config.json``
    included), so a corrected call on the same folder starts cleanly.

    With ``pause_at_time_limit`` (it needs ``out_dir`` and checkpoints),
    ``config.time_limit_s`` pauses the run instead of finishing it: at the
    first rollout boundary past the limit a checkpoint is written, nothing
    else is, and the summary returned says ``"paused": True``, with the step,
    wall time and holdout AUROC of that checkpoint.  The same call on the same
    folder goes on from there, so a study longer than one machine session runs
    in parts (``python -m experiments.seed_study --out``).

    The checkpoint is removed once the run has finished (the summary is
    written last).  Checkpoints hold a stable-baselines3 ``.zip``, which
    unpickles on loading: resume only from run folders you trust.
    """
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList

    from agents import Controller
    from agents.factory import agent_class
    from experiments import checkpoint as ckpt

    config = config.validate().resolved()
    if pause_at_time_limit and (out_dir is None or config.checkpoint_every == 0):
        raise ValueError(
            "pause_at_time_limit needs a run folder (out_dir) and checkpoints (checkpoint_every > 0), "
            f"got out_dir={out_dir!r} and checkpoint_every={config.checkpoint_every!r}: a paused run resumes "
            "from its checkpoint"
        )
    if out_dir is not None:
        from iqa_env.files import blocking_file

        in_the_way = blocking_file(out_dir)
        if in_the_way is not None:
            raise ValueError(f"run folder {out_dir}: {in_the_way} is a file, not a folder; give a folder")
    # The data and the env first: a dataset or setting they refuse (a bad file, one class, too few
    # patients, a batch larger than the training set) fails before the run folder is touched.
    _, (train_set, validation_set, holdout) = load_splits(config.dataset, config.split_seed)
    env = make_env(config, train_set, validation_set)
    # The env arguments the run has, defaults included, as they read back from JSON: recorded in its
    # checkpoints and summary, since the config alone does not say them once the defaults change.
    settings = _json_config(env_settings(config))
    out = Path(out_dir) if out_dir is not None else None
    mode, found = "fresh", None
    created = out is not None and not out.exists()  # removed again if the agent is refused (still empty then)
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            mode, found = _prepare_run_dir(config, settings, out, overwrite)
        except BaseException:
            env.close()
            raise
        if mode == "finished":
            env.close()
            logger.info(
                "%s: run %s already finished (%d steps, summary.json); nothing to do (overwrite to train again)",
                out, found["run"], found["steps"],
            )
            return {**found, "already_finished": True}
    logger.info("training %s: %s", config.run_name, dataclasses.asdict(config))
    agent_kwargs = dict(config.agent_kwargs)
    if out is not None:
        agent_kwargs.setdefault("tensorboard_log", str(out / "tensorboard"))
    checkpointing = out is not None and config.checkpoint_every > 0
    fingerprint = dataset_fingerprint(config.dataset) if out is not None else None
    pool = ckpt.env_image_pool(env) if checkpointing else None

    resumed_from: list[int] = []
    prior_wall = 0.0
    callbacks: list[BaseCallback] = []
    if mode == "resume":
        assert out is not None and found is not None
        meta = ckpt.read_meta(found)
        if meta.get("algo", config.algo) != config.algo:
            raise ValueError(f"{found}: checkpoint of algorithm {meta.get('algo')!r}, not {config.algo!r}")
        if pool is None:
            pool = ckpt.env_image_pool(env)
        agent = ckpt.restore(
            found,
            agent_class(config.algo),
            env,
            pool=pool,
            device=agent_kwargs.get("device", env.device),  # the controller lives with the env, as make_agent's
            tensorboard_log=agent_kwargs.get("tensorboard_log"),
        )
        callbacks.append(ckpt.action_noise_restorer(agent))
        curve: list[tuple[int, float | None]] = [(int(s), a) for s, a in meta["auroc_curve"]]
        # A checkpoint of an earlier version has none; the rest of the run does not need it.
        initial_by_class = meta.get("initial_auroc_by_class")
        resumed_from = [int(s) for s in meta.get("resumed_from", [])] + [int(agent.num_timesteps)]
        prior_wall = float(meta.get("wall_time_s", 0.0))
        logger.info(
            "resuming %s from the checkpoint at step %d of %d (%s)",
            config.run_name, agent.num_timesteps, config.steps, found,
        )
    else:
        # No env.reset(seed) here: learn() makes the seeded reset (make_agent's seed reaches the env
        # through SB3's VecEnv.seed), and a second one would rebuild and warm up the predictor again.
        try:
            agent = build_agent(config, env, agent_kwargs)
        except ValueError:
            env.close()
            if created and out is not None and not any(out.iterdir()):
                out.rmdir()
            raise
    if out is not None:
        # Once the agent is built: settings it refuses leave no config.json to block the corrected call.
        _atomic_json(out / "config.json", dataclasses.asdict(config))

    def current_auroc() -> float | None:
        return controller_auroc(Controller.from_agent(agent, mirror_average=config.mirror_average), holdout, config.task)

    if mode != "resume":
        initial_scores = Controller.from_agent(agent, mirror_average=config.mirror_average).score(holdout.images)
        curve = [(0, scores_auroc(initial_scores, holdout, config.task))]
        initial_by_class = scores_auroc_by_class(initial_scores, holdout, config.task)
    start = time.perf_counter()

    def wall_time() -> float:
        """Seconds of training of this run, earlier invocations (resumed from) included."""
        return prior_wall + time.perf_counter() - start

    checkpointed_at: list[int] = []  # the step of the last checkpoint this call wrote

    def save_checkpoint() -> None:
        """Checkpoint the run at this step, once (Checkpoint and a pause may both ask at one boundary)."""
        assert out is not None
        if checkpointed_at == [int(agent.num_timesteps)]:
            return
        checkpointed_at[:] = [int(agent.num_timesteps)]
        ckpt.write_checkpoint(
            out,
            agent,
            env,
            {
                "algo": config.algo,
                "num_timesteps": int(agent.num_timesteps),
                "auroc_curve": [[s, a] for s, a in curve],
                "initial_auroc_by_class": initial_by_class,
                "wall_time_s": wall_time(),
                "resumed_from": resumed_from,
                "config": dataclasses.asdict(config),
                "env_settings": settings,
                "dataset_fingerprint": fingerprint,
            },
            pool,
        )
        logger.info("checkpoint at step %d written to %s", agent.num_timesteps, out / ckpt.CHECKPOINT_DIR)

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % config.eval_every == 0:
                value = current_auroc()
                curve.append((self.num_timesteps, value))
                evaluation_logger.debug(
                    "%s: step %d, holdout AUROC %s (%.0f s)", config.run_name, self.num_timesteps,
                    "-" if value is None else f"{value:.3f}", wall_time(),
                )
                if value is not None:
                    self.logger.record("eval/holdout_auroc", value)
            return True

    class TimeLimit(BaseCallback):
        """Stops ``learn`` at the first env step after ``config.time_limit_s`` seconds of this call.

        With ``pause_at_time_limit`` it stops at the first rollout start past the limit instead,
        after a checkpoint there (everything collected so far has been learnt from); the one env
        step taken after it is not learnt from, and a resumed run takes it again.
        """

        def __init__(self) -> None:
            super().__init__()
            self.paused_at: int | None = None
            self.paused_wall = 0.0
            self.first = int(agent.num_timesteps)

        def _past(self) -> bool:
            return time.perf_counter() - start >= float(config.time_limit_s)  # type: ignore[arg-type]

        def _on_rollout_start(self) -> None:
            now = int(self.model.num_timesteps)
            # Not before this call's first rollout: a set-up longer than the limit must not stall the run.
            if pause_at_time_limit and self.paused_at is None and now > self.first and self._past():
                save_checkpoint()
                self.paused_at, self.paused_wall = now, wall_time()

        def _on_step(self) -> bool:
            if pause_at_time_limit:
                return self.paused_at is None
            return not self._past()

    class Checkpoint(BaseCallback):
        """Checkpoints at rollout starts: everything collected so far has been learnt from."""

        def __init__(self) -> None:
            super().__init__()
            self.last = int(agent.num_timesteps)

        def _on_rollout_start(self) -> None:
            now = int(self.model.num_timesteps)
            if now // config.checkpoint_every > self.last // config.checkpoint_every:
                save_checkpoint()
                self.last = now

        def _on_step(self) -> bool:
            return True

    class Progress(BaseCallback):
        """A tqdm bar over env steps with the last holdout AUROC (SB3's own bar needs ``rich``)."""

        def _on_training_start(self) -> None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self._expected_total(), initial=int(self.model.num_timesteps), unit="step",
                            desc=config.run_name, dynamic_ncols=True)

        def _expected_total(self) -> int:
            """The steps learn() will take: algorithms that collect whole rollouts (PPO, A2C, REINFORCE)
            finish the last one, so they stop at the next multiple of ``n_steps x n_envs``."""
            from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

            from agents.reinforce import REINFORCE

            now = int(self.model.num_timesteps)
            if not isinstance(self.model, (OnPolicyAlgorithm, REINFORCE)) or now >= config.steps:
                return max(int(config.steps), now)
            rollout = int(self.model.n_steps) * int(self.model.n_envs)
            return now + -(-(int(config.steps) - now) // rollout) * rollout

        def _on_step(self) -> bool:
            now = int(self.model.num_timesteps)
            if now > self.bar.total:  # any other overshoot still ends the bar full
                self.bar.total = now
            self.bar.update(now - self.bar.n)
            if curve[-1][1] is not None:
                self.bar.set_postfix(holdout_auroc=f"{curve[-1][1]:.3f}", refresh=False)
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    callbacks.append(Evaluate())
    if checkpointing:
        callbacks.append(Checkpoint())
    if progress:
        callbacks.append(Progress())
    time_limit = TimeLimit() if config.time_limit_s is not None else None
    if time_limit is not None:
        callbacks.append(time_limit)
    remaining = max(config.steps - int(agent.num_timesteps), 0)
    agent.learn(
        remaining,
        callback=CallbackList(callbacks),
        tb_log_name=config.run_name,
        reset_num_timesteps=mode != "resume",
    )
    paused_at = time_limit.paused_at if time_limit is not None else None
    # A paused run stands at its checkpoint: the agent has not learnt from the step taken after it.
    steps = int(agent.num_timesteps) if paused_at is None else paused_at
    wall = wall_time() if paused_at is None else time_limit.paused_wall  # type: ignore[union-attr]
    curve = [(s, a) for s, a in curve if s <= steps]
    controller = Controller.from_agent(
        agent,
        metadata={"task": config.task, "reward": config.reward, "seed": config.seed},
        mirror_average=config.mirror_average,
    )
    final_scores = controller.score(holdout.images)  # once, for the AUROC and the spread
    final = scores_auroc(final_scores, holdout, config.task)
    if curve[-1][0] != steps:
        curve.append((steps, final))
    summary = {
        "run": config.run_name,
        "config": dataclasses.asdict(config),
        "env_settings": settings,
        "steps": steps,
        "wall_time_s": wall,
        "steps_per_s": steps / max(wall, 1e-9),
        # The torch threads it ran on: they change the order of torch's sums, so the last digits of its figures.
        "torch_threads": torch.get_num_threads(),
        "initial_auroc": curve[0][1],
        "final_auroc": final,
        # The same AUROCs within each class (classification labels; None where undefined).
        "initial_auroc_by_class": initial_by_class,
        "final_auroc_by_class": scores_auroc_by_class(final_scores, holdout, config.task),
        # How spread the final scores are, to tell a saturated actor (scores at 0 and 1) or a collapsed
        # one (every score at one value) from one that ranks; compare across seeds of one algorithm.
        "final_score_mean": float(final_scores.mean(dtype=np.float64)),
        "final_score_sd": float(final_scores.std(dtype=np.float64)),
        # How much of that spread is between the classes rather than within them.
        "final_class_share": class_variance_share(final_scores, holdout),
        "auroc_curve": [[s, a] for s, a in curve],
        "resumed_from": resumed_from,
        "time_limited": steps < config.steps,
    }
    if fingerprint is not None:
        summary["dataset_fingerprint"] = fingerprint
    if paused_at is not None:
        logger.info("%s: paused at step %d of %d (checkpoint in %s); the same call again goes on from there",
                    config.run_name, steps, config.steps, out)
        env.close()
        return {**summary, "paused": True}
    if out is not None:
        # The validation images' scores go with it, so that its scores can be read as percentiles of images
        # the run knew (comparable across runs whose raw scores sit at other levels) and thresholded one at a
        # time.
        controller.calibrate(validation_set.images, source="the validation images of the training run")
        controller.save(out / "controller")
        save_predictor(env, out / "predictor.pt")
        _atomic_json(out / "summary.json", summary)  # last: its presence marks a finished run
        ckpt.remove_checkpoints(out)
    env.close()
    return summary


def save_predictor(env: Any, path: Path) -> None:
    """Write the env's evaluated predictor (its weight average, if it keeps one) to ``path``, atomically.

    The one writer of ``predictor.pt``, for ``iqa train`` and ``iqa reproduce``'s baseline alike; read it
    back with :func:`load_predictor` or ``torch.load(weights_only=True)``.
    """
    from iqa_env.files import atomic_write

    state = {k: v.detach().cpu() for k, v in env.evaluated_predictor.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_predictor(run_dir: str | os.PathLike[str], dataset: Any = None, device: str = "cpu") -> torch.nn.Module:
    """The task predictor ``iqa train`` saved in ``run_dir/predictor.pt``, in eval mode.

    Its architecture is rebuilt from ``run_dir/config.json`` and the dataset
    (``dataset``: an ``ImageDataset`` or path; default: the one in the
    config); the weights are read with ``torch.load(weights_only=True)``, so
    no arbitrary objects are unpickled.
    """
    from iqa_env.env import as_dataset
    from iqa_env.tasks import make_task

    run = Path(run_dir)
    weights = run / "predictor.pt"
    config = _read_json(run / "config.json")
    if not isinstance(config, dict):
        raise FileNotFoundError(f"{run / 'config.json'} not found or not valid JSON: not an `iqa train` run folder")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the run has not finished")
    data = as_dataset(dataset if dataset is not None else config.get("dataset"))
    predictor = make_task(config.get("task", "classification")).build_predictor(data)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        predictor.load_state_dict(state)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        from iqa_env.files import short_reason

        reason = short_reason(e)
        raise ValueError(f"{weights}: not a predictor weights file for this task and dataset ({reason})") from e
    return predictor.to(device).eval()


def holdout_heuristics(holdout, task: str) -> dict[str, float]:
    """AUROC of simple image statistics against ground-truth amenability: what the RL must beat."""
    from experiments.evaluation import heuristic_scores
    from iqa_env.metrics import auroc

    amenable = holdout.amenable(task)
    return {name: auroc(scores, amenable) for name, scores in heuristic_scores(holdout.images).items()}
