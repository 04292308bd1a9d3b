"""The small slide-reader interface every slide source implements.

Coordinates follow OpenSlide: ``location`` is (x, y) in level-0 pixels, ``size`` is
(width, height) in pixels of the requested level. Pixel arrays are returned as
height x width x 3 RGB uint8.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gigaseg.errors import RegionError

if TYPE_CHECKING:
    from gigaseg.slides.deepzoom import DeepZoomSource


@dataclass(frozen=True)
class LevelChoice:
    """A level picked for a requested resolution, and how far it is from it."""

    level: int
    downsample: float
    mpp: float | None


class SlideReader(abc.ABC):
    """A multi-resolution slide that can be read a rectangle at a time."""

    #: Human-readable name used in error messages (usually the file name).
    name: str = "<slide>"

    @property
    @abc.abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every level, level 0 first."""

    @property
    @abc.abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of every level relative to level 0."""

    @property
    @abc.abstractmethod
    def mpp(self) -> tuple[float, float] | None:
        """Microns per pixel (x, y) at level 0, or None when the slide does not say."""

    @property
    def objective_power(self) -> float | None:
        """Scanning magnification at level 0 (e.g. 20 or 40), or None when unknown."""
        return None

    @property
    def bounds_offset(self) -> tuple[int, int]:
        """Level-0 (x, y) of the scanned area's top-left corner, (0, 0) when the whole level is scanned.

        QuPath crops MRXS, Leica SCN and other slides whose scan lies inside a larger canvas to
        that area, so QuPath's (0, 0) is this point: subtract it from level-0 coordinates to get
        QuPath's, add it to QuPath's (GeoJSON annotations) to get ours.
        """
        return (0, 0)

    @abc.abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read an in-bounds rectangle; implementations need not validate arguments."""

    def close(self) -> None:
        """Release the slide's resources. Reading after close is an error."""

    def deep_zoom(self, tile_size: int = 254, overlap: int = 1) -> "DeepZoomSource":
        """Deep Zoom tiles of the whole of level 0 (``gigaseg.slides.deepzoom``), for viewers such as OpenSeadragon.

        Each tile is read with ``read_region`` from the nearest finer level, the coarsest levels
        from an overview read once. OpenSlide's own Deep Zoom generator was slower
        (benchmarks/README.md), so no reader overrides this.
        """
        from gigaseg.slides.deepzoom import RegionDeepZoom

        return RegionDeepZoom(self, tile_size, overlap)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read_region(
        self, location: Sequence[int], level: int, size: Sequence[int]
    ) -> np.ndarray:
        """Return the rectangle at ``location`` (level-0 x, y) of ``size`` (w, h) at ``level``.

        Only the requested pixels are materialised; read large regions tile by tile.
        """
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        self.check_region((x, y), level, (w, h))
        out = self._read((x, y), level, (w, h))
        if out.shape != (h, w, 3) or out.dtype != np.uint8:
            raise AssertionError(f"reader returned {out.shape} {out.dtype}, expected {(h, w, 3)} uint8")
        return out

    def check_region(self, location: Sequence[int], level: int, size: Sequence[int]) -> None:
        """Raise RegionError unless the rectangle is non-empty and inside the level."""
        if not 0 <= level < self.level_count:
            raise RegionError(
                f"{self.name}: level {level} does not exist (the slide has levels 0..{self.level_count - 1})"
            )
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            raise RegionError(f"{self.name}: region size {w}x{h} (w x h) is empty; give a positive width and height")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx, ly = x / ds, y / ds
        if x < 0 or y < 0 or lx + w > lw + 1e-6 or ly + h > lh + 1e-6:
            raise RegionError(
                f"{self.name}: region at level-0 (x={x}, y={y}) of {w}x{h} (w x h) at level {level} "
                f"lies outside the level ({lw}x{lh}); move or shrink it"
            )

    def level_mpp(self, level: int) -> float | None:
        """Mean microns per pixel at ``level``, or None when unknown."""
        if self.mpp is None:
            return None
        return float(np.mean(self.mpp)) * self.level_downsamples[level]

    def level_for_downsample(self, downsample: float) -> int:
        """The level whose downsample is closest to ``downsample`` without being coarser."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3):
                best = level
        return best

    def level_for_mpp(self, mpp: float) -> LevelChoice:
        """Pick the level whose resolution is closest to ``mpp`` (never coarser, within 1 %)."""
        if mpp <= 0 or not math.isfinite(mpp):
            raise RegionError(f"{self.name}: mpp must be a positive number, got {mpp}")
        if self.mpp is None:
            raise RegionError(
                f"{self.name}: the slide does not record microns per pixel; select the region by level instead"
            )
        base = float(np.mean(self.mpp))
        level = self.level_for_downsample(mpp / base)
        return LevelChoice(level, self.level_downsamples[level], self.level_mpp(level))

    def level_for_magnification(self, magnification: float) -> LevelChoice:
        """Pick the level closest to ``magnification`` (e.g. 10 for 10x), never lower."""
        if magnification <= 0:
            raise RegionError(f"{self.name}: magnification must be positive, got {magnification}")
        power = self.objective_power
        if power is None:
            if self.mpp is None:
                raise RegionError(
                    f"{self.name}: the slide records neither magnification nor microns per pixel; "
                    "select the region by level instead"
                )
            # The usual convention: 10x is about 1 micron per pixel.
            return self.level_for_mpp(10.0 / magnification)
        level = self.level_for_downsample(power / magnification)
        return LevelChoice(level, self.level_downsamples[level], self.level_mpp(level))
