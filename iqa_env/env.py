"""The Gymnasium environment of task-amenability image quality assessment."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from iqa_env.checks import (
    is_count,
    is_flag,
    is_non_negative_number,
    is_number,
    is_open_probability,
    is_positive_number,
    is_whole_number,
)
from iqa_env.data.dataset import ImageDataset
from iqa_env.networks import (
    check_average_decay,
    to_float,
    update_weight_average,
    weight_average_of,
)
from iqa_env.rewards import (
    REWARD_NORMALISATIONS,
    ClassMixCorrection,
    MovingAverageBaseline,
    check_rejection_ratio,
    check_reward,
    class_log_losses,
    class_mix_contrast,
    fixed_reward,
    has_validation_phase,
    leave_one_out_rewards,
    validation_reward,
)
from iqa_env.tasks import Task, make_task, random_shift

logger = logging.getLogger(__name__)

#: Version of the files of ``warmup_cache``; part of their key, so that files of another layout are not read.
WARMUP_FORMAT = 1
#: The part of ``TaskAmenabilityEnv.state_dict()`` a predictor warm-up changes: what ``warmup_cache`` keeps.
PREDICTOR_STATE: tuple[str, ...] = (
    "predictor", "averaged_predictor", "predictor_updates", "optimizer", "np_random", "np_random_seed", "torch_generator",
)

PHASES: tuple[str, str] = ("train", "validation")
REWARD_METRICS: tuple[str, str] = ("metric", "loss")
REWARD_BASELINES: tuple[str, ...] = ("moving_average", "non_selective", "paired", "none")
#: How the ``paired`` baseline measures a probe step: ``"step"`` takes it and measures the validation
#: loss after it; ``"linear"`` computes its first-order effect from one validation gradient;
#: ``"linearised"`` takes the loss on the validation logits moved by it to first order (classification).
PAIRED_PROBES: tuple[str, ...] = ("step", "linear", "linearised")
CLASS_CORRECTIONS: tuple[str, ...] = ("history", "step")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a missing CUDA device is a clear error."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was asked for but CUDA is not available on this machine; "
                "use device='cpu' or device='auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def as_dataset(dataset: ImageDataset | str | os.PathLike[str] | None) -> ImageDataset:
    """An ``ImageDataset`` from itself, an HDF5 path, or None (the built-in synthetic set)."""
    if dataset is None:
        from iqa_env.data.cache import default_dataset

        return default_dataset()
    if isinstance(dataset, ImageDataset):
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        from iqa_env.data.io import load_dataset

        return load_dataset(dataset)
    raise TypeError(
        f"dataset must be an ImageDataset, a path to an HDF5 dataset file or None (built-in data), "
        f"got {type(dataset).__name__}"
    )


def validation_images_per_step(batch_size: int, validation_batch_size: int | None = None) -> int:
    """The validation images each validation step rewards: ``validation_batch_size``, or the whole batch if None."""
    return int(batch_size) if validation_batch_size is None else int(validation_batch_size)


def validation_steps_of(reward: str, validation_images: int, batch_size: int) -> int:
    """Validation steps per episode of a ``TaskAmenabilityEnv`` with this reward (0 for ``fixed``).

    ``validation_images`` is the number of images each reward scores (the
    env's ``validation_size``, at most the validation set's size);
    ``batch_size`` the validation images per step (the env's
    ``validation_batch_size``, which is its ``batch_size`` unless set).
    """
    return math.ceil(validation_images / batch_size) if has_validation_phase(reward) else 0


def extra_draws(info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A training step's further draws from its ``info`` (``paired_draws=K``): ``(K - 1, B)`` selections and
    their ``(K - 1,)`` rewards; ``(0, 0)`` and ``(0,)`` where the step reports none.

    The one reader of ``info["extra_selections"]`` and ``info["extra_rewards"]`` that the agents share;
    another env's malformed ones raise ``ValueError`` rather than be misread.
    """
    if "extra_rewards" not in info:
        return np.zeros((0, 0), dtype=bool), np.zeros(0)
    selections = np.asarray(info.get("extra_selections"), dtype=bool)
    rewards = np.asarray(info["extra_rewards"], dtype=np.float64).reshape(-1)
    if selections.ndim != 2 or selections.shape[0] != rewards.shape[0]:
        raise ValueError(
            "info['extra_selections'] must be (K - 1, batch) with one info['extra_rewards'] per row, got "
            f"{selections.shape} and {rewards.shape}"
        )
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"info['extra_rewards'] must be finite, got {rewards}")
    return selections, rewards


def _chunked_outputs(
    net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """``net``'s outputs for ``(N, C, H, W)`` images (uint8 or float), ``chunk`` images at a time, in the
    caller's grad mode (:meth:`TaskAmenabilityEnv.predictor_outputs` says why 64)."""
    return torch.cat([net(to_float(images[i : i + chunk])) for i in range(0, len(images), chunk)])


def shift_to_mean(p: np.ndarray, rate: float) -> np.ndarray:
    """``p`` with its logits shifted by one constant so that their mean is ``rate``: the same ranking, another rate.

    ``p`` is clipped to ``[1e-6, 1 - 1e-6]`` first (so that 0 and 1 keep a logit); the
    constant is found by bisection, to machine precision.
    """
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1.0 - 1e-6)
    z = np.log(q) - np.log1p(-q)
    lo, hi = -40.0 - z.max(), 40.0 - z.min()  # every probability below e^-40 at lo, above 1 - e^-40 at hi
    for _ in range(100):
        c = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(z + c)))) < rate:
            lo = c
        else:
            hi = c
    return 1.0 / (1.0 + np.exp(-(z + 0.5 * (lo + hi))))


