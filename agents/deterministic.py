"""DDPG and TD3 that skip the target networks when the target does not use them, and take a class penalty.

With ``gamma = 0`` (the *validation bandit* that :func:`agents.default_kwargs`
sets up for the weighted and selective rewards) the critic's target is the
reward itself: ``r + (1 - done) * 0 * Q'(s', mu'(s'))``.  stable-baselines3's
``train()`` still runs the target actor and the target critic on the next
observations of every replay batch, two of the per-sample CNN's forward passes
over ``batch_size x B`` images per gradient step, and then multiplies what
they computed by 0.  These classes are stable-baselines3's :class:`DDPG` and
:class:`TD3` with one change: while ``gamma == 0`` the algorithm's
``actor_target`` and ``critic_target`` return zeros of the right shape
without running the networks.  Everything else is stable-baselines3's own
code: the training loop, the soft (Polyak) updates of the target networks
(the wrappers hand out the real targets' parameters), saving and loading
(the wrappers are aliases on the algorithm, not part of the policy).

The update is the same as stable-baselines3's, bit for bit: the skipped
passes draw no random numbers (the target-policy noise is still drawn, in
the training loop) and their output was multiplied by zero.
``tests/test_agents.py`` checks both.  ``iqa bench`` times the gain
(``docs/performance.md``).

``class_balance`` (default 0: off) adds REINFORCE's penalty on the class
separation of the scores (:func:`agents.reinforce.between_class_variance`
of the actor's logits over the images of each sampled batch, times
``class_balance``) to the actor's loss.  The training loop is still
stable-baselines3's: the actor's objective is its critic's ``q1_forward``,
so the algorithm's ``critic`` alias becomes a wrapper whose ``q1_forward``
subtracts the penalty, with the class labels of the batch the replay buffer
sampled last (a buffer of :mod:`agents.buffers` that keeps them; the
algorithm picks the class-keeping variant of the buffer it is given).
Controllers that rank the organ-absent frames of the built-in set low as a
class select fewer of them for training, which the penalty keeps REINFORCE
from (``docs/learning-status.md``, sections 9 and 27).  For DDPG it is an
option: at REINFORCE's weight, 1.0, it reduced that skew on two seeds on
the CPU but set one of them back, and at 0.1 it moved neither the skew nor
the mean (section 27).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from stable_baselines3 import DDPG as SB3DDPG
from stable_baselines3 import TD3 as SB3TD3
from stable_baselines3.common.buffers import ReplayBuffer
from torch import nn

from agents.buffers import WITH_CLASS_LABELS, ClassLabelledSamples, _ClassLabelsMixin
from agents.policies import action_logits
from agents.reinforce import LoadsOnTheEnvsDevice, between_class_variance
from iqa_env.checks import is_non_negative_number
from iqa_env.env import extra_draws

__all__ = ["DDPG", "TD3"]


class _SkippedWhenUndiscounted(nn.Module):
    """Stands in for a target network: zeros while ``undiscounted()``, the network itself otherwise.

    ``outputs`` is ``"action"`` for the target actor (an ``(n, action_dim)``
    tensor) or the number of critics for the target critic (a tuple of
    ``(n, 1)`` tensors), the shapes stable-baselines3's ``train()`` expects.
    """

    def __init__(self, target: nn.Module, outputs: str | int, undiscounted: Callable[[], bool]) -> None:
        super().__init__()
        self.target = target
        self.outputs = outputs
        self._undiscounted = undiscounted

    def forward(self, obs: torch.Tensor, *actions: torch.Tensor) -> Any:
        if not self._undiscounted():
            return self.target(obs, *actions)
        n, device = obs.shape[0], obs.device
        if self.outputs == "action":
            action_dim = int(self.target.action_space.shape[0])  # type: ignore[union-attr,index]
            return torch.zeros((n, action_dim), device=device)
        return tuple(torch.zeros((n, 1), device=device) for _ in range(int(self.outputs)))


class _UndiscountedTargetsMixin:
    """Replaces the algorithm's target aliases by :class:`_SkippedWhenUndiscounted` wrappers."""

    gamma: float
    policy: Any

    def _create_aliases(self) -> None:
        super()._create_aliases()  # type: ignore[misc]

        def undiscounted() -> bool:
            return float(self.gamma) == 0.0

        self.actor_target = _SkippedWhenUndiscounted(self.policy.actor_target, "action", undiscounted)
        self.critic_target = _SkippedWhenUndiscounted(
            self.policy.critic_target, int(self.policy.critic.n_critics), undiscounted
        )


