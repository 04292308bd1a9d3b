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


def test_openslide_tiles_are_the_slides_pixels_at_every_level():
    with open_slide(PROSTATE) as slide:
        deep_zoom = slide.deep_zoom()
        generic = RegionDeepZoom(slide)
        reference = DeepZoomGenerator(slide._slide, 254, 1, limit_bounds=False)
        assert [deep_zoom.grid.level_dimensions(k) for k in range(deep_zoom.grid.level_count)] == list(reference.level_dimensions)
        for level in (deep_zoom.grid.max_level, deep_zoom.grid.max_level - 2, 4):
            cols, rows = deep_zoom.grid.tile_count(level)
            for col, row in ((0, 0), (cols - 1, rows - 1)):
                tile = deep_zoom.tile(level, col, row)
                assert tile.shape == deep_zoom.grid.tile(level, col, row).size[::-1] + (3,)
                assert np.array_equal(tile, np.asarray(reference.get_tile(level, (col, row))))
                # Read through read_region and resized instead: the same picture.
                assert np.abs(tile.astype(int) - generic.tile(level, col, row)).mean() < 6
        full = slide.read_region((0, 0), 0, (255, 255))
        assert np.array_equal(deep_zoom.tile(deep_zoom.grid.max_level, 0, 0), full)


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
