"""``make_agent(name, env)``: any supported algorithm, with per-sample policies and sensible defaults."""

from __future__ import annotations

import copy
import inspect
import sys
from types import SimpleNamespace
from typing import Any

from stable_baselines3 import A2C, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.logger import HumanOutputFormat, Logger
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.utils import LinearSchedule

from agents.buffers import RewardReadyIndexReplayBuffer, RewardReadyReplayBuffer
from agents.deterministic import DDPG, TD3
from agents.index_buffer import IndexReplayBuffer, index_buffer_kwargs
from agents.noise import ProbabilityOUNoise
from agents.policies import PerSampleActorCriticPolicy, PerSampleExtractor, PerSampleSACPolicy, PerSampleTD3Policy
from agents.reinforce import REINFORCE, env_attr
from agents.settings import accepted_names, check_names, check_setting, check_settings
from iqa_env.checks import is_positive_number
from iqa_env.env import resolve_device
from iqa_env.rewards import has_validation_phase
from iqa_env.tasks import TASK_NAMES

ALGORITHMS: tuple[str, ...] = ("ddpg", "reinforce", "ppo", "a2c", "sac", "td3")


def _episode_length(env: GymEnv) -> int:
    return int(env_attr(env, "episode_length", 32))


#: What the weighted and selective rewards (an env with validation steps) change in
#: :func:`default_kwargs`, per algorithm (JSON-plain, so that ``iqa reproduce`` can tell a
#: finished stage made under other defaults).  ``docs/learning-status.md`` has the measurements:
#:
#: - DDPG and TD3: the *validation bandit* (``gamma = 0``, a replay buffer of the steps that
#:   return a reward, the critic head with the weighted reward's form on embeddings standardised
#:   across the batch (not with the selective reward: :data:`REWARD_DEFAULTS`), batch-centred actor
#:   logits and a saturation penalty of 0.1 on them), sections 3, 1, 20 and 22;
#: - REINFORCE: a selection rate of 30 % and a weight average of the policy (section 7), a
#:   penalty on the class separation of its scores (``class_balance``, section 9), and each
#:   validation image's own leave-one-out baseline (``image_baseline``, sections 50-51; not on an
#:   env that rewards the scores themselves, ``stochastic_validation=False``, which has no draws).
VALIDATION_REWARD_DEFAULTS: dict[str, dict[str, Any]] = {
    **{
        name: {
            "gamma": 0.0,
            "batch_size": 16,
            "gradient_steps": 4,
            "replay_buffer_class": "reward_ready",
            "policy_kwargs": {
                "critic_head": "ratio",
                "critic_standardise": True,
                "centre_logits": True,
                "saturation_penalty": 0.1,
            },
        }
        for name in ("ddpg", "td3")
    },
    "reinforce": {
        "controller_average": 0.97,
        "class_balance": 1.0,
        "image_baseline": "leave_one_out",
        "policy_kwargs": {"initial_selection_probability": 0.3},
    },
}

#: What one reward changes on top of :data:`VALIDATION_REWARD_DEFAULTS`, per reward and
#: algorithm.  With the selective reward DDPG and TD3 keep the ratio critic's plain embeddings:
#: with them standardised, 8 seeds of DDPG ended at 0.584 +- 0.063 after about 500 env steps on an
#: H200, and with the plain ones at 0.691 +- 0.108 on the same kind of GPU, 7 of 8 seeds higher
#: (+0.107 +- 0.060 seed for seed; the eighth stalled); a paired check on the CPU was level at
#: 128-150 env steps (``docs/learning-status.md``, sections 22 and 26).
REWARD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "selective": {name: {"policy_kwargs": {"critic_standardise": False}} for name in ("ddpg", "td3")},
}

#: What DDPG changes in :func:`default_kwargs` on an env whose fixed reward rewards each training step
#: against a step on the rest of its batch (``reward_baseline="paired"``, what
#: :func:`recommended_env_kwargs` gives DDPG with the fixed reward): every step returns its own
#: reward, so the critic is a bandit as with the validation rewards (``gamma = 0``), fitted on the
#: env's Bernoulli draws rather than the probabilities (``store_selections``), with the weighted
#: reward's critic head on standardised embeddings, centred logits and the saturation penalty.  8
#: seeds on the built-in set: holdout AUROC 0.508 +- 0.104 at initialisation -> 0.723 +- 0.089 after
#: 400 env steps, higher on 8 of 8 (sign test p 0.0078); the paper's form of the fixed reward did
#: not learn (``docs/learning-status.md``, sections 10 and 31-36).
PAIRED_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddpg": {
        "gamma": 0.0,
        "gradient_steps": 1,
        "store_selections": True,
        "policy_kwargs": {
            "critic_head": "ratio",
            "critic_standardise": True,
            "centre_logits": True,
            "saturation_penalty": 0.1,
        },
    },
    # The class separation of its scores penalised, as with the validation rewards: the step fit removes
    # the class term from the rewards, so nothing else holds the classes' score levels together, and 4
    # seeds of the quick run drifted apart (between-class share of the scores' variance 0.17-0.31), which
    # starved the co-trained predictor of a class: at 5 % rejection 0.815 +- 0.018 with the penalty against
    # 0.762 +- 0.038 without (baseline 0.856), holdout AUROC 0.728 +- 0.055 against 0.758 +- 0.072
    # (``docs/learning-status.md``, section 53).  And it exports a weight average of its policy, as with the
    # validation rewards: the policy that acts is the same, so each seed's run is the same and only the kept
    # controller differs.  8 seeds of the quick run: 0.772 +- 0.087 against 0.729 +- 0.074 for the last policy,
    # higher on 8 of 8 (sign test p 0.0078); at 3,000 env steps (8 seeds) 0.805 +- 0.049 against 0.758 +- 0.100.
    # What it costs: the baseline predictor on what it keeps at 5 % beats no rejection with p < 0.05 on 1 of 8
    # seeds against 5 of 8 (0.861 against 0.864 on average; from 15 % on it is as good or better), section 56.
    "reinforce": {"class_balance": 1.0, "controller_average": 0.97},
}

