"""Checks of the algorithms' own settings, by name, before an agent is built.

stable-baselines3 takes most of its settings as given: ``gamma="0.9"``,
``gamma=1.5``, ``tau=2.0``, ``batch_size=0`` or ``buffer_size=-1`` build an
agent that trains (or fails thousands of steps later with an error that names
no setting), and ``learning_starts=-5`` or ``n_epochs=0`` fail inside
``learn()`` with numpy's ``high <= 0`` or an ``UnboundLocalError``.  A JSON
``--agent-kwargs`` makes such values easy to give.  :func:`check_settings`
refuses them before anything is built, with a ``ValueError`` that names the
setting, the value and what is expected; :func:`agents.factory.make_agent`
calls it for every algorithm, and :class:`agents.reinforce.REINFORCE` checks
the settings it shares with stable-baselines3 (``gamma``, ``n_steps``,
``ent_coef``, ``max_grad_norm``) with :func:`check_setting`, so the words are
the same wherever a setting is refused.  The per-sample policies of
:mod:`agents.policies` check their ``policy_kwargs`` (``width``,
``critic_hidden``, ``saturation_penalty``, ``centre_logits``, ...) with it too:
``centre_logits="no"`` had been taken as on, and a negative
``saturation_penalty`` as a reward for saturated actions.  stable-baselines3's
own policy settings are checked too: ``net_arch`` had been dropped without a
word (the per-sample policies have no hidden layers after the controller's
features), ``use_sde=True`` failed inside SAC's constructor with a ``TypeError``
and changed PPO's per-image exploration into one drawn from every image's
features, and a ``log_std_init`` of ``"x"`` or ``nan`` failed in ``learn()``.
Settings not named here are left to the algorithm.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from iqa_env.checks import (
    is_count,
    is_finite_number,
    is_flag,
    is_integer,
    is_non_negative_number,
    is_number,
    is_open_probability,
    is_positive_number,
    is_whole_number,
)

Check = tuple[Callable[[Any], bool], str]


def _fraction(value: Any) -> bool:
    return is_number(value) and 0 <= value <= 1


def _soft_update_rate(value: Any) -> bool:
    return is_number(value) and 0 < value <= 1


def _gradient_steps(value: Any) -> bool:
    return is_count(value) or (is_integer(value) and value == -1)


def _train_freq(value: Any) -> bool:
    if is_count(value):
        return True
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and is_count(value[0])
        and getattr(value[1], "value", value[1]) in ("step", "episode")  # a name, or stable-baselines3's TrainFrequencyUnit
    )


def _positive_or_schedule(value: Any) -> bool:
    return is_positive_number(value) or callable(value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _off(value: Any) -> bool:
    return is_flag(value) and not value


def _on(value: Any) -> bool:
    return is_flag(value) and bool(value)


def _buffer_class(base: str) -> Callable[[Any], bool]:
    """A stable-baselines3 buffer class of ``base`` (``"ReplayBuffer"``, ``"RolloutBuffer"``), or a name
    (``agents.factory.REPLAY_BUFFERS``, whose names the factory checks)."""

    def valid(value: Any) -> bool:
        from stable_baselines3.common import buffers

        return isinstance(value, str) or _subclass_of(getattr(buffers, base))(value)

    return valid


def _sde_sample_freq(value: Any) -> bool:
    return is_integer(value) and value >= -1


def _no_hidden_layers(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple)) and len(value) == 0)


def _target_entropy(value: Any) -> bool:
    return value == "auto" or is_finite_number(value)


def _path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _mapping(value: Any) -> bool:
    return isinstance(value, Mapping)


def _subclass_of(base: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, type) and issubclass(value, base)


def _action_noise(value: Any) -> bool:
    from stable_baselines3.common.noise import ActionNoise

    return isinstance(value, ActionNoise)


def _sac_ent_coef(value: Any) -> bool:
    if is_positive_number(value):
        return True
    if not isinstance(value, str) or not value.startswith("auto"):
        return False
    if value == "auto":
        return True
    try:
        return value[4] == "_" and is_positive_number(float(value[5:]))
    except (IndexError, ValueError):
        return False


CHECKS: dict[str, Check] = {
    "gamma": (_fraction, "a number in [0, 1]"),
    "gae_lambda": (_fraction, "a number in [0, 1]"),
    "tau": (_soft_update_rate, "a number in (0, 1] (the target networks' soft-update rate)"),
    "batch_size": (is_count, "a whole number >= 1"),
    "buffer_size": (is_count, "a whole number >= 1"),
    "learning_starts": (is_whole_number, "a whole number >= 0"),
    "train_freq": (_train_freq, 'a whole number >= 1 or a pair [n >= 1, "step" or "episode"]'),
    "gradient_steps": (_gradient_steps, "a whole number >= 1, or -1 (as many as the env steps collected)"),
    "n_steps": (is_count, "a whole number >= 1"),
    "n_epochs": (is_count, "a whole number >= 1"),
    "policy_delay": (is_count, "a whole number >= 1"),
    "target_update_interval": (is_count, "a whole number >= 1"),
    "target_policy_noise": (is_non_negative_number, "a finite number >= 0"),
    "target_noise_clip": (is_non_negative_number, "a finite number >= 0"),
    "clip_range": (_positive_or_schedule, "a positive finite number or a schedule"),
    "clip_range_vf": (_optional(_positive_or_schedule), "None, a positive finite number or a schedule"),
    "target_kl": (_optional(is_positive_number), "None or a positive finite number"),
    "ent_coef": (is_finite_number, "a finite number (the entropy bonus's weight)"),
    "vf_coef": (is_non_negative_number, "a finite number >= 0"),
    "max_grad_norm": (is_positive_number, "a positive finite number"),
    "normalize_advantage": (is_flag, "True or False"),
    "use_sde": (
        _off,
        "False (the per-sample policies explore each image on its own; stable-baselines3's state-dependent "
        "exploration would draw each image's noise from every image's features)",
    ),
    "sde_sample_freq": (_sde_sample_freq, "a whole number >= -1"),
    "replay_buffer_class": (
        _optional(_buffer_class("ReplayBuffer")),
        "None, a stable-baselines3 ReplayBuffer class or a name of agents.factory.REPLAY_BUFFERS",
    ),
    "rollout_buffer_class": (_optional(_buffer_class("RolloutBuffer")), "None or a stable-baselines3 RolloutBuffer class"),
    "optimize_memory_usage": (is_flag, "True or False"),
    "target_entropy": (_target_entropy, "'auto' or a finite number"),
    "action_noise": (_optional(_action_noise), "None or a stable-baselines3 ActionNoise (e.g. NormalActionNoise(mean, sigma))"),
    "stats_window_size": (is_count, "a whole number >= 1"),
    "use_rms_prop": (is_flag, "True or False"),
    "rms_prop_eps": (is_positive_number, "a positive finite number"),
    "policy_kwargs": (_optional(_mapping), "None or a dict of the policy's arguments"),
    "replay_buffer_kwargs": (_optional(_mapping), "None or a dict of the replay buffer's arguments"),
    "rollout_buffer_kwargs": (_optional(_mapping), "None or a dict of the rollout buffer's arguments"),
    "verbose": (is_whole_number, "a whole number >= 0 (0: quiet, 1: info, 2: debug)"),
    "tensorboard_log": (_optional(_path), "None or a folder path"),
    # settings of stable-baselines3's policies, given in policy_kwargs
    "net_arch": (
        _no_hidden_layers,
        "left out (None or []): the per-sample policies put one head per image on the controller's features; "
        "size the controller with features_extractor_kwargs' width and embed_dim, and the critics with critic_hidden",
    ),
    # state-dependent exploration's own: without use_sde they would be ignored, or fail an assertion
    "full_std": (_on, "True (a setting of state-dependent exploration, use_sde, which the per-sample policies do not use)"),
    "use_expln": (_off, "False (a setting of state-dependent exploration, use_sde, which the per-sample policies do not use)"),
    "squash_output": (_off, "False (stable-baselines3 squashes only with state-dependent exploration, use_sde, "
                      "which the per-sample policies do not use)"),
    "log_std_init": (is_finite_number, "a finite number (the log of the exploration's starting standard deviation)"),
    "n_critics": (is_count, "a whole number >= 1"),
    "ortho_init": (is_flag, "True or False"),
    "share_features_extractor": (is_flag, "True or False"),
    "normalize_images": (is_flag, "True or False"),
    "optimizer_kwargs": (_optional(_mapping), "None or a dict of the optimiser's arguments"),
    "features_extractor_kwargs": (_optional(_mapping), "None or a dict of the features extractor's arguments"),
    "activation_fn": (_subclass_of(nn.Module), "a torch.nn.Module class (e.g. torch.nn.ReLU)"),
    "optimizer_class": (_subclass_of(torch.optim.Optimizer), "a torch.optim.Optimizer class (e.g. torch.optim.Adam)"),
    # the per-sample policies' own (agents.policies), given in policy_kwargs
    "width": (is_count, "a whole number >= 1 (the controller's channels)"),
    "embed_dim": (is_count, "a whole number >= 1 (each image's embedding size)"),
    "critic_hidden": (is_count, "a whole number >= 1"),
    "saturation_penalty": (is_non_negative_number, "a finite number >= 0"),
    "centre_logits": (is_flag, "True or False"),
    "initial_selection_probability": (is_open_probability, "a number in (0, 1)"),
}
"""Each checked setting's test and the words of what it expects."""

