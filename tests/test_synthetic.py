"""Synthetic slides: OpenSlide round trip, exact masks, pyramid geometry, determinism, CLI."""

from __future__ import annotations

import json
import os
import resource

import numpy as np
import openslide
import pytest
import tifffile

from gigaseg.cli import synth as synth_cli
from gigaseg.errors import ConfigError, MaskError
from gigaseg.slides import open_slide
from gigaseg.slides import synthetic
from gigaseg.slides.synthetic import (
    make_layout,
    pyramid_dimensions,
    read_mask_region,
    render_region,
    write_synthetic_slide,
)
from gigaseg.slides.synthetic_render import _add_dust, _add_ink

HEIGHT, WIDTH, SEED, TILE = 700, 1900, 3, 256


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """One small synthetic slide and mask, written once for the module."""
    folder = tmp_path_factory.mktemp("synth")
    path, mask = folder / "slide.tiff", folder / "slide_mask.tiff"
    info = write_synthetic_slide(path, height=HEIGHT, width=WIDTH, seed=SEED, tile_size=TILE, mask_path=mask, workers=1)
    return path, mask, info


def test_openslide_opens_it_as_generic_tiff_with_real_mpp_and_all_levels(slide):
    path, _, info = slide
    raw = openslide.OpenSlide(str(path))
    assert raw.properties["openslide.vendor"] == "generic-tiff"
    assert float(raw.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert float(raw.properties["openslide.mpp-y"]) == pytest.approx(0.5)
    assert raw.level_dimensions == ((1900, 700), (475, 175))  # 475x175 fits two 256-px tiles
    assert [list(d) for d in raw.level_dimensions] == info["level_dimensions"]
    assert raw.level_downsamples == pytest.approx(info["level_downsamples"])
    raw.close()
    with open_slide(path) as reader:
        assert reader.mpp == pytest.approx((0.5, 0.5))
        assert reader.level_for_mpp(2.0).level == 1


def test_pixels_round_trip_within_jpeg_tolerance(slide):
    path, _, _ = slide
    layout = make_layout(HEIGHT, WIDTH, SEED, 0.5)
    location, size = (611, 203), (300, 250)  # not aligned to tiles: crosses four of them
    expected, _ = render_region(layout, location, size)
    with open_slide(path) as reader:
        got = reader.read_region(location, 0, size)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.mean() < 3.0
    assert np.percentile(diff, 99) < 25


def test_mask_is_exact_at_level_0_and_a_majority_vote_at_level_1(slide):
    _, mask_path, _ = slide
    layout = make_layout(HEIGHT, WIDTH, SEED, 0.5)
    _, truth = render_region(layout, (611, 203), (300, 250))
    np.testing.assert_array_equal(read_mask_region(mask_path, (611, 203), 0, (300, 250)), truth)
    _, full = render_region(layout, (0, 0), (WIDTH, HEIGHT))
    votes = full[: 175 * 4, : 475 * 4].reshape(175, 4, 475, 4).sum(axis=(1, 3))
    np.testing.assert_array_equal(read_mask_region(mask_path, (0, 0), 1, (475, 175)), (votes >= 8).astype(np.uint8))
    # A level-1 window starting at level-0 (x=400, y=80) begins at level-1 pixel (100, 20).
    np.testing.assert_array_equal(read_mask_region(mask_path, (400, 80), 1, (50, 30)), (votes >= 8)[20:50, 100:150])


def test_mask_tiff_has_the_slide_geometry_tiled_and_lossless(slide):
    path, mask_path, _ = slide
    with tifffile.TiffFile(path) as image, tifffile.TiffFile(mask_path) as mask:
        assert len(image.pages) == len(mask.pages) == 2
        for page, mpage in zip(image.pages, mask.pages):
            assert (page.imagewidth, page.imagelength) == (mpage.imagewidth, mpage.imagelength)
            assert page.is_tiled and mpage.is_tiled and mpage.tilewidth == TILE
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert mpage.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert set(np.unique(mask.pages[1].asarray())) <= {0, 255}


def test_rendering_does_not_depend_on_how_the_region_is_cut():
    layout = make_layout(600, 1500, 11, 0.5)
    rgb, mask = render_region(layout, (900, 100), (400, 300))
    left_rgb, left_mask = render_region(layout, (900, 100), (137, 300))
    right_rgb, right_mask = render_region(layout, (1037, 100), (263, 300))
    np.testing.assert_array_equal(np.concatenate([left_rgb, right_rgb], axis=1), rgb)
    np.testing.assert_array_equal(np.concatenate([left_mask, right_mask], axis=1), mask)


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path):
    kwargs = dict(height=500, width=1200, seed=5, tile_size=128)
    write_synthetic_slide(tmp_path / "a.tiff", mask_path=tmp_path / "a_mask.tiff", workers=1, **kwargs)
    write_synthetic_slide(tmp_path / "b.tiff", mask_path=tmp_path / "b_mask.tiff", workers=2, **kwargs)
    assert (tmp_path / "a.tiff").read_bytes() == (tmp_path / "b.tiff").read_bytes()
    assert (tmp_path / "a_mask.tiff").read_bytes() == (tmp_path / "b_mask.tiff").read_bytes()
    write_synthetic_slide(tmp_path / "c.tiff", workers=1, **{**kwargs, "seed": 6})
    assert (tmp_path / "c.tiff").read_bytes() != (tmp_path / "a.tiff").read_bytes()