#: What one task changes on top of :data:`PAIRED_DEFAULTS`, per task and algorithm.  REINFORCE in segmentation:
#: a smaller learning rate, and returns divided by their own running scale from the first gradient step
#: (``return_scale_prior=None``).  There the fixed reward's returns are about a quarter of the scale the running
#: normaliser starts from (1.0), so with the default its steps grew 2.4 times over a quick run, and its
#: controllers rose to about 0.7 by 900 env steps and fell back.  8 seeds of the quick segmentation run:
#: holdout AUROC 0.687 +- 0.057 against 0.611 +- 0.076, higher on 7 of 8 (paired p 0.012), 5 of 8 above every
#: heuristic against 3; the smaller rate alone 0.652 +- 0.047.  In classification the same pair was level on 8 seeds
#: (0.751 against 0.734, higher on 5 of 8, p 0.40; the co-trained classifiers 0.003 lower on 7 of 8): not there
#: (``docs/learning-status.md``, sections 72 and 74).
PAIRED_TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "segmentation": {"reinforce": {"learning_rate": 2.5e-4, "return_scale_prior": None}},
}

#: Predictor warm-up of REINFORCE's env with the weighted and selective rewards (every other: 400).  Its
#: leave-one-out image baselines teach the controller the co-trained predictor's per-image losses within
#: about 1,000 env steps, so the predictor they learn from should already be a good one: on the built-in
#: set (4 seeds, ``iqa reproduce --quick``) 0.863 and 0.863 against 0.847 and 0.842 with 400, and on
#: corrupted Fashion-MNIST 0.894 and 0.899 against 0.750 and 0.724 (``docs/learning-status.md``, section 51).
REINFORCE_WARMUP_STEPS = 2000

#: The share of each training batch that REINFORCE's env trains the co-trained predictor on, per task, with
#: the weighted and selective rewards (``TaskAmenabilityEnv(training_selection_rate=...)``; REINFORCE then
#: credits its validation steps only, :func:`default_kwargs`).  The controller's scores keep the selection
#: rate of 0.3 that teaches it best (:data:`VALIDATION_REWARD_DEFAULTS`); the predictor trains on this share
#: of each batch, drawn in the order of those scores.
#:
#: - classification, 0.8: ``iqa reproduce --quick``, 8 seeds on the built-in set: the co-trained predictors
#:   at 5 % rejection 0.844 and 0.846 against 0.829 and 0.824 (higher on 7 and 8 of 8 seeds, paired p 0.018
#:   and 0.0003; the baseline 0.854), the holdout AUROC 0.858 and 0.858 against 0.848 and 0.852 (higher on
#:   6 and 5 of 8); corrupted Fashion-MNIST (4 seeds): 0.847 and 0.847 against 0.833 and 0.833, the AUROC
#:   unchanged (``docs/learning-status.md``, sections 59-60).
#: - segmentation, 0.5: ``iqa reproduce --quick --task segmentation``, 8 seeds, with the gradient clip
#:   (:data:`PREDICTOR_MAX_GRAD_NORM`): the co-trained U-Nets' Dice at 15 % rejection 0.797 and 0.805
#:   against 0.793 and 0.794 (selective: higher on 7 of 8 seeds, paired p 0.003), the holdout AUROC level
#:   (0.810 and 0.822 against 0.812 and 0.821), no collapse in 16 runs; the same 8 seeds on another machine:
#:   +0.016 and +0.012 (higher on 8 and 7 of 8), the AUROC -0.011 (p 0.047) and +0.000, the baseline predictor
#:   on what the controllers keep level (-0.0004 and +0.002); on 12 seeds there: +0.014 and +0.014 (higher
#:   on 11 and 10 of 12), the AUROC -0.008 (p 0.08) and -0.003 (p 0.63), the baseline predictor on what they
#:   keep level.  At 0.8 the ranking lost 0.010 and 0.022 (sections 59, 62, 64, 65 and 66).
REINFORCE_TRAINING_SELECTION_RATES = {"classification": 0.8, "segmentation": 0.5}

