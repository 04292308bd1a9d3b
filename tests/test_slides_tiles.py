"""Tiles decoded straight from tiled TIFF files (``gigaseg.slides.tiff_tiles``) give OpenSlide's pixels exactly."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from gigaseg.errors import SlideError
from gigaseg.slides import OpenSlideReader, open_slide
from gigaseg.slides.tiff_tiles import TiffTiles, densest_tile

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PROSTATE = FIXTURES / "prostate_he_pyramid.tiff"
OS_FIXTURES = FIXTURES / "openslide"


def _random_regions(slide, level, count, rng):
    """Level-0 locations and sizes of random in-level rectangles, edges and corners included."""
    width, height = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    out = [((0, 0), (width, height)), ((round((width - 1) * ds), round((height - 1) * ds)), (1, 1))]
    for _ in range(count):
        w = int(rng.integers(1, min(width, 600) + 1))
        h = int(rng.integers(1, min(height, 600) + 1))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        out.append(((round(x * ds), round(y * ds)), (w, h)))
    return out


@pytest.mark.parametrize(
    "path, direct_levels",
    [
        (PROSTATE, [0, 1, 2]),  # JPEG, YCbCr 4:2:0, 128x128 tiles; levels 3-5 have fractional downsamples
        (OS_FIXTURES / "boxes.tiff", [0, 1]),  # deflate RGB, 64x64 tiles, edge tiles cut by the image
        (OS_FIXTURES / "small.svs", [0]),  # Aperio JPEG, RGB
    ],
)
def test_direct_reads_equal_openslide_reads_at_every_level(path, direct_levels):
    rng = np.random.default_rng(0)
    with open_slide(path) as fast, OpenSlideReader(path, direct_tiles=False) as slow:
        assert fast._tiles is not None and slow._tiles is None
        for level in range(fast.level_count):
            for location, size in _random_regions(fast, level, 25, rng):
                try:
                    expected = slow.read_region(location, level, size)
                except Exception:  # a rounded location past the level's edge: not a valid region
                    continue
                np.testing.assert_array_equal(fast.read_region(location, level, size), expected)
        # The direct path was taken, and checked against OpenSlide, at the integer-downsample levels.
        levels = fast._tiles._levels
        assert [lv.checked and lv.usable for lv in levels][: max(direct_levels) + 1] == [
            i in direct_levels for i in range(max(direct_levels) + 1)
        ]


def test_a_level_whose_tiles_decode_differently_is_left_to_openslide():
    with open_slide(PROSTATE) as slide:
        tiles = slide._tiles
        level = tiles._levels[0]

        def different(x, y, w, h):  # OpenSlide's pixels, one value changed
            pixels = slide._direct_reference(0)(x, y, w, h)
            pixels[0, 0, 0] ^= 1
            return pixels

        assert tiles.read(0, 0, 0, 10, 10, different) is None
        assert level.checked and not level.usable
        # The reader then reads that level through OpenSlide, and still gets OpenSlide's pixels.
        with OpenSlideReader(PROSTATE, direct_tiles=False) as slow:
            np.testing.assert_array_equal(slide.read_region((5, 7), 0, (300, 200)), slow.read_region((5, 7), 0, (300, 200)))
        # Another level is unaffected.
        assert tiles.read(1, 0, 0, 10, 10, slide._direct_reference(1)) is not None


def _write_pyramid_with_a_dense_corner(path: Path) -> None:
    """A two-level deflate pyramid of 64x64 tiles (4x3 at level 0): blank glass, a smooth tile
    at the bottom left and a noisy one, the densest, at the top right, far from the middle."""
    import tifffile

    image = np.full((192, 256, 3), 236, np.uint8)
    image[128:, :64] = (np.arange(64, dtype=np.uint8) * 3)[:, None, None]
    image[:64, 192:] = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(64, 64), compression="zlib", photometric="rgb")
        # OpenSlide takes a page as a level only when marked as a reduced image.
        tif.write(image[::2, ::2], tile=(64, 64), compression="zlib", photometric="rgb", subfiletype=1)


def test_densest_tile_is_the_one_with_the_most_bytes_first_of_equals():
    assert densest_tile([10, 700, 30, 700, 5]) == 1
    assert densest_tile(np.array([3], np.int64)) == 0


def test_a_level_is_checked_on_its_densest_tile_not_its_middle_one(tmp_path):
    import tifffile

    path = tmp_path / "dense_corner.tiff"
    _write_pyramid_with_a_dense_corner(path)
    with tifffile.TiffFile(path) as tif:
        counts = list(tif.pages[0].databytecounts)
    middle = (192 // 2 // 64) * 4 + (256 // 2 // 64)
    assert counts.index(max(counts)) == 3 != middle  # the generated file is what this test needs
    with open_slide(path) as slide, OpenSlideReader(path, direct_tiles=False) as slow:
        assert slide.vendor == "generic-tiff" and slide._tiles is not None
        asked = []

        def recording(x, y, w, h):  # OpenSlide's pixels, noting which ones the check compared
            asked.append((x, y, w, h))
            return slide._direct_reference(0)(x, y, w, h)

        pixels = slide._tiles.read(0, 0, 0, 256, 192, recording)
        assert asked == [(192, 0, 64, 64)]  # the top-right tile: the one with the most bytes
        assert slide._tiles._levels[0].usable
        np.testing.assert_array_equal(pixels, slow.read_region((0, 0), 0, (256, 192)))


def test_a_level_whose_densest_tile_decodes_differently_is_refused(tmp_path):
    path = tmp_path / "dense_corner.tiff"
    _write_pyramid_with_a_dense_corner(path)
    with open_slide(path) as slide, OpenSlideReader(path, direct_tiles=False) as slow:
        asked = []

        def different(x, y, w, h):  # OpenSlide's pixels with one value changed in the last pixel
            asked.append((x, y))
            pixels = slide._direct_reference(0)(x, y, w, h)
            pixels[-1, -1, 2] ^= 1
            return pixels

        assert slide._tiles.read(0, 0, 0, 10, 10, different) is None
        assert asked == [(192, 0)] and not slide._tiles._levels[0].usable
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (256, 192)), slow.read_region((0, 0), 0, (256, 192)))
        assert slide._tiles.read(1, 0, 0, 10, 10, slide._direct_reference(1)) is not None  # level 1 is unaffected


def test_files_tifffile_cannot_map_are_read_by_openslide():
    assert TiffTiles.open(OS_FIXTURES / "boxes_0.dcm", "dicom", [(16, 16)]) is None
    assert TiffTiles.open(PROSTATE, "hamamatsu", [(2500, 2500)]) is None  # only plain tiled-TIFF vendors
    # No tiled page of the level's size: nothing to decode.
    assert TiffTiles.open(PROSTATE, "generic-tiff", [(2501, 2500)]) is None


def test_corrupt_tiles_still_raise_openslides_error():
    with open_slide(OS_FIXTURES / "unreadable.svs") as slide:
        assert slide._tiles is not None
        with pytest.raises(SlideError, match="unreadable.svs"):
            slide.read_region((0, 0), 0, (16, 16))


def test_concurrent_reads_and_a_small_cache_give_the_same_pixels():
    with open_slide(PROSTATE) as slide, OpenSlideReader(PROSTATE, direct_tiles=False) as slow:
        slide._tiles.cache_limit = 3 * 128 * 128 * 3  # three tiles: constant eviction
        rng = np.random.default_rng(1)
        regions = _random_regions(slide, 0, 40, rng)
        expected = [slow.read_region(loc, 0, size) for loc, size in regions]
        failures = []

        def work(order):
            for i in order:
                if not np.array_equal(slide.read_region(regions[i][0], 0, regions[i][1]), expected[i]):
                    failures.append(i)

        threads = [threading.Thread(target=work, args=(rng.permutation(len(regions)),)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        assert slide._tiles._cache_bytes <= slide._tiles.cache_limit


def test_a_corrupt_tile_where_the_level_is_checked_spoils_only_that_tile(tmp_path):
    import shutil

    import tifffile

    path = tmp_path / "prostate_corrupt_middle.tiff"
    shutil.copy(PROSTATE, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        cols = -(-page.imagewidth // page.tilewidth)
        index = densest_tile(page.databytecounts)  # the tile the first read of level 0 is checked on
        ty, tx = divmod(index, cols)
        offset, tile = page.dataoffsets[index], (tx * page.tilewidth, ty * page.tilelength)
    with open(path, "r+b") as f:  # no JPEG start-of-image marker: both decoders refuse the tile
        f.seek(offset)
        f.write(b"\0" * 16)
    with open_slide(path) as slide, OpenSlideReader(PROSTATE, direct_tiles=False) as good:
        # Every other region still reads, through OpenSlide, with the right pixels.
        for _ in range(2):
            np.testing.assert_array_equal(slide.read_region((0, 0), 0, (300, 200)), good.read_region((0, 0), 0, (300, 200)))
        level = slide._tiles._levels[0]
        assert level.checked and not level.usable
        with pytest.raises(SlideError, match="prostate_corrupt_middle.tiff"):
            slide.read_region(tile, 0, (64, 64))
        np.testing.assert_array_equal(slide.read_region((0, 0), 1, (300, 200)), good.read_region((0, 0), 1, (300, 200)))


def test_a_file_truncated_under_an_open_slide_still_raises_openslides_error(tmp_path):
    import shutil

    import tifffile

    path = tmp_path / "prostate_truncated.tiff"
    shutil.copy(PROSTATE, path)
    with tifffile.TiffFile(PROSTATE) as tif:
        page = tif.pages[0]
        # Cut the file in the middle of level 0's last tile (bottom right), and everything after it.
        cut = int(page.dataoffsets[-1]) + int(page.databytecounts[-1]) // 2
    with open_slide(path) as slide, OpenSlideReader(PROSTATE, direct_tiles=False) as good:
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (300, 200)), good.read_region((0, 0), 0, (300, 200)))
        assert slide._tiles._levels[0].usable
        os.truncate(path, cut)
        with pytest.raises(SlideError, match="prostate_truncated.tiff"):
            slide.read_region((2500 - 100, 2500 - 100), 0, (100, 100))
        with pytest.raises(ValueError, match="bytes in the file"):
            slide._tiles._tile(0, slide._tiles._levels[0], len(page.dataoffsets) - 1)
