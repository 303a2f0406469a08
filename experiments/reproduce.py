"""The paper's experiment end to end: ``iqa reproduce`` (Table 1, Figures 3 and 4, and what the RL adds).

For each task, and each seed:

1. stage ``baseline``: the non-selective task predictor, the paper's
   baseline.  It is the env's own predictor trained by the env's own
   training step, driven with an all-ones action (every image of every
   mini-batch selected) for ``steps`` predictor updates: the same network,
   optimiser, batch size, warm-up and data as the reward runs, and as many
   predictor updates as the ``fixed``-reward run makes (the most of any
   reward: ``weighted`` and ``selective`` spend part of their env steps on
   validation steps, which do not train the predictor).
2. stages ``fixed``, ``weighted``, ``selective``: one
   :func:`experiments.training.train` run each (the project's one training
   loop), which saves the controller, the predictor and TensorBoard logs.

Every stage then scores the (untouched) holdout patients: its predictor is
loaded into a fresh env (``weights_only``) and evaluated per image, the
controller scores every image; the arrays go to ``evaluation.npz``.  Finished
stages write ``stage.done`` last (atomically), so a run interrupted and
started again with the same ``out`` resumes at the first unfinished stage.
The statistics (:mod:`experiments.evaluation`), ``results.json``,
``report.md`` and the figures are recomputed from the stages' files at the
end of every run.  See ``docs/reproduce.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.evaluation import (
    against_initial,
    PAPER_REJECTION_RATIO,
    RANDOM_BAND_QUANTILES,
    REJECTION_RATIOS,
    contingency,
    heuristic_scores,
    kept_images,
    mean_and_std,
    metric_across_patients,
    paired_ttest,
    random_rejection_band,
    ranking_agreement,
    rejection_curve,
    seeds_higher_text,
    with_confidence,
)
from experiments.training import TrainConfig, dataset_fingerprint
from experiments.workers import completed, torch_threads, worker_pool
from iqa_env.checks import is_count, is_non_negative_number

logger = logging.getLogger(__name__)

#: Version of the layout of ``results.json``; bump it when a field changes meaning.
SCHEMA = "iqa-reproduce/1"

# Budgets: the one place they live.  ``seeds`` is the number of seeds; every
# other key is a TrainConfig field.  Only budget fields are set here: the
# learning configuration (algorithm, env and agent settings) is TrainConfig's
# and agents.default_kwargs' defaults.
#: ``--quick``: a reduced budget (classification on 2 CPU cores: see docs/reproduce.md for the measured time).
QUICK: dict[str, Any] = {"seeds": 4, "steps": 1500, "eval_every": 100}
#: The default budget: eight seeds of 12,000 env steps, about where REINFORCE's holdout AUROC stops rising on the
#: built-in set (docs/learning-status.md, sweep 4); hours on a CPU, minutes on a GPU with one worker per seed.
FULL: dict[str, Any] = {"seeds": 8, "steps": 12_000}

REWARDS: tuple[str, ...] = ("fixed", "weighted", "selective")
#: Random rejections per ratio behind the random-rejection band.
RANDOM_DRAWS = 1000
#: Below this many holdout patients, reproduce warns that its paired t-tests can show little.
FEW_HOLDOUT_PATIENTS = 10
#: The paper's Table 1 (means only; the paper's clinical data are not public).
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "classification": {"baseline": 0.897, "fixed": 0.935, "weighted": 0.926, "selective": 0.913},
    "segmentation": {"baseline": 0.815, "fixed": 0.890, "weighted": 0.893, "selective": 0.865},
}
METRIC_NAMES: dict[str, str] = {"classification": "accuracy", "segmentation": "Dice"}

STAGE_MARKER = "stage.done"
#: Where the stages keep their predictor warm-ups (TrainConfig.warmup_cache), under the output folder.
WARMUP_FOLDER = "warmup"
SETTINGS_FILE = "settings.json"
EVALUATION_FILE = "evaluation.npz"
BASELINE_OUTPUTS: tuple[str, ...] = ("predictor.pt", EVALUATION_FILE)
TRAIN_OUTPUTS: tuple[str, ...] = (
    "summary.json",
    "predictor.pt",
    "controller/controller.json",
    "controller/controller.pt",
    EVALUATION_FILE,
)
#: TrainConfig fields that say *where* or *how* a run happens, not *what* it computes: they may change on
#: resume (the dataset is compared by its fingerprint instead of its path).
_LOCATION_FIELDS: tuple[str, ...] = ("device", "dataset")


# ----------------------------------------------------------------- settings
def budget_config(
    quick: bool = False,
    dataset: str | os.PathLike[str] | None = None,
    algo: str | None = None,
    steps: int | None = None,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
) -> tuple[TrainConfig, int]:
    """The base TrainConfig (task, reward and seed set per stage) and the number of seeds of a budget.

    ``overrides`` replaces preset fields (any TrainConfig field, or ``seeds``);
    ``algo`` and ``steps`` are the command line's overrides.
    """
    fields = {**(QUICK if quick else FULL), **(overrides or {})}
    seeds = int(fields.pop("seeds"))
    if algo is not None:
        fields["algo"] = algo
    if steps is not None:
        fields["steps"] = steps
    config = TrainConfig(dataset=None if dataset is None else str(dataset), device=device, **fields)
    return config.validate(), seeds


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists, other objects as their repr), to compare with a loaded one."""
    return json.loads(json.dumps(value, default=repr))


def _identity(config: TrainConfig, drop: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of ``config`` that decide a stage's results (JSON-normalised, so it compares with a loaded one)."""
    from agents import ALGORITHMS
    from experiments import training
    from iqa_env.rewards import REWARD_NAMES

    drop = tuple(drop)
    fields = dataclasses.asdict(config)
    for size_field in ("validation_size", "batch_size"):
        if fields.get(size_field) != "auto":
            continue
        # The number "auto" stands for, where it is one for every algorithm and reward the stages vary over
        # (validation_size: 256 for REINFORCE, what folders made before "auto" recorded, so that they
        # resume); else "auto".  A train stage's own identity has its algorithm's and reward's number.
        algos = ALGORITHMS if "algo" in drop else (config.algo,)
        rewards = REWARD_NAMES if "reward" in drop else (config.reward,)
        sizes = {
            getattr(dataclasses.replace(config, algo=algo, reward=reward).resolved(), size_field)
            for algo in algos
            for reward in rewards
        }
        if len(sizes) == 1:
            fields[size_field] = sizes.pop()
    for name in (*_LOCATION_FIELDS, *getattr(training, "RUN_MANAGEMENT_FIELDS", ()), *drop):
        fields.pop(name, None)
    return _plain(fields)


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write ``out/settings.json``, or check that the run already in ``out`` has the same settings.

    Seeds, tasks and rewards may differ (stages are per task, reward and seed: new ones run,
    finished ones are reused); anything else that changes results is an error.
    """
    from iqa_env.files import atomic_write_text

    path = out / SETTINGS_FILE
    settings = _plain(settings)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); use a new --out") from e
        if isinstance(old, dict) and isinstance(old.get("config"), dict) and isinstance(settings.get("config"), dict):
            old = {**old, "config": with_fields_before_they_existed(old["config"], settings["config"])}
        diffs = _differences(old, settings)
        if diffs:
            raise ValueError(
                f"{out} holds a run with other settings ({'; '.join(diffs)}); use a new --out, "
                "or the same settings to resume it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=2))


# ------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    """One unit of work that can be resumed: a baseline predictor or a train() run, then its holdout evaluation."""

    kind: str
    """``"baseline"`` or ``"train"``."""
    config: TrainConfig
    folder: Path
    name: str
    """Its path under the output folder, e.g. ``classification/weighted/seed0``."""
    validation_images: int
    """Images in the dataset's validation split (an env's episode length depends on it)."""

    @property
    def outputs(self) -> tuple[str, ...]:
        return BASELINE_OUTPUTS if self.kind == "baseline" else TRAIN_OUTPUTS

    def identity(self) -> dict[str, Any]:
        from agents import recommended_env_kwargs
        from agents.factory import default_settings
        from experiments.training import env_settings
        from iqa_env.env import validation_images_per_step, validation_steps_of

        # The baseline ignores the reward and the algorithm: it has neither. The env and algorithm
        # settings that the defaults add count too, so that a stage finished by a checkout with other
        # defaults is not reused.
        config = self.config.resolved()
        fields = _identity(config, ("reward", "algo") if self.kind == "baseline" else ())
        settings = _plain(recommended_env_kwargs(config.algo, config.reward, config.task))
        identity = {"kind": self.kind, **fields, "env_settings": settings}
        if self.kind != "baseline":
            env = env_settings(config)  # what make_env gives the run's env
            size = min(env["validation_size"] or self.validation_images, self.validation_images)
            per_step = validation_images_per_step(env["batch_size"], env.get("validation_batch_size"))
            episode = env["train_steps"] + validation_steps_of(env["reward"], size, per_step)
            agent = default_settings(
                config.algo, env["reward"], env["batch_size"], episode, env.get("reward_baseline"),
                env.get("stochastic_validation", True), env.get("training_selection_rate"), config.task,
            )
            identity["agent_settings"] = _plain(agent)
        return identity


def make_stage(out: Path, kind: str, config: TrainConfig, label: str, validation_images: int) -> Stage:
    name = f"{config.task}/{label}/seed{config.seed}"
    return Stage(kind, config, out / name, name, validation_images)


def plan_stages(
    out: Path,
    base: TrainConfig,
    tasks: Sequence[str],
    seeds: Sequence[int],
    runs: Sequence[dict[str, str]],
    validation_images: int,
) -> list[Stage]:
    """The baseline of every (task, seed) and a train() run for every (task, run, seed).

    ``runs`` are TrainConfig field overrides, each with a ``label`` (the
    folder name): ``{"label": "weighted", "reward": "weighted"}``;
    ``validation_images`` the size of the dataset's validation split.
    """
    stages = []
    for task in tasks:
        for seed in seeds:
            config = dataclasses.replace(base, task=task, seed=seed)
            stages.append(make_stage(out, "baseline", config, "baseline", validation_images))
            for run in runs:
                fields = {k: v for k, v in run.items() if k != "label"}
                config = dataclasses.replace(base, task=task, seed=seed, **fields)
                stages.append(make_stage(out, "train", config, run["label"], validation_images))
    return stages


def with_fields_before_they_existed(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` (a stage's identity, or a folder's ``settings.json`` config) with each TrainConfig field it
    lacks and ``current`` has filled in at what runs did before the field existed
    (:data:`experiments.training.SETTINGS_BEFORE_THEY_EXISTED`): a folder made before ``mirror_average``
    scored each image alone, which ``--no-mirror-average`` resumes and the default does not."""
    from experiments.training import SETTINGS_BEFORE_THEY_EXISTED

    added = {k: v for k, v in SETTINGS_BEFORE_THEY_EXISTED.items() if k in current and k not in recorded}
    return {**recorded, **added}


