"""The paper's three validation rewards and the moving-average reward baseline.

Sign convention: every reward is ``-(mean per-sample loss)`` over some
validation images, where the per-sample *loss-type* value ``l_j`` is lower
for better predictions (``1 - accuracy``, ``1 - Dice`` or the training loss;
see ``TaskAmenabilityEnv(reward_metric=...)``).  Higher rewards are better.

- ``fixed``:     ``R = -mean_j l_j`` over a clean validation set (the images
  that human raters labelled amenable).
- ``weighted``:  ``R = -sum_j w_j l_j / sum_j w_j`` with ``w_j`` the
  controller's scores (or the env's Bernoulli selections drawn from them).
  Normalised by ``sum_j w_j``: the paper's plain mean ``-mean_j w_j l_j``
  rewards shrinking every score, which drives the controller to ``h = 0``.
- ``selective``: ``R = -mean`` of ``l_j`` over the validation images that
  are kept after removing the ``rejection_ratio`` lowest-scored.

:func:`class_log_losses` is an optional normalisation of the ``l_j`` before
the weighted and selective rewards (``TaskAmenabilityEnv(reward_normalisation=
"class_log")``): each loss as the log of its ratio to the geometric-mean loss
of its class, so that a controller is not rewarded for scoring a whole class
low because the predictor finds that class harder
(``docs/design-decisions.md``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from iqa_env.checks import is_count

REWARD_NAMES: tuple[str, ...] = ("fixed", "weighted", "selective")
REWARD_NORMALISATIONS: tuple[str, ...] = ("none", "class_log")
#: Losses below this are taken as this before their log (a confident, right
#: prediction's cross-entropy can be 0 in float32).
LOG_LOSS_FLOOR = 1e-4


def check_reward(reward: str) -> str:
    """``reward`` itself if it names one of :data:`REWARD_NAMES`; else ``TypeError`` / ``ValueError``."""
    if not isinstance(reward, str):
        raise TypeError(f"reward must be one of the names {REWARD_NAMES}, got {type(reward).__name__}")
    if reward not in REWARD_NAMES:
        raise ValueError(f"reward must be one of {REWARD_NAMES}, got {reward!r}")
    return reward


def has_validation_phase(reward: str) -> bool:
    """Whether episodes of ``reward`` end with validation steps in which the controller scores
    validation images (``weighted`` and ``selective``); the ``fixed`` reward has none."""
    return check_reward(reward) != "fixed"


def check_rejection_ratio(rejection_ratio: float) -> float:
    """``rejection_ratio`` as a float in [0, 1): the fraction of images rejected (1 would reject all)."""
    if isinstance(rejection_ratio, bool) or not isinstance(rejection_ratio, numbers.Real):
        raise TypeError(
            f"rejection_ratio must be a number in [0, 1) (the fraction of images rejected), "
            f"got {type(rejection_ratio).__name__} {rejection_ratio!r}"
        )
    value = float(rejection_ratio)
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"rejection_ratio must be a number in [0, 1) (the fraction of images rejected; 1 would "
            f"reject every image), got {value!r}; use e.g. 0.05 to reject the lowest-scored 5 %"
        )
    return value


def fixed_reward(losses: np.ndarray) -> float:
    """``-mean(losses)``."""
    return -float(np.mean(losses))


def weighted_reward(losses: np.ndarray, weights: np.ndarray) -> float:
    """``-sum(w * l) / sum(w)``; with all weights zero, ``-mean(l)`` (no preference)."""
    total = float(np.sum(weights))
    if total <= 0.0:
        return -float(np.mean(losses))
    return -float(np.dot(weights, losses) / total)


def class_log_losses(losses: np.ndarray, classes: np.ndarray, floor: float = LOG_LOSS_FLOOR) -> np.ndarray:
    """``log(max(l_j, floor))`` minus its mean over the items of the same class.

    The values are the log of each loss's ratio to its class's geometric-mean
    loss: an image counts as easy or hard *for its class*.  Without it, the
    weighted and selective rewards also reward scoring a whole class low when
    the predictor finds that class harder (a rarer class, say), which is a
    property of the class, not of the image's quality.  ``losses`` must be
    finite and >= 0 (per-sample training losses, not 0/1 errors, whose log
    is not defined), ``classes`` one label per loss.
    """
    losses = np.asarray(losses, dtype=np.float64)
    classes = np.asarray(classes)
    if losses.ndim != 1 or classes.shape != losses.shape:
        raise ValueError(
            f"class_log_losses needs one class per loss, got losses of shape {losses.shape} "
            f"and classes of shape {classes.shape}"
        )
    if not np.all(np.isfinite(losses)) or np.any(losses < 0):
        raise ValueError("class_log_losses needs finite losses >= 0 (per-sample training losses)")
    values = np.log(np.maximum(losses, floor))
    for c in np.unique(classes):
        members = classes == c
        values[members] -= values[members].mean()
    return values


def kept_by_rejection(scores: np.ndarray, rejection_ratio: float) -> np.ndarray:
    """Boolean mask keeping ``max(1, floor((1 - s) n))`` highest-scored items (ties: lower index wins)."""
    n = len(scores)
    n_keep = max(1, math.floor((1.0 - rejection_ratio) * n + 1e-9))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep = np.zeros(n, dtype=bool)
    keep[order[:n_keep]] = True
    return keep


def selective_reward(
    losses: np.ndarray,
    scores: np.ndarray,
    rejection_ratio: float,
    selection: np.ndarray | None = None,
) -> float:
    """``-mean(l)`` over the items kept after rejecting the lowest-scored fraction.

    With ``selection`` (Bernoulli draws from the scores), only selected items
    that survive the rejection count, so that score-function methods get a
    gradient; if none survives, the reward falls back to the deterministic one.
    """
    keep = kept_by_rejection(scores, rejection_ratio)
    if selection is not None and np.any(keep & selection):
        keep = keep & selection
    return -float(np.mean(losses[keep]))


def validation_reward(
    reward: str,
    losses: np.ndarray,
    scores: np.ndarray,
    rejection_ratio: float,
    selection: np.ndarray | None,
) -> float:
    """The raw reward of one validation batch: :func:`weighted_reward` or :func:`selective_reward`.

    ``selection`` holds the Bernoulli draws (stochastic validation: the weights are the
    draws, and only selected images count), or None (the paper's literal form: the weights
    are the scores themselves).
    """
    if reward == "weighted":
        weights = scores if selection is None else selection.astype(np.float64)
        return weighted_reward(losses, weights)
    return selective_reward(losses, scores, rejection_ratio, selection)


def leave_one_out_rewards(
    reward: str,
    losses: np.ndarray,
    scores: np.ndarray,
    rejection_ratio: float,
    selection: np.ndarray,
) -> np.ndarray:
    """``(n, 2)``: the raw reward of the batch had image ``j``'s draw been 0 (column 0) or 1 (column 1).

    The other images' draws stay as they were, so the column of the draw that was made is
    the batch's own reward.  A score-function agent can take
    ``h_j r_j(1) + (1 - h_j) r_j(0)`` as image ``j``'s baseline: it does not depend on
    ``a_j``, so the policy gradient stays unbiased, and it removes from ``j``'s credit what
    the other images' draws and losses did (``docs/learning-status.md``, section 50).
    """
    selection = np.asarray(selection, dtype=bool)
    out = np.empty((len(selection), 2))
    draws = selection.copy()
    for j in range(len(selection)):
        for value in (0, 1):
            draws[j] = bool(value)
            out[j, value] = validation_reward(reward, losses, scores, rejection_ratio, draws)
        draws[j] = selection[j]
    return out


class MovingAverageBaseline:
    """``Rbar_t = a * Rbar_{t-1} + (1 - a) * R_t``, kept per key.

    :meth:`update` returns the baselined reward ``R_t - Rbar_t`` of the paper
    (Rbar includes the current reward; the first reward of a key gives 0).
    Keys let the env keep one baseline per validation mini-batch position.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"baseline decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.values: dict[int, float] = {}

    def update(self, reward: float, key: int = 0) -> float:
        previous = self.values.get(key, reward)
        value = self.decay * previous + (1.0 - self.decay) * reward
        self.values[key] = value
        return reward - value

    def value(self, key: int = 0) -> float | None:
        return self.values.get(key)

    def would_give(self, rewards: np.ndarray, key: int = 0) -> np.ndarray:
        """What :meth:`update` would return for each of ``rewards`` in its place, without updating."""
        rewards = np.asarray(rewards, dtype=np.float64)
        previous = self.values.get(key)
        if previous is None:  # a key's first reward is its own average: 0, whatever it is
            return np.zeros_like(rewards)
        return self.decay * (rewards - previous)

    def reset(self) -> None:
        self.values.clear()


