"""Every row of docs/errors.md: bad input gets a clear error, and nothing already written is lost.

Each test checks the Python API (the exception type and the words that say
what was wrong and what was expected) and, for files and settings, the
command line: ``iqa <command>`` prints exactly one line ``iqa <command>:
error: <the API's message>``, no traceback, and exits with status 2.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from experiments.cli import main
from iqa_env.data import DatasetError, ImageDataset, load_dataset, save_dataset
from iqa_env.env import TaskAmenabilityEnv, resolve_device
from tests.test_data_io import empty, replace, with_value

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = ROOT / "docs" / "errors.md"
TINY = dict(batch_size=8, train_steps=2, validation_size=8, device="cpu")
CUDA_MISSING = "CUDA is not available" if not torch.cuda.is_available() else "does not exist"


# ------------------------------------------------------------------ helpers
def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 2) -> str:
    """Run ``iqa argv``; check it fails with ``code`` and one error line; return the message."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = f"iqa {argv[0]}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix) :]


def api_error(error: type[BaseException], call: Callable[[], Any]) -> str:
    """The message of the ``error`` that ``call()`` raises (exactly that type or a subclass)."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    return message


def assert_mentions(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """An argparse refusal: exit status 2, one ``error:`` line (no usage block, no traceback); returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"iqa {argv[0]}: error: argument "), captured.err
    assert lines[0].endswith(f" (see iqa {argv[0]} --help)"), captured.err
    return lines[0]


def dataset(
    n: int = 48,
    size: int = 16,
    *,
    labels: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    masks: np.ndarray | None | str = "random",
    human: dict[str, np.ndarray] | None = None,
    class_names: tuple[str, ...] = ("absent", "present"),
) -> ImageDataset:
    """A small valid dataset with every field; keyword arguments replace one field."""
    rng = np.random.default_rng(0)
    return ImageDataset(
        images=rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8),
        labels=np.arange(n) % 2 if labels is None else labels,
        groups=np.arange(n) // 4 if groups is None else groups,
        masks=rng.integers(0, 2, (n, size, size), dtype=np.uint8) if isinstance(masks, str) else masks,
        amenability={"classification": np.linspace(0, 1, n, dtype=np.float32)},
        human_amenability={"classification": (np.arange(n) % 3 > 0).astype(np.uint8)}
        if human is None
        else human,
        degradations={"severity": np.zeros(n, np.float32)},
        class_names=class_names,
    )