def with_settings_added_since(recorded: dict[str, Any], current: dict[str, Any], algo: str) -> dict[str, Any]:
    """``recorded`` (a stage's identity) with each algorithm setting it lacks and ``current`` has at its class
    default filled in: a setting added to the algorithm after the stage was run, at the value that keeps the
    behaviour of before, does not make the stage another one.  Any other difference still does.  TrainConfig
    fields it lacks: :func:`with_fields_before_they_existed`."""
    from agents.factory import class_defaults

    recorded = with_fields_before_they_existed(recorded, current)
    old, new = recorded.get("agent_settings"), current.get("agent_settings")
    if not isinstance(old, dict) or not isinstance(new, dict):
        return recorded
    defaults = _plain(class_defaults(algo))

    def fill(old_part: dict[str, Any], new_part: dict[str, Any], defaults_part: dict[str, Any]) -> dict[str, Any]:
        added = {k: v for k, v in new_part.items() if k not in old_part and k in defaults_part and defaults_part[k] == v}
        return {**old_part, **added}

    filled = fill(old, new, defaults)
    if isinstance(old.get("policy_kwargs"), dict) and isinstance(new.get("policy_kwargs"), dict):
        filled["policy_kwargs"] = fill(old["policy_kwargs"], new["policy_kwargs"], defaults["policy_kwargs"])
    return {**recorded, "agent_settings": filled}


def stage_marker(stage: Stage) -> dict[str, Any] | None:
    """The stage's ``stage.done`` record if it finished with all its outputs, else None.

    A finished stage whose settings differ from ``stage``'s is an error.
    """
    path = stage.folder / STAGE_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    current = stage.identity()
    diffs = _differences(with_settings_added_since(marker.get("identity", {}), current, stage.config.algo), current)
    if diffs:
        raise ValueError(
            f"stage {stage.folder} was finished with other settings ({'; '.join(diffs)}); use a new --out"
        )
    if not all((stage.folder / name).is_file() for name in stage.outputs):
        return None
    return marker


def train_baseline(config: TrainConfig, folder: Path, train_set: Any, validation_set: Any) -> int:
    """Train the non-selective predictor with the env's own training step; save ``folder/predictor.pt``.

    It runs one env episode of ``config.steps`` training steps with every
    image selected (the reward is irrelevant: no controller learns), after
    the env's own predictor warm-up, if any.  Returns the predictor updates.
    Every ``config.eval_every`` updates it logs how far it is on
    :data:`~experiments.training.evaluation_logger`, as train() logs its holdout evaluations.
    """
    from experiments.training import evaluation_logger, make_env, save_predictor

    steps = config.steps
    # Every image of every batch: an env setting that draws the training selections at another rate
    # (training_selection_rate, for the controllers' runs) does not reach the non-selective baseline.
    env_kwargs = {**config.env_kwargs, "reward": "weighted", "train_steps": steps, "training_selection_rate": None}
    env = make_env(dataclasses.replace(config, env_kwargs=env_kwargs), train_set, validation_set)
    env.reset(seed=config.seed)
    select_all = np.ones(env.action_space.shape, dtype=np.float32)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        env.step(select_all)
        if step % config.eval_every == 0 or step == steps:
            evaluation_logger.debug(
                "%s-baseline-seed%d: predictor update %d of %d (%.0f s)",
                config.task, config.seed, step, steps, time.perf_counter() - start,
            )
    save_predictor(env, folder / "predictor.pt")
    env.close()
    return steps


def evaluate_stage(
    config: TrainConfig,
    folder: Path,
    splits: tuple[Any, Any, Any],
    controller: bool,
    initial_auroc: float | None = None,
) -> dict[str, np.ndarray]:
    """Per-image holdout arrays of a stage's saved predictor (and controller); saved to ``evaluation.npz``.

    The predictor is loaded (``weights_only``) into a fresh env built from
    ``config``: ``metric``, ``loss`` and ``confidence`` come from
    ``env.evaluate``; ``scores`` from the saved controller.  A controller
    stage also gets ``initial_scores``: the scores of the controller the run
    started from, built again as train() built it (same algorithm, seed and
    arguments), so that every claim about what a trained controller rejects
    can be set against what it rejected before it learnt anything.  Where
    the run recorded its initial AUROC (``initial_auroc``) and the rebuilt
    controller's differs (a checkout whose agents are built otherwise), a
    warning says so and ``initial_scores`` is left out.
    """
    import torch

    from agents import Controller, make_agent
    from experiments.training import make_env, scores_auroc
    from iqa_env.files import atomic_write

    train_set, validation_set, holdout = splits
    # No warm-up: the fresh predictor only gives its architecture; the saved weights replace it.
    env = make_env(
        dataclasses.replace(config, env_kwargs={**config.env_kwargs, "predictor_warmup_steps": 0}),
        train_set,
        validation_set,
    )
    env.reset(seed=config.seed)
    env.evaluated_predictor.load_state_dict(torch.load(folder / "predictor.pt", map_location=env.device, weights_only=True))
    arrays = env.evaluate(holdout)
    if controller:
        arrays["scores"] = Controller.load(folder / "controller", device=env.device).score(holdout.images)
        untrained = Controller.from_agent(
            make_agent(config.algo, env, seed=config.seed, **config.agent_kwargs), mirror_average=config.mirror_average
        )
        initial = untrained.score(holdout.images)
        rebuilt = scores_auroc(initial, holdout, config.task)
        if initial_auroc is not None and rebuilt is not None and not math.isclose(rebuilt, initial_auroc, abs_tol=1e-6):
            logger.warning(
                "%s: the untrained controller built again ranks the holdout at AUROC %.6f, the run recorded %.6f "
                "at its start; its scores are left out of evaluation.npz", folder, rebuilt, initial_auroc,
            )
        else:
            arrays["initial_scores"] = initial
    env.close()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(folder / EVALUATION_FILE, write)
    return arrays


def run_stage(stage: Stage, threads: int | None = None) -> dict[str, Any]:
    """Run one stage to completion and write its ``stage.done`` record last; returns the record.

    On ``threads`` torch threads (None: the caller's); a stage run in the caller's process gives it its
    thread count back."""
    with torch_threads(threads):
        return _run_stage(stage)


