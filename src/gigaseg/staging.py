"""A training step's region written once to scratch files, so that the tiled step's passes read plain memory maps.

The tiled step reads every tile window twice (its two passes), each with its halo; a window
of a prepared region is decoded from the slide's JPEG tiles, and a window of an augmented
region is also turned and recoloured. Writing the step's region once, band by band, into a
``.npy`` file and its mask beside it makes that work happen once per step; the passes then
copy pages the kernel keeps cached. The files hold exactly the pixels the views give, so the
step's numbers do not change. Memory stays one band of rows; the disk (``$TMPDIR``) holds the
largest region once, 4 bytes a pixel. A region of up to ``IN_MEMORY_BYTES`` (64 Mpx) is
staged into memory instead, which spares the file writes and the page faults of the maps.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gigaseg.data.tilefile import create_npy
from gigaseg.errors import WriteError

#: Bytes of the band of whole rows written at once (one write call), and the widest piece of a
#: band read at once: a turned view reads its source across rows, which stays in the CPU's
#: caches for a narrow piece and not for a whole band.
BAND_BYTES = 16 * 2**20
PIECE = 1024
#: Regions of at most this many bytes (3 a pixel for RGB, 1 for the mask) are staged in memory.
IN_MEMORY_BYTES = 256 * 2**20


def _fill(out: np.ndarray, source) -> np.ndarray:
    """``out[:] = source`` band by band, each band's pieces on every core (as :func:`_write`, into memory)."""
    height, width = out.shape[:2]
    row_bytes = out[:1].nbytes
    rows = max(16, min(256, BAND_BYTES // max(1, row_bytes)))

    def copy(top: int, h: int, left: int) -> None:
        out[top : top + h, left : left + PIECE] = source[top : top + h, left : left + PIECE]

    with ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="gigaseg-staging") as pool:
        for top in range(0, height, rows):
            h = min(rows, height - top)
            list(pool.map(lambda left: copy(top, h, left), range(0, width, PIECE)))
    return out


def _write(path: Path, source, dtype=np.uint8) -> np.memmap:
    height, width = (int(v) for v in source.shape[:2])
    channels = tuple(int(v) for v in source.shape[2:])
    row_bytes = width * int(np.prod(channels, dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = max(16, min(256, BAND_BYTES // max(1, row_bytes)))
    band = np.empty((rows, width) + channels, dtype)

    def copy(top: int, h: int, left: int) -> None:
        band[:h, left : left + PIECE] = source[top : top + h, left : left + PIECE]

    # The pieces of a band on every core: the views' loops and copies release the GIL, and
    # between steps the cores would otherwise wait for this one thread.
    with create_npy(path, (height, width) + channels, dtype) as out, \
            ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="gigaseg-staging") as pool:
        for top in range(0, height, rows):
            h = min(rows, height - top)
            list(pool.map(lambda left: copy(top, h, left), range(0, width, PIECE)))
            out.write(top, 0, band[:h])
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class StepStaging:
    """Scratch files for one region at a time in ``folder`` (a new folder in ``$TMPDIR`` by default); a context manager.

    ``largest`` (height, width) is the largest region to be staged: if the folder's disk has
    not room for it, this fails at once rather than in the middle of a run. A region of at
    most ``in_memory`` bytes (RGB and mask) is staged into memory instead, into buffers kept
    from one call to the next: what a call returns is valid until the next call.
    """

    def __init__(self, folder: str | Path | None = None, *, largest: tuple[int, int] | None = None,
                 in_memory: int = IN_MEMORY_BYTES) -> None:
        self.in_memory = int(in_memory)
        self._buffers: dict[str, np.ndarray] = {}
        self._own = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="gigaseg-step-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if largest is not None:
            needed = 4 * int(largest[0]) * int(largest[1])  # RGB pixels and a mask byte
            free = shutil.disk_usage(self.folder).free
            if free < needed * 1.05:
                self.close()
                raise WriteError(
                    f"the training step's scratch files need {needed / 2**30:.1f} GB in {self.folder.parent}, which has "
                    f"{free / 2**30:.1f} GB free; set TMPDIR to a folder on a disk with room")

    def __enter__(self) -> "StepStaging":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __call__(self, image, mask=None):
        """``image`` and ``mask`` as read-only memory maps; arrays (and memory maps) pass through unchanged."""
        if isinstance(image, np.ndarray) and (mask is None or isinstance(mask, np.ndarray)):
            return image, mask
        height, width = (int(v) for v in image.shape[:2])
        if 4 * height * width <= self.in_memory:
            stage = self._in_memory
        else:
            self._buffers.clear()
            stage = self._on_disk
        image = image if isinstance(image, np.ndarray) else stage("image", image)
        if mask is not None and not isinstance(mask, np.ndarray):
            mask = stage("mask", mask)
        return image, mask

    def _on_disk(self, name: str, source) -> np.memmap:
        return _write(self.folder / f"{name}.npy", source)

    def _in_memory(self, name: str, source) -> np.ndarray:
        shape = tuple(int(v) for v in source.shape)
        size = int(np.prod(shape, dtype=np.int64))
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[name] = np.empty(size, np.uint8)
        return _fill(buffer[:size].reshape(shape), source)