def test_ink_and_dust_are_dark_but_background_in_the_mask():
    layout = make_layout(2000, 6000, 0, 0.5)
    ink_and_dust = 0
    for stroke in layout.strokes:
        for x, y in stroke.points[::10]:
            x0, y0 = int(x) - 64, int(y) - 64
            if not (0 <= x0 < 6000 - 128 and 0 <= y0 < 2000 - 128):
                continue
            rgb, mask = render_region(layout, (x0, y0), (128, 128))
            od = np.zeros((128, 128, 3), np.float32)
            _add_ink(layout, od, x0, y0, np.arange(x0, x0 + 128, dtype=np.float32)[None, :],
                     np.arange(y0, y0 + 128, dtype=np.float32)[:, None])
            _add_dust(layout, od, x0, y0)
            marked = (od.sum(axis=2) > 0.6) & (mask == 0)
            ink_and_dust += int(marked.sum())
            if marked.any():
                # Marked glass is visibly darker than clean glass, yet not tissue.
                assert rgb[marked].astype(int).sum(axis=1).mean() < 600
    assert ink_and_dust > 100


def test_tissue_fraction_is_sensible_and_matches_the_mask(slide):
    _, mask_path, info = slide
    assert 0.15 < info["tissue_fraction"] < 0.65
    mask = read_mask_region(mask_path, (0, 0), 0, (WIDTH, HEIGHT))
    assert mask.mean() == pytest.approx(info["tissue_fraction"])
    # The demo slide's layout (decided on the coarse grid) covers a sensible share too.
    for seed in range(4):
        layout = make_layout(8192, 32768, seed, 0.5)
        grid = layout.coarse[3 : 3 + 8192 // 32, 3 : 3 + 32768 // 32]
        assert 0.2 < float((grid > 0).mean()) < 0.55


def test_pyramid_stops_when_a_level_fits_in_two_tiles():
    assert pyramid_dimensions(16000, 64000, 512) == [(64000, 16000), (16000, 4000), (4000, 1000), (1000, 250)]
    assert pyramid_dimensions(8192, 32768, 512) == [(32768, 8192), (8192, 2048), (2048, 512), (512, 128)]
    assert pyramid_dimensions(100, 100, 512) == [(100, 100)]


def test_thumbnail_sized_slide(tmp_path):
    info = write_synthetic_slide(tmp_path / "t.tiff", height=37, width=61, seed=2, mask_path=tmp_path / "m.tiff")
    assert info["level_dimensions"] == [[61, 37]]
    with open_slide(tmp_path / "t.tiff") as reader:
        assert reader.read_region((0, 0), 0, (61, 37)).shape == (37, 61, 3)
    assert read_mask_region(tmp_path / "m.tiff", (60, 36), 0, (1, 1)).shape == (1, 1)


def test_a_killed_writers_leftovers_are_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    from gigaseg.atomic import temporary_name

    ended = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True, check=True).stdout)

    def left(target, suffix):  # named as the ended process would have named it
        return target.with_name(temporary_name(target, suffix).name.replace(f".{os.getpid()}.", f".{ended}.", 1))

    slide, mask = tmp_path / "t.tiff", tmp_path / "m.tiff"
    left(slide, ".partial").write_bytes(b"half a slide")
    left(mask, ".partial").write_bytes(b"half a mask")
    scratch = left(slide, ".scratch")
    scratch.mkdir()
    (scratch / "rgb1").write_bytes(b"strips")
    write_synthetic_slide(slide, height=37, width=61, seed=2, mask_path=mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tiff", "t.tiff"]


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="tile_size"):
        write_synthetic_slide(tmp_path / "x.tiff", height=64, width=64, tile_size=100)
    with pytest.raises(ConfigError, match="mpp"):
        write_synthetic_slide(tmp_path / "x.tiff", height=64, width=64, mpp=0)
    with pytest.raises(ConfigError, match="at least 1x1"):
        write_synthetic_slide(tmp_path / "x.tiff", height=0, width=64)
    with pytest.raises(ConfigError, match="does not exist"):
        write_synthetic_slide(tmp_path / "missing" / "x.tiff", height=64, width=64)


