"""An in-memory slide: a pyramid of numpy arrays behind the SlideReader interface (for tests)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gigaseg.errors import SlideError
from gigaseg.slides.base import SlideReader


class ArrayReader(SlideReader):
    """A slide made of RGB uint8 arrays, one per level (level 0 first).

    With a single array, coarser levels are made by 2x block averaging, ``levels`` of them
    in all. ``mpp`` is the level-0 resolution in microns per pixel, if known.
    """

    def __init__(
        self,
        image: np.ndarray | Sequence[np.ndarray],
        *,
        levels: int = 1,
        mpp: float | tuple[float, float] | None = None,
        objective_power: float | None = None,
        name: str = "<array>",
    ) -> None:
        if isinstance(image, np.ndarray):
            pyramid = [image]
            for _ in range(levels - 1):
                prev = pyramid[-1]
                h, w = prev.shape[0] // 2, prev.shape[1] // 2
                if h == 0 or w == 0:
                    break
                block = prev[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).astype(np.float32)
                pyramid.append(np.round(block.mean(axis=(1, 3))).astype(np.uint8))
        else:
            pyramid = list(image)
        for level, arr in enumerate(pyramid):
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise SlideError(f"{name}: level {level} must be an H x W x 3 uint8 array, got {arr.shape} {arr.dtype}")
        self._levels = pyramid
        self._mpp = None if mpp is None else (tuple(mpp) if not np.isscalar(mpp) else (float(mpp), float(mpp)))
        self._power = objective_power
        self._closed = False
        self.name = name

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((a.shape[1], a.shape[0]) for a in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        w0 = self._levels[0].shape[1]
        h0 = self._levels[0].shape[0]
        return tuple((w0 / a.shape[1] + h0 / a.shape[0]) / 2 for a in self._levels)

    @property
    def mpp(self) -> tuple[float, float] | None:
        return self._mpp

    @property
    def objective_power(self) -> float | None:
        return self._power

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if self._closed:
            raise SlideError(f"{self.name}: the slide is closed")
        ds = self.level_downsamples[level]
        x = int(round(location[0] / ds))
        y = int(round(location[1] / ds))
        w, h = size
        return np.array(self._levels[level][y : y + h, x : x + w], copy=True)

    def close(self) -> None:
        self._closed = True