ALGORITHM_CHECKS: dict[str, dict[str, Check]] = {
    "sac": {"ent_coef": (_sac_ent_coef, "'auto', 'auto_<initial value>' or a positive finite number")},
}
"""Settings whose meaning differs in one algorithm (SAC's ``ent_coef`` may be learnt)."""


def check_setting(name: str, value: Any, algorithm: str | None = None) -> None:
    """Raises ``ValueError`` naming ``name`` if ``value`` is not what the setting takes (unchecked names pass)."""
    check = ALGORITHM_CHECKS.get(algorithm or "", {}).get(name) or CHECKS.get(name)
    if check is None:
        return
    valid, expected = check
    if not valid(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_settings(algorithm: str, settings: Mapping[str, Any]) -> None:
    """Checks every setting of ``settings`` that :data:`CHECKS` names, for ``algorithm`` (e.g. ``"ppo"``)."""
    for name, value in settings.items():
        check_setting(name, value, algorithm)


def accepted_names(cls: type) -> frozenset[str]:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s, and its bases' while each passes ``**kwargs`` on.

    Private ones (``_init_setup_model``) are left out.
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        keywords = (p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        names.update(name for name in keywords if name != "self" and not name.startswith("_"))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return frozenset(names)


def check_names(given: Iterable[str], levels: Mapping[str, tuple[frozenset[str], str]], level: str) -> None:
    """Raises ``ValueError`` for a name of ``given`` that ``level`` does not take.

    ``levels`` maps each place a setting can be given (``"ppo"``,
    ``"policy_kwargs"``, ...) to the names taken there and the words for
    where that is (``"in policy_kwargs"``); the message tells a misplaced
    setting where it belongs, or names the closest name taken here.
    Python's own ``unexpected keyword argument`` said neither.
    """
    accepted = levels[level][0]
    for name in given:
        if name in accepted:
            continue
        elsewhere = [(other, where) for other, (names, where) in levels.items() if other != level and name in names]
        if elsewhere:
            hint = f"it is a setting of {elsewhere[0][0]}: give it {elsewhere[0][1]}"
        else:
            close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.8)
            hint = f"did you mean {close[0]!r}?" if close else "the names it takes: " + ", ".join(sorted(accepted))
        raise ValueError(f"{level} takes no setting {name!r}; {hint}")
