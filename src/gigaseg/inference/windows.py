"""One slide level seen as a region padded to the model's total stride: tile windows are read from the slide on demand.

The padded level is what a plain whole-image forward pass would see: the level's pixels,
extended right and down with the background colour used for training regions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gigaseg.errors import RegionError
from gigaseg.options import DEFAULT_PAD_VALUE
from gigaseg.slides.base import SlideReader

#: The background colour training regions are padded with (``data.pad_value``).


def check_pad_value(pad_value: Sequence[int]) -> tuple[int, int, int]:
    """Validate an RGB background colour (three integers 0..255)."""
    values = tuple(pad_value)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
        raise RegionError(f"pad_value must be three integers 0..255 (an RGB colour), got {list(values)!r}")
    return int(values[0]), int(values[1]), int(values[2])


class PaddedLevel:
    """A read-only height x width x 3 uint8 view of a slide level, padded to a multiple of ``multiple``.

    Supports the slicing ``level[top:bottom, left:right]`` the tile engine uses; every slice
    is one ``read_region`` of the part inside the level, the rest filled with ``pad_value``.
    At levels whose downsample is not an integer OpenSlide resamples reads that start at a
    fractional level position, so windows there can differ slightly from a whole-level read.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(
        self, slide: SlideReader, level: int, multiple: int, pad_value: Sequence[int] = DEFAULT_PAD_VALUE
    ) -> None:
        if not 0 <= level < slide.level_count:
            raise RegionError(f"{slide.name}: level {level} does not exist (the slide has levels 0..{slide.level_count - 1})")
        self.slide = slide
        self.level = int(level)
        self.downsample = float(slide.level_downsamples[level])
        self.width, self.height = (int(v) for v in slide.level_dimensions[level])
        self.pad_value = np.array(check_pad_value(pad_value), np.uint8)
        padded_h = math.ceil(self.height / multiple) * multiple
        padded_w = math.ceil(self.width / multiple) * multiple
        self.shape = (padded_h, padded_w, 3)

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key[:2] if isinstance(key, tuple) else (key, slice(None))
        top, bottom, _ = rows.indices(self.shape[0])
        left, right, _ = cols.indices(self.shape[1])
        return self.read(top, left, bottom, right)

    def read(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        """Pixels of rows ``top:bottom`` and columns ``left:right`` of the padded level."""
        out = np.empty((bottom - top, right - left, 3), np.uint8)
        inner_h = min(bottom, self.height) - top
        inner_w = min(right, self.width) - left
        if inner_h <= 0 or inner_w <= 0:
            out[:] = self.pad_value
            return out
        ds = self.downsample
        location = (round(left * ds), round(top * ds))
        pixels = self.slide.read_region(location, self.level, (inner_w, inner_h))
        if (inner_h, inner_w) == out.shape[:2]:  # no padding: the reader's array as it is (8 MB less to copy per window)
            return pixels
        out[:inner_h, :inner_w] = pixels
        out[inner_h:] = self.pad_value
        out[:inner_h, inner_w:] = self.pad_value
        return out
