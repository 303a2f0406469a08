"""Reading and writing :class:`ImageDataset` as one HDF5 file.

The format is specified field by field in ``docs/data-format.md``; in short:

=========================================  ================  =========  ==========
path                                       shape             dtype      required
=========================================  ================  =========  ==========
``/images``                                ``(N, C, H, W)``  uint8      yes
``/labels``                                ``(N,)``          integer    yes
``/groups``                                ``(N,)``          integer    yes
``/masks``                                 ``(N, H, W)``     uint8 0/1  no
``/amenability/<task>``                    ``(N,)``          float      no
``/human_amenability/<task>``              ``(N,)``          uint8 0/1  no
``/degradations/<name>``                   ``(N,)``          number     no
=========================================  ================  =========  ==========

Root attributes: ``format = "iqa-dataset"``, ``format_version = 1``,
``class_names`` (a JSON list of strings) and ``metadata`` (a JSON object).

:func:`save_dataset` is atomic (a temporary file in the destination folder,
then :func:`os.replace`), so a crash never leaves a half-written file under the
final name nor destroys the file it replaces.  :func:`load_dataset` validates
everything and raises :class:`~iqa_env.data.validation.DatasetError` naming the
file, the field and what was expected; with ``indices`` it reads only those
rows.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from iqa_env.data.dataset import ImageDataset
from iqa_env.data.validation import DatasetError, check_array, field_error, validate_dataset_fields

if TYPE_CHECKING:
    import h5py

logger = logging.getLogger(__name__)

#: Value of the root attribute ``format``.
FORMAT_NAME = "iqa-dataset"
#: The format version this code writes and the newest it reads.
FORMAT_VERSION = 1

#: The per-image tables stored as HDF5 groups of ``(N,)`` datasets, with the
#: dtype each is converted to on load.
_TABLES: dict[str, np.dtype[Any]] = {
    "amenability": np.dtype(np.float32),
    "human_amenability": np.dtype(np.uint8),
    "degradations": np.dtype(np.float32),
}

#: (rank, accepted numpy dtype kinds, expectation in words) of every stored
#: field; the table is checked against the file's metadata before any row is
#: read, so a malformed field never costs a full read.
_FIELD_SPECS: dict[str, tuple[int, str, str]] = {
    "images": (4, "u", "uint8 (N, C, H, W)"),
    "labels": (1, "iu", "integer (N,)"),
    "groups": (1, "iu", "integer (N,)"),
    "masks": (3, "ub", "uint8 (N, H, W)"),
    "amenability": (1, "f", "float32 in [0, 1] (N,)"),
    "human_amenability": (1, "iub", "uint8 in {0, 1} (N,)"),
    "degradations": (1, "fiub", "float (N,)"),
}


def _import_h5py() -> Any:
    import h5py

    return h5py


def _attr_error(path: Path, name: str, message: str) -> DatasetError:
    return DatasetError(f"{path}: root attribute '{name}': {message}")


# --------------------------------------------------------------------- saving
def save_dataset(
    ds: ImageDataset,
    path: str | os.PathLike[str],
    *,
    compression: bool = True,
    compression_level: int = 4,
) -> Path:
    """Write ``ds`` to ``path`` as an iqa-dataset HDF5 file and return the path.

    Args:
        ds: the dataset; validated again before anything is written.
        path: destination file (conventionally ``*.h5``).  Missing parent
            folders are created; an existing file is replaced atomically.
        compression: gzip-compress the image and mask arrays (lossless).
            Speckle-like images compress little, binary masks a lot.
        compression_level: gzip level 0-9 when ``compression`` is on.

    Images are chunked one image per chunk (``(1, C, H, W)``), masks likewise,
    so that reading a subset of rows decompresses only those rows.

    Raises:
        DatasetError: ``ds`` does not follow the format, or ``metadata`` is not
            JSON-serialisable.
        TypeError: ``ds`` is not an :class:`ImageDataset`.
        ValueError: ``compression_level`` outside 0-9.
        IsADirectoryError: ``path`` is an existing folder.
        OSError: the file cannot be written (the previous file, if any, is
            left as it was).
    """
    if not isinstance(ds, ImageDataset):
        raise TypeError(f"save_dataset expects an ImageDataset, got {type(ds).__name__}")
    if not 0 <= compression_level <= 9:
        raise ValueError(f"compression_level must be in 0..9, got {compression_level}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path}: is a folder; expected the path of the HDF5 file to write (e.g. {path / 'data.h5'})"
        )
    validate_dataset_fields(ds, source=str(path))
    try:
        metadata_json = json.dumps(ds.metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise field_error(
            str(path),
            "metadata",
            f"must be JSON-serialisable (strings, numbers, lists, dicts): {e}",
        ) from e
    h5py = _import_h5py()

    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the destination: os.replace is only atomic within one
    # filesystem.  A unique name lets concurrent writers (e.g. two processes
    # creating the cached default dataset) never collide.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    gzip: dict[str, Any] = (
        {"compression": "gzip", "compression_opts": compression_level, "shuffle": False}
        if compression
        else {}
    )
    n, c, h, w = ds.images.shape
    try:
        with h5py.File(tmp, "w-") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["class_names"] = json.dumps(list(ds.class_names))
            f.attrs["metadata"] = metadata_json
            f.create_dataset("images", data=ds.images, chunks=(1, c, h, w), **gzip)
            f.create_dataset("labels", data=ds.labels.astype(np.int64, copy=False))
            f.create_dataset("groups", data=ds.groups.astype(np.int64, copy=False))
            if ds.masks is not None:
                f.create_dataset(
                    "masks", data=ds.masks.astype(np.uint8, copy=False), chunks=(1, h, w), **gzip
                )
            for table, dtype in _TABLES.items():
                values: dict[str, np.ndarray] = getattr(ds, table)
                if not values:
                    continue
                group = f.create_group(table)
                for name, array in values.items():
                    group.create_dataset(name, data=array.astype(dtype, copy=False))
        # Data on disk before the rename makes it visible: a crash must never
        # leave an empty or partial file under the final name.
        with tmp.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave whatever was at ``path`` untouched and no litter behind.
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("wrote %d images to %s", n, path)
    return path


# -------------------------------------------------------------------- loading
@dataclass(frozen=True)
class DatasetHeader:
    """What a dataset file holds, read from its metadata without loading any rows."""

    path: Path
    num_images: int
    image_shape: tuple[int, int, int]
    """``(C, H, W)`` of one image."""
    class_names: tuple[str, ...]
    has_masks: bool
    amenability_tasks: tuple[str, ...]
    human_amenability_tasks: tuple[str, ...]
    degradations: tuple[str, ...]
    metadata: dict[str, Any]
    format_version: int
    file_bytes: int


def _open(path: str | os.PathLike[str]) -> tuple[Path, Any]:
    """Open ``path`` read-only, turning every way it can fail into a clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset file")
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; expected an iqa-dataset HDF5 file (.h5)")
    h5py = _import_h5py()
    if not h5py.is_hdf5(path):
        raise DatasetError(
            f"{path}: not an HDF5 file (no HDF5 signature); expected an iqa-dataset HDF5 file "
            "written by save_dataset or `iqa data ...` (see docs/data-format.md)"
        )
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(
            f"{path}: cannot be opened as HDF5 ({e}); the file is truncated or corrupt, "
            "expected a complete iqa-dataset file (write it again)"
        ) from e
    return path, f


