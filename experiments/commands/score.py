"""``iqa score``: score images with a trained controller and write a CSV."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from experiments.commands import HelpFormatter, report_write_error


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score images with a trained controller",
        formatter_class=HelpFormatter,
        description=(
            "Score every image of an HDF5 dataset or of a folder of images with a trained controller "
            "(a folder written by `iqa train`, or by Controller.save) and write a CSV with the columns "
            "file (or index), score (task amenability in [0, 1], higher is better), percentile (the "
            "fraction of the controller's reference images scored lower: comparable across controllers, "
            "whose raw scores sit at their own levels; only for controllers with a reference, as `iqa "
            "train` saves them) and rejected (1 for the lowest-scored fraction --rejection-ratio of the "
            "scored images, or, with --reject-by reference, for each image scored below the lowest "
            "fraction --rejection-ratio of the reference images: one image at a time).\n\n"
            "A folder's images are read as the controller needs them: each is resized (bilinear) to "
            "the controller's input size and converted to its channels (grey or RGB), so a folder "
            "may mix sizes and channels.  An HDF5 dataset is scored as stored and must have the "
            "controller's (C, H, W).  Files that are not images (by extension) are ignored; an "
            "unreadable image, or a folder without images, is an error.  On any error the CSV "
            "--out is left as it was.\n\n"
            "Example:\n\n"
            "  iqa score --controller runs/r1/controller data.h5 --out scores.csv"
        ),
    )
    p.add_argument("input", help="HDF5 dataset (.h5) or a folder of images")
    p.add_argument("--controller", required=True, help="controller folder (controller.json + controller.pt)")
    p.add_argument("--out", default="scores.csv", help="CSV to write")
    p.add_argument("--rejection-ratio", type=float, default=0.05, help="fraction of images marked rejected, in [0, 1)")
    p.add_argument(
        "--reject-by",
        choices=("input", "reference"),
        default="input",
        help="rank the scored images among themselves (the paper), or against the controller's reference images",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from agents.controller import Controller
    from iqa_env.env import resolve_device
    from iqa_env.files import atomic_write_text
    from iqa_env.rewards import check_rejection_ratio, kept_by_rejection

    ratio = check_rejection_ratio(args.rejection_ratio)
    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(
            f"--out {out}: is a folder; expected the path of the CSV file to write (e.g. {out / 'scores.csv'})"
        )
    controller = Controller.load(args.controller, device=resolve_device(args.device))
    source = Path(args.input)
    if source.is_dir():
        from iqa_env.data.importers import import_folder

        c, h, w = controller.image_shape
        dataset = import_folder(source, size=(h, w), channels=c)
        names = dataset.metadata.get("files") or [str(i) for i in range(len(dataset))]
        key = "file"
    elif source.is_file():
        from iqa_env.data.io import load_dataset

        dataset = load_dataset(source)
        names = [str(i) for i in range(len(dataset))]
        key = "index"
    else:
        raise FileNotFoundError(f"{source}: no such dataset file or images folder")
    if dataset.image_shape != controller.image_shape:
        raise ValueError(
            f"{source}: images are {dataset.image_shape} (C, H, W) but the controller was trained on "
            f"{controller.image_shape}; expected a dataset of the controller's image shape (or a "
            "folder of images, which is resized to it)"
        )
    scores = controller.score(dataset.images)
    if args.reject_by == "reference":
        # One image at a time: below the score of the lowest `ratio` of the controller's reference images.
        rejected = scores < controller.threshold(ratio)
    else:
        # As the paper: keep the floor((1 - ratio) * N) highest-scored images.
        rejected = ~kept_by_rejection(scores, ratio) if ratio > 0 else np.zeros(len(scores), bool)
    percentiles = None if controller.reference is None else controller.percentile_of(scores)
    lines = io.StringIO()
    writer = csv.writer(lines)
    writer.writerow([key, "score", *(["percentile"] if percentiles is not None else []), "rejected"])
    for i, (name, s, r) in enumerate(zip(names, scores, rejected)):
        writer.writerow([name, f"{s:.6f}", *([f"{percentiles[i]:.4f}"] if percentiles is not None else []), int(r)])
    try:
        atomic_write_text(out, lines.getvalue(), newline="")
    except OSError as e:
        return report_write_error(args.command, out, e)
    if args.reject_by == "reference":
        how = f"the lowest {ratio:g} of the controller's reference images"
    else:
        how = f"the lowest {ratio:g} of these images, keeping floor((1 - {ratio:g}) x {len(scores)}) as the paper does"
    print(f"scored {len(scores)} images -> {out} ({int(rejected.sum())} rejected: {how})")
    return 0
