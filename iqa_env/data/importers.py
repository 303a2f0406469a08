"""Importers for a user's own data: a folder of images, and MedMNIST ``.npz`` files.

Both return an :class:`ImageDataset`; save it with
:func:`iqa_env.data.io.save_dataset` (or use ``iqa data import-folder`` /
``iqa data import-medmnist``) to get the one HDF5 format everything reads.
"""

from __future__ import annotations

import csv
import logging
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iqa_env.checks import is_count
from iqa_env.data.dataset import TASKS, ImageDataset

logger = logging.getLogger(__name__)

#: File name endings read as images (and masks), case-insensitive.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".webp",
    ".pgm",
    ".ppm",
    ".pnm",
)

#: PIL modes that are one 8-bit grey channel, or become one without loss.
_GREY_MODES = frozenset({"1", "L", "LA"})
#: PIL modes with more than 8 bits per sample: converting them needs a
#: windowing decision only the user can make.
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
#: Mask modes whose stored values are the labels themselves.  A palette
#: mask's index 1 may well be drawn black, so its colours must not be used.
_RAW_MASK_MODES = frozenset({"1", "L", "P"}) | _WIDE_MODES


def _plural(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _as_hw(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if len(hw) != 2 or not all(is_count(s) for s in hw):
        raise ValueError(
            f"size must be a positive int or an (H, W) pair of positive ints, got {size!r}"
        )
    return int(hw[0]), int(hw[1])


# -------------------------------------------------------------------- labels
@dataclass
class _Table:
    """The per-image rows of the labels CSV, or their defaults without one."""

    files: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...]
    groups: np.ndarray
    amenability: dict[str, np.ndarray]
    human_amenability: dict[str, np.ndarray]


def _codes(values: list[str]) -> tuple[np.ndarray, tuple[str, ...], bool]:
    """Integer codes of ``values``: the integers themselves, else ranks of the sorted names."""
    try:
        ints = np.array([int(v) for v in values], dtype=np.int64)
        return ints, tuple(str(i) for i in range(int(ints.max()) + 1)), True
    except ValueError:
        names = tuple(sorted(set(values)))
        lookup = {name: i for i, name in enumerate(names)}
        return np.array([lookup[v] for v in values], dtype=np.int64), names, False


def _read_csv(csv_path: Path) -> _Table:
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: labels CSV not found")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = list(reader)
    for required in ("file", "label"):
        if required not in columns:
            raise ValueError(
                f"{csv_path}: missing column '{required}'; expected a header with file,label and "
                "optionally group, amenability_<task>, human_amenability_<task> "
                f"(task in {TASKS}); got {columns}"
            )
    score_columns: dict[str, tuple[str, str]] = {}
    for column in columns:
        for table in ("human_amenability", "amenability"):
            if column.startswith(table + "_"):
                task = column[len(table) + 1 :]
                if task not in TASKS:
                    raise ValueError(
                        f"{csv_path}: column '{column}' names unknown task {task!r}; expected "
                        f"{table}_<task> with task in {TASKS}"
                    )
                score_columns[column] = (table, task)
                break
    ignored = [c for c in columns if c not in ("file", "label", "group") and c not in score_columns]
    if ignored:
        logger.warning("%s: ignoring columns %s", csv_path, ignored)
    if not rows:
        raise ValueError(f"{csv_path}: has a header but no rows; expected one row per image")

    def cell(row: dict[str, Any], line: int, column: str) -> str:
        value = (row.get(column) or "").strip()
        if not value:
            raise ValueError(
                f"{csv_path}, line {line}: column '{column}' is empty; expected a value"
            )
        return value

    # Line numbers as a spreadsheet shows them: the header is line 1.
    files = [cell(r, i + 2, "file") for i, r in enumerate(rows)]
    seen: dict[str, int] = {}
    for i, name in enumerate(files):
        if name in seen:
            raise ValueError(
                f"{csv_path}, line {i + 2}: file {name!r} is listed again (first on line "
                f"{seen[name] + 2}); expected each image once"
            )
        seen[name] = i
    labels, class_names, numeric = _codes([cell(r, i + 2, "label") for i, r in enumerate(rows)])
    if numeric and labels.min() < 0:
        raise ValueError(f"{csv_path}: column 'label' has negative values; expected class ids >= 0")
    if "group" in columns:
        groups, _, _ = _codes([cell(r, i + 2, "group") for i, r in enumerate(rows)])
    else:
        logger.warning(
            "%s has no 'group' column: every image is its own group, so splits are per image",
            csv_path,
        )
        groups = np.arange(len(rows), dtype=np.int64)
    tables: dict[str, dict[str, np.ndarray]] = {"amenability": {}, "human_amenability": {}}
    for column, (table, task) in score_columns.items():
        values = []
        for i, r in enumerate(rows):
            text = cell(r, i + 2, column)
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            ok = 0.0 <= value <= 1.0 and (table == "amenability" or value in (0.0, 1.0))
            if not ok:
                expected = "a number in [0, 1]" if table == "amenability" else "0 or 1"
                raise ValueError(
                    f"{csv_path}, line {i + 2}: column '{column}' is {text!r}; expected {expected}"
                )
            values.append(value)
        dtype = np.float32 if table == "amenability" else np.uint8
        tables[table][task] = np.asarray(values, dtype=dtype)
    return _Table(
        files, labels, class_names, groups, tables["amenability"], tables["human_amenability"]
    )


# -------------------------------------------------------------------- images
def _list_images(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _natural_channels(path: Path, mode: str) -> int:
    if mode in _WIDE_MODES:
        raise ValueError(
            f"{path}: PIL mode {mode!r} has more than 8 bits per pixel; expected 8-bit grey or RGB "
            "images (convert them with your own intensity window first)"
        )
    return 1 if mode in _GREY_MODES else 3


def _open_header(path: Path, *, mask: bool = False) -> tuple[int, int, int]:
    """``(channels, H, W)`` of an image file, from its header only (channels 1 for a mask)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            channels = 1 if mask else _natural_channels(path, img.mode)
            return channels, img.height, img.width
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(
            f"{path}: cannot be read as an image ({e}); expected a readable image file "
            f"({', '.join(IMAGE_EXTENSIONS)}): replace it or move it out of the folder"
        ) from e


def _read_pixels(
    path: Path, channels: int, size: tuple[int, int] | None, *, mask: bool = False
) -> np.ndarray:
    """``(channels, H, W)`` uint8, or ``(H, W)`` {0, 1} for a mask; resized to ``size`` if given."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            if mask:
                img = opened if opened.mode in _RAW_MASK_MODES else opened.convert("L")
            else:
                # Alpha is dropped: it is not part of the image the task sees.
                img = opened.convert("L" if channels == 1 else "RGB")
            if size is not None and (img.height, img.width) != size:
                # Masks keep hard edges; images are interpolated.
                resample = Image.Resampling.NEAREST if mask else Image.Resampling.BILINEAR
                img = img.resize((size[1], size[0]), resample=resample)
            pixels = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"{path}: cannot be decoded ({e}); expected a complete image file (it is truncated or "
            "corrupt): replace it or move it out of the folder"
        ) from e
    if mask:
        return (pixels > 0).astype(np.uint8)
    pixels = pixels.astype(np.uint8, copy=False)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _find_mask(masks_dir: Path, image_name: str) -> Path:
    exact = masks_dir / image_name
    if exact.is_file():
        return exact
    stem = Path(image_name).with_suffix("")
    for ext in IMAGE_EXTENSIONS:
        for candidate in (masks_dir / f"{stem}{ext}", masks_dir / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{masks_dir}: no mask for image {image_name!r}; expected a file named {stem} with "
        f"an image extension ({', '.join(IMAGE_EXTENSIONS)})"
    )


def _progress(items: list[Any], enabled: bool, what: str) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI).
    return tqdm(items, desc=what, unit="img", disable=None)


