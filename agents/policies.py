"""Per-sample policies for stable-baselines3 on ``TaskAmenability-v0``.

An observation is a mini-batch of ``B`` images and an action is one selection
probability per image, so the natural policy applies the *same* controller
CNN to every image (permutation-equivariant actor) and the natural critic
pools per-image embeddings with their actions (permutation-invariant).

- :class:`PerSampleExtractor`: the controller backbone's trunk applied to each
  image; features ``(N, B * D)`` (SB3 wants flat features).
- :class:`PerSampleHead`: one linear map ``D -> 1`` per image, ``(N, B * D) -> (N, B)``.
- :class:`PooledQNetwork`: ``Q(s, a) = g(mean_i f([e_i, a_i]))``.
- :class:`PerSampleTD3Policy` (DDPG, TD3), :class:`PerSampleSACPolicy` (SAC),
  :class:`PerSampleActorCriticPolicy` (PPO, A2C) and
  :class:`BernoulliSelectionPolicy` (REINFORCE).

Each policy can hand its controller to :class:`agents.controller.Controller`
through :meth:`controller_parts`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy, ContinuousCritic
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.sac.policies import Actor as SACActor
from stable_baselines3.sac.policies import SACPolicy
from stable_baselines3.td3.policies import Actor as TD3Actor
from stable_baselines3.td3.policies import TD3Policy
from torch import nn

from agents.settings import check_setting
from iqa_env.networks import ControllerBackbone


def _batch_shape(observation_space: spaces.Space) -> tuple[int, int, int, int]:
    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 4:
        raise ValueError(
            "per-sample policies need observations of shape (B, C, H, W) (a mini-batch of images, "
            f"as TaskAmenability-v0 gives), got {observation_space}"
        )
    return tuple(int(s) for s in observation_space.shape)  # type: ignore[return-value]


class PerSampleExtractor(BaseFeaturesExtractor):
    """The controller trunk applied image by image: ``(N, B, C, H, W)`` -> ``(N, B * D)``.

    Observations reach SB3 extractors as floats in [0, 255] (a batch of images
    is not an "image space" to SB3, so it does not rescale); they are scaled to
    [0, 1] here, as :class:`~iqa_env.networks.ControllerBackbone` expects.
    """

    def __init__(self, observation_space: spaces.Box, width: int = 16, embed_dim: int = 64) -> None:
        check_setting("width", width)
        check_setting("embed_dim", embed_dim)
        b, c, h, w = _batch_shape(observation_space)
        super().__init__(observation_space, features_dim=b * embed_dim)
        self.batch_size, self.embed_dim, self.width = b, embed_dim, width
        self.image_shape = (c, h, w)
        self.trunk = ControllerBackbone((c, h, w), width=width, embed_dim=embed_dim)
        self.trunk.head = nn.Identity()  # the heads live in the actors; only the trunk is shared

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        n = observations.shape[0]
        images = observations.reshape(n * self.batch_size, *observations.shape[2:]).float() / 255.0
        return self.trunk.embed(images).reshape(n, self.batch_size * self.embed_dim)


class PerSampleHead(nn.Module):
    """The same ``Linear(D, 1)`` on each image's features: ``(N, B * D)`` -> ``(N, B)``."""

    def __init__(self, embed_dim: int, bias: float = 0.0, gain: float = 1.0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.linear = nn.Linear(embed_dim, 1)
        with torch.no_grad():
            self.linear.weight.mul_(gain)
            self.linear.bias.fill_(bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n = features.shape[0]
        return self.linear(features.reshape(n, -1, self.embed_dim)).squeeze(-1)


def _split(features_and_actions: torch.Tensor, batch_size: int, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SB3's concatenated critic input ``(N, B * D + B)`` -> embeddings ``(N, B, D)``, actions ``(N, B)``."""
    n = features_and_actions.shape[0]
    split = batch_size * embed_dim
    embeddings = features_and_actions[:, :split].reshape(n, batch_size, embed_dim)
    return embeddings, features_and_actions[:, split:].reshape(n, batch_size)


class PooledQNetwork(nn.Module):
    """``Q(s, a) = g(mean_i f([e_i, a_i]))`` on SB3's concatenated ``[features, actions]`` input."""

    def __init__(self, batch_size: int, embed_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.batch_size, self.embed_dim = batch_size, embed_dim
        self.per_sample = nn.Sequential(nn.Linear(embed_dim + 1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.pooled = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features_and_actions: torch.Tensor) -> torch.Tensor:
        embeddings, actions = _split(features_and_actions, self.batch_size, self.embed_dim)
        return self.pooled(self.per_sample(torch.cat([embeddings, actions.unsqueeze(-1)], dim=-1)).mean(dim=1))


def standardise_mode(value: bool | str) -> str | None:
    """``critic_standardise`` as a mode: ``None`` (off), ``"dim"`` (``True``), ``"global"`` or ``"floor"``."""
    if value is False or value is None:
        return None
    if value is True or value == "dim":
        return "dim"
    if value in ("global", "floor"):
        return value
    raise ValueError(f"critic_standardise must be true, false, 'dim', 'global' or 'floor', got {value!r}")


class RatioQNetwork(nn.Module):
    """``Q(s, a) = b + w mean_i c_i - sum_i h_i c_i / sum_i h_i``: the weighted reward's own form.

    ``h_i = (a_i + 1) / 2`` is image ``i``'s selection probability (SB3 hands
    the critic actions in the [-1, 1] scaled space) and ``c_i = c(e_i)`` a
    per-image MLP on the critic's embedding: the critic's estimate of image
    ``i``'s validation loss.  The weighted reward of a validation batch is
    ``-sum_i h_i l_i / sum_i h_i`` minus a baseline: the batch's unweighted
    mean loss with ``reward_baseline="non_selective"`` (``w = 1``) or a
    slowly moving average (``w = 0``; the bias ``b`` absorbs it); ``w`` is
    learnt.  Fitting this critic is a regression of each validation reward on
    per-image losses with the aggregation known, instead of asking a generic
    pooled MLP to discover a ratio.  Its action gradient
    ``dQ/dh_j = -(c_j - Q_w) / sum_i h_i`` (``Q_w`` the weighted mean of
    ``c``) raises the scores of images whose loss is below the batch's, and
    is unchanged when every ``h`` is scaled: no drift towards all-0 or all-1.
    See ``docs/design-decisions.md``.

    With ``standardise`` the embeddings are standardised across the batch's
    images first (each dimension to mean 0 and st.d. 1 over the ``B``
    images of an observation), so ``c`` sees how the images differ, at a
    scale the trunk cannot shrink.  Without it a trunk whose embeddings
    barely differ between images at initialisation can be driven, within
    the first few dozen gradient steps, to embeddings that do not differ at
    all: ``c`` is then the same for every image, ``dQ/dh`` is 0, and the
    actor stops learning for good (``docs/learning-status.md``, section 20).
    ``standardise="global"`` centres each dimension the same way but divides
    them all by one scale, the root mean square over the batch's images and
    the embedding's dimensions: the trunk still cannot shrink the images'
    differences away, and the dimensions along which it spreads them most
    weigh most, as without standardisation, instead of every dimension
    counting alike (section 25).  ``standardise="floor"`` leaves the
    embeddings plain while their root mean square difference from the
    batch's mean is at least :attr:`SPREAD_FLOOR` and scales the differences
    back up to it below (0.046-0.063 at initialisation on the built-in set).
    Both are options; section 25 measured them against the default.
    """

    SPREAD_FLOOR: float = 0.05

    def __init__(
        self, batch_size: int, embed_dim: int, hidden: int = 64, eps: float = 1e-3, standardise: bool | str = False
    ) -> None:
        super().__init__()
        self.batch_size, self.embed_dim, self.eps = batch_size, embed_dim, eps
        self.standardise = standardise_mode(standardise)
        self.per_sample = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.bias = nn.Parameter(torch.zeros(1))
        self.mean_weight = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, features_and_actions: torch.Tensor) -> torch.Tensor:
        embeddings, actions = _split(features_and_actions, self.batch_size, self.embed_dim)
        if self.standardise:
            mean = embeddings.mean(dim=1, keepdim=True)
            centred = embeddings - mean
            dims = (1,) if self.standardise == "dim" else (1, 2)
            spread = centred.pow(2).mean(dim=dims, keepdim=True).sqrt()
            if self.standardise == "floor":
                embeddings = mean + centred * (self.SPREAD_FLOOR / (spread + 1e-12)).clamp(min=1.0)
            else:
                embeddings = centred / (spread + self.eps)
        h = 0.5 * (actions + 1.0)
        c = self.per_sample(embeddings).squeeze(-1)
        q = self.bias + self.mean_weight * c.mean(1) - (h * c).sum(1) / (h.sum(1) + self.eps)
        return q.unsqueeze(-1)


#: Critic heads of the DDPG/TD3/SAC policies, by name.
CRITIC_HEADS: dict[str, type[nn.Module]] = {"pooled": PooledQNetwork, "ratio": RatioQNetwork}


def action_logits(actions: torch.Tensor) -> torch.Tensor:
    """The controller logits ``u = 2 atanh(a)`` of DDPG/TD3 actions ``a`` in [-1, 1] (kept off +-1)."""
    return 2.0 * torch.atanh(actions.clamp(-1 + 1e-6, 1 - 1e-6))


class PooledCritic(ContinuousCritic):
    """SB3's continuous critic with :class:`PooledQNetwork` heads (permutation-invariant).

    ``q1_forward`` (used only for the actor's objective in DDPG/TD3) also
    subtracts ``saturation_penalty * mean(u_i^2)``, ``u_i`` the actor's
    pre-activation logits: the known failure of DDPG with many action
    dimensions is actions pinned at 0 or 1, where the squashing function has no
    gradient left; the penalty keeps the logits in the range where it has.
    """

    def __init__(
        self,
        *args: Any,
        hidden: int = 64,
        saturation_penalty: float = 1e-3,
        head: str = "pooled",
        standardise: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if head not in CRITIC_HEADS:
            raise ValueError(f"critic head must be one of {tuple(CRITIC_HEADS)}, got {head!r}")
        if standardise and head != "ratio":
            raise ValueError(f"critic_standardise needs the 'ratio' critic head, got head {head!r}")
        extractor: PerSampleExtractor = self.features_extractor  # type: ignore[assignment]
        self.saturation_penalty = saturation_penalty
        self.q_networks = []
        head_kwargs = {"standardise": standardise} if standardise else {}
        for idx in range(self.n_critics):
            q_net = CRITIC_HEADS[head](extractor.batch_size, extractor.embed_dim, hidden, **head_kwargs)
            self.add_module(f"qf{idx}", q_net)
            self.q_networks.append(q_net)

    def q1_forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        q = super().q1_forward(obs, actions)
        if self.saturation_penalty > 0:
            q = q - self.saturation_penalty * action_logits(actions).pow(2).mean(dim=1, keepdim=True)
        return q


class PerSampleTD3Actor(TD3Actor):
    """DDPG/TD3 actor: ``action_i = tanh(u_i / 2) = 2 h_i - 1``, ``u_i`` the controller logit.

    SB3 acts in the [-1, 1] scaled space; the env's [0, 1] probability is
    ``h_i = sigmoid(u_i)``.  With ``centre_logits`` the logits are centred on
    the batch first (``u_i - mean_j u_j``), as :class:`BernoulliSelectionPolicy`
    does: the batch's selection rate stays near one half whatever the scores'
    offset, so the task predictor keeps training on a broad part of every
    batch (the paper's constraint ``E[h] >= c``), and the exported controller
    (uncentred logits) ranks images the same way.
    """

    def __init__(self, *args: Any, centre_logits: bool = False, **kwargs: Any) -> None:
        kwargs["net_arch"] = []
        super().__init__(*args, **kwargs)
        self.centre_logits = centre_logits
        self.mu = PerSampleHead(self.features_extractor.embed_dim)  # type: ignore[union-attr]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        logits = self.mu(self.extract_features(obs, self.features_extractor))
        if self.centre_logits:
            logits = logits - logits.mean(dim=1, keepdim=True)
        return torch.tanh(0.5 * logits)


class PerSampleTD3Policy(TD3Policy):
    """TD3/DDPG policy: per-sample actor (:class:`PerSampleTD3Actor`), pooled critic."""

    def __init__(
        self,
        *args: Any,
        critic_hidden: int = 64,
        saturation_penalty: float = 1e-3,
        critic_head: str = "pooled",
        centre_logits: bool = False,
        critic_standardise: bool | str = False,
        features_extractor_class: type[BaseFeaturesExtractor] = PerSampleExtractor,
        **kwargs: Any,
    ) -> None:
        for name, value in (
            ("critic_hidden", critic_hidden), ("saturation_penalty", saturation_penalty), ("centre_logits", centre_logits)
        ):
            check_setting(name, value)
        self._critic_hidden, self._saturation_penalty = critic_hidden, saturation_penalty
        self._critic_head, self._centre_logits = critic_head, centre_logits
        self._critic_standardise = critic_standardise
        super().__init__(*args, features_extractor_class=features_extractor_class, **kwargs)

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> PerSampleTD3Actor:
        actor_kwargs = self._update_features_extractor(self.actor_kwargs, features_extractor)
        return PerSampleTD3Actor(**actor_kwargs, centre_logits=self._centre_logits).to(self.device)

    def make_critic(self, features_extractor: BaseFeaturesExtractor | None = None) -> PooledCritic:
        critic_kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        return PooledCritic(
            **critic_kwargs,
            hidden=self._critic_hidden,
            saturation_penalty=self._saturation_penalty,
            head=self._critic_head,
            standardise=self._critic_standardise,
        ).to(self.device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            critic_hidden=self._critic_hidden,
            saturation_penalty=self._saturation_penalty,
            critic_head=self._critic_head,
            centre_logits=self._centre_logits,
            critic_standardise=self._critic_standardise,
        )
        return data

    def controller_parts(self) -> tuple[PerSampleExtractor, nn.Linear, float, str]:
        """(trunk owner, per-sample linear head, logit scale, output) of the controller."""
        return self.actor.features_extractor, self.actor.mu.linear, 1.0, "sigmoid"  # type: ignore[return-value]


class PerSampleSACActor(SACActor):
    """SAC actor with per-sample mean and log-std heads (squashed Gaussian per image)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["net_arch"] = []
        super().__init__(*args, **kwargs)
        embed_dim = self.features_extractor.embed_dim  # type: ignore[union-attr]
        self.mu = PerSampleHead(embed_dim)
        self.log_std = PerSampleHead(embed_dim, bias=-1.0)  # type: ignore[assignment]


class PerSampleSACPolicy(SACPolicy):
    """SAC policy: per-sample squashed-Gaussian actor, pooled critics."""

    def __init__(
        self,
        *args: Any,
        critic_hidden: int = 64,
        critic_head: str = "pooled",
        features_extractor_class: type[BaseFeaturesExtractor] = PerSampleExtractor,
        **kwargs: Any,
    ) -> None:
        check_setting("critic_hidden", critic_hidden)
        self._critic_hidden, self._critic_head = critic_hidden, critic_head
        super().__init__(*args, features_extractor_class=features_extractor_class, **kwargs)

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> PerSampleSACActor:
        actor_kwargs = self._update_features_extractor(self.actor_kwargs, features_extractor)
        return PerSampleSACActor(**actor_kwargs).to(self.device)

    def make_critic(self, features_extractor: BaseFeaturesExtractor | None = None) -> PooledCritic:
        critic_kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        return PooledCritic(
            **critic_kwargs, hidden=self._critic_hidden, saturation_penalty=0.0, head=self._critic_head
        ).to(self.device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(critic_hidden=self._critic_hidden, critic_head=self._critic_head)
        return data

    def controller_parts(self) -> tuple[PerSampleExtractor, nn.Linear, float, str]:
        # The squashed mean tanh(mu) in [-1, 1] is 2 h - 1, so h = sigmoid(2 mu).
        return self.actor.features_extractor, self.actor.mu.linear, 2.0, "sigmoid"  # type: ignore[return-value]


class PooledValueHead(nn.Module):
    """State value from the mean of per-image embeddings: ``(N, B * D)`` -> ``(N, 1)``."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.linear = nn.Linear(embed_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.reshape(features.shape[0], -1, self.embed_dim).mean(dim=1))


class PerSampleActorCriticPolicy(ActorCriticPolicy):
    """PPO/A2C policy: a Gaussian per image whose mean is the selection probability.

    The mean starts at 0.5 (every image half-likely to be selected); the env
    clips sampled actions to [0, 1].  ``log_std_init`` defaults to
    ``log(0.2)``: exploration of 0.2 in probability units.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", PerSampleExtractor)
        kwargs.setdefault("log_std_init", float(np.log(0.2)))
        kwargs["net_arch"] = []
        kwargs.setdefault("ortho_init", False)
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)
        embed_dim = self.features_extractor.embed_dim  # type: ignore[union-attr]
        self.action_net = PerSampleHead(embed_dim, bias=0.5, gain=0.1)
        self.value_net = PooledValueHead(embed_dim)
        # The heads changed after SB3 built its optimiser: build it again over the real parameters.
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def controller_parts(self) -> tuple[PerSampleExtractor, nn.Linear, float, str]:
        return self.pi_features_extractor, self.action_net.linear, 1.0, "clip"  # type: ignore[return-value]


class BernoulliSelectionPolicy(BasePolicy):
    """REINFORCE policy: ``h_i = sigmoid(u_i)``, the env draws ``a_i ~ Bernoulli(h_i)``.

    The action handed to the env is the probability vector itself; the env
    samples the selections and reports them in ``info["selection"]``, and
    :class:`agents.reinforce.REINFORCE` scores them with :meth:`log_prob_of_logits`
    (the logits once, shared with its class penalty; :meth:`log_prob` does the same
    from observations).

    With ``centre_logits`` (the default) the selection logits are centred on
    their batch mean and shifted by the constant ``logit(initial_selection_probability)``:
    the mean selection probability of a batch stays near that value and the
    controller learns only the *ranking* of the images, which is all that the
    normalised weighted reward, the selective reward and the evaluation by
    rejection depend on.  Without it, the common-mode part of the gradient (the
    same for every image) is pure noise for those rewards and random-walks the
    mean score into 0 or 1, where the sigmoid has no gradient left; see
    ``docs/design-decisions.md``.  The exported :class:`~agents.Controller`
    scores with the uncentred logit: the same ranking, per image.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Any,
        features_extractor_class: type[BaseFeaturesExtractor] = PerSampleExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        initial_selection_probability: float = 0.5,
        centre_logits: bool = True,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=features_extractor_kwargs,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            normalize_images=False,
        )
        check_setting("initial_selection_probability", initial_selection_probability)
        check_setting("centre_logits", centre_logits)
        self.initial_selection_probability = initial_selection_probability
        self.centre_logits = centre_logits
        self.features_extractor = self.make_features_extractor()
        p = initial_selection_probability
        self._logit_offset = float(np.log(p / (1 - p)))
        self.head = PerSampleHead(self.features_extractor.embed_dim, bias=self._logit_offset)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            features_extractor_class=self.features_extractor_class,
            features_extractor_kwargs=self.features_extractor_kwargs,
            optimizer_class=self.optimizer_class,
            optimizer_kwargs=self.optimizer_kwargs,
            initial_selection_probability=self.initial_selection_probability,
            centre_logits=self.centre_logits,
            lr_schedule=self._dummy_schedule,
        )
        return data

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """Selection logits ``(N, B)``; centred on the batch when ``centre_logits``."""
        return self.logits_and_features(obs)[0]

    def logits_and_features(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`logits` and the per-image features they came from, ``(N, B, D)``."""
        features = self.extract_features(obs, self.features_extractor)
        logits = self.head(features)
        if self.centre_logits:
            # A constant offset, not the head's (learnable) bias: through the bias the "select more,
            # the predictor trains more" part of the training-step credit pushed every logit up
            # until h = 1 for all images, where the selections (all 1) no longer depend on the
            # ranking and the REINFORCE signal is gone (measured: mean score 1.0, st.d. 0.0 after
            # 4,000-9,000 env steps on 5 of 8 seeds; docs/learning-status.md).
            logits = logits - logits.mean(dim=1, keepdim=True) + self._logit_offset
        return logits, features.reshape(features.shape[0], -1, self.head.embed_dim)

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        return torch.sigmoid(self.logits(obs))

    def _predict(self, observation: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        return self(observation)

    def log_prob(self, obs: torch.Tensor, selection: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean per-image ``log pi = a log h + (1 - a) log(1 - h)`` over valid images, and the entropy, ``(N,)`` each."""
        return self.log_prob_of_logits(self.logits(obs), selection, valid)

    @staticmethod
    def log_prob_of_logits(
        logits: torch.Tensor, selection: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`log_prob` from logits already computed by :meth:`logits`."""
        log_prob, entropy = BernoulliSelectionPolicy.image_log_probs(logits, selection, valid)
        return log_prob.sum(1), entropy

    @staticmethod
    def image_log_probs(
        logits: torch.Tensor, selection: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's ``log pi(a_i)`` (0 for padding), ``(N, B)``, and the batch's entropy, ``(N,)``.

        Both are weighted by ``1 / (valid images in the batch)``: summed over a
        batch they give :meth:`log_prob_of_logits`.
        """
        dist = torch.distributions.Bernoulli(logits=logits)
        weights = valid.float() / valid.float().sum(dim=1, keepdim=True).clamp_min(1.0)
        return dist.log_prob(selection.float()) * weights, (dist.entropy() * weights).sum(1)

    def controller_parts(self) -> tuple[PerSampleExtractor, nn.Linear, float, str]:
        return self.features_extractor, self.head.linear, 1.0, "sigmoid"  # type: ignore[return-value]