def class_mix_contrast(selection: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray | None:
    """The selection's class mix against the rest's: ``(num_classes - 1,)``, or None.

    Entry ``c - 1`` is the share of class ``c`` among the selected images minus its share among
    the images not selected (class 0 is the reference: the shares of all classes sum to 1 on
    each side).  None when either side is empty.
    """
    selection = np.asarray(selection, dtype=bool)
    classes = np.asarray(classes, dtype=np.int64)
    if not selection.any() or selection.all():
        return None
    one_hot = np.eye(num_classes)[classes][:, 1:]
    return one_hot[selection].mean(0) - one_hot[~selection].mean(0)


class ClassMixCorrection:
    """Removes from a reward the part that a running fit attributes to the selection's class mix.

    The paired fixed reward pays for *which classes* a step selects as well as for the images'
    quality: on the built-in set most of what it explains is a preference for the organ-absent
    frames, whatever their quality (``docs/learning-status.md``, sections 31-32).  A controller
    that follows that term scores a class.  Each reward ``r_t`` is corrected to
    ``r_t - w_t . c_t``, with ``c_t`` the step's :func:`class_mix_contrast` and ``w_t`` the
    least-squares fit of ``r ~ b + w . c`` over the *earlier* steps, each weighted by
    ``decay ** age`` (so that the fit follows the predictor as it trains); then the step joins
    the fit.  Steps without a contrast (one side empty) pass unchanged and are not fitted.  Before
    ``num_classes + 1`` steps have been fitted there is no correction.  :meth:`correct_step` fits
    ``w`` on one step's several draws instead (the env's ``paired_class_correction="step"``).
    """

    def __init__(self, num_classes: int, decay: float = 0.99) -> None:
        if not is_count(num_classes):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not (0.0 < decay <= 1.0):
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        self.num_classes = int(num_classes)
        self.decay = float(decay)
        self.reset()

    def reset(self) -> None:
        dim = self.num_classes  # intercept and one weight per class but the first
        self._gram = np.zeros((dim, dim))
        self._moment = np.zeros(dim)
        self.fitted = 0

    @property
    def weights(self) -> np.ndarray | None:
        """``w`` of the current fit, ``(num_classes - 1,)``; None before enough steps."""
        if self.fitted < self.num_classes + 1:
            return None
        ridge = 1e-9 * max(float(np.trace(self._gram)), 1e-12)
        solution = np.linalg.solve(self._gram + ridge * np.eye(len(self._moment)), self._moment)
        return solution[1:]

    def state_dict(self) -> dict[str, Any]:
        """The fit, as tensors and plain values (``torch.load(weights_only=True)`` reads it)."""
        import torch

        return {
            "num_classes": self.num_classes, "decay": self.decay, "fitted": self.fitted,
            "gram": torch.from_numpy(self._gram.copy()), "moment": torch.from_numpy(self._moment.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a correction with as many classes."""
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(
                f"the class correction's state is for {state['num_classes']} classes, this one has {self.num_classes}"
            )
        self.decay = float(state["decay"])
        self.fitted = int(state["fitted"])
        self._gram = state["gram"].double().cpu().numpy().copy()
        self._moment = state["moment"].double().cpu().numpy().copy()

    def correct(self, reward: float, contrast: np.ndarray | None) -> float:
        """``reward`` less the fitted class term of ``contrast``; then ``(contrast, reward)`` joins the fit."""
        if contrast is None or self.num_classes < 2:
            return float(reward)
        weights = self.weights
        corrected = float(reward) - (float(weights @ contrast) if weights is not None else 0.0)
        self._join(contrast, float(reward))
        return corrected

    def correct_step(self, rewards: np.ndarray, contrasts: list[np.ndarray | None]) -> np.ndarray:
        """The rewards of one step's K draws of the same batch, each less a class term fitted on those draws.

        ``w`` is the least-squares fit of ``r_d ~ b + w . c_d`` over the step's draws that have a
        contrast, so it follows the class term as it is *at this step*, which the running fit of
        :meth:`correct` only averages over the earlier ones.  Where the draws do not determine
        ``w`` (fewer than ``num_classes + 1`` draws with a contrast, or contrasts that do not
        vary), the running fit's ``w`` is used instead (none before it has enough steps).  Then
        every draw joins the running fit.  Returns the corrected rewards, ``(K,)``.
        """
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(contrasts) != len(rewards):
            raise ValueError(f"got {len(rewards)} rewards and {len(contrasts)} contrasts; expected one per draw")
        corrected = rewards.copy()
        if self.num_classes < 2:
            return corrected
        rows = [d for d, c in enumerate(contrasts) if c is not None]
        weights = None
        if len(rows) > self.num_classes:
            design = np.array([np.concatenate([[1.0], contrasts[d]]) for d in rows])
            if np.linalg.matrix_rank(design) == design.shape[1]:
                weights = np.linalg.lstsq(design, rewards[rows], rcond=None)[0][1:]
        if weights is None:
            weights = self.weights
        for d in rows:
            if weights is not None:
                corrected[d] -= float(weights @ contrasts[d])
            self._join(contrasts[d], float(rewards[d]))
        return corrected

    def _join(self, contrast: np.ndarray, reward: float) -> None:
        row = np.concatenate([[1.0], contrast])
        self._gram = self.decay * self._gram + np.outer(row, row)
        self._moment = self.decay * self._moment + row * reward
        self.fitted += 1