@pytest.fixture(scope="module")
def controller_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained controller for (1, 16, 16) images, saved as `iqa train` saves one."""
    from agents import Controller
    from iqa_env.networks import ControllerBackbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ctrl") / "controller"
    Controller(ControllerBackbone((1, 16, 16))).save(path)
    return path


@pytest.fixture
def existing_csv(tmp_path: Path) -> Path:
    """A scores CSV from an earlier run, which a failing `iqa score` must leave alone."""
    path = tmp_path / "scores.csv"
    path.write_text("index,score,rejected\n0,0.500000,0\n")
    return path


def unchanged(path: Path, content: bytes) -> bool:
    """``path`` still holds ``content`` and no temporary file was left beside it."""
    litter = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    return path.read_bytes() == content and not litter


# ====================================================== dataset files (HDF5)
# The file mutators are tests/test_data_io.py's (one copy).
# case -> (make the bad file at path, exception type, words the message must hold)
BAD_FILES: dict[str, tuple[Callable[[Path], None], type[BaseException], tuple[str, ...]]] = {}


def _bad_file(case: str, error: type[BaseException], *words: str) -> Callable:
    def register(make: Callable[[Path], None]) -> Callable[[Path], None]:
        BAD_FILES[case] = (make, error, words)
        return make

    return register


def _mutated(mutate: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        save_dataset(dataset(), path)
        with h5py.File(path, "a") as f:
            mutate(f)

    return make


@_bad_file("missing-path", FileNotFoundError, "no such dataset file")
def _missing(path: Path) -> None:
    pass


@_bad_file("folder", DatasetError, "is a folder", "expected an iqa-dataset HDF5 file")
def _folder(path: Path) -> None:
    path.mkdir()


@_bad_file("not-hdf5", DatasetError, "not an HDF5 file", "expected an iqa-dataset HDF5 file", "docs/data-format.md")
def _not_hdf5(path: Path) -> None:
    path.write_text("file,label\na.png,0\n")


@_bad_file("truncated", DatasetError, "truncated or corrupt", "expected a complete")
def _truncated(path: Path) -> None:
    save_dataset(dataset(n=64, size=32), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@_bad_file("not-an-iqa-file", DatasetError, "root attribute 'format'", "missing; expected 'iqa-dataset'")
def _foreign_hdf5(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)


BAD_FILES.update(
    {
        "newer-format-version": (
            _mutated(lambda f: f.attrs.__setitem__("format_version", 2)),
            DatasetError,
            ("root attribute 'format_version'", "reads format_version 1..1, got 2", "upgrade iqa"),
        ),
        "missing-field": (
            _mutated(lambda f: f.__delitem__("labels")),
            DatasetError,
            ("field 'labels'", "missing; expected integer (N,)"),
        ),
        "wrong-dtype": (
            _mutated(replace("images", np.zeros((48, 1, 16, 16), np.float32))),
            DatasetError,
            ("field 'images'", "expected dtype uint8", "got float32"),
        ),
        "wrong-rank": (
            _mutated(replace("images", np.zeros((48, 16, 16), np.uint8))),
            DatasetError,
            ("field 'images'", "expected 4 dimensions (uint8 (N, C, H, W))", "got shape (48, 16, 16)"),
        ),
        "wrong-channels": (
            _mutated(replace("images", np.zeros((48, 2, 16, 16), np.uint8))),
            DatasetError,
            ("field 'images'", "expected 1 or 3 channels"),
        ),
        "lengths-disagree": (
            _mutated(replace("groups", np.zeros(47, np.int64))),
            DatasetError,
            ("field 'groups'", "has 47 entries but 'images' has 48", "one entry per image"),
        ),
        "masks-of-another-size": (
            _mutated(replace("masks", np.zeros((48, 8, 8), np.uint8))),
            DatasetError,
            ("field 'masks'", "mask size (8, 8) does not match image size (16, 16)", "expected (N, H, W)"),
        ),
        "masks-not-binary": (
            _mutated(with_value("masks", (0, 0, 0), 255)),
            DatasetError,
            ("field 'masks'", "expected binary values {0, 1}", "got maximum 255"),
        ),
        "labels-outside-the-classes": (
            _mutated(with_value("labels", 5, 7)),
            DatasetError,
            ("field 'labels'", "must lie in [0, 1] for the 2 declared classes", "got values in [0, 7]"),
        ),
        "nan": (
            _mutated(with_value("amenability/classification", 3, np.nan)),
            DatasetError,
            ("field 'amenability/classification'", "1 NaN or infinite value(s)", "expected finite numbers"),
        ),
        "inf": (
            _mutated(with_value("degradations/severity", 0, np.inf)),
            DatasetError,
            ("field 'degradations/severity'", "NaN or infinite", "expected finite numbers"),
        ),
        "amenability-outside-0-1": (
            _mutated(with_value("amenability/classification", 3, 1.5)),
            DatasetError,
            ("field 'amenability/classification'", "values must lie in [0, 1]"),
        ),
        "empty": (
            _mutated(empty),
            DatasetError,
            ("field 'images'", "the dataset is empty (0 images); expected at least one"),
        ),
    }
)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_dataset_file(
    case: str, tmp_path: Path, controller_dir: Path, existing_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, error, words = BAD_FILES[case]
    path = tmp_path / "data.h5"
    make(path)
    message = api_error(error, lambda: load_dataset(path))
    assert message.startswith(f"{path}: "), message
    assert_mentions(message, *words)
    # The environment reads the file with the same loader and says the same.
    assert api_error(error, lambda: TaskAmenabilityEnv(path, **TINY)) == message
    # Every command that reads a dataset prints that message as its one line.
    assert cli_error(["data", "inspect", path], capsys) == message
    before = existing_csv.read_bytes()
    score = cli_error(["score", "--controller", controller_dir, path, "--out", existing_csv], capsys)
    if case == "folder":  # `iqa score` reads a folder as a folder of images
        assert_mentions(score, f"{path}: no images found")
    elif case == "missing-path":
        assert_mentions(score, f"{path}: no such dataset file or images folder")
    else:
        assert score == message
    assert unchanged(existing_csv, before)
    train = ["train", "--dataset", path, "--out", tmp_path / "run", "--device", "cpu", "--no-progress"]
    if case == "missing-path":  # `iqa train` checks its settings before reading anything
        train_message = cli_error(train, capsys)
        assert str(path) in train_message
        assert "does not exist" in train_message or "no such dataset file" in train_message
    else:
        assert cli_error(train, capsys) == message
    assert not (tmp_path / "run").exists()


def test_a_real_process_prints_one_line_and_exit_status_2(tmp_path: Path) -> None:
    """Outside pytest's capture too: one line on stderr, nothing on stdout, status 2."""
    bad = tmp_path / "notes.h5"
    bad.write_text("not a dataset\n")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "data", "inspect", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith(f"iqa data: error: {bad}: not an HDF5 file")
    assert done.stderr.count("\n") == 1, done.stderr


