"""RL agents for ``TaskAmenability-v0``: per-sample policies, REINFORCE, DDPG and friends.

Imports go one way: ``experiments -> agents -> iqa_env``.
"""

from agents.controller import Controller
from agents.deterministic import DDPG, TD3
from agents.factory import ALGORITHMS, default_kwargs, make_agent, recommended_env_kwargs
from agents.noise import ProbabilityOUNoise
from agents.reinforce import REINFORCE

__all__ = ["ALGORITHMS", "DDPG", "REINFORCE", "TD3", "Controller", "ProbabilityOUNoise", "default_kwargs", "make_agent", "recommended_env_kwargs"]
