"""Deep Zoom tiles of an image pyramid: the grid of levels and tiles that Deep Zoom viewers (OpenSeadragon) ask for.

Deep Zoom level ``k`` of a ``width`` x ``height`` image is the image scaled by
``2 ** (k - max_level)`` (sizes rounded up), ``max_level`` being the first level at full
size; each level is cut into ``tile_size`` squares, each tile widened by ``overlap`` pixels on
every side that has a neighbour. The geometry is the one ``openslide.deepzoom`` and
OpenSeadragon's ``DziTileSource`` compute, so tiles drawn by either line up.
"""

from __future__ import annotations

import abc
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gigaseg.errors import RegionError

if TYPE_CHECKING:
    from gigaseg.slides.base import SlideReader

#: OpenSlide's and OpenSeadragon's usual tile: 254 pixels plus 1 of overlap on each side.
TILE_SIZE = 254
OVERLAP = 1
#: Deep Zoom levels of at most this many pixels a side are cut from an overview made once (``RegionDeepZoom``).
OVERVIEW_SIDE = 2048


@dataclass(frozen=True)
class DeepZoomTile:
    """One tile: its rectangle in pixels of its Deep Zoom level, and the same rectangle in full-size pixels."""

    level: int
    col: int
    row: int
    #: (x0, y0, x1, y1) in pixels of the Deep Zoom level, overlap included.
    box: tuple[int, int, int, int]
    #: (x0, y0, x1, y1) in full-size (level-0) pixels, clipped to the image.
    full_box: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the tile in pixels."""
        return self.box[2] - self.box[0], self.box[3] - self.box[1]

    @property
    def downsample(self) -> int:
        """Full-size pixels per tile pixel."""
        return max(1, round((self.full_box[2] - self.full_box[0]) / max(1, self.size[0])))


@dataclass(frozen=True)
class DeepZoomGrid:
    """The Deep Zoom levels and tiles of a ``width`` x ``height`` image."""

    width: int
    height: int
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"a Deep Zoom image needs a positive size, got {self.width}x{self.height}")
        if self.tile_size <= 0 or self.overlap < 0:
            raise ValueError(f"tile_size must be positive and overlap not negative, got {self.tile_size}, {self.overlap}")

    @property
    def max_level(self) -> int:
        """The level at full size (the finest)."""
        return math.ceil(math.log2(max(self.width, self.height))) if max(self.width, self.height) > 1 else 0

    @property
    def level_count(self) -> int:
        return self.max_level + 1

    def scale(self, level: int) -> int:
        """Full-size pixels per pixel of ``level`` (a power of two)."""
        return 2 ** (self.max_level - level)

    def level_dimensions(self, level: int) -> tuple[int, int]:
        """(width, height) of ``level``."""
        s = self.scale(level)
        return -(-self.width // s), -(-self.height // s)

    def tile_count(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at ``level``."""
        w, h = self.level_dimensions(level)
        return -(-w // self.tile_size), -(-h // self.tile_size)

    def tile(self, level: int, col: int, row: int) -> DeepZoomTile:
        """The tile at (``col``, ``row``) of ``level``; ``RegionError`` when there is no such tile."""
        if not 0 <= level < self.level_count:
            raise RegionError(f"Deep Zoom level {level} does not exist (levels 0..{self.max_level})")
        cols, rows = self.tile_count(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise RegionError(f"Deep Zoom level {level} has {cols}x{rows} tiles; there is no tile ({col}, {row})")
        w, h = self.level_dimensions(level)
        t, o = self.tile_size, self.overlap
        x0, y0 = col * t - (o if col else 0), row * t - (o if row else 0)
        x1, y1 = min(w, (col + 1) * t + o), min(h, (row + 1) * t + o)
        s = self.scale(level)
        full = (x0 * s, y0 * s, min(self.width, x1 * s), min(self.height, y1 * s))
        return DeepZoomTile(level, col, row, (x0, y0, x1, y1), full)

    def thumbnail_level(self) -> int:
        """The largest level that is one tile: a thumbnail of at most ``tile_size`` pixels a side."""
        level = 0
        for k in range(self.level_count):
            if max(self.level_dimensions(k)) <= self.tile_size:
                level = k
        return level

    def dzi(self, image_format: str) -> str:
        """The ``.dzi`` descriptor of the image, for tiles in ``image_format`` (jpeg or png)."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
            f'Format="{image_format}" Overlap="{self.overlap}" TileSize="{self.tile_size}">'
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>\n'
        )


class DeepZoomSource(abc.ABC):
    """RGB Deep Zoom tiles of one image."""

    grid: DeepZoomGrid

    @abc.abstractmethod
    def tile(self, level: int, col: int, row: int) -> np.ndarray:
        """The tile's pixels, height x width x 3 RGB uint8, of ``grid.tile(...).size``."""


class RegionDeepZoom(DeepZoomSource):
    """Deep Zoom tiles of any ``SlideReader``: fine tiles read from the nearest finer level and reduced, coarse ones cut
    from an overview of the slide made once.

    A slide's pyramid often stops far above the coarsest Deep Zoom levels (the 128000x32000
    benchmark slide's at 8000x2000); read from the slide, each tile of those levels would
    decode that whole level. The overview (at most ``overview_side`` pixels a side, 12 MB for
    2048x2048) is read once, in bands, on the first request for such a tile. The slide covers
    its whole level 0, so tiles line up with masks placed by their level-0 downsample.
    """

    def __init__(self, slide: SlideReader, tile_size: int = TILE_SIZE, overlap: int = OVERLAP,
                 overview_side: int = OVERVIEW_SIDE) -> None:
        self.slide = slide
        self.grid = DeepZoomGrid(*slide.dimensions, tile_size=tile_size, overlap=overlap)
        #: The finest Deep Zoom level cut from the overview.
        self.overview_level = max(k for k in range(self.grid.level_count)
                                  if max(self.grid.level_dimensions(k)) <= max(overview_side, 1))
        self._overview: list[np.ndarray] | None = None
        self._lock = threading.Lock()

    def tile(self, level: int, col: int, row: int) -> np.ndarray:
        tile = self.grid.tile(level, col, row)
        if level <= self.overview_level:
            x0, y0, x1, y1 = tile.box
            return self.overview()[level][y0:y1, x0:x1]
        return self._read(tile.full_box, self.grid.scale(level), tile.size)

    def _read(self, full_box: tuple[int, int, int, int], scale: float, size: tuple[int, int]) -> np.ndarray:
        """Level-0 rectangle ``full_box`` read from the slide level nearest ``scale`` and reduced to ``size``."""
        from PIL import Image

        x0, y0, x1, y1 = full_box
        slide_level = self.slide.level_for_downsample(scale)
        ds = self.slide.level_downsamples[slide_level]
        lw, lh = self.slide.level_dimensions[slide_level]
        # The rectangle at the slide's level, kept inside it (its size is rounded down).
        left, top = min(lw - 1, int(x0 // ds)), min(lh - 1, int(y0 // ds))
        w = max(1, min(lw - left, math.ceil((x1 - x0) / ds)))
        h = max(1, min(lh - top, math.ceil((y1 - y0) / ds)))
        pixels = self.slide.read_region((round(left * ds), round(top * ds)), slide_level, (w, h))
        if (w, h) == tuple(size):
            return pixels
        return np.asarray(Image.fromarray(pixels).resize(tuple(size), Image.Resampling.BOX))

    def overview(self) -> list[np.ndarray]:
        """The Deep Zoom levels up to ``overview_level``, whole, made on first use."""
        with self._lock:
            if self._overview is None:
                from PIL import Image

                level = self.overview_level
                width, height = self.grid.level_dimensions(level)
                scale = self.grid.scale(level)
                image = np.empty((height, width, 3), np.uint8)
                band = 64
                for top in range(0, height, band):
                    bottom = min(height, top + band)
                    box = (0, top * scale, self.grid.width, min(self.grid.height, bottom * scale))
                    image[top:bottom] = self._read(box, scale, (width, bottom - top))
                levels = [image]
                for k in range(level - 1, -1, -1):
                    smaller = Image.fromarray(levels[0]).resize(self.grid.level_dimensions(k), Image.Resampling.BOX)
                    levels.insert(0, np.asarray(smaller))
                self._overview = levels
            return self._overview
