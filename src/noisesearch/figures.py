"""Image grids that explain themselves: every row and every column carries a label.

``labelled_grid(images, nrow, row_labels, col_labels, title)`` lays out images [N, C, H, W] in
[0, 1] row-major on ``nrow`` rows, writes a label left of each row (e.g. strategy, NFEs spent,
judge accuracy; several lines allowed) and above each column (e.g. the prompt or target digit),
and upscales small images so that the text stays readable next to them. ``save_labelled_grid``
writes it as PNG atomically. PIL's default font (scalable when FreeType is present) is used.
"""
from __future__ import annotations

import io as _io
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_write_bytes, to_pil

__all__ = ["labelled_grid", "save_labelled_grid"]

MIN_CELL = 64  # images smaller than this (in pixels, along their longer side) are upscaled
FONT_SIZE = 13
PAD = 4
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # an old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return int(math.ceil(right - min(left, 0))), int(math.ceil(bottom - min(top, 0)))


def _labels(labels: Sequence | None, n: int, what: str, default: str) -> list[str]:
    if labels is None:
        return [f"{default} {i}" for i in range(n)]
    labels = [str(x) for x in labels]
    if len(labels) != n:
        raise NoiseSearchError(f"labelled_grid: {len(labels)} {what} labels for {n} {what}s; give one per {what}")
    return labels


def _check(images: torch.Tensor, nrow: int) -> tuple[int, int]:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise NoiseSearchError(f"labelled_grid: images must be a tensor [N, C, H, W] with C = 1 or 3, got {shape}")
    n = images.shape[0]
    if n == 0 or int(nrow) < 1 or int(nrow) > n:
        raise NoiseSearchError(f"labelled_grid: nrow must be between 1 and the number of images ({n}), got {nrow}")
    return int(nrow), math.ceil(n / int(nrow))


def labelled_grid(
    images: torch.Tensor,
    nrow: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """A grid of ``images`` [N, C, H, W] in [0, 1], row-major on ``nrow`` rows, with a label left
    of every row and above every column (``row 0`` / ``col 0`` ... when none are given) and an
    optional title on top. Labels may hold several lines (``"beam\\n360 NFE"``)."""
    nrow, ncol = _check(images, nrow)
    rows = _labels(row_labels, nrow, "row", "row")
    cols = _labels(col_labels, ncol, "column", "col")
    h, w = images.shape[2:]
    scale = max(1, MIN_CELL // max(h, w))
    font = _font()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_sizes = [_text_size(draw, t, font) for t in rows]
    col_sizes = [_text_size(draw, t, font) for t in cols]
    title_size = _text_size(draw, title or "", _font(FONT_SIZE + 2))
    cell_w = max(w * scale, max(s[0] for s in col_sizes)) + PAD
    cell_h = max(h * scale, max(s[1] for s in row_sizes)) + PAD
    label_w = max(s[0] for s in row_sizes) + 2 * PAD
    head_h = max(s[1] for s in col_sizes) + PAD
    title_h = title_size[1] + 2 * PAD if title else 0
    width = max(label_w + ncol * cell_w + PAD, title_size[0] + 2 * PAD)
    height = title_h + head_h + nrow * cell_h + PAD
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.multiline_text(((width - title_size[0]) // 2, PAD), title, fill=INK, font=_font(FONT_SIZE + 2), spacing=2)
    top = title_h + head_h
    for j, (text, (tw, th)) in enumerate(zip(cols, col_sizes)):
        x = label_w + j * cell_w + (cell_w - PAD - tw) // 2
        draw.multiline_text((x, title_h + head_h - PAD // 2 - th), text, fill=INK, font=font, spacing=2, align="center")
    for i, (text, (tw, th)) in enumerate(zip(rows, row_sizes)):
        draw.multiline_text((PAD, top + i * cell_h + (cell_h - PAD - th) // 2), text, fill=INK, font=font, spacing=2)
    for k in range(images.shape[0]):
        i, j = divmod(k, ncol)
        x = label_w + j * cell_w + (cell_w - PAD - w * scale) // 2
        y = top + i * cell_h + (cell_h - PAD - h * scale) // 2
        grid.paste(to_pil(images[k], scale).convert("RGB"), (x, y))
    return grid


def save_labelled_grid(
    path: str | os.PathLike,
    images: torch.Tensor,
    nrow: int,
    row_labels: Sequence[str] | None,
    col_labels: Sequence[str] | None,
    title: str | None = None,
) -> Path:
    """``labelled_grid(...)`` written as PNG to ``path`` atomically (no partial file on failure)."""
    buf = _io.BytesIO()
    labelled_grid(images, nrow, row_labels, col_labels, title).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
