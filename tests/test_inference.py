"""Whole-slide inference: tiled-from-slide equals a plain forward pass, the mask TIFF opens in OpenSlide, outlines round-trip."""

from __future__ import annotations

import json

from dataclasses import replace

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from conftest import FIXTURES

from gigaseg.data.geojson import load_annotations, rasterise
from gigaseg.errors import ConfigError, RegionError
from gigaseg.inference import (
    ModelError,
    PaddedLevel,
    PredictOptions,
    choose_level,
    load_model,
    predict_level_blocks,
    predict_slide,
    write_mask_tiff,
)
from gigaseg.inference.predict import OutlineGrid
from gigaseg.inference.tiff import reduce_block
from gigaseg.slides import ArrayReader, open_slide
from gigaseg.slides.synthetic import write_synthetic_slide
from gigaseg.streaming import TiledEngine

PROSTATE = FIXTURES / "prostate_he_pyramid.tiff"
PAD = (242, 242, 242)


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory):
    """A small pyramidal generic TIFF with mpp 0.5: 700x300 at level 0, 175x75 at level 1."""
    path = tmp_path_factory.mktemp("slide") / "small slide.tiff"
    write_synthetic_slide(path, height=300, width=700, seed=3, mpp=0.5, tile_size=256, workers=1,
                          mask_path=path.with_name("truth.tiff"))
    return path