def test_read_mask_region_errors(slide, tmp_path):
    _, mask_path, _ = slide
    with pytest.raises(MaskError, match="no such mask file"):
        read_mask_region(tmp_path / "none.tiff", (0, 0), 0, (1, 1))
    with pytest.raises(MaskError, match="outside"):
        read_mask_region(mask_path, (WIDTH - 5, 0), 0, (10, 10))
    with pytest.raises(MaskError, match="level 2 does not exist"):
        read_mask_region(mask_path, (0, 0), 2, (1, 1))
    with pytest.raises(MaskError, match="empty"):
        read_mask_region(mask_path, (0, 0), 0, (0, 1))
    text = tmp_path / "text.tiff"
    text.write_text("hello")
    with pytest.raises(MaskError, match="not a readable TIFF"):
        read_mask_region(text, (0, 0), 0, (1, 1))


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.render_region

    def failing(layout, location, size):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(layout, location, size)

    monkeypatch.setattr(synthetic, "render_region", failing)
    (tmp_path / "old.tiff").write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_slide(tmp_path / "old.tiff", height=300, width=600, tile_size=64,
                              mask_path=tmp_path / "m.tiff", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.tiff"]
    assert (tmp_path / "old.tiff").read_bytes() == b"previous"


def test_cli_writes_slide_and_mask(tmp_path, capsys):
    out = tmp_path / "cli.tiff"
    synth_cli.main([str(out), "--height", "200", "--width", "300", "--seed", "4", "--mpp", "0.25",
                    "--mask", str(tmp_path / "cli_mask.tiff"), "--tile-size", "128", "--quiet"])
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] == 0.25 and info["seed"] == 4
    with open_slide(out) as reader:
        assert reader.mpp == pytest.approx((0.25, 0.25))
    assert (tmp_path / "cli_mask.tiff").is_file()


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        synth_cli.main([str(tmp_path / "x.tiff"), "--height", "10", "--width", "10", "--tile-size", "100", "--quiet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_large_slide_is_written_in_bounded_memory(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info = write_synthetic_slide(tmp_path / "big.tiff", height=4096, width=16384, seed=1,
                                 mask_path=tmp_path / "big_mask.tiff", workers=2)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_mb < max(before / 1024, 0) + 600
    assert info["level_dimensions"] == [[16384, 4096], [4096, 1024], [1024, 256]]
    with open_slide(tmp_path / "big.tiff") as reader:
        assert reader.level_dimensions[1] == (4096, 1024)
    assert os.path.getsize(tmp_path / "big.tiff") > 1_000_000