#: The same for REINFORCE's paired fixed reward, whose probes and credit keep the action's own draws and whose
#: real training step takes the same uniforms at this rate (``None``: the action's draws).  In classification,
#: 8 seeds of the quick run with the predictor's weight average (section 79): holdout AUROC 0.789 +- 0.064
#: against 0.730 +- 0.097 (higher on 7 of 8, paired p 0.011), the co-trained classifiers at 5 % 0.845 +- 0.011
#: against 0.830 +- 0.007 (8 of 8, p 0.0025; the baseline 0.855).  On corrupted Fashion-MNIST, where no form of
#: the fixed reward learns (section 55), the co-trained classifiers gain too (0.846 against 0.833, 4 of 4) and
#: the controllers end further below chance (0.322 against 0.475, 4 of 4).  In segmentation REINFORCE's fixed-reward
#: action already selects half of each batch (its 50 % with this reward), the weighted and selective rewards' rate
#: there: ``training_selection_rate=0.5`` changed nothing (4 seeds, every figure to the last digit), and 0.8 ranks
#: worse on every one of 8 seeds (0.603 +- 0.078 against 0.687 +- 0.057, paired p 0.010) with the co-trained U-Nets
#: level (0.779 against 0.773, p 0.40; docs/learning-status.md, section 81).
REINFORCE_FIXED_TRAINING_SELECTION_RATES: dict[str, float | None] = {"classification": 0.8, "segmentation": None}

#: The largest gradient norm of a predictor update in every recommended env
#: (``TaskAmenabilityEnv(predictor_max_grad_norm=...)``): a guard against the rare huge gradient of a step
#: on a few selected images.  One such step (norm 170 against a median of 0.8, on 2 images) wrecked the
#: co-trained U-Net of the quick segmentation run's selective seed 1 (holdout Dice 0.456); clipped at 10 the
#: same run ends at 0.759 (the baseline 0.763).  At 10 the clip leaves an ordinary update alone: in the
#: quick classification run the baseline, weighted and selective runs are the same to the last digit (the
#: largest norm of one of them 5.4 in 2,504 updates); the fixed reward's, whose co-trained updates are on
#: its own few selections, reach it now and then and move within their seeds' spread
#: (``docs/learning-status.md``, section 63).
PREDICTOR_MAX_GRAD_NORM = 10.0

#: The decay of the predictor's weight average (``predictor_average``) that :func:`recommended_env_kwargs`
#: gives the weighted and selective rewards (their rewards and ``evaluate()`` use it) and REINFORCE's paired
#: fixed reward (``evaluate()`` alone: its probes read the weights themselves).
PREDICTOR_AVERAGE = 0.998

#: Validation images per reward when neither the caller nor :func:`recommended_env_kwargs` says
#: otherwise (``TrainConfig.validation_size="auto"``).
DEFAULT_VALIDATION_SIZE = 256
#: Images per env step when neither the caller nor :func:`recommended_env_kwargs` says otherwise
#: (``TrainConfig.batch_size="auto"``); the env's own default.
DEFAULT_BATCH_SIZE = 32

#: The fixed reward's env in the paper's form (one reward per episode, less its moving average, on
#: :data:`DEFAULT_VALIDATION_SIZE` validation images, from the predictor's weights themselves, trained on the
#: action's draws), where :func:`recommended_env_kwargs` gives DDPG and
#: REINFORCE the paired set-up: pass these as env arguments (``--env-kwargs``) to get it back.
PAPER_FIXED_ENV_KWARGS: dict[str, Any] = dict(
    reward_baseline="moving_average",
    validation_size=DEFAULT_VALIDATION_SIZE,
    paired_draws=1,
    paired_class_correction=False,
    paired_probe="step",
    predictor_average=0.0,
    training_selection_rate=None,
)


#: Replay buffers by name, for ``replay_buffer_class="..."`` (JSON-friendly settings).
REPLAY_BUFFERS: dict[str, type[ReplayBuffer]] = {
    "default": ReplayBuffer,
    "reward_ready": RewardReadyReplayBuffer,
    "index": IndexReplayBuffer,
    "reward_ready_index": RewardReadyIndexReplayBuffer,
}


