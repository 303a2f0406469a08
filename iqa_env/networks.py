"""Networks: the task predictors (classifier, U-Net) and the controller backbone.

All networks take images as float tensors ``(B, C, H, W)`` scaled to [0, 1]
(see :func:`to_float`) and size themselves from ``(C, H, W)``.

Their convolution weights are kept in channels-last memory order
(:func:`channels_last`): the same functions, with convolutions and pooling
1.4-2x faster on CPU (``docs/performance.md``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from iqa_env.checks import is_number


def to_float(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images in [0, 255] -> ``float32`` in [0, 1]; float input is taken as already scaled."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its 4-d weights in channels-last memory order; returns it.

    A convolution whose weight is channels-last gives a channels-last output
    whatever its input's order, so the whole network then runs channels-last
    on plain ``(B, C, H, W)`` input.  The function is the same (outputs agree
    to float rounding, about 1e-7); on CPU (oneDNN) the forward and backward
    passes of these networks take 0.5-0.75 of the time of the default order
    (``docs/performance.md``).  Later ``.to(device)`` calls keep the order.
    """
    return module.to(memory_format=torch.channels_last)


def check_average_decay(name: str, decay: object) -> float:
    """``decay`` as a float if it is a number in [0, 1) (0: no average); else ``ValueError`` naming ``name``."""
    if not (is_number(decay) and 0.0 <= decay < 1.0):
        raise ValueError(f"{name} must be a decay in [0, 1) (0: no average), got {decay!r}")
    return float(decay)


def weight_average_of(model: nn.Module) -> nn.Module:
    """A new weight average of ``model``: a frozen copy in eval mode, to update with :func:`update_weight_average`."""
    return copy.deepcopy(model).requires_grad_(False).eval()


@torch.no_grad()
def update_weight_average(average: nn.Module, model: nn.Module, decay: float, updates: int) -> None:
    """One step of an exponential moving average of ``model``'s weights into ``average``.

    Warm-started as in ``tf.train.ExponentialMovingAverage``: after ``updates``
    optimiser steps the decay is ``min(decay, (1 + updates) / (10 + updates))``,
    so that a young average follows the weights closely.  Buffers (batch-norm
    statistics) are copied, not averaged.  Used for the task predictor
    (``TaskAmenabilityEnv(predictor_average=...)``) and the REINFORCE
    controller (``REINFORCE(controller_average=...)``).
    """
    d = min(decay, (1 + updates) / (10 + updates))
    for mean, weight in zip(average.parameters(), model.parameters()):
        mean.lerp_(weight, 1.0 - d)
    for mean, buffer in zip(average.buffers(), model.buffers()):
        mean.copy_(buffer)


def _num_downsamplings(size: int, floor: int = 4, most: int = 5) -> int:
    """How many 2x poolings bring ``size`` down to about ``floor`` pixels."""
    return int(max(1, min(most, math.floor(math.log2(max(size, 2) / floor)))))


def _check_image_shape(image_shape: tuple[int, ...], min_size: int = 8) -> tuple[int, int, int]:
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    c, h, w = (int(s) for s in image_shape)
    if c < 1 or h < min_size or w < min_size:
        raise ValueError(
            f"image_shape must have C >= 1 and H, W >= {min_size}, got {tuple(image_shape)}"
        )
    return c, h, w


class ConvPool(nn.Sequential):
    """conv3x3 -> GroupNorm -> ReLU -> 2x2 max-pool: one AlexNet-style feature block.

    The normalisation plays the part of AlexNet's local response normalisation;
    GroupNorm rather than BatchNorm because the task predictor trains on
    whatever few images the controller selects, down to one.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(math.gcd(out_channels, 4), out_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )


class Classifier(nn.Module):
    """AlexNet-style classifier scaled to the image size: conv-ReLU-pool blocks, then an MLP.

    ``forward(x)`` maps ``(B, C, H, W)`` to class *logits* ``(B, num_classes)``.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        width: int = 16,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        c, h, w = _check_image_shape(image_shape)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        blocks = _num_downsamplings(min(h, w))
        chans = [c] + [width * 2**i for i in range(blocks)]
        self.features = nn.Sequential(*(ConvPool(a, b) for a, b in zip(chans[:-1], chans[1:])))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(chans[-1] * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        channels_last(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class TwoConv(nn.Sequential):
    """Two (conv3x3 -> GroupNorm -> ReLU) layers at one resolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        groups = math.gcd(out_channels, 4)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x max-pool, then :class:`TwoConv`: one step down the U-Net's encoder."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), TwoConv(in_channels, out_channels))


class UpCat(nn.Module):
    """2x up-sampling, concatenation with the skip connection, then :class:`TwoConv`."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        self.conv = TwoConv(in_channels // 2 + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:  # odd sizes: pad the up-sampled map to the skip's size
            dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            x = nn.functional.pad(x, (0, dw, 0, dh))
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net for binary segmentation, depth scaled to the image size.

    ``forward(x)`` maps ``(B, C, H, W)`` to per-pixel *logits* ``(B, 2, H, W)``
    (background, foreground).
    """

    def __init__(self, image_shape: tuple[int, int, int], width: int = 8, num_classes: int = 2) -> None:
        super().__init__()
        c, h, w = _check_image_shape(image_shape)
        depth = _num_downsamplings(min(h, w), floor=8, most=4)
        feats = [width * 2**i for i in range(depth + 1)]
        self.stem = TwoConv(c, feats[0])
        self.downs = nn.ModuleList(Down(a, b) for a, b in zip(feats[:-1], feats[1:]))
        self.ups = nn.ModuleList(
            UpCat(feats[i + 1], feats[i], feats[i]) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(feats[0], num_classes, 1)
        channels_last(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.out(x)


class ControllerBackbone(nn.Module):
    """The controller ``h(x; theta)``: a small CNN giving one amenability score per image.

    ``embed(x)`` maps ``(B, C, H, W)`` to per-image features ``(B, embed_dim)``;
    ``forward(x)`` gives the *logit* of the amenability score ``(B,)``; the
    score is ``sigmoid(logit)`` (:meth:`score`).  Applied image by image, so a
    batch's scores are permutation-equivariant.  The agents reuse this class
    for their actors and critics.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        width: int = 16,
        embed_dim: int = 64,
    ) -> None:
        super().__init__()
        c, h, w = _check_image_shape(image_shape)
        self.image_shape = (c, h, w)
        self.embed_dim = embed_dim
        blocks = _num_downsamplings(min(h, w))
        chans = [c] + [width * 2 ** min(i, 2) for i in range(blocks)]
        self.features = nn.Sequential(
            *(ConvPool(a, b) for a, b in zip(chans[:-1], chans[1:])),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(chans[-1] * 4, embed_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(embed_dim, 1)
        channels_last(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(to_float(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x)).squeeze(-1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Amenability scores in [0, 1], ``(B,)``."""
        return torch.sigmoid(self.forward(x))
