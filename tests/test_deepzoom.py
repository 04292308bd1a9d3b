"""Deep Zoom tiles behind the slide reader interface: the grid is OpenSlide's and OpenSeadragon's, tiles match the slide."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES
from openslide.deepzoom import DeepZoomGenerator

from gigaseg.errors import RegionError
from gigaseg.slides import ArrayReader, open_slide
from gigaseg.slides.deepzoom import DeepZoomGrid, RegionDeepZoom

PROSTATE = FIXTURES / "prostate_he_pyramid.tiff"


@pytest.mark.parametrize("width, height", [(1, 1), (2500, 2500), (64000, 16000), (300, 250), (255, 1), (257, 513)])
def test_the_grid_is_openslides_deep_zoom_geometry(width, height):
    grid = DeepZoomGrid(width, height)
    # DeepZoomGenerator halves (rounding up) down to 1x1; so does the grid (compared with it on a slide below).
    sizes, size = [], (width, height)
    while True:
        sizes.append(size)
        if size == (1, 1):
            break
        size = (max(1, -(-size[0] // 2)), max(1, -(-size[1] // 2)))
    assert [grid.level_dimensions(k) for k in range(grid.level_count)] == sizes[::-1]
    top = grid.max_level
    cols, rows = grid.tile_count(top)
    last = grid.tile(top, cols - 1, rows - 1)
    assert last.box[2:] == (width, height) and last.full_box[2:] == (width, height)
    if cols > 1:
        assert grid.tile(top, 1, 0).box[0] == 253 and grid.tile(top, 0, 0).box[2] == 255


def test_tiles_are_openslides_deep_zoom_tiles_at_every_level():
    with open_slide(PROSTATE) as slide:
        deep_zoom = slide.deep_zoom()
        reference = DeepZoomGenerator(slide._slide, 254, 1, limit_bounds=False)
        grid = deep_zoom.grid
        assert [grid.level_dimensions(k) for k in range(grid.level_count)] == list(reference.level_dimensions)
        top = grid.max_level
        # Full size: the slide's own pixels, exactly.
        assert np.array_equal(deep_zoom.tile(top, 0, 0), np.asarray(reference.get_tile(top, (0, 0))))
        assert np.array_equal(deep_zoom.tile(top, 0, 0), slide.read_region((0, 0), 0, (255, 255)))
        # Reduced (box filter here, Lanczos there), and cut from the overview at the coarse levels.
        assert deep_zoom.overview_level == 11  # 2500 px: levels up to 1250 px a side
        for level in (top, top - 1, top - 2, top - 4, 4, 0):
            cols, rows = grid.tile_count(level)
            for col, row in ((0, 0), (cols - 1, rows - 1)):
                tile = deep_zoom.tile(level, col, row)
                theirs = np.asarray(reference.get_tile(level, (col, row)))
                assert tile.shape == grid.tile(level, col, row).size[::-1] + (3,) == theirs.shape
                assert np.abs(tile.astype(int) - theirs).mean() < 8, (level, col, row)


def test_coarse_levels_come_from_one_overview_like_the_slide_read_directly():
    with open_slide(PROSTATE) as slide:
        small = RegionDeepZoom(slide, overview_side=300)
        direct = RegionDeepZoom(slide, overview_side=0)
        assert (small.overview_level, direct.overview_level) == (8, 0)  # 157 px; 313 at level 9
        overview = small.overview()
        assert [o.shape[:2][::-1] for o in overview] == [small.grid.level_dimensions(k) for k in range(9)]
        for level in (8, 7, 5):
            cols, rows = small.grid.tile_count(level)
            for col, row in ((0, 0), (cols - 1, rows - 1)):
                ours, theirs = small.tile(level, col, row).astype(int), direct.tile(level, col, row)
                # Reduced twice (to the overview, then halved) against once: the same picture, a little smoother.
                assert np.abs(ours - theirs).mean() < 10
                assert np.abs(ours.mean(axis=(0, 1)) - theirs.mean(axis=(0, 1))).max() < 3


def test_any_reader_has_deep_zoom_tiles_and_missing_tiles_are_region_errors():
    image = np.random.default_rng(0).integers(0, 256, (300, 600, 3), dtype=np.uint8)
    deep_zoom = ArrayReader(image).deep_zoom()
    top = deep_zoom.grid.max_level
    assert np.array_equal(deep_zoom.tile(top, 1, 0), image[:255, 253:509])
    assert deep_zoom.tile(top - 1, 0, 0).shape == (150, 255, 3)
    with pytest.raises(RegionError, match="no tile"):
        deep_zoom.tile(top, 3, 0)
    with pytest.raises(RegionError, match="does not exist"):
        deep_zoom.tile(top + 1, 0, 0)
