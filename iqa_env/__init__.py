"""Task-amenability image quality assessment as a Gymnasium environment.

``import iqa_env`` registers ``TaskAmenability-v0`` and does nothing else:
no prints, no heavy imports (torch is imported when the env is made).
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

ENV_ID = "TaskAmenability-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="iqa_env.env:TaskAmenabilityEnv")

__all__ = ["ENV_ID", "__version__"]
