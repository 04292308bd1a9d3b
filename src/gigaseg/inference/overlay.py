"""A small picture of a prediction: the slide's thumbnail with the tissue outlines drawn over it."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gigaseg.atomic import atomic_path
from gigaseg.slides.base import SlideReader

#: A level read whole for the thumbnail may have at most this many pixels; larger ones are read in strips.
_MAX_READ_PIXELS = 16_000_000
_STRIP_ROWS = 512
_EXTERIOR = (0, 200, 0)
_HOLE = (230, 0, 200)


def slide_thumbnail(slide: SlideReader, max_side: int = 1024) -> tuple[np.ndarray, tuple[float, float]]:
    """An RGB thumbnail whose longer side is at most ``max_side``, and its scale (level-0 pixels per pixel, x and y).

    Reads the coarsest level that is still at least ``max_side`` pixels on its longer side
    (or level 0 if none is), in strips with row/column skipping when that level is large.
    """
    level = 0
    for k, (w, h) in enumerate(slide.level_dimensions):
        if max(w, h) >= max_side:
            level = k
    width, height = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    step = 1
    while math.ceil(width / step) * math.ceil(height / step) > _MAX_READ_PIXELS:
        step += 1
    strips = []
    for top in range(0, height, _STRIP_ROWS):
        rows = min(_STRIP_ROWS, height - top)
        # Rounded down: at a downsample a little over a whole number (a level halved and rounded
        # down), rounding up puts the last strip's end past the level.
        strip = slide.read_region((0, math.floor(top * ds)), level, (width, rows))
        strips.append(strip[(-top) % step :: step, ::step])
    image = Image.fromarray(np.concatenate(strips))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    w0, h0 = slide.dimensions
    return np.asarray(image), (w0 / image.width, h0 / image.height)


def write_overlay(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    outlines: Sequence[Sequence[np.ndarray]],
    scale: tuple[float, float],
    *,
    line_width: int = 2,
) -> Path:
    """Draw each piece's exterior (green) and holes (magenta) over ``thumbnail`` and save a PNG atomically."""
    image = Image.fromarray(np.ascontiguousarray(thumbnail[..., :3]))
    draw = ImageDraw.Draw(image)
    sx, sy = scale
    for piece in outlines:
        for k, ring in enumerate(piece):
            points = [(float(x) / sx, float(y) / sy) for x, y in np.asarray(ring)]
            if len(points) >= 2:
                draw.line(points + points[:1], fill=_HOLE if k else _EXTERIOR, width=line_width)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return path