def default_kwargs(name: str, env: GymEnv, seed: int | None = None) -> dict[str, Any]:
    """The defaults :func:`make_agent` uses for ``name`` (a fresh dict on every call).

    DDPG and TD3 on an env whose reward comes from validation steps (the
    weighted and selective rewards) default to the *validation bandit*
    set-up: ``gamma = 0``, a replay buffer that keeps only the steps that
    return a reward (:class:`~agents.buffers.RewardReadyReplayBuffer`), and
    the critic head that has the weighted reward's form
    (:class:`~agents.policies.RatioQNetwork`) on embeddings standardised
    across the batch's images (``critic_standardise``: without it one seed
    of eight lost every difference between its critic's embeddings within
    the first 32 gradient steps and never learnt; with the selective reward
    the embeddings stay as they are, :data:`REWARD_DEFAULTS`), batch-centred
    actor logits and a saturation penalty of 0.1 on them (1e-3 let the logits
    spread to +-50, where the critic's gradient vanishes and the ranking
    decays).
    With the fixed reward (one reward at the end of the training steps) they
    keep ``gamma = 0.9``, every transition and the pooled critic, except
    DDPG on an env that rewards each training step against a step on the
    rest of its batch (``reward_baseline="paired"``, recommended for DDPG
    with the fixed reward): a bandit again, its critic fitted on the env's
    Bernoulli draws (:data:`PAIRED_DEFAULTS`).  REINFORCE on such an env
    penalises the class separation of its scores (``class_balance=1.0``) and
    exports a weight average of its policy (``controller_average=0.97``); in
    segmentation it also takes smaller steps, on returns divided by their own
    running scale from the first (``learning_rate=2.5e-4``,
    ``return_scale_prior=None``: :data:`PAIRED_TASK_DEFAULTS`).

    REINFORCE with those rewards selects 30 % of each batch
    (``initial_selection_probability=0.3`` of its centred logits) and exports a
    weight average of its policy (``controller_average=0.97``): 8 seeds on the
    built-in set reached holdout AUROC 0.750 +- 0.040 after 2,000 env steps
    against 0.667 +- 0.079 at 50 % without the average, and no seed fell back
    by more than 0.08 between evaluations (before: up to 0.215).  It also
    penalises the class separation of its scores (``class_balance=1.0``):
    8 seeds reached 0.823 +- 0.024 after 5,000 env steps (7 of 8 >= 0.8;
    0.815 +- 0.026 and 5 of 8 when rerun on the channels-last networks,
    which differ only in float rounding) against 0.783 +- 0.044 (4 of 8)
    without it; with the env's new validation subset every episode
    (:func:`recommended_env_kwargs`), 0.832 +- 0.019 (8 of 8).  And it gives
    each validation image the leave-one-out baseline of its own draw
    (``image_baseline="leave_one_out"``, from the env's ``info["image_rewards"]``),
    which teaches it the co-trained predictor's per-image losses several times
    sooner; with the predictor warmed up for 2,000 updates first
    (:func:`recommended_env_kwargs`) those losses are worth learning.
    ``iqa reproduce --quick`` on the built-in set's version 2 (4 seeds) ended
    at 0.863 +- 0.010 and 0.863 +- 0.007 (weighted, selective), 3 of 4 seeds
    each above every heuristic, the predictor's confidence included, against
    0.817 +- 0.034 and 0.815 +- 0.026 with neither; 5,000-step runs at 0.847
    and 0.835 against 0.831 and 0.829; corrupted Fashion-MNIST at 0.894 and
    0.899 against 0.840 and 0.846.  Without the warm-up the image baselines
    drifted below the paper's credit at 5,000 env steps and on Fashion-MNIST
    (``docs/learning-status.md``, sections 50-51).  On an env that draws its
    training selections itself (``training_selection_rate``, which
    :func:`recommended_env_kwargs` sets for REINFORCE in classification) it
    credits the validation steps only (``credit="validation"``): the training
    steps' draws are then not its policy's.  With the
    fixed reward it keeps 50 % and no image baseline (not measured there), and the class
    penalty and the weight average only with ``reward_baseline="paired"`` (:data:`PAIRED_DEFAULTS`).  On
    data where the training selections carry most of the signal (corrupted
    Fashion-MNIST) the rate of 0.3 ranked worse: pass
    ``policy_kwargs=dict(initial_selection_probability=0.5)`` there.
    ``docs/design-decisions.md`` says why.

    The agent's ``device`` is the env's (``TaskAmenabilityEnv(device=...)``),
    not stable-baselines3's ``"auto"``: a CPU env on a machine with a GPU gets
    a CPU controller, and a CUDA env a CUDA one. Pass ``device=`` to
    :func:`make_agent` to put it elsewhere.
    """
    batch = int(env.action_space.shape[0])  # type: ignore[index]
    episode = _episode_length(env)
    bandit = bool(env_attr(env, "uses_validation_phase", False))
    off_policy = dict(buffer_size=5_000, learning_starts=2 * episode, batch_size=16, train_freq=1, gradient_steps=1)
    deterministic = dict(
        learning_rate=1e-3,
        action_noise=ProbabilityOUNoise(batch, sigma=0.2, theta=0.15, seed=seed),
        **off_policy,
    )
    if not bandit:
        deterministic.update(gamma=0.9)
    table: dict[str, dict[str, Any]] = {
        # The paper's DDPG: tau = 0.001, OU noise (0.2, 0.15) in probability units.
        "ddpg": dict(tau=0.001, **deterministic),
        "td3": dict(**copy.deepcopy(deterministic)),
        "sac": dict(learning_rate=1e-3, gamma=0.9, **off_policy),
        "ppo": dict(learning_rate=3e-4, n_steps=max(episode, 16), batch_size=max(episode, 16), n_epochs=4, gamma=0.9),
        "a2c": dict(learning_rate=7e-4, n_steps=max(episode, 16), gamma=0.9),
        "reinforce": dict(learning_rate=1e-3),
    }
    if name not in table:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {name!r}")
    options = table[name]
    if bandit:
        options.update(copy.deepcopy(VALIDATION_REWARD_DEFAULTS.get(name, {})))
        for key, value in REWARD_DEFAULTS.get(env_attr(env, "reward_name", None), {}).get(name, {}).items():
            options[key] = {**options.get(key, {}), **value} if isinstance(value, dict) else value
        if options.get("image_baseline") == "leave_one_out" and not env_attr(env, "stochastic_validation", True):
            options["image_baseline"] = "none"  # the scores themselves are rewarded: no draws to flip
        if name == "reinforce" and env_attr(env, "training_selection_rate", None) is not None:
            options["credit"] = "validation"  # the training steps' draws are the env's, not the policy's
    elif env_attr(env, "reward_baseline", None) == "paired":
        options.update(copy.deepcopy(PAIRED_DEFAULTS.get(name, {})))
        task = getattr(env_attr(env, "task", None), "name", None)
        options.update(copy.deepcopy(PAIRED_TASK_DEFAULTS.get(task, {}).get(name, {})))
    device = env_attr(env, "device", None)
    if device is not None:  # the controller lives where the env's data and predictor do
        options["device"] = device
    return options


