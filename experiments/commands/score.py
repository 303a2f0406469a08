"""``iqa score``: score images with a trained controller and write a CSV."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any

from experiments.commands import HelpFormatter, check_target, draw_image, positive_int, report_write_error

#: Images in each of the two rows of ``--preview``: the lowest-scored and the highest-scored.
PREVIEW_PER_ROW = 8


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
            "--preview writes a picture of what the controller rejects: the lowest-scored images in the "
            "top row and the highest-scored in the bottom one, each with its score, percentile and "
            "name, the rejected framed in red (and, for a dataset that knows it, the ground-truth "
            "amenability for the controller's task).\n\n"
            "Example:\n\n"
            "  iqa score --controller runs/r1/controller data.h5 --out scores.csv --preview scores.png"
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
    p.add_argument(
        "--preview",
        type=Path,
        metavar="PNG",
        help="also write a picture of the lowest- and the highest-scored images here",
    )
    p.add_argument(
        "--n-preview",
        type=positive_int,
        default=PREVIEW_PER_ROW,
        metavar="N",
        help="images in each of the preview's two rows",
    )
    p.set_defaults(func=run)


def preview_rows(scores: Any, per_row: int) -> tuple[Any, Any]:
    """Indices of the preview's rows: up to ``per_row`` lowest-scored images, lowest first, and up to
    ``per_row`` highest-scored, highest first; no image in both (with few images the top row has the extra one)."""
    import numpy as np

    order = np.argsort(np.asarray(scores), kind="stable")
    n = min(per_row, (len(order) + 1) // 2)
    return order[:n], order[::-1][: min(n, len(order) - n)]


def write_score_preview(
    images: Any,
    names: list[str],
    scores: Any,
    percentiles: Any,
    rejected: Any,
    path: Path,
    per_row: int = PREVIEW_PER_ROW,
    truth: Any = None,
    title: str = "",
) -> Path:
    """A picture of the ``per_row`` lowest-scored images (top row) and the ``per_row`` highest (bottom).

    Each tile is titled with the image's name, score and percentile (where
    the controller has a reference) and the ground-truth amenability where
    given (``truth``); the rejected are framed in red, the kept in green.
    With fewer than ``2 * per_row`` images each is shown once.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iqa_env.files import atomic_write

    lowest, highest = preview_rows(scores, per_row)
    rows = [("lowest", lowest), ("highest", highest)]
    n = len(lowest)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n + 1.0, 4.9), squeeze=False, layout="constrained")
    for r, (which, indices) in enumerate(rows):
        for ax in axes[r]:
            ax.axis("off")
        for ax, i in zip(axes[r], indices.tolist()):
            draw_image(ax, images[i])
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "tab:red" if rejected[i] else "tab:green"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            name = names[i] if len(names[i]) <= 22 else names[i][:12] + "..." + names[i][-7:]  # the start tells them apart
            lines = [name, f"score {scores[i]:.3f}" + ("" if percentiles is None else f", pct {percentiles[i]:.2f}")]
            if truth is not None:
                lines.append(f"truth {float(truth[i]):.2f}")
            ax.set_title("\n".join(lines), fontsize=6.5)
        axes[r][0].set_ylabel(f"{which} {len(indices)}", fontsize=8)
    fig.suptitle(f"{title}{len(scores):,} images; red frame: rejected, green: kept", fontsize=8)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from agents.controller import Controller
    from iqa_env.env import resolve_device
    from iqa_env.files import atomic_write_text
    from iqa_env.rewards import check_rejection_ratio, kept_by_rejection

    ratio = check_rejection_ratio(args.rejection_ratio)
    out = Path(args.out)
    check_target(out, "--out", "scores.csv", what="CSV file")
    check_target(args.preview, "--preview", "scores.png", what="PNG picture")
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
    if args.preview is not None:
        task = controller.metadata.get("task")
        truth = dataset.amenability.get(task) if isinstance(task, str) else None
        try:
            write_score_preview(
                dataset.images, names, scores, percentiles, rejected, args.preview, args.n_preview, truth,
                title=f"{source.name} scored by {'/'.join(Path(args.controller).resolve().parts[-2:])}: ",
            )
        except OSError as e:
            return report_write_error(args.command, args.preview, e)
        print(f"wrote preview {args.preview} (the {len(preview_rows(scores, args.n_preview)[0])} lowest- and highest-scored)")
    return 0
