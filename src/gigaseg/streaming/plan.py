"""Tile plans: cores on a grid aligned to the total stride, windows = core + halo clipped at the region border.

Everything here is a pure function of a few integers, so plans are cheap to build and to
property-test. Coordinates are (row, column) in region pixels, half-open intervals.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from gigaseg.errors import ConfigError, RegionError


class RegionShapeError(RegionError, ValueError):
    """A region (or tile) size does not fit the model's total stride."""


@dataclass(frozen=True)
class Tile:
    """One tile: the core whose outputs it contributes, and the window it reads.

    ``core`` and ``window`` are ``(top, left, bottom, right)`` in region pixels; the core
    lies inside the window at offset ``(core[0] - window[0], core[1] - window[1])``.
    """

    index: int
    row: int
    col: int
    core: tuple[int, int, int, int]
    window: tuple[int, int, int, int]

    @property
    def core_offset(self) -> tuple[int, int]:
        """Top-left of the core inside the window."""
        return self.core[0] - self.window[0], self.core[1] - self.window[1]

    @property
    def core_shape(self) -> tuple[int, int]:
        return self.core[2] - self.core[0], self.core[3] - self.core[1]

    @property
    def window_shape(self) -> tuple[int, int]:
        return self.window[2] - self.window[0], self.window[3] - self.window[1]


@dataclass(frozen=True)
class TilePlan:
    """All tiles of a region, in row-major order (rows of tiles share their image rows)."""

    region_shape: tuple[int, int]
    tile_shape: tuple[int, int]
    halo: int
    total_stride: int
    tiles: tuple[Tile, ...]

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self):
        return iter(self.tiles)

    @property
    def grid(self) -> tuple[int, int]:
        """Number of tile rows and columns."""
        return _count(self.region_shape[0], self.tile_shape[0]), _count(self.region_shape[1], self.tile_shape[1])

    @property
    def window_pixels(self) -> int:
        """Pixels read and computed over all windows (region pixels plus halo recomputation)."""
        return sum(t.window_shape[0] * t.window_shape[1] for t in self.tiles)

    @property
    def max_window_shape(self) -> tuple[int, int]:
        return max(t.window_shape[0] for t in self.tiles), max(t.window_shape[1] for t in self.tiles)


def _count(size: int, tile: int) -> int:
    return -(-size // tile)


def tile_below_halo(tile: str, halo: int, unit: int) -> ConfigError:
    """The error for a tile smaller than the model's halo: ``tile`` as the user gave it, a fix in multiples of ``unit``."""
    fix = -(-halo // unit) * unit
    return ConfigError(
        f"tile_size {tile} is smaller than the model's halo {halo}: every tile would read and compute "
        f"more halo than tile; use tile_size={fix} or more"
    )


def _pixels(value, what: str) -> int:
    """``value`` as a Python int, or RegionShapeError if it is not an integer (bools and floats included)."""
    if isinstance(value, bool):
        raise RegionShapeError(f"{what} must be an integer number of pixels, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise RegionShapeError(f"{what} must be an integer number of pixels, got {value!r}") from None


def _check_stride(total_stride) -> int:
    stride = _pixels(total_stride, "the total stride")
    if stride <= 0:
        raise RegionShapeError(f"the total stride must be a positive integer, got {total_stride!r}")
    return stride


def _pair(value, what: str, expected: str = "a (height, width) pair of integers") -> tuple[int, int]:
    """A (height, width) pair of ints from any two-element sequence (tuple, list, array, Hydra list)."""
    try:
        values = None if isinstance(value, (str, bytes)) else list(value)
    except TypeError:
        values = None
    if values is None or len(values) != 2:
        raise RegionShapeError(f"{what} must be {expected}, got {value!r}")
    return _pixels(values[0], f"{what} height"), _pixels(values[1], f"{what} width")


def as_tile_shape(tile_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Accept an int (square tiles) or a (height, width) pair; RegionShapeError for anything else."""
    if not isinstance(tile_size, bool):
        try:
            side = operator.index(tile_size)  # int and NumPy integers
        except TypeError:
            pass
        else:
            return side, side
    return _pair(tile_size, "tile_size", "an integer or a (height, width) pair of integers")


def check_tile_shape(tile_size: int | tuple[int, int] | list[int], total_stride: int) -> tuple[int, int]:
    """The (height, width) of ``tile_size``, or RegionShapeError unless both are positive multiples of the total stride."""
    stride = _check_stride(total_stride)
    th, tw = as_tile_shape(tile_size)
    for name, v in (("tile height", th), ("tile width", tw)):
        if v <= 0 or v % stride:
            suggestion = max(stride, v - v % stride)
            raise RegionShapeError(
                f"{name} {v} is not a positive multiple of the total stride {stride}; use a multiple such as {suggestion}"
            )
    return th, tw


def check_region_shape(region_shape: tuple[int, int], total_stride: int) -> None:
    """Raise RegionShapeError unless both region dimensions are positive multiples of the total stride."""
    total_stride = _check_stride(total_stride)
    h, w = _pair(region_shape, "region shape")
    if h <= 0 or w <= 0 or h % total_stride or w % total_stride:
        fit_h, fit_w = (max(total_stride, v - v % total_stride) for v in (h, w))
        raise RegionShapeError(
            f"region of {h}x{w} pixels is not a multiple of the model's total stride {total_stride} "
            f"in both dimensions; crop it to {fit_h}x{fit_w} (or pad it) so strided layers see the same "
            "positions in every tile"
        )


def plan_tiles(
    region_shape: tuple[int, int], tile_size: int | tuple[int, int], halo: int, total_stride: int
) -> TilePlan:
    """Cover the region with tiles whose cores partition it exactly once.

    Core origins lie on multiples of ``tile_size`` (itself a multiple of the total stride);
    the last row and column of cores may be smaller, still multiples of the stride because
    the region is. Each window is the core grown by ``halo`` on every side, clipped at the
    region border, where the model's own padding is the same as for the whole region.
    """
    total_stride = _check_stride(total_stride)
    check_region_shape(region_shape, total_stride)
    region_shape = _pair(region_shape, "region shape")
    th, tw = check_tile_shape(tile_size, total_stride)
    halo = _pixels(halo, "halo")
    if halo < 0 or halo % total_stride:
        raise RegionShapeError(f"halo {halo} is not a non-negative multiple of the total stride {total_stride}")
    h, w = region_shape
    # A tile larger than the region is just the region.
    th, tw = min(th, h), min(tw, w)
    tiles = []
    for row, top in enumerate(range(0, h, th)):
        bottom = min(top + th, h)
        for col, left in enumerate(range(0, w, tw)):
            right = min(left + tw, w)
            window = (max(top - halo, 0), max(left - halo, 0), min(bottom + halo, h), min(right + halo, w))
            tiles.append(Tile(len(tiles), row, col, (top, left, bottom, right), window))
    return TilePlan(region_shape, (th, tw), halo, total_stride, tuple(tiles))