def default_settings(
    name: str,
    reward: str,
    batch_size: int,
    episode_length: int,
    reward_baseline: str | None = None,
    stochastic_validation: bool = True,
    training_selection_rate: float | None = None,
    task: str = "classification",
) -> dict[str, Any]:
    """:func:`default_kwargs` for an env of this reward, batch and episode length, with the classes' own defaults.

    What ``make_agent(name, env)`` would use on such an env, without building
    one (``reward_baseline``, ``stochastic_validation``,
    ``training_selection_rate`` and ``task``: the env's): the
    constructor defaults of the algorithm class and of its policy
    class overlaid with :func:`default_kwargs` (logging, seeding and device
    arguments left out; a fresh dict, ``policy_kwargs`` merged).  ``iqa
    reproduce`` records it with every finished stage, so that a stage
    finished by a checkout with other algorithm defaults is not reused.
    """
    shape = SimpleNamespace(
        action_space=SimpleNamespace(shape=(int(batch_size),)),
        episode_length=int(episode_length),
        uses_validation_phase=has_validation_phase(reward),
        reward_name=reward,
        reward_baseline=reward_baseline,
        stochastic_validation=bool(stochastic_validation),
        training_selection_rate=training_selection_rate,
        task=SimpleNamespace(name=task),
    )
    options = default_kwargs(name, shape)  # type: ignore[arg-type]
    defaults = class_defaults(name)
    settings = {**defaults, **options}
    settings["policy_kwargs"] = {**defaults["policy_kwargs"], **(options.get("policy_kwargs") or {})}
    return settings


def class_defaults(name: str) -> dict[str, Any]:
    """The constructor defaults of algorithm ``name``'s class, with its policy class's as ``policy_kwargs``.

    What the classes alone give, before :func:`default_kwargs`; a setting added to a class later keeps the
    behaviour of before at this default, which is how ``iqa reproduce`` reuses stages recorded without it.
    """
    algorithm, policy = _CLASSES[name]
    if isinstance(policy, str):
        policy = algorithm.policy_aliases[policy]
    return {**_constructor_defaults(algorithm), "policy_kwargs": _constructor_defaults(policy)}


def _constructor_defaults(cls: type) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters
    return {
        key: parameter.default
        for key, parameter in parameters.items()
        if parameter.default is not inspect.Parameter.empty and key not in _NOT_SETTINGS
    }


#: Constructor arguments that do not change what an algorithm learns.
_NOT_SETTINGS = frozenset({"tensorboard_log", "verbose", "seed", "device", "_init_setup_model", "stats_window_size"})