def _run_stage(stage: Stage) -> dict[str, Any]:
    from experiments.training import load_splits, show_evaluations, train
    from iqa_env.files import atomic_write_text

    show_evaluations()  # a stage's holdout evaluations (or predictor updates) as they happen
    start = time.perf_counter()
    config = stage.config
    stage.folder.mkdir(parents=True, exist_ok=True)
    _, splits = load_splits(config.dataset, config.split_seed)
    record: dict[str, Any] = {"identity": stage.identity()}
    if stage.kind == "baseline":
        record["predictor_updates"] = train_baseline(config, stage.folder, splits[0], splits[1])
        evaluate_stage(config, stage.folder, splits, controller=False)
    else:
        summary = train(config, stage.folder)
        evaluate_stage(config, stage.folder, splits, controller=True, initial_auroc=summary["initial_auroc"])
        record.update(initial_auroc=summary["initial_auroc"], final_auroc=summary["final_auroc"])
    record["elapsed_s"] = time.perf_counter() - start
    record["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    atomic_write_text(stage.folder / STAGE_MARKER, json.dumps(record, indent=2))
    return record


def _describe(record: dict[str, Any]) -> str:
    if "final_auroc" in record:
        a, b = record["initial_auroc"], record["final_auroc"]
        return f"controller holdout AUROC {format_number(a)} -> {format_number(b)}"
    return f"{record.get('predictor_updates')} predictor updates"


def spread_out(stages: Sequence[Stage]) -> list[Stage]:
    """``stages`` in the order the worker processes take them: train() runs first (they are the long ones),
    and a (task, seed)'s stages as far apart as they can be: the first run of every seed, then the second of
    every seed, and so on.  The stages of one seed that warm the predictor up the same way then do not start
    together, and all but the first load the warm-up the first one kept (``TrainConfig.warmup_cache``).
    """
    rank: dict[str, int] = {}
    seen: dict[tuple[str, int], int] = {}
    for stage in stages:  # a stage's place among its (task, seed)'s, in plan order
        group = (stage.config.task, stage.config.seed)
        rank[stage.name] = seen.get(group, 0)
        seen[group] = rank[stage.name] + 1
    return sorted(stages, key=lambda s: (s.kind == "baseline", rank[s.name]))


#: The torch threads of every stage, whatever ``workers`` is: one, as the seed study's runs (:func:`run_stages`).
STAGE_THREADS = 1


def run_stages(stages: Sequence[Stage], workers: int = 1) -> int:
    """Run every unfinished stage (finished ones are skipped), one log line per stage; returns how many ran.

    With ``workers > 1`` stages run in that many processes (spawned),
    longest first; with ``workers=1``, or a single stage left, they run
    here.  Every stage runs on one torch thread wherever it runs, so that
    its figures depend neither on ``workers`` nor on how many stages a
    resumed run had left: the thread count changes the order of torch's
    sums on a CPU, and so the last digits of a run and where it goes
    (``docs/learning-status.md``, section 77).
    """
    start = time.perf_counter()
    total = len(stages)
    index = {s.name: i + 1 for i, s in enumerate(stages)}
    todo = []
    for stage in stages:
        if stage_marker(stage) is not None:
            logger.info("stage %d/%d %s: already done, skipped", index[stage.name], total, stage.name)
        else:
            todo.append(stage)
    if not todo:
        return 0

    def done(stage: Stage, record: dict[str, Any]) -> None:
        logger.info(
            "stage %d/%d %s: done in %.1f s (%s; %.1f min elapsed)",
            index[stage.name], total, stage.name, record["elapsed_s"], _describe(record),
            (time.perf_counter() - start) / 60,
        )

    if workers <= 1 or len(todo) == 1:
        for stage in todo:
            logger.info("stage %d/%d %s: running (%d steps)", index[stage.name], total, stage.name, stage.config.steps)
            done(stage, run_stage(stage, STAGE_THREADS))
        return len(todo)
    todo = spread_out(todo)
    logger.info("running %d stages in %d processes", len(todo), workers)
    # An interruption ends the workers with this process; finished stages keep their stage.done, and the
    # next run resumes after them.
    with worker_pool(workers) as pool:
        futures = {pool.submit(run_stage, stage, STAGE_THREADS): stage for stage in todo}
        for future in completed(futures):
            done(futures[future], future.result())
    return len(todo)


# --------------------------------------------------------------- statistics
def load_arrays(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / EVALUATION_FILE) as data:
        return {k: data[k] for k in data.files}


#: The baseline predictor's reference rejections (``rejecting_by``), in report order, with their labels.
REFERENCES: tuple[tuple[str, str], ...] = (
    ("ground_truth", "the ground truth (a perfect ranking of it, ties in random order)"),
    ("predictor_confidence", "its own confidence"),
)
#: Random orders of the ground truth's ties behind its reference.  Many holdout images share the truth's
#: lowest value (on the built-in set 132 of 600 have classification amenability 0): which of them a perfect
#: ranking rejects first is arbitrary, and an order by index would reject whole patients.
TIE_BREAK_DRAWS = 200


def ratio_tests(
    metric: np.ndarray, scores: np.ndarray, reference: np.ndarray, groups: np.ndarray
) -> list[dict[str, Any]]:
    """At every ratio of ``REJECTION_RATIOS``: the paired t-test of ``metric`` on the images ``scores`` keep
    against ``reference`` on all images (:func:`~experiments.evaluation.paired_ttest`, with its ``ratio``)."""
    return [{"ratio": float(r), **paired_ttest(metric, kept_images(scores, r), reference, groups)} for r in REJECTION_RATIOS]


def rejecting_by(
    metric: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    ratio: float,
    describe: Callable[[np.ndarray], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``metric`` after rejecting by ``scores``: the curve, the paired t-test against no rejection at every
    ratio (``ttest``), and the paper's ratio with its test; with ``describe`` (:func:`rejected_describer`),
    also what the images rejected at the paper's ratio are (``rejected``)."""
    curve = rejection_curve(metric, scores, groups)
    tests = ratio_tests(metric, scores, metric, groups)
    at = next(c for c in curve if math.isclose(c["ratio"], ratio))
    test = next(t for t in tests if math.isclose(t["ratio"], ratio))
    result = {"curve": curve, "ttest": tests, "at_paper_ratio": _at_ratio(ratio, at, test)}
    if describe is not None:
        result["rejected"] = describe(~kept_images(scores, ratio))
    return result


def rejected_describer(task: str, holdout: Any, metric: np.ndarray) -> Callable[[np.ndarray], dict[str, Any]]:
    """A function of a mask of rejected holdout images: what they are, for ``rejecting_by(describe=...)``.

    ``images``: how many; ``metric_rejected`` and ``metric_all``: the
    predictor's per-image metric on them and on every image (a score that
    finds this predictor's failures rejects images of a low metric);
    ``at_lowest_truth``: the share of them at the ground truth's lowest
    amenability (None where the data has none); ``class_shares``: each class's
    share of them, and ``holdout_class_shares`` of the holdout (a score can
    reject one class, which moves accuracy by the class's difficulty alone;
    None for a holdout without labels).
    """
    metric = np.asarray(metric, dtype=np.float64)
    truth = np.asarray(holdout.amenability[task], dtype=np.float64) if task in holdout.amenability else None
    labels = None if getattr(holdout, "labels", None) is None else np.asarray(holdout.labels)
    names = [str(n) for n in getattr(holdout, "class_names", ())]
    if labels is not None and not names:
        names = [str(c) for c in range(int(labels.max(initial=0)) + 1)]

    def shares(mask: np.ndarray) -> dict[str, float] | None:
        n = int(mask.sum())
        if labels is None or not n:
            return None
        return {name: float(np.sum(labels[mask] == c) / n) for c, name in enumerate(names)}

    metric_all, holdout_shares = float(metric.mean()), shares(np.ones(len(metric), dtype=bool))

    def describe(rejected: np.ndarray) -> dict[str, Any]:
        n = int(rejected.sum())
        return {
            "images": n,
            "metric_rejected": float(metric[rejected].mean()) if n else None,
            "metric_all": metric_all,
            "at_lowest_truth": float(np.mean(truth[rejected] == truth.min())) if n and truth is not None else None,
            "class_shares": shares(rejected),
            "holdout_class_shares": holdout_shares,
        }

    return describe


def summarise_rejected(per_seed: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """:func:`rejected_describer`'s figures of several seeds: means +- st.d. (None if any seed lacks them)."""
    if not per_seed or any(r is None for r in per_seed):
        return None
    classes = per_seed[0]["class_shares"] or {}
    return {
        "images": mean_and_std([r["images"] for r in per_seed]),
        **{key: mean_and_std([r[key] for r in per_seed]) for key in ("metric_rejected", "metric_all", "at_lowest_truth")},
        "class_shares": {c: mean_and_std([(r["class_shares"] or {}).get(c) for r in per_seed]) for c in classes},
        "holdout_class_shares": per_seed[0]["holdout_class_shares"],
    }


def by_ratio(per_seed: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The per-ratio t-tests of several seeds (each a :func:`ratio_tests` list) summed up ratio by ratio:
    the gain (mean ± st.d. across seeds), the median p and the seeds better with p < 0.05.  Table 1 tests one
    ratio; this says from which ratio on the data show an effect."""
    rows = []
    for i, ratio in enumerate(REJECTION_RATIOS):
        tests = [seed[i] for seed in per_seed]
        rows.append({
            "ratio": float(ratio),
            "mean_difference": mean_and_std([t["mean_difference"] for t in tests]),
            "p_median": with_median(mean_and_std([t["p"] for t in tests]))["median"],
            "seeds_better_with_p_below_0.05": sum(better_than_baseline(t) for t in tests),
            "seeds": len(tests),
        })
    return rows


def better_than_baseline(test: dict[str, Any]) -> bool:
    """A :func:`~experiments.evaluation.paired_ttest` that is better than its reference with p < 0.05."""
    return bool(test["p"] is not None and test["p"] < 0.05 and (test["mean_difference"] or 0) > 0)


def untied(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ranks of ``scores`` (0 = the lowest) with ties in random order: the same ranking, no two values equal."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((rng.random(len(scores)), scores))
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(len(scores), dtype=np.float64)
    return ranks


def rejecting_by_truth(
    metric: np.ndarray,
    truth: np.ndarray,
    groups: np.ndarray,
    ratio: float,
    seed: int,
    draws: int = TIE_BREAK_DRAWS,
    describe: Callable[[np.ndarray], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """:func:`rejecting_by` a perfect ranking of ``truth``, its ties in random order, and how that order matters.

    The curve and ``at_paper_ratio`` are one such ranking's (drawn with
    ``seed``).  ``tie_breaks`` repeats the paper-ratio test over ``draws``
    random orders of the ties: the images tied at the lowest value, the
    median gain and p-value, and the fraction of orders that are better
    than no rejection with p < 0.05.  With no ties every order is the same.
    """
    truth = np.asarray(truth, dtype=np.float64)
    rng = np.random.default_rng(seed)
    result = rejecting_by(metric, untied(truth, rng), groups, ratio, describe)
    tests = [paired_ttest(metric, kept_images(untied(truth, rng), ratio), metric, groups) for _ in range(draws)]
    p_values = [t["p"] for t in tests if t["p"] is not None]
    result["tie_breaks"] = {
        "draws": int(draws),
        "tied_at_lowest": int(np.sum(truth == truth.min())) if truth.size else 0,
        "mean_difference_median": float(np.median([t["mean_difference"] or 0.0 for t in tests])) if tests else None,
        "p_median": float(np.median(p_values)) if p_values else None,
        "better_with_p_below_0.05_fraction": float(np.mean([better_than_baseline(t) for t in tests])) if tests else None,
    }
    return result


def summarise_baseline(task: str, holdout: Any, arrays: dict[str, np.ndarray], seed: int, draws: int = RANDOM_DRAWS) -> dict[str, Any]:
    """The baseline predictor of one seed: its holdout metric, the random-rejection band, the heuristics, and the references.

    The references are the same predictor rejecting by its own confidence (the
    cheapest quality filter there is) and, where the data knows it, by the
    ground-truth amenability: what a controller that learnt the data's
    amenability perfectly would give this predictor. (A score aimed at this
    predictor's own errors, as its confidence is, can give more: not every
    image it gets wrong is a degraded one, nor every degraded one wrong.)
    """
    metric, groups = arrays["metric"], holdout.groups
    ratio = PAPER_REJECTION_RATIO[task]
    describe = rejected_describer(task, holdout, metric)
    out: dict[str, Any] = {
        "seed": seed,
        "metric": metric_across_patients(metric, groups),
        "random_band": random_rejection_band(metric, groups, draws=draws, seed=seed),
        "rejecting_by": {"predictor_confidence": rejecting_by(metric, arrays["confidence"], groups, ratio, describe)},
        "heuristics": {},
    }
    if task in holdout.amenability:
        out["rejecting_by"]["ground_truth"] = rejecting_by_truth(
            metric, holdout.amenability[task], groups, ratio, seed, describe=describe
        )
        for name, scores in heuristic_scores(holdout.images, arrays["confidence"]).items():
            ranking = ranking_agreement(scores, holdout.amenability[task])
            a = ranking["auroc"]
            out["heuristics"][name] = {**ranking, "auroc_either_sign": None if a is None else max(a, 1.0 - a)}
    return out


def _at_ratio(ratio: float, point: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    """One rejection curve's point and its paired t-test against the baseline, as ``at_paper_ratio``."""
    return {
        "ratio": ratio,
        "mean": point["mean"],
        "std": point["std"],
        "p": test["p"],
        "t": test["t"],
        "mean_difference": test["mean_difference"],
        "better_with_p_below_0.05": better_than_baseline(test),
    }


def summarise_run(
    task: str,
    holdout: Any,
    arrays: dict[str, np.ndarray],
    baseline: dict[str, np.ndarray],
    seed: int,
    draws: int = RANDOM_DRAWS,
    heuristics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every holdout figure of one run (its predictor and controller) against the baseline of the same seed."""
    metric, scores, groups = arrays["metric"], arrays["scores"], holdout.groups
    ratio = PAPER_REJECTION_RATIO[task]
    curve = rejection_curve(metric, scores, groups)
    tests = ratio_tests(metric, scores, baseline["metric"], groups)
    at = next(c for c in curve if math.isclose(c["ratio"], ratio))
    test = next(t for t in tests if math.isclose(t["ratio"], ratio))
    # The same seed's baseline predictor on the images this controller keeps: what the score alone adds,
    # apart from how well the co-trained predictor was trained (it sees only the images the controller selects:
    # with REINFORCE's defaults for the weighted and selective rewards about 30 % of each batch, which costs it 0.03
    # of accuracy: docs/reproduce.md, "Why the co-trained predictors are below the baseline").
    run: dict[str, Any] = {
        "seed": seed,
        "mean_score": float(np.mean(scores)),
        "curve": curve,
        "ttest": tests,
        "at_paper_ratio": _at_ratio(ratio, at, test),
        "baseline_predictor": rejecting_by(
            baseline["metric"], scores, groups, ratio, rejected_describer(task, holdout, baseline["metric"])
        ),
        "random_band": random_rejection_band(metric, groups, draws=draws, seed=seed),
        "contingency": None,
        "controller": None,
        "beats_heuristics": None,
        # The controller's AUROC minus the best heuristic's (either sign) on the same seed: how far ahead it is.
        "margin_over_heuristics": None,
    }
    if "initial_scores" in arrays:
        initial = arrays["initial_scores"]
        # The same predictor on the images the run's untrained controller keeps: what rejecting by a
        # network that has learnt nothing gives (an untrained network's lowest scores are not random images).
        run["untrained_baseline_predictor"] = rejecting_by(
            baseline["metric"], initial, groups, ratio, rejected_describer(task, holdout, baseline["metric"])
        )
        # What the training added, tested: the predictor on what this controller keeps against on what its
        # untrained start keeps, patient by patient, at every ratio.
        against = [
            {"ratio": float(r), **paired_ttest(baseline["metric"], kept_images(scores, r), baseline["metric"], groups,
                                               kept_images(initial, r))}
            for r in REJECTION_RATIOS
        ]
        test = next(t for t in against if math.isclose(t["ratio"], ratio))
        run["baseline_predictor"]["against_untrained"] = {
            "ttest": against,
            "at_paper_ratio": {
                "ratio": ratio, "p": test["p"], "t": test["t"], "mean_difference": test["mean_difference"],
                "better_with_p_below_0.05": better_than_baseline(test),
            },
        }
    if task in holdout.human_amenability:
        run["contingency"] = contingency(scores, holdout.human_amenability[task], ratio)
    if task in holdout.amenability:
        run["controller"] = ranking_agreement(scores, holdout.amenability[task])
        best = [h["auroc_either_sign"] for h in (heuristics or {}).values() if h["auroc_either_sign"] is not None]
        final = run["controller"]["auroc"]
        if final is not None and best:
            run["margin_over_heuristics"] = float(final - max(best))
            run["beats_heuristics"] = run["margin_over_heuristics"] > 0
        if "confidence" in baseline:
            # What the controller knows that the same seed's baseline predictor's confidence does not.
            run["with_confidence"] = with_confidence(
                scores, baseline["confidence"], holdout.amenability[task], arrays.get("initial_scores")
            )
    return run


def with_median(stats: dict[str, Any]) -> dict[str, Any]:
    """A "stats" of p-values (:func:`mean_and_std`) with the ``median`` of its defined values added."""
    defined = [v for v in stats["values"] if v is not None]
    return {**stats, "median": float(np.median(defined)) if defined else None}


def summarise_with_confidence(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Each seed's :func:`~experiments.evaluation.with_confidence` across seeds (None where no run has it):
    means +- st.d. of its figures, and every seed's averaged ranks against the confidence alone
    (``against_confidence``: :func:`~experiments.evaluation.against_initial`, the confidence as the start)."""
    seeds = [r.get("with_confidence") or {} for r in runs]
    if not any(seeds):
        return None
    keys = ("spearman", "auroc", "confidence_auroc", "untrained_auroc")
    moved = against_initial([s.get("confidence_auroc") for s in seeds], [s.get("auroc") for s in seeds])
    return {
        **{key: mean_and_std([s.get(key) for s in seeds]) for key in keys},
        "against_confidence": {k: v for k, v in moved.items() if k not in ("initial", "final")},
    }


def summarise_seeds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Headline figures of one method across seeds: means +- st.d. (every seed's value listed)."""
    initial = [r.get("initial_auroc") for r in runs]
    final = [(r["controller"] or {}).get("auroc") for r in runs]
    moved = against_initial(initial, final)
    summary: dict[str, Any] = {
        "metric_at_paper_ratio": mean_and_std([r["at_paper_ratio"]["mean"] for r in runs]),
        "patient_std_at_paper_ratio": mean_and_std([r["at_paper_ratio"]["std"] for r in runs]),
        "p_value": mean_and_std([r["at_paper_ratio"]["p"] for r in runs]),
        "seeds_better_with_p_below_0.05": sum(r["at_paper_ratio"]["better_with_p_below_0.05"] for r in runs),
        "baseline_predictor_at_paper_ratio": mean_and_std([r["baseline_predictor"]["at_paper_ratio"]["mean"] for r in runs]),
        "baseline_predictor_p_value": mean_and_std([r["baseline_predictor"]["at_paper_ratio"]["p"] for r in runs]),
        "baseline_predictor_seeds_better_with_p_below_0.05": sum(
            r["baseline_predictor"]["at_paper_ratio"]["better_with_p_below_0.05"] for r in runs
        ),
        # What the controller rejects at the paper's ratio, seen by the baseline predictor.
        "baseline_predictor_rejected": summarise_rejected([r["baseline_predictor"].get("rejected") for r in runs]),
        "initial_auroc": mean_and_std(initial),
        "final_auroc": mean_and_std(final),
        # Every seed against its own untrained controller: how many ended higher, and a sign test.
        "auroc_against_initial": {k: v for k, v in moved.items() if k not in ("initial", "final")},
        "spearman": mean_and_std([(r["controller"] or {}).get("spearman") for r in runs]),
        "seeds_beating_heuristics": sum(bool(r["beats_heuristics"]) for r in runs),
        "margin_over_heuristics": mean_and_std([r.get("margin_over_heuristics") for r in runs]),
        "with_confidence": summarise_with_confidence(runs),
        "wall_time_s": mean_and_std([r.get("wall_time_s") for r in runs]),
        "curve": [
            {"ratio": float(ratio), **mean_and_std([r["curve"][i]["mean"] for r in runs])}
            for i, ratio in enumerate(REJECTION_RATIOS)
        ],
        "kappa": None,
        "contingency_summed": None,
        # Every ratio's test, not Table 1's alone: the co-trained predictor against the baseline, and the
        # baseline predictor on the images the controller keeps against the same predictor on all of them.
        "by_ratio": {
            "co_trained": by_ratio([r["ttest"] for r in runs]),
            "baseline_predictor": by_ratio([r["baseline_predictor"]["ttest"] for r in runs]),
        },
    }
    for key in ("p_value", "baseline_predictor_p_value"):
        summary[key] = with_median(summary[key])
    # The baseline predictor rejecting by each seed's untrained controller, shaped as a reference's summary
    # (None where a stage was evaluated before its initial scores were kept).
    untrained = [r.get("untrained_baseline_predictor") for r in runs]
    summary["untrained"] = summarise_rejecting_by(untrained) if untrained and all(untrained) else None
    against = [r["baseline_predictor"].get("against_untrained") for r in runs]
    summary["baseline_predictor_against_untrained"] = None
    if against and all(against):
        at = [a["at_paper_ratio"] for a in against]
        summary["baseline_predictor_against_untrained"] = {
            "mean_difference": mean_and_std([a["mean_difference"] for a in at]),
            "p_value": with_median(mean_and_std([a["p"] for a in at])),
            "seeds_better_with_p_below_0.05": sum(a["better_with_p_below_0.05"] for a in at),
            "seeds_worse_with_p_below_0.05": sum(
                a["p"] is not None and a["p"] < 0.05 and (a["mean_difference"] or 0) < 0 for a in at
            ),
        }
        summary["by_ratio"]["against_untrained"] = by_ratio([a["ttest"] for a in against])
    tables = [r["contingency"] for r in runs if r["contingency"] is not None]
    if tables:
        summary["kappa"] = mean_and_std([t["kappa"] for t in tables])
        summary["contingency_summed"] = np.sum([t["table"] for t in tables], axis=0).astype(int).tolist()
    return summary


def summarise_rejecting_by(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One reference rejection across seeds: its paper-ratio figure, p-values (+ median) and mean curve."""
    summary = {
        "at_paper_ratio": mean_and_std([r["at_paper_ratio"]["mean"] for r in per_seed]),
        "p_value": with_median(mean_and_std([r["at_paper_ratio"]["p"] for r in per_seed])),
        "seeds_better_with_p_below_0.05": sum(r["at_paper_ratio"]["better_with_p_below_0.05"] for r in per_seed),
        "by_ratio": by_ratio([r["ttest"] for r in per_seed]),
        "rejected": summarise_rejected([r.get("rejected") for r in per_seed]),
        "curve": [
            {"ratio": float(r), **mean_and_std([run["curve"][i]["mean"] for run in per_seed])}
            for i, r in enumerate(REJECTION_RATIOS)
        ],
    }
    if per_seed and all("tie_breaks" in r for r in per_seed):  # the ground truth's reference
        ties = [r["tie_breaks"] for r in per_seed]
        summary["tie_breaks"] = {
            "p_median": mean_and_std([t["p_median"] for t in ties]),
            "better_with_p_below_0.05_fraction": mean_and_std([t["better_with_p_below_0.05_fraction"] for t in ties]),
            "tied_at_lowest": ties[0]["tied_at_lowest"],
            "draws": ties[0]["draws"],
        }
    return summary


def summarise_heuristics(baselines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    names = baselines[0]["heuristics"] if baselines else {}
    return {
        name: {key: mean_and_std([b["heuristics"][name][key] for b in baselines]) for key in ("auroc", "auroc_either_sign", "spearman")}
        for name in names
    }


def holdout_facts(task: str, holdout: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {"images": len(holdout), "patients": int(np.unique(holdout.groups).size)}
    if task in holdout.amenability:
        facts["amenable_fraction"] = float(np.mean(holdout.amenable(task)))
    if task in holdout.human_amenability:
        facts["human_amenable_fraction"] = float(np.mean(holdout.human_amenability[task]))
    return facts


def human_label_agreement(task: str, holdout: Any) -> dict[str, Any] | None:
    """AUROC and Spearman of the human labels against the ground truth: the bar the controller should pass."""
    if task not in holdout.amenability or task not in holdout.human_amenability:
        return None
    return ranking_agreement(holdout.human_amenability[task].astype(np.float64), holdout.amenability[task])


def read_train_run(stage: Stage) -> dict[str, Any]:
    """What train() recorded for a stage: steps, wall time, initial / final AUROC and the AUROC curve.

    Also the initial / final AUROC within each class (None for a stage trained before train() wrote them).
    """
    summary = json.loads((stage.folder / "summary.json").read_text())
    record = {k: summary[k] for k in ("steps", "wall_time_s", "initial_auroc", "final_auroc", "auroc_curve")}
    record.update({k: summary.get(k) for k in ("initial_auroc_by_class", "final_auroc_by_class")})
    return record


def collect_task(
    task: str,
    holdout: Any,
    stages: Sequence[Stage],
    labels: Sequence[str],
    draws: int = RANDOM_DRAWS,
) -> dict[str, Any]:
    """Every figure of one task from its finished stages: the baseline, and each run label (reward or algorithm)."""
    by_name = {s.name: s for s in stages if s.config.task == task}
    seeds = sorted({s.config.seed for s in by_name.values()})
    baselines, baseline_arrays = [], {}
    for seed in seeds:
        stage = by_name[f"{task}/baseline/seed{seed}"]
        baseline_arrays[seed] = load_arrays(stage.folder)
        entry = summarise_baseline(task, holdout, baseline_arrays[seed], seed, draws)
        marker = stage_marker(stage) or {}
        entry.update(folder=stage.name, predictor_updates=marker.get("predictor_updates"))
        baselines.append(entry)
    runs: dict[str, Any] = {}
    for label in labels:
        per_seed = []
        for seed, baseline in zip(seeds, baselines):
            stage = by_name[f"{task}/{label}/seed{seed}"]
            run = summarise_run(task, holdout, load_arrays(stage.folder), baseline_arrays[seed], seed, draws, baseline["heuristics"])
            run.update(folder=stage.name, algo=stage.config.algo, reward=stage.config.reward, **read_train_run(stage))
            per_seed.append(run)
        runs[label] = {"runs": per_seed, "summary": summarise_seeds(per_seed)}
        unevaluated = [run["folder"] for run in per_seed if "untrained_baseline_predictor" not in run]
        if unevaluated:
            logger.info(
                "%s: evaluated without the untrained controller's scores (a stage finished before they were kept, or "
                "one whose rebuilt controller did not match its run), so its rows are left out; delete the stage's "
                "stage.done and run the same command to evaluate it again (its training is not repeated)",
                ", ".join(unevaluated),
            )
    ratio = PAPER_REJECTION_RATIO[task]
    return {
        "metric": METRIC_NAMES[task],
        "paper_rejection_ratio": ratio,
        "holdout": holdout_facts(task, holdout),
        "human_labels": human_label_agreement(task, holdout),
        "heuristics": summarise_heuristics(baselines),
        "baseline": {
            "runs": baselines,
            "summary": {
                "metric": mean_and_std([b["metric"]["mean"] for b in baselines]),
                "patient_std": mean_and_std([b["metric"]["std"] for b in baselines]),
                "random_band": [
                    {
                        "ratio": float(r),
                        **{k: float(np.mean([b["random_band"][i][k] for b in baselines])) for k in ("low", "median", "high")},
                    }
                    for i, r in enumerate(REJECTION_RATIOS)
                ],
                "rejecting_by": {
                    name: summarise_rejecting_by([b["rejecting_by"][name] for b in baselines])
                    for name in (baselines[0]["rejecting_by"] if baselines else {})
                },
            },
        },
        "runs": runs,
    }


def table1(task_result: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Table 1's rows: the baseline (no rejection) and each reward at the paper's rejection ratio."""
    paper = PAPER_TABLE1.get(task, {})
    base = task_result["baseline"]["summary"]
    rows = [
        {
            "method": "baseline",
            "rejection_ratio": 0.0,
            "metric_mean": base["metric"]["mean"],
            "metric_std_across_seeds": base["metric"]["std"],
            "metric_std_across_patients": base["patient_std"]["mean"],
            "p_value_median": None,
            "seeds_better_with_p_below_0.05": None,
            "seeds": base["metric"]["n"],
            "paper": paper.get("baseline"),
        }
    ]
    for label, entry in task_result["runs"].items():
        s = entry["summary"]
        rows.append(
            {
                "method": label,
                "rejection_ratio": task_result["paper_rejection_ratio"],
                "metric_mean": s["metric_at_paper_ratio"]["mean"],
                "metric_std_across_seeds": s["metric_at_paper_ratio"]["std"],
                "metric_std_across_patients": s["patient_std_at_paper_ratio"]["mean"],
                "p_value_median": s["p_value"]["median"],
                "seeds_better_with_p_below_0.05": s["seeds_better_with_p_below_0.05"],
                "seeds": s["metric_at_paper_ratio"]["n"],
                "paper": paper.get(label),
            }
        )
    return rows


def to_json(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN / inf to None, paths to strings."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, Path):
        return value.as_posix()
    return value


def versions() -> dict[str, str]:
    import scipy
    import stable_baselines3
    import torch

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "stable_baselines3": stable_baselines3.__version__,
    }


def command_line(name: str, options: dict[str, Any]) -> str:
    """``iqa NAME --opt value ...`` of the options given (None and False left out)."""
    argv = ["iqa", name]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value, sort_keys=True)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return shlex.join(argv)


def format_number(value: float | None, digits: int = 3, signed: bool = False) -> str:
    """``0.123`` (``+0.123`` with ``signed``; ``n/a`` for an undefined figure)."""
    return "n/a" if value is None else f"{value:{'+' if signed else ''}.{digits}f}"


def format_stats(stats: dict[str, Any], digits: int = 3, signed: bool = False) -> str:
    """``mean ± std`` of a :func:`~experiments.evaluation.mean_and_std` record (the std only where defined;
    the mean's sign always with ``signed``)."""
    if stats["mean"] is None:
        return "n/a"
    return format_number(stats["mean"], digits, signed) + ("" if stats["std"] is None else f" ± {format_number(stats['std'], digits)}")


# ------------------------------------------------------------------ outputs
def new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> Path:
    from iqa_env.files import atomic_write

    fig.tight_layout()
    # "tight": the saved image grows to hold a legend placed outside the axes rather than cutting it off.
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def plot_contingency(task_result: dict[str, Any], path: Path) -> Path:
    """Figure 3: a 2x2 table per method (counts summed over seeds), with Cohen's kappa."""
    entries = [(label, e["summary"]) for label, e in task_result["runs"].items() if e["summary"]["contingency_summed"]]
    fig = new_figure(3.2 * max(1, len(entries)), 3.2)
    for i, (label, s) in enumerate(entries):
        ax = fig.add_subplot(1, len(entries), i + 1)
        table = np.array(s["contingency_summed"])
        ax.imshow(table, cmap="Blues")
        for (r, c), n in np.ndenumerate(table):
            ax.text(c, r, str(n), ha="center", va="center", color="black", fontsize=11)
        ax.set_xticks([0, 1], ["human:\nnot amenable", "human:\namenable"], fontsize=8)
        ax.set_yticks([0, 1], ["controller:\nlow", "controller:\nhigh"], fontsize=8)
        ax.set_title(f"{label}\nkappa {format_stats(s['kappa'], 2)}", fontsize=9)
    if not entries:
        fig.text(0.5, 0.5, "no human amenability labels in the holdout set", ha="center")
    ratio = task_result["paper_rejection_ratio"]
    fig.suptitle(f"{task_result['metric']}: controller low = lowest {ratio:.0%} (summed over seeds)", fontsize=9)
    return save_figure(fig, path)


def plot_rejection(task_result: dict[str, Any], path: Path) -> Path:
    """Figure 4: holdout metric against rejection ratio, one curve per method, the baseline, the random band."""
    fig = new_figure(7.5, 6.4)
    ax = fig.add_subplot(1, 1, 1)
    x = 100 * np.array(REJECTION_RATIOS)
    base = task_result["baseline"]["summary"]
    band = base["random_band"]
    ax.fill_between(x, [b["low"] for b in band], [b["high"] for b in band], color="0.85",
                    label=f"baseline, random rejection ({RANDOM_BAND_QUANTILES[0]:.0%}-{RANDOM_BAND_QUANTILES[1]:.0%})")
    if base["metric"]["mean"] is not None:
        ax.axhline(base["metric"]["mean"], color="black", lw=1.5, label="baseline (non-selective, all images)")
    for (name, text), style in zip(REFERENCES, ("--", ":")):
        if name in base["rejecting_by"]:
            values = [c["mean"] for c in base["rejecting_by"][name]["curve"]]
            ax.plot(x, [np.nan if v is None else v for v in values], color="0.4", ls=style, label=f"baseline, rejecting by {text}")
    # Each reward's points a little to the side of the others', so that error bars of equal means stay apart.
    n_runs = len(task_result["runs"])
    for i, (label, entry) in enumerate(task_result["runs"].items()):
        curve = entry["summary"]["curve"]
        mean = np.array([np.nan if c["mean"] is None else c["mean"] for c in curve])
        std = np.array([0.0 if c["std"] is None else c["std"] for c in curve])
        dodge = 0.4 * (i - (n_runs - 1) / 2)
        ax.errorbar(x + dodge, mean, yerr=std, marker="o", ms=4, capsize=3, color=f"C{i}", label=label)
        # The same seeds' baseline predictors on the images this controller keeps: the score's own effect.
        filtered = [[np.nan if c["mean"] is None else c["mean"] for c in r["baseline_predictor"]["curve"]] for r in entry["runs"]]
        if filtered:
            ax.plot(x, np.nanmean(np.array(filtered, dtype=float), axis=0), color=f"C{i}", ls="-.", lw=1.2,
                    label=f"baseline predictor, rejecting by the {label} controller")
    ax.set_xlabel("rejection ratio (%)")
    ax.set_ylabel(f"holdout {task_result['metric']} (mean over patients)")
    ax.set_title("mean ± st.d. across seeds", fontsize=9)
    # Below the axes, off the curves, in two columns: beside them it took half the width from the plot.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, borderaxespad=0.0)
    return save_figure(fig, path)


def draw_heuristics(ax: Any, task_result: dict[str, Any]) -> None:
    """The heuristics' either-sign AUROC (mean over seeds) as horizontal lines, one style each."""
    styles = iter(["--", "-.", ":", (0, (5, 1))])
    for name, h in task_result["heuristics"].items():
        if h["auroc_either_sign"]["mean"] is not None:
            ax.axhline(h["auroc_either_sign"]["mean"], color="C3", ls=next(styles, "--"), lw=1, label=f"{name} (either sign)")


def plot_auroc(task_result: dict[str, Any], path: Path) -> Path:
    """Controller AUROC against the ground truth per seed, at initialisation and at the end, beside the heuristics."""
    fig = new_figure(8.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    labels = list(task_result["runs"])
    for i, label in enumerate(labels):
        for run in task_result["runs"][label]["runs"]:
            initial = run.get("initial_auroc")
            final = (run["controller"] or {}).get("auroc")
            if initial is None or final is None:
                continue
            ax.plot([i - 0.15, i + 0.15], [initial, final], color="0.6", lw=0.8)
            ax.plot(i - 0.15, initial, "o", mfc="white", mec="C0", ms=5)
            ax.plot(i + 0.15, final, "o", color="C0", ms=5)
    ax.plot([], [], "o", mfc="white", mec="C0", label="controller at initialisation")
    ax.plot([], [], "o", color="C0", label="controller at the end")
    draw_heuristics(ax, task_result)
    human = task_result["human_labels"]
    if human and human["auroc"] is not None:
        ax.axhline(human["auroc"], color="C2", lw=1.2, label="human labels")
    ax.axhline(0.5, color="black", lw=0.5)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 1.03)  # a line at 1.0 (human labels of a small set) stays off the frame
    ax.set_ylabel("holdout AUROC vs ground-truth amenable")
    # Outside the axes: inside, the legend hid the points of the last scorer.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return save_figure(fig, path)


def figure_names(task: str) -> dict[str, str]:
    return {
        "figure3": f"figure3_{task}.png",
        "figure4": f"figure4_{task}.png",
        "auroc": f"auroc_{task}.png",
    }


def write_figures(results: dict[str, Any], out: Path) -> list[Path]:
    paths = []
    for task, task_result in results["tasks"].items():
        names = figure_names(task)
        paths.append(plot_contingency(task_result, out / names["figure3"]))
        paths.append(plot_rejection(task_result, out / names["figure4"]))
        paths.append(plot_auroc(task_result, out / names["auroc"]))
    return paths


def _table1_markdown(task_result: dict[str, Any]) -> list[str]:
    metric = task_result["metric"]
    lines = [
        (f"| method | rejection | {metric}: mean ± st.d. across seeds | st.d. across patients (mean over seeds) "
        f"| paired t-test p (median over seeds) | seeds better with p < 0.05 | paper |"),
        "|---|---|---|---|---|---|---|",
    ]
    for row in task_result["table1"]:
        stats = {"mean": row["metric_mean"], "std": row["metric_std_across_seeds"]}
        better = row["seeds_better_with_p_below_0.05"]
        lines.append(
            f"| {row['method']} | {row['rejection_ratio']:.0%} | {format_stats(stats)} | {format_number(row['metric_std_across_patients'])} "
            f"| {format_number(row['p_value_median'], 4)} | {'—' if better is None else str(better) + ' of ' + str(row['seeds'])} "
            f"| {format_number(row['paper'])} |"
        )
    return lines


def tie_break_text(reference: dict[str, Any]) -> str | None:
    """One sentence on how the ground-truth reference depends on the order of its ties (None without ties)."""
    ties = reference.get("tie_breaks")
    if not ties or ties["tied_at_lowest"] < 2 or ties["p_median"]["mean"] is None:
        return None
    fraction = ties["better_with_p_below_0.05_fraction"]
    return (
        f"{ties['tied_at_lowest']} holdout images share the ground truth's lowest value; of {ties['draws']} random "
        f"orders of those ties, {format_number(100 * fraction['mean'], 0)} % beat no rejection with p < 0.05 "
        f"(mean over seeds; their median p {format_number(ties['p_median']['mean'], 3)})"
    )


def _tie_break_markdown(task_result: dict[str, Any]) -> list[str]:
    reference = task_result["baseline"]["summary"]["rejecting_by"].get("ground_truth")
    text = None if reference is None else tie_break_text(reference)
    return [] if text is None else [f"The ground-truth row is one random order of its ties: {text}.", ""]


def each_scorer(
    task_result: dict[str, Any],
    reference: Callable[[dict[str, Any]], Any],
    controller: Callable[[dict[str, Any]], Any],
    references: Sequence[tuple[str, str]] = REFERENCES,
    short: bool = False,
) -> list[tuple[str, str, Any]]:
    """The rows of every table that sets the scores side by side: each reference, then each controller.

    Returns ``(kind, label, value)`` with ``kind`` ``"reference"``,
    ``"untrained"`` or ``"controller"``.  ``value`` is ``reference(task_result["baseline"]["summary"]["rejecting_by"][name])``
    for a reference, ``reference(run summary["untrained"])`` for the
    controller a run started from (one row after the references when every
    run started from the same one, as the rewards of ``iqa reproduce`` do;
    else one before each controller), or ``controller(run summary)`` for a
    controller.  Rows
    whose value is empty are left out: the reference is absent, or
    ``results.json`` was written before the field existed.  ``short`` drops
    a reference's explanation in brackets (the console's labels).
    """
    rows: list[tuple[str, str, Any]] = []
    summary = task_result["baseline"]["summary"]["rejecting_by"]
    for name, text in references:
        value = reference(summary[name]) if name in summary else None
        if value:
            rows.append(("reference", text.split(" (")[0] if short else text, value))
    untrained = {label: entry["summary"].get("untrained") for label, entry in task_result["runs"].items()}
    shared = len({json.dumps(to_json(u), sort_keys=True) for u in untrained.values()}) == 1
    if untrained and shared and all(untrained.values()):
        # Every run started from the same controller (same algorithm and seeds): one row for them all.
        value = reference(next(iter(untrained.values())))
        if value:
            rows.append(("untrained", UNTRAINED_TEXT.split(" (")[0] if short else UNTRAINED_TEXT, value))
        untrained = {}
    for label, entry in task_result["runs"].items():
        value = reference(untrained[label]) if untrained.get(label) else None
        if value:
            rows.append(("untrained", f"controller, {label}, untrained", value))
        value = controller(entry["summary"])
        if value:
            rows.append(("controller", f"controller, {label}", value))
    return rows


#: The row of the controller every run started from, where they all started from the same one.
UNTRAINED_TEXT = "the untrained controller (each seed's, before any training)"


def _baseline_predictor_markdown(task_result: dict[str, Any]) -> list[str]:
    metric = task_result["metric"]
    lines = [
        f"| rejecting by | {metric}: mean ± st.d. across seeds | paired t-test p (median over seeds) | seeds better with p < 0.05 |",
        "|---|---|---|---|",
        f"| nothing (baseline) | {format_stats(task_result['baseline']['summary']['metric'])} | n/a | — |",
    ]
    rows = each_scorer(
        task_result,
        lambda r: (r["at_paper_ratio"], r["p_value"], r["seeds_better_with_p_below_0.05"]),
        lambda s: (s["baseline_predictor_at_paper_ratio"], s["baseline_predictor_p_value"],
                   s["baseline_predictor_seeds_better_with_p_below_0.05"]),
    )
    for _, label, (at_ratio, p_value, better) in rows:
        lines.append(
            f"| {label} | {format_stats(at_ratio)} | {format_number(p_value['median'], 4)} | {better} of {at_ratio['n']} |"
        )
    return lines


def _rejected_markdown(task_result: dict[str, Any]) -> list[str]:
    """What each reference and each controller rejects at the paper's ratio, seen by the baseline predictor
    (none where ``results.json`` was written before the field existed)."""
    rows = [
        (label, value)
        for _, label, value in each_scorer(
            task_result, lambda r: r.get("rejected"), lambda s: s.get("baseline_predictor_rejected")
        )
    ]
    if not rows:
        return []
    metric, ratio = task_result["metric"], task_result["paper_rejection_ratio"]
    holdout = rows[0][1]["holdout_class_shares"] or {}
    classes = list(holdout)
    lines = [
        (f"What each rejects at {ratio:.0%}: the baseline predictor's {metric} on the rejected images (on every "
         f"holdout image: {format_number(rows[0][1]['metric_all']['mean'])}), the share of them at the ground "
         "truth's lowest amenability"
         + (", and each class's share (of the holdout: " + ", ".join(f"{c} {holdout[c]:.0%}" for c in classes) + ")"
            if classes else "")
         + "; means over seeds. A score that finds the "
         "predictor's failures rejects images of a low metric; one that rejects a class moves accuracy by that "
         "class's difficulty alone."),
        "",
        f"| rejecting by | images | baseline predictor's {metric} on them | at the lowest ground truth | "
        + " | ".join(f"share: {c}" for c in classes) + " |",
        "|---" * (4 + len(classes)) + "|",
    ]
    for text, r in rows:
        shares = [format_number((r["class_shares"].get(c) or {}).get("mean"), 2) for c in classes]
        lines.append(
            f"| {text} | {format_number(r['images']['mean'], 0)} | {format_stats(r['metric_rejected'])} "
            f"| {format_number(r['at_lowest_truth']['mean'], 2)} | " + " | ".join(shares) + " |"
        )
    return [*lines, ""]


def _by_ratio_markdown(task_result: dict[str, Any]) -> list[str]:
    """Every ratio's gain and seeds better with p < 0.05, for the references and each controller."""
    header = "| rejecting by (predictor) | " + " | ".join(f"{r:.0%}" for r in REJECTION_RATIOS) + " |"
    lines = [header, "|---" * (len(REJECTION_RATIOS) + 1) + "|"]

    def row(name: str, rows: Sequence[dict[str, Any]] | None, against_itself: bool = True) -> None:
        if not rows:  # results collected before the field existed
            return
        cells = []
        for r in rows:
            gain = r["mean_difference"]["mean"]
            if gain is None or (against_itself and r["ratio"] == 0):
                cells.append("—")
            else:
                cells.append(f"{gain:+.3f} ({r['seeds_better_with_p_below_0.05']} of {r['seeds']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    for kind, label, value in each_scorer(task_result, lambda r: r.get("by_ratio"), lambda s: s.get("by_ratio")):
        if kind != "controller":
            row(f"{label} (baseline)", value)
        else:
            row(f"{label} (baseline)", value.get("baseline_predictor"))
            row(f"{label} (baseline, against its untrained start)", value.get("against_untrained"))
            row(f"{label} (co-trained)", value.get("co_trained"), against_itself=False)
    return lines


def against_initial_text(summary: dict[str, Any]) -> str:
    """``"3 of 4 (sign test p 0.62)"``: the seeds whose controller ended above its own untrained one, and
    the sign test (:func:`~experiments.evaluation.seeds_higher_text` of ``auroc_against_initial``)."""
    return seeds_higher_text(summary.get("auroc_against_initial"))  # absent in results.json written before it


def margin_text(summary: dict[str, Any]) -> str:
    """``"+0.009 ± 0.018"``: the controllers' AUROC minus the same seed's best heuristic's, across seeds
    (``"n/a"`` without it, as in results.json written before it existed)."""
    stats = summary.get("margin_over_heuristics")
    return "n/a" if not stats else format_stats(stats, signed=True)


def _auroc_markdown(task_result: dict[str, Any]) -> list[str]:
    lines = [
        "| scorer | AUROC at initialisation | AUROC at the end | seeds higher than at initialisation (sign test p) "
        "| Spearman at the end | seeds beating every heuristic | AUROC minus the best heuristic's, same seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, entry in task_result["runs"].items():
        s = entry["summary"]
        lines.append(
            f"| controller, {label} | {format_stats(s['initial_auroc'])} | {format_stats(s['final_auroc'])} "
            f"| {against_initial_text(s)} | {format_stats(s['spearman'])} "
            f"| {s['seeds_beating_heuristics']} of {s['final_auroc']['n']} | {margin_text(s)} |"
        )
    for name, h in task_result["heuristics"].items():
        lines.append(f"| {name} (either sign: {format_stats(h['auroc_either_sign'])}) | — | {format_stats(h['auroc'])} | — | {format_stats(h['spearman'])} | — | — |")
    human = task_result["human_labels"]
    if human:
        lines.append(f"| human labels | — | {format_number(human['auroc'])} | — | {format_number(human['spearman'])} | — | — |")
    return lines


def with_confidence_text(stats: dict[str, Any]) -> str:
    """A controller's ``summary["with_confidence"]`` in a line: its ranks averaged with the baseline
    predictor's confidence, against the confidence alone and the untrained controller's average."""
    return (
        f"{format_stats(stats['auroc'])} (the confidence alone {format_stats(stats['confidence_auroc'])}, "
        f"higher on {seeds_higher_text(stats['against_confidence'])}; the untrained controller's ranks averaged "
        f"with it {format_stats(stats['untrained_auroc'])}); Spearman with the confidence {format_stats(stats['spearman'])}"
    )


def _with_confidence_markdown(task_result: dict[str, Any]) -> list[str]:
    """The report's table of what each controller knows that the baseline predictor's confidence does not."""
    rows = [(label, entry["summary"].get("with_confidence")) for label, entry in task_result["runs"].items()]
    rows = [(label, stats) for label, stats in rows if stats]
    if not rows:
        return []
    lines = [
        "### What the controller knows that the predictor's confidence does not",
        "",
        "Each seed's controller scores and the same seed's baseline predictor's confidence, their ranks averaged "
        "into one score: where it ranks the ground truth better than the confidence alone, and the untrained "
        "controller's ranks averaged with the confidence do not, the training taught the controller something "
        "the confidence does not carry (`with_confidence` in results.json).",
        "",
        "| scorer | Spearman with the confidence | ranks averaged with the confidence: AUROC | the confidence alone "
        "| seeds where the average is higher (sign test p) | the untrained controller averaged with the confidence |",
        "|---|---|---|---|---|---|",
    ]
    for label, stats in rows:
        lines.append(
            f"| controller, {label} | {format_stats(stats['spearman'])} | {format_stats(stats['auroc'])} "
            f"| {format_stats(stats['confidence_auroc'])} | {seeds_higher_text(stats['against_confidence'])} "
            f"| {format_stats(stats['untrained_auroc'])} |"
        )
    return [*lines, ""]


def per_seed_markdown(task_result: dict[str, Any]) -> list[str]:
    metric = task_result["metric"]
    ratio = f"{task_result['paper_rejection_ratio']:.0%}"
    lines = [
        (f"| method | seed | {metric} at {ratio} (± across patients) | p | baseline predictor at {ratio} on what the "
        f"controller keeps: gain (p) | the same, its untrained controller | kappa "
        "| AUROC initial | AUROC final | mean score | env steps | wall time (s) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def gain(rejecting: dict[str, Any] | None) -> str:
        """``"+0.009 (0.153)"``: the baseline predictor's gain over no rejection at the paper's ratio, and its p."""
        if not rejecting:  # a stage evaluated before it was kept
            return "—"
        at = rejecting["at_paper_ratio"]
        return f"{format_number(at['mean_difference'], signed=True)} ({format_number(at['p'], 3)})"

    for b in task_result["baseline"]["runs"]:
        lines.append(f"| baseline | {b['seed']} | {format_stats(b['metric'])} | — | — | — | — | — | — | — "
                     f"| {b['predictor_updates']} predictor updates | — |")
    for label, entry in task_result["runs"].items():
        for r in entry["runs"]:
            kappa = (r["contingency"] or {}).get("kappa")
            lines.append(
                f"| {label} | {r['seed']} | {format_stats(r['at_paper_ratio'])} | {format_number(r['at_paper_ratio']['p'], 4)} "
                f"| {gain(r['baseline_predictor'])} | {gain(r.get('untrained_baseline_predictor'))} "
                f"| {format_number(kappa, 2)} | {format_number(r.get('initial_auroc'))} | {format_number((r['controller'] or {}).get('auroc'))} "
                f"| {format_number(r['mean_score'])} | {r.get('steps')} | {format_number(r.get('wall_time_s'), 0)} |"
            )
    return lines


def _contingency_markdown(task_result: dict[str, Any]) -> list[str]:
    lines = []
    for label, entry in task_result["runs"].items():
        s = entry["summary"]
        if not s["contingency_summed"]:
            continue
        (a, b), (c, d) = s["contingency_summed"]
        lines += [
            f"**{label}** (kappa {format_stats(s['kappa'], 2)}; counts summed over {s['kappa']['n']} seeds)",
            "",
            "| | human: not amenable | human: amenable |",
            "|---|---|---|",
            f"| controller: low | {a} | {b} |",
            f"| controller: high | {c} | {d} |",
            "",
        ]
    return lines or ["(the holdout set has no human amenability labels)", ""]


def write_report(results: dict[str, Any], out: Path) -> Path:
    """``report.md``: Table 1 as in the paper, Figure 3's tables, the figures, every seed, the settings."""
    s = results["settings"]
    lines = [
        "# Reproduction of Saeed et al., IPMI 2021 (task-amenability IQA)",
        "",
        f"Made by `{results['command']}` on {results['created']}.",
        "",
        (f"Data: {s['dataset'] or 'the built-in synthetic ultrasound set'} ({s['dataset_fingerprint']}); "
        f"seeds {s['seeds']}; algorithm {s['config']['algo']}; {s['config']['steps']} env steps per run. "
        "Every seed is reported; headline figures are means ± st.d. across seeds; "
        "the paper's column is its Table 1 on its (non-public) clinical data."),
        "",
    ]
    for task, t in results["tasks"].items():
        names = figure_names(task)
        h = t["holdout"]
        lines += [
            f"## {task.capitalize()}",
            "",
            (f"Holdout: {h['images']} images of {h['patients']} patients"
            + (f" (too few for the paired t-tests across patients to show much: under {FEW_HOLDOUT_PATIENTS})"
               if h["patients"] < FEW_HOLDOUT_PATIENTS else "")
            + f". Table 1: {t['metric']} on the holdout images "
            f"kept after rejecting the {t['paper_rejection_ratio']:.0%} lowest-scored (the baseline keeps all), "
            "mean over patients; the p-value is a paired t-test across patients against the baseline of the same seed."),
            "",
            *_table1_markdown(t),
            "",
            (f"The same seed's *baseline* predictor on the images each controller keeps at {t['paper_rejection_ratio']:.0%} "
            "rejection: what the controller's score adds on its own, whatever the co-trained predictor learnt "
            "(p: paired t-test across patients against the baseline predictor on all images). "
            "Beside them, the same predictor rejecting by the ground-truth amenability (where the data has it: "
            "what a controller that ranked the truth perfectly would give), by its own confidence, and by the "
            "controller each run started from, before any training (an untrained network's lowest scores are not "
            "random images: what a trained controller adds is its gain over that row)."),
            "",
            *_baseline_predictor_markdown(t),
            "",
            *_tie_break_markdown(t),
            ("At every rejection ratio: the gain over the baseline with no rejection (mean across seeds) and, "
            "in brackets, the seeds better with p < 0.05. \"(baseline)\": the baseline predictor on the images "
            "kept, against itself on all of them; \"(baseline, against its untrained start)\": the same, against "
            "itself on the images the controller's untrained start keeps (what the training added); "
            "\"(co-trained)\": the controller's own predictor against the "
            "baseline. Table 1 tests the paper's ratio alone; this shows from which ratio on the data show an "
            "effect (a small holdout has little power at small ratios)."),
            "",
            *_by_ratio_markdown(t),
            "",
            *_rejected_markdown(t),
            f"### Figure 3: controller against human labels at {t['paper_rejection_ratio']:.0%} rejection",
            "",
            *_contingency_markdown(t),
            f"![Figure 3]({names['figure3']})",
            "",
            "### Figure 4: holdout metric against rejection ratio",
            "",
            f"![Figure 4]({names['figure4']})",
            "",
            "### What the RL adds: AUROC against the ground-truth amenability",
            "",
            *_auroc_markdown(t),
            "",
            f"![AUROC]({names['auroc']})",
            "",
            *_with_confidence_markdown(t),
            "### Every seed",
            "",
            *per_seed_markdown(t),
            "",
        ]
    return write_markdown(out, lines, s)


def write_markdown(out: Path, lines: list[str], settings: dict[str, Any]) -> Path:
    """``out/report.md``: ``lines``, then the settings as JSON."""
    from iqa_env.files import atomic_write_text

    lines = [*lines, "## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


def write_results(results: dict[str, Any], out: Path) -> Path:
    from iqa_env.files import atomic_write_text

    return atomic_write_text(out / "results.json", json.dumps(to_json(results), indent=2, allow_nan=False))


# --------------------------------------------------------------------- main
def check_tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    from iqa_env.tasks import TASK_NAMES

    if isinstance(tasks, str):
        tasks = TASK_NAMES if tasks == "both" else (tasks,)
    tasks = tuple(dict.fromkeys(tasks))
    for task in tasks:
        if task not in TASK_NAMES:
            raise ValueError(f"task must be one of {TASK_NAMES} or 'both', got {task!r}")
    if not tasks:
        raise ValueError("give at least one task")
    return tasks


def check_rewards(rewards: str | Sequence[str] | None) -> tuple[str, ...]:
    """The rewards to train, in Table 1's order (None: all of :data:`REWARDS`)."""
    if rewards is None:
        return REWARDS
    if isinstance(rewards, str):
        rewards = (rewards,)
    unknown = [r for r in rewards if r not in REWARDS]
    if unknown:
        raise ValueError(f"rewards must be among {REWARDS}, got {unknown[0]!r}")
    if not rewards:
        raise ValueError(f"give at least one reward of {REWARDS}")
    return tuple(r for r in REWARDS if r in rewards)


def check_seeds(seeds: int) -> list[int]:
    if not is_count(seeds):
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    return list(range(int(seeds)))


def check_before_any_stage(base: TrainConfig, tasks: Sequence[str], runs: Sequence[dict[str, str]]) -> int:
    """Fail before any training when the data lack what a task or reward needs (masks, human labels), or
    when the env or the algorithm refuses a trained run's settings (each kind of run built once, unused).

    Returns the number of images in the validation split.
    """
    from experiments.training import check_agent_builds, load_splits

    rewards = sorted({run.get("reward", base.reward) for run in runs})

    if base.dataset is not None and not Path(base.dataset).is_file():
        raise FileNotFoundError(f"dataset file {base.dataset} does not exist")
    full, (train, validation, holdout) = load_splits(base.dataset, base.split_seed)
    patients = int(np.unique(holdout.groups).size)
    if patients < FEW_HOLDOUT_PATIENTS:
        logger.warning(
            "the holdout has %d patient(s): the paired t-tests across patients need at least 2 and say little "
            "below about %d; p-values will be n/a or weak (a dataset with more patients gives a holdout that can "
            "show an effect)", patients, FEW_HOLDOUT_PATIENTS,
        )
    for task in tasks:
        if task == "segmentation":
            full.require_masks("the segmentation task")
        if "fixed" in rewards:
            full.require_human_amenability(task, "the fixed reward")
    for task in tasks:
        for run in runs:
            fields = {k: v for k, v in run.items() if k != "label"}
            check_agent_builds(dataclasses.replace(base, task=task, **fields), train, validation)
    return len(validation)


def prepare(
    out: str | os.PathLike[str],
    kind: str,
    base: TrainConfig,
    drop: Sequence[str],
    tasks: Sequence[str],
    runs: Sequence[dict[str, str]],
) -> tuple[Path, str, int]:
    """Check the data, the runs' settings and the output folder; returns the folder, the data's fingerprint
    and the size of its validation split."""
    validation_images = check_before_any_stage(base, tasks, runs)
    fingerprint = dataset_fingerprint(base.dataset)
    from iqa_env.files import blocking_file

    folder = Path(out)
    in_the_way = blocking_file(folder)
    if in_the_way is not None:
        raise ValueError(f"--out {folder}: {in_the_way} is a file, not a folder; give a folder")
    check_settings(folder, {"kind": kind, "dataset": fingerprint, "config": _identity(base, drop)})
    return folder, fingerprint, validation_images


def reproduce(
    out: str | os.PathLike[str],
    dataset: str | os.PathLike[str] | None = None,
    tasks: str | Sequence[str] = ("classification",),
    quick: bool = False,
    seeds: int | None = None,
    algo: str | None = None,
    steps: int | None = None,
    workers: int = 1,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
    random_draws: int = RANDOM_DRAWS,
    env_kwargs: dict[str, Any] | None = None,
    agent_kwargs: dict[str, Any] | None = None,
    rewards: str | Sequence[str] | None = None,
    mirror_average: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the paper's experiment into ``out``; returns what it writes to ``out/results.json``.

    :param out: output folder; a folder holding a run with the same settings is resumed
    :param dataset: HDF5 dataset (None: the built-in synthetic ultrasound set)
    :param tasks: ``"classification"``, ``"segmentation"``, ``"both"`` or a sequence of task names
    :param quick: the ``QUICK`` budget instead of ``FULL``
    :param seeds: seeds ``0 .. seeds-1`` (default: the budget's)
    :param algo: RL algorithm (default: TrainConfig's)
    :param steps: env steps per run (default: the budget's)
    :param workers: stages run in this many processes at once (each on one torch thread, whatever this is)
    :param device: ``auto``, ``cpu`` or ``cuda[:N]``
    :param overrides: further TrainConfig fields (or ``seeds``) over the budget (tests use it for tiny runs)
    :param random_draws: random rejections per ratio behind the random band
    :param env_kwargs: ``TaskAmenabilityEnv`` arguments over the recommended ones, for every run
    :param agent_kwargs: arguments of the algorithm over its defaults, for every trained run
    :param rewards: the rewards to train (default: all of ``REWARDS``, Table 1's rows); the stages of a
        reward are the same whichever others run, so a folder made with some rewards resumes with more
    :param mirror_average: the controllers score each image with its mirror image
        (``TrainConfig.mirror_average``); False for images whose mirror is another kind of image
    """
    task_names = check_tasks(tasks)
    reward_names = check_rewards(rewards)
    fields = with_kwargs(overrides, env_kwargs, agent_kwargs, mirror_average)
    base, default_seeds = budget_config(quick, dataset, algo, steps, device, fields)
    seed_list = check_seeds(default_seeds if seeds is None else seeds)
    options = {
        "dataset": dataset,
        "task": "both" if len(task_names) == 2 else task_names[0],
        "rewards": None if reward_names == REWARDS else list(reward_names),
        "quick": quick,
        "seeds": seeds,
        "algo": algo,
        "steps": steps,
        "env_kwargs": env_kwargs or None,
        "agent_kwargs": agent_kwargs or None,
        "mirror_average": mirror_average,
    }
    runs = [{"label": r, "reward": r} for r in reward_names]
    folder, results = run_experiment(
        "reproduce", out, base, task_names, seed_list, runs, ("task", "reward", "seed"), options, overrides,
        workers, random_draws, quick=quick,
    )
    for task, task_result in results["tasks"].items():
        task_result["table1"] = table1(task_result, task)
    write_figures(results, folder)
    write_report(results, folder)
    write_results(results, folder)
    logger.info("wrote %s, %s and the figures", folder / "results.json", folder / "report.md")
    return results


def with_kwargs(
    overrides: dict[str, Any] | None,
    env_kwargs: dict[str, Any] | None,
    agent_kwargs: dict[str, Any] | None,
    mirror_average: bool = True,
) -> dict[str, Any]:
    """``overrides`` (TrainConfig fields) with ``env_kwargs`` and ``agent_kwargs`` over their own of those fields,
    and ``mirror_average`` where it is off."""
    fields = dict(overrides or {})
    if not mirror_average:
        fields["mirror_average"] = False
    for name, extra in (("env_kwargs", env_kwargs), ("agent_kwargs", agent_kwargs)):
        if extra:
            fields[name] = {**fields.get(name, {}), **extra}
    return fields


def run_experiment(
    kind: str,
    out: str | os.PathLike[str],
    base: TrainConfig,
    tasks: Sequence[str],
    seeds: Sequence[int],
    runs: Sequence[dict[str, str]],
    drop: Sequence[str],
    options: dict[str, Any],
    overrides: dict[str, Any] | None,
    workers: int,
    random_draws: int,
    **settings: Any,
) -> tuple[Path, dict[str, Any]]:
    """What ``iqa reproduce`` and ``iqa benchmark-algorithms`` share: check the data and ``out``, run or
    resume every stage, and collect every figure.

    ``runs`` are the trained runs' TrainConfig overrides with their labels
    (see :func:`plan_stages`); ``drop`` the fields that vary between stages;
    ``options`` the command-line options that made the call (for the
    ``command`` recorded in the results).
    """
    check_workers(workers)
    started = time.perf_counter()
    folder, fingerprint, validation_images = prepare(out, kind, base, drop, tasks, runs)
    command = command_line(kind, {**options, "workers": workers if workers != 1 else None, "out": out})
    if overrides:
        command += f"  # with overrides {json.dumps(overrides, sort_keys=True)} (Python API)"
    # Stages whose predictor warm-up would be the same (one seed's baseline and rewards) compute it once.
    base = dataclasses.replace(base, warmup_cache=str(folder / WARMUP_FOLDER))
    stages = plan_stages(folder, base, tasks, seeds, runs, validation_images)
    logger.info("%s: %d stages into %s", kind, len(stages), folder)
    earlier = earlier_invocations(folder / "results.json")
    ran = run_stages(stages, workers)
    labels = [run["label"] for run in runs]
    results = collect(folder, kind, command, base, fingerprint, tasks, seeds, stages, labels, drop, random_draws, **settings)
    # Wall time of this invocation (a resumed run counts only the stages it ran) and of every invocation into
    # this folder, so that a rerun that only rewrites the figures does not hide what the stages cost.
    results["wall_s"] = time.perf_counter() - started
    results["workers"] = workers
    results["invocations"] = [
        *earlier,
        {"wall_s": results["wall_s"], "stages_run": ran, "stages": len(stages), "workers": workers},
    ]
    results["wall_s_total"] = sum(i["wall_s"] for i in results["invocations"])
    return folder, results


def earlier_invocations(path: Path) -> list[dict[str, Any]]:
    """The ``invocations`` recorded in a previous ``results.json`` at ``path`` (none if there is no such file).

    A file written before the field existed gives its one ``wall_s`` (with
    ``stages_run`` unknown); an unreadable one gives none, with a warning
    (the file itself is replaced only when the new results are written).
    """
    if not path.is_file():
        return []
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("%s is not readable (%s): the wall times of earlier invocations are not carried over", path, e)
        return []
    if not isinstance(previous, dict):
        return []

    recorded = previous.get("invocations")
    if isinstance(recorded, list) and all(isinstance(i, dict) and is_non_negative_number(i.get("wall_s")) for i in recorded):
        return recorded
    if is_non_negative_number(previous.get("wall_s")):
        return [{"wall_s": previous["wall_s"], "stages_run": None, "stages": None, "workers": previous.get("workers")}]
    return []


def check_workers(workers: int) -> int:
    if not is_count(workers):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return int(workers)


def collect(
    folder: Path,
    kind: str,
    command: str,
    base: TrainConfig,
    fingerprint: str,
    tasks: Sequence[str],
    seeds: Sequence[int],
    stages: Sequence[Stage],
    labels: Sequence[str],
    drop: Sequence[str],
    random_draws: int = RANDOM_DRAWS,
    **settings: Any,
) -> dict[str, Any]:
    """Every figure of the finished stages, with the settings (JSON-ready; ``results.json``'s content)."""
    from experiments.training import load_splits

    _, (_, _, holdout) = load_splits(base.dataset, base.split_seed)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": kind,
        "command": command,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": {
            "dataset": base.dataset,
            "dataset_fingerprint": fingerprint,
            "tasks": list(tasks),
            "seeds": list(seeds),
            "config": {**_identity(base, drop), "device": base.device},
            "rejection_ratios": list(REJECTION_RATIOS),
            "paper_rejection_ratio": {t: PAPER_REJECTION_RATIO[t] for t in tasks},
            "random_draws": random_draws,
            "random_band_quantiles": list(RANDOM_BAND_QUANTILES),
            "versions": versions(),
            **settings,
        },
        "tasks": {},
    }
    for task in tasks:
        task_result = collect_task(task, holdout, stages, labels, random_draws)
        task_result["figures"] = figure_names(task)
        results["tasks"][task] = task_result
    return to_json(results)
