"""Row-major arrays on disk written and read a tile at a time with pwrite/pread.

Memory-mapping a gigapixel array and writing through the map makes every touched page
count towards the process's resident memory; plain positioned reads and writes keep the
footprint to one tile whatever the size of the array.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class TileFile:
    """A C-ordered array of ``shape`` and ``dtype`` stored at byte ``offset`` of ``path``.

    The file must already exist and be large enough (``create_npy`` or ``create_raw``
    make one). Use as a context manager, or call ``close``.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: np.dtype | str, offset: int = 0,
                 *, writable: bool = True) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.offset = int(offset)
        # Bytes of one pixel (all trailing dimensions) and of one full row.
        self._pixel = self.dtype.itemsize * int(np.prod(self.shape[2:], dtype=np.int64))
        self._row = self._pixel * self.shape[1]
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    def __enter__(self) -> "TileFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def sync(self) -> None:
        """Flush the written data to the disk (before an atomic rename)."""
        os.fsync(self._fd)

    def _start(self, row: int, col: int) -> int:
        return self.offset + row * self._row + col * self._pixel

    def write(self, row: int, col: int, tile: np.ndarray) -> None:
        """Write ``tile`` (h x w x ...) with its top-left pixel at (row, col)."""
        tile = np.ascontiguousarray(tile, dtype=self.dtype)
        h, w = tile.shape[:2]
        if tile.shape[2:] != self.shape[2:] or row + h > self.shape[0] or col + w > self.shape[1]:
            raise ValueError(f"tile {tile.shape} at ({row}, {col}) does not fit array {self.shape}")
        if w == self.shape[1]:
            os.pwrite(self._fd, tile.tobytes(), self._start(row, 0))
            return
        for i in range(h):
            os.pwrite(self._fd, tile[i].tobytes(), self._start(row + i, col))

    def read(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Read the height x width tile whose top-left pixel is (row, col) into a new array."""
        out = np.empty((height, width) + self.shape[2:], dtype=self.dtype)
        if width == self.shape[1]:
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(
                _pread_all(self._fd, out.nbytes, self._start(row, 0)), dtype=np.uint8
            )
            return out
        flat = out.reshape(height, -1).view(np.uint8)
        n = width * self._pixel
        for i in range(height):
            flat[i] = np.frombuffer(_pread_all(self._fd, n, self._start(row + i, col)), dtype=np.uint8)
        return out


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:  # pread may return short counts on very large requests
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            raise OSError(f"unexpected end of file reading {n} bytes at offset {offset}")
        data += more
    return data


def create_npy(path: str | Path, shape: tuple[int, ...], dtype: np.dtype | str = np.uint8) -> TileFile:
    """Create a ``.npy`` file of ``shape`` with ``np.lib.format.open_memmap`` and open it for tile writes."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
    offset = int(mm.offset)
    del mm  # the map is only used to lay out the header; writes go through pwrite
    return TileFile(path, shape, dtype, offset)


def create_raw(path: str | Path, shape: tuple[int, ...], dtype: np.dtype | str = np.uint8) -> TileFile:
    """Create a headerless scratch file of ``shape`` (sparse until written) and open it."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return TileFile(path, shape, dtype, 0)


def tiles(height: int, width: int, tile_size: int):
    """Yield (row, col, h, w) of the tiles covering a height x width array, row by row."""
    for row in range(0, height, tile_size):
        for col in range(0, width, tile_size):
            yield row, col, min(tile_size, height - row), min(tile_size, width - col)
