"""Masks as translucent Deep Zoom layers: a mask TIFF's pyramid read tile by tile, coloured into RGBA tiles.

A predicted ``mask.tiff`` (or a reference mask) is a one-channel pyramid whose pages are 4x
reductions; a Deep Zoom tile is read from the finest page not finer than it needs, and
reduced to the tile's size by averaging, so tissue edges fade rather than alias. Tiles are
read with positioned reads (``os.pread``), so server threads share one file descriptor.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from gigaseg.data.maskfile import TileCache, assemble
from gigaseg.errors import MaskError
from gigaseg.slides.deepzoom import OVERLAP, TILE_SIZE, DeepZoomGrid

#: Decoded mask tiles kept, all masks together (a 512x512 tile is 256 KiB).
DECODED_CACHE_BYTES = 64 * 2**20
#: A stripped (not tiled) page larger than this is refused: it would be decoded whole for every strip.
_MAX_STRIP_BYTES = 64 * 2**20

#: RGB of the predicted tissue (binary masks) and of the reference, as in the overlay PNG's green.
TISSUE_RGB = (0, 200, 0)
REFERENCE_RGB = (40, 120, 255)


@dataclass(frozen=True)
class _Page:
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray
    counts: np.ndarray
    decode: Callable
    dtype: np.dtype


class TiffPyramid:
    """The pages of a one-channel TIFF (a mask pyramid, finest first), read a rectangle at a time."""

    def __init__(self, path: str | os.PathLike, cache: TileCache) -> None:
        import tifffile

        self.path = Path(path)
        self.cache = cache
        pages = []
        try:
            with tifffile.TiffFile(self.path) as tif:
                for page in tif.pages:
                    if not isinstance(page, tifffile.TiffPage) or page.samplesperpixel != 1 or page.imagedepth != 1:
                        continue
                    if page.dtype is None or page.dtype.kind not in "biu":
                        continue
                    tile_w = int(page.tilewidth) if page.is_tiled else int(page.imagewidth)
                    tile_h = int(page.tilelength) if page.is_tiled else int(page.rowsperstrip or page.imagelength)
                    tile_h = min(tile_h, int(page.imagelength))
                    if not page.is_tiled and tile_w * tile_h * page.dtype.itemsize > _MAX_STRIP_BYTES:
                        continue
                    pages.append(_Page(int(page.imagewidth), int(page.imagelength), tile_w, tile_h,
                                       np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64),
                                       page.decode, np.dtype(page.dtype)))
        except (OSError, tifffile.TiffFileError, IndexError, ValueError) as exc:
            raise MaskError(f"{self.path} is not a readable mask TIFF ({exc})") from exc
        if not pages:
            raise MaskError(f"{self.path} has no one-channel integer page to show as a mask")
        # Pages of other sizes than reductions of the first (a label image, a macro) are left out.
        first = pages[0]
        self.pages = [p for p in pages if p.width <= first.width and p.height <= first.height
                      and abs(first.width / p.width - first.height / p.height) <= max(1.0, 0.02 * first.width / p.width)]
        self.pages.sort(key=lambda p: -p.width)
        self.width, self.height = first.width, first.height
        status = os.stat(self.path)
        self._key = (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)
        self._fd = os.open(self.path, os.O_RDONLY)
        # Closed by close(), or once nothing refers to the pyramid (dropped from the viewer's open files).
        self._closer = weakref.finalize(self, os.close, self._fd)

    def close(self) -> None:
        self._closer()

    def downsample(self, index: int) -> float:
        return self.width / self.pages[index].width

    def page_for(self, downsample: float) -> int:
        """The coarsest page not coarser than ``downsample``."""
        best = 0
        for k in range(len(self.pages)):
            if self.downsample(k) <= downsample * (1 + 1e-6):
                best = k
        return best

    def _tile(self, index: int, number: int) -> np.ndarray:
        key = (self._key, index, number)
        tile = self.cache.get(key)
        if tile is not None:
            return tile
        page = self.pages[index]
        count = int(page.counts[number])
        if count == 0:  # a tile never written reads as 0
            tile = np.zeros((page.tile_h, page.tile_w), page.dtype)
        else:
            data = os.pread(self._fd, count, int(page.offsets[number]))
            try:
                decoded, _, shape = page.decode(data, number)
                tile = np.asarray(decoded).reshape(shape[1], shape[2])
            except Exception as exc:  # noqa: BLE001 - tifffile and its codecs raise many kinds
                raise MaskError(f"{self.path}: tile {number} of page {index} cannot be decoded ({exc})") from exc
        tile.setflags(write=False)
        self.cache.put(key, tile)
        return tile

    def read(self, index: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """The stored values of ``box`` (x0, y0, x1, y1) of page ``index``, clipped to the page."""
        page = self.pages[index]
        x0, y0 = max(0, box[0]), max(0, box[1])
        x1, y1 = min(page.width, box[2]), min(page.height, box[3])
        out = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), page.dtype)
        across = -(-page.width // page.tile_w)
        return assemble(out, y0, x0, (page.tile_h, page.tile_w), lambda row, col: self._tile(index, row * across + col))


def coverage(values: np.ndarray, cut: int | None) -> np.ndarray:
    """Stored values as uint8 alpha: ``cut`` given, 255 where a value is at least ``cut``, else 255 where non-zero."""
    if cut is None:
        return np.where(values != 0, 255, 0).astype(np.uint8)
    return np.where(values >= cut, 255, 0).astype(np.uint8)


def _colour_map() -> np.ndarray:
    """256 RGBA entries for a probability 0..255: dark blue through green to yellow, alpha rising with it."""
    anchors = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], float)
    x = np.linspace(0, len(anchors) - 1, 256)
    rgb = np.stack([np.interp(x, np.arange(len(anchors)), anchors[:, c]) for c in range(3)], axis=1)
    alpha = np.arange(256)
    return np.concatenate([rgb, alpha[:, None]], axis=1).round().astype(np.uint8)


#: The probability colour map (viridis' end points), transparent where the probability is 0.
PROBABILITY_COLOURS = _colour_map()


@dataclass(frozen=True)
class MaskStyle:
    """How a mask's stored values become RGBA: a probability colour map, or one colour where the values count as tissue."""

    #: "probability": the colour map over the stored value; "tissue": ``rgb`` where tissue (``cut``).
    kind: str
    rgb: tuple[int, int, int] = TISSUE_RGB
    #: Stored values at least this are tissue; None: any non-zero value.
    cut: int | None = None


