"""The HDF5 dataset format: round trip, subset reads, atomic writes, every validation error."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from iqa_env.data import DatasetError, ImageDataset, load_dataset, save_dataset
from iqa_env.data.io import FORMAT_NAME, dataset_length, read_header

DOC = Path(__file__).resolve().parents[1] / "docs" / "data-format.md"


def make_dataset(n: int = 12, c: int = 1, size: int = 8, seed: int = 0) -> ImageDataset:
    """Every field set, with values that make mix-ups visible (row i has label i % 2, ...)."""
    rng = np.random.default_rng(seed)
    return ImageDataset(
        images=rng.integers(0, 256, (n, c, size, size), dtype=np.uint8),
        labels=np.arange(n) % 2,
        groups=np.arange(n) // 3,
        masks=rng.integers(0, 2, (n, size, size), dtype=np.uint8),
        amenability={
            "classification": np.linspace(0, 1, n, dtype=np.float32),
            "segmentation": np.linspace(1, 0, n, dtype=np.float32),
        },
        human_amenability={"classification": (np.arange(n) % 3 > 0).astype(np.uint8)},
        degradations={"severity": rng.random(n).astype(np.float32), "kind": np.arange(n) % 3 * 1.0},
        class_names=("absent", "present"),
        metadata={"source": "test", "seed": seed, "nested": {"a": [1, 2]}},
    )


def assert_same(a: ImageDataset, b: ImageDataset) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.groups, b.groups)
    if a.masks is None:
        assert b.masks is None
    else:
        np.testing.assert_array_equal(a.masks, b.masks)
    for table in ("amenability", "human_amenability", "degradations"):
        ta, tb = getattr(a, table), getattr(b, table)
        assert sorted(ta) == sorted(tb)
        for key in ta:
            np.testing.assert_array_equal(ta[key], tb[key])
    assert a.class_names == b.class_names


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("compression", [True, False])
def test_round_trip_keeps_every_field_and_dtype(tmp_path: Path, compression: bool) -> None:
    ds = make_dataset(c=3)
    path = save_dataset(ds, tmp_path / "d.h5", compression=compression)
    back = load_dataset(path)
    assert_same(ds, back)
    assert back.metadata == ds.metadata
    assert back.images.dtype == np.uint8 and back.masks is not None and back.masks.dtype == np.uint8
    assert back.labels.dtype == np.int64 and back.groups.dtype == np.int64
    assert back.amenability["classification"].dtype == np.float32
    assert back.human_amenability["classification"].dtype == np.uint8
    assert back.degradations["kind"].dtype == np.float32
    with h5py.File(path) as f:
        assert f.attrs["format"] == FORMAT_NAME and int(f.attrs["format_version"]) == 1
        assert f["images"].chunks == (1, 3, 8, 8)
        assert (f["images"].compression == "gzip") == compression


def test_round_trip_without_optional_fields(tmp_path: Path) -> None:
    ds = ImageDataset(
        images=np.zeros((3, 1, 4, 4), np.uint8),
        labels=np.array([0, 2, 1]),
        groups=np.array([5, 5, 7]),
    )
    back = load_dataset(save_dataset(ds, tmp_path / "plain.h5"))
    assert_same(ds, back)
    assert back.class_names == ("0", "1", "2") and back.metadata == {}
    with h5py.File(tmp_path / "plain.h5") as f:
        assert sorted(f) == ["groups", "images", "labels"]


def test_save_creates_folders_and_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "sub" / "d.h5"
    save_dataset(make_dataset(seed=1), path)
    save_dataset(make_dataset(seed=2), path)
    assert_same(load_dataset(path), make_dataset(seed=2))
    assert [p.name for p in path.parent.iterdir()] == ["d.h5"]


def test_failed_save_keeps_the_old_file_and_leaves_no_litter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.h5"
    save_dataset(make_dataset(seed=1), path)
    before = path.read_bytes()
    original = h5py.Group.create_dataset

    def failing(self: h5py.Group, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "labels":  # after the images were written to the temporary file
            raise OSError("disk full (simulated)")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError, match="simulated"):
        save_dataset(make_dataset(seed=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.h5"]


def test_save_refuses_metadata_that_is_not_json(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.metadata["when"] = object()
    with pytest.raises(DatasetError, match=r"d\.h5: field 'metadata': must be JSON-serialisable"):
        save_dataset(ds, tmp_path / "d.h5")
    assert not list(tmp_path.iterdir())


def test_save_validates_a_dataset_mutated_after_construction(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.labels = ds.labels[:-1]
    with pytest.raises(DatasetError, match="field 'labels'.*11 entries but 'images' has 12"):
        save_dataset(ds, tmp_path / "d.h5")


def test_header_and_length_read_no_rows(tmp_path: Path) -> None:
    path = save_dataset(make_dataset(n=9), tmp_path / "d.h5")
    header = read_header(path)
    assert dataset_length(path) == 9 == header.num_images
    assert header.image_shape == (1, 8, 8) and header.has_masks
    assert header.amenability_tasks == ("classification", "segmentation")
    assert header.human_amenability_tasks == ("classification",)
    assert header.degradations == ("kind", "severity")
    assert header.class_names == ("absent", "present") and header.format_version == 1
    assert header.file_bytes == path.stat().st_size


# -------------------------------------------------------------- subset loading
@pytest.mark.parametrize(
    "indices",
    [[7, 2, 2, 11, 0], np.array([3, 4, 5]), [-1, 0], np.arange(12) % 2 == 0, [10]],
    ids=["unsorted-with-repeat", "contiguous", "negative", "boolean-mask", "single"],
)
def test_subset_equals_rows_of_the_full_dataset(tmp_path: Path, indices: Any) -> None:
    ds = make_dataset()
    path = save_dataset(ds, tmp_path / "d.h5")
    expected = np.arange(12)[np.asarray(indices)]
    assert_same(load_dataset(path, indices=indices), ds.subset(expected))


def test_subset_reads_only_the_requested_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = make_dataset(n=40)
    path = save_dataset(ds, tmp_path / "d.h5")
    rows_read: dict[str, int] = {}
    original = h5py.Dataset.__getitem__

    def spy(self: h5py.Dataset, key: Any) -> Any:
        out = original(self, key)
        rows_read[self.name] = rows_read.get(self.name, 0) + (out.shape[0] if out.ndim else 1)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    indices = [31, 2, 3, 4, 17, 3, 39]
    sub = load_dataset(path, indices=indices)
    assert_same(sub, ds.subset(np.array(indices)))
    unique = len(set(indices))  # 6: repeats are read once
    assert rows_read["/images"] == unique
    assert rows_read["/masks"] == unique
    assert rows_read["/labels"] == unique
    assert rows_read["/amenability/segmentation"] == unique


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([], "indices is empty"),
        ([0, 12], r"indices must lie in \[-12, 11\].*got values in \[0, 12\]"),
        ([-13], r"must lie in \[-12, 11\]"),
        ([0.5], "1-D sequence of integers"),
        ([[0, 1]], "1-D sequence of integers"),
        (np.ones(5, bool), r"boolean indices mask .* must have shape \(12,\)"),
    ],
)
def test_bad_indices_are_refused(tmp_path: Path, indices: Any, message: str) -> None:
    path = save_dataset(make_dataset(), tmp_path / "d.h5")
    with pytest.raises(ValueError, match=message):
        load_dataset(path, indices=indices)


# ------------------------------------------------------------- invalid files
def write_valid(path: Path, n: int = 12, size: int = 8) -> None:
    """A valid file written with h5py alone, for the mutations below."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "iqa-dataset"
        f.attrs["format_version"] = 1
        f.attrs["class_names"] = json.dumps(["absent", "present"])
        f.attrs["metadata"] = json.dumps({"source": "test"})
        f["images"] = rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)
        f["labels"] = np.arange(n) % 2
        f["groups"] = np.arange(n) // 3
        f["masks"] = rng.integers(0, 2, (n, size, size), dtype=np.uint8)
        f["amenability/classification"] = np.linspace(0, 1, n, dtype=np.float32)
        f["human_amenability/classification"] = np.ones(n, np.uint8)
        f["degradations/severity"] = np.zeros(n, np.float32)