class TaskAmenabilityEnv(gym.Env):
    """Learning which images a task predictor can use: the controller's environment.

    ## Description

    Saeed et al., "Image quality assessment by task amenability using
    reinforcement learning", IPMI 2021 (https://arxiv.org/abs/2102.07615).
    A *task predictor* (a classifier or a U-Net) lives inside the environment
    and trains alongside the agent.  The agent is the *controller*: for each
    image it outputs a selection probability, its task-amenability score.
    The environment samples which images the predictor trains on, and rewards
    the controller by the predictor's performance on validation images.  A
    controller that learns this well scores images by how amenable they are to
    the task; at test time the lowest-scored images are rejected.

    An episode has ``train_steps`` training steps, then (for the ``weighted``
    and ``selective`` rewards, which need the controller's scores of
    validation images) ``validation_steps`` validation steps:

    - training step: the observation is a mini-batch of training images; the
      action is their selection probabilities ``p``; the env draws
      ``a_i ~ Bernoulli(p_i)`` with ``self.np_random`` and takes one optimiser
      step of the task predictor on the selected images only (none selected:
      no update).
    - validation step: the observation is the next mini-batch of validation
      images (a fixed set, in a fixed order, or with ``validation_refresh``
      a new subset and order every episode; padded at the end with repeats
      that ``info["valid"]`` marks False); the action is the controller's
      scores for them.  With ``validation_batch_size`` k < ``batch_size``
      only the first k images of each validation observation count (the
      rest, the next images of the order, are marked False in
      ``info["valid"]``), so that each validation reward credits k scores
      while training steps still train on ``batch_size`` images.  The
      predictor's per-sample losses on the validation set are computed once
      when the phase starts.

    So any RL algorithm, from any library, trains with any reward through
    ``step()`` alone: the controller's validation scores are its actions.
    Each step's ``info`` describes the batch the action was applied to:
    ``selection`` (the Bernoulli draws), ``valid`` and ``classes`` (the
    images' class labels, which an agent may use to keep its scores
    neutral between classes, e.g. REINFORCE's ``class_balance``),
    ``reward_scope``: ``"step"`` when the step's reward measures its own
    action alone (validation steps, and training steps with the ``paired``
    baseline), ``"episode"`` when a training step's selection is rewarded
    through the rewards after it; and ``rewarded_action``: ``"selection"``
    when what the rewards measure is the Bernoulli draws (every training
    step, and validation steps with ``stochastic_validation``), so that an
    agent may learn from the draws rather than the probabilities (DDPG's
    ``store_selections``), ``"probabilities"`` when it is the action itself
    (validation steps without ``stochastic_validation``).  Validation steps
    with ``stochastic_validation`` also report ``image_rewards``
    ``(batch_size, 2)``: the step's reward (baselined and penalised as the
    one returned) had image ``j``'s draw been 0 (column 0) or 1 (column 1),
    the other draws as they were; the column of the draw made is the
    reward itself, and both columns of an image marked False in ``valid``
    are.  An agent may use it for a per-image baseline that leaves its
    policy gradient unbiased (REINFORCE's ``image_baseline="leave_one_out"``).
    Training steps of the ``paired`` fixed reward with
    ``training_selection_rate`` also report ``training_selection``: the
    images the predictor's real step took (``selection`` and more, drawn at
    the shifted rate), which no reward measures.

    ## Action Space

    ``Box(0, 1, (batch_size,), float32)``: one selection probability per image
    of the observed mini-batch.  Values outside [0, 1] are clipped; NaN, inf
    or a wrong shape raise ``ValueError``.

    ## Observation Space

    | Num | Observation | Min | Max | Shape |
    |-----|-------------|-----|-----|-------|
    | 0 | the mini-batch of images, channel-first | 0 | 255 | ``(batch_size, C, H, W)``, ``uint8`` |

    ## Rewards

    With per-sample validation losses ``l_j`` (``1 - accuracy`` or
    ``1 - Dice`` by default; the training loss with ``reward_metric="loss"``):

    - ``fixed``: ``R~ = -mean l_j`` over the validation images labelled
      amenable by human raters; given at the last training step.
    - ``weighted``: ``R~_k = -sum w_j l_j / sum w_j`` over validation batch
      ``k``, with ``w_j`` the env's Bernoulli selections
      (``stochastic_validation=True``, the default: score-function methods
      such as REINFORCE and PPO then get a gradient) or the scores themselves
      (``False``: the paper's literal form, smoother for deterministic
      policies such as DDPG).
    - ``selective``: ``R~_k = -mean l_j`` over the images of batch ``k`` kept
      after rejecting its ``rejection_ratio`` lowest-scored (with stochastic
      validation, only the selected images among those kept count).

    With ``reward_normalisation="class_log"`` the weighted and selective
    rewards use ``log l_j`` minus the mean ``log l`` of the validation images
    of the same class (``iqa_env.rewards.class_log_losses``) in place of
    ``l_j``: an image is credited for being easy for its class, and a
    controller gains nothing by scoring a whole class low.

    Each raw reward is baselined by its moving average,
    ``R = R~ - Rbar``, ``Rbar <- a Rbar + (1 - a) R~`` with
    ``a = baseline_decay`` (one average per validation batch position, so
    that the baseline also absorbs how hard each batch is); the parts of one
    validation phase average to the paper's whole-set reward.  With
    ``reward_baseline="non_selective"`` a validation step's baseline is
    instead the reward of the same batch without any selection
    (``-mean l_j`` over the batch): a control variate with no lag, which
    removes the variation of the predictor between episodes and of the
    batches' difficulty, and leaves what the controller's selection adds.
    ``reward_baseline="paired"`` (``fixed`` reward only) rewards every
    training step for itself: from the step's starting weights, one plain
    gradient step of ``probe_lr`` on the selected images and one on the
    images not selected are taken in turn (the weights are put back after
    each), and the reward is the fixed reward after the first minus that
    after the second; then the predictor takes its real step on the selected
    images.  ``raw_reward`` is the fixed reward after the probe on the
    selection.  The difference removes what both share (the predictor's
    drift, how hard the validation set is to it now) and leaves what this
    selection's images do for the clean validation loss.  It also pays for
    the selection's class mix, whatever the images' quality (a step on one
    class moves the predictor's bias between the classes); with
    ``paired_class_correction=True`` each such reward is corrected by the
    part that a running least-squares fit over the earlier steps attributes
    to the selected share of each class minus the rest's
    (``iqa_env.rewards.ClassMixCorrection``), so that selecting a class
    pays nothing on average (``True`` is ``"history"``); with
    ``paired_class_correction="step"`` the class term is fitted instead on
    the step's own ``paired_draws`` (``K > num_classes`` needed), so that it
    follows the predictor's class bias as it is at that step.  With
    ``paired_draws=K > 1`` the env also
    draws ``K - 1`` further selections from the same probabilities and
    probes each of them from the same starting weights, without training on
    them: ``info["extra_selections"]`` ``(K - 1, B)`` and
    ``info["extra_rewards"]`` ``(K - 1,)`` (each penalised and, with the
    class correction, corrected as the step's own reward, the correction's
    fit also learning from them), so that an agent that learns from draws
    (DDPG's ``store_selections``) gets K measured selections of each batch
    instead of one, and a score-function agent K samples of its policy at
    one observation, each with its own reward (REINFORCE credits each
    against the mean of the others: its ``draws``).  The step's reward and the predictor's training stay those of
    the first draw.  ``paired_probe="linear"`` computes the probes' rewards
    to first order in ``probe_lr`` instead of taking them: each image's
    share is the derivative of its training loss along the gradient of the
    fixed reward, taken once per episode (:meth:`_linear_probe_values`), so
    that a step with eight draws costs two forward passes of its batch
    rather than sixteen probe steps and validation passes.
    ``paired_probe="linearised"`` (classification) computes them from the
    predictor linearised at the episode's start: each probe moves the
    validation logits to first order and the loss on the moved logits is
    taken exactly (:meth:`_linearised_probe_values`), which keeps the
    curvature that penalises steps on images with large gradients, where
    the first-order rewards lose the ranking once the predictor fits; a
    step costs one vectorised backward pass of its batch for the per-image
    gradients, whose mean over the images it trains on is then the
    gradient of the predictor's real step (without ``predictor_augment``).
    ``reward_baseline="none"`` returns the raw validation rewards, for agents
    with a learnt critic (the critic is their baseline).
    The other training steps (all but the ``fixed`` reward's last, unless
    ``paired``) give 0.  When the mean selection probability of a step leaves
    ``mean_selection_bounds = (c_low, c_high)`` the step is penalised by
    ``mean_selection_penalty`` times the distance (the paper's constraint
    ``E[h] >= c``, eq. 3, with an upper bound against the collapse to
    ``h = 1``).

    ## Starting State

    ``reset(seed=s)`` re-seeds the env's numpy and torch generators,
    re-initialises the task predictor (unless
    ``reinitialise_predictor_on_seed=False``), clears the reward baselines
    and optionally pre-trains the predictor for ``predictor_warmup_steps``
    steps on all training images.  ``reset()`` without a seed starts the next
    episode with the same predictor: it persists across episodes, as in the
    paper's Algorithm 1.  ``options={"reinitialise_predictor": True}`` forces
    a fresh predictor.

    ## Episode End

    Terminated after the last validation step (``fixed``: after the last
    training step).  Never truncated by the env itself.

    ## Arguments

    | Argument | Default | Meaning |
    |----------|---------|---------|
    | ``dataset`` | ``None`` | an ``ImageDataset``, an HDF5 path, or ``None`` for the built-in synthetic ultrasound set |
    | ``task`` | ``"classification"`` | ``"classification"`` or ``"segmentation"`` |
    | ``reward`` | ``"weighted"`` | ``"fixed"``, ``"weighted"`` or ``"selective"`` |
    | ``validation_dataset`` | ``None`` | explicit validation images; else ``dataset`` is split by patient 70/15/15 and the holdout part is never touched |
    | ``rejection_ratio`` | ``0.05`` | fraction rejected by the ``selective`` reward |
    | ``batch_size`` | ``32`` | images per step |
    | ``train_steps`` | ``8`` | training steps per episode |
    | ``validation_size`` | ``None`` | validation images used for rewards (``None``: all) |
    | ``validation_batch_size`` | ``None`` | validation images each validation step scores and rewards (``None``: ``batch_size``; at most ``batch_size``, the rest of the observation marked not valid) |
    | ``reward_metric`` | ``"metric"`` | ``"metric"`` (1 - accuracy / 1 - Dice) or ``"loss"`` |
    | ``reward_normalisation`` | ``"none"`` | ``"class_log"``: each validation loss as ``log l_j`` minus the mean ``log l`` of its class (weighted and selective rewards, ``reward_metric="loss"``) |
    | ``stochastic_validation`` | ``True`` | weight validation losses by Bernoulli selections rather than scores |
    | ``baseline_decay`` | ``0.9`` | ``a`` of the moving-average baseline |
    | ``reward_baseline`` | ``"moving_average"`` | ``"moving_average"`` (the paper), ``"non_selective"`` (validation steps), ``"paired"`` (fixed reward: each training step against the rest of its batch) or ``"none"`` |
    | ``probe_lr`` | ``0.1`` | learning rate of the plain gradient steps of the ``paired`` baseline |
    | ``paired_class_correction`` | ``False`` | remove from each ``paired`` reward the part fitted to the selection's class mix: ``True``/``"history"`` (a running fit over the earlier steps) or ``"step"`` (a fit on the step's own draws) |
    | ``paired_draws`` | ``1`` | selections drawn and probed per ``paired`` training step; the further ones are reported in ``info`` |
    | ``paired_probe`` | ``"step"`` | how the ``paired`` baseline measures a probe: ``"step"`` (take it, measure the validation loss), ``"linear"`` (its first-order effect, from the fixed reward's gradient at the episode's start) or ``"linearised"`` (the loss on the validation logits moved to first order, from the predictor at the episode's start; classification) |
    | ``validation_refresh`` | ``False`` | draw a new validation subset (of ``validation_size``) for every episode |
    | ``mean_selection_bounds`` | ``(0.0, 1.0)`` | allowed range of the mean selection probability |
    | ``mean_selection_penalty`` | ``1.0`` | penalty per unit outside those bounds |
    | ``training_selection_rate`` | ``None`` | on training steps, the predictor trains on selections drawn from the action's logits shifted by one constant so that their mean is this rate (the same ranking, another share of each batch trained on). Weighted and selective rewards: ``info["selection"]`` reports these draws, which are then not the action's. Fixed reward with ``reward_baseline="paired"``: the probes and ``info["selection"]`` keep the action's draws, and the same uniforms at the shifted probabilities give the real step's images (``info["training_selection"]``); other fixed-reward baselines refuse it. ``None``: from the action |
    | ``predictor_lr`` | ``1e-3`` | Adam learning rate of the task predictor |
    | ``predictor_max_grad_norm`` | ``None`` | clip the norm of each predictor update's gradient to this (``torch.nn.utils.clip_grad_norm_``): a guard against the rare huge gradient of a step on a few images, which can wreck a co-trained U-Net (``docs/learning-status.md`` section 63); ``None``: no clipping |
    | ``predictor_warmup_steps`` | ``0`` | non-selective pre-training steps after a seeded reset |
    | ``warmup_cache`` | ``None`` | a folder where the predictor's state after a warm-up is kept; an env whose warm-up would start from the same state (seed, data, predictor and warm-up settings) loads it instead of training again, with the same result (a file where the folder would be is refused when the env is made) |
    | ``predictor_augment`` | ``False`` | train the predictor on images shifted at random by up to 1/16 of their size (masks with them) |
    | ``predictor_average`` | ``0.0`` | decay of an exponential moving average of the predictor's weights that the rewards and ``evaluate()`` use (``0``: the weights themselves); with the ``paired`` fixed reward's ``linear`` or ``linearised`` probes, which read the weights themselves, ``evaluate()`` alone (refused with its ``step`` probes) |
    | ``reinitialise_predictor_on_seed`` | ``True`` | fresh predictor on ``reset(seed=...)`` |
    | ``split_seed`` | ``0`` | seed of the patient-level split |
    | ``device`` | ``"auto"`` | ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``; data, predictor and optimiser live there; ``agents.make_agent(name, env)`` puts the agent there too (``device=`` to put it elsewhere) |
    | ``render_mode`` | ``None`` | ``"rgb_array"``: a grid of the batch with probabilities and selections |

    ```python
    import gymnasium as gym
    import iqa_env  # registers TaskAmenability-v0

    env = gym.make("TaskAmenability-v0", task="classification", reward="weighted", batch_size=16)
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    ```

    ## Version History

    * v0: Initial version.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        dataset: ImageDataset | str | os.PathLike[str] | None = None,
        task: str | Task = "classification",
        reward: str = "weighted",
        *,
        validation_dataset: ImageDataset | str | os.PathLike[str] | None = None,
        rejection_ratio: float = 0.05,
        batch_size: int = 32,
        train_steps: int = 8,
        validation_size: int | None = None,
        validation_batch_size: int | None = None,
        reward_metric: str = "metric",
        reward_normalisation: str = "none",
        stochastic_validation: bool = True,
        baseline_decay: float = 0.9,
        reward_baseline: str = "moving_average",
        probe_lr: float = 0.1,
        paired_class_correction: bool | str = False,
        paired_draws: int = 1,
        paired_probe: str = "step",
        validation_refresh: bool = False,
        mean_selection_bounds: tuple[float, float] = (0.0, 1.0),
        mean_selection_penalty: float = 1.0,
        training_selection_rate: float | None = None,
        predictor_lr: float = 1e-3,
        predictor_max_grad_norm: float | None = None,
        predictor_warmup_steps: int = 0,
        warmup_cache: str | os.PathLike[str] | None = None,
        predictor_augment: bool = False,
        predictor_average: float = 0.0,
        reinitialise_predictor_on_seed: bool = True,
        split_seed: int = 0,
        device: str | torch.device = "auto",
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.task = make_task(task)
        self.reward_name = check_reward(reward)
        self.rejection_ratio = check_rejection_ratio(rejection_ratio)
        if not is_count(batch_size):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not is_count(train_steps):
            raise ValueError(f"train_steps must be a positive integer, got {train_steps!r}")
        if validation_size is not None and not is_count(validation_size):
            raise ValueError(f"validation_size must be a positive integer or None, got {validation_size!r}")
        if not is_whole_number(split_seed):
            raise ValueError(f"split_seed must be a whole number >= 0 (the seed of the patient split), got {split_seed!r}")
        if not (is_number(baseline_decay) and 0.0 <= baseline_decay < 1.0):
            raise ValueError(
                f"baseline_decay must be a number in [0, 1) (the moving average's decay), got {baseline_decay!r}"
            )
        for name, flag in (
            ("stochastic_validation", stochastic_validation),
            ("validation_refresh", validation_refresh),
            ("predictor_augment", predictor_augment),
            ("reinitialise_predictor_on_seed", reinitialise_predictor_on_seed),
        ):
            if not is_flag(flag):
                raise ValueError(f"{name} must be True or False, got {type(flag).__name__} {flag!r}")
        if validation_batch_size is not None and (
            not is_count(validation_batch_size) or validation_batch_size > batch_size
        ):
            raise ValueError(
                f"validation_batch_size must be None (batch_size) or a whole number from 1 to batch_size "
                f"({batch_size}): the images a validation step scores fill part of its observation, got "
                f"{validation_batch_size!r}"
            )
        if reward_baseline not in REWARD_BASELINES:
            raise ValueError(f"reward_baseline must be one of {REWARD_BASELINES}, got {reward_baseline!r}")
        if reward_metric not in REWARD_METRICS:
            raise ValueError(f"reward_metric must be one of {REWARD_METRICS}, got {reward_metric!r}")
        if reward_normalisation not in REWARD_NORMALISATIONS:
            raise ValueError(
                f"reward_normalisation must be one of {REWARD_NORMALISATIONS}, got {reward_normalisation!r}"
            )
        if reward_normalisation == "class_log" and (reward_metric != "loss" or self.reward_name == "fixed"):
            raise ValueError(
                "reward_normalisation='class_log' needs reward_metric='loss' (the log of a 0/1 error is not "
                "defined) and the weighted or selective reward (it compares images with each other; the fixed "
                f"reward has no per-image credit), got reward_metric={reward_metric!r}, reward={self.reward_name!r}"
            )
        if reward_baseline == "paired" and (
            self.reward_name != "fixed" or (float(predictor_average) > 0 and paired_probe == "step")
        ):
            raise ValueError(
                "reward_baseline='paired' compares a gradient step on each training selection with one on "
                "the images not selected, so it needs reward='fixed' (the other rewards score validation "
                "images) and, with paired_probe='step', predictor_average=0 (the rewards would come from a "
                "weight average that the probe steps do not move; the 'linear' and 'linearised' probes read "
                f"the weights themselves), got reward={self.reward_name!r}, predictor_average={predictor_average!r}, "
                f"paired_probe={paired_probe!r}"
            )
        if paired_probe not in PAIRED_PROBES:
            raise ValueError(f"paired_probe must be one of {PAIRED_PROBES}, got {paired_probe!r}")
        if paired_probe != "step" and (reward_baseline != "paired" or reward_metric != "loss"):
            raise ValueError(
                f"paired_probe={paired_probe!r} computes the paired baseline's probes from the gradient of the "
                "validation loss, so it needs reward_baseline='paired' and reward_metric='loss' (the 0/1 error has "
                f"no gradient), got reward_baseline={reward_baseline!r}, reward_metric={reward_metric!r}"
            )
        if paired_probe == "linearised" and self.task.name != "classification":
            raise ValueError(
                "paired_probe='linearised' keeps the Jacobian of the predictor's outputs on the validation images "
                "(images x outputs per image x weights), which fits a classifier's few logits, not the "
                f"{self.task.name} predictor's per-pixel outputs: use paired_probe='linear' or 'step' there"
            )
        if not is_positive_number(probe_lr):
            raise ValueError(f"probe_lr must be a positive finite number, got {probe_lr!r}")
        if isinstance(paired_class_correction, (bool, np.bool_)):
            paired_class_correction = "history" if paired_class_correction else False
        if paired_class_correction is not False and paired_class_correction not in CLASS_CORRECTIONS:
            raise ValueError(
                f"paired_class_correction must be False, True (= 'history') or one of {CLASS_CORRECTIONS}, "
                f"got {paired_class_correction!r}"
            )
        if paired_class_correction and reward_baseline != "paired":
            raise ValueError(
                "paired_class_correction removes the class term from the rewards of the paired baseline's "
                f"training steps, so it needs reward_baseline='paired', got reward_baseline={reward_baseline!r}"
            )
        if not is_count(paired_draws):
            raise ValueError(f"paired_draws must be a whole number >= 1, got {paired_draws!r}")
        if paired_draws > 1 and reward_baseline != "paired":
            raise ValueError(
                "paired_draws probes further selections of each training step as the paired baseline does, so "
                f"it needs reward_baseline='paired', got reward_baseline={reward_baseline!r}"
            )
        bounds = tuple(mean_selection_bounds) if isinstance(mean_selection_bounds, (tuple, list, np.ndarray)) else ()
        if not (len(bounds) == 2 and all(map(is_number, bounds)) and 0.0 <= bounds[0] <= bounds[1] <= 1.0):
            raise ValueError(
                f"mean_selection_bounds must be (low, high) with 0 <= low <= high <= 1, got {mean_selection_bounds!r}"
            )
        lo, hi = (float(b) for b in bounds)
        if not is_non_negative_number(mean_selection_penalty):
            raise ValueError(f"mean_selection_penalty must be a finite number >= 0, got {mean_selection_penalty!r}")
        if training_selection_rate is not None:
            if not is_open_probability(training_selection_rate):
                raise ValueError(
                    f"training_selection_rate must be None or a probability in (0, 1), got {training_selection_rate!r}"
                )
            if self.reward_name == "fixed" and reward_baseline != "paired":
                raise ValueError(
                    "training_selection_rate draws the predictor's training selections from the action shifted to "
                    f"another rate, and the fixed reward with reward_baseline={reward_baseline!r} rewards those "
                    "selections themselves: use it with reward_baseline='paired' (the probes credit the action's "
                    "draws), the weighted or selective reward, or training_selection_rate=None"
                )
            training_selection_rate = float(training_selection_rate)
        if not is_positive_number(predictor_lr):
            raise ValueError(f"predictor_lr must be a positive finite number, got {predictor_lr!r}")
        if predictor_max_grad_norm is not None:
            if not is_positive_number(predictor_max_grad_norm):
                raise ValueError(
                    f"predictor_max_grad_norm must be None or a positive number, got {predictor_max_grad_norm!r}"
                )
            predictor_max_grad_norm = float(predictor_max_grad_norm)
        if not is_whole_number(predictor_warmup_steps):
            raise ValueError(f"predictor_warmup_steps must be a whole number >= 0, got {predictor_warmup_steps!r}")
        predictor_average = check_average_decay("predictor_average", predictor_average)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        self.batch_size = int(batch_size)
        self.validation_batch_size = validation_images_per_step(self.batch_size, validation_batch_size)
        self.train_steps = int(train_steps)
        self.reward_metric = reward_metric
        self.reward_normalisation = reward_normalisation
        self.reward_baseline = reward_baseline
        self.probe_lr = float(probe_lr)
        self.paired_class_correction: bool | str = paired_class_correction
        self.paired_draws = int(paired_draws)
        self.paired_probe = paired_probe
        self.validation_refresh = bool(validation_refresh)
        self.stochastic_validation = bool(stochastic_validation)
        self.mean_selection_bounds = (lo, hi)
        self.mean_selection_penalty = float(mean_selection_penalty)
        self.training_selection_rate: float | None = training_selection_rate
        self.predictor_lr = float(predictor_lr)
        self.predictor_max_grad_norm: float | None = predictor_max_grad_norm
        self.predictor_warmup_steps = int(predictor_warmup_steps)
        if warmup_cache is not None and not isinstance(warmup_cache, (str, os.PathLike)):
            raise ValueError(f"warmup_cache must be None or a folder path, got {type(warmup_cache).__name__}")
        self.warmup_cache = None if warmup_cache is None else Path(warmup_cache)
        if warmup_cache is not None:
            from iqa_env.files import check_warmup_cache

            check_warmup_cache(warmup_cache)
        self._training_digest: bytes | None = None
        self.predictor_augment = bool(predictor_augment)
        self.predictor_average = predictor_average
        self.reinitialise_predictor_on_seed = bool(reinitialise_predictor_on_seed)
        self.render_mode = render_mode
        self.device = resolve_device(device)

        full = as_dataset(dataset)
        if validation_dataset is None:
            from iqa_env.data.splits import split_by_group

            train_set, validation_set, _holdout = split_by_group(full, seed=split_seed)
        else:
            train_set, validation_set = full, as_dataset(validation_dataset)
            if validation_set.image_shape != train_set.image_shape:
                raise ValueError(
                    f"validation_dataset images are {validation_set.image_shape}, training images "
                    f"{train_set.image_shape}; expected the same (C, H, W)"
                )
        if len(train_set) < self.batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than the training set ({len(train_set)} images); "
                "use a smaller batch_size or more data"
            )
        self.task.check_dataset(train_set, "training")
        num_classes = max(len(train_set.class_names), 1)
        if self.paired_class_correction == "step" and self.paired_draws <= num_classes:
            raise ValueError(
                "paired_class_correction='step' fits the class term on each step's own draws, one weight per "
                f"class but the first and an intercept, so with {num_classes} classes it "
                f"needs paired_draws >= {num_classes + 1}, got paired_draws={self.paired_draws}"
            )
        if self.reward_name == "fixed":
            clean = validation_set.require_human_amenability(self.task.name, "the fixed reward") == 1
            if not clean.any():
                raise ValueError(
                    "the fixed reward needs validation images labelled amenable by humans, but none of the "
                    f"{len(validation_set)} validation images is (human_amenability/{self.task.name} == 1); "
                    "expected at least one: check the rater labels, or use reward='weighted' or 'selective'"
                )
            validation_set = validation_set.subset(np.flatnonzero(clean))
        self.train_set = train_set
        self.validation_set = validation_set
        self._validation_size = min(validation_size or len(validation_set), len(validation_set))

        # Host copies serve the observations; device copies serve the computation.
        self._train_images = np.ascontiguousarray(train_set.images)
        self._validation_images = np.ascontiguousarray(validation_set.images)
        self._train_images_t = torch.from_numpy(self._train_images).to(self.device)
        self._train_targets_t = torch.from_numpy(self.task.targets(train_set)).to(self.device)
        self._validation_images_t = torch.from_numpy(self._validation_images).to(self.device)
        self._validation_targets_t = torch.from_numpy(self.task.targets(validation_set)).to(self.device)

        c, h, w = train_set.image_shape
        self.observation_space = spaces.Box(0, 255, (self.batch_size, c, h, w), np.uint8)
        self.action_space = spaces.Box(0.0, 1.0, (self.batch_size,), np.float32)

        self.baseline = MovingAverageBaseline(baseline_decay)
        self.class_correction = ClassMixCorrection(num_classes)
        self.predictor: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.averaged_predictor: torch.nn.Module | None = None
        self._predictor_updates = 0
        self._torch_generator = torch.Generator(device="cpu")
        self._phase = "train"
        self._episode_step = 0
        # paired_probe="linear": the fixed reward's gradient at the episode's start, and its value.
        self._probe_direction: dict[str, torch.Tensor] | None = None
        self._probe_start = 0.0
        # paired_probe="linearised": the predictor's weights at the episode's start (saved), and the
        # validation outputs and their Jacobian there (derived from them, not saved).
        self._probe_anchor: dict[str, torch.Tensor] | None = None
        self._probe_model: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        # paired_probe="linearised": the current batch's per-image gradients and losses at the current
        # weights, for the step's real predictor update; None once it is taken (or the weights moved).
        self._batch_gradients: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None
        self._batch_indices = np.zeros(self.batch_size, dtype=np.int64)
        self._batch_valid = np.ones(self.batch_size, dtype=bool)
        self._validation_order = np.arange(self._validation_size)
        self._validation_losses: np.ndarray | None = None
        self._last_action: np.ndarray | None = None
        self._last_selection: np.ndarray | None = None
        self._needs_reset = True

    # ------------------------------------------------------------- properties
    @property
    def uses_validation_phase(self) -> bool:
        """Whether episodes have validation steps (the rewards that need validation scores)."""
        return has_validation_phase(self.reward_name)

    @property
    def selection_reports_action_draws(self) -> bool:
        """Whether ``info["selection"]`` on training steps holds draws from the action itself.

        False only with ``training_selection_rate`` and the weighted or
        selective reward, whose training steps report the draws at the shifted
        rate that the predictor trains on.  With the paired fixed reward the
        probes credit the action's draws, so those are reported, and the
        images the predictor's real step takes are ``info["training_selection"]``.
        """
        return self.training_selection_rate is None or self.reward_baseline == "paired"

    @property
    def validation_steps(self) -> int:
        """Validation steps per episode (0 for the ``fixed`` reward)."""
        return validation_steps_of(self.reward_name, self._validation_size, self.validation_batch_size)

    @property
    def episode_length(self) -> int:
        return self.train_steps + self.validation_steps

    @property
    def phase(self) -> str:
        """``"train"`` or ``"validation"``: the phase of the *current* observation."""
        return self._phase

    # ------------------------------------------------------------ predictor
    def _build_predictor(self) -> None:
        seed = int(self.np_random.integers(2**31 - 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            predictor = self.task.build_predictor(self.train_set)
        self.predictor = predictor.to(self.device)
        self.optimizer = torch.optim.Adam(self.predictor.parameters(), lr=self.predictor_lr)
        self._predictor_updates = 0
        self.averaged_predictor = weight_average_of(self.predictor) if self.predictor_average > 0 else None

    @property
    def evaluated_predictor(self) -> torch.nn.Module | None:
        """The network whose outputs count: the rewards', ``evaluate()``'s and ``predictor_outputs()``'s.

        The weight average when ``predictor_average > 0``, else the trained predictor itself.
        """
        return self.averaged_predictor if self.averaged_predictor is not None else self.predictor

    def _train_predictor(self, indices: np.ndarray, batch_positions: np.ndarray | None = None) -> float:
        """One optimiser step on the training images ``indices``; returns the mean loss.

        ``batch_positions`` (a mask over the current batch, whose images ``indices`` are): where the
        ``"linearised"`` probes of this step already took each batch image's gradient at the current
        weights, the step's gradient is their mean over those images, with no forward or backward pass
        of its own (the same gradient to float rounding; ``docs/performance.md`` has what it saves).
        """
        assert self.predictor is not None and self.optimizer is not None
        self.predictor.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self._batch_gradients is not None and batch_positions is not None and not self.predictor_augment:
            gradients, losses = self._batch_gradients  # step() drops them after this step
            chosen = torch.as_tensor(batch_positions, device=self.device)
            for name, parameter in self.predictor.named_parameters():
                if name in gradients:
                    parameter.grad = torch.empty_like(parameter).copy_(gradients[name][chosen].mean(0))
            loss = losses[chosen].mean()
        else:
            idx = torch.as_tensor(indices, device=self.device)
            images, targets = to_float(self._train_images_t[idx]), self._train_targets_t[idx]
            if self.predictor_augment:
                images, targets = random_shift(images, targets, self._torch_generator, max(1, min(images.shape[-2:]) // 16))
            outputs = self.predictor(images)
            loss = self.task.per_sample_loss(outputs, targets).mean()
            loss.backward()
        if self.predictor_max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.predictor.parameters(), self.predictor_max_grad_norm)
        self.optimizer.step()
        self._predictor_updates += 1
        if self.averaged_predictor is not None:
            update_weight_average(self.averaged_predictor, self.predictor, self.predictor_average, self._predictor_updates)
        return float(loss.detach())

    def _probe_step(self, indices: np.ndarray) -> None:
        """One plain gradient step of ``probe_lr`` on the training images ``indices`` (no optimiser state)."""
        idx = torch.as_tensor(indices, device=self.device)
        images, targets = to_float(self._train_images_t[idx]), self._train_targets_t[idx]
        self.predictor.train()
        loss = self.task.per_sample_loss(self.predictor(images), targets).mean()
        parameters = [p for p in self.predictor.parameters() if p.requires_grad]
        gradients = torch.autograd.grad(loss, parameters)
        with torch.no_grad():
            for parameter, gradient in zip(parameters, gradients):
                parameter.sub_(gradient, alpha=self.probe_lr)

    @torch.no_grad()
    def predictor_outputs(self, images: torch.Tensor | np.ndarray, chunk: int = 64) -> torch.Tensor:
        """The task predictor's outputs (logits) for ``(N, C, H, W)`` images, in chunks.

        Those of :attr:`evaluated_predictor`: the weight average when ``predictor_average > 0``.

        Chunks of 64 keep the intermediate tensors in cache: measured on the
        validation pass of the default set, 512-image chunks took 1.8-2.0x longer.
        """
        predictor = self.evaluated_predictor
        if predictor is None:
            raise RuntimeError("the task predictor does not exist before the first reset()")
        predictor.eval()
        return _chunked_outputs(predictor, torch.as_tensor(images, device=self.device), chunk)

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset) -> dict[str, np.ndarray]:
        """Per-sample ``metric``, ``loss`` and ``confidence`` of the current predictor on ``dataset``."""
        outputs = self.predictor_outputs(dataset.images)
        targets = torch.as_tensor(self.task.targets(dataset), device=self.device)
        return {
            "metric": self.task.per_sample_metric(outputs, targets).cpu().numpy(),
            "loss": self.task.per_sample_loss(outputs, targets).cpu().numpy(),
            "confidence": self.task.confidence(outputs).cpu().numpy(),
        }

    @torch.no_grad()
    def _compute_validation_losses(self) -> np.ndarray:
        idx = torch.as_tensor(self._validation_order, device=self.device)
        outputs = self.predictor_outputs(self._validation_images_t[idx])
        targets = self._validation_targets_t[idx]
        if self.reward_metric == "metric":
            values = 1.0 - self.task.per_sample_metric(outputs, targets)
        else:
            values = self.task.per_sample_loss(outputs, targets)
        return values.double().cpu().numpy()

    def _paired_probes(self, draws: np.ndarray) -> tuple[float, np.ndarray]:
        """The rewards of ``reward_baseline="paired"``; returns ``(raw, rewards)``, a reward per draw.

        ``draws`` ``(K, B)``: the step's selection first, then the further
        ones of ``paired_draws``.  For each, from the current weights, one
        plain gradient step of ``probe_lr`` is taken on the selected images
        and the fixed reward measured (``raw``: the first draw's), the
        weights are put back, and the same is done with the images *not*
        selected; its reward is the difference: what a step on this
        selection, rather than on the rest of the batch, does to the clean
        validation loss.  A side with no image takes no step.  The
        predictor's real (Adam) step comes after, in :meth:`step` (on the
        first draw's images, or with ``training_selection_rate`` on the same
        uniforms at the shifted rate; never on the further draws): the
        probes are taken from the weights before it, so the rewards credit
        the draws whatever it trains on.

        The probes are plain gradient steps, not the optimiser's: an Adam
        step is mostly its momentum, scaled by a second moment that the
        batch's gradient norm changes, so comparing two Adam steps rewarded
        the batches whose large gradients shrank a momentum step that
        happened to hurt (on the data of ``tests/test_learning.py`` it drove
        the controller to the inverted ranking, holdout AUROC 0.27 -> 0.01).
        """
        assert self.predictor is not None
        if self.paired_probe != "step":
            values = (self._linear_probe_values if self.paired_probe == "linear" else self._linearised_probe_values)(draws)
            return float(values[0, 0]), values[:, 0] - values[:, 1]
        weights = {k: v.detach().clone() for k, v in self.predictor.state_dict().items()}
        values = np.empty((len(draws), 2))
        for d, drawn in enumerate(draws):
            for j, side in enumerate((drawn, ~drawn)):
                if side.any():
                    self._probe_step(self._batch_indices[side])
                values[d, j] = fixed_reward(self._compute_validation_losses())
                self.predictor.load_state_dict(weights)
        return float(values[0, 0]), values[:, 0] - values[:, 1]

    def _linear_probe_values(self, draws: np.ndarray) -> np.ndarray:
        """``paired_probe="linear"``: the fixed reward after each probe of :meth:`_paired_probes`, to
        first order in ``probe_lr``; ``(K, 2)``, the selection's probe then the rest's.

        A plain step of ``probe_lr`` on images ``S`` moves the weights by
        ``-probe_lr * mean_{i in S} g_i`` (``g_i`` the gradient of image ``i``'s
        training loss), so the fixed reward ``R`` after it is
        ``R - probe_lr * mean_{i in S} c_i`` to first order, with
        ``c_i = grad R . g_i``, the derivative of image ``i``'s loss along
        ``grad R``.  ``grad R`` (one backward pass on the validation images)
        is taken at the first training step of each episode and kept for its
        ``train_steps`` steps; each step then gets every ``c_i`` from two
        forward passes of its batch at the weights moved by ``+-eps grad R``
        (a central difference, ``eps`` 1e-3 of the weights' norm over the
        gradient's), where the probes themselves take ``2 K`` steps and
        ``2 K`` validation passes.  A side with no image takes no step, as in
        the probes.
        """
        from torch.func import functional_call

        assert self.predictor is not None
        predictor = self.predictor
        predictor.train()
        parameters = {name: p for name, p in predictor.named_parameters() if p.requires_grad}
        if self._episode_step == 0 or self._probe_direction is None:
            idx = torch.as_tensor(self._validation_order, device=self.device)
            outputs = _chunked_outputs(predictor, self._validation_images_t[idx])
            reward = -self.task.per_sample_loss(outputs, self._validation_targets_t[idx]).mean()
            self._probe_direction = dict(zip(parameters, torch.autograd.grad(reward, list(parameters.values()))))
            self._probe_start = float(reward.detach())
        direction, start = self._probe_direction, self._probe_start
        values = np.full((len(draws), 2), start)
        with torch.no_grad():
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in direction.values()))
            if not float(norm) > 0.0:  # a flat validation loss: no probe moves it
                return values
            scale = torch.sqrt(sum((p.double() ** 2).sum() for p in parameters.values()))
            eps = float(1e-3 * scale / norm)
            batch = torch.as_tensor(self._batch_indices, device=self.device)
            images, targets = to_float(self._train_images_t[batch]), self._train_targets_t[batch]

            def losses(sign: float) -> torch.Tensor:
                moved = {name: p + sign * eps * direction[name] for name, p in parameters.items()}
                return self.task.per_sample_loss(functional_call(predictor, moved, (images,)), targets).double()

            c = ((losses(1.0) - losses(-1.0)) / (2.0 * eps)).cpu().numpy()
        for d, drawn in enumerate(draws):
            for j, side in enumerate((drawn, ~drawn)):
                if side.any():
                    values[d, j] = start - self.probe_lr * float(c[side].mean())
        return values

    def _linearised_probe_values(self, draws: np.ndarray) -> np.ndarray:
        """``paired_probe="linearised"``: the fixed reward after each probe of :meth:`_paired_probes`,
        with the predictor's outputs on the validation images to first order in the probe's step and the
        loss on them exact; ``(K, 2)``, the selection's probe then the rest's.

        A plain step of ``probe_lr`` on images ``S`` moves the weights by
        ``d = -probe_lr * mean_{i in S} g_i`` (``g_i`` the gradient of image
        ``i``'s training loss), and validation image ``v``'s outputs by
        ``J_v d`` to first order (``J_v`` their Jacobian in the weights).  The
        reward is ``-mean_v loss(z_v + J_v d, y_v)`` with the loss itself
        exact: what ``"linear"`` drops, the curvature of the loss in the
        outputs, is what penalises the steps on images whose large gradients
        overshoot (``docs/design-decisions.md``).  ``z_v`` and ``J_v`` are taken
        once per episode at its first training step (a backward pass per
        output and validation image, from the weights kept in
        :meth:`state_dict`); each step then takes the per-image gradients of
        its batch (one vectorised backward pass) and gets every probe from
        ``J_v g_i``.  The outputs are the logits less the last one, which is
        all the cross-entropy sees (it does not change when every logit moves
        by the same amount), so the Jacobian holds validation images x (classes
        - 1) x weights numbers (5.2 M, 21 MB, on the built-in set): the option
        is for a classifier, whose outputs per image are few.
        """
        from torch.func import functional_call, grad_and_value, jacrev, vmap

        assert self.predictor is not None
        predictor = self.predictor
        predictor.train()
        parameters = {name: p.detach() for name, p in predictor.named_parameters() if p.requires_grad}
        buffers = dict(predictor.named_buffers())

        def outputs(weights: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
            return functional_call(predictor, (weights, buffers), (image.unsqueeze(0),)).squeeze(0)

        def margins(weights: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
            # The logits less the last one: the cross-entropy does not change when every logit moves by the
            # same amount, so these C - 1 outputs (not C) are all the loss sees.
            logits = outputs(weights, image)
            return logits[:-1] - logits[-1]

        if self._episode_step == 0 or self._probe_anchor is None:
            self._probe_anchor = {name: p.clone() for name, p in parameters.items()}
            self._probe_model = None
        idx = torch.as_tensor(self._validation_order, device=self.device)
        if self._probe_model is None:
            images = to_float(self._validation_images_t[idx])
            anchor = self._probe_anchor
            with torch.no_grad():
                z = _chunked_outputs(lambda x: functional_call(predictor, (anchor, buffers), (x,)), images)
                z = z[:, :-1] - z[:, -1:]
            jacobian = vmap(jacrev(margins), in_dims=(None, 0))(anchor, images)
            self._probe_model = (z, {name: j.detach().flatten(2) for name, j in jacobian.items()})
        z, jacobian = self._probe_model
        targets = self._validation_targets_t[idx]
        batch = torch.as_tensor(self._batch_indices, device=self.device)
        images, batch_targets = to_float(self._train_images_t[batch]), self._train_targets_t[batch]

        def image_loss(weights: dict[str, torch.Tensor], image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.task.per_sample_loss(outputs(weights, image).unsqueeze(0), target.unsqueeze(0))[0]

        gradients, losses = vmap(grad_and_value(image_loss), in_dims=(None, 0, 0))(parameters, images, batch_targets)
        # Each batch image's gradient at the current weights: the predictor's real step of this env step
        # takes its gradient from them (_train_predictor), when it comes next and nothing moved the weights.
        self._batch_gradients = (gradients, losses.detach())
        with torch.no_grad():
            # moved[v, o, i] = J_v g_i: how validation image v's output o changes along image i's loss gradient.
            moved = sum(torch.einsum("vop,ip->voi", jacobian[name], g.flatten(1)) for name, g in gradients.items())
            sides = torch.as_tensor(np.concatenate([draws, ~draws]), device=self.device, dtype=z.dtype)  # (2K, B)
            counts = sides.sum(1, keepdim=True)
            steps = sides / counts.clamp(min=1.0)  # a side with no image takes no step
            shifted = z.unsqueeze(0) - self.probe_lr * torch.einsum("voi,si->svo", moved, steps)  # (2K, V, C - 1)
            logits = torch.cat([shifted, torch.zeros_like(shifted[..., :1])], dim=-1)  # the last logit at 0
            losses = self.task.per_sample_loss(logits.flatten(0, 1), targets.repeat(len(steps)))
            values = -losses.double().reshape(len(steps), -1).mean(1).cpu().numpy()
        return np.stack([values[: len(draws)], values[len(draws) :]], axis=1)

    # ---------------------------------------------------------- warm-up cache
    def _warmup_key(self, np_state: dict[str, Any], torch_state: torch.Tensor) -> str:
        """What the warm-up's result depends on, hashed: the generators' states before the predictor was
        built, the freshly built predictor (its architecture and initial weights), the training images and
        targets, the warm-up's settings, the source files that define it, and the versions and thread count
        that could change its arithmetic."""
        import iqa_env

        if self._training_digest is None:
            data = hashlib.sha256(self._train_images.tobytes())
            data.update(np.ascontiguousarray(self._train_targets_t.cpu().numpy()).tobytes())
            self._training_digest = data.digest()
        fields = {
            "format": WARMUP_FORMAT,
            "package": iqa_env.__version__,
            "code": self._code_digest(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "device": self.device.type,
            "threads": torch.get_num_threads(),
            "task": self.task.name,
            "predictor": type(self.predictor).__name__,
            "batch_size": self.batch_size,
            "steps": self.predictor_warmup_steps,
            "predictor_lr": self.predictor_lr,
            **({"predictor_max_grad_norm": self.predictor_max_grad_norm} if self.predictor_max_grad_norm is not None else {}),
            "predictor_augment": self.predictor_augment,
            "predictor_average": self.predictor_average,
            "np_random": np_state,
        }
        key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
        key.update(self._training_digest)
        key.update(torch_state.numpy().tobytes())
        assert self.predictor is not None
        for name, tensor in self.predictor.state_dict().items():
            key.update(name.encode())
            key.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return key.hexdigest()[:40]

    def _code_digest(self) -> str:
        """A hash of the source files that define the warm-up: the env's, the task's, and those of every
        module the predictor is built from (torch's own are covered by its version).  An edit to any of
        them gives another key, so a kept warm-up is never loaded into code that would train otherwise."""
        import sys

        assert self.predictor is not None
        names = {type(self).__module__, type(self.task).__module__}
        names |= {type(m).__module__ for m in self.predictor.modules()}
        digest = hashlib.sha256()
        for name in sorted(n for n in names if n.split(".")[0] != "torch"):
            digest.update(name.encode())
            path = getattr(sys.modules.get(name), "__file__", None)
            try:
                digest.update(Path(path).read_bytes())
            except (OSError, TypeError):  # no file to read (a module made at run time): its name only
                pass
        return digest.hexdigest()

    def _warmup_path(self, key: str) -> Path:
        assert self.warmup_cache is not None
        return self.warmup_cache / f"warmup-{self.predictor_warmup_steps}-{key}.pt"

    def _save_warmup(self, key: str) -> None:
        """Keep the predictor, its optimiser and the generators as the warm-up left them (written atomically)."""
        from iqa_env.files import atomic_write, not_a_folder_hint

        state = self.state_dict()
        payload = {"format": WARMUP_FORMAT, "key": key, **{name: state[name] for name in PREDICTOR_STATE}}
        path = self._warmup_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(payload, tmp))
        except OSError as e:
            # The warm-up is done; only its reuse by later envs is lost.
            logger.warning("could not keep the predictor warm-up in %s (%s%s); later envs will warm up again", path, e, not_a_folder_hint(path))

    def _load_warmup(self, key: str) -> bool:
        """Put the env in the state a kept warm-up left; False (after a warning where a file was there but
        could not be used) when there is none, and the caller warms up (and writes the file again)."""
        path = self._warmup_path(key)
        if not path.is_file():
            return False
        state = self.state_dict()
        before = {name: state[name] for name in PREDICTOR_STATE}  # the fresh predictor, the generators
        try:
            payload = torch.load(path, map_location=self.device, weights_only=True)
            if not isinstance(payload, dict) or payload.get("format") != WARMUP_FORMAT or payload.get("key") != key:
                raise ValueError(f"not a warm-up of format {WARMUP_FORMAT} with key {key}")
            missing = [name for name in PREDICTOR_STATE if name not in payload]
            if missing:
                raise ValueError(f"it lacks {missing}")
            self._load_predictor_and_generators(payload)
        except Exception as e:  # a truncated or foreign file: warm up again, as if it were not there
            logger.warning("the kept predictor warm-up %s could not be read (%s); warming up again", path, e)
            self._load_predictor_and_generators(before)  # undo whatever a half-done load changed
            return False
        logger.info("predictor warm-up of %d updates loaded from %s", self.predictor_warmup_steps, path)
        return True

    # ---------------------------------------------------------------- batches
    def _draw_train_batch(self) -> None:
        self._batch_indices = self.np_random.choice(len(self.train_set), self.batch_size, replace=False)
        self._batch_valid = np.ones(self.batch_size, dtype=bool)

    def _validation_positions(self, k: int) -> np.ndarray:
        """Positions in the validation order of validation step ``k``'s observation, ``(batch_size,)``."""
        return k * self.validation_batch_size + np.arange(self.batch_size)

    def _set_validation_batch(self, k: int) -> None:
        positions = self._validation_positions(k)
        self._batch_valid = (np.arange(self.batch_size) < self.validation_batch_size) & (
            positions < self._validation_size
        )
        self._batch_indices = self._validation_order[positions % self._validation_size]

    def _observation(self) -> np.ndarray:
        source = self._train_images if self._phase == "train" else self._validation_images
        return source[self._batch_indices]

    def _batch_classes(self) -> np.ndarray:
        """Class labels of the images of the current observation, ``(B,)`` int64."""
        source = self.train_set if self._phase == "train" else self.validation_set
        return np.asarray(source.labels[self._batch_indices], dtype=np.int64)

    # -------------------------------------------------------------- gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"reinitialise_predictor"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected 'reinitialise_predictor'")
        seeded = seed is not None
        self._batch_gradients = None
        if seeded:
            self._torch_generator.manual_seed(int(self.np_random.integers(2**63 - 1)))
            self.baseline.reset()
            self.class_correction.reset()
        if seeded or self.validation_refresh:
            order = self.np_random.permutation(len(self.validation_set))[: self._validation_size]
            self._validation_order = np.sort(order) if not self.validation_refresh else order
        fresh = (
            self.predictor is None
            or bool(options.get("reinitialise_predictor", False))
            or (seeded and self.reinitialise_predictor_on_seed)
        )
        if fresh:
            cached = self.warmup_cache is not None and self.predictor_warmup_steps > 0
            start = (self.np_random.bit_generator.state, self._torch_generator.get_state()) if cached else None
            self._build_predictor()
            key = self._warmup_key(*start) if start is not None else None
            if key is None or not self._load_warmup(key):
                for _ in range(self.predictor_warmup_steps):
                    self._draw_train_batch()
                    self._train_predictor(self._batch_indices)
                if key is not None:
                    self._save_warmup(key)
        self._phase = "train"
        self._episode_step = 0
        self._last_action = None
        self._last_selection = None
        self._draw_train_batch()
        self._needs_reset = False
        return self._observation(), self._info()

    def _check_action(self, action: Any) -> np.ndarray:
        try:
            p = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"action must be {self.batch_size} selection probabilities, got {type(action).__name__}"
            ) from e
        if p.shape != (self.batch_size,):
            raise ValueError(
                f"action must have shape ({self.batch_size},) (one selection probability per image), "
                f"got shape {p.shape}"
            )
        if not np.all(np.isfinite(p)):
            raise ValueError(
                f"action contains NaN or infinite values at positions {np.flatnonzero(~np.isfinite(p)).tolist()}; "
                "expected probabilities in [0, 1]"
            )
        return np.clip(p, 0.0, 1.0)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("call reset() before step(), and again after an episode has ended")
        p = self._check_action(action)
        classes = self._batch_classes()
        drawn = p
        if self._phase == "train" and self.training_selection_rate is not None:
            drawn = shift_to_mean(p, self.training_selection_rate)
        uniform = self.np_random.random(self.batch_size)
        selection = uniform < (p if self.selection_reports_action_draws else drawn)
        # The images the predictor's real step takes.  With the paired fixed reward and a training rate, the
        # same uniforms at the shifted probabilities: the action's draw and more (a rate above the action's mean).
        trained = uniform < drawn
        self._last_action, self._last_selection = p, selection
        valid = self._batch_valid
        action_phase = self._phase
        reward, raw, reward_ready = 0.0, 0.0, False
        image_rewards: np.ndarray | None = None
        terminated = False

        extra_selections: np.ndarray | None = None
        if self._phase == "train":
            if self.reward_baseline == "paired":
                draws = selection[None]
                if self.paired_draws > 1:
                    extra_selections = self.np_random.random((self.paired_draws - 1, self.batch_size)) < p
                    draws = np.concatenate([draws, extra_selections])
                raw, paired = self._paired_probes(draws)
                if self.paired_class_correction:
                    contrasts = [class_mix_contrast(d, classes, self.class_correction.num_classes) for d in draws]
                    if self.paired_class_correction == "step":
                        paired = self.class_correction.correct_step(paired, contrasts)
                    else:
                        for d, contrast in enumerate(contrasts):
                            paired[d] = self.class_correction.correct(float(paired[d]), contrast)
                reward, extra_rewards = float(paired[0]), paired[1:]
                reward_ready = True
            if trained.any():  # the predictor's real step (after the paired probes, which start from its weights)
                self._train_predictor(self._batch_indices[trained], batch_positions=trained)
            self._batch_gradients = None
            self._episode_step += 1
            if self._episode_step < self.train_steps:
                self._draw_train_batch()
            elif self.uses_validation_phase:
                self._validation_losses = self._compute_validation_losses()
                if self.reward_normalisation == "class_log":
                    validation_classes = self.validation_set.labels[self._validation_order]
                    self._validation_losses = class_log_losses(self._validation_losses, validation_classes)
                self._phase = "validation"
                self._set_validation_batch(0)
            elif self.reward_baseline == "paired":
                terminated = True
            else:
                raw = fixed_reward(self._compute_validation_losses())
                reward = raw if self.reward_baseline == "none" else self.baseline.update(raw)
                reward_ready, terminated = True, True
        else:
            k = self._episode_step - self.train_steps
            assert self._validation_losses is not None
            positions = self._validation_positions(k)[valid]
            losses = self._validation_losses[positions]
            scores, chosen = p[valid], selection[valid]
            drawn = chosen if self.stochastic_validation else None
            raw = validation_reward(self.reward_name, losses, scores, self.rejection_ratio, drawn)
            if self.stochastic_validation:
                # What the step's reward would have been with each image's draw the other way.
                flipped = leave_one_out_rewards(self.reward_name, losses, scores, self.rejection_ratio, chosen)
            if self.reward_baseline == "non_selective":
                # Zero-lag control variate: the same batch's reward without any selection.
                reward = raw - fixed_reward(losses)
                if self.stochastic_validation:
                    flipped = flipped - fixed_reward(losses)
            elif self.reward_baseline == "none":
                reward = raw
            else:
                if self.stochastic_validation:
                    flipped = self.baseline.would_give(flipped, key=k)
                reward = self.baseline.update(raw, key=k)
            if self.stochastic_validation:
                image_rewards = np.full((self.batch_size, 2), reward)
                image_rewards[valid] = flipped
            reward_ready = True
            self._episode_step += 1
            if k + 1 < self.validation_steps:
                self._set_validation_batch(k + 1)
            else:
                terminated = True

        mean_p = float(p[valid].mean())
        lo, hi = self.mean_selection_bounds
        penalty = self.mean_selection_penalty * (max(0.0, lo - mean_p) + max(0.0, mean_p - hi))
        reward -= penalty
        info = self._info()
        info.update(
            action_phase=action_phase,
            reward_ready=reward_ready,
            reward_scope="step" if action_phase == "validation" or self.reward_baseline == "paired" else "episode",
            raw_reward=float(raw),
            baseline=float(raw - (reward + penalty)) if reward_ready else 0.0,
            penalty=float(penalty),
            selection=selection,
            rewarded_action=(
                "probabilities" if action_phase == "validation" and not self.stochastic_validation else "selection"
            ),
            valid=valid,
            classes=classes,
            num_selected=int(selection[valid].sum()),
            mean_selection_probability=mean_p,
        )
        if action_phase == "train" and self.training_selection_rate is not None and self.reward_baseline == "paired":
            info.update(training_selection=trained)
        if extra_selections is not None:
            info.update(extra_selections=extra_selections, extra_rewards=extra_rewards - penalty)
        if image_rewards is not None:
            info.update(image_rewards=image_rewards - penalty)
        self._needs_reset = terminated
        return self._observation(), float(reward), terminated, False, info

    def _info(self) -> dict[str, Any]:
        """What every step and reset reports; ``phase`` is the phase of the returned observation."""
        return {
            "phase": self._phase,
            "episode_step": self._episode_step,
            "batch_indices": self._batch_indices.copy(),
        }

    # -------------------------------------------------------------- render
    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        from iqa_env.render import selection_grid

        return selection_grid(self._observation(), self._last_action, self._last_selection, self._batch_valid)

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The env's whole mutable state, to resume a run exactly where it stopped.

        The task predictor's weights and optimiser state, the env's numpy and
        torch generators, every moving-average reward baseline, the class
        correction's fit (``paired_class_correction``), and the
        position in the episode (phase, step, current batch, validation order
        and losses, whether a reset is due).  Not the data or the settings:
        load it into an env built with the same arguments.  It holds tensors
        and plain Python values only, so ``torch.save`` writes it and
        ``torch.load(path, weights_only=True)`` reads it back without
        unpickling arbitrary objects.
        """
        import copy

        from iqa_env.rewards import MovingAverageBaseline

        def tensor(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.array(a, copy=True))

        def to_cpu(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.detach().cpu().clone()
            if isinstance(value, dict):
                return {k: to_cpu(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(to_cpu(v) for v in value)
            return copy.deepcopy(value)

        rng = self._np_random
        return {
            "format_version": 2,
            "settings": self._state_settings(),
            "np_random": None if rng is None else copy.deepcopy(rng.bit_generator.state),
            "np_random_seed": getattr(self, "_np_random_seed", None),
            "torch_generator": self._torch_generator.get_state().clone(),
            "predictor": None if self.predictor is None else to_cpu(self.predictor.state_dict()),
            "averaged_predictor": (
                None if self.averaged_predictor is None else to_cpu(self.averaged_predictor.state_dict())
            ),
            "predictor_updates": int(self._predictor_updates),
            "optimizer": None if self.optimizer is None else to_cpu(self.optimizer.state_dict()),
            "baselines": {
                name: {"decay": float(b.decay), "values": {int(k): float(v) for k, v in b.values.items()}}
                for name, b in vars(self).items()
                if isinstance(b, MovingAverageBaseline)
            },
            "class_correction": self.class_correction.state_dict(),
            "phase": self._phase,
            "episode_step": int(self._episode_step),
            "needs_reset": bool(self._needs_reset),
            "batch_indices": tensor(self._batch_indices),
            "batch_valid": tensor(self._batch_valid),
            "validation_order": tensor(self._validation_order),
            "validation_losses": tensor(self._validation_losses),
            "last_action": tensor(self._last_action),
            "last_selection": tensor(self._last_selection),
            "probe_direction": None if self._probe_direction is None else to_cpu(self._probe_direction),
            "probe_start": float(self._probe_start),
            "probe_anchor": None if self._probe_anchor is None else to_cpu(self._probe_anchor),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from an env built with the same arguments.

        The next ``step()`` (or ``reset()``) then does exactly what it would
        have done in the env the state was taken from.  A state from an env
        with other data sizes or settings raises ``ValueError``.
        """
        from iqa_env.rewards import MovingAverageBaseline

        if not isinstance(state, dict) or "format_version" not in state:
            raise ValueError("not a TaskAmenabilityEnv state (expected a dict from state_dict() with format_version 2)")
        if state["format_version"] != 2:
            raise ValueError(
                f"the env state has format_version {state['format_version']!r}, written by another release; "
                "this release reads format_version 2 (it also holds the predictor's weight average): "
                "start the run again"
            )
        # States written before a setting existed had its default.
        saved = {
            "reward_normalisation": "none",
            "paired_class_correction": False,
            "paired_draws": 1,
            **state.get("settings", {}),
        }
        if saved["paired_class_correction"] is True:  # states written before "step" existed
            saved["paired_class_correction"] = "history"
        mine = self._state_settings()
        differ = [f"{k}: saved {saved.get(k)!r}, this env {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if differ:
            raise ValueError(
                "the env state was taken from an env with other settings or data (" + "; ".join(differ) + "); "
                "build the env with the same arguments as the one that wrote it"
            )

        def array(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.detach().cpu().numpy().copy()

        self._load_predictor_and_generators(state)
        for name, saved_baseline in state["baselines"].items():
            baseline = getattr(self, name, None)
            if not isinstance(baseline, MovingAverageBaseline):
                raise ValueError(f"the env state has a reward baseline {name!r} that this env does not have")
            baseline.decay = float(saved_baseline["decay"])
            baseline.values = {int(k): float(v) for k, v in saved_baseline["values"].items()}
        if "class_correction" in state:  # states written before the correction existed had none
            self.class_correction.load_state_dict(state["class_correction"])
        else:
            self.class_correction.reset()
        self._phase = str(state["phase"])
        self._episode_step = int(state["episode_step"])
        self._needs_reset = bool(state["needs_reset"])
        self._batch_indices = array(state["batch_indices"])
        self._batch_valid = array(state["batch_valid"])
        self._validation_order = array(state["validation_order"])
        self._validation_losses = array(state["validation_losses"])
        self._last_action = array(state["last_action"])
        self._last_selection = array(state["last_selection"])
        # States written before paired_probe="linear" existed had no kept direction.
        direction = state.get("probe_direction")
        self._probe_direction = None if direction is None else {k: v.to(self.device) for k, v in direction.items()}
        self._probe_start = float(state.get("probe_start", 0.0))
        anchor = state.get("probe_anchor")  # paired_probe="linearised"; its model is derived from it again
        self._probe_anchor = None if anchor is None else {k: v.to(self.device) for k, v in anchor.items()}
        self._probe_model = None
        self._batch_gradients = None

    def _load_predictor_and_generators(self, state: dict[str, Any]) -> None:
        """The :data:`PREDICTOR_STATE` part of a :meth:`state_dict`: what :meth:`load_state_dict` and a kept
        warm-up (``warmup_cache``) restore."""
        import copy

        if state["predictor"] is None:
            self.predictor, self.optimizer = None, None
        else:
            if self.predictor is None:
                self._build_predictor()  # the architecture; its weights and the generators are overwritten below
            assert self.predictor is not None and self.optimizer is not None
            self.predictor.load_state_dict(state["predictor"])
            if self.averaged_predictor is not None:
                self.averaged_predictor.load_state_dict(state["averaged_predictor"])
            self._predictor_updates = int(state["predictor_updates"])
            # A copy: the optimiser keeps the given tensors as its state and updates them in place.
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if state["np_random"] is None:
            self._np_random = None
        else:
            bit_generator = getattr(np.random, state["np_random"]["bit_generator"])()
            bit_generator.state = state["np_random"]
            self._np_random = np.random.Generator(bit_generator)
        if hasattr(self, "_np_random_seed"):
            self._np_random_seed = state["np_random_seed"]
        self._torch_generator.set_state(state["torch_generator"])

    def _state_settings(self) -> dict[str, Any]:
        """What a :meth:`state_dict` must agree on with the env that loads it."""
        return {
            "task": self.task.name,
            "reward": self.reward_name,
            "batch_size": self.batch_size,
            "train_steps": self.train_steps,
            "validation_size": self._validation_size,
            "train_images": len(self.train_set),
            "validation_images": len(self.validation_set),
            "image_shape": [int(s) for s in self.train_set.image_shape],
            "predictor_average": self.predictor_average,
            "reward_normalisation": self.reward_normalisation,
            "paired_class_correction": self.paired_class_correction,
            "paired_draws": self.paired_draws,
            **({"paired_probe": self.paired_probe} if self.paired_probe != "step" else {}),
            # Only where it is set, so that the states of envs made before the option still load.
            **({"validation_batch_size": self.validation_batch_size} if self.validation_batch_size != self.batch_size else {}),
            **({"predictor_max_grad_norm": self.predictor_max_grad_norm} if self.predictor_max_grad_norm is not None else {}),
        }
