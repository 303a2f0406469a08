"""A picture of one step: the mini-batch as a grid, with selections and probabilities marked."""

from __future__ import annotations

import math

import numpy as np

_SELECTED = np.array([40, 200, 80], dtype=np.uint8)  # green frame: trained on / kept
_REJECTED = np.array([220, 50, 50], dtype=np.uint8)  # red frame: not selected
_PENDING = np.array([128, 128, 128], dtype=np.uint8)  # grey frame: no action yet / padding
_BAR = np.array([250, 200, 40], dtype=np.uint8)


def selection_grid(
    images: np.ndarray,
    probabilities: np.ndarray | None = None,
    selection: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    border: int = 2,
    bar: int = 4,
) -> np.ndarray:
    """RGB ``uint8`` grid ``(H', W', 3)`` of ``(B, C, H, W)`` images.

    Each tile has a frame (green: selected, red: not selected, grey: no
    action yet or padding) and a bar under it whose length is the image's
    selection probability.
    """
    b, c, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    th, tw = h + 2 * border + bar, w + 2 * border
    canvas = np.zeros((rows * th, cols * tw, 3), dtype=np.uint8)
    rgb = np.repeat(images, 3, axis=1) if c == 1 else images[:, :3]
    for i in range(b):
        r, q = divmod(i, cols)
        y, x = r * th, q * tw
        pending = selection is None or (valid is not None and not valid[i])
        colour = _PENDING if pending else (_SELECTED if selection[i] else _REJECTED)
        canvas[y : y + h + 2 * border, x : x + tw] = colour
        canvas[y + border : y + border + h, x + border : x + border + w] = rgb[i].transpose(1, 2, 0)
        if probabilities is not None and not pending:
            length = int(round(float(probabilities[i]) * tw))
            canvas[y + h + 2 * border : y + th, x : x + length] = _BAR
    return canvas
