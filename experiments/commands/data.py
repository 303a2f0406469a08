"""``iqa data``: make, import and inspect datasets in the project's HDF5 format.

Subcommands::

    iqa data synth --out data.h5 [--patients N] [--frames F] [--size S] [--seed K] [--strong-present-fraction B]
                  [--absent-reference sweep|fixed]
    iqa data fashion-mnist --out fmnist.h5 [--corrupt-fraction 0.5] [--n-images N] ...
    iqa data import-folder IMAGES_DIR --out mine.h5 [--masks DIR] [--labels CSV] ...
    iqa data import-medmnist pneumoniamnist.npz --out pneumonia.h5 [--split train] ...
    iqa data inspect data.h5 [--preview preview.png]

Handlers import numpy, h5py and matplotlib lazily so that ``iqa --help``
stays fast.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.commands import (
    HelpFormatter,
    check_target,
    draw_image,
    non_negative_int,
    positive_int,
    report_write_error,
)

if TYPE_CHECKING:
    import numpy as np

    from iqa_env.data.dataset import ImageDataset

#: Images in the preview grid by default.
PREVIEW_IMAGES = 16


# ------------------------------------------------------------------ helpers
def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _size(text: str) -> int | tuple[int, int]:
    """``64`` or ``64x96`` (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] > 0:
        return parts[0]
    if len(parts) == 2 and min(parts) > 0:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(
        f"expected S or HxW in pixels (e.g. 64 or 64x96), got {text!r}"
    )


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="PATH",
        help="HDF5 file to write (replaced atomically if it exists; folders are created)",
    )
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="store images and masks uncompressed (bigger file, slightly faster to read)",
    )


def _save_and_report(ds: ImageDataset, args: argparse.Namespace, what: str, seconds: float) -> int:
    from iqa_env.data.io import save_dataset

    start = time.perf_counter()
    try:
        path = save_dataset(ds, args.out, compression=not args.no_compression)
    except OSError as e:
        return report_write_error(args.command, args.out, e)
    write_seconds = time.perf_counter() - start
    c, h, w = ds.image_shape
    print(
        f"{what}: {len(ds):,} images ({c}x{h}x{w}), {len(set(ds.groups.tolist())):,} groups, "
        f"made in {seconds:.1f} s"
    )
    print(f"wrote {path} ({_human_bytes(path.stat().st_size)}) in {write_seconds:.1f} s")
    return 0


# ---------------------------------------------------------------- handlers
def _synth(args: argparse.Namespace) -> int:
    check_target(args.out, "--out", "data.h5")
    from iqa_env.data.synthetic import generate_synthetic

    overrides = {
        name: value
        for name, value in (
            ("n_patients", args.patients),
            ("frames_per_patient", args.frames),
            ("size", args.size),
            ("seed", args.seed),
            ("strong_present_fraction", args.strong_present_fraction),
            ("absent_reference", args.absent_reference),
        )
        if value is not None
    }
    start = time.perf_counter()
    ds = generate_synthetic(**overrides)
    return _save_and_report(ds, args, "synthetic ultrasound", time.perf_counter() - start)


def _fashion_mnist(args: argparse.Namespace) -> int:
    check_target(args.out, "--out", "data.h5")
    from iqa_env.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist

    start = time.perf_counter()
    ds = load_fashion_mnist(
        DEFAULT_ROOT if args.root is None else args.root,
        classes=tuple(args.classes),
        corrupt_fraction=args.corrupt_fraction,
        n_images=args.n_images,
        seed=args.seed,
        group_size=args.group_size,
    )
    return _save_and_report(
        ds,
        args,
        f"fashion-mnist {ds.class_names[0]} vs. {ds.class_names[1]}",
        time.perf_counter() - start,
    )


def _import_folder(args: argparse.Namespace) -> int:
    check_target(args.out, "--out", "data.h5")
    from iqa_env.data.importers import import_folder

    start = time.perf_counter()
    ds = import_folder(
        args.images_dir,
        masks_dir=args.masks,
        labels_csv=args.labels,
        size=args.size,
        channels=args.channels,
        progress=not args.no_progress,
    )
    return _save_and_report(ds, args, f"folder {args.images_dir}", time.perf_counter() - start)


