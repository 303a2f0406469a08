"""Field-by-field validation shared by :class:`ImageDataset` and the HDF5 loader.

Every message names where the data came from (``source``: a file path or
``"ImageDataset"``), the field, what was found and what was expected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from iqa_env.data.dataset import ImageDataset


class DatasetError(ValueError):
    """A dataset (in memory or on disk) does not follow the format."""


def field_error(source: str, field: str, message: str) -> DatasetError:
    return DatasetError(f"{source}: field '{field}': {message}")


def check_array(
    source: str,
    field: str,
    array: np.ndarray,
    *,
    ndim: int,
    kinds: str,
    length: int | None = None,
    expected: str,
    shape: tuple[int, ...] | None = None,
) -> None:
    """Check rank, dtype kind (numpy ``dtype.kind`` letters) and length of one field.

    ``shape``: the field's real shape, for messages, when ``array`` stands in
    for it (the HDF5 loader checks a field from its metadata alone).
    """
    if not isinstance(array, np.ndarray):
        raise field_error(source, field, f"expected a numpy array ({expected}), got {type(array).__name__}")
    if array.ndim != ndim:
        shown = tuple(array.shape) if shape is None else tuple(shape)
        raise field_error(source, field, f"expected {ndim} dimensions ({expected}), got shape {shown}")
    if array.dtype.kind not in kinds:
        raise field_error(source, field, f"expected dtype {expected}, got {array.dtype}")
    if length is not None and array.shape[0] != length:
        raise field_error(
            source,
            field,
            f"has {array.shape[0]} entries but 'images' has {length}; every per-image field "
            "must have one entry per image",
        )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise field_error(source, field, f"contains {bad} NaN or infinite value(s); expected finite numbers")


def validate_dataset_fields(ds: ImageDataset, source: str) -> None:
    """Raise :class:`DatasetError` unless ``ds`` follows ``docs/data-format.md``."""
    check_array(source, "images", ds.images, ndim=4, kinds="u", expected="uint8 (N, C, H, W)")
    if ds.images.dtype != np.uint8:
        raise field_error(source, "images", f"expected dtype uint8, got {ds.images.dtype}")
    n = ds.images.shape[0]
    if n == 0:
        raise field_error(source, "images", "the dataset is empty (0 images); expected at least one")
    if ds.images.shape[1] not in (1, 3):
        raise field_error(
            source, "images", f"expected 1 or 3 channels (N, C, H, W), got shape {ds.images.shape}"
        )
    check_array(source, "labels", ds.labels, ndim=1, kinds="iu", length=n, expected="integer (N,)")
    n_classes = len(ds.class_names)
    if n_classes < 1:
        raise field_error(source, "class_names", "expected at least one class name")
    lo, hi = int(ds.labels.min()), int(ds.labels.max())
    if lo < 0 or hi >= n_classes:
        raise field_error(
            source,
            "labels",
            f"values must lie in [0, {n_classes - 1}] for the {n_classes} declared classes "
            f"{list(ds.class_names)}, got values in [{lo}, {hi}]",
        )
    check_array(source, "groups", ds.groups, ndim=1, kinds="iu", length=n, expected="integer (N,)")
    if ds.masks is not None:
        check_array(source, "masks", ds.masks, ndim=3, kinds="ub", length=n, expected="uint8 (N, H, W)")
        if ds.masks.shape[1:] != ds.images.shape[2:]:
            raise field_error(
                source,
                "masks",
                f"mask size {tuple(ds.masks.shape[1:])} does not match image size "
                f"{tuple(ds.images.shape[2:])}; expected (N, H, W) with the images' H and W",
            )
        if ds.masks.size and int(ds.masks.max()) > 1:
            raise field_error(source, "masks", f"expected binary values {{0, 1}}, got maximum {int(ds.masks.max())}")
    from iqa_env.data.dataset import TASKS

    for group_name, table, kinds, expected in (
        ("amenability", ds.amenability, "f", "float32 in [0, 1] (N,)"),
        ("human_amenability", ds.human_amenability, "iub", "uint8 in {0, 1} (N,)"),
    ):
        for task, values in table.items():
            field = f"{group_name}/{task}"
            if task not in TASKS:
                raise field_error(source, field, f"unknown task {task!r}; expected one of {TASKS}")
            check_array(source, field, values, ndim=1, kinds=kinds, length=n, expected=expected)
            if values.size and (float(values.min()) < 0 or float(values.max()) > 1):
                raise field_error(
                    source, field, f"values must lie in [0, 1], got [{values.min()}, {values.max()}]"
                )
    for name, values in ds.degradations.items():
        check_array(
            source, f"degradations/{name}", values, ndim=1, kinds="fiub", length=n, expected="float (N,)"
        )
