"""How much does the validation loss tell?  ``python -m experiments.reward_ceiling``.

The controller learns from two channels of the reward.  Its scores of
*validation* images (the weighted and selective rewards) are rewarded by those
images' per-sample losses under the current task predictor; its selections of
*training* images are rewarded by how much they improve that predictor.  This
script measures the first channel on a dataset whose ground-truth amenability
is known, before any RL is run: how well the predictor's own per-sample loss
ranks images by amenability.  (The second channel is not measured here; on
corrupted Fashion-MNIST it carries more than the first, see
``docs/learning-status.md`` section 5.)  It trains the task predictor *inside*
``TaskAmenabilityEnv`` (same network, optimiser and loss as in training)
under two fixed controllers,

- ``all``: every image selected (the non-selective predictor, i.e. the
  predictor a controller starts from, and the one it keeps while its ranking
  is poor);
- ``oracle``: exactly the ground-truth amenable images selected (the predictor
  that a perfect controller would train),

and prints, every ``--eval-every`` predictor updates, the holdout AUROC of the
predictor's ``-loss`` (low loss = amenable) and of its confidence against the
ground-truth amenable label, and its holdout metric.  A learnt controller's
predictor lies between the two rows: its training set is enriched in amenable
images only as far as its ranking is already good.

With ``--fit-controller`` it also fits the controller network by supervised
ranking to the ``all`` predictor's final validation losses (a pairwise logistic
loss, ``--fit-steps`` Adam steps) and reports that controller's holdout AUROC:
what a controller could reach from the validation channel alone if it learnt
the loss ranking *perfectly* from a non-selective predictor; then to the
same losses compared within each class (``class_log_losses``, the rewards'
``reward_normalisation="class_log"``).  For scale it fits the same network, the same way,
to the validation images' ground-truth labels: whether the controller network
can represent the ranking at all.  ``docs/learning-status.md`` (section 5) has the
figures for the built-in set; ``--plot PNG`` draws the curves.

``--selection-signal`` measures the second channel instead, for the fixed
reward, which has no other: random selections (probability ``--rate`` for
every image) train the predictor for ``--steps`` training steps, and at each
reward the script pairs it with how much more amenable (ground truth) the
selected images were than the rest of their batches, over the training steps
that reward covers (the episode's, in the paper's moving-average form; the
step's own, with ``reward_baseline="paired"``).  It prints the correlation of
the two for each of ``--forms``: what a controller can learn from one
reward (``docs/learning-status.md``, section 11); and, by least squares,
what the reward gives per unit of contrast between the selected images and
the rest for the amenable images of each class and for each class as a
whole: a reward that prefers one class of images whatever their quality
shows in the class terms (section 31).  ``--forms weighted``
measures the first channel the same way, for scale: the weighted reward's
validation steps, each paired with its own selection of validation images.
``--forms draws`` measures the fixed reward as REINFORCE trains on it by
default (several draws of each batch's selection, each probed from the same
weights): each draw's reward less the mean of its step's other draws, paired
with that draw's selection, what the agent's gradient is made of (section 55).

``--fixed-objective`` asks whether the fixed reward's own quantity prefers the
truth's selections over a whole run, not one step: it trains the predictor of
the fixed reward's env under fixed selection rules (``oracle``: the amenable
images of each batch; ``random``: as many images of the batch, at random;
``inverse``: as many, the least amenable first; ``all``) and prints, every
``--eval-every`` predictor updates, the mean loss over the env's clean
validation images (minus the fixed reward), beside the predictor's holdout
metric on the clean and on all images.  If ``oracle`` is not below
``random``, no controller can learn the truth from the fixed reward on that
dataset; if it is, what the fixed reward lacks is per-step credit
(``docs/learning-status.md``, section 30).

``--class-ceiling`` trains nothing: it asks what overall holdout AUROC a
controller can reach if it ranks one class's images and not the others'
(a reward that carries the quality of one class only, as the fixed reward
does on the built-in set, section 31).  For each class in turn it scores
that class's holdout images by the ground truth plus Gaussian noise of
st.d. ``sigma`` (0: a perfect ranking), the other classes' images at
random, and prints the ranked class's AUROC and the overall AUROC, without
and with the best shift of the ranked class's scores against the rest
(mean over ``--reps`` draws; section 35).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from experiments.commands import json_object, positive_int
from iqa_env.checks import is_count, is_open_probability
from iqa_env.metrics import auroc_or_none
from iqa_env.rewards import class_log_losses

CONTROLLERS: tuple[str, ...] = ("all", "oracle")


def _check_steps(steps: int, eval_every: int) -> None:
    for name, value in (("steps", steps), ("eval_every", eval_every)):
        if not is_count(value):
            raise ValueError(f"{name} must be a positive integer (predictor updates), got {value!r}")


def _splits_with_truth(dataset: Any, task: str, split_seed: int, purpose: str) -> tuple[Any, Any, Any]:
    """The patient-level train / validation / holdout parts of a dataset whose amenability is known."""
    from iqa_env.data import split_by_group
    from iqa_env.env import as_dataset

    dataset = as_dataset(dataset)
    if task not in dataset.amenability:
        raise ValueError(
            f"{purpose} needs the ground-truth amenability for task {task!r}, but the dataset "
            f"has it for {sorted(dataset.amenability) or 'no task'}; it is known for synthetic data "
            "(iqa data synth) and for data made with a known degradation"
        )
    return split_by_group(dataset, seed=split_seed)


def _updates_under(
    env: Any, select: Callable[[np.ndarray], np.ndarray], steps: int, eval_every: int, seed: int
) -> Iterator[int]:
    """Step ``env`` under a fixed selection rule; yield the predictor's update count at each evaluation.

    ``select(batch_indices)`` is the action of a training step (validation
    steps select every image); a step that selects nothing updates nothing.
    Evaluations fall every ``eval_every`` updates and at the last of ``steps``.
    """
    batch_size = int(env.action_space.shape[0])
    _, info = env.reset(seed=seed)
    updates = 0
    while updates < steps:
        training = info["phase"] == "train"
        action = select(info["batch_indices"]) if training else np.ones(batch_size)
        _, _, terminated, _, info = env.step(action)
        if terminated:
            _, info = env.reset()
        if not (training and action.any()):
            continue  # no predictor update this step
        updates += 1
        if updates % eval_every == 0 or updates >= steps:
            yield updates


def predictor_ceiling(
    dataset: Any = None,
    task: str = "classification",
    controller: str = "all",
    steps: int = 1600,
    eval_every: int = 200,
    seed: int = 0,
    split_seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    env_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one predictor under a fixed controller and return its holdout ranking curve.

    ``dataset``: an ``ImageDataset``, an HDF5 path or ``None`` (the built-in set).
    Returns ``{"controller", "seed", "curve": [{"updates", "auroc_neg_loss",
    "auroc_confidence", "metric"}], "env", "holdout"}`` (the env and the
    holdout part, for :func:`fit_controller`).
    """
    from iqa_env.env import TaskAmenabilityEnv

    if controller not in CONTROLLERS:
        raise ValueError(f"controller must be one of {CONTROLLERS}, got {controller!r}")
    _check_steps(steps, eval_every)
    train_set, validation_set, holdout = _splits_with_truth(dataset, task, split_seed, "the reward ceiling")
    # The weighted reward needs no human labels; its validation steps only cost a forward pass.
    settings = {"reward_metric": "loss", "predictor_warmup_steps": 0, "validation_size": batch_size}
    settings.update(env_kwargs or {})
    env = TaskAmenabilityEnv(
        train_set,
        task=task,
        reward="weighted",
        validation_dataset=validation_set,
        batch_size=batch_size,
        device=device,
        **settings,
    )
    train_amenable = train_set.amenable(task)
    holdout_amenable = holdout.amenable(task)
    if controller == "oracle" and not train_amenable.any():
        raise ValueError(
            f"the oracle controller selects the amenable training images, but none of the "
            f"{len(train_set)} training images is amenable for task {task!r} (amenability >= 0.5)"
        )

    def select(indices: np.ndarray) -> np.ndarray:
        return np.ones(batch_size) if controller == "all" else train_amenable[indices].astype(np.float64)

    curve: list[dict[str, Any]] = []
    for updates in _updates_under(env, select, steps, eval_every, seed):
        out = env.evaluate(holdout)
        curve.append(
            {
                "updates": updates,
                "auroc_neg_loss": auroc_or_none(-out["loss"], holdout_amenable),
                "auroc_class_log": auroc_or_none(-class_log_losses(out["loss"], holdout.labels), holdout_amenable),
                "auroc_confidence": auroc_or_none(out["confidence"], holdout_amenable),
                "metric": float(np.mean(out["metric"])),
            }
        )
    return {"controller": controller, "seed": seed, "curve": curve, "env": env, "holdout": holdout}