def _read_attrs(path: Path, f: h5py.File) -> tuple[tuple[str, ...], dict[str, Any], int]:
    """Check ``format`` / ``format_version`` and parse ``class_names`` / ``metadata``."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    if fmt is None:
        raise _attr_error(
            path,
            "format",
            f"missing; expected {FORMAT_NAME!r} (this HDF5 file was not written by save_dataset; "
            "see docs/data-format.md)",
        )
    if fmt != FORMAT_NAME:
        raise _attr_error(path, "format", f"expected {FORMAT_NAME!r}, got {fmt!r}")
    version = f.attrs.get("format_version")
    if version is None:
        raise _attr_error(path, "format_version", f"missing; expected the integer {FORMAT_VERSION}")
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise _attr_error(
            path, "format_version", f"expected the integer {FORMAT_VERSION}, got {version!r}"
        ) from None
    if version < 1 or version > FORMAT_VERSION:
        raise _attr_error(
            path,
            "format_version",
            f"this version of iqa reads format_version 1..{FORMAT_VERSION}, got {version}"
            + ("; upgrade iqa to read it" if version > FORMAT_VERSION else ""),
        )

    def parse_json(name: str, kind: type, expected: str) -> Any:
        raw = f.attrs.get(name)
        if raw is None:
            raise _attr_error(path, name, f"missing; expected {expected}")
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        try:
            value = json.loads(str(raw))
        except json.JSONDecodeError as e:
            raise _attr_error(path, name, f"is not valid JSON ({e}); expected {expected}") from None
        if not isinstance(value, kind):
            raise _attr_error(path, name, f"expected {expected}, got {type(value).__name__}")
        return value

    class_names = parse_json("class_names", list, "a JSON list of class-name strings")
    if not class_names or not all(isinstance(c, str) for c in class_names):
        raise _attr_error(
            path, "class_names", f"expected a non-empty JSON list of strings, got {class_names!r}"
        )
    metadata = parse_json("metadata", dict, "a JSON object")
    return tuple(class_names), metadata, version


def _fields(path: Path, f: h5py.File) -> dict[str, Any]:
    """The HDF5 datasets of the file by field name, checked against the spec without reading."""
    h5py = _import_h5py()
    src = str(path)

    def check(field: str, spec: str, node: Any, length: int | None) -> None:
        if not isinstance(node, h5py.Dataset):
            raise field_error(src, field, f"is an HDF5 {type(node).__name__}, expected a dataset (array)")
        ndim, kinds, expected = _FIELD_SPECS[spec]
        # A stand-in with the stored rank, dtype and length (zero-filled, and
        # empty beyond the first axis) lets the shared check_array judge the
        # field from metadata alone; values are checked once rows are read.
        proxy_shape = tuple(node.shape[:1]) + (0,) * max(len(node.shape) - 1, 0)
        proxy = np.zeros(proxy_shape, node.dtype)
        check_array(
            src, field, proxy, ndim=ndim, kinds=kinds, length=length, expected=expected,
            shape=tuple(node.shape),
        )

    nodes: dict[str, Any] = {}
    for field in ("images", "labels", "groups"):
        if field not in f:
            raise field_error(src, field, f"missing; expected {_FIELD_SPECS[field][2]} (required field)")
    check("images", "images", f["images"], None)
    if f["images"].dtype != np.uint8:
        raise field_error(src, "images", f"expected dtype uint8, got {f['images'].dtype}")
    n = int(f["images"].shape[0])
    if n == 0:
        raise field_error(src, "images", "the dataset is empty (0 images); expected at least one")
    nodes["images"] = f["images"]
    for field in ("labels", "groups", "masks"):
        if field in f:
            check(field, field, f[field], n)
            nodes[field] = f[field]
    for table in _TABLES:
        if table not in f:
            continue
        if not isinstance(f[table], h5py.Group):
            raise field_error(src, table, "expected an HDF5 group of (N,) datasets, one per name")
        for name, node in f[table].items():
            check(f"{table}/{name}", table, node, n)
            nodes[f"{table}/{name}"] = node
    return nodes


def _read_rows(path: Path, field: str, node: Any, rows: np.ndarray | None) -> np.ndarray:
    """Read all rows of ``node``, or the sorted unique ``rows`` as contiguous runs.

    Runs of consecutive rows are read as slices: h5py's own fancy indexing
    builds its selection point by point and was ~25x slower on 2,800 of 4,000
    64x64 images.
    """
    try:
        if rows is None:
            return np.asarray(node[()])
        out = np.empty((rows.size, *node.shape[1:]), dtype=node.dtype)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate(([0], breaks))
        stops = np.concatenate((breaks, [rows.size]))
        for lo, hi in zip(starts.tolist(), stops.tolist()):
            out[lo:hi] = node[int(rows[lo]) : int(rows[hi - 1]) + 1]
        return out
    except OSError as e:
        raise field_error(
            str(path),
            field,
            f"cannot be read ({e}); the file is truncated or corrupt, expected a complete file",
        ) from e


def _normalise_indices(indices: Sequence[int] | np.ndarray, n: int, path: Path) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(
                f"a boolean indices mask for {path} must have shape ({n},), got {idx.shape}"
            )
        idx = np.flatnonzero(idx)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(
            f"indices must be a 1-D sequence of integers, got an array of dtype {idx.dtype} and "
            f"shape {idx.shape}"
        )
    idx = idx.astype(np.int64)
    if idx.size == 0:
        raise ValueError(f"indices is empty; expected at least one row of the {n} in {path}")
    if idx.min() < -n or idx.max() >= n:
        raise ValueError(
            f"indices must lie in [-{n}, {n - 1}] for the {n} images in {path}, "
            f"got values in [{idx.min()}, {idx.max()}]"
        )
    return np.where(idx < 0, idx + n, idx)


def load_dataset(
    path: str | os.PathLike[str],
    indices: Sequence[int] | np.ndarray | None = None,
) -> ImageDataset:
    """Load an iqa-dataset HDF5 file, or only the rows ``indices`` of it.

    Args:
        path: the file written by :func:`save_dataset` (or by any writer that
            follows ``docs/data-format.md``).
        indices: row numbers to load, in the order wanted (repeats allowed,
            negative numbers count from the end), or a boolean mask of length
            ``N``; ``None`` loads everything.  Only those rows are read from
            disk: a subset of a large file never costs a full read.

    Returns:
        An :class:`ImageDataset`; labels and groups as int64, masks and human
        amenability as uint8, amenability and degradations as float32.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DatasetError: (a ``ValueError``) the file is not a valid iqa-dataset
            file; the message names the file, the field and what was
            expected.  Rank, dtype and length are checked for every field
            before rows are read; value checks (label range, finiteness,
            binary masks) cover the rows loaded.
        ValueError: ``indices`` is empty, out of range or not integers.
    """
    path, f = _open(path)
    with f:
        class_names, metadata, _ = _read_attrs(path, f)
        nodes = _fields(path, f)
        n = int(nodes["images"].shape[0])
        rows: np.ndarray | None = None
        order: np.ndarray | None = None
        if indices is not None:
            wanted = _normalise_indices(indices, n, path)
            # Read increasing unique rows once each, then restore the requested
            # order (and repeats) in memory.
            rows, order = np.unique(wanted, return_inverse=True)
            if np.array_equal(rows, wanted):
                order = None
        arrays = {field: _read_rows(path, field, node, rows) for field, node in nodes.items()}
    if order is not None:
        arrays = {field: a[order] for field, a in arrays.items()}

    tables: dict[str, dict[str, np.ndarray]] = {table: {} for table in _TABLES}
    for field, array in arrays.items():
        table, _, name = field.partition("/")
        if name:
            tables[table][name] = array
    fields = SimpleNamespace(
        images=arrays["images"],
        labels=arrays["labels"],
        groups=arrays["groups"],
        masks=arrays.get("masks"),
        class_names=class_names,
        **tables,
    )
    # Validate with the file as the source, so messages name the file rather
    # than the in-memory type, before casting (a cast could hide a bad value).
    validate_dataset_fields(cast(ImageDataset, fields), source=str(path))
    return ImageDataset(
        images=fields.images,
        labels=fields.labels.astype(np.int64, copy=False),
        groups=fields.groups.astype(np.int64, copy=False),
        masks=None if fields.masks is None else fields.masks.astype(np.uint8, copy=False),
        amenability={
            k: v.astype(_TABLES["amenability"], copy=False)
            for k, v in tables["amenability"].items()
        },
        human_amenability={
            k: v.astype(_TABLES["human_amenability"], copy=False)
            for k, v in tables["human_amenability"].items()
        },
        degradations={
            k: v.astype(_TABLES["degradations"], copy=False)
            for k, v in tables["degradations"].items()
        },
        class_names=class_names,
        metadata=metadata,
    )


def read_header(path: str | os.PathLike[str]) -> DatasetHeader:
    """Describe a dataset file from its metadata alone (no image is read).

    Checks the format attributes and the rank, dtype and length of every
    field, so a header that reads cleanly means :func:`load_dataset` will only
    fail on bad *values*.
    """
    path, f = _open(path)
    with f:
        class_names, metadata, version = _read_attrs(path, f)
        nodes = _fields(path, f)
        shape = tuple(int(s) for s in nodes["images"].shape)

        def names(table: str) -> tuple[str, ...]:
            prefix = table + "/"
            return tuple(sorted(k[len(prefix) :] for k in nodes if k.startswith(prefix)))

        return DatasetHeader(
            path=path,
            num_images=shape[0],
            image_shape=(shape[1], shape[2], shape[3]),
            class_names=class_names,
            has_masks="masks" in nodes,
            amenability_tasks=names("amenability"),
            human_amenability_tasks=names("human_amenability"),
            degradations=names("degradations"),
            metadata=metadata,
            format_version=version,
            file_bytes=path.stat().st_size,
        )


def dataset_length(path: str | os.PathLike[str]) -> int:
    """Number of images ``N`` in a dataset file, without reading them."""
    return read_header(path).num_images