def plain_probabilities(model, slide, level: int) -> np.ndarray:
    """The reference: the Keras model on the whole level, padded right and down to the total stride."""
    width, height = slide.level_dimensions[level]
    image = slide.read_region((0, 0), level, (width, height))
    padded = np.empty((-(-height // 64) * 64, -(-width // 64) * 64, 3), np.uint8)
    padded[:] = PAD
    padded[:height, :width] = image
    return model(padded[np.newaxis])[0, :height, :width, 0].numpy()


def assemble(blocks, height: int, width: int) -> np.ndarray:
    out = np.full((height, width), np.nan, np.float32)
    for top, left, block in blocks:
        out[top : top + block.shape[0], left : left + block.shape[1]] = block
    return out


@pytest.mark.parametrize("level, tile_size, workers", [(1, 256, 1), (1, 256, 3), (2, 192, 2)])
def test_tiled_slide_prediction_equals_the_plain_forward_pass(model, level, tile_size, workers):
    # Prostate levels 1 and 2 are 1250 and 625 pixels wide: not multiples of the total stride 64.
    engine = TiledEngine(model, tile_size=tile_size)
    with open_slide(PROSTATE) as slide:
        width, height = slide.level_dimensions[level]
        assert width % 64 and height % 64
        reference = plain_probabilities(model, slide, level)
        blocks = predict_level_blocks(engine, slide, level, pad_value=PAD, readers=2, workers=workers)
        tiled = assemble(blocks, height, width)
    assert not np.isnan(tiled).any()
    np.testing.assert_allclose(tiled, reference, atol=1e-5)
    assert np.array_equal(tiled >= 0.5, reference >= 0.5)
    # Without the halo the windows' borders change the result: the comparison has teeth.
    no_halo = TiledEngine(model, tile_size=tile_size, halo=0)
    with open_slide(PROSTATE) as slide:
        cut = assemble(predict_level_blocks(no_halo, slide, level, pad_value=PAD), height, width)
    assert np.abs(cut - reference).max() > 1e-3


def test_padded_level_reads_the_slide_and_pads_with_the_background():
    image = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    level = PaddedLevel(ArrayReader(image), 0, 64, (1, 2, 3))
    assert level.shape == (128, 192, 3)
    window = level[60:128, 120:192]
    assert np.array_equal(window[:40, :30], image[60:100, 120:150])
    assert (window[40:] == (1, 2, 3)).all() and (window[:, 30:] == (1, 2, 3)).all()
    assert (level.read(100, 150, 128, 192) == (1, 2, 3)).all()
    with pytest.raises(RegionError, match="pad_value"):
        PaddedLevel(ArrayReader(image), 0, 64, (0, 0, 300))


def test_predicted_mask_tiff_opens_in_openslide_with_geometry_mpp_and_description(model, synthetic_slide, tmp_path):
    options = PredictOptions(level=0, kind="binary", threshold=0.5, tile_size=256, tiff_tile_size=256,
                             min_area_um2=0.0, simplify_um=0.0, progress=False)
    summary = predict_slide(model, synthetic_slide, tmp_path / "out", options, extra_summary={"model_uri": "m"})
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["mask.tiff", "outlines.geojson", "overlay.png", "summary.json"]
    with open_slide(synthetic_slide) as slide:
        reference = plain_probabilities(model, slide, 0)
    with open_slide(out / "mask.tiff") as mask_slide:
        assert mask_slide.level_dimensions == ((700, 300), (175, 75))
        assert mask_slide.mpp == pytest.approx((0.5, 0.5))
        mask = mask_slide.read_region((0, 0), 0, (700, 300))[..., 0]
    # Binary masks are identical to the plain forward pass at the threshold.
    assert np.array_equal(mask, np.where(reference >= 0.5, 255, 0))
    with tifffile.TiffFile(out / "mask.tiff") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.dtype == np.uint8
        described = json.loads(page.description)["gigaseg"]
    assert described == {"kind": "binary", "threshold": 0.5, "slide": str(synthetic_slide.resolve()), "slide_level": 0,
                         "downsample": 1.0, "mpp": 0.5, "width": 700, "height": 300}

    written = json.loads((out / "summary.json").read_text())
    assert written == summary
    tissue = int((reference >= 0.5).sum())
    assert summary["tissue_pixels"] == tissue
    assert summary["tissue_fraction"] == pytest.approx(tissue / (700 * 300))
    assert summary["tissue_area_mm2"] == pytest.approx(tissue * 0.25 / 1e6)
    assert summary["model_uri"] == "m" and summary["mpx"] == pytest.approx(0.21) and summary["seconds"] > 0

    # The outlines, rasterised back at level 0 by the project's pixel-centre rule, are the mask.
    polygons = load_annotations(out / "outlines.geojson")
    assert summary["pieces"] == len(polygons) > 0
    assert np.array_equal(rasterise(polygons, (0, 0), 1.0, (700, 300)), mask > 0)
    assert summary["outline_vertices"] == summary["outline_vertices_traced"] > 0  # simplify_um=0
    assert summary["bounds_offset"] == [0, 0]


def test_outlines_are_simplified_to_half_a_pixel_by_default(model, synthetic_slide, tmp_path):
    options = PredictOptions(level=0, kind="binary", tile_size=256, tiff_tile_size=256, min_area_um2=0.0,
                             progress=False)
    summary = predict_slide(model, synthetic_slide, tmp_path, options)
    # Level 0 at 0.5 um/px, traced at full resolution: half a pixel is 0.25 um.
    assert summary["simplify_um"] is None and summary["outline_downsample"] == 1.0
    assert summary["simplify_tolerance_px"] == 0.5 and summary["simplify_tolerance_um"] == pytest.approx(0.25)
    features = json.loads((tmp_path / "outlines.geojson").read_text())["features"]
    written = sum(len(ring) - 1 for f in features for ring in f["geometry"]["coordinates"])
    assert written == summary["outline_vertices"] < 0.8 * summary["outline_vertices_traced"]
    # Every pixel the simplified outlines give differently from the mask touches its outline.
    with open_slide(tmp_path / "mask.tiff") as mask_slide:
        tissue = mask_slide.read_region((0, 0), 0, (700, 300))[..., 0] > 0
    redrawn = rasterise(load_annotations(tmp_path / "outlines.geojson"), (0, 0), 1.0, (700, 300)) > 0
    edge = tissue ^ ndimage.binary_erosion(tissue, border_value=1)
    edge |= ~tissue & ndimage.binary_dilation(tissue)
    assert (redrawn != tissue).any() and not ((redrawn != tissue) & ~edge).any()
    # A coarser tolerance keeps fewer still.
    coarse = predict_slide(model, synthetic_slide, tmp_path / "coarse", replace(options, simplify_um=2.0))
    assert coarse["simplify_tolerance_px"] == 4.0 and coarse["outline_vertices"] < summary["outline_vertices"]
    assert coarse["outline_vertices_traced"] == summary["outline_vertices_traced"]


def test_outlines_are_written_in_qupath_coordinates_of_a_slide_with_bounds(model, synthetic_slide, tmp_path):
    from gigaseg.outlines import tissue_outlines
    from gigaseg.simplify import simplify_outlines
    from scn_slides import write_scn_slide

    # The synthetic slide's pixels as a Leica SCN scan at (37, 21) of a larger canvas, which
    # OpenSlide reports as openslide.bounds-x/y and QuPath takes as its origin.
    with open_slide(synthetic_slide) as slide:
        image = slide.read_region((0, 0), 0, (700, 300))
    scn = write_scn_slide(tmp_path / "slide.scn", image, offset=(37, 21), canvas=(800, 360))
    options = PredictOptions(level=0, kind="binary", tile_size=256, tiff_tile_size=256, min_area_um2=0.0,
                             progress=False)
    summary = predict_slide(model, scn, tmp_path / "out", options)
    assert summary["bounds_offset"] == [37, 21] and (summary["width"], summary["height"]) == (800, 360)
    # The same outlines in OpenSlide's level-0 coordinates, from the mask (which covers OpenSlide's level 0).
    with open_slide(tmp_path / "out" / "mask.tiff") as mask_slide:
        tissue = mask_slide.read_region((0, 0), 0, (800, 360))[..., 0] > 0
    expected = simplify_outlines(tissue_outlines(tissue), summary["simplify_tolerance_px"])
    features = json.loads((tmp_path / "out" / "outlines.geojson").read_text())["features"]
    assert len(features) == len(expected) > 0
    for feature, rings in zip(features, expected):
        written = feature["geometry"]["coordinates"]
        assert len(written) == len(rings)
        for ring, want in zip(written, rings):
            assert np.array_equal(np.array(ring) + (37, 21), want)
    # Read back as annotations on the slide, QuPath's coordinates land on the mask's own pixels.
    from gigaseg.data.geojson import GeoJSONMask
    from gigaseg.data.regions import RegionSpec, fit_region

    source = GeoJSONMask(tmp_path / "out" / "outlines.geojson")
    with open_slide(scn) as slide:
        region = fit_region(slide, RegionSpec(x=0, y=0, width=800, height=360, level=0), total_stride=1)
        source.attach(slide, region, tmp_path)
    redrawn = source.read((0, 0), 0, (800, 360)) == 1
    assert (redrawn == tissue).mean() > 0.99
    assert not ((redrawn != tissue) & ~(tissue ^ ndimage.binary_erosion(tissue, border_value=1))
                & ~(~tissue & ndimage.binary_dilation(tissue))).any()


def test_probability_mask_at_a_coarser_level_and_speck_filter(model, synthetic_slide, tmp_path):
    options = PredictOptions(level=1, kind="probability", tile_size=512, tiff_tile_size=512, min_area_um2=0.0,
                             progress=False)
    summary = predict_slide(model, synthetic_slide, tmp_path / "all", options)
    with open_slide(synthetic_slide) as slide:
        reference = plain_probabilities(model, slide, 1)
        downsample = slide.level_downsamples[1]
    with open_slide(tmp_path / "all" / "mask.tiff") as mask_slide:
        assert mask_slide.level_dimensions == ((175, 75),)
        assert mask_slide.mpp == pytest.approx((0.5 * downsample,) * 2)
        values = mask_slide.read_region((0, 0), 0, (175, 75))[..., 0].astype(int)
    assert np.abs(values - np.rint(reference * 255)).max() <= 1
    assert summary["downsample"] == pytest.approx(downsample) and summary["level"] == 1

    # Pieces smaller than min_area_um2 go; the mask keeps them.
    areas = sorted(_piece_areas(tmp_path / "all" / "outlines.geojson"))
    assert len(areas) >= 2
    cut = (areas[0] + areas[-1]) / 2 * 0.25  # level-0 px^2 to um^2 at 0.5 um/px
    kept = predict_slide(model, synthetic_slide, tmp_path / "big", PredictOptions(**{**options.__dict__, "min_area_um2": cut}))
    assert 1 <= kept["pieces"] < summary["pieces"]
    assert kept["tissue_pixels"] == summary["tissue_pixels"]


def _piece_areas(path):
    areas = []
    for feature in json.loads(path.read_text())["features"]:
        exterior = np.array(feature["geometry"]["coordinates"][0])
        x, y = exterior[:, 0], exterior[:, 1]
        areas.append(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)
    return areas


@pytest.mark.parametrize("kind", ["probability", "binary"])
def test_mask_tiff_pyramid_is_built_from_blocks_in_any_order_within_a_band(tmp_path, kind):
    rng = np.random.default_rng(1)
    height, width = 1100, 2100
    mask = rng.integers(0, 256, (height, width), dtype=np.uint8)
    if kind == "binary":
        mask = np.where(mask > 128, 255, 0).astype(np.uint8)
    blocks = []
    for top in range(0, height, 512):
        band = [(top, left, mask[top : top + 512, left : left + 512]) for left in range(0, width, 512)]
        blocks += band[::-1]
    dims = write_mask_tiff(tmp_path / "m.tiff", iter(blocks), width=width, height=height, kind=kind, tile_size=256)
    assert dims == [(2100, 1100), (525, 275), (131, 68)]
    expected = [mask, reduce_block(mask, kind)]
    expected.append(reduce_block(expected[1], kind))
    with tifffile.TiffFile(tmp_path / "m.tiff") as tif:
        assert len(tif.pages) == 3
        for page, want in zip(tif.pages, expected):
            assert np.array_equal(page.asarray(), want[: page.shape[0], : page.shape[1]])
    assert [p.name for p in tmp_path.iterdir()] == ["m.tiff"]  # no temporary files left behind
    with pytest.raises(ValueError, match="aligned"):
        write_mask_tiff(tmp_path / "bad.tiff", iter([(0, 100, mask)]), width=width, height=height, tile_size=256)
    assert not (tmp_path / "bad.tiff").exists()


def test_mask_tiff_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    import os
    import subprocess
    import sys

    from gigaseg.atomic import temporary_name

    ended = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True, check=True).stdout)
    target = tmp_path / "m.tiff"
    # What a writer killed with SIGKILL leaves: its scratch levels and its partial file.
    scratch, partial = (target.with_name(temporary_name(target, suffix).name.replace(f".{os.getpid()}.", f".{ended}.", 1))
                        for suffix in (".scratch", ".tiff"))
    scratch.mkdir()
    (scratch / "level1").write_bytes(b"raw")
    partial.write_bytes(b"half")
    mask = np.zeros((300, 600), np.uint8)
    write_mask_tiff(target, iter([(0, 0, mask)]), width=600, height=300, tile_size=256)
    assert [p.name for p in tmp_path.iterdir()] == ["m.tiff"]


def test_outline_grid_keeps_the_downsampled_mask_small_and_votes():
    grid = OutlineGrid(width=10_000, height=3_000, max_pixels=1e6, max_factor=512)
    assert grid.factor == 8 and grid.mask.size <= 1e6
    tissue = np.zeros((1024, 1000), bool)
    tissue[:, :500] = True
    tissue[:4, 500:] = True  # half of one row of cells: a tie counts as tissue
    grid.add(1024, 2048, tissue)
    cells = grid.mask[128:256, 256:381]
    assert cells[:, :62].all() and not cells[1:, 63:].any()
    assert cells[0, 63:].all()


def test_choose_level_follows_the_options_then_the_model(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        assert choose_level(slide, level=1, mpp=None, model_level=0, model_mpp=None) == 1
        assert choose_level(slide, level=None, mpp=2.0, model_level=0, model_mpp=None) == 1
        assert choose_level(slide, level=None, mpp=None, model_level=None, model_mpp=0.5) == 0
        assert choose_level(slide, level=None, mpp=None, model_level=1, model_mpp=None) == 1
        assert choose_level(slide, level=None, mpp=None, model_level=None, model_mpp=None) == 0
        with pytest.raises(RegionError, match="level 5 does not exist"):
            choose_level(slide, level=5, mpp=None, model_level=None, model_mpp=None)
        with pytest.raises(RegionError, match="trained at level 3"):
            choose_level(slide, level=None, mpp=None, model_level=3, model_mpp=None)


def test_bad_options_are_refused(model, synthetic_slide, tmp_path):
    with pytest.raises(ConfigError, match="tile_size 640 must be a positive multiple of 512"):
        predict_slide(model, synthetic_slide, tmp_path, PredictOptions(tile_size=640))
    with pytest.raises(ConfigError, match="kind 'soft'"):
        predict_slide(model, synthetic_slide, tmp_path, PredictOptions(kind="soft", tile_size=512))


def test_load_model_from_a_keras_file_and_refuses_unsafe_or_missing_models(model, tmp_path):
    import keras
    from keras import layers

    model.save(tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras")
    assert loaded.total_stride == 64 and loaded.threshold == 0.5 and loaded.run_id is None
    x = np.zeros((1, 64, 64, 3), np.uint8)
    np.testing.assert_allclose(loaded.model(x).numpy(), model(x).numpy(), atol=1e-7)

    inputs = keras.Input((None, None, 3))
    unsafe = keras.Model(inputs, layers.Lambda(lambda t: t[..., :1] * 0.0)(inputs))
    unsafe.save(tmp_path / "lambda.keras")
    with pytest.raises(ModelError, match="cannot load"):
        load_model(tmp_path / "lambda.keras")
    with pytest.raises(ModelError, match="no such model"):
        load_model(tmp_path / "missing.keras")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="not an MLflow model folder"):
        load_model(tmp_path / "folder")


@pytest.mark.parametrize("kind", ["probability", "binary"])
def test_gigaseg_evaluate_reads_the_predicted_mask_as_agreed(model, synthetic_slide, tmp_path, kind):
    from gigaseg.evaluation import count
    from gigaseg.evaluation_inputs import evaluate_files
    from gigaseg.slides.synthetic import read_mask_region

    options = PredictOptions(level=1, kind=kind, tile_size=512, progress=False)
    summary = predict_slide(model, synthetic_slide, tmp_path, options)
    truth = synthetic_slide.with_name("truth.tiff")
    result, inputs = evaluate_files(tmp_path / "mask.tiff", truth)
    assert inputs["prediction"]["kind"] == kind and inputs["prediction"]["slide_level"] == 1
    assert inputs["prediction"]["downsample"] == pytest.approx(summary["downsample"])
    assert result.counts.predicted == summary["tissue_pixels"]
    with open_slide(synthetic_slide) as slide:
        reference = plain_probabilities(model, slide, 1)
    expected = count(reference, read_mask_region(truth, (0, 0), 1, (175, 75)), threshold=0.5)
    assert result.counts == expected


def test_predict_slide_leaves_no_engine_behind(model, synthetic_slide, tmp_path):
    # An engine's traced graphs are reference cycles; predict_slide collects them before it
    # returns, so a process predicting slide after slide does not grow (benchmarks/soak.py).
    import gc

    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, TiledEngine)}
    predict_slide(model, synthetic_slide, tmp_path / "out", PredictOptions(level=1, tile_size=512, progress=False))
    after = {id(o) for o in gc.get_objects() if isinstance(o, TiledEngine)}
    assert after <= before


