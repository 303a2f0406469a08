"""The on-disk cache of the built-in dataset.

``gymnasium.make("TaskAmenability-v0")`` with no ``dataset`` uses the default
synthetic ultrasound set.  It is generated once, saved under :func:`cache_dir`
and loaded from there afterwards.  The file name carries the generator version
and a hash of the generator's settings, so a change to either produces a new
file instead of silently reusing a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from iqa_env.data.dataset import ImageDataset

logger = logging.getLogger(__name__)

#: Environment variable that overrides the cache folder.
CACHE_ENV_VAR = "IQA_CACHE_DIR"


def cache_dir() -> Path:
    """The folder of cached data.

    ``$IQA_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/iqa``, else ``~/.cache/iqa``.

    The folder is not created here; writers create it when they need it.
    """
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "iqa"
    return Path.home() / ".cache" / "iqa"


def _default_config_tag() -> str:
    """``v<generator version>-<hash of the default settings>``, for the cache file name."""
    from iqa_env.data import synthetic

    config = synthetic.SyntheticConfig()
    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else vars(config)
    # A setting that is off by default (None) leaves the default data as it was, so it leaves the
    # name too: the cache, and the fingerprint runs record for the built-in set, stay valid.
    settings = {name: value for name, value in settings.items() if value is not None}
    digest = hashlib.sha256(
        json.dumps(settings, sort_keys=True, default=repr).encode("utf-8")
    ).hexdigest()[:12]
    # The generator bumps its version whenever the same settings start to give
    # different images; prefer the public name, accept the module-private one.
    version = getattr(synthetic, "GENERATOR_VERSION", getattr(synthetic, "_VERSION", 0))
    return f"v{version}-{digest}"


def default_dataset_name() -> str:
    """File name of the built-in set's cache, ``synthetic-default-v<version>-<hash>.h5``.

    It names the data (the generator's version and a hash of its default
    settings), so runs record it to tell the built-in set's versions apart;
    nothing is generated.
    """
    return f"synthetic-default-{_default_config_tag()}.h5"


def default_dataset_path() -> Path:
    """Path of the built-in synthetic dataset, generating and saving it on first use.

    Safe when several processes ask at once: each writes its own temporary
    file and atomically renames it into place, so readers only ever see a
    complete file (the copies are identical: generation is deterministic).
    """
    path = cache_dir() / default_dataset_name()
    if path.is_file():
        return path
    from iqa_env.data.io import save_dataset
    from iqa_env.data.synthetic import generate_synthetic

    logger.info("generating the built-in synthetic dataset once; caching it at %s", path)
    save_dataset(generate_synthetic(), path)
    return path


def default_dataset() -> ImageDataset:
    """The built-in synthetic dataset (100 patients x 40 frames of 64 x 64 by default)."""
    from iqa_env.data.io import load_dataset
    from iqa_env.data.validation import DatasetError

    path = default_dataset_path()
    try:
        return load_dataset(path)
    except DatasetError as e:
        # Only a file damaged after it was written gets here (writes are
        # atomic); it is a cache, so rebuild it rather than fail.
        logger.warning("the cached built-in dataset is unreadable (%s); regenerating it", e)
        path.unlink(missing_ok=True)
        return load_dataset(default_dataset_path())
