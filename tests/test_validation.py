"""Validation counts a region a tile core at a time: the same metrics as counting its whole
probabilities, and the overlay picture from a preview on the same stride."""

from __future__ import annotations

import numpy as np
import keras
import pytest
from PIL import Image

from gigaseg.errors import MaskError
from gigaseg.evaluation import IGNORE_LABEL, count, count_cores
from gigaseg.model import build_unet
from gigaseg.plots import ProbabilityPreview, overlay_png, preview_step
from gigaseg.streaming import TiledEngine
from gigaseg.training import TrainRegion, probability_preview, validate_regions
from test_ignore_labels import with_ignored
from test_streaming_engine import tissue_region


@pytest.fixture(scope="module")
def engine():
    # Tiles of 192x320: their cores do not fall on the pictures' strides.
    keras.utils.set_random_seed(3)
    return TiledEngine(build_unet(), loss="dice_bce", tile_size=(192, 320))


@pytest.fixture(scope="module")
def regions():
    out = []
    for i, (height, width) in enumerate([(384, 640), (256, 1024)]):
        image, mask = tissue_region(height, width, seed=i)
        out.append(TrainRegion(f"s{i}/whole", image, with_ignored(mask, "blobs", tile=128, seed=i)))
    return out


def test_cores_cover_the_region_once_with_the_whole_prediction(engine, regions):
    image = regions[0].image
    whole = engine.predict(image)
    covered = np.zeros(whole.shape, np.int32)
    for (top, left, bottom, right), core in engine.predict_cores(image):
        covered[top:bottom, left:right] += 1
        np.testing.assert_array_equal(core, whole[top:bottom, left:right])
    assert (covered == 1).all()


def test_validation_counts_as_the_whole_probabilities_would(engine, regions):
    assert any((r.mask == IGNORE_LABEL).any() for r in regions)
    metrics, preview = validate_regions(engine, regions, threshold=0.5)
    whole = [engine.predict(r.image) for r in regions]
    assert all(0 < (p >= 0.5).mean() < 1 for p in whole)
    counts = [count(p, r.mask, threshold=0.5) for p, r in zip(whole, regions)]
    for r, c in zip(regions, counts):
        assert metrics[f"val_dice/{r.key}"] == c.scores()["dice"]
    assert metrics["val_dice"] == (counts[0] + counts[1]).scores()["dice"]
    assert metrics["val_dice_mean"] == pytest.approx(np.mean([c.scores()["dice"] for c in counts]))
    # The first region's preview is its probabilities on its picture's stride.
    assert preview.step == preview_step(regions[0].image.shape)
    np.testing.assert_array_equal(preview.array, whole[0][:: preview.step, :: preview.step])
    np.testing.assert_array_equal(probability_preview(engine, regions[0].image).array, preview.array)
    # On a stride that the tile cores do not start on (cores of 192x320, every 7th pixel).
    small = ProbabilityPreview(regions[0].image.shape, max_side=100)
    assert small.step == 7
    for core, probability in engine.predict_cores(regions[0].image):
        small.add(core, probability)
    np.testing.assert_array_equal(small.array, whole[0][::7, ::7])


def test_the_overlay_from_a_preview_is_the_overlay_from_the_probabilities(engine, regions, tmp_path):
    region = regions[1]
    whole = engine.predict(region.image)
    preview = ProbabilityPreview(region.image.shape, max_side=300)
    for core, probability in engine.predict_cores(region.image):
        preview.add(core, probability)
    a = overlay_png(region.image, whole, region.mask, tmp_path / "a.png", max_side=300)
    b = overlay_png(region.image, preview, region.mask, tmp_path / "b.png", max_side=300)
    pixels = np.asarray(Image.open(a))
    assert preview.step == 4 and pixels.shape == (64, 256, 3)
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(b)))
    with pytest.raises(ValueError, match="stride"):
        overlay_png(region.image, preview, region.mask, tmp_path / "c.png", max_side=2048)


def test_counting_cores_refuses_a_reference_with_nothing_but_ignored_pixels(engine, regions):
    region = regions[0]
    ignored = np.full(region.mask.shape, IGNORE_LABEL, np.uint8)
    with pytest.raises(MaskError, match="nothing to score"):
        count_cores(engine.predict_cores(region.image), ignored)