@pytest.mark.parametrize("kind", ["probability", "binary"])
def test_mask_values_round_threshold_and_count_like_numpy(kind):
    from gigaseg.inference.predict import mask_values

    rng = np.random.default_rng(2)
    probability = rng.random((130, 75), dtype=np.float32)
    # Exact halves of 1/255 steps, the threshold itself and its float32 neighbours, 0, 1 and NaN.
    threshold = 0.3
    t32 = np.float32(threshold)
    probability[0, :8] = [0.5 / 255, 1.5 / 255, 2.5 / 255, t32, np.nextafter(t32, 0), np.nextafter(t32, 1), 0, 1]
    probability[1, 0] = np.nan
    values, tissue, count = mask_values(probability, kind, threshold)
    expected_tissue = probability >= threshold
    if kind == "binary":
        expected = np.where(expected_tissue, np.uint8(255), np.uint8(0))
    else:
        with np.errstate(invalid="ignore"):
            expected = np.rint(np.nan_to_num(probability) * np.float32(255)).astype(np.uint8)
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(tissue, expected_tissue)
    assert count == int(expected_tissue.sum()) and values.dtype == np.uint8 and tissue.dtype == np.bool_
    # A strided (non-contiguous) core gives the same.
    again = mask_values(probability[:, ::2], kind, threshold)
    np.testing.assert_array_equal(again[0], values[:, ::2])