#: What ``--selection-signal`` measures: the fixed reward in the paper's form (``moving_average``) and with
#: ``reward_baseline="paired"``, for scale the weighted reward's validation steps (``weighted``), and the
#: fixed reward as REINFORCE trains on it by default, each draw credited against its step's others (``draws``).
SIGNAL_FORMS: tuple[str, ...] = ("moving_average", "paired", "weighted", "draws")


def selection_signal(
    dataset: Any = None,
    task: str = "classification",
    form: str = "paired",
    steps: int = 600,
    rate: float = 0.5,
    seed: int = 0,
    split_seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    env_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """How well a reward tells a more amenable selection from a less amenable one.

    ``form`` ``"moving_average"`` or ``"paired"``: the fixed reward with that
    ``reward_baseline``, in the env that ``iqa train --algo reinforce
    --reward fixed`` trains in (:func:`experiments.training.make_env`) with
    the paper's form's settings (``agents.factory.PAPER_FIXED_ENV_KWARGS``:
    256 validation images, one draw, no class correction); each
    reward is paired with the training selections it covers (an episode's,
    or the step's own).  ``"weighted"``: the env of ``--reward weighted``;
    each validation step's reward is paired with that step's selection of
    validation images.  ``"draws"``: the fixed reward as REINFORCE trains on
    it by default (:func:`agents.recommended_env_kwargs`: ``paired_draws``
    selections of each batch, each probed from the same weights); each
    draw's reward less the mean of the step's other draws (REINFORCE's
    credit) is paired with that draw's own selection, so the correlation is
    taken within steps, as the agent learns from it.  ``env_kwargs`` go on
    top.  Every image is selected with probability ``rate`` for ``steps``
    env steps.  Returns ``{"form",
    "seed", "rate", "steps", "rewards", "correlation", "decomposition"}``:
    the number of rewards and the correlation of each reward (as the agent
    gets it, after the baseline) with the selected images' amenable fraction
    minus the rest's, averaged over the steps it covers (None when
    undefined); and :func:`_decomposition` of the rewards into what the
    amenable images of each class and the classes themselves are worth (a
    reward can prefer a class whatever the images' quality:
    ``docs/learning-status.md``, section 31).
    """
    from agents.factory import PAPER_FIXED_ENV_KWARGS
    from agents.reinforce import leave_one_out_credit
    from experiments.training import TrainConfig, make_env
    from iqa_env.env import extra_draws
    from iqa_env.rewards import class_mix_contrast

    if form not in SIGNAL_FORMS:
        raise ValueError(f"form must be one of {SIGNAL_FORMS}, got {form!r}")
    _check_steps(steps, 1)
    if not is_open_probability(rate):
        raise ValueError(f"rate must be a selection probability in (0, 1), got {rate!r}")
    train_set, validation_set, _ = _splits_with_truth(dataset, task, split_seed, "the selection signal")
    extra = dict(env_kwargs or {})
    if form in ("moving_average", "paired"):
        # The paper's form with this baseline: the signal measured before the paired set-up became the default.
        extra = {**PAPER_FIXED_ENV_KWARGS, **extra, "reward_baseline": form}
    config = TrainConfig(
        algo="reinforce", task=task, reward="weighted" if form == "weighted" else "fixed", seed=seed,
        batch_size=batch_size, device=device, env_kwargs=extra,
    )
    env = make_env(config, train_set, validation_set)
    if form == "draws" and env.paired_draws < 2:
        raise ValueError(
            f"form 'draws' credits each draw against the step's others, so it needs paired_draws >= 2, got "
            f"{env.paired_draws} (env_kwargs {extra})"
        )
    truth = {
        "train": env.train_set.amenable(task).astype(np.float64),
        "validation": env.validation_set.amenable(task).astype(np.float64),
    }
    names = list(env.train_set.class_names)  # one per class, labels in [0, len(names))
    num_classes = len(names)
    _, info = env.reset(seed=seed)
    pending: list[np.ndarray] = []
    pairs: list[tuple[np.ndarray, float]] = []
    for _ in range(steps):
        indices = info["batch_indices"]
        _, reward, terminated, _, info = env.step(np.full(batch_size, rate, dtype=np.float32))
        amenable = truth[info["action_phase"]][indices]
        classes = np.asarray(info["classes"], dtype=np.int64)
        valid = np.asarray(info["valid"], dtype=bool)
        amenable_by_class = amenable[:, None] * np.eye(num_classes)[classes]  # the step's, shared by its draws

        def contrast_of(mask: np.ndarray) -> np.ndarray | None:
            chosen, rest = mask & valid, ~mask & valid
            # The class terms are the ones the env's paired_class_correction removes.
            class_terms = class_mix_contrast(mask[valid], classes[valid], num_classes)
            if class_terms is None:
                return None
            return np.concatenate([amenable_by_class[chosen].mean(0) - amenable_by_class[rest].mean(0), class_terms])

        selection = np.asarray(info["selection"], dtype=bool)
        if form == "draws":
            if info["reward_ready"]:
                extra_selections, extra_rewards = extra_draws(info)
                rewards = np.concatenate([[float(reward)], extra_rewards])
                credit = leave_one_out_credit(rewards[None])[0]
                for drawn, c in zip([selection, *extra_selections], credit):
                    draw_contrast = contrast_of(drawn)
                    if draw_contrast is not None:
                        pairs.append((draw_contrast, float(c)))
        elif info["reward_scope"] == "step":  # the reward measures this step's selection alone
            contrast = contrast_of(selection)
            if info["reward_ready"] and contrast is not None:
                pairs.append((contrast, float(reward)))
        else:
            contrast = contrast_of(selection)
            if contrast is not None:
                pending.append(contrast)
            if info["reward_ready"]:
                if pending:
                    pairs.append((np.mean(pending, axis=0), float(reward)))
                pending = []
        if terminated:
            pending = []
            _, info = env.reset()
    correlation = None
    if len(pairs) >= 3:
        x = np.array([c[:num_classes].sum() for c, _ in pairs])  # the selection's amenability advantage
        r = np.array([reward for _, reward in pairs])
        if x.std() > 0 and r.std() > 0:
            correlation = float(np.corrcoef(x, r)[0, 1])
    terms = [f"amenable, {name}" for name in names] + [f"class {name}" for name in names[1:]]
    return {
        "form": form, "seed": seed, "rate": rate, "steps": steps,
        "rewards": len(pairs), "correlation": correlation,
        "decomposition": _decomposition(pairs, terms),
    }


def _decomposition(pairs: list[tuple[np.ndarray, float]], terms: list[str]) -> dict[str, Any] | None:
    """Least squares of the rewards on the selection's contrasts (selected minus the rest's means).

    The terms are each class's amenable images and, against the first class, each other class's
    images: the coefficient of ``amenable, c`` is what selecting the amenable rather than the other
    images of class ``c`` is worth to the reward (per unit of contrast), that of ``class c`` what
    selecting class ``c``'s non-amenable images rather than the first class's is.  Returns
    ``{"terms": {name: {"coefficient", "standard_error"}}, "explained_variance"}``, or None with too
    few rewards or terms that do not vary (one class only in every step, say).
    """
    if len(pairs) < len(terms) + 3:
        return None
    x = np.array([c for c, _ in pairs], dtype=np.float64)
    r = np.array([reward for _, reward in pairs], dtype=np.float64)
    design = np.column_stack([np.ones(len(r)), x])
    if np.linalg.matrix_rank(design) < design.shape[1] or r.std() == 0:
        return None
    coefficients, *_ = np.linalg.lstsq(design, r, rcond=None)
    residual = r - design @ coefficients
    dof = len(r) - design.shape[1]
    errors = np.sqrt(np.diag(np.linalg.inv(design.T @ design)) * (residual @ residual) / dof)
    return {
        "terms": {t: {"coefficient": float(c), "standard_error": float(e)}
                  for t, c, e in zip(terms, coefficients[1:], errors[1:])},
        "explained_variance": float(1.0 - residual.var() / r.var()),
    }


#: The selection rules of :func:`fixed_objective` (``--fixed-objective``).
SELECTION_RULES: tuple[str, ...] = ("oracle", "random", "inverse", "all")


def fixed_objective(
    dataset: Any = None,
    task: str = "classification",
    rule: str = "oracle",
    steps: int = 1200,
    eval_every: int = 200,
    seed: int = 0,
    split_seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    env_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The fixed reward's quantity along a run of its predictor trained under one selection rule.

    The env is the one ``iqa train --algo reinforce --reward fixed`` trains in
    (:func:`experiments.training.make_env`) in the paper's form
    (``agents.factory.PAPER_FIXED_ENV_KWARGS``; ``env_kwargs`` on top), its
    predictor trained for ``steps`` updates on the images ``rule`` selects
    from each training batch: ``"oracle"`` the ground-truth amenable ones,
    ``"random"`` as many at random, ``"inverse"`` as many, the least amenable
    first (ties in random order), ``"all"`` every image.  The rules but
    ``"all"`` train on the same number of images per step, so they differ only
    in which.  Every ``eval_every`` updates the curve gets ``clean_loss`` (the
    mean loss over the env's validation images, those rated amenable: minus
    the fixed reward), and on the holdout ``holdout_clean_loss``,
    ``holdout_clean_metric`` (over its images rated amenable) and
    ``holdout_metric`` (over all).  Returns ``{"rule", "seed", "curve"}``.
    """
    from agents.factory import PAPER_FIXED_ENV_KWARGS
    from experiments.training import TrainConfig, make_env

    if rule not in SELECTION_RULES:
        raise ValueError(f"rule must be one of {SELECTION_RULES}, got {rule!r}")
    _check_steps(steps, eval_every)
    train_set, validation_set, holdout = _splits_with_truth(dataset, task, split_seed, "the fixed objective")
    rated = holdout.require_human_amenability(task, "the fixed objective") == 1
    if not rated.any():
        raise ValueError(
            f"the fixed objective reports the holdout images rated amenable, but none of the {len(holdout)} "
            f"holdout images is (human_amenability/{task} == 1)"
        )
    config = TrainConfig(
        algo="reinforce", task=task, reward="fixed", seed=seed, batch_size=batch_size, device=device,
        env_kwargs={**PAPER_FIXED_ENV_KWARGS, **(env_kwargs or {})},
    )
    env = make_env(config, train_set, validation_set)
    amenability = np.asarray(env.train_set.amenability[task], dtype=np.float64)
    amenable = env.train_set.amenable(task)
    rng = np.random.default_rng(seed)

    def select(indices: np.ndarray) -> np.ndarray:
        count = int(amenable[indices].sum())
        action = np.zeros(batch_size)
        if rule == "all":
            action[:] = 1.0
        elif rule == "oracle":
            action[amenable[indices]] = 1.0
        elif rule == "random":
            action[rng.choice(batch_size, count, replace=False)] = 1.0
        else:  # inverse: the least amenable first, ties in random order
            action[np.lexsort((rng.random(batch_size), amenability[indices]))[:count]] = 1.0
        return action

    curve: list[dict[str, Any]] = []
    for updates in _updates_under(env, select, steps, eval_every, seed):
        clean = env.evaluate(env.validation_set)
        out = env.evaluate(holdout)
        curve.append(
            {
                "updates": updates,
                "clean_loss": float(np.mean(clean["loss"])),
                "holdout_clean_loss": float(np.mean(out["loss"][rated])),
                "holdout_clean_metric": float(np.mean(out["metric"][rated])),
                "holdout_metric": float(np.mean(out["metric"])),
            }
        )
    return {"rule": rule, "seed": seed, "curve": curve}


FIT_TARGETS: tuple[str, ...] = ("loss", "class_log_loss", "ground_truth")


def fit_controller(
    env: Any, holdout: Any, task: str, steps: int = 700, seed: int = 0, target: str = "loss"
) -> float | None:
    """Holdout AUROC of a controller fitted (supervised) to rank ``env``'s validation images.

    ``target="loss"``: by the predictor's ``-loss`` (the most a controller can
    learn from that predictor's validation losses); ``"class_log_loss"``: by
    the same losses compared within each class
    (:func:`iqa_env.rewards.class_log_losses`, what the rewards use with
    ``reward_normalisation="class_log"``); ``"ground_truth"``: by the
    ground-truth amenable label (whether the controller network can represent
    the ranking at all, from as many images).
    """
    from iqa_env.networks import ControllerBackbone

    if target not in FIT_TARGETS:
        raise ValueError(f"target must be one of {FIT_TARGETS}, got {target!r}")
    if target == "loss":
        ranking = -env.evaluate(env.validation_set)["loss"]
    elif target == "class_log_loss":
        ranking = -class_log_losses(env.evaluate(env.validation_set)["loss"], env.validation_set.labels)
    else:
        ranking = env.validation_set.amenable(task).astype(np.float64)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ControllerBackbone(env.validation_set.image_shape)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    images = torch.as_tensor(env.validation_set.images)
    wanted = torch.as_tensor(ranking, dtype=torch.float32)
    n = len(images)
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[: min(32, n)]
        out = net(images[idx])
        wins = (wanted[idx][:, None] > wanted[idx][None, :]).float()
        loss = F.binary_cross_entropy_with_logits(out[:, None] - out[None, :], wins)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = net(torch.as_tensor(holdout.images)).numpy()
    return auroc_or_none(scores, holdout.amenable(task))


def plot_ceiling(runs: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Holdout AUROC of ``-loss`` against predictor updates, one line per controller and seed, to ``path`` (PNG)."""
    from experiments.reproduce import new_figure, save_figure

    colours = {"all": "tab:blue", "oracle": "tab:green"}
    labels = {"all": "all images selected", "oracle": "amenable images only (oracle)"}
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    seen: set[str] = set()
    for run in runs:
        points = [(c["updates"], c["auroc_neg_loss"]) for c in run["curve"] if c["auroc_neg_loss"] is not None]
        if not points:
            continue
        x, y = zip(*points)
        name = run["controller"]
        ax.plot(x, y, marker="o", ms=3, color=colours.get(name), label=None if name in seen else labels.get(name, name))
        seen.add(name)
        fitted = run.get("fitted_controller_auroc")
        if fitted is not None:
            ax.axhline(fitted, color=colours.get(name), ls=":", lw=1,
                       label=None if "fit" in seen else "controller fitted to the final losses")
            seen.add("fit")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel("predictor updates")
    ax.set_ylabel("holdout AUROC of -loss vs ground truth")
    ax.set_ylim(0.4, 1.0)
    ax.set_title(title or "What the validation loss can tell: the predictor's loss as a ranking")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, Path(path))


CEILING_NOISE: tuple[float, ...] = (0.0, 0.3, 0.45, 0.6, 1.0)


def class_ceiling(
    truth: np.ndarray, labels: np.ndarray, ranked_class: int, noise: float, reps: int = 50, seed: int = 0
) -> dict[str, Any]:
    """Overall AUROC of scores that rank one class by the truth and the other classes at random.

    The images of ``ranked_class`` score ``truth + noise * N(0, 1)`` (``truth`` 0/1), the others
    ``N(0, 1)``.  Returns the means over ``reps`` draws of the ranked class's own AUROC
    (``within``), of the overall AUROC (``overall``), and of the overall AUROC at the best shift of
    the ranked class's scores against the rest, over a grid of shifts from -4 to 4 (``best_shift``).
    """
    truth = np.asarray(truth, dtype=np.float64)
    labels = np.asarray(labels)
    if truth.shape != labels.shape or truth.ndim != 1:
        raise ValueError(f"truth and labels must be 1-D and alike, got shapes {truth.shape} and {labels.shape}")
    if not np.isin(truth, (0.0, 1.0)).all():
        raise ValueError("truth must be 0/1 (not amenable / amenable)")
    ranked = labels == ranked_class
    if not ranked.any() or ranked.all():
        raise ValueError(f"class {ranked_class} must hold some of the images and not all, got {int(ranked.sum())} of {len(labels)}")
    if not noise >= 0 or reps < 1:
        raise ValueError(f"noise must be >= 0 and reps >= 1, got noise {noise!r}, reps {reps!r}")
    rng = np.random.default_rng(seed)
    shifts = np.linspace(-4.0, 4.0, 81)
    within, overall, best = [], [], []
    for _ in range(reps):
        scores = rng.normal(size=len(truth))
        scores[ranked] = truth[ranked] + noise * scores[ranked]
        within.append(auroc_or_none(scores[ranked], truth[ranked]))
        overall.append(auroc_or_none(scores, truth))
        best.append(max(auroc_or_none(scores + shift * ranked, truth) for shift in shifts))

    def mean(values: list[float | None]) -> float | None:  # None where a class has one truth value only
        return None if None in values else float(np.mean(values))

    return {"ranked_class": int(ranked_class), "noise": float(noise), "within": mean(within),
            "overall": mean(overall), "best_shift": mean(best)}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help="HDF5 dataset (default: the built-in synthetic set)")
    p.add_argument("--task", default="classification")
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds 0 .. N-1")
    p.add_argument("--steps", type=positive_int, default=1600, help="predictor updates (default: 1600)")
    p.add_argument("--eval-every", type=positive_int, default=200, help="updates between evaluations (default: 200)")
    p.add_argument("--fit-controller", action="store_true", help="also fit a controller to the losses")
    p.add_argument("--fit-steps", type=positive_int, default=700,
                   help="with --fit-controller: Adam steps of each fit (default: 700)")
    p.add_argument("--controllers", nargs="+", default=list(CONTROLLERS), choices=CONTROLLERS,
                   help="the fixed controllers to train under (default: all oracle)")
    p.add_argument("--env-kwargs", type=json_object, default={},
                   help='JSON object of extra TaskAmenabilityEnv arguments, e.g. \'{"predictor_augment": true}\'')
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--plot", default=None, help="also draw the curves to this PNG file")
    p.add_argument("--selection-signal", action="store_true",
                   help="measure how well each reward follows the amenability of a random selection instead "
                        "(--steps env steps; see --forms)")
    p.add_argument("--forms", nargs="+", default=["moving_average", "paired"], choices=SIGNAL_FORMS,
                   help="with --selection-signal: the fixed reward's forms moving_average and paired (the default), "
                        "weighted (the weighted reward's validation steps, for scale), and draws (the fixed reward as "
                        "REINFORCE trains on it by default, each draw credited against the step's others)")
    p.add_argument("--fixed-objective", action="store_true",
                   help="measure whether the fixed reward's quantity prefers the truth's selections over a run "
                        "instead (--steps predictor updates; see --rules)")
    p.add_argument("--rules", nargs="+", default=list(SELECTION_RULES), choices=SELECTION_RULES,
                   help="with --fixed-objective: the selection rules (default: oracle random inverse all)")
    p.add_argument("--rate", type=float, default=0.5, help="with --selection-signal: selection probability")
    p.add_argument("--batch-size", type=positive_int, default=32, help="with --selection-signal or --fixed-objective: images per step")
    p.add_argument("--class-ceiling", action="store_true",
                   help="train nothing: the overall holdout AUROC of a ranking of one class's images alone")
    p.add_argument("--reps", type=positive_int, default=50, help="with --class-ceiling: random draws per figure (default: 50)")
    args = p.parse_args(argv)
    if args.class_ceiling:
        if args.selection_signal or args.fixed_objective:
            p.error("--class-ceiling is a measurement of its own: give it without --selection-signal or --fixed-objective")
        return _class_ceiling_main(args)
    env_kwargs = args.env_kwargs
    try:
        _check_steps(args.steps, args.eval_every)
    except ValueError as e:
        p.error(str(e))
    if args.selection_signal and args.fixed_objective:
        p.error("--selection-signal and --fixed-objective are two measurements: give one")
    if args.selection_signal:
        return _selection_signal_main(args, p)
    if args.fixed_objective:
        return _fixed_objective_main(args)
    results = []
    print(f"{'controller':10} {'seed':>4}  updates: AUROC(-loss) / AUROC(-class-centred log-loss) / "
          "AUROC(confidence) / holdout metric")
    for seed in range(args.seeds):
        for controller in args.controllers:
            r = predictor_ceiling(
                args.dataset, args.task, controller, args.steps, args.eval_every, seed, device=args.device,
                env_kwargs=env_kwargs,
            )
            row = {"controller": controller, "seed": seed, "curve": r["curve"]}
            points = " ".join(
                f"{c['updates']}:{_fmt(c['auroc_neg_loss'])}/{_fmt(c['auroc_class_log'])}/"
                f"{_fmt(c['auroc_confidence'])}/{c['metric']:.3f}"
                for c in r["curve"]
            )
            print(f"{controller:10} {seed:>4}  {points}", flush=True)
            if args.fit_controller and controller == "all":
                row["fitted_controller_auroc"] = fit_controller(r["env"], r["holdout"], args.task, args.fit_steps, seed)
                row["fitted_to_class_log_auroc"] = fit_controller(
                    r["env"], r["holdout"], args.task, args.fit_steps, seed, target="class_log_loss"
                )
                row["fitted_to_ground_truth_auroc"] = fit_controller(
                    r["env"], r["holdout"], args.task, args.fit_steps, seed, target="ground_truth"
                )
                print(f"{'':10} {seed:>4}  controller fitted to these losses: holdout AUROC "
                      f"{_fmt(row['fitted_controller_auroc'])}; to them compared within each class: "
                      f"{_fmt(row['fitted_to_class_log_auroc'])}; to the ground truth: "
                      f"{_fmt(row['fitted_to_ground_truth_auroc'])}", flush=True)
            results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"task": args.task, "steps": args.steps, "env_kwargs": env_kwargs, "runs": results}, indent=2
        ))
    if args.plot:
        print(f"figure: {plot_ceiling(results, args.plot)}")
    return 0


