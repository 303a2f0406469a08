"""DDPG and TD3 that skip the target networks when the target does not use them.

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from stable_baselines3 import DDPG as SB3DDPG
from stable_baselines3 import TD3 as SB3TD3
from torch import nn

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


class DDPG(_UndiscountedTargetsMixin, SB3DDPG):
    """stable-baselines3's :class:`~stable_baselines3.DDPG`; with ``gamma = 0`` the target networks are not run."""


class TD3(_UndiscountedTargetsMixin, SB3TD3):
    """stable-baselines3's :class:`~stable_baselines3.TD3`; with ``gamma = 0`` the target networks are not run."""
