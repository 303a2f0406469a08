"""The dataset layer: one type (:class:`ImageDataset`), one HDF5 format, sources.

Names are imported lazily so that ``import iqa_env`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImageDataset": "iqa_env.data.dataset",
    "TASKS": "iqa_env.data.dataset",
    "DatasetError": "iqa_env.data.validation",
    "save_dataset": "iqa_env.data.io",
    "load_dataset": "iqa_env.data.io",
    "split_by_group": "iqa_env.data.splits",
    "split_indices_by_group": "iqa_env.data.splits",
    "SPLIT_NAMES": "iqa_env.data.splits",
    "generate_synthetic": "iqa_env.data.synthetic",
    "SyntheticConfig": "iqa_env.data.synthetic",
    "default_dataset": "iqa_env.data.cache",
    "default_dataset_name": "iqa_env.data.cache",
    "default_dataset_path": "iqa_env.data.cache",
    "cache_dir": "iqa_env.data.cache",
    "load_fashion_mnist": "iqa_env.data.fashion_mnist",
    "import_folder": "iqa_env.data.importers",
    "import_medmnist": "iqa_env.data.importers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'iqa_env.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
