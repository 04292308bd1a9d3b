"""Evaluation inputs: gigaseg prediction TIFFs read by tiles, mask images, GeoJSON and synthetic references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from gigaseg.errors import ConfigError, MaskError
from gigaseg.evaluation import evaluate_masks
from gigaseg.evaluation_inputs import (
    TiffTissue,
    evaluate_files,
    open_prediction,
    open_reference,
    probability_cut,
)
from gigaseg.outlines import tissue_outlines, write_geojson


def write_prediction(
    path: Path,
    values: np.ndarray,
    *,
    kind: str = "probability",
    threshold: float = 0.5,
    downsample: float = 1.0,
    mpp: float | None = None,
    slide_level: int = 0,
    tile: int = 32,
    levels: int = 2,
    slide: str = "slide.tiff",
) -> Path:
    """A prediction TIFF as gigaseg-predict writes it: tiled uint8, pyramid as further IFDs, JSON description."""
    h, w = values.shape
    meta = {"gigaseg": {"kind": kind, "threshold": threshold, "slide": slide, "slide_level": slide_level,
                        "downsample": downsample, "mpp": mpp, "width": w, "height": h}}
    with tifffile.TiffWriter(path) as tif:
        tif.write(values, tile=(tile, tile), compression="zlib", photometric="minisblack",
                  description=json.dumps(meta), metadata=None)
        level = values
        for _ in range(levels - 1):
            level = level[::2, ::2]
            tif.write(level, tile=(tile, tile), compression="zlib", photometric="minisblack",
                      subfiletype=1, metadata=None)
    return path


def quantise(probability: np.ndarray) -> np.ndarray:
    return np.rint(probability * 255).astype(np.uint8)


def test_probability_cut_matches_threshold():
    p = np.linspace(0, 1, 200_001)
    v = quantise(p)
    assert probability_cut(0.5) == 128
    np.testing.assert_array_equal(v >= probability_cut(0.5), p >= 0.5)
    for t in (0.3, 0.7, 0.123, 0.01):
        tissue = v >= probability_cut(t)
        assert tissue[p >= t].all()  # no probability at or above t is lost
        assert (p[tissue & (p < t)] > t - 1 / 255).all()  # and extras are within one step below t
    assert probability_cut(0.0) == 0 and probability_cut(1.0) == 255


@pytest.fixture
def probability():
    rng = np.random.default_rng(3)
    prob = np.zeros((97, 150))
    prob[10:80, 20:120] = rng.uniform(0.3, 1.0, (70, 100))
    return prob


def test_prediction_tiff_read_by_tiles(tmp_path, probability):
    path = write_prediction(tmp_path / "mask.tiff", quantise(probability), downsample=4.0, mpp=2.0, slide_level=1)
    tissue, info = open_prediction(path)
    assert (info.kind, info.width, info.height, info.downsample, info.mpp, info.cut) == ("probability", 150, 97, 4.0, 2.0, 128)
    expected = probability >= 0.5
    np.testing.assert_array_equal(tissue.rows(0, 97), expected)
    np.testing.assert_array_equal(tissue.rows(31, 65), expected[31:65])  # across tile rows
    tissue.close()
    tissue, info = open_prediction(path, threshold=0.7)
    assert info.cut == probability_cut(0.7) == 179
    np.testing.assert_array_equal(tissue.rows(0, 97), quantise(probability) >= 179)
    tissue.close()


@pytest.mark.parametrize("rows", [5, 32, 40, 1000])
def test_tiled_reading_in_any_band_height(tmp_path, probability, rows):
    path = write_prediction(tmp_path / "mask.tiff", quantise(probability), tile=16)
    ref = (np.random.default_rng(0).random(probability.shape) < 0.5).astype(np.uint8)
    with_tiles = evaluate_masks(TiffTissue(path, cut=128), ref, rows=rows)
    in_memory = evaluate_masks(probability, ref, threshold=0.5)
    assert with_tiles.counts == in_memory.counts
    assert [p.counts for p in with_tiles.pieces] == [p.counts for p in in_memory.pieces]


def test_binary_prediction_against_png_reference(tmp_path, probability):
    tissue = probability >= 0.5
    pred = write_prediction(tmp_path / "mask.tiff", tissue.astype(np.uint8) * 255, kind="binary")
    ref = tmp_path / "ref.png"
    Image.fromarray(tissue.astype(np.uint8)).save(ref)
    result, inputs = evaluate_files(pred, ref)
    assert result.scores()["dice"] == 1.0 and result.counts.predicted == int(tissue.sum())
    assert inputs["prediction"]["kind"] == "binary" and inputs["reference"]["kind"] == "mask"


def test_geojson_reference_round_trip(tmp_path, probability):
    # The reference drawn as outlines in level-0 coordinates, the prediction at downsample 4.
    ref_mask = np.zeros(probability.shape, np.uint8)
    ref_mask[15:70, 25:110] = 1
    ref_mask[30:40, 50:60] = 0
    geojson = write_geojson(tissue_outlines(ref_mask, downsample=4.0), tmp_path / "ref.geojson")
    pred = write_prediction(tmp_path / "mask.tiff", quantise(probability), downsample=4.0)
    result, inputs = evaluate_files(pred, geojson)
    assert inputs["reference"]["kind"] == "geojson"
    assert result.counts == evaluate_masks(probability, ref_mask).counts
    with pytest.raises(MaskError, match="no annotations of class Stroma"):
        evaluate_files(pred, geojson, classes=["Stroma"])


@pytest.mark.parametrize("downsample", [1, 2])
def test_geojson_reference_in_qupath_coordinates_on_a_slide_with_bounds(tmp_path, downsample):
    from scn_slides import write_scn_slide

    from gigaseg.slides import open_slide

    # A Leica SCN scan at (37, 21) of a 200x130 canvas holds a dark 30x20 square at (10, 5) of the
    # scan, (47, 26) of OpenSlide's level 0. QuPath shows the scan alone, so its annotation around
    # the square is at (10, 5); the prediction, like gigaseg-predict's, covers the whole canvas.
    scan = np.full((80, 120, 3), 235, np.uint8)
    scan[5:25, 10:40] = (90, 30, 110)
    slide = write_scn_slide(tmp_path / "slide.scn", scan, offset=(37, 21), canvas=(200, 130))
    with open_slide(slide) as reader:
        dark = reader.read_region((0, 0), 0, (200, 130)).sum(axis=2) < 400
    assert np.argwhere(dark).min(axis=0).tolist() == [26, 47] and dark.sum() == 600
    half = downsample // 2  # the level-0 pixel under each predicted pixel's centre
    predicted = dark[half::downsample, half::downsample].astype(np.uint8) * 255
    pred = write_prediction(tmp_path / "mask.tiff", predicted, kind="binary", downsample=float(downsample),
                            slide=str(slide))
    square = [[10, 5], [40, 5], [40, 25], [10, 25], [10, 5]]
    reference = tmp_path / "qupath.geojson"
    reference.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}},
    }]}), encoding="utf-8")

    result, inputs = evaluate_files(pred, reference)
    assert result.counts.reference == result.counts.predicted == 600 // downsample**2
    assert result.scores()["dice"] == 1.0
    assert inputs["reference"]["bounds_offset"] == (37, 21)

    if downsample == 1:
        # A mask that names no slide shares QuPath's origin: the same annotation misses the square.
        Image.fromarray(predicted).save(tmp_path / "mask.png")
        unshifted, inputs = evaluate_files(tmp_path / "mask.png", reference)
        assert inputs["reference"]["bounds_offset"] == (0, 0)
        assert unshifted.scores()["dice"] == 0.0


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from gigaseg.slides.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_slide(folder / "slide.tiff", height=512, width=1024, seed=2, tile_size=256,
                          mask_path=folder / "slide_mask.tiff", workers=1)
    return folder / "slide_mask.tiff"


def test_synthetic_truth_at_the_predicted_level(tmp_path, synthetic):
    from gigaseg.slides.synthetic import read_mask_region

    truth = read_mask_region(synthetic, (0, 0), 1, (256, 128))
    assert 0 < truth.mean() < 1
    pred = write_prediction(tmp_path / "mask.tiff", truth * 255, kind="binary", downsample=4.0, slide_level=1)
    result, inputs = evaluate_files(pred, synthetic)
    assert inputs["reference"]["kind"] == "synthetic" and inputs["reference"]["page"] == 1
    assert result.scores()["dice"] == 1.0 and result.counts.reference == int(truth.sum())
    wrong = truth.copy()
    wrong[:, :64] = 1 - wrong[:, :64]
    pred = write_prediction(tmp_path / "wrong.tiff", wrong * 255, kind="binary", downsample=4.0, slide_level=1)
    result, _ = evaluate_files(pred, synthetic)
    assert result.counts == evaluate_masks(wrong, truth).counts and result.scores()["dice"] < 0.95


def test_synthetic_truth_sampled_at_another_downsample(tmp_path, synthetic):
    from gigaseg.slides.synthetic import read_mask_region

    level0 = read_mask_region(synthetic, (0, 0), 0, (1024, 512))
    pred_mask = level0[1::2, 1::2]  # pixel centres of a downsample-2 grid
    pred = write_prediction(tmp_path / "mask.tiff", pred_mask * 255, kind="binary", downsample=2.0)
    result, inputs = evaluate_files(pred, synthetic, reference_type="synthetic")
    assert inputs["reference"]["sampled"] and result.scores()["dice"] == 1.0


def test_mask_reference_at_another_scale_is_sampled(tmp_path):
    rng = np.random.default_rng(1)
    small = (rng.random((24, 32)) < 0.5).astype(np.uint8)
    big = small.repeat(2, axis=0).repeat(2, axis=1)
    pred = tmp_path / "pred.png"
    Image.fromarray(big * 255).save(pred)
    ref = tmp_path / "ref.tif"
    tifffile.imwrite(ref, small * 255)
    result, inputs = evaluate_files(pred, ref)
    assert inputs["reference"]["sampled"] and result.scores()["dice"] == 1.0


def test_mismatched_and_bad_inputs_are_refused(tmp_path, probability):
    pred = write_prediction(tmp_path / "mask.tiff", quantise(probability))
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((97, 140), np.uint8)).save(odd)
    with pytest.raises(MaskError, match=r"odd.png is 140x97 .* prediction is 150x97"):
        evaluate_files(pred, odd)
    values = tmp_path / "values.tif"
    tifffile.imwrite(values, (np.arange(150 * 97).reshape(97, 150) % 3).astype(np.uint8))
    with pytest.raises(MaskError, match=r"values \{0, 1, 2\}"):
        evaluate_files(pred, values)
    with pytest.raises(MaskError, match="does not exist"):
        evaluate_files(tmp_path / "missing.tiff", odd)
    not_tiff = tmp_path / "text.tif"
    not_tiff.write_text("not an image")
    with pytest.raises(MaskError, match="not a readable TIFF"):
        evaluate_files(not_tiff, odd)
    with pytest.raises(ConfigError, match="reference_type"):
        open_reference(odd, open_prediction(odd)[1], kind="outline")


def test_reads_the_mask_gigaseg_predict_writes(tmp_path):
    from gigaseg.inference.tiff import write_mask_tiff

    rng = np.random.default_rng(5)
    prob = rng.random((300, 520)).astype(np.float32)
    values = np.rint(prob * np.float32(255)).astype(np.uint8)
    meta = {"gigaseg": {"kind": "probability", "threshold": 0.5, "slide": "slide.tiff", "slide_level": 0,
                        "downsample": 1.0, "mpp": 0.5, "width": 520, "height": 300}}
    path = tmp_path / "mask.tiff"
    write_mask_tiff(path, [(0, 0, values)], width=520, height=300, tile_size=256, mpp=0.5, description=meta)
    tissue, info = open_prediction(path)
    assert (info.kind, info.mpp, info.cut) == ("probability", 0.5, 128)
    np.testing.assert_array_equal(tissue.rows(0, 300), prob >= 0.5)
    tissue.close()
    ref = tmp_path / "ref.png"
    Image.fromarray((prob >= 0.5).astype(np.uint8) * 255).save(ref)
    result, _ = evaluate_files(path, ref)
    assert result.scores()["dice"] == 1.0