class _ClassBalancedCritic(nn.Module):
    """The algorithm's ``critic`` alias with ``class_balance``: ``q1_forward`` minus the class penalty.

    ``q1_forward`` is the actor's objective in stable-baselines3's DDPG/TD3
    ``train()``; here it also subtracts ``weight() * between_class_variance``
    of the actor's logits ``u_i = 2 atanh(a_i)`` over the images of each
    observation, with the class labels and validity from ``labels()`` (those
    of the replay batch sampled last).  Everything else is the critic's own:
    its forward pass, parameters and optimiser.
    """

    def __init__(
        self,
        critic: nn.Module,
        weight: Callable[[], float],
        labels: Callable[[], ClassLabelledSamples | None],
    ) -> None:
        super().__init__()
        self.critic = critic
        self._weight = weight
        self._labels = labels

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.critic.optimizer  # type: ignore[return-value]

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> Any:
        return self.critic(obs, actions)

    def q1_forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        q = self.critic.q1_forward(obs, actions)
        weight = self._weight()
        if weight <= 0:
            return q
        sample = self._labels()
        if sample is None or sample.classes.shape != actions.shape:
            raise RuntimeError(
                "class_balance needs the class labels of the batch the actor is trained on: the replay buffer's "
                f"last sample has labels of shape {None if sample is None else tuple(sample.classes.shape)}, "
                f"the actions have shape {tuple(actions.shape)}"
            )
        penalty = between_class_variance(action_logits(actions), sample.classes, sample.valid)
        return q - weight * penalty.unsqueeze(1)


class _ClassBalanceMixin:
    """``class_balance``: the class penalty in the actor's loss (see the module's docstring)."""

    policy: Any
    replay_buffer: Any
    replay_buffer_class: type[ReplayBuffer] | None

    def __init__(self, *args: Any, class_balance: float = 0.0, **kwargs: Any) -> None:
        if not is_non_negative_number(class_balance):
            raise ValueError(f"class_balance must be a finite number >= 0, got {class_balance!r}")
        self.class_balance = float(class_balance)
        super().__init__(*args, **kwargs)

    def _setup_model(self) -> None:
        if self.class_balance > 0:
            buffer = self.replay_buffer_class or ReplayBuffer
            if not issubclass(buffer, _ClassLabelsMixin):
                if buffer not in WITH_CLASS_LABELS:
                    raise ValueError(
                        f"class_balance > 0 needs a replay buffer that keeps each transition's class labels; "
                        f"{buffer.__name__} has no such variant (those of {[b.__name__ for b in WITH_CLASS_LABELS]} "
                        "do, from agents.buffers)"
                    )
                self.replay_buffer_class = WITH_CLASS_LABELS[buffer]
        super()._setup_model()  # type: ignore[misc]

    def _create_aliases(self) -> None:
        super()._create_aliases()  # type: ignore[misc]
        if self.class_balance > 0:
            self.critic = _ClassBalancedCritic(
                self.policy.critic,
                lambda: self.class_balance,
                lambda: getattr(self.replay_buffer, "last_samples", None),
            )