def _selection_signal_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not is_open_probability(args.rate):
        parser.error(f"--rate must be a selection probability in (0, 1), got {args.rate}")
    results = []
    print(f"{'form':15} {'seed':>4}  rewards  correlation with the selection's amenability advantage")
    for seed in range(args.seeds):
        for form in args.forms:
            r = selection_signal(
                args.dataset, args.task, form, args.steps, args.rate, seed, batch_size=args.batch_size,
                device=args.device, env_kwargs=args.env_kwargs,
            )
            # A step's draws share its batch and predictor: counted as one sample, not as K.
            samples = min(r["rewards"], r["steps"]) if form == "draws" else r["rewards"]
            error = f" (sampling error about +-{1 / np.sqrt(samples):.2f})" if samples else ""
            print(f"{form:15} {seed:>4}  {r['rewards']:>7}  {_fmt(r['correlation'])}{error}", flush=True)
            if r["decomposition"] is not None:
                terms = "; ".join(f"{t} {v['coefficient']:+.3f} (+-{v['standard_error']:.3f})"
                                  for t, v in r["decomposition"]["terms"].items())
                print(f"{'':21}per unit of contrast: {terms}; explained variance "
                      f"{r['decomposition']['explained_variance']:.3f}", flush=True)
            results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"task": args.task, "steps": args.steps, "rate": args.rate, "env_kwargs": args.env_kwargs,
             "selection_signal": results}, indent=2
        ))
    return 0


