"""A training step's region written once to scratch files, so that the tiled step's passes read plain memory maps.

The tiled step reads every tile window twice (its two passes), each with its halo; a window
of a prepared region is decoded from the slide's JPEG tiles, and a window of an augmented
region is also turned and recoloured. Writing the step's region once, band by band, into a
``.npy`` file and its mask beside it makes that work happen once per step; the passes then
copy pages the kernel keeps cached. The files hold exactly the pixels the views give, so the
step's numbers do not change. Memory stays one band; the disk holds the largest region once
(4 bytes a pixel: 4 GB for a 16000x64000 region).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from gigaseg.data.tilefile import create_npy

#: Bytes of pixels copied at once.
BAND_BYTES = 16 * 2**20


def _write(path: Path, source, dtype=np.uint8) -> np.memmap:
    height, width = (int(v) for v in source.shape[:2])
    channels = tuple(int(v) for v in source.shape[2:])
    row_bytes = width * int(np.prod(channels, dtype=np.int64))
    rows = max(1, BAND_BYTES // max(1, row_bytes))
    with create_npy(path, (height, width) + channels, dtype) as out:
        for top in range(0, height, rows):
            out.write(top, 0, source[top : top + rows, :])
    return np.load(path, mmap_mode="r", allow_pickle=False)


class StepStaging:
    """Scratch files for one region at a time in ``folder`` (a new temporary folder by default); a context manager."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self._own = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="gigaseg-step-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

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
        image = image if isinstance(image, np.ndarray) else _write(self.folder / "image.npy", image)
        if mask is not None and not isinstance(mask, np.ndarray):
            mask = _write(self.folder / "mask.npy", mask)
        return image, mask