def recommended_env_kwargs(name: str, reward: str, task: str = "classification") -> dict[str, Any]:
    """The ``TaskAmenabilityEnv`` settings that algorithm ``name`` learns best with (measured) on ``task``.

    ``docs/learning-status.md`` has the measurements behind each choice:

    - every algorithm: ``reward_metric="loss"`` (the per-sample training loss
      ranks images by amenability far better than the 0/1 error) and 400
      non-selective predictor warm-up steps (a reward measured on an
      untrained predictor says nothing about the images); REINFORCE with the
      weighted and selective rewards, whose leave-one-out image baselines
      learn the predictor's per-image losses quickly, 2,000
      (:data:`REINFORCE_WARMUP_STEPS`);
    - every algorithm: the predictor's gradient norm clipped at 10
      (:data:`PREDICTOR_MAX_GRAD_NORM`), so that one huge gradient of a step
      on a few images does not wreck a co-trained predictor;
    - the weighted and selective rewards: a predictor trained on randomly
      shifted images whose rewards come from a moving average of its weights
      (``predictor_augment``, ``predictor_average=0.998``). Without them the
      predictor memorises its training images and its validation loss ranks
      images by amenability worse and worse as it trains (REINFORCE, 8
      seeds: holdout AUROC 0.776 +- 0.038 after 4,000 env steps, against
      0.684 +- 0.077 without). Not for the fixed reward's rewards: its only
      signal is how a training selection moves the validation loss, which
      the average delays by hundreds of updates and the shifts weaken
      (measured on the data of ``tests/test_learning.py``, seed 0: 0.273 ->
      0.635 without them, -> 0.507 with the shifts, -> 0.253 with both;
      REINFORCE's paired fixed reward keeps an average for ``evaluate()``
      alone, below);
    - the weighted and selective rewards: validation losses compared within
      each class (``reward_normalisation="class_log"``). Without it the
      controller is also rewarded for scoring the class the predictor finds
      harder low as a whole (on the built-in set, the organ-absent frames),
      which is not image quality (REINFORCE, 8 seeds: holdout AUROC
      0.801 +- 0.024 after 2,000 env steps and 0.783 +- 0.044 after 5,000,
      against 0.750 +- 0.040 and 0.766 +- 0.040 without);
    - DDPG and TD3 with the weighted or selective reward: deterministic
      validation weights (the paper's literal reward), the *raw* reward
      (``reward_baseline="none"``: the critic is the baseline; a lagging
      moving average rewards weighting the images whose loss is *falling*
      fastest, which are the hard ones) and a new validation subset every
      episode (``validation_refresh``), so that the critic sees each reward
      as a sum over a random set of images, which identifies each image's
      share;
    - REINFORCE keeps the paper's moving-average baseline and Bernoulli
      selections on validation images (its log-likelihood needs them), and
      also draws a new validation subset every episode
      (``validation_refresh``), so that its validation steps show it every
      validation image rather than the same ``validation_size`` ones for a
      whole run, at the same cost per step (8 seeds, paired with the same
      256 images: level at 3,000 env steps, +0.005 +- 0.011; ahead at 5,000,
      +0.017 +- 0.005, where it ended at 0.832 +- 0.019 with 8 of 8 seeds
      >= 0.8, against 0.815 +- 0.026 and 5 of 8);
    - REINFORCE: batches of 16 images (``batch_size=16``; the env's default is
      32). Each validation reward is one number for a whole batch's scores,
      and with half as many images each score's own draw explains more of
      it: on the built-in set (4 seeds, weighted and selective rewards) the
      holdout AUROC reached at 2,000 env steps what batches of 32 reach at
      4,000 (0.835 and 0.830 against 0.793 and 0.800 at 2,000; 0.838 and
      0.833 against 0.836 and 0.830 at 4,000), and each step costs about
      half, so runs are 2.5-4 times shorter (8 seeds at 1,250 env steps:
      0.806 +- 0.044 and 0.816 +- 0.026, every seed above its start). Eight
      images were too few (2 of 4 seeds ended inverted). The price is the
      co-trained predictor's, which trains on about 5 images per update
      (``docs/learning-status.md``, section 46);
    - REINFORCE with the weighted and selective rewards: the co-trained
      predictor trains on 80 % of each batch in classification and 50 % in
      segmentation, drawn in the order of the controller's scores
      (``training_selection_rate``, :data:`REINFORCE_TRAINING_SELECTION_RATES`),
      while the scores keep their rate of 0.3 on the validation steps that
      teach them. 8 seeds of each quick run: the co-trained classifiers
      0.015 and 0.022 closer to the baseline at 5 % rejection (paired p 0.018
      and 0.0003), the co-trained U-Nets +0.004 and +0.010 at 15 % (p 0.42
      and 0.003; on another machine +0.016 and +0.012, on 12 seeds there
      +0.014 and +0.014), the ranking level in classification and perhaps
      half a point lower in segmentation (12 seeds: -0.008 and -0.003,
      p 0.08 and 0.63) with the rejection it gives level (sections 60,
      64-66). REINFORCE's paired fixed reward takes 80 % in classification
      too (:data:`REINFORCE_FIXED_TRAINING_SELECTION_RATES`, below);
    - DDPG with the fixed reward: each training step rewarded against a step
      on the rest of its batch (``reward_baseline="paired"``) on 32 clean
      validation images, 8 selections drawn and probed per step and the part
      of each reward that the selection's class mix explains removed by a fit
      on the step's own draws (``paired_draws=8``,
      ``paired_class_correction="step"``). In the paper's form the fixed
      reward did not learn (DDPG, two seeds: 0.45 and 0.27; REINFORCE, 8
      seeds: 0.517 +- 0.068); with these settings and
      :data:`PAIRED_DEFAULTS`, 8 seeds went from 0.508 +- 0.104 at
      initialisation to 0.723 +- 0.089 after 400 env steps, every seed
      higher (sign test p 0.0078), 1 of 8 >= 0.8: the reward carries the
      organ-present frames' quality only, which bounds the overall AUROC
      near 0.8 on this set (sections 31-36);
    - REINFORCE with the fixed reward: the same set-up, each draw credited
      against the other seven (REINFORCE's ``draws``), with the probes'
      rewards computed from the predictor linearised at the episode's start
      (``paired_probe="linearised"``, classification) or to first order
      (``"linear"``, segmentation, whose per-pixel outputs the linearised
      probes cannot keep): each step then costs 1-2 times what a step of the
      paper's form costs, where the probe steps cost eight times more.  On
      the data of ``tests/test_learning.py`` the linearised probes hold the
      ranking (4 seeds: 0.973-0.997 after 800 env steps) where the first-order
      ones lose it after 200-300 (0.350-0.619), as the probe steps at a
      small ``probe_lr`` do: the curvature of the loss is what keeps
      penalising the steps on images with large gradients.  4 seeds on the
      built-in set with REINFORCE's class penalty (:data:`PAIRED_DEFAULTS`):
      0.498 +- 0.116 at initialisation -> 0.757 +- 0.064 after 1,500 env
      steps with the linearised probes, 0.728 +- 0.055 with the first-order
      ones; the paper's form ended the quick run at 0.491 +- 0.063.  On
      corrupted Fashion-MNIST no form learns reliably: 0.465 +- 0.206 with
      the linearised probes (two seeds of four inverted), 0.574 +- 0.111
      with the first-order ones and 0.560 +- 0.133 with the probe steps
      (sections 53-54);
    - REINFORCE with the fixed reward: a weight average of the co-trained
      predictor (``predictor_average``, :data:`PREDICTOR_AVERAGE`) that
      ``evaluate()`` reports and nothing of the run reads (the probes read the
      weights themselves): every draw, reward and controller is the same to
      the last digit. Its co-trained predictors at the paper's rejection
      ratio, seed for seed (quick runs): the built-in set's classifiers
      0.830 +- 0.007 against 0.824 +- 0.018 (8 seeds, 5 higher), U-Nets
      0.773 +- 0.010 against 0.769 +- 0.013 (8 seeds, 5 higher), corrupted
      Fashion-MNIST's classifiers 0.833 +- 0.009 against 0.806 +- 0.045
      (4 seeds, 3 higher); none alone with p < 0.05, but the worst seed
      better in each (0.821, 0.756 and 0.823 against 0.799, 0.748 and
      0.739: section 78);
    - REINFORCE with the fixed reward in classification: the co-trained
      classifier's real step on 80 % of each batch
      (``training_selection_rate``,
      :data:`REINFORCE_FIXED_TRAINING_SELECTION_RATES`), drawn on the
      action's uniforms, while the probes and the credit keep the action's
      own draws at its rate. With the weight average above, 8 seeds of the
      quick run on the built-in set: holdout AUROC 0.789 +- 0.064 against
      0.730 +- 0.097 (higher on 7 of 8, paired p 0.011; 8 of 8 above their
      start), the co-trained classifiers at 5 % 0.845 +- 0.011 against
      0.830 +- 0.007 (8 of 8, p 0.0025). Without the average the
      classifiers gained nothing (0.830, section 75). On corrupted
      Fashion-MNIST, where no form of the fixed reward learns, the
      classifiers gain (0.846 against 0.833, 4 of 4) and the controllers
      end further below chance (0.322 against 0.475, 4 of 4): section 79.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {name!r}")
    if task not in TASK_NAMES:
        raise ValueError(f"task must be one of {TASK_NAMES}, got {task!r}")
    kwargs: dict[str, Any] = dict(
        reward_metric="loss", predictor_warmup_steps=400, predictor_max_grad_norm=PREDICTOR_MAX_GRAD_NORM
    )
    if name == "reinforce":
        kwargs.update(batch_size=16)
    if reward != "fixed":
        kwargs.update(predictor_augment=True, predictor_average=PREDICTOR_AVERAGE, reward_normalisation="class_log")
        if name == "reinforce":
            kwargs.update(predictor_warmup_steps=REINFORCE_WARMUP_STEPS)
            kwargs.update(training_selection_rate=REINFORCE_TRAINING_SELECTION_RATES[task])
        if name in ("reinforce", "ddpg", "td3"):
            kwargs.update(validation_refresh=True)
        if name in ("ddpg", "td3"):
            kwargs.update(stochastic_validation=False, reward_baseline="none")
    elif name in ("ddpg", "reinforce"):
        kwargs.update(reward_baseline="paired", validation_size=32, paired_draws=8, paired_class_correction="step")
        if name == "reinforce":
            kwargs.update(paired_probe="linearised" if task == "classification" else "linear")
            kwargs.update(predictor_average=PREDICTOR_AVERAGE)
            if REINFORCE_FIXED_TRAINING_SELECTION_RATES[task] is not None:
                kwargs.update(training_selection_rate=REINFORCE_FIXED_TRAINING_SELECTION_RATES[task])
    return kwargs


_CLASSES: dict[str, tuple[type[BaseAlgorithm], Any]] = {
    "ddpg": (DDPG, PerSampleTD3Policy),
    "td3": (TD3, PerSampleTD3Policy),
    "sac": (SAC, PerSampleSACPolicy),
    "ppo": (PPO, PerSampleActorCriticPolicy),
    "a2c": (A2C, PerSampleActorCriticPolicy),
    "reinforce": (REINFORCE, "PerSamplePolicy"),
}


def make_agent(name: str, env: GymEnv, seed: int | None = None, **kwargs: Any) -> BaseAlgorithm:
    """A stable-baselines3 algorithm (or :class:`~agents.reinforce.REINFORCE`) for ``TaskAmenability-v0``.

    Every algorithm gets a per-sample policy from :mod:`agents.policies`, so
    its controller can be exported with :meth:`agents.Controller.from_agent`.
    ``kwargs`` override the defaults of :func:`default_kwargs`; ``policy_kwargs``
    is merged into the defaults' and deep-copied (SB3 mutates the dict it is
    given); ``replay_buffer_class`` may be a name from :data:`REPLAY_BUFFERS`;
    ``learning_rate`` may be ``{"start": a, "end": b}`` (see
    :func:`learning_rate_schedule`), so that a schedule can be given as JSON,
    and ``train_freq`` a list ``[n, "step"]``.  The algorithm's own settings
    are checked first, and those of ``policy_kwargs`` and its
    ``features_extractor_kwargs``: their names, and the values of those
    :data:`agents.settings.CHECKS` names (:func:`check_agent_kwargs`).
    """
    name = name.lower()
    options = default_kwargs(name, env, seed)
    default_policy_kwargs = options.get("policy_kwargs") or {}
    options.update(kwargs)
    check_setting("policy_kwargs", options.get("policy_kwargs"))  # before the merge, which needs a dict
    # Policy settings given add to the defaults' (e.g. the critic head) rather than replace them.
    options["policy_kwargs"] = copy.deepcopy({**default_policy_kwargs, **(kwargs.get("policy_kwargs") or {})})
    check_agent_kwargs(name, options)
    if "learning_rate" in options:
        options["learning_rate"] = learning_rate_schedule(options["learning_rate"])
    if isinstance(options.get("train_freq"), list):  # JSON's [n, "step"]; stable-baselines3 takes a tuple
        options["train_freq"] = tuple(options["train_freq"])
    buffer = options.get("replay_buffer_class")
    if isinstance(buffer, str):
        if buffer not in REPLAY_BUFFERS:
            raise ValueError(
                f"replay_buffer_class must be None, a stable-baselines3 ReplayBuffer class or one of "
                f"{tuple(REPLAY_BUFFERS)}, got {buffer!r}"
            )
        options["replay_buffer_class"] = REPLAY_BUFFERS[buffer]
        if "index" in buffer and "replay_buffer_kwargs" not in options:
            options["replay_buffer_kwargs"] = index_buffer_kwargs(env)
    algorithm, policy = _CLASSES[name]
    return without_log_folder(algorithm(policy, env, seed=seed, **options))


def without_log_folder(agent: BaseAlgorithm) -> BaseAlgorithm:
    """Give an agent without ``tensorboard_log`` a logger that writes no files; returns the agent.

    Without it, stable-baselines3's ``learn()`` configures a logger whose folder
    defaults to a new, empty ``SB3-<date-time>`` folder in the system's
    temporary folder, one per call, where nothing is ever written
    (``stable_baselines3.common.logger.configure``). This logger prints what
    stable-baselines3's would (its table on stdout with ``verbose >= 1``,
    nothing otherwise). An agent with ``tensorboard_log`` keeps
    stable-baselines3's own logger, which writes there; so does one given a
    logger with ``set_logger`` afterwards.
    """
    if getattr(agent, "tensorboard_log", None) is None:
        formats = [HumanOutputFormat(sys.stdout)] if getattr(agent, "verbose", 0) >= 1 else []
        agent.set_logger(Logger(folder=None, output_formats=formats))
    return agent


#: make_agent's own arguments, or the algorithm's that make_agent fills in: not settings of ``kwargs``.
_MAKE_AGENT_ARGUMENTS = frozenset({"policy", "env", "seed"})


def check_agent_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Checks the settings ``make_agent(name, env, **kwargs)`` would pass on, by name and by value, building nothing.

    Every name of ``kwargs``, of its ``policy_kwargs`` and of their
    ``features_extractor_kwargs`` must be one the algorithm, its per-sample
    policy or the policy's features extractor takes
    (:func:`agents.settings.check_names`: a setting given at the wrong level
    is told where it belongs), and every value that
    :data:`agents.settings.CHECKS` names must be of its kind.
    ``TrainConfig.validate`` runs it on ``--agent-kwargs`` before any file is written.
    """
    name = name.lower()
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {name!r}")
    algorithm, policy = _CLASSES[name]
    if isinstance(policy, str):
        policy = algorithm.policy_aliases[policy]
    check_setting("policy_kwargs", kwargs.get("policy_kwargs"))
    policy_kwargs = kwargs.get("policy_kwargs") or {}
    check_setting("features_extractor_kwargs", policy_kwargs.get("features_extractor_kwargs"))
    extractor_kwargs = policy_kwargs.get("features_extractor_kwargs") or {}
    extractor = policy_kwargs.get("features_extractor_class", PerSampleExtractor)
    # a features extractor of the user's own may take what it likes (through **kwargs, say)
    extractor_names = accepted_names(extractor) - {"observation_space"} if extractor is PerSampleExtractor else None
    levels = {
        name: (accepted_names(algorithm) - _MAKE_AGENT_ARGUMENTS, "outside policy_kwargs"),
        "policy_kwargs": (accepted_names(policy) - {"observation_space", "action_space", "lr_schedule"}, "in policy_kwargs"),
        "features_extractor_kwargs": (extractor_names or frozenset(), "in policy_kwargs' features_extractor_kwargs"),
        "make_agent": (_MAKE_AGENT_ARGUMENTS, "as make_agent's own argument (iqa's --seed)"),
    }
    check_names(kwargs, levels, name)
    check_settings(name, kwargs)
    if "device" in kwargs:  # torch's own error named every device type it knows, and not the setting
        try:
            resolve_device(kwargs["device"])
        except TypeError as e:
            raise ValueError(str(e)) from None
    check_names(policy_kwargs, levels, "policy_kwargs")
    check_settings(name, policy_kwargs)
    if extractor_names is not None:
        check_names(extractor_kwargs, levels, "features_extractor_kwargs")
    check_settings(name, extractor_kwargs)


