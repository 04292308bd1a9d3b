"""Decoding the tiles of a tiled TIFF pyramid straight from the file, for OpenSlide's generic-TIFF and Aperio slides.

OpenSlide's ``read_region`` spent 69 CPU-ms on a 1152x1152 window of the synthetic slides'
JPEG tiles (``benchmarks/predict_stages.py``), the largest single cost of whole-slide
prediction then; decoding the same tiles with tifffile and imagecodecs (libjpeg-turbo) takes
13. The pixels must be OpenSlide's own, so this is used only where it can be checked:

- the slide is one OpenSlide reads as ``generic-tiff`` or ``aperio``, whose levels are the
  file's tiled pages, and a level's page is the only tiled page of its size;
- the page is 8-bit RGB or YCbCr, contiguous, with a compression tifffile decodes;
- on a level's first read, its densest tile (the most compressed bytes) decoded here is
  compared with OpenSlide's read of the same pixels; if they differ by a single value the
  level is left to OpenSlide;
- a read touching a missing (zero-length) tile, or starting at a fractional position of a
  level whose downsample is not an integer (where OpenSlide resamples), is left to OpenSlide,
  as is any tile that fails to decode or lies past the end of a truncated file (OpenSlide
  then raises its error).

One difference remains: libjpeg only warns about some damage inside a JPEG tile's
compressed data ("Corrupt JPEG data: premature end of data segment"); OpenSlide turns that
warning into an error, imagecodecs decodes the tile with the damaged part grey. A level
whose checked tile is damaged that way is left to OpenSlide; elsewhere such a tile is
returned as decoded.

Nothing here opens OpenSlide; :class:`gigaseg.slides.openslide_reader.OpenSlideReader` owns
both paths. Decoded tiles are kept in a small least-recently-used cache, since tile windows
overlap by their halos.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

log = logging.getLogger(__name__)

#: OpenSlide vendors whose levels are plain tiled TIFF pages, one per level.
VENDORS = ("generic-tiff", "aperio")

#: Bytes of decoded tiles kept per slide (a 1152x1152 window over 512x512 tiles touches 12 MB).
CACHE_BYTES = 48 * 2**20


class _Level:
    """One tiled page: where its tiles lie in the file and how to decode them."""

    def __init__(self, page: tifffile.TiffPage) -> None:
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.cols = -(-self.width // self.tile_w)
        self.offsets = np.asarray(page.dataoffsets, np.int64)
        self.counts = np.asarray(page.databytecounts, np.int64)
        self.tables = page.jpegtables
        self.decode = page.decode
        self.checked = False  # compared with OpenSlide yet?
        self.usable = True


def _usable_page(page: tifffile.TiffPage) -> bool:
    photometric = getattr(page.photometric, "name", "")
    return (
        page.is_tiled
        and page.tiledepth == 1
        and page.samplesperpixel == 3
        and page.bitspersample == 8
        and page.sampleformat == 1
        and page.planarconfig == 1
        and photometric in ("RGB", "YCBCR")
        and len(page.dataoffsets) == -(-page.imagewidth // page.tilewidth) * -(-page.imagelength // page.tilelength)
    )


class TiffTiles:
    """Reads level rectangles of a tiled TIFF pyramid by decoding its tiles; ``None`` where it cannot."""

    def __init__(self, path: str | os.PathLike, level_dimensions, cache_bytes: int = CACHE_BYTES) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._levels: list[_Level | None] = []
        try:
            with tifffile.TiffFile(self.path) as tif:
                pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]
                for width, height in level_dimensions:
                    same = [p for p in pages if p.is_tiled and (p.imagewidth, p.imagelength) == (width, height)]
                    ok = len(same) == 1 and _usable_page(same[0])
                    self._levels.append(_Level(same[0]) if ok else None)
        except Exception:
            os.close(self._fd)
            raise
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self.cache_limit = int(cache_bytes)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike, vendor: str | None, level_dimensions) -> "TiffTiles | None":
        """The tile decoder of a slide, or None when the slide is not one this can read."""
        if vendor not in VENDORS:
            return None
        try:
            tiles = cls(path, level_dimensions)
        except Exception as exc:  # tifffile raises many types for files it cannot parse: OpenSlide reads them
            log.debug("%s: tiles not decoded directly (%s)", path, exc)
            return None
        if not any(tiles._levels):
            tiles.close()
            return None
        return tiles

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._cache.clear()

    def read(
        self, level: int, x: int, y: int, w: int, h: int, reference: Callable[[int, int, int, int], np.ndarray]
    ) -> np.ndarray | None:
        """RGB uint8 pixels of rows ``y:y+h`` and columns ``x:x+w`` of ``level`` (level pixels), or None.

        ``reference(x, y, w, h)`` reads the same level rectangle through OpenSlide; it is called
        once per level, to check the decoded pixels against it.
        """
        lv = self._levels[level] if 0 <= level < len(self._levels) else None
        if lv is None or not lv.usable or self._fd < 0:
            return None
        if not lv.checked:
            self._check(level, lv, reference)
            if not lv.usable:
                return None
        tx0, tx1 = x // lv.tile_w, (x + w - 1) // lv.tile_w
        ty0, ty1 = y // lv.tile_h, (y + h - 1) // lv.tile_h
        indices = [ty * lv.cols + tx for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
        if not lv.counts[indices].all():  # a missing tile: OpenSlide knows how the format fills it
            return None
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(ty0, ty1 + 1):
            top = ty * lv.tile_h
            r0, r1 = max(y, top), min(y + h, top + lv.tile_h)
            for tx in range(tx0, tx1 + 1):
                left = tx * lv.tile_w
                c0, c1 = max(x, left), min(x + w, left + lv.tile_w)
                tile = self._tile(level, lv, ty * lv.cols + tx)
                out[r0 - y : r1 - y, c0 - x : c1 - x] = tile[r0 - top : r1 - top, c0 - left : c1 - left]
        return out

    def _tile(self, level: int, lv: _Level, index: int) -> np.ndarray:
        key = (level, index)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        count = int(lv.counts[index])
        data = os.pread(self._fd, count, int(lv.offsets[index]))
        if len(data) != count:  # a truncated file: OpenSlide reports it
            raise ValueError(f"tile {index}: {len(data)} of its {count} bytes in the file")
        decoded, _, _ = lv.decode(data, index, jpegtables=lv.tables)
        tile = decoded.reshape(decoded.shape[-3:])
        if tile.shape != (lv.tile_h, lv.tile_w, 3) or tile.dtype != np.uint8:
            raise ValueError(f"tile {index} decoded to {tile.shape} {tile.dtype}, expected {(lv.tile_h, lv.tile_w, 3)} uint8")
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cache_bytes += tile.nbytes
                while self._cache_bytes > self.cache_limit and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= old.nbytes
        return tile

    def _check(self, level: int, lv: _Level, reference: Callable[[int, int, int, int], np.ndarray]) -> None:
        """Compare the level's densest tile, decoded here, with OpenSlide's pixels; keep the level only if equal."""
        index = densest_tile(lv.counts)
        ty, tx = divmod(index, lv.cols)
        x, y = tx * lv.tile_w, ty * lv.tile_h
        w, h = min(lv.tile_w, lv.width - x), min(lv.tile_h, lv.height - y)
        try:
            mine = self._tile(level, lv, index)[:h, :w] if lv.counts[index] else None
        except Exception as exc:  # noqa: BLE001 - any failure leaves the level to OpenSlide
            log.debug("%s level %d: tile %d not decoded (%s)", self.path.name, level, index, exc)
            mine = None
        try:
            expected = reference(x, y, w, h)
        except Exception as exc:  # noqa: BLE001 - a corrupt tile there: nothing to compare with, so OpenSlide reads the level
            log.debug("%s level %d: OpenSlide cannot read the tile to compare (%s)", self.path.name, level, exc)
            expected = None
        same = mine is not None and expected is not None and np.array_equal(mine, expected)
        lv.usable = same
        lv.checked = True
        if not same:
            log.debug("%s level %d: decoded tile %d differs from OpenSlide's; reading through OpenSlide",
                      self.path.name, level, index)


def densest_tile(byte_counts) -> int:
    """Index of the tile with the most compressed bytes (the first of equals): the one a level is checked on.

    A level's middle tile is often blank glass, which decodes the same whatever the decoder
    gets wrong about colour conversion, subsampling or tables; the tile that compresses
    worst holds the most detail, so a disagreement shows there first.
    """
    return int(np.argmax(np.asarray(byte_counts)))
