"""Image-folder and MedMNIST importers; Fashion-MNIST with the authors' corruption protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iqa_env.data import import_folder, import_medmnist, load_fashion_mnist
from iqa_env.data.fashion_mnist import (
    DEFAULT_ROOT,
    amenability_from_severity,
    corrupt_images,
    simulate_raters,
)


def write_image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def grey(value: int, h: int = 6, w: int = 6) -> np.ndarray:
    return np.full((h, w), value, np.uint8)


# ---------------------------------------------------------------- the folder
@pytest.fixture()
def labelled_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for k, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        write_image(images / name, grey(10 * (k + 1)))
        mask = np.zeros((6, 6), np.uint8)
        mask[: k + 1] = 255  # stored as 0/255: imported as 0/1
        write_image(masks / Path(name).with_suffix(".bmp"), mask)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "file,label,group,amenability_classification,human_amenability_segmentation,notes\n"
        "sub/c.png,present,patient-2,0.25,0,blurry\n"
        "a.png,absent,patient-1,1.0,1,\n"
        "b.png,present,patient-1,0.75,1,\n"
    )
    return images, masks, csv


def test_folder_with_masks_and_csv(labelled_folder: tuple[Path, Path, Path]) -> None:
    images, masks, csv = labelled_folder
    ds = import_folder(images, masks_dir=masks, labels_csv=csv)
    assert ds.images.shape == (3, 1, 6, 6) and ds.images.dtype == np.uint8
    # Rows follow the CSV; names are numbered in sorted order.
    np.testing.assert_array_equal(ds.images[:, 0, 0, 0], [30, 10, 20])
    assert ds.class_names == ("absent", "present")
    np.testing.assert_array_equal(ds.labels, [1, 0, 1])
    np.testing.assert_array_equal(ds.groups, [1, 0, 0])
    assert ds.masks is not None and set(np.unique(ds.masks).tolist()) == {0, 1}
    np.testing.assert_array_equal(ds.masks.sum(axis=(1, 2)), [18, 6, 12])
    np.testing.assert_allclose(ds.amenability["classification"], [0.25, 1.0, 0.75])
    np.testing.assert_array_equal(ds.human_amenability["segmentation"], [0, 1, 1])
    assert ds.metadata["source"] == "folder"


def test_folder_without_csv_takes_every_image_in_name_order(tmp_path: Path) -> None:
    for name, value in [("z.png", 1), ("m.jpg", 2), ("a.tif", 3)]:
        write_image(tmp_path / name, grey(value * 40))
    (tmp_path / "readme.txt").write_text("not an image")
    ds = import_folder(tmp_path)
    assert len(ds) == 3 and ds.class_names == ("unlabelled",)
    assert ds.images[0, 0, 0, 0] == 120  # a.tif first
    np.testing.assert_array_equal(ds.groups, [0, 1, 2])


def test_mixed_sizes_are_refused_with_the_files_named(tmp_path: Path) -> None:
    write_image(tmp_path / "small.png", grey(5, 6, 6))
    write_image(tmp_path / "wide.png", grey(5, 6, 9))
    with pytest.raises(
        ValueError, match=r"different sizes \(6x6: small\.png; 6x9: wide\.png\).*--size"
    ):
        import_folder(tmp_path)


def test_mixed_sizes_are_resized_on_request(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "small.png", grey(200, 6, 6))
    write_image(tmp_path / "images" / "wide.png", grey(100, 6, 9))
    mask = np.zeros((6, 9), np.uint8)
    mask[:, :3] = 1
    write_image(tmp_path / "masks" / "wide.png", mask)
    write_image(tmp_path / "masks" / "small.png", np.ones((6, 6), np.uint8))
    ds = import_folder(tmp_path / "images", masks_dir=tmp_path / "masks", size=(8, 12))
    assert ds.images.shape == (2, 1, 8, 12)
    assert ds.masks is not None and ds.masks.shape == (2, 8, 12)
    assert set(np.unique(ds.masks).tolist()) <= {0, 1}  # nearest neighbour keeps it binary
    np.testing.assert_array_equal(ds.images[:, 0, 4, 4], [200, 100])
    assert ds.metadata["resized_to"] == [8, 12]


def test_mixed_channels_are_refused_or_converted(tmp_path: Path) -> None:
    write_image(tmp_path / "grey.png", grey(90))
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    write_image(tmp_path / "colour.png", rgba, mode="RGBA")
    with pytest.raises(
        ValueError,
        match=r"mix grey and colour \(1 channel\(s\): grey\.png; 3 channel\(s\): colour\.png\)",
    ):
        import_folder(tmp_path)
    ds = import_folder(tmp_path, channels=3)
    assert ds.images.shape == (2, 3, 6, 6)
    np.testing.assert_array_equal(ds.images[0, :, 0, 0], [255, 0, 0])  # colour.png, alpha dropped
    assert import_folder(tmp_path, channels=1).images.shape == (2, 1, 6, 6)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(
        ValueError, match=rf"{tmp_path}: no images found; expected files ending in \.png"
    ):
        import_folder(tmp_path)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png", grey(1))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"broken\.png: cannot be read as an image"):
        import_folder(tmp_path)


def test_truncated_image_is_named(tmp_path: Path) -> None:
    write_image(tmp_path / "good.png", grey(1, 32, 32))
    rng = np.random.default_rng(0)
    path = write_image(tmp_path / "cut.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"cut\.png: cannot be decoded"):
        import_folder(tmp_path)


def test_sixteen_bit_images_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 4000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match=r"deep\.png: PIL mode 'I;16' has more than 8 bits"):
        import_folder(tmp_path)


def test_missing_folder_mask_and_listed_file(
    labelled_folder: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    images, masks, csv = labelled_folder
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        import_folder(tmp_path / "nowhere")
    (masks / "a.bmp").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask for image 'a\.png'"):
        import_folder(images, masks_dir=masks, labels_csv=csv)
    (images / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.png: image file not found"):
        import_folder(images, labels_csv=csv)


def test_palette_and_16_bit_masks_use_their_stored_values(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.png", grey(1))
    write_image(tmp_path / "images" / "b.png", grey(2))
    palette = Image.fromarray(np.eye(6, dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0] * 256)  # every index drawn black: colours would say "empty"
    (tmp_path / "masks").mkdir()
    palette.save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.eye(6, dtype=np.uint16) * 1000).save(tmp_path / "masks" / "b.png")
    ds = import_folder(tmp_path / "images", masks_dir=tmp_path / "masks")
    assert ds.masks is not None
    np.testing.assert_array_equal(ds.masks, np.stack([np.eye(6, dtype=np.uint8)] * 2))


def test_mask_of_another_size_is_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.png", grey(1, 6, 6))
    write_image(tmp_path / "masks" / "a.png", grey(1, 5, 5))
    with pytest.raises(ValueError, match=r"a\.png: mask is 5x5 but its image .* is 6x6"):
        import_folder(tmp_path / "images", masks_dir=tmp_path / "masks")


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("name,label\na.png,0\n", r"missing column 'file'"),
        ("file,label\n", r"has a header but no rows"),
        ("file,label\na.png,\n", r"line 2: column 'label' is empty"),
        (
            "file,label\na.png,0\na.png,1\n",
            r"line 3: file 'a\.png' is listed again \(first on line 2\)",
        ),
        (
            "file,label,amenability_classification\na.png,0,1.5\n",
            r"line 2: column 'amenability_classification' is '1\.5'; expected a number in \[0, 1\]",
        ),
        ("file,label,human_amenability_classification\na.png,0,0.5\n", r"expected 0 or 1"),
        ("file,label,amenability_detection\na.png,0,1\n", r"unknown task 'detection'"),
        ("file,label\na.png,-1\n", r"negative values"),
    ],
)
def test_malformed_csv(tmp_path: Path, csv_text: str, message: str) -> None:
    write_image(tmp_path / "a.png", grey(1))
    csv = tmp_path / "labels.csv"
    csv.write_text(csv_text)
    with pytest.raises(ValueError, match=message) as info:
        import_folder(tmp_path, labels_csv=csv)
    assert str(csv) in str(info.value)


def test_bad_arguments(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", grey(1))
    with pytest.raises(ValueError, match="channels must be 1"):
        import_folder(tmp_path, channels=2)
    for bad in (0, True, 2.5, "8", (8,), (8, True), (8, -1)):  # True is not a size of 1
        with pytest.raises(ValueError, match=r"size must be a positive int or an \(H, W\) pair of positive ints, got"):
            import_folder(tmp_path, size=bad)
    assert import_folder(tmp_path, size=np.int64(6)).images.shape[-2:] == (6, 6)
    assert import_folder(tmp_path, size=[4, 6]).images.shape[-2:] == (4, 6)


# ------------------------------------------------------------------ MedMNIST
def write_medmnist(path: Path, rgb: bool = False, label_shape: str = "N1") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for split, n in [("train", 10), ("val", 3), ("test", 5)]:
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = rng.integers(0, 3, n).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None] if label_shape == "N1" else labels
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_all_splits(tmp_path: Path) -> None:
    arrays = write_medmnist(tmp_path / "m.npz")
    ds = import_medmnist(tmp_path / "m.npz", group_size=4)
    assert ds.images.shape == (18, 1, 28, 28)
    np.testing.assert_array_equal(ds.images[10:13, 0], arrays["val_images"])
    np.testing.assert_array_equal(ds.labels[:10], arrays["train_labels"][:, 0])
    assert ds.metadata["split_ranges"] == {"train": [0, 10], "val": [10, 13], "test": [13, 18]}
    # Pseudo-patients of 4 consecutive images, never across splits.
    np.testing.assert_array_equal(ds.groups, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5])
    assert ds.class_names == ("0", "1", "2") and not ds.amenability and not ds.degradations


def test_medmnist_one_split_rgb_flat_labels(tmp_path: Path) -> None:
    arrays = write_medmnist(tmp_path / "m.npz", rgb=True, label_shape="N")
    ds = import_medmnist(tmp_path / "m.npz", split="test", class_names=("x", "y", "z"))
    assert ds.images.shape == (5, 3, 28, 28)
    np.testing.assert_array_equal(ds.images.transpose(0, 2, 3, 1), arrays["test_images"])
    np.testing.assert_array_equal(ds.groups, np.arange(5))
    assert ds.class_names == ("x", "y", "z")


def test_medmnist_with_the_corruption_protocol(tmp_path: Path) -> None:
    write_medmnist(tmp_path / "m.npz")
    ds = import_medmnist(tmp_path / "m.npz", corrupt_fraction=1.0, seed=2)
    assert (ds.degradations["kind"] > 0).all()
    np.testing.assert_allclose(
        ds.amenability["classification"], 1 - ds.degradations["severity"] / 0.6, atol=1e-6
    )
    assert ds.human_amenability["classification"].shape == (18,)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros(3)}, r"no '<split>_images' arrays"),
        ({"train_images": np.zeros((2, 4, 4), np.uint8)}, r"array 'train_labels' missing"),
        (
            {"train_images": np.zeros((2, 4, 4)), "train_labels": np.zeros(2, int)},
            r"dtype float64; expected uint8",
        ),
        (
            {"train_images": np.zeros((2, 4, 4, 4), np.uint8), "train_labels": np.zeros(2, int)},
            r"3-D MedMNIST volumes",
        ),
        (
            {"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.zeros((2, 14), int)},
            r"multi-label",
        ),
        (
            {"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.zeros(3, int)},
            r"3 entries but 'train_images' has 2",
        ),
    ],
)
def test_medmnist_malformed(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        import_medmnist(tmp_path / "bad.npz")


def test_medmnist_missing_not_npz_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MedMNIST .npz file not found"):
        import_medmnist(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match=r"text\.npz: not a \.npz archive; expected a zip of \.npy arrays") as info:
        import_medmnist(tmp_path / "text.npz")
    assert "pickle" not in str(info.value)  # numpy's own message would invite unsafe loading
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ValueError, match=r"one\.npz: holds a single array \(\.npy\)"):
        import_medmnist(tmp_path / "one.npz")
    write_medmnist(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="split must be one of"):
        import_medmnist(tmp_path / "m.npz", split="validation")
    with pytest.raises(ValueError, match=r"m\.npz: class_names \(--class-names\) gives 1 name\(s\) \['a'\], but the labels go up to 2; expected one name per class, 3 or more"):
        import_medmnist(tmp_path / "m.npz", class_names=("a",))


# ------------------------------------------------------- corruption protocol
def test_corruption_protocol_without_the_dataset_files() -> None:
    images = np.full((400, 1, 20, 20), 128, np.uint8)
    out, deg = corrupt_images(images, np.random.default_rng(1), corrupt_fraction=0.25)
    assert images.max() == 128 == images.min(), "input must not be modified"
    corrupted = deg["kind"] > 0
    assert corrupted.sum() == 100
    changed = (out != images).reshape(400, -1).any(1)
    assert not (changed & ~corrupted).any()
    assert changed[corrupted & (deg["severity"] >= 0.05)].all()  # below that, maybe no whole row
    assert (deg["severity"][~corrupted] == 0).all() and deg["severity"].max() <= 0.6
    noise, occlusion = deg["kind"] == 1, deg["kind"] == 2
    assert 0.55 < noise.sum() / 100 < 0.85  # probability 0.7
    np.testing.assert_array_equal(deg["pixel_noise"], np.where(noise, deg["severity"], 0))
    np.testing.assert_array_equal(deg["edge_occlusion"], np.where(occlusion, deg["severity"], 0))
    assert (deg["occluded_edge"][~occlusion] == -1).all()
    for i in np.flatnonzero(occlusion).tolist():
        depth = int(deg["severity"][i] * 20)
        region = {
            0: out[i, 0, :depth],
            1: out[i, 0, :, :depth],
            2: out[i, 0, 20 - depth :],
            3: out[i, 0, :, 20 - depth :],
        }
        assert (region[int(deg["occluded_edge"][i])] == 0).all()
        assert (out[i] == 0).sum() == depth * 20
    for i in np.flatnonzero(noise).tolist():
        # Positions are drawn with replacement: at most floor(f H W) pixels change.
        assert (out[i] != 128).sum() <= int(deg["severity"][i] * 400)
    again, _ = corrupt_images(images, np.random.default_rng(1), corrupt_fraction=0.25)
    assert np.array_equal(out, again)


def test_amenability_rule_and_raters() -> None:
    severity = np.array([0.0, 0.15, 0.3, 0.45, 0.6], np.float32)
    np.testing.assert_allclose(
        amenability_from_severity(severity), [1, 0.75, 0.5, 0.25, 0], atol=1e-6
    )
    amen = np.repeat(np.array([0.0, 1.0], np.float32), 500)
    votes = simulate_raters(amen, np.random.default_rng(0))
    assert votes.dtype == np.uint8 and (votes == amen).mean() > 0.99
    near = simulate_raters(np.full(2000, 0.55, np.float32), np.random.default_rng(0))
    assert 0.5 < near.mean() < 0.9  # raters disagree near the threshold


# -------------------------------------------------------------- Fashion-MNIST
fashion_mnist_installed = pytest.mark.skipif(
    not (Path(DEFAULT_ROOT) / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
)


@fashion_mnist_installed
def test_fashion_mnist_fractions_groups_and_determinism() -> None:
    ds = load_fashion_mnist(n_images=400, corrupt_fraction=0.5, seed=1, group_size=25)
    assert ds.images.shape == (400, 1, 28, 28) and ds.class_names == ("pullover", "coat")
    assert (ds.labels == 1).sum() == 200
    corrupted = ds.degradations["kind"] > 0
    assert corrupted.sum() == 200
    assert 0.6 < (ds.degradations["kind"][corrupted] == 1).mean() < 0.8
    assert 0 < ds.degradations["severity"].max() <= 0.6
    np.testing.assert_array_equal(ds.groups, np.arange(400) // 25)
    np.testing.assert_allclose(
        ds.amenability["classification"], 1 - ds.degradations["severity"] / 0.6, atol=1e-6
    )
    assert 0.6 < ds.amenable("classification").mean() < 0.9  # ~3/4 amenable at fraction 0.5
    assert (ds.human_amenability["classification"] == ds.amenable("classification")).mean() > 0.85
    # Occluded images are black along their edge; clean images untouched.
    for i in np.flatnonzero(ds.degradations["kind"] == 2)[:10].tolist():
        edge = int(ds.degradations["occluded_edge"][i])
        depth = int(ds.degradations["severity"][i] * 28)
        strip = [
            ds.images[i, 0, :depth],
            ds.images[i, 0, :, :depth],
            ds.images[i, 0, 28 - depth :],
            ds.images[i, 0, :, 28 - depth :],
        ][edge]
        assert (strip == 0).all()

    again = load_fashion_mnist(n_images=400, corrupt_fraction=0.5, seed=1, group_size=25)
    np.testing.assert_array_equal(ds.images, again.images)
    np.testing.assert_array_equal(ds.degradations["severity"], again.degradations["severity"])
    other = load_fashion_mnist(n_images=400, corrupt_fraction=0.5, seed=2, group_size=25)
    assert not np.array_equal(ds.images, other.images)


@fashion_mnist_installed
def test_fashion_mnist_fraction_zero_and_one() -> None:
    clean = load_fashion_mnist(n_images=100, corrupt_fraction=0.0)
    assert (clean.degradations["kind"] == 0).all() and (
        clean.amenability["classification"] == 1
    ).all()
    full = load_fashion_mnist(n_images=100, corrupt_fraction=1.0, classes=(7, 9))
    assert (full.degradations["kind"] > 0).all() and full.class_names == ("sneaker", "ankle boot")


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="classes must be two different"):
        load_fashion_mnist(tmp_path, classes=(3, 3))
    with pytest.raises(ValueError, match="group_size must be a positive"):
        load_fashion_mnist(tmp_path, group_size=0)