def replace(name: str, value: Any) -> Callable[[h5py.File], None]:
    def mutate(f: h5py.File) -> None:
        del f[name]
        f[name] = value

    return mutate


def delete(name: str) -> Callable[[h5py.File], None]:
    def mutate(f: h5py.File) -> None:
        del f[name]

    return mutate


def set_attr(name: str, value: Any) -> Callable[[h5py.File], None]:
    def mutate(f: h5py.File) -> None:
        f.attrs[name] = value

    return mutate


def delete_attr(name: str) -> Callable[[h5py.File], None]:
    def mutate(f: h5py.File) -> None:
        del f.attrs[name]

    return mutate


def with_value(name: str, index: Any, value: Any) -> Callable[[h5py.File], None]:
    def mutate(f: h5py.File) -> None:
        array = f[name][()]
        array[index] = value
        del f[name]
        f[name] = array

    return mutate


def empty(f: h5py.File) -> None:
    for name in ("images", "labels", "groups", "masks"):
        shape = f[name].shape
        dtype = f[name].dtype
        del f[name]
        f[name] = np.zeros((0, *shape[1:]), dtype)
    del f["amenability"], f["human_amenability"], f["degradations"]


# (mutation, field named in the message, what was expected: regex)
INVALID: dict[str, tuple[Callable[[h5py.File], None], str, str]] = {
    "missing-images": (
        delete("images"),
        "field 'images'",
        r"missing; expected uint8 \(N, C, H, W\)",
    ),
    "missing-labels": (delete("labels"), "field 'labels'", r"missing; expected integer \(N,\)"),
    "missing-groups": (delete("groups"), "field 'groups'", r"missing; expected integer \(N,\)"),
    "images-float": (
        replace("images", np.zeros((12, 1, 8, 8), np.float32)),
        "field 'images'",
        "expected dtype uint8",
    ),
    "images-int16": (
        replace("images", np.zeros((12, 1, 8, 8), np.uint16)),
        "field 'images'",
        "expected dtype uint8",
    ),
    "images-rank-3": (
        replace("images", np.zeros((12, 8, 8), np.uint8)),
        "field 'images'",
        r"expected 4 dimensions",
    ),
    "images-2-channels": (
        replace("images", np.zeros((12, 2, 8, 8), np.uint8)),
        "field 'images'",
        "expected 1 or 3 channels",
    ),
    "images-is-group": (
        lambda f: (delete("images")(f), f.create_group("images")),
        "field 'images'",
        "expected a dataset",
    ),
    "labels-float": (
        replace("labels", np.zeros(12)),
        "field 'labels'",
        r"expected dtype integer \(N,\)",
    ),
    "labels-rank-2": (
        replace("labels", np.zeros((12, 1), np.int64)),
        "field 'labels'",
        r"expected 1 dimensions",
    ),
    "labels-short": (
        replace("labels", np.zeros(11, np.int64)),
        "field 'labels'",
        "11 entries but 'images' has 12",
    ),
    "labels-outside-classes": (
        with_value("labels", 3, 2),
        "field 'labels'",
        r"must lie in \[0, 1\] for the 2 declared classes",
    ),
    "labels-negative": (with_value("labels", 0, -1), "field 'labels'", r"must lie in \[0, 1\]"),
    "groups-long": (
        replace("groups", np.zeros(13, np.int64)),
        "field 'groups'",
        "13 entries but 'images' has 12",
    ),
    "groups-float": (replace("groups", np.zeros(12)), "field 'groups'", "expected dtype integer"),
    "masks-size": (
        replace("masks", np.zeros((12, 4, 4), np.uint8)),
        "field 'masks'",
        r"mask size \(4, 4\) does not match image size \(8, 8\)",
    ),
    "masks-rank": (
        replace("masks", np.zeros((12, 1, 8, 8), np.uint8)),
        "field 'masks'",
        "expected 3 dimensions",
    ),
    "masks-short": (
        replace("masks", np.zeros((10, 8, 8), np.uint8)),
        "field 'masks'",
        "10 entries but 'images' has 12",
    ),
    "masks-not-binary": (
        with_value("masks", (0, 0, 0), 255),
        "field 'masks'",
        r"expected binary values \{0, 1\}",
    ),
    "masks-float": (
        replace("masks", np.zeros((12, 8, 8))),
        "field 'masks'",
        "expected dtype uint8",
    ),
    "amenability-nan": (
        with_value("amenability/classification", 4, np.nan),
        "field 'amenability/classification'",
        "NaN or infinite value.*expected finite numbers",
    ),
    "amenability-range": (
        with_value("amenability/classification", 4, 1.5),
        "field 'amenability/classification'",
        r"values must lie in \[0, 1\]",
    ),
    "amenability-int": (
        replace("amenability/classification", np.ones(12, np.int64)),
        "field 'amenability/classification'",
        r"expected dtype float32 in \[0, 1\]",
    ),
    "amenability-unknown-task": (
        lambda f: f.__setitem__("amenability/detection", np.ones(12, np.float32)),
        "field 'amenability/detection'",
        "unknown task 'detection'; expected one of",
    ),
    "amenability-not-a-group": (
        lambda f: (delete("amenability")(f), f.__setitem__("amenability", np.ones(12))),
        "field 'amenability'",
        "expected an HDF5 group",
    ),
    "human-amenability-2": (
        with_value("human_amenability/classification", 0, 2),
        "field 'human_amenability/classification'",
        r"values must lie in \[0, 1\]",
    ),
    "human-amenability-short": (
        replace("human_amenability/classification", np.ones(3, np.uint8)),
        "field 'human_amenability/classification'",
        "3 entries but 'images' has 12",
    ),
    "degradations-inf": (
        with_value("degradations/severity", 1, np.inf),
        "field 'degradations/severity'",
        "NaN or infinite",
    ),
    "degradations-text": (
        replace("degradations/severity", np.array([b"x"] * 12)),
        "field 'degradations/severity'",
        r"expected dtype float \(N,\)",
    ),
    "empty-dataset": (empty, "field 'images'", r"empty \(0 images\); expected at least one"),
    "format-missing": (
        delete_attr("format"),
        "root attribute 'format'",
        "missing; expected 'iqa-dataset'",
    ),
    "format-wrong": (
        set_attr("format", "something-else"),
        "root attribute 'format'",
        "expected 'iqa-dataset', got 'something-else'",
    ),
    "format-version-missing": (
        delete_attr("format_version"),
        "root attribute 'format_version'",
        "missing; expected the integer 1",
    ),
    "format-version-newer": (
        set_attr("format_version", 2),
        "root attribute 'format_version'",
        "reads format_version 1..1, got 2",
    ),
    "class-names-missing": (
        delete_attr("class_names"),
        "root attribute 'class_names'",
        "missing; expected a JSON list",
    ),
    "class-names-not-json": (
        set_attr("class_names", "[absent"),
        "root attribute 'class_names'",
        "not valid JSON",
    ),
    "class-names-empty": (
        set_attr("class_names", "[]"),
        "root attribute 'class_names'",
        "expected a non-empty JSON list",
    ),
    "metadata-not-object": (
        set_attr("metadata", "[1, 2]"),
        "root attribute 'metadata'",
        "expected a JSON object, got list",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_file_error_names_file_field_and_expectation(tmp_path: Path, case: str) -> None:
    mutate, field, expectation = INVALID[case]
    path = tmp_path / f"{case}.h5"
    write_valid(path)
    with h5py.File(path, "a") as f:
        mutate(f)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert field in message, message
    assert re.search(expectation, message), message
    assert "\n" not in message
    # The header reader applies the same metadata checks (value errors need the rows).
    if case not in {
        "labels-outside-classes",
        "labels-negative",
        "masks-size",
        "masks-not-binary",
        "amenability-nan",
        "amenability-range",
        "amenability-unknown-task",
        "human-amenability-2",
        "degradations-inf",
        "images-2-channels",
    }:
        with pytest.raises(DatasetError, match=re.escape(field)):
            read_header(path)


def test_the_unmutated_file_is_valid(tmp_path: Path) -> None:
    write_valid(tmp_path / "ok.h5")
    assert len(load_dataset(tmp_path / "ok.h5")) == 12


def test_not_an_hdf5_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.h5"
    path.write_text("these are not images\n")
    with pytest.raises(
        DatasetError, match=rf"^{re.escape(str(path))}: not an HDF5 file.*expected an iqa-dataset"
    ):
        load_dataset(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.h5"
    save_dataset(make_dataset(n=50, size=16), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert (
        message.startswith(str(path))
        and "truncated or corrupt" in message
        and "expected" in message
    )


def test_missing_path_and_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.h5: no such dataset file"):
        load_dataset(tmp_path / "nope.h5")
    with pytest.raises(DatasetError, match="is a folder; expected an iqa-dataset HDF5 file"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------- the docs
def test_the_documented_example_writes_a_valid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/data-format.md should hold exactly one python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "__docs__"})
    ds = load_dataset(tmp_path / "example.h5")
    # The values the doc shows after the example.
    assert (len(ds), ds.image_shape, ds.class_names) == (
        12,
        (1, 32, 32),
        ("organ absent", "organ present"),
    )
    np.testing.assert_array_equal(load_dataset("example.h5", indices=[5, 0]).labels, [1, 0])
    assert ds.masks is not None and sorted(ds.amenability) == ["classification", "segmentation"]


def test_the_documented_error_messages_are_real(tmp_path: Path) -> None:
    """The three sample messages in the doc match what the loader says (up to the path)."""
    samples = re.search(r"```text\n(data\.h5: .*?)```", DOC.read_text(), flags=re.S)
    assert samples is not None
    lines = samples.group(1).strip().splitlines()
    cases = [
        (with_value("labels", 3, 3), None),
        (replace("masks", np.zeros((12, 32, 32), np.uint8)), 64),
        (delete_attr("format"), None),
    ]
    assert len(lines) == len(cases), lines
    for line, (mutate, size) in zip(lines, cases):
        path = tmp_path / "data.h5"
        write_valid(path, size=size or 8)
        with h5py.File(path, "a") as f:
            mutate(f)
        with pytest.raises(DatasetError) as info:
            load_dataset(path)
        got = str(info.value).replace(str(path), "data.h5")
        assert got == line


# ---------------------------------------------------------------- the cache
def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from iqa_env.data.cache import cache_dir

    monkeypatch.setenv("IQA_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("IQA_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "iqa"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "iqa"


def test_the_cache_name_follows_the_default_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed default renames the built-in set's cache; a new setting that is off (None) does not."""
    import dataclasses

    import iqa_env.data.synthetic as synthetic
    from iqa_env.data import cache

    before = cache._default_config_tag()
    original = synthetic.SyntheticConfig

    @dataclasses.dataclass(frozen=True)
    class WithAnOption(original):  # type: ignore[valid-type, misc]
        some_new_option: float | None = None

    monkeypatch.setattr(synthetic, "SyntheticConfig", WithAnOption)
    assert cache._default_config_tag() == before

    @dataclasses.dataclass(frozen=True)
    class OtherDefault(original):  # type: ignore[valid-type, misc]
        n_patients: int = original.n_patients + 1

    monkeypatch.setattr(synthetic, "SyntheticConfig", OtherDefault)
    assert cache._default_config_tag() != before


def test_default_dataset_is_generated_once_and_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import iqa_env.data.synthetic as synthetic
    from iqa_env.data import cache

    calls: list[int] = []

    def tiny(config: Any = None, **overrides: Any) -> ImageDataset:
        calls.append(1)
        return make_dataset(seed=3)

    monkeypatch.setenv("IQA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "generate_synthetic", tiny)
    path = cache.default_dataset_path()
    assert path.parent == tmp_path / "cache" and path.suffix == ".h5"
    assert re.fullmatch(r"synthetic-default-v[^-]+-[0-9a-f]{12}\.h5", path.name)
    assert cache.default_dataset_path() == path and len(calls) == 1
    assert_same(cache.default_dataset(), make_dataset(seed=3))
    # A damaged cache file is rebuilt, not fatal.
    path.write_bytes(b"garbage")
    assert_same(cache.default_dataset(), make_dataset(seed=3))
    assert len(calls) == 2