class _StoredSelectionsMixin:
    """``store_selections``: the replay buffer keeps the env's Bernoulli draws as each step's action.

    ``TaskAmenability-v0`` draws the selections from the action's
    probabilities, and its rewards measure the draws (``info["rewarded_action"]
    == "selection"``: every training step, and validation steps with
    ``stochastic_validation``).  A critic fitted on the probabilities has to
    learn the reward averaged over the draws, from one draw per step; fitted on
    the draws themselves (mapped to the [-1, 1] scaled space: selected 1, not
    selected -1), it sees which images the reward was for.  The actor still
    acts with probabilities, which the critic scores between its binary
    inputs (the ratio critic, :class:`~agents.policies.RatioQNetwork`, is then
    the mean over the selected images, weighted by the probabilities).  Steps
    whose reward measures the probabilities themselves keep them.  Off by
    default; ``docs/learning-status.md`` (section 31) has what it was
    measured to do.

    An env that probes further draws of each step (``TaskAmenability-v0``'s
    ``paired_draws``, reported as ``info["extra_selections"]`` and
    ``info["extra_rewards"]``) has each of them stored as a transition of
    its own, with the step's observations: K measured selections of one
    batch for the critic to tell its images apart by.
    """

    def __init__(self, *args: Any, store_selections: bool = False, **kwargs: Any) -> None:
        if not isinstance(store_selections, (bool, np.bool_)):
            raise TypeError(f"store_selections must be True or False, got {type(store_selections).__name__}")
        self.store_selections = bool(store_selections)
        super().__init__(*args, **kwargs)

    def _store_transition(
        self,
        replay_buffer: Any,
        buffer_action: np.ndarray,
        new_obs: Any,
        reward: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        if self.store_selections:
            missing = [i for i, info in enumerate(infos) if "rewarded_action" not in info or "selection" not in info]
            if missing:
                raise ValueError(
                    "store_selections needs the env to report each step's Bernoulli draws and what its "
                    "reward measures (info['selection'] and info['rewarded_action'], as TaskAmenability-v0 "
                    f"does); envs {missing} did not"
                )
            buffer_action = np.array(buffer_action, copy=True)
            for i, info in enumerate(infos):
                if info["rewarded_action"] == "selection":
                    buffer_action[i] = _scaled_draw(info["selection"], info, buffer_action[i])
            extras = self._extra_draws(buffer_action, infos)
            if extras:
                replay_buffer = _WithExtraDraws(replay_buffer, extras)
        super()._store_transition(replay_buffer, buffer_action, new_obs, reward, dones, infos)  # type: ignore[misc]

    def _extra_draws(
        self, buffer_action: np.ndarray, infos: list[dict[str, Any]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(actions, rewards)`` per further draw of the step (the env's ``paired_draws``), every env at once."""
        draws = [extra_draws(info) for info in infos]
        counts = {len(rewards) for _, rewards in draws}
        if counts == {0}:
            return []
        if len(counts) > 1:
            raise ValueError(
                f"store_selections needs every env to report as many further draws per step, got {sorted(counts)}"
            )
        if getattr(self, "_vec_normalize_env", None) is not None:
            raise ValueError(
                "store_selections cannot store the env's further draws (paired_draws) under VecNormalize: their "
                "rewards are the env's own, not normalised"
            )
        extras = []
        for k in range(counts.pop()):
            actions = np.array(buffer_action, copy=True)
            for i, info in enumerate(infos):
                actions[i] = _scaled_draw(draws[i][0][k], info, buffer_action[i])
            extras.append((actions, np.array([rewards[k] for _, rewards in draws], dtype=np.float32)))
        return extras


def _scaled_draw(drawn: Any, info: dict[str, Any], fallback: np.ndarray) -> np.ndarray:
    """A Bernoulli draw as an action in the scaled space (selected 1, not -1); padding keeps ``fallback``."""
    drawn = np.asarray(drawn, dtype=bool).reshape(fallback.shape)
    valid = np.asarray(info.get("valid", np.ones_like(drawn)), dtype=bool).reshape(drawn.shape)
    return np.where(valid, np.where(drawn, 1.0, -1.0), fallback)


class _WithExtraDraws:
    """A replay buffer whose ``add`` also stores the step's further draws, each with the same observations."""

    def __init__(self, buffer: Any, extras: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.buffer, self.extras = buffer, extras

    def add(self, obs: Any, next_obs: Any, action: np.ndarray, reward: np.ndarray, done: np.ndarray, infos: list) -> None:
        self.buffer.add(obs, next_obs, action, reward, done, infos)
        for actions, rewards in self.extras:
            self.buffer.add(obs, next_obs, actions, rewards, done, infos)


class DDPG(LoadsOnTheEnvsDevice, _StoredSelectionsMixin, _ClassBalanceMixin, _UndiscountedTargetsMixin, SB3DDPG):
    """stable-baselines3's :class:`~stable_baselines3.DDPG`; with ``gamma = 0`` the target networks are not run.

    ``DDPG.load(path, env=env)`` puts it on the env's device (:class:`~agents.reinforce.LoadsOnTheEnvsDevice`).

    :param class_balance: weight of the penalty on the class separation of the actor's logits
        (default 0: none); see the module's docstring.
    :param store_selections: keep the env's Bernoulli draws, not the probabilities, as the stored
        actions of the steps whose reward measures the draws (default False); see
        :class:`_StoredSelectionsMixin`.
    """


class TD3(LoadsOnTheEnvsDevice, _StoredSelectionsMixin, _ClassBalanceMixin, _UndiscountedTargetsMixin, SB3TD3):
    """stable-baselines3's :class:`~stable_baselines3.TD3`; with ``gamma = 0`` the target networks are not run.

    :param class_balance: as :class:`DDPG`'s.
    :param store_selections: as :class:`DDPG`'s.
    """