class MaskDeepZoom:
    """RGBA Deep Zoom tiles of a mask; the grid is the mask's own pixels (its finest page)."""

    def __init__(self, pyramid: TiffPyramid, style: MaskStyle, tile_size: int = TILE_SIZE, overlap: int = OVERLAP) -> None:
        if style.kind not in ("probability", "tissue"):
            raise ValueError(f"mask style kind must be probability or tissue, got {style.kind!r}")
        self.pyramid = pyramid
        self.style = style
        self.grid = DeepZoomGrid(pyramid.width, pyramid.height, tile_size=tile_size, overlap=overlap)

    def tile(self, level: int, col: int, row: int) -> np.ndarray:
        """The tile as height x width x 4 RGBA uint8."""
        tile = self.grid.tile(level, col, row)
        x0, y0, x1, y1 = tile.full_box
        index = self.pyramid.page_for(self.grid.scale(level))
        ds = self.pyramid.downsample(index)
        page = self.pyramid.pages[index]
        left, top = int(x0 // ds), int(y0 // ds)
        right = max(left + 1, min(page.width, -(-int(x1) // int(ds)) if ds.is_integer() else round(x1 / ds)))
        bottom = max(top + 1, min(page.height, -(-int(y1) // int(ds)) if ds.is_integer() else round(y1 / ds)))
        values = self.pyramid.read(index, (left, top, right, bottom))
        if self.style.kind == "probability":
            level_values = np.clip(values, 0, 255).astype(np.uint8)
        else:
            level_values = coverage(values, self.style.cut)
        size = tile.size
        if level_values.shape[::-1] != size:
            # Averaged: a tissue edge inside a tile pixel becomes partly transparent.
            level_values = np.asarray(Image.fromarray(level_values).resize(size, Image.Resampling.BOX))
        if self.style.kind == "probability":
            return PROBABILITY_COLOURS[level_values]
        rgba = np.empty(level_values.shape + (4,), np.uint8)
        rgba[..., :3] = self.style.rgb
        rgba[..., 3] = level_values
        return rgba
