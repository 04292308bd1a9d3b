"""Exactness of the tiled step: tiled float32 against a plain whole-region float64 step with the same weights."""

import numpy as np
import pytest

from gigaseg.errors import MaskError
from gigaseg.model import build_unet
from gigaseg.streaming import (
    RegionShapeError,
    TiledEngine,
    loss_and_gradients,
    plain_loss_and_gradients,
    plain_step,
    predict_tiled,
)

TOLERANCE = 1e-4


def tissue_region(height: int, width: int, seed: int = 0):
    """An ellipse of pink tissue on near-white glass with noise: both classes, uneven over tiles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    mask = (((yy - 0.4 * height) / (0.3 * height)) ** 2 + ((xx - 0.45 * width) / (0.3 * width)) ** 2 < 1).astype(np.uint8)
    colour = np.where(mask[..., None] == 1, [180, 120, 190], [235, 230, 235])
    image = (colour + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)
    return image, mask


def relative_errors(gradients, reference):
    return [float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)) for g, r in zip(gradients, reference)]


def assert_exact(result_loss, gradients, reference_loss, reference_gradients):
    assert abs(result_loss - reference_loss) <= TOLERANCE * abs(reference_loss)
    errors = relative_errors(gradients, reference_gradients)
    assert max(errors) <= TOLERANCE, errors


@pytest.mark.parametrize("loss", ["bce", "dice", "dice_bce"])
def test_tiled_step_matches_float64_plain_step(model, loss):
    image, mask = tissue_region(256, 1024)
    reference_loss, reference = plain_loss_and_gradients(model, image, mask, loss=loss, dtype="float64")
    reference_dice = plain_step(model, image, mask, loss=loss).dice
    engine = TiledEngine(model, loss=loss, tile_size=128)
    # One engine, several plans: tiles that divide the region, that don't, non-square, and one tile.
    for tile_size in [(128, 128), (192, 192), (128, 320), (1024, 1024)]:
        engine.tile_size = tile_size
        result = engine.step(image, mask)
        assert_exact(result.loss, result.gradients, reference_loss, reference)
        assert result.dice == pytest.approx(reference_dice, abs=1e-6)
        assert all(g.dtype == np.float32 and g.shape == tuple(v.shape) for g, v in zip(result.gradients, model.trainable_variables))
    assert result.tiles == 1


def test_square_region_and_memory_maps(model, tmp_path):
    image, mask = tissue_region(512, 512, seed=3)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "mask.npy", mask)
    image_map = np.load(tmp_path / "image.npy", mmap_mode="r")
    mask_map = np.load(tmp_path / "mask.npy", mmap_mode="r")
    reference_loss, reference = plain_loss_and_gradients(model, image, mask, loss="dice", dtype="float64")
    loss, gradients = loss_and_gradients(model, image_map, mask_map, loss="dice", tile_size=192)
    assert_exact(loss, gradients, reference_loss, reference)


def test_keras_fallback_path_is_exact_too(model):
    image, mask = tissue_region(256, 512, seed=1)
    reference_loss, reference = plain_loss_and_gradients(model, image, mask, loss="dice_bce", dtype="float64")
    engine = TiledEngine(model, loss="dice_bce", tile_size=192, evaluator="keras")
    assert engine.evaluator.name == "keras"
    result = engine.step(image, mask)
    assert_exact(result.loss, result.gradients, reference_loss, reference)


def test_halo_zero_is_far_off(model):
    image, mask = tissue_region(256, 512, seed=2)
    _, reference = plain_loss_and_gradients(model, image, mask, loss="dice", dtype="float64")
    result = TiledEngine(model, loss="dice", tile_size=128, halo=0).step(image, mask)
    assert max(relative_errors(result.gradients, reference)) > 0.1


def test_progress_timing_and_prefetch(model):
    image, mask = tissue_region(256, 256)
    calls = []
    engine = TiledEngine(model, loss="dice", tile_size=128)
    result = engine.step(image, mask, progress=lambda done, total: calls.append((done, total)))
    assert engine.passes == 2 and result.tiles == 4
    assert calls == [(i, 8) for i in range(1, 9)]
    assert result.compute_time_s > 0 and result.data_time_s >= 0
    unfetched = TiledEngine(model, loss="dice", tile_size=128, prefetch=False).step(image, mask)
    assert unfetched.loss == pytest.approx(result.loss, rel=1e-12)


def test_predict_tiled_matches_the_plain_forward_and_fills_out(model, tmp_path):
    image, _ = tissue_region(320, 448)
    whole = model(image[np.newaxis])[0, :, :, 0].numpy()
    out = np.lib.format.open_memmap(tmp_path / "p.npy", "w+", np.float32, (320, 448))
    result = predict_tiled(model, image, tile_size=192, out=out)
    assert result is out
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), whole, atol=1e-5)


def test_bad_regions_are_refused(model):
    engine = TiledEngine(model, loss="dice", tile_size=128)
    image, mask = tissue_region(256, 256)
    with pytest.raises(RegionShapeError, match="crop it to 192x256"):
        engine.step(image[:200], mask[:200])
    with pytest.raises(MaskError, match="does not match"):
        engine.step(image, mask[:128])
    with pytest.raises(ValueError, match="uint8"):
        engine.step(image.astype(np.float32), mask)
    with pytest.raises(ValueError, match="unknown loss"):
        TiledEngine(model, loss="focal")


@pytest.fixture(scope="module")
def unit_range_model():
    """gigaunet with its input rescaled to [-1, 1], where float32 itself stays within 1e-4 of float64."""
    import keras

    keras.utils.set_random_seed(0)
    return build_unet(input_range=(-1.0, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(512, 2048), (1024, 2048), (2048, 2048)])
@pytest.mark.parametrize("loss", ["bce", "dice", "dice_bce"])
def test_tiled_step_is_exact_at_the_issue_sizes(unit_range_model, shape, loss):
    image, mask = tissue_region(*shape, seed=4)
    model = unit_range_model
    reference_loss, reference = plain_loss_and_gradients(model, image, mask, loss=loss, dtype="float64")
    engine = TiledEngine(model, loss=loss, tile_size=512)
    for tile_size in [512, 768, 4096]:
        engine.tile_size = (tile_size, tile_size)
        result = engine.step(image, mask)
        assert_exact(result.loss, result.gradients, reference_loss, reference)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bce", "dice_bce"])
def test_tiled_step_of_the_default_model_is_as_exact_as_a_plain_float32_step(model, loss):
    # With the default input range [-6, 1], float32 rounding of the forward pass alone moves
    # the deep layers' gradients up to ~7e-4 from float64 (ReLUs near zero flip), in a plain
    # step as much as in a tiled one. Tiling must add nothing beyond that.
    image, mask = tissue_region(1024, 2048, seed=4)
    reference_loss, reference = plain_loss_and_gradients(model, image, mask, loss=loss, dtype="float64")
    _, plain32 = plain_loss_and_gradients(model, image, mask, loss=loss, dtype="float32")
    result = TiledEngine(model, loss=loss, tile_size=512).step(image, mask)
    assert abs(result.loss - reference_loss) <= TOLERANCE * abs(reference_loss)
    tiled_errors = relative_errors(result.gradients, reference)
    plain_errors = relative_errors(plain32, reference)
    assert all(t <= p + TOLERANCE for t, p in zip(tiled_errors, plain_errors)), (tiled_errors, plain_errors)
    assert max(relative_errors(result.gradients, plain32)) <= 2e-4


def test_a_float64_copy_of_the_model_steps_tiled_to_float64_precision(model):
    # The Keras path of the engine follows the model's precision, so a float64 copy gives a
    # float64 tiled reference for regions too large for a float64 plain step.
    from gigaseg.streaming.reference import float64_copy

    image, mask = tissue_region(256, 512, seed=11)
    loss, grads = plain_loss_and_gradients(model, image, mask, loss="dice_bce", dtype="float64")
    result = TiledEngine(float64_copy(model), loss="dice_bce", tile_size=128, evaluator="keras").step(image, mask)
    assert abs(result.loss - loss) <= 1e-12 * abs(loss)
    for tiled, plain in zip(result.gradients, grads):
        assert tiled.dtype == np.float64
        np.testing.assert_allclose(tiled, plain, rtol=0, atol=1e-12 * np.max(np.abs(plain)))


def test_ordered_map_keeps_the_order_runs_concurrently_and_pulls_lazily():
    import threading
    import time

    from gigaseg.streaming.reader import ordered_map

    pulled, running, most = [], [0], [0]
    lock = threading.Lock()

    def items():
        for i in range(12):
            pulled.append(i)
            yield i

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02 * (i % 3 == 0))  # some finish out of order
        with lock:
            running[0] -= 1
        return i * i

    results = []
    for value in ordered_map(work, items(), 3):
        results.append(value)
        # Never more than the workers' worth of items taken ahead of what was yielded.
        assert len(pulled) <= len(results) + 3
    assert results == [i * i for i in range(12)]
    assert most[0] > 1
    assert list(ordered_map(work, iter(range(4)), 1)) == [0, 1, 4, 9]
