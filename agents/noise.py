"""Exploration noise for DDPG in the env's units (selection probabilities)."""

from __future__ import annotations

import math

import numpy as np
from stable_baselines3.common.noise import ActionNoise


class ProbabilityOUNoise(ActionNoise):
    """Ornstein-Uhlenbeck noise whose *stationary* standard deviation is ``sigma`` probability units.

    ``x_{t+1} = (1 - theta) x_t + sigma * sqrt(theta (2 - theta)) * N(0, 1)``,
    whose stationary distribution is ``N(0, sigma^2)``; after :meth:`reset` the
    state is drawn from that distribution, so exploration is at full strength
    from the first step of every episode.

    Why not SB3's ``OrnsteinUhlenbeckActionNoise``: it adds noise in SB3's
    [-1, 1] scaled action space, where one probability unit is two scaled
    units, and with its default ``dt = 0.01`` and a reset to zero each episode
    the noise stays near ``sigma * sqrt(dt * t)``: about 0.04 after 20 steps
    for ``sigma = 0.2``, i.e. no exploration in short episodes.  This class
    returns noise already multiplied by 2, for the scaled space that SB3's
    DDPG/TD3 add it in.  It draws from its own seeded generator.
    """

    def __init__(self, size: int, sigma: float = 0.2, theta: float = 0.15, seed: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0 < theta <= 1:
            raise ValueError(f"theta (mean reversion per step) must be in (0, 1], got {theta}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        super().__init__()
        self.size, self.sigma, self.theta = size, float(sigma), float(theta)
        self._innovation = self.sigma * math.sqrt(self.theta * (2.0 - self.theta))
        self._rng = np.random.default_rng(seed)
        self._state = np.zeros(size)
        self.reset()

    def seed(self, seed: int | None) -> None:
        self._rng = np.random.default_rng(seed)
        self.reset()

    def reset(self) -> None:
        self._state = self._rng.normal(0.0, self.sigma, self.size)

    def __call__(self) -> np.ndarray:
        self._state = (1.0 - self.theta) * self._state + self._innovation * self._rng.normal(size=self.size)
        return (2.0 * self._state).astype(np.float32)  # probability units -> SB3's scaled units

    def __repr__(self) -> str:
        return f"ProbabilityOUNoise(size={self.size}, sigma={self.sigma}, theta={self.theta})"
