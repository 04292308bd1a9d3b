"""Slide readers: OpenSlideReader on real fixtures, level/mpp/magnification choice, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest

from gigaseg.errors import RegionError, SlideError
from gigaseg.slides import ArrayReader, OpenSlideReader, SlideReader, open_slide

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PROSTATE = FIXTURES / "prostate_he_pyramid.tiff"
OS_FIXTURES = FIXTURES / "openslide"


def test_open_slide_returns_openslide_reader_for_the_prostate_pyramid():
    with open_slide(PROSTATE) as slide:
        assert isinstance(slide, OpenSlideReader)
        assert isinstance(slide, SlideReader)
        assert slide.vendor == "generic-tiff"
        assert slide.level_count == 6
        assert slide.dimensions == (2500, 2500)
        assert slide.level_dimensions[-1] == (78, 78)
        assert slide.level_downsamples[:3] == (1.0, 2.0, 4.0)


def test_prostate_pixels_match_openslide_and_are_rgb_uint8():
    with open_slide(PROSTATE) as slide:
        region = slide.read_region((1000, 1200), 0, (300, 200))
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        raw = openslide.OpenSlide(str(PROSTATE))
        expected = np.asarray(raw.read_region((1000, 1200), 0, (300, 200)))[..., :3]
        raw.close()
        np.testing.assert_array_equal(region, expected)
        # Real H&E: pinkish-purple tissue (red > green) and some white lumen.
        coarse = slide.read_region((0, 0), 3, slide.level_dimensions[3]).reshape(-1, 3).astype(int)
        tissue = coarse[coarse.sum(axis=1) < 600]
        assert tissue.shape[0] > 0.3 * coarse.shape[0]
        assert tissue[:, 0].mean() > tissue[:, 1].mean() + 20


def test_bogus_resolution_tags_give_no_mpp():
    # The prostate TIFF says ~896 um/px and boxes.tiff 72 dpi (~353 um/px): not scans.
    for path in (PROSTATE, OS_FIXTURES / "boxes.tiff"):
        raw = openslide.OpenSlide(str(path))
        assert float(raw.properties["openslide.mpp-x"]) > 100
        raw.close()
        with open_slide(path) as slide:
            assert slide.mpp is None
            assert slide.objective_power is None
            with pytest.raises(RegionError, match="does not record microns per pixel"):
                slide.level_for_mpp(1.0)


@pytest.mark.parametrize("name", ["small.svs", "boxes_0.dcm", "boxes_1.dcm"])
def test_small_real_slides_report_mpp_power_and_read(name):
    with open_slide(OS_FIXTURES / name) as slide:
        assert slide.dimensions == (16, 16)
        assert slide.mpp == pytest.approx((0.499, 0.499))
        assert slide.objective_power == 20
        pixels = slide.read_region((0, 0), 0, (16, 16))
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
        assert pixels.std() > 0  # real content, not a blank fill
        assert slide.level_mpp(0) == pytest.approx(0.499)
        assert slide.level_for_magnification(20).level == 0


def test_boxes_tiff_has_four_levels_and_reads_every_level():
    with open_slide(OS_FIXTURES / "boxes.tiff") as slide:
        assert slide.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
        for level, (w, h) in enumerate(slide.level_dimensions):
            assert slide.read_region((0, 0), level, (w, h)).shape == (h, w, 3)
        assert slide.level_for_downsample(4.5) == 2
        assert slide.level_for_downsample(1.9) == 0


def test_bounds_offset_is_where_openslide_puts_the_scanned_area(tmp_path):
    from scn_slides import write_scn_slide

    # A Leica SCN slide: a 120x80 scan at (37, 21) on a 200x130 canvas (OpenSlide's level 0).
    image = np.full((80, 120, 3), 90, np.uint8)
    image[:, :, 0] = np.arange(120, dtype=np.uint8)[None, :]
    path = write_scn_slide(tmp_path / "slide.scn", image, offset=(37, 21), canvas=(200, 130))
    raw = openslide.OpenSlide(str(path))
    assert (raw.properties["openslide.bounds-x"], raw.properties["openslide.bounds-y"]) == ("37", "21")
    raw.close()
    with open_slide(path) as slide:
        assert slide.vendor == "leica" and slide.dimensions == (200, 130)
        assert slide.bounds_offset == (37, 21)
        # The scan's first pixel is at the offset; the canvas around it is blank (white).
        corner = slide.read_region((36, 20), 0, (3, 3))
        assert corner[1:, 1:].tolist() == image[:2, :2].tolist()
        assert (corner[0] == 255).all() and (corner[:, 0] == 255).all()
    # Slides scanned edge to edge have no offset.
    for path in (PROSTATE, OS_FIXTURES / "small.svs"):
        with open_slide(path) as slide:
            assert slide.bounds_offset == (0, 0)
    assert ArrayReader(np.zeros((4, 4, 3), np.uint8)).bounds_offset == (0, 0)


def test_transparent_pixels_are_composited_onto_white():
    class Fake:
        def read_region(self, location, level, size):
            from PIL import Image

            rgba = np.zeros((2, 2, 4), np.uint8)
            rgba[0, 0] = (100, 50, 200, 255)
            rgba[0, 1] = (0, 0, 0, 0)
            rgba[1, 0] = (0, 0, 0, 128)
            rgba[1, 1] = (10, 20, 30, 255)
            return Image.fromarray(rgba, "RGBA")

    with OpenSlideReader(OS_FIXTURES / "small.svs", direct_tiles=False) as slide:
        real = slide._slide
        slide._slide = Fake()
        try:
            out = slide.read_region((0, 0), 0, (2, 2))
        finally:
            slide._slide = real
    assert out[0, 0].tolist() == [100, 50, 200]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [127, 127, 127]
    assert out[1, 1].tolist() == [10, 20, 30]


def test_premultiplied_argb_words_become_rgb_over_white():
    from gigaseg.slides.openslide_reader import argb_to_rgb

    def word(a, r, g, b):
        return (a << 24) | (r << 16) | (g << 8) | b

    argb = np.array([[word(255, 100, 50, 200), word(0, 0, 0, 0)], [word(128, 0, 0, 0), word(128, 64, 10, 128)]], np.uint32)
    out = argb_to_rgb(argb)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [100, 50, 200]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [127, 127, 127]
    # Half-transparent colour c (premultiplied) over white: c + 255 - a.
    assert out[1, 1].tolist() == [64 + 127, 10 + 127, 128 + 127]


def test_raw_reads_equal_openslide_images_inside_and_outside_the_slide():
    from gigaseg.slides.openslide_reader import _read_rgb, _read_rgb_via_pil

    raw = openslide.OpenSlide(str(PROSTATE))
    try:
        for location, level, size in [((1000, 1200), 0, (300, 200)), ((0, 0), 2, (700, 650)), ((-50, -40), 1, (120, 90))]:
            np.testing.assert_array_equal(_read_rgb(raw, location, level, size), _read_rgb_via_pil(raw, location, level, size))
        outside = _read_rgb(raw, (-50, -40), 0, (40, 30))
        assert (outside == 255).all()
    finally:
        raw.close()


def test_level_mpp_and_magnification_selection_with_array_reader():
    image = np.zeros((512, 512, 3), np.uint8)
    slide = ArrayReader(image, levels=4, mpp=0.25, objective_power=40)
    assert slide.level_dimensions == ((512, 512), (256, 256), (128, 128), (64, 64))
    assert slide.level_for_mpp(0.5).level == 1
    assert slide.level_for_mpp(0.9).level == 1  # never coarser than asked
    assert slide.level_for_mpp(2.0).level == 3
    assert slide.level_for_mpp(0.1).level == 0
    assert slide.level_for_magnification(10).level == 2
    assert slide.level_for_magnification(40).level == 0
    choice = slide.level_for_mpp(1.0)
    assert choice.downsample == 4.0 and choice.mpp == pytest.approx(1.0)
    # Without a magnification the 10x = 1 um/px convention applies.
    assert ArrayReader(image, levels=4, mpp=0.25).level_for_magnification(10).level == 2
    with pytest.raises(RegionError, match="neither magnification nor microns"):
        ArrayReader(image, levels=2).level_for_magnification(10)
    with pytest.raises(RegionError, match="positive"):
        slide.level_for_mpp(-1)


def test_missing_file_is_a_slide_error(tmp_path):
    with pytest.raises(SlideError, match="no such slide file"):
        open_slide(tmp_path / "nope.svs")


def test_directory_is_a_slide_error(tmp_path):
    with pytest.raises(SlideError, match="folder, not a slide"):
        open_slide(tmp_path)


def test_text_file_is_not_a_slide(tmp_path):
    path = tmp_path / "notes.tiff"
    path.write_text("not a slide\n")
    with pytest.raises(SlideError, match="not a slide OpenSlide can read"):
        open_slide(path)


def test_unopenable_tiff_is_a_slide_error():
    with pytest.raises(SlideError, match="unopenable.tiff") as info:
        open_slide(OS_FIXTURES / "unopenable.tiff")
    assert "Unsupported TIFF compression" in str(info.value)


def test_unreadable_svs_names_the_slide_and_the_region():
    with open_slide(OS_FIXTURES / "unreadable.svs") as slide:
        with pytest.raises(SlideError) as info:
            slide.read_region((2, 3), 0, (8, 5))
    message = str(info.value)
    assert "unreadable.svs" in message
    assert "x=2, y=3" in message and "8x5" in message and "level 0" in message


def test_region_outside_or_empty_or_bad_level_is_a_region_error():
    with open_slide(PROSTATE) as slide:
        with pytest.raises(RegionError, match="outside"):
            slide.read_region((2400, 0), 0, (200, 10))
        with pytest.raises(RegionError, match="outside"):
            slide.read_region((-1, 0), 0, (10, 10))
        with pytest.raises(RegionError, match="empty"):
            slide.read_region((0, 0), 0, (0, 10))
        with pytest.raises(RegionError, match="level 6 does not exist"):
            slide.read_region((0, 0), 6, (1, 1))


def test_reading_a_closed_slide_is_a_clear_error():
    slide = open_slide(OS_FIXTURES / "small.svs")
    slide.close()
    slide.close()  # closing twice is harmless
    with pytest.raises(SlideError, match="closed"):
        slide.read_region((0, 0), 0, (4, 4))
    with pytest.raises(SlideError, match="closed"):
        _ = slide.properties


def test_unicode_path(tmp_path):
    path = tmp_path / "шлайд ü 切片.svs"
    shutil.copy(OS_FIXTURES / "small.svs", path)
    with open_slide(path) as slide:
        assert slide.name == path.name
        assert slide.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)