# ================================== datasets the chosen task or reward cannot use
UNUSABLE: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]] = {
    # case: (dataset fields, env settings, words of the message)
    "one-class-only": (
        dict(labels=np.zeros(48, np.int64)),
        dict(task="classification"),
        (
            "classification task needs training images of at least 2 classes",
            "have label 0 ('absent')",
            "expected labels of at least two of the classes ['absent', 'present']",
            "task='segmentation'",
        ),
    ),
    "one-declared-class": (
        dict(labels=np.zeros(48, np.int64), class_names=("unlabelled",)),
        dict(task="classification"),
        ("classification task needs at least 2 classes", "declares 1: ['unlabelled']", "--labels"),
    ),
    "too-few-patients": (
        dict(groups=np.arange(48) % 2),
        dict(),
        (
            "a 3-way split needs at least 3 groups (patients)",
            "the dataset has 2",
            "expected at least one patient per part",
            "field 'groups'",
        ),
    ),
    "segmentation-without-masks": (
        dict(masks=None),
        dict(task="segmentation"),
        (
            "the segmentation task needs segmentation masks",
            "field 'masks' is absent",
            "task='classification' or a dataset with masks",
        ),
    ),
    "segmentation-masks-all-background": (
        dict(masks=np.zeros((48, 16, 16), np.uint8)),
        dict(task="segmentation"),
        ("needs training masks with both foreground (1) and background (0) pixels", "every pixel", "is 0"),
    ),
    "fixed-reward-without-human-labels": (
        dict(human={}),
        dict(reward="fixed"),
        (
            "the fixed reward needs human amenability labels for task 'classification'",
            "field 'human_amenability/classification' is absent",
            "a human_amenability_classification column in the labels CSV",
        ),
    ),
    "fixed-reward-no-image-rated-amenable": (
        dict(human={"classification": np.zeros(48, np.uint8)}),
        dict(reward="fixed"),
        (
            "the fixed reward needs validation images labelled amenable",
            "human_amenability/classification == 1",
            "use reward='weighted'",
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_dataset_the_task_or_reward_cannot_use(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fields, settings, words = UNUSABLE[case]
    ds = dataset(**fields)
    path = save_dataset(ds, tmp_path / "data.h5")
    # Refused when the env is built, before any step: in memory and from a file alike.
    message = api_error(ValueError, lambda: TaskAmenabilityEnv(ds, **{**TINY, **settings}))
    assert_mentions(message, *words)
    assert api_error(ValueError, lambda: TaskAmenabilityEnv(path, **{**TINY, **settings})) == message
    argv = ["train", "--dataset", path, "--batch-size", "8", "--device", "cpu", "--steps", "8"]
    argv += [x for k, v in settings.items() for x in (f"--{k}", v)]
    assert cli_error(argv + ["--out", tmp_path / "run", "--no-progress"], capsys) == message
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


# ========================================================= images for iqa score
def _png(path: Path, shape: tuple[int, ...], dtype: Any = np.uint8) -> None:
    from PIL import Image

    Image.fromarray(np.full(shape, 100, dtype)).save(path)


def _folder_with(tmp_path: Path, files: dict[str, Callable[[Path], None]]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, make in files.items():
        make(folder / name)
    return folder


BAD_FOLDERS: dict[str, tuple[dict[str, Callable[[Path], None]], type[BaseException], tuple[str, ...]]] = {
    "empty-folder": (
        {"notes.txt": lambda p: p.write_text("no images here")},
        ValueError,
        ("no images found", "expected files ending in .png, .jpg"),
    ),
    "unreadable-file": (
        {"a.png": lambda p: _png(p, (16, 16)), "broken.png": lambda p: p.write_text("not a png")},
        ValueError,
        ("broken.png: cannot be read as an image", "expected a readable image file", "replace it or move it out"),
    ),
    "truncated-image": (
        {
            "a.png": lambda p: _png(p, (16, 16)),
            "cut.png": lambda p: (
                _png(p, (64, 64)),
                p.write_bytes(p.read_bytes()[:60]),
            ),
        },
        ValueError,
        ("cut.png: cannot be", "expected a", "replace it or move it out"),
    ),
    "16-bit-image": (
        {"deep.png": lambda p: _png(p, (16, 16), np.uint16)},
        ValueError,
        ("deep.png: PIL mode 'I;16' has more than 8 bits per pixel", "expected 8-bit grey or RGB"),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_images_for_score(
    case: str, tmp_path: Path, controller_dir: Path, existing_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from iqa_env.data.importers import import_folder

    files, error, words = BAD_FOLDERS[case]
    folder = _folder_with(tmp_path, files)
    # `iqa score` reads a folder as import_folder(size=the controller's (H, W), channels=its C).
    message = api_error(error, lambda: import_folder(folder, size=(16, 16), channels=1))
    assert_mentions(message, str(folder), *words)
    before = existing_csv.read_bytes()
    assert cli_error(["score", "--controller", controller_dir, folder, "--out", existing_csv], capsys) == message
    assert unchanged(existing_csv, before)


def test_score_resizes_and_converts_mixed_images(
    tmp_path: Path, controller_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Documented choice: `iqa score` resizes and converts; `iqa data import-folder` refuses."""
    import csv

    from iqa_env.data.importers import import_folder

    folder = _folder_with(
        tmp_path,
        {
            "grey-small.png": lambda p: _png(p, (8, 8)),
            "grey-wide.png": lambda p: _png(p, (20, 30)),
            "colour.png": lambda p: _png(p, (16, 16, 3)),
        },
    )
    out = tmp_path / "scores.csv"
    assert main(["score", "--controller", str(controller_dir), str(folder), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == ["colour.png", "grey-small.png", "grey-wide.png"]
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    # Without size / channels the importer refuses, naming the files and the option to use.
    sizes = api_error(ValueError, lambda: import_folder(folder, channels=1))
    assert_mentions(sizes, "images have different sizes", "8x8: grey-small.png", "20x30: grey-wide.png", "--size")
    kinds = api_error(ValueError, lambda: import_folder(folder, size=16))
    assert_mentions(kinds, "mix grey and colour", "3 channel(s): colour.png", "--channels")
    assert cli_error(["data", "import-folder", folder, "--channels", "1", "--out", tmp_path / "x.h5"], capsys) == sizes
    assert cli_error(["data", "import-folder", folder, "--size", "16", "--out", tmp_path / "x.h5"], capsys) == kinds
    assert not (tmp_path / "x.h5").exists()


def test_score_input_that_does_not_exist(
    tmp_path: Path, controller_dir: Path, existing_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = existing_csv.read_bytes()
    message = cli_error(["score", "--controller", controller_dir, tmp_path / "nowhere", "--out", existing_csv], capsys)
    assert_mentions(message, "nowhere", "no such dataset file or images folder")
    assert unchanged(existing_csv, before)


def test_score_dataset_of_another_image_shape(
    tiny_synthetic_path: Path, controller_dir: Path, existing_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = existing_csv.read_bytes()
    message = cli_error(
        ["score", "--controller", controller_dir, tiny_synthetic_path, "--out", existing_csv], capsys
    )
    assert_mentions(
        message, "images are (1, 32, 32) (C, H, W)", "trained on (1, 16, 16)", "expected a dataset of the controller's"
    )
    assert unchanged(existing_csv, before)


def test_score_controller_missing_or_corrupt(
    tmp_path: Path, controller_dir: Path, existing_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agents import Controller

    before = existing_csv.read_bytes()
    data = save_dataset(dataset(), tmp_path / "data.h5")
    missing = api_error(FileNotFoundError, lambda: Controller.load(tmp_path / "nowhere"))
    assert_mentions(missing, "controller.json not found", "written by Controller.save or `iqa train`")
    assert cli_error(["score", "--controller", tmp_path / "nowhere", data, "--out", existing_csv], capsys) == missing
    # A run folder of `iqa train` given instead of its controller/ inside.
    run = tmp_path / "run"
    shutil.copytree(controller_dir, run / "controller")
    message = cli_error(["score", "--controller", run, data, "--out", existing_csv], capsys)
    assert_mentions(message, f"{run / 'controller.json'} not found", f"did you mean {run / 'controller'}?")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "controller.json").write_bytes((controller_dir / "controller.json").read_bytes())
    (corrupt / "controller.pt").write_bytes(b"these are not weights")
    message = api_error(ValueError, lambda: Controller.load(corrupt))
    assert_mentions(message, "controller.pt: not a controller weights file", "expected the controller.pt")
    assert cli_error(["score", "--controller", corrupt, data, "--out", existing_csv], capsys) == message
    assert unchanged(existing_csv, before)


# ================================================================= settings
def test_batch_size_larger_than_the_training_set(
    tiny_synthetic_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = api_error(ValueError, lambda: TaskAmenabilityEnv(tiny_synthetic_path, **{**TINY, "batch_size": 1000}))
    assert_mentions(message, "batch_size 1000 is larger than the training set (", "use a smaller batch_size")
    argv = ["train", "--dataset", tiny_synthetic_path, "--batch-size", "1000", "--device", "cpu"]
    assert cli_error(argv + ["--out", tmp_path / "run", "--no-progress"], capsys) == message
    assert not (tmp_path / "run").exists()


def test_batch_size_not_positive(tiny_synthetic_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.training import TrainConfig

    message = api_error(ValueError, lambda: TaskAmenabilityEnv(tiny_synthetic_path, **{**TINY, "batch_size": 0}))
    assert_mentions(message, "batch_size must be a positive integer, got 0")
    # TrainConfig checks the env's sizes too, before anything is loaded.
    for value in (0, True, "all"):
        assert api_error(ValueError, lambda v=value: TrainConfig(batch_size=v).validate()) == (
            f"batch_size must be a positive integer or 'auto' (the algorithm's recommended number), got {value!r}"
        )
    for value in (0, 2.5):
        refused = api_error(ValueError, lambda v=value: TrainConfig(train_steps=v).validate())
        assert refused == f"train_steps must be a positive integer, got {value!r}"
    for value in (0, "all"):
        assert api_error(ValueError, lambda v=value: TrainConfig(validation_size=v).validate()) == (
            "validation_size must be a positive integer, None (all) or 'auto' (the algorithm's recommended "
            f"number), got {value!r}"
        )
    # The command line says what TrainConfig says (leaving --batch-size out is its "auto").
    argv = ["train", "--dataset", tiny_synthetic_path, "--batch-size", "0", "--device", "cpu"]
    assert cli_error(argv + ["--out", tmp_path / "run", "--no-progress"], capsys) == (
        "batch_size must be a positive integer or 'auto' (the algorithm's recommended number), got 0"
    )
    assert not (tmp_path / "run").exists()


def test_mirror_average_not_a_flag() -> None:
    """A string is truthy and 1 is not a flag: ``TrainConfig.mirror_average`` refuses both, as the controller does."""
    from agents import Controller
    from experiments.training import TrainConfig
    from iqa_env.networks import ControllerBackbone

    for value, shown in ((1, "int 1"), ("no", "str 'no'"), (None, "NoneType None")):
        assert api_error(ValueError, lambda v=value: TrainConfig(mirror_average=v).validate()) == (
            f"mirror_average must be True or False, got {shown}"
        )
        assert api_error(ValueError, lambda v=value: Controller(ControllerBackbone((1, 16, 16)), mirror_average=v)) == (
            f"mirror_average must be True or False, got {shown}"
        )


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, math.nan])
def test_rejection_ratio_outside_0_1(
    ratio: float,
    tiny_synthetic_path: Path,
    controller_dir: Path,
    existing_csv: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from iqa_env.rewards import check_rejection_ratio

    message = api_error(ValueError, lambda: check_rejection_ratio(ratio))
    assert_mentions(message, "rejection_ratio must be a number in [0, 1)", f"got {ratio!r}", "use e.g. 0.05")
    env_message = api_error(
        ValueError, lambda: TaskAmenabilityEnv(tiny_synthetic_path, reward="selective", rejection_ratio=ratio, **TINY)
    )
    assert env_message == message
    before = existing_csv.read_bytes()
    argv = ["score", "--controller", controller_dir, tiny_synthetic_path, "--out", existing_csv]
    assert cli_error(argv + ["--rejection-ratio", str(ratio)], capsys) == message
    assert unchanged(existing_csv, before)


@pytest.mark.parametrize("ratio", ["0.05", True, None])
def test_rejection_ratio_not_a_number(ratio: Any) -> None:
    from iqa_env.rewards import check_rejection_ratio

    message = api_error(TypeError, lambda: check_rejection_ratio(ratio))
    assert_mentions(message, "rejection_ratio must be a number in [0, 1)", type(ratio).__name__)
    # numpy numbers are numbers
    assert check_rejection_ratio(np.float32(0.25)) == 0.25


@pytest.fixture(scope="module")
def tiny_env(tiny_synthetic) -> TaskAmenabilityEnv:
    return TaskAmenabilityEnv(tiny_synthetic, **TINY)


def test_unknown_algorithm(tiny_env: TaskAmenabilityEnv, capsys: pytest.CaptureFixture[str]) -> None:
    from agents import make_agent
    from experiments.training import TrainConfig

    message = api_error(ValueError, lambda: make_agent("dqn", tiny_env))
    assert_mentions(message, "algorithm must be one of ('ddpg', 'reinforce', 'ppo', 'a2c', 'sac', 'td3')", "'dqn'")
    assert_mentions(api_error(ValueError, lambda: TrainConfig(algo="dqn").validate()), "algo must be one of", "'dqn'")
    line = usage_error(["train", "--algo", "dqn", "--out", "run"], capsys)
    assert_mentions(line, "argument --algo: invalid choice: 'dqn'", "'reinforce'")


def test_unknown_task(tiny_synthetic, capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.training import TrainConfig
    from iqa_env.tasks import make_task

    message = api_error(ValueError, lambda: make_task("detection"))
    assert_mentions(message, "task must be one of ('classification', 'segmentation')", "'detection'")
    assert api_error(ValueError, lambda: TaskAmenabilityEnv(tiny_synthetic, task="detection", **TINY)) == message
    assert api_error(ValueError, lambda: TrainConfig(task="detection").validate()) == message
    assert_mentions(api_error(TypeError, lambda: make_task(["segmentation"])), "task must be a task name", "list")
    line = usage_error(["train", "--task", "detection", "--out", "run"], capsys)
    assert_mentions(line, "argument --task: invalid choice: 'detection'", "'segmentation'")


def test_unknown_reward(tiny_synthetic, capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.training import TrainConfig

    message = api_error(ValueError, lambda: TaskAmenabilityEnv(tiny_synthetic, reward="best", **TINY))
    assert_mentions(message, "reward must be one of ('fixed', 'weighted', 'selective')", "'best'")
    assert api_error(ValueError, lambda: TrainConfig(reward="best").validate()) == message
    assert_mentions(
        api_error(TypeError, lambda: TaskAmenabilityEnv(tiny_synthetic, reward=None, **TINY)),
        "reward must be one of the names",
        "NoneType",
    )
    line = usage_error(["train", "--reward", "best", "--out", "run"], capsys)
    assert_mentions(line, "argument --reward: invalid choice: 'best'", "'weighted'")


def test_device_that_is_not_there(
    tiny_synthetic_path: Path,
    controller_dir: Path,
    existing_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agents import Controller

    message = api_error(ValueError, lambda: resolve_device("cuda:99"))
    assert_mentions(message, "device 'cuda:99'", CUDA_MISSING)
    assert api_error(ValueError, lambda: TaskAmenabilityEnv(tiny_synthetic_path, **{**TINY, "device": "cuda:99"})) == message
    assert api_error(ValueError, lambda: Controller.load(controller_dir, device="cuda:99")) == message
    argv = ["train", "--dataset", tiny_synthetic_path, "--batch-size", "8", "--device", "cuda:99"]
    assert cli_error(argv + ["--out", tmp_path / "run", "--no-progress"], capsys) == message
    before = existing_csv.read_bytes()
    argv = ["score", "--controller", controller_dir, tiny_synthetic_path, "--out", existing_csv]
    assert cli_error(argv + ["--device", "cuda:99"], capsys) == message
    assert unchanged(existing_csv, before)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", ""])
def test_device_name_unknown(
    device: str, controller_dir: Path, tiny_synthetic_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = api_error(ValueError, lambda: resolve_device(device))
    assert message == f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}"
    argv = ["score", "--controller", controller_dir, tiny_synthetic_path, "--device", device]
    assert cli_error(argv, capsys) == message


def test_refused_train_leaves_the_run_folder_untouched(
    tiny_synthetic_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused `iqa train` writes nothing in --out (no config.json), so the corrected command can reuse it."""
    run = tmp_path / "run"
    one_class = save_dataset(dataset(labels=np.zeros(48, np.int64)), tmp_path / "one-class.h5")
    tiny = ["--steps", "8", "--train-steps", "2", "--validation-size", "8", "--device", "cpu", "--no-progress"]
    tiny += ["--out", run]
    # A refused setting: the folder is not even created.
    message = cli_error(["train", "--dataset", tiny_synthetic_path, "--batch-size", "0", *tiny], capsys)
    assert message == "batch_size must be a positive integer or 'auto' (the algorithm's recommended number), got 0"
    assert not run.exists()
    # An argument the algorithm refuses only when it is built (REINFORCE's own check of its per-image
    # baseline): nor is it left behind.
    baseline = '{"image_baseline": "nope"}'
    message = cli_error(["train", "--dataset", tiny_synthetic_path, "--agent-kwargs", baseline, *tiny], capsys)
    assert_mentions(message, "cannot build reinforce with agent_kwargs", "image_baseline must be one of")
    assert not run.exists()
    # A dataset the task cannot use, or a batch larger than the training set, into a folder that
    # exists already: the folder is left as it was.
    run.mkdir()
    (run / "notes.txt").write_text("the user's own file")
    message = cli_error(["train", "--dataset", one_class, "--batch-size", "8", *tiny], capsys)
    assert_mentions(message, "the classification task needs training images of at least 2 classes")
    message = cli_error(["train", "--dataset", tiny_synthetic_path, "--batch-size", "1000", *tiny], capsys)
    assert_mentions(message, "batch_size 1000 is larger than the training set")
    # Arguments the algorithm or the env does not take, or values it refuses: named with the option.
    good = ["train", "--dataset", tiny_synthetic_path, "--batch-size", "8"]
    message = cli_error([*good, "--agent-kwargs", '{"nope": 1}', *tiny], capsys)
    assert_mentions(message, "agent_kwargs: reinforce takes no setting 'nope'; the names it takes: ", "class_balance")
    message = cli_error([*good, "--agent-kwargs", '{"policy_kwargs": {"width": 8}}', *tiny], capsys)
    assert message == (
        "agent_kwargs: policy_kwargs takes no setting 'width'; it is a setting of features_extractor_kwargs: "
        "give it in policy_kwargs' features_extractor_kwargs"
    )
    message = cli_error([*good, "--agent-kwargs", '{"learning_rate": -1}', *tiny], capsys)
    assert message == 'agent_kwargs: learning_rate must be a positive finite number, {"start": a, "end": b} or a schedule, got -1'
    # stable-baselines3's own settings, which it would have taken: a string discount, a batch of none.
    message = cli_error([*good, "--algo", "ddpg", "--agent-kwargs", '{"gamma": "0.9"}', *tiny], capsys)
    assert message == "agent_kwargs: gamma must be a number in [0, 1], got '0.9'"
    message = cli_error([*good, "--algo", "ppo", "--agent-kwargs", '{"batch_size": 0}', *tiny], capsys)
    assert message == "agent_kwargs: batch_size must be a whole number >= 1, got 0"
    message = cli_error([*good, "--env-kwargs", '{"no_such_arg": 1}', *tiny], capsys)
    assert message == "env_kwargs: unknown TaskAmenabilityEnv argument(s) 'no_such_arg'; docs/environment.md lists them"
    # A JSON string where a flag or a number belongs: "false" is truthy, so it would have turned the option on.
    message = cli_error([*good, "--env-kwargs", '{"validation_refresh": "false"}', *tiny], capsys)
    assert message == "validation_refresh must be True or False, got str 'false'"
    message = cli_error([*good, "--env-kwargs", '{"predictor_lr": "1e-3"}', *tiny], capsys)
    assert message == "predictor_lr must be a positive finite number, got '1e-3'"
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    # The corrected command trains there (no config.json of a failed run for it to disagree with).
    capsys.readouterr()
    assert main([str(a) for a in ["train", "--dataset", tiny_synthetic_path, "--batch-size", "8", *tiny]]) == 0
    assert json.loads((run / "config.json").read_text())["batch_size"] == 8
    assert json.loads((run / "summary.json").read_text())["steps"] >= 8
    assert (run / "notes.txt").read_text() == "the user's own file"


def test_steps_not_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.training import TrainConfig

    message = api_error(ValueError, lambda: TrainConfig(steps=0).validate())
    assert message == "steps must be a whole number >= 1, got 0"
    assert cli_error(["train", "--steps", "0", "--out", tmp_path / "run"], capsys) == message
    assert not (tmp_path / "run").exists()


def test_seed_or_validation_size_negative(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.training import TrainConfig

    message = api_error(ValueError, lambda: TrainConfig(seed=-1).validate())
    assert message == "seed must be an integer >= 0, got -1"
    assert cli_error(["train", "--seed", "-1", "--out", tmp_path / "run"], capsys) == message
    assert api_error(ValueError, lambda: TrainConfig(split_seed=-2).validate()) == "split_seed must be an integer >= 0, got -2"
    message = usage_error(["train", "--validation-size", "-5", "--out", str(tmp_path / "run")], capsys)
    assert_mentions(message, "argument --validation-size: expected a whole number >= 0, got '-5'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [0, -5.0, math.nan, math.inf, True, "60", np.bool_(True)])
def test_time_limit_not_positive(value: Any) -> None:
    from experiments.training import TrainConfig

    message = api_error(ValueError, lambda: TrainConfig(time_limit_s=value).validate())
    assert message == f"time_limit_s must be a positive number of seconds or None (no limit), got {value!r}"


def test_agent_kwargs_checked_with_the_config() -> None:
    """The algorithm's settings are refused by TrainConfig.validate (before any file), named as agent_kwargs'."""
    from experiments.training import TrainConfig

    assert TrainConfig(time_limit_s=np.float32(30)).validate().time_limit_s == 30
    config = TrainConfig(algo="td3", agent_kwargs={"tau": 0.005, "train_freq": [1, "step"], "learning_rate": 1e-3})
    assert config.validate() is config
    message = api_error(ValueError, lambda: TrainConfig(algo="sac", agent_kwargs={"tau": 1.5}).validate())
    assert message == "agent_kwargs: tau must be a number in (0, 1] (the target networks' soft-update rate), got 1.5"
    message = api_error(ValueError, lambda: TrainConfig(agent_kwargs={"learning_rate": {"start": 1e-3}}).validate())
    assert message == 'agent_kwargs: learning_rate as a dict must have exactly the keys "start" and "end" (a linear schedule), got [\'start\']'
    message = api_error(ValueError, lambda: TrainConfig(algo="ppo", agent_kwargs={"policy_kwargs": {"net_arch": [64]}}).validate())
    assert message.startswith("agent_kwargs: net_arch must be left out (None or []): the per-sample policies")
    message = api_error(ValueError, lambda: TrainConfig(agent_kwargs={"policy_kwargs": "x"}).validate())
    assert message == "agent_kwargs: policy_kwargs must be None or a dict of the policy's arguments, got 'x'"
    message = api_error(ValueError, lambda: TrainConfig(agent_kwargs=[("gamma", 0.9)]).validate())  # type: ignore[arg-type]
    assert message == "agent_kwargs must be a dict of the algorithm's arguments, got [('gamma', 0.9)]"


# ================================================================== actions
@pytest.mark.parametrize(
    "action, words",
    [
        (np.array([0.5, np.nan, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]), ("NaN or infinite values at positions [1]", "expected probabilities in [0, 1]")),
        (np.array([np.inf] + [0.5] * 7), ("NaN or infinite values at positions [0]", "expected probabilities in [0, 1]")),
        (np.array([0.5] * 7 + [-np.inf]), ("NaN or infinite values at positions [7]", "expected probabilities in [0, 1]")),
        (np.full(7, 0.5), ("action must have shape (8,)", "got shape (7,)")),
        (np.full((8, 1), 0.5), ("action must have shape (8,)", "got shape (8, 1)")),
        (0.5, ("action must have shape (8,)", "got shape ()")),
        ("half", ("action must be 8 selection probabilities", "got str")),
    ],
    ids=["nan", "inf", "minus-inf", "too-short", "two-dimensional", "scalar", "not-numbers"],
)
def test_bad_action(tiny_env: TaskAmenabilityEnv, action: Any, words: tuple[str, ...]) -> None:
    tiny_env.reset(seed=0)
    observation = tiny_env._observation().copy()
    assert_mentions(api_error(ValueError, lambda: tiny_env.step(action)), *words)
    # The refused action changed nothing: the same step can be taken again.
    assert tiny_env._info()["episode_step"] == 0
    np.testing.assert_array_equal(tiny_env._observation(), observation)
    _, _, _, _, info = tiny_env.step(np.full(8, 0.5, np.float32))
    assert info["episode_step"] == 1


# ================================================== nothing already written is lost
@pytest.fixture
def existing_h5(tmp_path: Path) -> Path:
    path = save_dataset(dataset(n=8), tmp_path / "data.h5")
    return path


SMALL_SYNTH = ["--patients", "3", "--frames", "2", "--size", "16"]


def test_failing_synth_keeps_the_existing_file(existing_h5: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = existing_h5.read_bytes()
    message = cli_error(["data", "synth", "--out", existing_h5, "--size", "8"], capsys)
    assert message == "SyntheticConfig.size must be an integer in [16, 1024] (pixels), got 8"
    assert unchanged(existing_h5, before)


def _fail_while_writing(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Make the HDF5 writer fail after it has written the images (Ctrl-C, a full disk, ...)."""
    real = h5py.Group.create_dataset

    def create_dataset(self: h5py.Group, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "labels":
            raise error
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)


def test_synth_interrupted_while_writing_keeps_the_existing_file(
    existing_h5: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = existing_h5.read_bytes()
    _fail_while_writing(monkeypatch, KeyboardInterrupt())
    capsys.readouterr()
    assert main(["data", "synth", "--out", str(existing_h5), *SMALL_SYNTH]) == 130
    assert capsys.readouterr().err == "iqa data: interrupted\n"
    assert unchanged(existing_h5, before)
    assert load_dataset(existing_h5).num_images == 8


def test_write_error_keeps_the_existing_file(
    existing_h5: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = existing_h5.read_bytes()
    _fail_while_writing(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    message = cli_error(["data", "synth", "--out", existing_h5, *SMALL_SYNTH], capsys)
    assert message == (
        f"cannot write {existing_h5} (No space left on device); nothing was changed there: check the "
        "folder's free space and permissions, or choose another --out"
    )
    assert unchanged(existing_h5, before)


def test_failing_import_keeps_the_existing_file(
    existing_h5: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = existing_h5.read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    message = cli_error(["data", "import-folder", empty, "--out", existing_h5], capsys)
    assert_mentions(message, f"{empty}: no images found")
    assert unchanged(existing_h5, before)


def test_score_write_error_keeps_the_existing_csv(
    tmp_path: Path,
    controller_dir: Path,
    existing_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from iqa_env import files

    data = save_dataset(dataset(n=20), tmp_path / "d.h5")
    real = files.atomic_write

    def half_written(path: Any, text: str, newline: str | None = None) -> Path:
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        return real(path, write)

    monkeypatch.setattr(files, "atomic_write_text", half_written)
    before = existing_csv.read_bytes()
    message = cli_error(["score", "--controller", controller_dir, data, "--out", existing_csv], capsys)
    assert_mentions(message, f"cannot write {existing_csv} (No space left on device)", "nothing was changed")
    assert unchanged(existing_csv, before)


def test_output_path_is_a_folder(
    tmp_path: Path, controller_dir: Path, tiny_synthetic_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    message = api_error(IsADirectoryError, lambda: save_dataset(dataset(n=8), folder))
    assert_mentions(message, f"{folder}: is a folder", "expected the path of the HDF5 file to write")
    synth = cli_error(["data", "synth", "--out", folder, *SMALL_SYNTH], capsys)
    assert_mentions(synth, f"--out {folder}: is a folder", "expected the path of the file to write")
    score = cli_error(["score", "--controller", controller_dir, tiny_synthetic_path, "--out", folder], capsys)
    assert_mentions(score, f"--out {folder}: is a folder", "expected the path of the CSV file to write")
    preview = cli_error(["data", "inspect", tiny_synthetic_path, "--preview", folder], capsys)
    assert_mentions(preview, f"--preview {folder}: is a folder")
    # Refused before any scoring: the CSV is not written either.
    csv_path = tmp_path / "scores.csv"
    score_preview = cli_error(
        ["score", "--controller", controller_dir, tiny_synthetic_path, "--out", csv_path, "--preview", folder], capsys
    )
    assert_mentions(score_preview, f"--preview {folder}: is a folder", "expected the path of the PNG picture to write")
    assert not csv_path.exists()
    assert list(folder.iterdir()) == []


def test_output_folder_that_is_a_file(
    tmp_path: Path, controller_dir: Path, tiny_synthetic_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file where an output's folder should be: named, before any work (train) or with the write error."""
    a_file = tmp_path / "notes.h5"
    a_file.write_bytes(b"the user's own file")
    for out in (a_file, a_file / "run"):
        message = cli_error(["train", "--dataset", tiny_synthetic_path, "--steps", "8", "--out", out], capsys)
        assert message == f"run folder {out}: {a_file} is a file, not a folder; give a folder"
    data = save_dataset(dataset(n=20), tmp_path / "d.h5")  # the controller's image shape
    message = cli_error(["score", "--controller", controller_dir, data, "--out", a_file / "s.csv"], capsys)
    assert_mentions(message, f"cannot write {a_file / 's.csv'} ({a_file} is a file, not a folder)")
    message = cli_error(["data", "synth", "--out", a_file / "s.h5", *SMALL_SYNTH], capsys)
    assert_mentions(message, f"cannot write {a_file / 's.h5'} ({a_file} is a file, not a folder)")
    for out in (a_file, a_file / "rep"):
        message = cli_error(["reproduce", "--quick", "--dataset", tiny_synthetic_path, "--out", out], capsys)
        assert message == f"--out {out}: {a_file} is a file, not a folder; give a folder"
    assert a_file.read_bytes() == b"the user's own file"


def test_failing_inspect_keeps_the_existing_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preview = tmp_path / "preview.png"
    preview.write_bytes(b"an earlier preview")
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    assert_mentions(cli_error(["data", "inspect", bad, "--preview", preview], capsys), "not an HDF5 file")
    assert unchanged(preview, b"an earlier preview")


# ============================================================ the catalogue
def _catalogue_rows() -> list[list[str]]:
    rows = []
    for line in CATALOGUE.read_text().splitlines():
        if line.startswith("|") and not re.match(r"^\|\s*(situation|-)", line):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append(cells)
    return rows


def test_every_catalogue_row_names_a_test_that_exists() -> None:
    rows = _catalogue_rows()
    assert len(rows) >= 40
    for cells in rows:
        assert len(cells) == 6, cells
        assert all(cells), cells
        names = re.findall(r"`([\w/.]+\.py)::(\w+)(?:\[([^\]]+)\])?`", cells[5])
        assert names, f"no test named in row {cells}"
        for file, function, case in names:
            source = (ROOT / "tests" / file).read_text()
            assert re.search(rf"^def {function}\(", source, flags=re.M), f"{file}::{function} does not exist"
            if case:
                # The case id as a string literal of that file (an ids= entry, a param id or a case name).
                assert f'"{case}"' in source or f"'{case}'" in source, f"{file}::{function}[{case}] does not exist"


def test_every_error_test_is_in_the_catalogue() -> None:
    text = CATALOGUE.read_text()
    tests = re.findall(r"^def (test_\w+)\(", Path(__file__).read_text(), flags=re.M)
    own = {"test_every_catalogue_row_names_a_test_that_exists", "test_every_error_test_is_in_the_catalogue"}
    missing = [t for t in tests if t not in own and f"test_errors.py::{t}" not in text]
    assert not missing, f"tests not in docs/errors.md: {missing}"
    for case in [*BAD_FILES, *UNUSABLE, *BAD_FOLDERS]:
        assert f"[{case}]" in text, f"case {case} not in docs/errors.md"
