"""A prepared region's label mask as a compressed tiled TIFF, written tile by tile and read a window at a time.

A 16000x64000 mask is 1 GB as raw bytes but mostly long runs of one label, which deflate
well in 512x512 tiles; a window needs only the tiles it touches. Any TIFF reader opens the file (0 background, 1 tissue, 255 ignore).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import numpy as np
import tifffile

from gigaseg.data.labels import IGNORE, TISSUE
from gigaseg.data.windows import LazyArray
from gigaseg.errors import MaskError

#: Side of the mask's square tiles.
TILE = 512
#: Bytes of decoded mask tiles kept, all masks together (a 2304x2304 tile window touches 25 tiles: 6.6 MB).
CACHE_BYTES = 16 * 2**20


class TileCache:
    """Tiles under keys, least recently used dropped first beyond ``limit`` bytes in all.

    One cache for all of a cohort's masks, so memory does not grow with the number of regions.
    ``sizeof`` gives a value's bytes (decoded arrays by default; ``len`` for encoded bytes).
    A value larger than ``limit`` is kept alone until the next one, or with
    ``admit_oversized=False`` not kept at all.
    """

    def __init__(self, limit: int = CACHE_BYTES, *, sizeof: Callable[[Any], int] = lambda tile: tile.nbytes,
                 admit_oversized: bool = True) -> None:
        self.limit = int(limit)
        self.sizeof = sizeof
        self.admit_oversized = admit_oversized
        self._tiles: OrderedDict[tuple, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def size(self) -> int:
        """Bytes held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._tiles)

    def get(self, key: tuple) -> Any | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is None:
                self.misses += 1
                return None
            self._tiles.move_to_end(key)
            self.hits += 1
            return tile

    def put(self, key: tuple, tile: Any) -> None:
        with self._lock:
            size = self.sizeof(tile)
            if key in self._tiles or (size > self.limit and not self.admit_oversized):
                return
            self._tiles[key] = tile
            self._bytes += size
            while self._bytes > self.limit and len(self._tiles) > 1:
                _, old = self._tiles.popitem(last=False)
                self._bytes -= self.sizeof(old)


#: The cache every mask shares unless given its own.
CACHE = TileCache()


def write_mask(path: str | os.PathLike, tiles: Iterator[np.ndarray], shape: tuple[int, int]) -> None:
    """Write an H x W uint8 mask given as full ``TILE`` x ``TILE`` tiles in row-major order (edges padded)."""
    # No software tag, date or metadata: the same mask gives the same bytes (DVC keeps their digest).
    tifffile.imwrite(path, tiles, shape=tuple(shape), dtype=np.uint8, tile=(TILE, TILE), compression="zlib",
                     photometric="minisblack", metadata=None, software=False)


def assemble(
    out: np.ndarray, top: int, left: int, tile_shape: tuple[int, int], tile: Callable[[int, int], np.ndarray]
) -> np.ndarray:
    """Fill ``out``, the rectangle of a tiled image whose corner is (``top``, ``left``), from the tiles it touches.

    ``tile(row, col)`` gives the image's tile in that row and column of tiles, ``tile_shape``
    (height, width) large; ``out`` must lie within the image.
    """
    tile_h, tile_w = tile_shape
    bottom, right = top + out.shape[0], left + out.shape[1]
    if out.size == 0:
        return out
    for row in range(top // tile_h, (bottom - 1) // tile_h + 1):
        y0 = row * tile_h
        r0, r1 = max(top, y0), min(bottom, y0 + tile_h)
        for col in range(left // tile_w, (right - 1) // tile_w + 1):
            x0 = col * tile_w
            c0, c1 = max(left, x0), min(right, x0 + tile_w)
            out[r0 - top : r1 - top, c0 - left : c1 - left] = tile(row, col)[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0]
    return out


class TiledMask(LazyArray):
    """The H x W uint8 mask of a file written by :func:`write_mask`; tiles decoded on demand, a few kept."""

    def __init__(self, path: str | os.PathLike, cache: TileCache | None = None) -> None:
        self.path = Path(path)
        try:
            with tifffile.TiffFile(self.path) as tif:
                page = tif.pages[0]
                ok = (isinstance(page, tifffile.TiffPage) and page.is_tiled and page.samplesperpixel == 1
                      and page.bitspersample == 8 and page.tiledepth == 1)
                if not ok:
                    raise MaskError(f"{self.path} is not a tiled 8-bit one-channel mask; re-run gigaseg-prepare")
                self.shape = (int(page.imagelength), int(page.imagewidth))
                self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
                self._offsets = np.asarray(page.dataoffsets, np.int64)
                self._counts = np.asarray(page.databytecounts, np.int64)
                self._decode = page.decode
        except (OSError, tifffile.TiffFileError, IndexError, ValueError) as exc:
            raise MaskError(f"{self.path} is not a readable mask file ({exc}); re-run gigaseg-prepare") from exc
        self.dtype = np.dtype(np.uint8)
        self._cols = -(-self.shape[1] // self.tile_w)
        self.cache = CACHE if cache is None else cache
        status = os.stat(self.path)
        # Tiles are cached under the file's identity, so a mask prepared again is never mixed with the old one.
        self._key = (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)

    def __repr__(self) -> str:
        return f"TiledMask({str(self.path)!r}, {self.shape[1]}x{self.shape[0]})"

    def _read(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        out = np.empty((bottom - top, right - left), np.uint8)
        return assemble(out, top, left, (self.tile_h, self.tile_w), lambda row, col: self._tile(row * self._cols + col))

    def _tile(self, index: int) -> np.ndarray:
        tile = self.cache.get((self._key, index))
        if tile is not None:
            return tile
        count = int(self._counts[index])
        # Opened for each tile the cache does not hold: a cohort of thousands of regions keeps no
        # file open between reads.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_ino != self._key[1]:
                raise MaskError(f"{self.path} was replaced while in use; re-run gigaseg-prepare")
            data = os.pread(fd, count, int(self._offsets[index]))
        finally:
            os.close(fd)
        try:
            if len(data) != count:
                raise ValueError(f"{len(data)} of its {count} bytes in the file")
            decoded, _, _ = self._decode(data, index)
            tile = np.asarray(decoded, np.uint8).reshape(self.tile_h, self.tile_w)
        except Exception as exc:  # noqa: BLE001 - tifffile and its codecs raise many kinds
            raise MaskError(f"{self.path}: tile {index} cannot be decoded ({exc}); re-run gigaseg-prepare") from exc
        if np.any((tile > TISSUE) & (tile != IGNORE)):
            value = int(tile[(tile > TISSUE) & (tile != IGNORE)][0])
            raise MaskError(f"{self.path} holds value {value}; a mask must hold 0 (background), 1 (tissue) "
                            "or 255 (ignore); re-run gigaseg-prepare")
        tile.setflags(write=False)
        self.cache.put((self._key, index), tile)
        return tile