def _import_medmnist(args: argparse.Namespace) -> int:
    check_target(args.out, "--out", "data.h5")
    from iqa_env.data.importers import import_medmnist

    start = time.perf_counter()
    ds = import_medmnist(
        args.npz,
        split=args.split,
        group_size=args.group_size,
        class_names=None if args.class_names is None else tuple(args.class_names.split(",")),
        corrupt_fraction=args.corrupt_fraction,
        seed=args.seed,
    )
    return _save_and_report(ds, args, f"medmnist {args.npz.name}", time.perf_counter() - start)


def intensity_heuristic_aurocs(ds: ImageDataset) -> dict[str, dict[str, float | None]]:
    """AUROC of per-image mean intensity and intensity std for spotting *low* amenability.

    For each task with ground truth, the positives are the not-amenable images
    (``amenability < 0.5``); for each task with only human labels, those rated
    0 (keyed ``"<task> (human)"``).  An AUROC far from 0.5 either way means a
    trivial intensity statistic already separates the images, so a controller
    that learns it has learned little.  ``None`` where only one class occurs.
    """
    import numpy as np

    from iqa_env.metrics import auroc

    scores = {"mean_intensity": np.empty(len(ds)), "intensity_std": np.empty(len(ds))}
    # In blocks: a float copy of a large dataset at once would need 4-8x its memory.
    for start in range(0, len(ds), 4096):
        block = ds.images[start : start + 4096].reshape(-1, int(np.prod(ds.image_shape)))
        block = block.astype(np.float64)
        scores["mean_intensity"][start : start + len(block)] = block.mean(axis=1)
        scores["intensity_std"][start : start + len(block)] = block.std(axis=1)
    targets: dict[str, np.ndarray] = {task: values < 0.5 for task, values in ds.amenability.items()}
    for task, values in ds.human_amenability.items():
        if task not in ds.amenability:
            targets[f"{task} (human)"] = values == 0
    out: dict[str, dict[str, float | None]] = {}
    for name, not_amenable in targets.items():
        both = 0 < int(not_amenable.sum()) < not_amenable.size
        out[name] = {
            key: (auroc(score, not_amenable) if both else None) for key, score in scores.items()
        }
    return out


def _degradation_note(ds: ImageDataset, i: int) -> str:
    """A short text for image ``i``: its severity, then what was done to it.

    Categorical degradations listed in ``metadata["degradation_codes"]`` are
    decoded to their names (e.g. ``edge_occlusion``, ``top``); without them
    the two largest other non-zero degradation values are shown.
    """
    codes: dict[str, dict[str, str]] = ds.metadata.get("degradation_codes") or {}
    parts: list[str] = []
    if "severity" in ds.degradations:
        parts.append(f"sev {float(ds.degradations['severity'][i]):.2f}")
    coded = [name for name in codes if name in ds.degradations]
    if coded:
        decoded = [codes[name].get(str(int(ds.degradations[name][i])), "") for name in coded]
        return ", ".join(parts + [d for d in decoded if d and d not in ("none", "clean")])
    others = sorted(
        (
            (float(values[i]), name)
            for name, values in ds.degradations.items()
            if name != "severity" and float(values[i]) != 0.0
        ),
        key=lambda pair: -abs(pair[0]),
    )
    return ", ".join(parts + [f"{name} {value:.2f}" for value, name in others[:2]])


def _preview_indices(ds: ImageDataset, n: int) -> np.ndarray:
    """Images spread over the range of the first task's amenability (else over the file)."""
    import numpy as np

    n = min(n, len(ds))
    if ds.amenability:
        order = np.argsort(next(iter(ds.amenability.values())), kind="stable")
    else:
        order = np.arange(len(ds))
    return order[np.linspace(0, len(ds) - 1, n).round().astype(int)]


