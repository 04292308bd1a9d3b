"""Tile plans: cores on a grid aligned to the total stride, windows = core + halo clipped at the region border.

Everything here is a pure function of a few integers, so plans are cheap to build and to
property-test. Coordinates are (row, column) in region pixels, half-open intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

from gigaseg.errors import RegionError


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


def as_tile_shape(tile_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Accept an int (square tiles) or a (height, width) pair."""
    if isinstance(tile_size, int):
        return tile_size, tile_size
    th, tw = (int(v) for v in tile_size)
    return th, tw


def check_region_shape(region_shape: tuple[int, int], total_stride: int) -> None:
    """Raise RegionShapeError unless both region dimensions are positive multiples of the total stride."""
    h, w = region_shape
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
    if total_stride <= 0:
        raise ValueError(f"total_stride must be positive, got {total_stride}")
    region_shape = (int(region_shape[0]), int(region_shape[1]))
    check_region_shape(region_shape, total_stride)
    th, tw = as_tile_shape(tile_size)
    for name, v in (("tile height", th), ("tile width", tw)):
        if v <= 0 or v % total_stride:
            raise RegionShapeError(f"{name} {v} is not a positive multiple of the total stride {total_stride}")
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
