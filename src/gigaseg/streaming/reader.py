"""Reading tile windows from (memory-mapped) regions, one tile ahead, without letting the region pile up in RSS.

A memory-mapped region keeps every page it has touched mapped into the process, so a pass
over a 16000x64000 region would end with its 4 GB of pixels counted in the resident set.
After copying a window we tell the kernel we are done with those rows (``MADV_DONTNEED``):
the pages stay in the page cache, a later read maps them again cheaply.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

try:
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:  # numpy < 2
    _byte_bounds = np.byte_bounds

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: reading still works, pages just stay mapped
    _madvise = None


def release_rows(array: np.ndarray, top: int, bottom: int) -> None:
    """Drop rows ``top:bottom`` of a shared memory map from this process's resident set.

    Only shared mappings (numpy modes 'r', 'r+', 'w+') are released: their pages live on in
    the page cache (and in the file). Copy-on-write maps ('c') and plain arrays are left alone.
    """
    if _madvise is None or not isinstance(array, np.memmap) or getattr(array, "mode", None) not in ("r", "r+", "w+"):
        return
    if bottom <= top:
        return
    low, high = _byte_bounds(array[top:bottom])
    start = low - low % _PAGE
    end = high + (-high) % _PAGE
    _madvise(start, end - start, _MADV_DONTNEED)


class WindowReader:
    """Copies tile windows of an image (and tile cores of a mask) into contiguous arrays.

    With ``blocks=f`` both come out in space-to-depth layout (``(h/f, w/f, f*f*c)``, see
    :func:`gigaseg.streaming.fastpath.to_blocks`), copied from the region in one go.
    """

    def __init__(self, image: np.ndarray, mask: np.ndarray | None = None, *, release: bool = True, blocks: int | None = None):
        self.image = image
        self.mask = mask
        self.release = release
        self.blocks = blocks

    def _copy(self, array: np.ndarray) -> np.ndarray:
        if self.blocks is None:
            return np.ascontiguousarray(array, dtype=np.uint8)
        from gigaseg.streaming.fastpath import to_blocks

        return to_blocks(array.astype(np.uint8, copy=False), self.blocks)

    def read(self, window: tuple[int, int, int, int], core: tuple[int, int, int, int] | None = None):
        top, left, bottom, right = window
        pixels = self._copy(self.image[top:bottom, left:right])
        labels = None
        if self.mask is not None and core is not None:
            ct, cl, cb, cr = core
            labels = self._copy(self.mask[ct:cb, cl:cr])
        if self.release:
            release_rows(self.image, top, bottom)
            if labels is not None:
                release_rows(self.mask, core[0], core[2])
        return pixels, labels


class Prefetcher:
    """Runs ``load(item)`` for the next item in a background thread while the caller works on the current one.

    ``wait_s`` adds up the time the caller spent blocked on a load, i.e. reading that the
    prefetch did not hide.
    """

    def __init__(self, load: Callable[[T], R], enabled: bool = True, workers: int = 1):
        self.load = load
        self.enabled = enabled
        # With several workers, that many items are loaded ahead (in order, concurrently).
        self.workers = max(1, int(workers))
        self.wait_s = 0.0

    def __call__(self, items: Iterable[T]) -> Iterator[tuple[T, R]]:
        items = list(items)
        if not items:
            return
        if not self.enabled:
            for item in items:
                start = time.perf_counter()
                data = self.load(item)
                self.wait_s += time.perf_counter() - start
                yield item, data
            return
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="gigaseg-prefetch") as pool:
            pending = deque((item, pool.submit(self.load, item)) for item in items[: self.workers])
            queued = len(pending)
            while pending:
                item, future = pending.popleft()
                start = time.perf_counter()
                data = future.result()
                self.wait_s += time.perf_counter() - start
                if queued < len(items):
                    pending.append((items[queued], pool.submit(self.load, items[queued])))
                    queued += 1
                yield item, data


def ordered_map(function: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``function(item)`` for every item, ``workers`` at a time in threads, yielded in the items' order.

    Items are pulled from ``items`` (in the caller's thread) only as workers free up, so a
    generator is never read far ahead. With one worker it runs in the caller's thread.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gigaseg-compute") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