def _class_ceiling_main(args: argparse.Namespace) -> int:
    if args.task != "classification":
        raise SystemExit(f"--class-ceiling compares the classes of a classification task, got --task {args.task}")
    _, _, holdout = _splits_with_truth(args.dataset, args.task, 0, "--class-ceiling")
    truth = holdout.amenable(args.task).astype(np.float64)
    labels = np.asarray(holdout.labels)
    print(f"holdout: {len(truth)} images; " + ", ".join(
        f"{name} {int((labels == k).sum())} ({truth[labels == k].mean():.0%} amenable)"
        for k, name in enumerate(holdout.class_names)))
    print("ranked class, noise: its own AUROC -> overall AUROC (at the best shift against the other classes)")
    results = []
    for k, name in enumerate(holdout.class_names):
        for noise in CEILING_NOISE:
            r = class_ceiling(truth, labels, k, noise, reps=args.reps)
            print(f"  {name}, {noise:.2f}: {_fmt(r['within'])} -> {_fmt(r['overall'])} ({_fmt(r['best_shift'])})", flush=True)
            results.append({**r, "class_name": name})
    if args.json:
        Path(args.json).write_text(json.dumps({"task": args.task, "reps": args.reps, "class_ceiling": results}, indent=2))
    return 0


def _fixed_objective_main(args: argparse.Namespace) -> int:
    results = []
    print(f"{'rule':8} {'seed':>4}  mean over the evaluations: clean validation loss / holdout metric on the "
          "rated-amenable images / on all;  then per evaluation, updates:clean validation loss")
    for seed in range(args.seeds):
        for rule in args.rules:
            r = fixed_objective(
                args.dataset, args.task, rule, args.steps, args.eval_every, seed, batch_size=args.batch_size,
                device=args.device, env_kwargs=args.env_kwargs,
            )
            mean = {key: float(np.mean([c[key] for c in r["curve"]])) for key in r["curve"][0] if key != "updates"}
            points = " ".join(f"{c['updates']}:{c['clean_loss']:.3f}" for c in r["curve"])
            print(f"{rule:8} {seed:>4}  {mean['clean_loss']:.3f} / {mean['holdout_clean_metric']:.3f} / "
                  f"{mean['holdout_metric']:.3f};  {points}", flush=True)
            results.append({**r, "mean": mean})
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"task": args.task, "steps": args.steps, "env_kwargs": args.env_kwargs, "fixed_objective": results},
            indent=2,
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