@pytest.mark.parametrize("factor", [1, 4, 8, 16])
def test_block_sums_add_whole_blocks_like_numpy(factor):
    from gigaseg.inference.tiff import block_sums

    values = np.random.default_rng(factor).integers(0, 256, (70, 101), dtype=np.uint8)
    values[:16, :16] = 255  # a saturated block: its sum needs more than 16 bits at factor 16
    h, w = 70 // factor, 101 // factor
    expected = values[: h * factor, : w * factor].reshape(h, factor, w, factor).astype(np.int64).sum(axis=(1, 3))
    np.testing.assert_array_equal(block_sums(values, factor), expected)
    strided = values[::-1, 1:]  # not contiguous
    w2 = 100 // factor
    expected = strided[: h * factor, : w2 * factor].reshape(h, factor, w2, factor).astype(np.int64).sum(axis=(1, 3))
    np.testing.assert_array_equal(block_sums(strided, factor), expected)


def test_outline_tolerance_is_half_a_traced_pixel_or_the_option_in_um_or_pixels_without_mpp(caplog):
    from gigaseg.inference.predict import outline_tolerance

    assert outline_tolerance(None, 0.25, 8.0, "s") == 4.0  # traced at downsample 8: half of it
    assert outline_tolerance(None, None, 1.0, "s") == 0.5
    assert outline_tolerance(1.0, 0.25, 8.0, "s") == 4.0  # 1 um at 0.25 um per level-0 pixel
    assert outline_tolerance(0.0, 0.25, 8.0, "s") == 0.0
    with caplog.at_level("WARNING"):
        assert outline_tolerance(3.0, None, 8.0, "slide.tiff") == 3.0
    assert "slide.tiff records no mpp: simplify_um=3 is taken as level-0 pixels" in caplog.text


