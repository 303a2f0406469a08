"""Tasks: what the task predictor learns, its per-sample training loss and metric.

A :class:`Task` ties together the predictor factory, the per-sample training
loss (per sample, so it can be restricted to the selected samples) and the
per-sample metric used by the rewards and the evaluation (higher is better:
correct/incorrect for classification, binary Dice for segmentation).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from iqa_env.data.dataset import ImageDataset
from iqa_env.networks import Classifier, UNet


class Task:
    """Base class; use :func:`make_task` to get one by name."""

    name: str = ""
    metric_name: str = ""

    def check_dataset(self, dataset: ImageDataset, part: str = "training") -> None:
        """Raise ``ValueError`` unless ``dataset`` (the ``part`` images) can train this task.

        Called by the environment when it is built, so that a dataset the task
        cannot learn from is refused before any training step.
        """

    def build_predictor(self, dataset: ImageDataset) -> nn.Module:
        """A freshly initialised task predictor sized for ``dataset``."""
        raise NotImplementedError

    def targets(self, dataset: ImageDataset) -> np.ndarray:
        """The training targets of ``dataset`` for this task."""
        raise NotImplementedError

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss per sample, ``(B,)``."""
        raise NotImplementedError

    def per_sample_metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Task metric per sample in [0, 1], higher is better, ``(B,)``."""
        raise NotImplementedError

    def confidence(self, outputs: torch.Tensor) -> torch.Tensor:
        """The predictor's own confidence per sample in [0, 1], ``(B,)`` (a heuristic baseline)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ClassificationTask(Task):
    """Image classification: AlexNet-style predictor, cross-entropy, per-sample correct/incorrect."""

    name = "classification"
    metric_name = "accuracy"

    def check_dataset(self, dataset: ImageDataset, part: str = "training") -> None:
        if dataset.num_classes < 2:
            raise ValueError(
                f"the classification task needs at least 2 classes, but the dataset declares "
                f"{dataset.num_classes}: {list(dataset.class_names)}; give the images their class "
                "labels (e.g. iqa data import-folder --labels labels.csv), or use task='segmentation'"
            )
        present = np.unique(dataset.labels)
        if present.size < 2:
            label = int(present[0])
            raise ValueError(
                f"the classification task needs {part} images of at least 2 classes, but all "
                f"{len(dataset)} {part} images have label {label} ({dataset.class_names[label]!r}); "
                f"expected labels of at least two of the classes {list(dataset.class_names)}: add "
                "images of the other class(es), or use task='segmentation'"
            )

    def build_predictor(self, dataset: ImageDataset) -> nn.Module:
        if dataset.num_classes < 2:
            self.check_dataset(dataset)
        return Classifier(dataset.image_shape, dataset.num_classes)

    def targets(self, dataset: ImageDataset) -> np.ndarray:
        return dataset.labels.astype(np.int64)

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def per_sample_metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(1) == targets).float()

    def confidence(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.softmax(1).amax(1)


class SegmentationTask(Task):
    """Binary segmentation: U-Net, pixel-wise cross-entropy plus soft Dice, per-sample binary Dice.

    The per-sample loss is the image's mean pixel cross-entropy plus its soft
    Dice loss on the foreground probability (:func:`soft_dice_loss`). With
    cross-entropy alone a U-Net could settle on "background everywhere" (on
    the built-in set about a third of the frames have an empty mask and the
    gland covers about 6 % of the others' pixels); the Dice term weighs the
    foreground of each image as a whole, whatever its size, so that collapse
    costs about 1 per image with foreground. docs/design-decisions.md has the
    measurements.

    An empty prediction of an empty mask counts as Dice 1 (and has a soft
    Dice loss near 0).
    """

    name = "segmentation"
    metric_name = "dice"

    def check_dataset(self, dataset: ImageDataset, part: str = "training") -> None:
        masks = dataset.require_masks("the segmentation task")
        if not masks.any() or masks.all():
            value = int(masks.flat[0])
            raise ValueError(
                f"the segmentation task needs {part} masks with both foreground (1) and background "
                f"(0) pixels, but every pixel of the {len(dataset)} {part} masks is {value}; "
                "expected masks that mark the structure to segment"
            )

    def build_predictor(self, dataset: ImageDataset) -> nn.Module:
        dataset.require_masks("the segmentation task")
        return UNet(dataset.image_shape)

    def targets(self, dataset: ImageDataset) -> np.ndarray:
        return dataset.require_masks("the segmentation task").astype(np.int64)

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean pixel cross-entropy plus soft Dice loss of the foreground, per sample, ``(B,)``."""
        cross_entropy = F.cross_entropy(outputs, targets, reduction="none").flatten(1).mean(1)
        foreground = outputs.float().softmax(1)[:, 1]
        return cross_entropy + soft_dice_loss(foreground, targets)

    def per_sample_metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # max(1).indices is the same tensor as argmax(1), measured 50x faster on (600, 2, 64, 64) CPU logits.
        return dice(outputs.max(1).indices, targets)

    def confidence(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.softmax(1).amax(1).flatten(1).mean(1)


def dice(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary Dice per sample of ``(B, H, W)`` masks; 1 where both are empty."""
    p = prediction.flatten(1).bool()
    t = target.flatten(1).bool()
    inter = (p & t).sum(1).float()
    total = (p.sum(1) + t.sum(1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def soft_dice_loss(probability: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample of ``(B, H, W)`` foreground probabilities against binary masks, ``(B,)``.

    ``1 - (2 sum(p t) + eps) / (sum p + sum t + eps)``: 0 for a perfect
    prediction; ``sum p / (sum p + eps)``, near 0, for an empty mask predicted
    empty; ``1 - eps / (sum t + eps)``, near 1 but for masks of a few pixels,
    for a mask with foreground predicted all background.
    """
    p = probability.flatten(1)
    t = target.flatten(1).to(p.dtype)
    return 1.0 - (2.0 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def random_shift(
    images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator, max_shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random translations of a training batch, one per sample.

    ``images`` ``(B, C, H, W)``; ``targets`` ``(B,)`` class labels (unchanged)
    or ``(B, H, W)`` masks (moved with their images).  Each sample is shifted
    by up to ``max_shift`` pixels in each direction, the uncovered border
    filled with zeros (black, as outside an ultrasound fan).  No flips: a
    left-right flip is not label-preserving for every medical image.
    ``generator`` is a CPU generator, so that a seeded run draws the same
    shifts on any device.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if targets.ndim not in (1, 3):
        raise ValueError(f"targets must be (B,) labels or (B, H, W) masks, got shape {tuple(targets.shape)}")
    n, _, h, w = images.shape
    m = int(max_shift)
    shift = torch.randint(-m, m + 1, (2, n), generator=generator).to(images.device)
    # Row r of a shifted sample is row r - dy of the image, i.e. row r - dy + m of the zero-padded one.
    rows = (torch.arange(h, device=images.device)[None, :] + m - shift[0][:, None])[:, None, :, None]
    cols = (torch.arange(w, device=images.device)[None, :] + m - shift[1][:, None])[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]

    def move(x: torch.Tensor) -> torch.Tensor:  # (B, K, H, W) -> the same, shifted
        channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return F.pad(x, (m, m, m, m))[batch, channel, rows, cols]

    images = move(images)
    if targets.ndim == 3:
        targets = move(targets[:, None])[:, 0]
    return images, targets


_TASKS: dict[str, type[Task]] = {
    ClassificationTask.name: ClassificationTask,
    SegmentationTask.name: SegmentationTask,
}

TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def make_task(task: str | Task) -> Task:
    """A :class:`Task` from its name (``"classification"`` or ``"segmentation"``)."""
    if isinstance(task, Task):
        return task
    if not isinstance(task, str):
        raise TypeError(f"task must be a task name {TASK_NAMES} or a Task, got {type(task).__name__}")
    if task not in _TASKS:
        raise ValueError(f"task must be one of {TASK_NAMES}, got {task!r}")
    return _TASKS[task]()
