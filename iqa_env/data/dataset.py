"""The one dataset type of the project: :class:`ImageDataset`.

Every source (synthetic ultrasound, Fashion-MNIST, a user's folder, MedMNIST)
produces an :class:`ImageDataset`; the environment, the agents and the
experiments consume nothing else.  The on-disk form is one HDF5 file, see
``docs/data-format.md`` and :mod:`iqa_env.data.io`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The tasks a dataset can carry amenability for, in the paper's nouns.
TASKS: tuple[str, ...] = ("classification", "segmentation")


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


@dataclass
class ImageDataset:
    """Images with labels, optional masks, patient groups and amenability labels.

    Fields (``N`` images of ``C`` channels, ``H`` x ``W`` pixels):

    - ``images``: ``(N, C, H, W)`` ``uint8`` in [0, 255], channel-first.
    - ``labels``: ``(N,)`` integer class labels in ``[0, len(class_names))``.
    - ``groups``: ``(N,)`` integer group (patient) ids; splits never put one
      group in two parts.
    - ``masks``: ``(N, H, W)`` ``uint8`` binary segmentation masks, or ``None``.
    - ``amenability``: ground-truth amenability per task, ``task -> (N,)``
      ``float32`` in [0, 1] (1 = fully amenable).  Known for synthetic data;
      usually absent for real data.
    - ``human_amenability``: human (rater) amenability labels per task,
      ``task -> (N,)`` ``uint8`` in {0, 1} (1 = amenable).  Used by the
      ``fixed`` reward and by the paper's contingency tables.
    - ``degradations``: named per-image parameters, ``name -> (N,)``
      ``float32`` (e.g. the severity of each simulated degradation).
    - ``class_names``: one name per class.
    - ``metadata``: free-form JSON-serialisable settings (source, seed, ...).

    The constructor validates shapes and dtypes and raises ``ValueError``
    naming the field.  ``ds[idx]`` / :meth:`subset` return the same type; a
    slice gives views, an index array copies only the selected rows.
    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    masks: np.ndarray | None = None
    amenability: dict[str, np.ndarray] = field(default_factory=dict)
    human_amenability: dict[str, np.ndarray] = field(default_factory=dict)
    degradations: dict[str, np.ndarray] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from iqa_env.data.validation import validate_dataset_fields

        if not self.class_names:
            n_classes = int(np.max(self.labels)) + 1 if np.size(self.labels) else 0
            self.class_names = tuple(str(i) for i in range(max(n_classes, 1)))
        self.class_names = tuple(str(c) for c in self.class_names)
        validate_dataset_fields(self, source="ImageDataset")

    # ------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_images(self) -> int:
        return len(self)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    # ------------------------------------------------------------- subsetting
    def subset(self, index: slice | np.ndarray | list[int]) -> ImageDataset:
        """The rows ``index`` (a slice, an integer array or a boolean mask)."""
        if not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype == bool:
                if index.shape != (len(self),):
                    raise ValueError(
                        f"boolean index must have shape ({len(self)},), got {index.shape}"
                    )
                index = np.flatnonzero(index)
            elif index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
                raise ValueError(
                    f"index must be a slice, a 1-D integer array or a boolean mask, got {index.dtype} "
                    f"array of shape {index.shape}"
                )
        return ImageDataset(
            images=self.images[index],
            labels=self.labels[index],
            groups=self.groups[index],
            masks=None if self.masks is None else self.masks[index],
            amenability={k: v[index] for k, v in self.amenability.items()},
            human_amenability={k: v[index] for k, v in self.human_amenability.items()},
            degradations={k: v[index] for k, v in self.degradations.items()},
            class_names=self.class_names,
            metadata=dict(self.metadata),
        )

    def __getitem__(self, index: slice | np.ndarray | list[int]) -> ImageDataset:
        if isinstance(index, (int, np.integer)):
            raise TypeError(
                "ImageDataset[i] with an integer is ambiguous; use ds[i:i+1] or ds.images[i]"
            )
        return self.subset(index)

    # ------------------------------------------------------------ amenability
    def amenable(self, task: str) -> np.ndarray:
        """Ground-truth binary amenability for ``task``: ``amenability >= 0.5``.

        Raises ``ValueError`` when the dataset has no ground truth for it.
        """
        _check_task(task)
        if task not in self.amenability:
            raise ValueError(
                f"this dataset has no ground-truth amenability for task {task!r} "
                f"(it has: {sorted(self.amenability) or 'none'})"
            )
        return self.amenability[task] >= 0.5

    def require_masks(self, purpose: str = "the segmentation task") -> np.ndarray:
        if self.masks is None:
            raise ValueError(
                f"{purpose} needs segmentation masks, but this dataset has none "
                "(field 'masks' is absent); use task='classification' or a dataset with masks"
            )
        return self.masks

    def require_human_amenability(self, task: str, purpose: str) -> np.ndarray:
        _check_task(task)
        if task not in self.human_amenability:
            raise ValueError(
                f"{purpose} needs human amenability labels for task {task!r}, but this dataset "
                f"has none (field 'human_amenability/{task}' is absent; it has: "
                f"{sorted(self.human_amenability) or 'none'}); expected 0/1 rater labels per image: "
                f"add them (e.g. a human_amenability_{task} column in the labels CSV of "
                f"`iqa data import-folder`), or do without {purpose}"
            )
        return self.human_amenability[task]

    def summary(self) -> dict[str, Any]:
        """Counts a person wants to see first (used by ``iqa data inspect``)."""
        classes, counts = np.unique(self.labels, return_counts=True)
        out: dict[str, Any] = {
            "images": len(self),
            "image_shape": list(self.image_shape),
            "classes": {self.class_names[int(c)]: int(n) for c, n in zip(classes, counts)},
            "groups": int(np.unique(self.groups).size),
            "masks": self.has_masks,
        }
        if self.masks is not None:
            out["mask_nonempty_fraction"] = float(np.mean(self.masks.reshape(len(self), -1).any(1)))
        for task, a in self.amenability.items():
            out[f"amenable_fraction/{task}"] = float(np.mean(a >= 0.5))
        for task, a in self.human_amenability.items():
            out[f"human_amenable_fraction/{task}"] = float(np.mean(a))
        out["degradations"] = sorted(self.degradations)
        return out
