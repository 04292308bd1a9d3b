"""A prepared region's pixels read on demand from its slide, a window at a time.

A 16000x64000 region decoded to a ``.npy`` file takes 3 GB, against a few hundred MB for the
JPEG tiles it came from; a cohort of fifty regions would fill a disk. So a prepared region
keeps only its label mask (compressed, :mod:`gigaseg.data.maskfile`) and a manifest, and the
training and validation passes read each tile's window straight from the slide file through
the slide reader. The window is the same as the one a decoded copy would give, because it is
read only where the reader returns the same pixel for the same level position whatever
rectangle asks for it: whole-level pixel positions of a level whose downsample is an integer
(:func:`reads_are_positional`). Elsewhere the region is decoded to ``image.npy`` at
preparation, as before.

Readers are opened lazily and shared through one small pool of open slides, so memory does
not grow with the number of regions in a cohort.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from gigaseg.slides.base import SlideReader

#: Open slides kept at once (each holds its own caches of decoded tiles).
POOL_SIZE = 4


def reads_are_positional(reader: SlideReader, x: int, y: int, level: int) -> bool:
    """Whether any window of a region at level-0 (x, y) reads the same pixels as the prepared whole would.

    True at pixel positions of a level whose downsample is a whole number, when the region
    starts on a level pixel: the reader then copies stored pixels without resampling.
    """
    ds = float(reader.level_downsamples[level])
    return ds.is_integer() and x % int(ds) == 0 and y % int(ds) == 0


class ReaderPool:
    """At most ``size`` open slide readers, least recently used closed first; safe across threads."""

    def __init__(self, opener: Callable[[Path], SlideReader], size: int = POOL_SIZE) -> None:
        self.opener = opener
        self.size = int(size)
        self._open: OrderedDict[tuple, SlideReader] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, path: Path, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        status = os.stat(path)
        # Open slides are found by the file's identity, not its name: a slide replaced at the same
        # path (generated again, restored) is opened anew, never read through the old handle.
        key = (str(path), status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)
        with self._lock:
            reader = self._open.get(key)
            if reader is None:
                reader = self.opener(path)
                self._open[key] = reader
                while len(self._open) > self.size:
                    _, old = self._open.popitem(last=False)
                    old.close()
            self._open.move_to_end(key)
            # Reading under the lock keeps a reader from being closed while in use; the training
            # reads one window at a time (one prefetch thread), so nothing waits for long.
            return reader.read_region(location, level, size)

    def close(self) -> None:
        with self._lock:
            while self._open:
                _, reader = self._open.popitem(last=False)
                reader.close()


def _default_opener(path: Path) -> SlideReader:
    from gigaseg.slides import open_slide

    return open_slide(path)


#: The pool every region shares unless given its own.
POOL = ReaderPool(_default_opener)


class LazyArray:
    """An array on disk read a rectangle at a time: ``a[top:bottom, left:right]`` returns a new C-ordered array.

    Has what the tile engine, the augmentation views and the plots ask of a region
    (``shape``, ``ndim``, ``dtype``, ``size``, ``len``, slices with any step, ``np.asarray``).
    Subclasses implement ``_read(top, left, bottom, right)`` for in-bounds rectangles.
    """

    #: Rows and columns read at once when a slice has a step (e.g. a downsampled picture).
    BLOCK = (1024, 4096)

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        raise NotImplementedError

    def _slices(self, key) -> tuple[slice, slice, tuple[int, ...]]:
        """Row and column slices of ``key``, and the axes an integer index drops."""
        key = key if isinstance(key, tuple) else (key,)
        whole = slice(None)
        if len(key) > self.ndim or any(k != whole for k in key[2:]):
            raise IndexError(f"{type(self).__name__} is read as [rows, columns] (whole channels), got {key!r}")
        key = key[:2] + (whole,) * (2 - len(key[:2]))
        slices, dropped = [], []
        for axis, (k, n) in enumerate(zip(key, self.shape[:2])):
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} is out of bounds for axis {axis} of size {n}")
                k = slice(i, i + 1)
                dropped.append(axis)
            elif not isinstance(k, slice):
                raise IndexError(f"{type(self).__name__} is read with slices or integers, got {key!r}")
            slices.append(k)
        return slices[0], slices[1], tuple(dropped)

    def __getitem__(self, key) -> np.ndarray:
        rows, cols, dropped = self._slices(key)
        (top, bottom, row_step), (left, right, col_step) = (
            k.indices(n) for k, n in zip((rows, cols), self.shape[:2]))
        if row_step < 0 or col_step < 0:
            raise IndexError(f"{type(self).__name__} is read with positive steps, got {key!r}")
        bottom, right = max(top, bottom), max(left, right)
        if row_step == col_step == 1:
            out = self._read(top, left, bottom, right)
        else:
            out = self._strided(top, left, bottom, right, row_step, col_step)
        return out.squeeze(axis=dropped) if dropped else out

    def _strided(self, top: int, left: int, bottom: int, right: int, row_step: int, col_step: int) -> np.ndarray:
        """Every step-th pixel, read a block at a time so that memory stays one block (e.g. a downsampled picture)."""
        out = np.empty((len(range(top, bottom, row_step)), len(range(left, right, col_step))) + self.shape[2:],
                       self.dtype)
        block_h = max(row_step, self.BLOCK[0] - self.BLOCK[0] % row_step)
        block_w = max(col_step, self.BLOCK[1] - self.BLOCK[1] % col_step)
        for r0 in range(top, bottom, block_h):
            r1 = min(bottom, r0 + block_h)
            for c0 in range(left, right, block_w):
                c1 = min(right, c0 + block_w)
                block = self._read(r0, c0, r1, c1)[::row_step, ::col_step]
                i, j = (r0 - top) // row_step, (c0 - left) // col_step
                out[i : i + block.shape[0], j : j + block.shape[1]] = block
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:, :]
        return whole if dtype is None else whole.astype(dtype, copy=False)


class SlideWindows(LazyArray):
    """A prepared region's H x W x 3 uint8 pixels, read from its slide file window by window.

    ``x``, ``y`` are the region's level-0 origin, ``read_size`` (w, h) the part inside the
    slide; the rest (right and bottom) is ``pad_value``, as preparation pads it.
    """

    def __init__(self, slide: str | os.PathLike, *, x: int, y: int, level: int, downsample: float,
                 size: tuple[int, int], read_size: tuple[int, int], pad_value: tuple[int, int, int],
                 pool: ReaderPool | None = None) -> None:
        if not float(downsample).is_integer():
            raise ValueError(f"windows are read from levels with a whole-number downsample, got {downsample}")
        self.slide = Path(slide)
        self.x, self.y, self.level, self.downsample = int(x), int(y), int(level), int(downsample)
        self.width, self.height = (int(v) for v in size)
        self.read_w, self.read_h = (int(v) for v in read_size)
        self.pad_value = np.asarray(pad_value, np.uint8)
        self.pool = pool if pool is not None else POOL
        self.shape = (self.height, self.width, 3)
        self.dtype = np.dtype(np.uint8)

    def __repr__(self) -> str:
        return (f"SlideWindows({self.slide.name}, level {self.level}, level-0 ({self.x}, {self.y}), "
                f"{self.width}x{self.height})")

    def _read(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        h, w = bottom - top, right - left
        in_h, in_w = max(0, min(bottom, self.read_h) - top), max(0, min(right, self.read_w) - left)
        if (in_h, in_w) == (h, w) and h and w:
            return self._slide(top, left, h, w)
        out = np.empty((h, w, 3), np.uint8)
        out[:] = self.pad_value
        if in_h and in_w:
            out[:in_h, :in_w] = self._slide(top, left, in_h, in_w)
        return out

    def _slide(self, top: int, left: int, h: int, w: int) -> np.ndarray:
        location = (self.x + left * self.downsample, self.y + top * self.downsample)
        return self.pool.read(self.slide, location, self.level, (w, h))