def import_folder(
    images_dir: str | os.PathLike[str],
    *,
    masks_dir: str | os.PathLike[str] | None = None,
    labels_csv: str | os.PathLike[str] | None = None,
    size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    progress: bool = False,
) -> ImageDataset:
    """Build a dataset from a folder of image files.

    Args:
        images_dir: folder of images (PNG, JPEG, BMP, TIFF, ...; 8-bit grey or
            colour).  Without ``labels_csv`` every image in it (not in
            sub-folders) is taken, in name order, with label 0.
        masks_dir: folder with one segmentation mask per image, matched by
            file name stem (``a.png`` <- ``a.png`` or ``a.tif`` ...); any
            non-zero pixel is foreground.  Each mask must have its image's size.
        labels_csv: CSV with a header.  Columns: ``file`` (path relative to
            ``images_dir``), ``label`` (integer class ids, or class names that
            are then numbered in sorted order), optional ``group`` (patient id,
            integer or text; without it each image is its own group),
            optional ``amenability_<task>`` (ground truth in [0, 1]) and
            ``human_amenability_<task>`` (rater label 0/1) with task in
            ``classification`` / ``segmentation``.  Rows define the dataset
            and its order; other columns are ignored.
        size: resize every image (and mask) to ``size`` x ``size`` or
            ``(H, W)``.  Without it, images of different sizes are refused.
        channels: convert every image to 1 (grey) or 3 (RGB) channels.
            Without it, a mix of grey and colour images is refused.
        progress: show a progress bar (on stderr) while reading.

    Returns:
        An :class:`ImageDataset` with images ``(N, C, H, W)`` uint8.

    Raises:
        FileNotFoundError: a folder, the CSV, an image or a mask is missing.
        ValueError: no images, an unreadable image, mixed sizes or channels
            without ``size`` / ``channels``, or a malformed CSV; the message
            names the file.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: images folder not found")
    if channels not in (None, 1, 3):
        raise ValueError(
            f"channels must be 1 (grey), 3 (RGB) or None (as stored), got {channels!r}"
        )
    target_hw = _as_hw(size)
    masks_path = None if masks_dir is None else Path(masks_dir)
    if masks_path is not None and not masks_path.is_dir():
        raise FileNotFoundError(f"{masks_path}: masks folder not found")

    if labels_csv is not None:
        table = _read_csv(Path(labels_csv))
    else:
        names = _list_images(images_dir)
        table = _Table(
            files=names,
            labels=np.zeros(len(names), np.int64),
            class_names=("unlabelled",),
            groups=np.arange(len(names), dtype=np.int64),
            amenability={},
            human_amenability={},
        )
    if not table.files:
        raise ValueError(
            f"{images_dir}: no images found; expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
    paths = [images_dir / name for name in table.files]

    # Headers first: a mixed folder is refused before any pixel is decoded.
    headers = [_open_header(p) for p in paths]
    if channels is None:
        by_channels: dict[int, list[str]] = {}
        for p, (c, _, _) in zip(paths, headers):
            by_channels.setdefault(c, []).append(p.name)
        if len(by_channels) > 1:
            raise ValueError(
                f"{images_dir}: images mix grey and colour ("
                + "; ".join(f"{c} channel(s): {_plural(n)}" for c, n in sorted(by_channels.items()))
                + "); expected one kind, or pass channels=1 or 3 (--channels) to convert"
            )
        channels = next(iter(by_channels))
    if target_hw is None:
        by_size: dict[tuple[int, int], list[str]] = {}
        for p, (_, h, w) in zip(paths, headers):
            by_size.setdefault((h, w), []).append(p.name)
        if len(by_size) > 1:
            raise ValueError(
                f"{images_dir}: images have different sizes ("
                + "; ".join(f"{h}x{w}: {_plural(n)}" for (h, w), n in sorted(by_size.items()))
                + "); expected one size, or pass size= (--size) to resize them all"
            )
        target_hw = next(iter(by_size))

    n = len(paths)
    images = np.empty((n, channels, *target_hw), dtype=np.uint8)
    masks = None if masks_path is None else np.empty((n, *target_hw), dtype=np.uint8)
    for i in _progress(list(range(n)), progress, "reading images"):
        images[i] = _read_pixels(paths[i], channels, target_hw)
        if masks is not None and masks_path is not None:
            mask_path = _find_mask(masks_path, table.files[i])
            _, mh, mw = _open_header(mask_path, mask=True)
            if (mh, mw) != headers[i][1:]:
                raise ValueError(
                    f"{mask_path}: mask is {mh}x{mw} but its image {paths[i]} is "
                    f"{headers[i][1]}x{headers[i][2]}; expected the same size"
                )
            masks[i] = _read_pixels(mask_path, 1, target_hw, mask=True)

    return ImageDataset(
        images=images,
        labels=table.labels,
        groups=table.groups,
        masks=masks,
        amenability=table.amenability,
        human_amenability=table.human_amenability,
        class_names=table.class_names,
        metadata={
            "source": "folder",
            "images_dir": images_dir.name,
            "labels_csv": None if labels_csv is None else Path(labels_csv).name,
            "resized_to": None if size is None else list(target_hw),
            "files": list(table.files),  # row i came from files[i] (relative to images_dir)
        },
    )


# ------------------------------------------------------------------ MedMNIST
#: MedMNIST's split names, in the order they are concatenated.
MEDMNIST_SPLITS: tuple[str, ...] = ("train", "val", "test")


def import_medmnist(
    npz_path: str | os.PathLike[str],
    *,
    split: str | None = None,
    group_size: int = 1,
    class_names: tuple[str, ...] | None = None,
    corrupt_fraction: float = 0.0,
    seed: int = 0,
) -> ImageDataset:
    """Load a MedMNIST ``.npz`` file (e.g. ``pneumoniamnist.npz``) that you already have.

    The file holds ``<split>_images`` (``(N, H, W)`` grey or ``(N, H, W, 3)``
    colour, uint8) and ``<split>_labels`` (``(N,)`` or ``(N, 1)``) for split in
    ``train`` / ``val`` / ``test``.  Multi-label sets (ChestMNIST) and 3-D
    volumes are refused.

    Args:
        npz_path: the ``.npz`` file.
        split: one of ``train``, ``val``, ``test``; ``None`` concatenates all
            splits present, in that order (``metadata["split_ranges"]`` keeps
            each split's ``[start, stop)`` rows so the official split can be
            recovered).
        group_size: MedMNIST has no patient ids, so consecutive blocks of
            ``group_size`` images within a split form pseudo-patient groups
            (never spanning two splits).  The default 1 makes every image its
            own group, i.e. image-level splits as in the MedIA experiments.
        class_names: names of the classes; default ``"0"``, ``"1"``, ...
        corrupt_fraction: apply the authors' corruption protocol
            (:func:`iqa_env.data.fashion_mnist.corrupt_images`) to this share
            of images and record degradations, ground-truth and rater
            amenability for classification, as for Fashion-MNIST.  1.0
            reproduces the MedIA corrupted PneumoniaMNIST setting; 0 (default)
            leaves the images as they are.
        seed: seeds the corruption and the raters.

    Raises:
        FileNotFoundError: ``npz_path`` is missing.
        ValueError: not an npz file, unknown or missing split, arrays of the
            wrong shape or dtype.
    """
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path}: MedMNIST .npz file not found")
    if split is not None and split not in MEDMNIST_SPLITS:
        raise ValueError(f"split must be one of {MEDMNIST_SPLITS} or None (all), got {split!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be a positive number of images, got {group_size}")
    with npz_path.open("rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise ValueError(f"{npz_path}: holds a single array (.npy); expected a MedMNIST .npz archive")
    if not zipfile.is_zipfile(npz_path):
        # numpy would try it as a pickle and say so; it is simply not an archive.
        raise ValueError(
            f"{npz_path}: not a .npz archive; expected a zip of .npy arrays (train_images, train_labels, ...) "
            "as MedMNIST and numpy.savez write"
        )
    try:
        archive = np.load(npz_path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{npz_path}: cannot be read as a .npz archive ({e})") from e
    with archive:
        wanted = (
            [split]
            if split is not None
            else [s for s in MEDMNIST_SPLITS if f"{s}_images" in archive]
        )
        if not wanted:
            raise ValueError(
                f"{npz_path}: no '<split>_images' arrays; expected MedMNIST keys such as "
                f"train_images / train_labels, got {sorted(archive.files)}"
            )
        parts: list[tuple[str, np.ndarray, np.ndarray]] = []
        for s in wanted:
            for key in (f"{s}_images", f"{s}_labels"):
                if key not in archive:
                    raise ValueError(
                        f"{npz_path}: array '{key}' missing; expected it for split {s!r} "
                        f"(the file has {sorted(archive.files)})"
                    )
            parts.append((s, archive[f"{s}_images"], archive[f"{s}_labels"]))

    images_parts, labels_parts, groups_parts = [], [], []
    split_ranges: dict[str, list[int]] = {}
    start, next_group = 0, 0
    for s, x, y in parts:
        if x.dtype != np.uint8:
            raise ValueError(f"{npz_path}: '{s}_images' has dtype {x.dtype}; expected uint8")
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] == 3:
            x = x.transpose(0, 3, 1, 2)
        else:
            raise ValueError(
                f"{npz_path}: '{s}_images' has shape {x.shape}; expected (N, H, W) or (N, H, W, 3) "
                "(3-D MedMNIST volumes are not supported)"
            )
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{npz_path}: '{s}_labels' has dtype {y.dtype} and shape {y.shape}; expected one "
                "integer class per image, (N,) or (N, 1) (multi-label sets are not supported)"
            )
        if len(y) != len(x):
            raise ValueError(
                f"{npz_path}: '{s}_labels' has {len(y)} entries but '{s}_images' has {len(x)}"
            )
        groups = next_group + np.arange(len(x), dtype=np.int64) // group_size
        next_group = int(groups.max()) + 1 if len(x) else next_group
        images_parts.append(x)
        labels_parts.append(y.astype(np.int64))
        groups_parts.append(groups)
        split_ranges[s] = [start, start + len(x)]
        start += len(x)
    images = np.ascontiguousarray(np.concatenate(images_parts))
    labels = np.concatenate(labels_parts)
    if images.shape[0] == 0:
        raise ValueError(f"{npz_path}: the selected split(s) {wanted} hold no images")
    if class_names is None:
        class_names = tuple(str(i) for i in range(int(labels.max()) + 1))
    elif len(class_names) <= int(labels.max()):
        raise ValueError(
            f"{npz_path}: class_names (--class-names) gives {len(class_names)} name(s) {list(class_names)}, but the "
            f"labels go up to {int(labels.max())}; expected one name per class, {int(labels.max()) + 1} or more"
        )

    metadata: dict[str, Any] = {
        "source": "medmnist",
        "file": npz_path.name,
        "split_ranges": split_ranges,
        "group_size": group_size,
        "groups": "pseudo-patients: consecutive blocks of group_size images within a split",
    }
    amenability: dict[str, np.ndarray] = {}
    human: dict[str, np.ndarray] = {}
    degradations: dict[str, np.ndarray] = {}
    if corrupt_fraction > 0:
        from iqa_env.data import fashion_mnist as protocol

        rng = np.random.default_rng(seed)
        images, degradations = protocol.corrupt_images(
            images, rng, corrupt_fraction=corrupt_fraction
        )
        amenability = {
            "classification": protocol.amenability_from_severity(degradations["severity"])
        }
        human = {"classification": protocol.simulate_raters(amenability["classification"], rng)}
        metadata.update(
            corrupt_fraction=corrupt_fraction,
            seed=seed,
            amenability_rule="classification: 1 - severity / max_severity",
            degradation_codes=protocol.DEGRADATION_CODES,
        )
    return ImageDataset(
        images=images,
        labels=labels,
        groups=np.concatenate(groups_parts),
        amenability=amenability,
        human_amenability=human,
        degradations=degradations,
        class_names=class_names,
        metadata=metadata,
    )