def write_preview(ds: ImageDataset, path: Path, n_images: int = PREVIEW_IMAGES) -> Path:
    """Save a labelled grid of ``n_images`` images: class, amenability, degradation, mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    indices = _preview_indices(ds, n_images)
    cols = int(np.ceil(np.sqrt(indices.size)))
    rows = int(np.ceil(indices.size / cols))
    # Constrained layout leaves room for the three- or four-line titles.
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.5 * cols, 3.1 * rows), squeeze=False, layout="constrained"
    )
    short = {"classification": "cls", "segmentation": "seg"}
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), indices.tolist()):
        draw_image(ax, ds.images[i])
        if ds.masks is not None and ds.masks[i].any():
            ax.contour(ds.masks[i], levels=[0.5], colors="lime", linewidths=0.8)
        lines = [f"#{i} {ds.class_names[int(ds.labels[i])]} (group {int(ds.groups[i])})"]
        if ds.amenability:
            lines.append(
                "amen. "
                + " ".join(
                    f"{short.get(t, t)} {float(v[i]):.2f}" for t, v in ds.amenability.items()
                )
            )
        if ds.human_amenability:
            lines.append(
                "human "
                + " ".join(
                    f"{short.get(t, t)} {int(v[i])}" for t, v in ds.human_amenability.items()
                )
            )
        note = _degradation_note(ds, i)
        if note:
            lines.append(note)
        ax.set_title("\n".join(lines), fontsize=6.5)
    title = f"{len(ds):,} images"
    if ds.masks is not None:
        title += "; green: mask outline"
    if ds.amenability:
        title += f"; spread over {next(iter(ds.amenability))} amenability, low to high"
    fig.suptitle(title, fontsize=9)
    from iqa_env.files import atomic_write

    # Atomic: an existing preview is replaced whole or not at all.
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:] or "png"))
    finally:
        plt.close(fig)
    return path


def _inspect(args: argparse.Namespace) -> int:
    from iqa_env.data.io import load_dataset, read_header

    check_target(args.preview, "--preview", "preview.png")

    header = read_header(args.path)
    ds = load_dataset(args.path)
    summary = ds.summary()
    c, h, w = ds.image_shape
    print(
        f"{header.path}: {len(ds):,} images ({c}x{h}x{w}), {summary['groups']:,} groups, "
        f"{_human_bytes(header.file_bytes)}, format version {header.format_version}"
    )
    print(
        "classes: " + ", ".join(f"{name} {count:,}" for name, count in summary["classes"].items())
    )
    if ds.masks is not None:
        print(f"masks: yes, {100 * summary['mask_nonempty_fraction']:.1f} % non-empty")
    else:
        print("masks: none")
    for task in ds.amenability:
        print(
            f"amenable (ground truth >= 0.5), {task}: "
            f"{100 * summary[f'amenable_fraction/{task}']:.1f} %"
        )
    for task in ds.human_amenability:
        print(
            f"amenable (human label), {task}: "
            f"{100 * summary[f'human_amenable_fraction/{task}']:.1f} %"
        )
    print("degradations: " + (", ".join(summary["degradations"]) or "none"))
    if ds.metadata:
        simple = {k: v for k, v in ds.metadata.items() if isinstance(v, (str, int, float, bool))}
        print("metadata: " + ", ".join(f"{k}={v}" for k, v in simple.items()))
    aurocs = intensity_heuristic_aurocs(ds)
    if aurocs:
        print(
            "AUROC of simple heuristics for 'not amenable' (0.5 = chance; far from 0.5 = too easy):"
        )
        print(f"  {'task':<28}{'mean intensity':>16}{'intensity std':>16}")
        for task, row in aurocs.items():
            cells = "".join(
                f"{'n/a (one class)' if v is None else f'{v:.3f}':>16}" for v in row.values()
            )
            print(f"  {task:<28}{cells}")
    else:
        print("AUROC of simple heuristics: n/a (no amenability labels)")
    if args.preview is not None:
        write_preview(ds, args.preview, args.n_preview)
        print(f"wrote preview {args.preview}")
    return 0


# ------------------------------------------------------------- registration
def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``iqa data`` and its subcommands to the ``iqa`` parser."""
    data = subparsers.add_parser(
        "data",
        help="make, import and inspect datasets (one HDF5 format, see docs/data-format.md)",
        description=(
            "Make, import and inspect datasets.  Every dataset is one HDF5 file (format in "
            "docs/data-format.md) that `gymnasium.make('TaskAmenability-v0', dataset=PATH)` reads."
        ),
        formatter_class=HelpFormatter,
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser(
        "synth",
        help="generate the synthetic ultrasound set",
        description=(
            "Generate synthetic B-mode ultrasound sweeps: a gland-like organ (mask) in a fan field "
            "of view, Rayleigh speckle, graded degradations (shadow, noise, blur, gain drift, "
            "reverberation, contact loss, organ out of view) with ground-truth and rater "
            "amenability for classification (organ present?) and segmentation.  Prints the "
            "generation time, the number of images and the file size.  Unset options keep the "
            "built-in defaults (100 patients x 40 frames of 64 x 64)."
        ),
        epilog="example:\n  iqa data synth --out /tmp/small.h5 --patients 20 --frames 10 --size 32",
        formatter_class=HelpFormatter,
    )
    _add_output(p)
    p.add_argument(
        "--patients", type=positive_int, metavar="N", help="number of patients (sweeps)"
    )
    p.add_argument("--frames", type=positive_int, metavar="F", help="frames per patient")
    p.add_argument(
        "--size", type=positive_int, metavar="S", help="image height and width in pixels"
    )
    p.add_argument("--seed", type=non_negative_int, metavar="K", help="random seed (same seed, same file)")
    p.add_argument(
        "--strong-present-fraction",
        type=float,
        metavar="B",
        help=(
            "fraction of organ-present frames among the strongly degraded ones, in (0, 1); "
            "0.5 gives them an even class prior (default: degradations ignore the organ)"
        ),
    )
    p.add_argument(
        "--absent-reference",
        choices=("sweep", "fixed"),
        help=(
            "where degradations aimed at the gland go on organ-absent frames: 'sweep' (default) one "
            "of the sweep's own sections, so that a hiding degradation's footprint does not tell the "
            "label; 'fixed' a 0.6-size section at the sweep's end (generator version 1's data)"
        ),
    )
    p.set_defaults(func=_synth)

    p = sub.add_parser(
        "fashion-mnist",
        help="Fashion-MNIST pullover vs. coat with the authors' corruption protocol",
        description=(
            "Real images with graded corruption: a binary Fashion-MNIST task (default pullover vs. "
            "coat) where a fraction of images gets, with probability 0.7, random pixel noise over "
            "a uniform(0, 0.6) fraction of pixels, else one edge occluded over a uniform(0, 0.6) "
            "fraction (Saeed et al., MedIA 2022).  Records severity and kind, ground-truth "
            "amenability (1 - severity / 0.6), 3-rater human labels and pseudo-patient groups.  "
            "Needs the Debian package dataset-fashion-mnist (or --root with the idx files)."
        ),
        epilog="example:\n  iqa data fashion-mnist --out /tmp/fmnist.h5 --n-images 4000 --seed 1",
        formatter_class=HelpFormatter,
    )
    _add_output(p)
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help="folder with the four idx .gz files (default: where the Debian package "
        "dataset-fashion-mnist installs them)",
    )
    p.add_argument(
        "--classes",
        type=int,
        nargs=2,
        default=[2, 4],
        metavar=("NEG", "POS"),
        help="the two Fashion-MNIST class ids (0 t-shirt, 2 pullover, 4 coat, 6 shirt, 7 sneaker, "
        "9 ankle boot, ...)",
    )
    p.add_argument(
        "--corrupt-fraction",
        type=_fraction,
        default=0.5,
        metavar="F",
        help="share of images corrupted",
    )
    p.add_argument(
        "--n-images",
        type=positive_int,
        default=None,
        metavar="N",
        help="class-balanced random subset (default: all 14,000 of the two classes)",
    )
    p.add_argument(
        "--group-size",
        type=positive_int,
        default=20,
        metavar="N",
        help="images per pseudo-patient",
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, metavar="K", help="seeds selection, corruption and raters"
    )
    p.set_defaults(func=_fashion_mnist)

    p = sub.add_parser(
        "import-folder",
        help="import a folder of images (+ masks, + a labels CSV)",
        description=(
            "Import your own images (PNG, JPEG, TIFF, ...; 8-bit grey or colour).  With --labels, "
            "the CSV's rows define the dataset; columns: file (relative to IMAGES_DIR), label "
            "(class id or name), optional group (patient), amenability_<task> (0-1) and "
            "human_amenability_<task> (0/1), task = classification or segmentation.  Without it, "
            "every image in the folder is taken with label 0 and its own group.  Masks are matched "
            "by file name stem; non-zero = foreground.  Mixed sizes or channel counts are refused "
            "unless --size / --channels say how to convert."
        ),
        epilog=(
            "example:\n  iqa data import-folder scans/ --masks masks/ --labels labels.csv "
            "--size 64 --channels 1 --out mine.h5"
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("images_dir", type=Path, metavar="IMAGES_DIR", help="folder of image files")
    _add_output(p)
    p.add_argument("--masks", type=Path, default=None, metavar="DIR", help="folder of mask files")
    p.add_argument(
        "--labels", type=Path, default=None, metavar="CSV", help="labels CSV (see above)"
    )
    p.add_argument(
        "--size", type=_size, default=None, metavar="S|HxW", help="resize all images to this"
    )
    p.add_argument(
        "--channels", type=int, choices=(1, 3), default=None, help="convert to grey (1) or RGB (3)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_import_folder)

    p = sub.add_parser(
        "import-medmnist",
        help="import a MedMNIST .npz file you already have",
        description=(
            "Import a MedMNIST .npz (train/val/test _images and _labels; 2-D, single-label sets "
            "such as PneumoniaMNIST).  MedMNIST has no patient ids: consecutive blocks of "
            "--group-size images within a split form pseudo-patients (default 1: every image its "
            "own group).  --corrupt-fraction applies the authors' corruption protocol (1.0 "
            "reproduces the MedIA corrupted-PneumoniaMNIST setting)."
        ),
        epilog=(
            "example:\n  iqa data import-medmnist pneumoniamnist.npz --corrupt-fraction 1 "
            "--out pneu.h5"
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("npz", type=Path, metavar="FILE.npz", help="the MedMNIST file")
    _add_output(p)
    p.add_argument(
        "--split", choices=("train", "val", "test"), default=None, help="one split (default: all)"
    )
    p.add_argument(
        "--group-size", type=positive_int, default=1, metavar="N", help="images per pseudo-patient"
    )
    p.add_argument(
        "--class-names", default=None, metavar="A,B,...", help="comma-separated class names"
    )
    p.add_argument(
        "--corrupt-fraction",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="share of images corrupted",
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, metavar="K", help="seeds the corruption and the raters"
    )
    p.set_defaults(func=_import_medmnist)

    p = sub.add_parser(
        "inspect",
        help="summarise a dataset file and check how easy its quality labels are",
        description=(
            "Validate a dataset file and print its counts (images, classes, groups, masks, "
            "amenable fractions, degradations), then the AUROC of two trivial heuristics, "
            "per-image mean intensity and intensity std, for finding the not-amenable images "
            "(ground-truth amenability < 0.5, or human label 0 where only that exists).  A value "
            "near 0 or 1 means the quality labels are too easy to be a fair test of a learned "
            "controller.  --preview writes a labelled image grid (mask outlines, amenability, "
            "degradations)."
        ),
        epilog="example:\n  iqa data inspect data.h5 --preview preview.png",
        formatter_class=HelpFormatter,
    )
    p.add_argument("path", type=Path, metavar="PATH", help="dataset file (.h5)")
    p.add_argument(
        "--preview", type=Path, default=None, metavar="PNG", help="write an image grid here"
    )
    p.add_argument(
        "--n-preview",
        type=positive_int,
        default=PREVIEW_IMAGES,
        metavar="N",
        help="images in the grid",
    )
    p.set_defaults(func=_inspect)
