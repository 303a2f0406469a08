"""``iqa data``: every subcommand end to end, through ``experiments.cli.main``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.cli import main
from iqa_env.data import ImageDataset, load_dataset, save_dataset
from iqa_env.data.fashion_mnist import DEFAULT_ROOT
from iqa_env.data.synthetic import STRONG_SEVERITY

SUBCOMMANDS = ("synth", "fashion-mnist", "import-folder", "import-medmnist", "inspect")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def graded_dataset(n: int = 40) -> ImageDataset:
    """Images whose brightness rises with their severity: mean intensity finds the bad ones."""
    rng = np.random.default_rng(0)
    severity = np.linspace(0, 1, n, dtype=np.float32)
    images = (
        40 + 200 * severity[:, None, None, None] + rng.integers(0, 10, (n, 1, 16, 16))
    ).astype(np.uint8)
    masks = np.zeros((n, 16, 16), np.uint8)
    masks[::2, 4:12, 4:12] = 1
    return ImageDataset(
        images=images,
        labels=np.arange(n) % 2,
        groups=np.arange(n) // 4,
        masks=masks,
        amenability={"classification": 1 - severity, "segmentation": (1 - severity) ** 2},
        human_amenability={"classification": (severity < 0.5).astype(np.uint8)},
        degradations={"severity": severity, "shadow": severity / 2},
        class_names=("absent", "present"),
        metadata={"source": "test"},
    )


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_explains_itself(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["data", sub, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: iqa data {sub}")
    assert "example:" in text and len(text) > 600
    # Every option has a help line.
    options = re.findall(r"^  (--[a-z-]+)", text, flags=re.M)
    assert options and all(re.search(rf"^  {o}.*\S", text, flags=re.M) for o in options)


def test_data_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    text = capsys.readouterr().out
    assert all(sub in text for sub in SUBCOMMANDS)


def test_synth_writes_a_small_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.h5"
    code = main(
        [
            "data",
            "synth",
            "--out",
            str(out),
            "--patients",
            "3",
            "--frames",
            "4",
            "--size",
            "32",
            "--seed",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"12 images \(1x32x32\), 3 groups, made in \d+\.\d s", printed)
    assert re.search(rf"wrote {re.escape(str(out))} \(\d+\.\d KB\)", printed)
    ds = load_dataset(out)
    assert len(ds) == 12 and ds.image_shape == (1, 32, 32) and ds.masks is not None
    assert {"classification", "segmentation"} <= set(ds.amenability)


def test_synth_balances_the_hidden_frames_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b.h5"
    args = ["data", "synth", "--out", str(out), "--patients", "12", "--frames", "20", "--size", "16"]
    assert main([*args, "--strong-present-fraction", "0.5"]) == 0
    ds = load_dataset(out)
    strong = ds.degradations["severity"] >= STRONG_SEVERITY
    assert ds.metadata["strong_present_fraction"] == 0.5
    assert abs(ds.labels[strong].mean() - 0.5) < 0.12
    before = out.read_bytes()
    capsys.readouterr()
    assert main([*args, "--strong-present-fraction", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "strong_present_fraction must be None or in (0, 1), got 1.5" in err
    assert out.read_bytes() == before


def test_synth_takes_the_absent_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.h5"
    args = ["data", "synth", "--out", str(out), "--patients", "6", "--frames", "20", "--size", "16"]
    assert main([*args, "--absent-reference", "fixed"]) == 0
    assert load_dataset(out).metadata["absent_reference"] == "fixed"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--absent-reference", "random"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'random'" in capsys.readouterr().err


def test_inspect_prints_counts_aurocs_and_writes_a_preview(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_dataset(graded_dataset(), tmp_path / "g.h5")
    preview = tmp_path / "out" / "preview.png"
    assert main(["data", "inspect", str(path), "--preview", str(preview), "--n-preview", "6"]) == 0
    printed = capsys.readouterr().out
    assert "40 images (1x16x16), 10 groups" in printed
    assert "classes: absent 20, present 20" in printed
    assert "masks: yes, 50.0 % non-empty" in printed
    assert "amenable (ground truth >= 0.5), classification: 50.0 %" in printed
    assert "degradations: severity, shadow" in printed
    # Not-amenable images are the bright ones: mean intensity ranks them perfectly.
    row = re.search(r"^  classification\s+(\S+)\s+(\S+)$", printed, flags=re.M)
    assert row is not None and float(row.group(1)) == pytest.approx(1.0)
    assert re.search(r"^  segmentation\s+1\.000", printed, flags=re.M)
    assert preview.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(preview) as img:
        assert img.width > 300 and img.height > 300


def test_inspect_uses_human_labels_when_there_is_no_ground_truth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = graded_dataset()
    ds.amenability = {}
    path = save_dataset(ds, tmp_path / "h.h5")
    assert main(["data", "inspect", str(path)]) == 0
    assert re.search(r"^  classification \(human\)\s+1\.000", capsys.readouterr().out, flags=re.M)


def test_a_bad_file_gives_exit_2_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    assert main(["data", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("iqa data: error: ") and str(bad) in err
    assert main(["data", "inspect", str(tmp_path / "missing.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such dataset file" in err


def test_a_bad_option_value_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            ["data", "fashion-mnist", "--out", str(tmp_path / "f.h5"), "--corrupt-fraction", "1.5"]
        )
    assert info.value.code == 2
    assert "expected a number in [0, 1], got 1.5" in capsys.readouterr().err
    # A negative seed: numpy's "expected non-negative integer" had named no option.
    for command in (["data", "fashion-mnist", "--out", str(tmp_path / "f.h5")], ["bench", "--quick"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--seed", "-1"])
        assert info.value.code == 2
        assert "argument --seed: expected a whole number >= 0, got '-1'" in capsys.readouterr().err
    assert not (tmp_path / "f.h5").exists()


def test_import_folder_and_medmnist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for k in range(4):
        Image.fromarray(np.full((6, 8 + k % 2), 50 * k, np.uint8)).save(images / f"{k}.png")
    # Mixed sizes without --size: a one-line error naming the files.
    assert (
        main(
            ["data", "import-folder", str(images), "--out", str(tmp_path / "f.h5"), "--no-progress"]
        )
        == 2
    )
    assert "different sizes" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "import-folder",
                str(images),
                "--out",
                str(tmp_path / "f.h5"),
                "--size",
                "8x10",
                "--no-progress",
            ]
        )
        == 0
    )
    assert load_dataset(tmp_path / "f.h5").images.shape == (4, 1, 8, 10)

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "m.npz",
        train_images=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 2, (6, 1)),
        test_images=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        test_labels=rng.integers(0, 2, (3, 1)),
    )
    out = tmp_path / "m.h5"
    args = ["data", "import-medmnist", str(tmp_path / "m.npz"), "--out", str(out)]
    assert main([*args, "--class-names", "normal,pneumonia", "--corrupt-fraction", "1"]) == 0
    ds = load_dataset(out)
    assert (
        len(ds) == 9 and ds.class_names == ("normal", "pneumonia") and "severity" in ds.degradations
    )
    assert "medmnist m.npz: 9 images" in capsys.readouterr().out


@pytest.mark.skipif(
    not (Path(DEFAULT_ROOT) / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.h5"
    assert (
        main(["data", "fashion-mnist", "--out", str(out), "--n-images", "200", "--seed", "3"]) == 0
    )
    assert (
        "fashion-mnist pullover vs. coat: 200 images (1x28x28), 10 groups"
        in capsys.readouterr().out
    )
    assert len(load_dataset(out)) == 200


def test_fashion_mnist_command_without_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["data", "fashion-mnist", "--root", str(tmp_path), "--out", str(tmp_path / "f.h5")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and err.count("\n") == 1
