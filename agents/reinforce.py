"""REINFORCE with a per-sample Bernoulli controller, on stable-baselines3's base classes."""

from __future__ import annotations

import sys
import time
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import safe_mean

from agents.policies import BernoulliSelectionPolicy
from agents.settings import check_setting
from iqa_env.checks import is_count, is_flag, is_non_negative_number, is_positive_number, is_whole_number
from iqa_env.env import extra_draws
from iqa_env.networks import (
    check_average_decay,
    update_weight_average,
    weight_average_of,
)

SelfREINFORCE = TypeVar("SelfREINFORCE", bound="REINFORCE")

CREDITS: tuple[str, ...] = ("causal", "validation", "return")


def env_attr(env: GymEnv, name: str, default: Any) -> Any:
    """Attribute ``name`` of ``env`` (a VecEnv's first env, or a plain env), or ``default`` if it has none."""
    try:
        return env.get_attr(name)[0]  # type: ignore[union-attr]
    except AttributeError:
        return getattr(getattr(env, "unwrapped", env), name, default)


def between_class_variance(logits: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per batch, the variance of the valid images' logits explained by their class, ``(N,)``.

    ``sum_c (n_c / n) (m_c - m)^2`` with ``m_c`` the mean logit of the ``n_c``
    valid images of class ``c`` and ``m`` that of all ``n``: 0 when every class
    has the same mean score, whatever the ranking within each class.
    ``logits`` ``(N, B)`` float, ``classes`` ``(N, B)`` integer labels >= 0,
    ``valid`` ``(N, B)`` bool.
    """
    weights = valid.to(logits.dtype)
    n = weights.sum(dim=1).clamp_min(1.0)
    mean = (logits * weights).sum(dim=1) / n
    one_hot = torch.nn.functional.one_hot(classes.long(), int(classes.max()) + 1).to(logits.dtype)
    one_hot = one_hot * weights.unsqueeze(-1)  # (N, B, K)
    counts = one_hot.sum(dim=1)  # (N, K)
    class_means = (one_hot * logits.unsqueeze(-1)).sum(dim=1) / counts.clamp_min(1.0)
    return (counts / n.unsqueeze(1) * (class_means - mean.unsqueeze(1)) ** 2).sum(dim=1)


def check_credited_classes(credited_classes: Any) -> tuple[int, ...] | None:
    """REINFORCE's ``credited_classes`` as a sorted tuple, or None; a ``ValueError`` naming what is wrong."""
    if credited_classes is None:
        return None
    expected = "None or a non-empty list of class labels (whole numbers >= 0), e.g. [1]"
    if not isinstance(credited_classes, (list, tuple)) or not credited_classes:
        raise ValueError(f"credited_classes must be {expected}, got {credited_classes!r}")
    wrong = [c for c in credited_classes if not is_whole_number(c)]
    if wrong:
        raise ValueError(f"credited_classes must be {expected}; {wrong[0]!r} is not")
    if len(set(credited_classes)) < len(credited_classes):
        raise ValueError(f"credited_classes names a class twice: {list(credited_classes)!r}")
    return tuple(sorted(int(c) for c in credited_classes))


IMAGE_BASELINES: tuple[str, ...] = ("none", "counterfactual", "leave_one_out")
#: What REINFORCE does with the further draws an env measures on a step's batch (``draws``).
DRAWS: tuple[str, ...] = ("leave_one_out", "own")


def leave_one_out_credit(rewards: np.ndarray) -> np.ndarray:
    """Each draw's reward less the mean of its step's other draws: ``(N, K)`` -> ``(N, K)``.

    Row ``n`` holds the rewards of step ``n``'s draws, the first one drawn first; NaN marks a
    draw the step did not make (its credit is NaN).  A step with one draw keeps its reward (no
    other draw to compare it with).  The leave-one-out baseline of Kool et al. (2019) that
    REINFORCE's ``draws="leave_one_out"`` credits each draw with, and that
    ``experiments/reward_ceiling.py``'s ``draws`` form measures.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be (steps, draws) with at least one draw, got shape {rewards.shape}")
    present = np.isfinite(rewards)
    k = present.sum(axis=1)
    # Summed as the first draw plus the others: the order REINFORCE has always summed them in.
    filled = np.where(present, rewards, 0.0)
    total = filled[:, 0] + filled[:, 1:].sum(axis=1)
    others = np.maximum(k - 1, 1)
    return np.where(present, rewards - (total[:, None] - rewards) / others[:, None], np.nan)


def _explained_variance(targets: torch.Tensor, predictions: torch.Tensor) -> float:
    """``1 - var(targets - predictions) / var(targets)`` (population variances)."""
    residual = targets - predictions
    return 1.0 - float(residual.var(unbiased=False) / targets.var(unbiased=False).clamp_min(1e-12))


class SelectionRewardModel(torch.nn.Module):
    """A linear model of a validation step's reward from its images and selections, for per-image baselines.

    ``Q(a) = b + mean_i c_i - sum_i a_i c_i / sum_i a_i`` over a batch's valid
    images, with ``c_i = w . e_i`` linear in the policy's (detached) embedding
    ``e_i`` of image ``i``: the model's estimate of that image's validation
    loss, in the form of the weighted reward (the batch's mean loss less the
    selected images' mean loss; with a moving-average baseline per batch
    position, that is what the reward is on average).  With no image selected
    the env's reward is the batch mean, ``Q = b``.  ``Q`` is linear in
    ``(b, w)``, so :meth:`fit` solves a ridge regression in closed form.

    :meth:`counterfactual` gives, for every image ``j``, the expected reward
    had ``a_j`` been drawn afresh from ``h_j`` with the other selections kept:
    ``h_j Q(a_{-j}, 1) + (1 - h_j) Q(a_{-j}, 0)``.  It does not depend on ``a_j``,
    so ``(R - b_j) grad log pi(a_j)`` is an unbiased policy gradient for any
    ``(b, w)``; the better the model, the more of the other images' part of
    ``R`` it removes from image ``j``'s credit.
    """

    def __init__(self, embed_dim: int, ridge: float = 0.1) -> None:
        super().__init__()
        self.ridge = float(ridge)
        self.register_buffer("weight", torch.zeros(embed_dim))
        self.register_buffer("bias", torch.zeros(()))

    def _design(self, features: torch.Tensor, selections: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``mean_i e_i - sum_i a_i e_i / sum_i a_i`` per step (0 with nothing selected), ``(M, D)``."""
        v = valid.to(features.dtype)
        a = selections.to(features.dtype) * v
        mean = (features * v.unsqueeze(-1)).sum(1) / v.sum(1, keepdim=True).clamp_min(1.0)
        count = a.sum(1, keepdim=True)
        chosen = (features * a.unsqueeze(-1)).sum(1) / count.clamp_min(1.0)
        return torch.where(count > 0, mean - chosen, torch.zeros_like(mean))

    def forward(self, features: torch.Tensor, selections: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``Q(a)`` per step, ``(M,)``."""
        return self.bias + self._design(features, selections, valid) @ self.weight

    @torch.no_grad()
    def fit(
        self, features: torch.Tensor, selections: torch.Tensor, valid: torch.Tensor, rewards: torch.Tensor
    ) -> float:
        """Least squares of ``rewards`` on ``Q``; returns the explained variance of ``rewards``.

        Ridge: ``self.ridge`` times the mean power of the centred design's columns.
        """
        x = self._design(features, selections, valid).double()
        y = rewards.double()
        x_mean, y_mean = x.mean(0), y.mean()
        xc, yc = x - x_mean, y - y_mean
        gram = xc.T @ xc
        penalty = self.ridge * float(gram.diagonal().mean().clamp_min(1e-12))
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        weight = torch.linalg.solve(gram + penalty * eye, xc.T @ yc)
        self.weight.copy_(weight.to(self.weight.dtype))
        self.bias.copy_((y_mean - x_mean @ weight).to(self.bias.dtype))
        return _explained_variance(y, self(features, selections, valid).double())

    @torch.no_grad()
    def counterfactual(
        self, features: torch.Tensor, selections: torch.Tensor, valid: torch.Tensor, probabilities: torch.Tensor
    ) -> torch.Tensor:
        """Per image ``j``: ``E_{a_j ~ h_j} Q(a_{-j}, a_j)``, ``(M, B)``."""
        v = valid.to(features.dtype)
        c = features @ self.weight  # (M, B)
        a = selections.to(features.dtype) * v
        c_mean = ((c * v).sum(1) / v.sum(1).clamp_min(1.0)).unsqueeze(1)
        rest_sum = (a * c).sum(1, keepdim=True) - a * c
        rest = a.sum(1, keepdim=True) - a

        def q(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
            return self.bias + torch.where(count > 0, c_mean - total / count.clamp_min(1.0), torch.zeros_like(total))

        return probabilities * q(rest_sum + c, rest + 1.0) + (1.0 - probabilities) * q(rest_sum, rest)


class LoadsOnTheEnvsDevice:
    """``load(path, env=env)`` puts the agent on the env's device, as :func:`agents.make_agent` does.

    stable-baselines3's ``load`` defaults to ``device="auto"``: a CUDA agent for a
    CPU env on a machine with a GPU. Here ``device=None`` (the default) means the
    env's device, or ``"auto"`` without an env or one with no ``device``; a
    device given is used as it is.
    """

    @classmethod
    def load(cls, path: Any, env: GymEnv | None = None, device: torch.device | str | None = None, **kwargs: Any) -> Any:
        if device is None:
            device = env_attr(env, "device", None)  # None without an env, or for an env with no device
        return super().load(path, env=env, device="auto" if device is None else device, **kwargs)  # type: ignore[misc]


class REINFORCE(LoadsOnTheEnvsDevice, BaseAlgorithm):
    """REINFORCE (Williams, 1992) as used by Saeed et al., IPMI 2021 (https://arxiv.org/abs/2102.07615).

    The policy gives selection probabilities ``h``; the *env* draws the
    selections ``a ~ Bernoulli(h)`` and reports them in ``info["selection"]``
    (``TaskAmenability-v0`` does), so that the log-likelihood is that of the
    selections that really trained the predictor:
    ``log pi = sum_i a_i log h_i + (1 - a_i) log(1 - h_i)`` (averaged over the
    batch's valid images, which only rescales the learning rate).

    The env already subtracts its moving-average baseline from the reward;
    the returns are further divided by their running standard deviation so
    that the step size does not depend on the reward's scale.

    Credit assignment (``credit``):

    - ``"causal"`` (default): a validation step's scores affect only that
      step's reward (the predictor does not train during validation), so its
      return is its own reward, as is that of any step whose ``info`` says
      ``reward_scope == "step"`` (the training steps of the env's ``paired``
      baseline, whose reward measures that step's selection alone); another
      training step's return is the sum of the
      rewards after it in the episode (its selection trained the predictor that
      all later validation steps measure).
      Its return is the *mean* of those per-batch rewards, i.e. the paper's
      ``R - Rbar`` for the whole validation set.
    - ``"validation"``: only validation steps are reinforced (training-step
      selections get no credit; the predictor still trains on them).  The
      only credit an env with ``training_selection_rate`` allows: its
      training steps' draws are not the policy's.
    - ``"return"``: the plain reward-to-go for every step.

    :param policy: the policy (``"PerSamplePolicy"`` or a class)
    :param env: the environment; must report ``info["selection"]``
    :param learning_rate: Adam learning rate of the controller
    :param n_steps: env steps per update and env (default: one episode, from ``env.episode_length``)
    :param minibatch_steps: env steps per gradient step (None: one gradient step per rollout).
        The rollout's steps are shuffled and taken in mini-batches, so that the
        controller gets many small updates per episode rather than one.
    :param gamma: discount of the reward-to-go
    :param credit: ``"causal"``, ``"validation"`` or ``"return"``, see above
    :param normalize_returns: divide the returns by their running root mean square (a decay of
        0.99 per gradient step, starting from ``return_scale_prior``)
    :param return_scale_prior: the running mean square's starting value: 1.0 (default), the
        returns are barely scaled until about a hundred gradient steps have moved it (a quick run
        takes 63-188); None: no starting value, the mean of the steps so far with Adam's bias
        correction, so the returns are divided by their own scale from the first step
        (``docs/learning-status.md``, section 72; measured with the weighted and selective rewards
        too, where it was level in classification and cost the co-trained U-Nets in segmentation:
        sections 73 and 76)
    :param ent_coef: weight of the Bernoulli entropy bonus
    :param max_grad_norm: gradient clipping norm
    :param class_balance: weight of a penalty on the *class* separation of the scores: the
        variance of each batch's selection logits explained by the images' class labels
        (:func:`between_class_variance`, labels from ``info["classes"]``), added to the loss.
        It keeps the controller from scoring a whole class low (and so the predictor's
        training set from losing that class) when the target of the ranking is the quality of
        the images within their class.  0: no penalty, and the env need not report classes.
    :param credited_classes: the class labels (of ``info["classes"]``) whose images' selections are
        reinforced, or None (every image's).  The other images are still drawn and train the
        predictor, and count in ``class_balance`` and the entropy bonus, but their log-probabilities
        get no share of the step's credit.  For data where one class's images alone carry a
        reward's signal.  Not a default anywhere: on the built-in set the fixed reward's
        segmentation credit is the organ-present frames' (an amenable frame without the organ
        teaches a U-Net the same empty mask as any other), yet crediting those frames alone
        (``[1]``) ranked no better on 8 seeds, 0.578 against 0.611, and left the co-trained
        U-Nets lower (``docs/learning-status.md``, section 71).
    :param controller_average: decay of an exponential moving average of the policy's weights,
        updated after every gradient step (0: none).  When set, :attr:`average_policy` holds it and
        the exported :class:`~agents.Controller` (``Controller.from_agent``) is the average: the
        policy that acts keeps its noisy steps, the one that is kept smooths them out.
    :param image_baseline: ``"none"``: every image of a step shares the step's return; or
        ``"counterfactual"``: on validation steps, image ``j``'s return is the step's minus
        what a learnt model of the reward (:class:`SelectionRewardModel`, fitted on past
        rollouts' validation steps) expects with ``a_j`` drawn afresh and the other
        selections kept.  Still an unbiased policy gradient; it removes from each image's
        credit the part of the reward that the batch's other selections made.  Measured on
        the built-in set with the env's ``reward_baseline="non_selective"`` (8 seeds): ahead
        of the default by 0.013-0.037 holdout AUROC to 1,500 env steps, level at 3,000; with
        the moving-average reward, no change (``docs/learning-status.md``, section 13).
        ``"leave_one_out"``: on steps whose ``info`` has ``image_rewards`` (validation steps of
        ``TaskAmenability-v0`` with stochastic validation: the step's reward had image ``j``'s draw
        been 0 or 1, the others as drawn), image ``j``'s return is the step's minus
        ``h_j r_j(1) + (1 - h_j) r_j(0)``, the reward expected over its own draw alone.  Exact
        where the counterfactual model is learnt, and unbiased for the same reason: the
        baseline does not depend on ``a_j``.  What is left of ``j``'s credit is
        ``(a_j - h_j) (r_j(1) - r_j(0))``: its own draw's effect, none of the other images'.
        The class keeps the paper's ``"none"``; :func:`agents.make_agent` gives
        ``"leave_one_out"`` with the weighted and selective rewards, whose env warms its
        predictor up for longer (``docs/learning-status.md``, sections 50-51).
    :param draws: what to do with the further selections an env draws and measures on a step's
        batch besides the one it trains on (``info["extra_selections"]``, ``(K - 1, B)``, and
        ``info["extra_rewards"]``: ``TaskAmenability-v0``'s ``paired_draws=K`` with
        ``reward_baseline="paired"``). ``"leave_one_out"`` (default): the step's K draws are K
        samples of the policy at the same observation; draw ``k`` is credited with its reward less
        the mean of the other ``K - 1`` (the leave-one-out baseline of Kool et al., 2019, "Buy 4
        REINFORCE samples, get a baseline for free": it does not depend on draw ``k``, so the
        gradient stays unbiased), and the step's gradient is the mean over its draws.  ``"own"``:
        only the draw the env trained on, credited with the step's return (the extra rewards are
        ignored).  Steps without extra draws are the same either way.
    :param reward_model_memory: rollouts whose validation steps the reward model is fitted on
    :param images_per_pass: images the controller takes in one forward and backward pass of a
        gradient step; the step's gradient is accumulated over such passes, each of whole env
        steps (the same gradient as one pass over the mini-batch, up to float rounding).
        ``"auto"``: 32 on a CPU, where passes that stay in cache made the default rollout's
        gradient step 1.7 times faster than one pass over its 384 images
        (``docs/performance.md``), and the whole mini-batch in one pass on other devices.
        None: the whole mini-batch in one pass.
    :param stats_window_size: episodes averaged for ``rollout/ep_rew_mean``
    :param tensorboard_log: TensorBoard log folder, or None
    :param policy_kwargs: keyword arguments of the policy (copied, never mutated)
    :param verbose: 0 silent, 1 training information
    :param seed: seed of the pseudo-random generators
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``
    """

    policy_aliases: ClassVar[dict[str, type[BernoulliSelectionPolicy]]] = {
        "PerSamplePolicy": BernoulliSelectionPolicy,
    }
    policy: BernoulliSelectionPolicy

    def __init__(
        self,
        policy: str | type[BernoulliSelectionPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int | None = None,
        minibatch_steps: int | None = None,
        gamma: float = 1.0,
        credit: str = "causal",
        normalize_returns: bool = True,
        return_scale_prior: float | None = 1.0,
        ent_coef: float = 0.0,
        max_grad_norm: float = 1.0,
        class_balance: float = 0.0,
        credited_classes: list[int] | tuple[int, ...] | None = None,
        controller_average: float = 0.0,
        image_baseline: str = "none",
        draws: str = "leave_one_out",
        reward_model_memory: int = 64,
        images_per_pass: int | str | None = "auto",
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        super().__init__(
            policy=policy,
            env=env,
            learning_rate=learning_rate,
            policy_kwargs=dict(policy_kwargs or {}),
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            support_multi_env=True,
            seed=seed,
            supported_action_spaces=(spaces.Box,),
        )
        if credit not in CREDITS:
            raise ValueError(f"credit must be one of {CREDITS}, got {credit!r}")
        check_setting("gamma", gamma)
        if not is_flag(normalize_returns):
            raise ValueError(
                f"normalize_returns must be True or False, got {type(normalize_returns).__name__} {normalize_returns!r}"
            )
        if return_scale_prior is not None and not is_positive_number(return_scale_prior):
            raise ValueError(f"return_scale_prior must be None or a positive finite number, got {return_scale_prior!r}")
        check_setting("ent_coef", ent_coef)
        check_setting("max_grad_norm", max_grad_norm)
        controller_average = check_average_decay("controller_average", controller_average)
        if not is_non_negative_number(class_balance):
            raise ValueError(f"class_balance must be a finite number >= 0, got {class_balance!r}")
        class_balance = float(class_balance)
        if image_baseline not in IMAGE_BASELINES:
            raise ValueError(f"image_baseline must be one of {IMAGE_BASELINES}, got {image_baseline!r}")
        if draws not in DRAWS:
            raise ValueError(f"draws must be one of {DRAWS}, got {draws!r}")
        if not is_count(reward_model_memory):
            raise ValueError(f"reward_model_memory must be an integer >= 1, got {reward_model_memory!r}")
        if image_baseline != "none" and self.env is not None:
            # another env (no such attribute): its info["action_phase"] tells at run time
            if not bool(env_attr(self.env, "uses_validation_phase", True)):
                raise ValueError(
                    f"image_baseline={image_baseline!r} is a baseline for the rewards of validation steps, and "
                    "this env has none (the fixed reward): use the weighted or selective reward, or "
                    "image_baseline='none'"
                )
            if image_baseline == "leave_one_out" and not bool(env_attr(self.env, "stochastic_validation", True)):
                raise ValueError(
                    "image_baseline='leave_one_out' needs the rewards of the validation steps' Bernoulli "
                    "draws (info['image_rewards']), and this env rewards the scores themselves "
                    "(stochastic_validation=False): use stochastic_validation=True or image_baseline='none'"
                )
        if n_steps is None and self.env is not None:
            n_steps = int(env_attr(self.env, "episode_length", 32))
        if n_steps is None and _init_setup_model:
            raise ValueError("n_steps is needed without an env (default: the env's episode_length)")
        # (``load`` without an env builds the algorithm with _init_setup_model=False, then sets n_steps as saved.)
        if n_steps is not None:
            check_setting("n_steps", n_steps)
        if minibatch_steps is not None and not is_count(minibatch_steps):
            raise ValueError(f"minibatch_steps must be a whole number >= 1 or None, got {minibatch_steps!r}")
        if images_per_pass not in ("auto", None) and not is_count(images_per_pass):
            raise ValueError(f"images_per_pass must be an integer >= 1, 'auto' or None, got {images_per_pass!r}")
        self.n_steps = n_steps
        self.minibatch_steps = minibatch_steps
        self.images_per_pass = images_per_pass
        self.gamma = gamma
        self.credit = credit
        self.normalize_returns = normalize_returns
        self.ent_coef = ent_coef
        self.max_grad_norm = max_grad_norm
        self.class_balance = class_balance
        self.credited_classes = credited_classes
        self.controller_average = controller_average
        self.average_policy: BernoulliSelectionPolicy | None = None
        self.image_baseline = image_baseline
        self.draws = draws
        self.reward_model_memory = int(reward_model_memory)
        self.reward_model: SelectionRewardModel | None = None
        self._reward_memory: list[tuple[torch.Tensor, ...]] = []
        self.return_scale_prior = None if return_scale_prior is None else float(return_scale_prior)
        # running second moment of the returns (from the prior, or from 0 with a bias correction)
        self._return_sq = 1.0 if self.return_scale_prior is None else self.return_scale_prior
        self._return_sq_sum = 0.0
        self._return_updates = 0
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        # Here rather than in __init__: ``load`` builds the algorithm with the constructor's defaults and
        # sets the saved credit before it calls this.
        training_rate = env_attr(self.env, "training_selection_rate", None)
        action_draws = env_attr(self.env, "selection_reports_action_draws", training_rate is None)
        if self.credit != "validation" and not action_draws:
            raise ValueError(
                "this env draws the training steps' selections from the action shifted to another rate "
                f"(training_selection_rate={training_rate!r}), so they are not the policy's draws and cannot be "
                f"credited: use credit='validation', got credit={self.credit!r}"
            )
        # Checked here, not in __init__: a loaded agent sets its saved value (a JSON list) before this runs.
        self.credited_classes = check_credited_classes(self.credited_classes)
        class_names = getattr(env_attr(self.env, "train_set", None), "class_names", None)
        if self.credited_classes is not None and class_names is not None:
            unknown = [c for c in self.credited_classes if c >= len(class_names)]
            if unknown:
                raise ValueError(
                    f"credited_classes {list(self.credited_classes)!r} names class {unknown[0]}, and this env's "
                    f"data has {len(class_names)} classes (labels 0 to {len(class_names) - 1}: "
                    f"{', '.join(repr(n) for n in class_names)})"
                )
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs
        ).to(self.device)
        self.average_policy = weight_average_of(self.policy) if self.controller_average > 0 else None  # type: ignore[assignment]
        if self.image_baseline == "counterfactual":
            self.reward_model = SelectionRewardModel(self.policy.head.embed_dim).to(self.device)

    @property
    def _needs_classes(self) -> bool:
        """Whether a rollout keeps the images' class labels (``class_balance`` or ``credited_classes``)."""
        return self.class_balance > 0 or self.credited_classes is not None

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        # The optimiser's state (Adam moments) too, so that a saved agent resumes training exactly.
        names = ["policy", "policy.optimizer"]
        names += ["average_policy"] if self.average_policy is not None else []
        names += ["reward_model"] if self.reward_model is not None else []
        return names, []

    # ------------------------------------------------------------------ rollouts
    def collect_rollout(self, callback: BaseCallback) -> dict[str, np.ndarray] | None:
        """``n_steps`` steps in every env; returns the arrays :meth:`train` needs (None if stopped)."""
        assert self.env is not None and self._last_obs is not None
        n_envs = self.env.num_envs
        obs_buf, sel_buf, valid_buf, class_buf, base_buf = [], [], [], [], []
        extra_buf: list[list[tuple[np.ndarray, np.ndarray]]] = []
        rew_buf = np.zeros((self.n_steps, n_envs))
        done_buf = np.zeros((self.n_steps, n_envs), dtype=bool)
        validation_buf = np.zeros((self.n_steps, n_envs), dtype=bool)
        own_buf = np.zeros((self.n_steps, n_envs), dtype=bool)
        self.policy.set_training_mode(False)
        callback.on_rollout_start()
        for t in range(self.n_steps):
            obs = self._last_obs
            with torch.no_grad():
                probabilities = self.policy(torch.as_tensor(obs, device=self.device)).cpu().numpy()
            new_obs, rewards, dones, infos = self.env.step(probabilities)
            self.num_timesteps += n_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return None
            self._update_info_buffer(infos, dones)
            missing = [i for i, info in enumerate(infos) if "selection" not in info]
            if missing:
                raise ValueError(
                    "REINFORCE needs the env to draw the Bernoulli selections and report them in "
                    "info['selection'] (as TaskAmenability-v0 does); this env does not"
                )
            if self._needs_classes:
                if any("classes" not in info for info in infos):
                    setting = "class_balance > 0" if self.class_balance > 0 else "credited_classes"
                    raise ValueError(
                        f"REINFORCE with {setting} needs the env to report the class labels of "
                        "each step's batch in info['classes'] (as TaskAmenability-v0 does); this env "
                        "does not: use class_balance=0 and credited_classes=None"
                    )
                class_buf.append(np.stack([info["classes"] for info in infos]))
            obs_buf.append(obs)
            if self.image_baseline == "leave_one_out":
                base_buf.append(self._leave_one_out_baselines(probabilities, infos))
            sel_buf.append(np.stack([info["selection"] for info in infos]))
            valid_buf.append(np.stack([info.get("valid", np.ones_like(info["selection"])) for info in infos]))
            validation_buf[t] = [info.get("action_phase") == "validation" for info in infos]
            own_buf[t] = [info.get("reward_scope") == "step" or info.get("action_phase") == "validation" for info in infos]
            if self.draws == "leave_one_out":
                extra_buf.append([self._extra_draws(info, own_buf[t, i]) for i, info in enumerate(infos)])
            rew_buf[t], done_buf[t] = rewards, dones
            self._last_obs = new_obs  # type: ignore[assignment]
        callback.on_rollout_end()
        rollout = {
            "observations": np.stack(obs_buf),
            "selections": np.stack(sel_buf),
            "valid": np.stack(valid_buf),
            "returns": self._returns(rew_buf, done_buf, validation_buf, own_buf),
            "validation": validation_buf,
        }
        if class_buf:
            rollout["classes"] = np.stack(class_buf)
        if base_buf:
            rollout["image_baselines"] = np.stack(base_buf)
        if any(len(rewards) for step in extra_buf for _, rewards in step):
            rollout["extra_selections"], rollout["extra_returns"] = self._pad_extra_draws(extra_buf, rollout["selections"])
        return rollout

    @staticmethod
    def _extra_draws(info: dict[str, Any], own: bool) -> tuple[np.ndarray, np.ndarray]:
        """A step's further draws and their rewards (none unless its reward measures its own draws)."""
        if not own:
            return np.zeros((0, 0), dtype=bool), np.zeros(0)
        return extra_draws(info)

    @staticmethod
    def _pad_extra_draws(
        extra: list[list[tuple[np.ndarray, np.ndarray]]], selections: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(n_steps, n_envs, M, B)`` draws and ``(n_steps, n_envs, M)`` rewards, NaN where a step has fewer."""
        width = max(len(rewards) for step in extra for _, rewards in step)
        out_selections = np.zeros((*selections.shape[:2], width, selections.shape[2]), dtype=bool)
        out_rewards = np.full((*selections.shape[:2], width), np.nan)
        for t, step in enumerate(extra):
            for i, (draws, rewards) in enumerate(step):
                if len(rewards):
                    out_selections[t, i, : len(rewards)] = draws
                    out_rewards[t, i, : len(rewards)] = rewards
        return out_selections, out_rewards

    @staticmethod
    def _leave_one_out_baselines(probabilities: np.ndarray, infos: list[dict[str, Any]]) -> np.ndarray:
        """``(n_envs, B)``: each image's reward expected over its own draw alone (NaN: none reported)."""
        out = np.full(np.shape(probabilities), np.nan)
        for i, info in enumerate(infos):
            if "image_rewards" in info:
                flipped = np.asarray(info["image_rewards"], dtype=np.float64)
                h = np.clip(np.asarray(probabilities[i], dtype=np.float64), 0.0, 1.0)
                out[i] = h * flipped[:, 1] + (1.0 - h) * flipped[:, 0]
        return out

    def _returns(self, rewards: np.ndarray, dones: np.ndarray, validation: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Per-step returns; ``own`` marks the steps whose reward measures their own action alone."""
        returns = np.zeros_like(rewards)
        running = np.zeros(rewards.shape[1])
        parts = np.zeros(rewards.shape[1])  # validation steps ahead in the episode
        for t in reversed(range(rewards.shape[0])):
            keep = ~dones[t]
            running = rewards[t] + self.gamma * running * keep
            parts = validation[t] + parts * keep
            if self.credit == "return":
                returns[t] = running
            elif self.credit == "causal":
                # A training step is credited with the episode's validation reward, the mean of
                # its per-batch parts (the paper's R - Rbar), not their sum, which would weigh
                # the noisy training-selection signal V times the validation one.
                returns[t] = np.where(own[t], rewards[t], running / np.maximum(parts, 1))
            else:  # "validation": only the validation scores are reinforced
                returns[t] = np.where(validation[t], rewards[t], 0.0)
        return returns

    # --------------------------------------------------------------------- train
    def train(self, rollout: dict[str, np.ndarray]) -> None:
        """Policy-gradient steps on a rollout, ``minibatch_steps`` env steps per gradient step."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        returns = rollout["returns"].reshape(-1)
        image_baselines = rollout.get("image_baselines")
        if image_baselines is not None:
            image_baselines = image_baselines.reshape(returns.shape[0], -1)
        extra_returns = rollout.get("extra_returns")
        if extra_returns is not None:
            extra_returns = extra_returns.reshape(returns.shape[0], -1)
        if self.normalize_returns:
            self._return_sq = self._next_return_sq(float(np.mean(returns**2)))
            scale = np.sqrt(self._return_sq + 1e-8)
            returns = returns / scale
            if image_baselines is not None:  # in the returns' units
                image_baselines = image_baselines / scale
            if extra_returns is not None:
                extra_returns = extra_returns / scale
        extra_selections, extra_advantages = None, None
        if extra_returns is not None:
            returns, extra_advantages = self._leave_one_out_draws(returns, extra_returns)
            extra_selections = torch.as_tensor(rollout["extra_selections"], device=self.device)
            extra_selections = extra_selections.reshape(returns.shape[0], *extra_selections.shape[2:])
            extra_advantages = torch.as_tensor(extra_advantages, device=self.device, dtype=torch.float32)
        obs = torch.as_tensor(rollout["observations"], device=self.device)
        obs = obs.reshape(-1, *obs.shape[2:])
        selections = torch.as_tensor(rollout["selections"], device=self.device).reshape(obs.shape[0], -1)
        valid = torch.as_tensor(rollout["valid"], device=self.device).reshape(obs.shape[0], -1)
        advantages = torch.as_tensor(returns, device=self.device, dtype=torch.float32)
        image_base = None
        if image_baselines is not None:
            image_base = torch.as_tensor(image_baselines, device=self.device, dtype=torch.float32)
        classes, credited = None, None
        if self._needs_classes:
            all_classes = torch.as_tensor(rollout["classes"], device=self.device).reshape(obs.shape[0], -1)
            classes = all_classes if self.class_balance > 0 else None
            if self.credited_classes is not None:
                wanted = torch.as_tensor(self.credited_classes, device=self.device, dtype=all_classes.dtype)
                credited = torch.isin(all_classes, wanted).float()
        validation = torch.as_tensor(
            rollout.get("validation", np.zeros(rollout["returns"].shape, dtype=bool)), device=self.device
        ).reshape(-1)
        size = self.minibatch_steps or obs.shape[0]
        rows = self._steps_per_pass(obs.shape[1])
        order = np.random.permutation(obs.shape[0])
        seen: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, obs.shape[0], size):
            idx = torch.as_tensor(order[start : start + size], device=self.device)
            self.policy.optimizer.zero_grad()
            # The mini-batch's loss is a mean over its env steps, so its gradient is the sum of those of
            # passes over parts of it, each weighted by its share of the steps.
            terms = torch.zeros(3, device=self.device)
            for part in idx.split(rows):
                # Score function estimator: grad E[R] = E[(R - b) grad log pi(a | s)].
                logits, features = self.policy.logits_and_features(obs[part])
                image_advantages = advantages[part].unsqueeze(1).expand_as(logits)
                if image_base is not None:
                    base = image_base[part]
                    image_advantages = torch.where(torch.isnan(base), image_advantages, image_advantages - base)
                if self.reward_model is not None:
                    image_advantages = self._counterfactual_advantages(
                        image_advantages, logits, features.detach(), selections[part], valid[part], validation[part], seen
                    )
                log_prob, entropy = self.policy.image_log_probs(logits, selections[part], valid[part])
                if credited is not None:  # weighted as before, the other classes' images at 0
                    log_prob = log_prob * credited[part]
                step_terms = (image_advantages * log_prob).sum(1)
                if extra_selections is not None:
                    assert extra_advantages is not None
                    for k in range(extra_selections.shape[1]):
                        extra_log_prob, _ = self.policy.image_log_probs(logits, extra_selections[part, k], valid[part])
                        if credited is not None:
                            extra_log_prob = extra_log_prob * credited[part]
                        step_terms = step_terms + extra_advantages[part, k] * extra_log_prob.sum(1)
                policy_loss = -step_terms.mean()
                entropy_loss = -entropy.mean()
                loss = policy_loss + self.ent_coef * entropy_loss
                class_loss = torch.zeros((), device=self.device)
                if classes is not None:
                    class_loss = between_class_variance(logits, classes[part], valid[part]).mean()
                    loss = loss + self.class_balance * class_loss
                share = len(part) / len(idx)
                (loss * share).backward()
                terms += torch.stack([policy_loss, entropy_loss, class_loss]).detach() * share
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()
            self._n_updates += 1
            if self.average_policy is not None:
                update_weight_average(self.average_policy, self.policy, self.controller_average, self._n_updates)
        if self.reward_model is not None:
            self._fit_reward_model(seen)
        policy_term, entropy_term, class_term = (float(t) for t in terms)  # the last mini-batch's
        self.logger.record("train/policy_loss", policy_term)
        self.logger.record("train/entropy", -entropy_term)
        if classes is not None:
            self.logger.record("train/class_variance", class_term)
        self.logger.record("train/return_std", float(np.sqrt(self._return_sq)))
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def _next_return_sq(self, mean_square: float) -> float:
        """The running second moment of the returns after a rollout whose returns' mean square is ``mean_square``."""
        if self.return_scale_prior is not None:
            return 0.99 * self._return_sq + 0.01 * mean_square
        self._return_updates += 1
        self._return_sq_sum = 0.99 * self._return_sq_sum + 0.01 * mean_square
        return self._return_sq_sum / (1.0 - 0.99**self._return_updates)

    @staticmethod
    def _leave_one_out_draws(returns: np.ndarray, extra_returns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each draw's credit, ``(r_k - mean of the others) / K``, for the step's own draw and its extras.

        ``returns`` ``(N,)`` are the own draws', ``extra_returns`` ``(N, M)`` the further draws' (NaN:
        fewer draws on that step).  Steps with no further draw keep their return; the further draws'
        credit is 0 where there is none.  Dividing by the step's K makes its gradient the mean over
        its draws, on the scale of one draw's.
        """
        present = np.isfinite(extra_returns)
        k = 1 + present.sum(axis=1)
        credit = leave_one_out_credit(np.concatenate([returns[:, None], extra_returns], axis=1))
        own = credit[:, 0] / k
        extra = np.where(present, credit[:, 1:] / k[:, None], 0.0)
        return own, extra

    def _steps_per_pass(self, batch_size: int) -> int:
        """Env steps of ``batch_size`` images per forward-backward pass of a gradient step (``images_per_pass``)."""
        images = self.images_per_pass
        if images == "auto":
            images = 32 if self.device.type == "cpu" else None
        if images is None:
            return 1 << 62  # the whole mini-batch
        return max(1, int(images) // max(1, batch_size))

    def _counterfactual_advantages(
        self,
        image_advantages: torch.Tensor,
        logits: torch.Tensor,
        features: torch.Tensor,
        selections: torch.Tensor,
        valid: torch.Tensor,
        validation: torch.Tensor,
        seen: list[tuple[torch.Tensor, ...]],
    ) -> torch.Tensor:
        """Validation steps' per-image returns less :meth:`SelectionRewardModel.counterfactual`.

        The model used is the one fitted on *earlier* rollouts, so that no
        image's baseline depends on its own selection; this rollout's
        validation steps are kept in ``seen`` for the next fit.
        """
        assert self.reward_model is not None
        if not bool(validation.any()):
            return image_advantages
        f, a, v = features[validation], selections[validation], valid[validation]
        baseline = self.reward_model.counterfactual(f, a, v, torch.sigmoid(logits.detach()[validation]))
        seen.append((f, a, v, image_advantages[validation, 0]))
        out = image_advantages.clone()
        out[validation] = image_advantages[validation] - baseline
        return out

    def _fit_reward_model(self, seen: list[tuple[torch.Tensor, ...]]) -> None:
        """Refit the reward model on the validation steps of the last ``reward_model_memory`` rollouts."""
        assert self.reward_model is not None
        if seen:
            new = tuple(torch.cat(parts) for parts in zip(*seen))
            if self._reward_memory:  # how well the model fitted before this rollout predicts it
                with torch.no_grad():
                    predicted = _explained_variance(new[3], self.reward_model(*new[:3]))
                self.logger.record("train/reward_model_predicted_variance", predicted)
            self._reward_memory.append(new)
            del self._reward_memory[: -self.reward_model_memory]
        if not self._reward_memory:
            return
        explained = self.reward_model.fit(*(torch.cat(parts) for parts in zip(*self._reward_memory)))
        self.logger.record("train/reward_model_explained_variance", explained)

    def learn(
        self: SelfREINFORCE,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "REINFORCE",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfREINFORCE:
        self._n_updates = getattr(self, "_n_updates", 0) if not reset_num_timesteps else 0
        total_timesteps, callback = self._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        callback.on_training_start(locals(), globals())
        iteration = 0
        while self.num_timesteps < total_timesteps:
            rollout = self.collect_rollout(callback)
            if rollout is None:
                break
            iteration += 1
            self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
            self.train(rollout)
            if log_interval is not None and iteration % log_interval == 0:
                self._log_rollout()
        callback.on_training_end()
        return self

    def _log_rollout(self) -> None:
        elapsed = max((time.time_ns() - self.start_time) / 1e9, sys.float_info.epsilon)
        if self.ep_info_buffer:
            self.logger.record("rollout/ep_rew_mean", safe_mean([ep["r"] for ep in self.ep_info_buffer]))
            self.logger.record("rollout/ep_len_mean", safe_mean([ep["l"] for ep in self.ep_info_buffer]))
        self.logger.record("time/fps", int((self.num_timesteps - self._num_timesteps_at_start) / elapsed))
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)