def test_negative_simplify_um_is_refused(model, synthetic_slide, tmp_path):
    with pytest.raises(ConfigError, match="simplify_um must be zero or positive"):
        predict_slide(model, synthetic_slide, tmp_path, PredictOptions(tile_size=512, simplify_um=-0.5))


def test_thumbnail_of_a_level_whose_downsample_is_a_little_over_two(tmp_path):
    from gigaseg.inference.overlay import slide_thumbnail

    # Level 1 is 600x550 under a 1201x1101 level 0 (halved and rounded down, as Aperio does):
    # downsample 2.0017, so the strip at level-1 row 512 starts at level-0 row 1024.9.
    image = np.random.default_rng(0).integers(0, 256, (1101, 1201, 3), dtype=np.uint8)
    path = tmp_path / "odd.tiff"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), photometric="rgb")
        tif.write(image[:1100:2, :1200:2], tile=(256, 256), photometric="rgb", subfiletype=1)
    with open_slide(path) as slide:
        assert slide.level_dimensions == ((1201, 1101), (600, 550)) and slide.level_downsamples[1] > 2
        thumbnail, scale = slide_thumbnail(slide, 512)
    assert thumbnail.shape == (469, 512, 3) and scale == pytest.approx((1201 / 512, 1101 / 469))