def learning_rate_schedule(value: Any) -> Any:
    """A ``learning_rate`` as stable-baselines3 takes it (a number or a schedule), from a number, a schedule or a dict.

    ``{"start": a, "end": b}`` is a linear schedule from ``a`` at the start of
    ``learn()`` to ``b`` at its last step (stable-baselines3's
    ``LinearSchedule``; progress is counted over the ``total_timesteps`` of the
    run, so a resumed run goes on where it stopped).  A positive finite
    number and a callable pass through unchanged; anything else (a string, a
    bool, NaN, a number <= 0) is refused with a ``ValueError`` that names it.
    """
    if callable(value):
        return value
    if not isinstance(value, dict):
        if not is_positive_number(value):
            raise ValueError(
                'learning_rate must be a positive finite number, {"start": a, "end": b} or a schedule, '
                f"got {value!r}"
            )
        return value
    if set(value) != {"start", "end"}:
        raise ValueError(
            f'learning_rate as a dict must have exactly the keys "start" and "end" (a linear schedule), got {sorted(value)}'
        )
    ends = []
    for key in ("start", "end"):
        rate = value[key]
        if not is_positive_number(rate):
            raise ValueError(f"learning_rate[{key!r}] must be a positive finite number, got {rate!r}")
        ends.append(float(rate))
    return LinearSchedule(ends[0], ends[1], 1.0)


def agent_class(name: str) -> type[BaseAlgorithm]:
    """The algorithm class :func:`make_agent` builds for ``name`` (e.g. to ``load`` a saved agent)."""
    name = name.lower()
    if name not in _CLASSES:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {name!r}")
    return _CLASSES[name][0]
