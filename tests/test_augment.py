"""Augmentation on the fly: lazy flipped and turned views equal slices of the transformed region, the tiled step on them is exact, colour changes are per pixel and reproducible."""

import dataclasses
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from test_streaming_engine import TOLERANCE, relative_errors, tissue_region

from gigaseg import augment
from gigaseg.augment import (
    Augmentation,
    AugmentConfig,
    TransformedRegion,
    colour_transform,
    draw,
    transform_region,
)
from gigaseg.errors import ConfigError, MaskError
from gigaseg.evaluation import IGNORE_LABEL

D4 = list(itertools.product(range(4), (False, True)))
# A colour change well away from the identity in every parameter.
COLOUR = {"hed_scale": (1.04, 0.95, 1.02), "hed_shift": (0.008, -0.006, 0.003), "brightness": 0.04, "contrast": 0.92, "saturation": 1.08}


def transformed(array: np.ndarray, turns: int, flip: bool) -> np.ndarray:
    """The whole transformed region, by numpy."""
    return np.rot90(np.flip(array, 1) if flip else array, turns)


def random_region(height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 1, IGNORE_LABEL], np.uint8), (height, width))
    return image, mask


def windows(height: int, width: int):
    """Windows touching and crossing every edge (numpy clamps the ends), inside, whole, empty and one pixel."""
    return [
        (slice(0, 40), slice(0, 70)),
        (slice(height - 30, height + 50), slice(width - 20, width + 9)),
        (slice(17, 83), slice(width - 64, None)),
        (slice(None, 25), slice(31, 160)),
        (slice(5, height + 100), slice(3, 4)),
        (slice(None), slice(None)),
        (slice(9, 9), slice(0, 10)),
        (slice(height - 1, height), slice(width - 1, width)),
    ]


@pytest.mark.parametrize("turns, flip", D4)
def test_views_equal_slices_of_the_transformed_region(turns, flip, tmp_path):
    image, mask = random_region(96, 160, seed=turns)
    np.save(tmp_path / "image.npy", image)
    mapped = np.load(tmp_path / "image.npy", mmap_mode="r")  # read-only memory map, as regions are stored
    geometric = Augmentation(turns=turns, flip=flip)
    coloured = Augmentation(turns=turns, flip=flip, **COLOUR)
    expected_image, expected_mask = transformed(image, turns, flip), transformed(mask, turns, flip)
    expected_colour = colour_transform(np.ascontiguousarray(expected_image), coloured)
    plain, colour, from_map = TransformedRegion(image, mask, geometric), TransformedRegion(image, mask, coloured), TransformedRegion(mapped, None, coloured)
    assert plain.shape == colour.shape == expected_mask.shape
    assert plain.image.shape == expected_image.shape and plain.image.ndim == 3 and plain.image.dtype == np.uint8
    assert plain.mask.shape == expected_mask.shape and plain.mask.ndim == 2 and plain.mask.size == mask.size
    for key in windows(*expected_mask.shape):
        np.testing.assert_array_equal(plain.image[key], expected_image[key])
        np.testing.assert_array_equal(plain.mask[key], expected_mask[key])
        np.testing.assert_array_equal(colour.mask[key], expected_mask[key])
        np.testing.assert_array_equal(colour.image[key], expected_colour[key])
        np.testing.assert_array_equal(from_map.image[key], expected_colour[key])
        assert colour.image[key].flags.c_contiguous
    # A band of rows (as masks are counted) and whole arrays, as the plain step takes them.
    np.testing.assert_array_equal(plain.mask[10:30], expected_mask[10:30])
    whole_image, whole_mask = transform_region(image, mask, coloured)
    np.testing.assert_array_equal(whole_image, expected_colour)
    np.testing.assert_array_equal(whole_mask, expected_mask)


def test_views_of_other_dtypes_and_bad_reads():
    labels = np.arange(12, dtype=np.int32).reshape(3, 4)
    view = augment.TransformedArray(labels, Augmentation(turns=1))
    np.testing.assert_array_equal(view[1:3, :], np.rot90(labels)[1:3, :])
    assert not np.shares_memory(view[:, :], labels) and len(view) == 4
    image, mask = random_region(64, 64)
    region = TransformedRegion(image, mask, Augmentation(turns=3, **COLOUR))
    for key in [(slice(0, 8, 2), slice(None)), 3, (slice(None), slice(None), 0), (slice(None), [1, 2])]:
        with pytest.raises(IndexError, match="top:bottom"):
            region.image[key]
    with pytest.raises(ValueError, match="uint8 RGB"):
        TransformedRegion(image.astype(np.float32), mask, Augmentation(**COLOUR))
    with pytest.raises(MaskError, match="does not match"):
        TransformedRegion(image, mask[:32], Augmentation())
    with pytest.raises(ValueError, match="turns"):
        Augmentation(turns=4)


@pytest.fixture(scope="module")
def engines(model):
    """The default tiled engine, and the Keras path on a float64 copy of the model (a float64 tiled step)."""
    from gigaseg.streaming import TiledEngine
    from gigaseg.streaming.reference import float64_copy

    return TiledEngine(model, loss="dice_bce", tile_size=128), TiledEngine(float64_copy(model), loss="dice_bce", tile_size=128, evaluator="keras")


def whole_transformed(image, mask, augmentation):
    """The whole transformed region by numpy, coloured as a whole."""
    turns, flip = augmentation.turns, augmentation.flip
    whole_image = colour_transform(np.ascontiguousarray(transformed(np.asarray(image), turns, flip)), augmentation)
    return whole_image, np.ascontiguousarray(transformed(np.asarray(mask), turns, flip))


@pytest.mark.parametrize("turns, flip", D4)
def test_tiled_step_on_the_view_equals_the_plain_step_on_the_transformed_region(model, engines, turns, flip):
    from gigaseg.streaming import plain_loss_and_gradients

    engine, engine64 = engines
    image, mask = tissue_region(256, 512, seed=turns + 4 * flip)
    augmentation = Augmentation(turns=turns, flip=flip, **COLOUR)
    whole_image, whole_mask = whole_transformed(image, mask, augmentation)
    region = TransformedRegion(image, mask, augmentation)
    # Odd turns swap the region's sides, and with them the tile grid: 8 tiles with halos.
    assert engine.plan(region.shape).grid == ((4, 2) if turns % 2 else (2, 4))
    # In float64 the tiled step on the views is the plain step on the transformed arrays to rounding.
    loss64, grads64 = plain_loss_and_gradients(model, whole_image, whole_mask, loss="dice_bce", dtype="float64")
    tiled64 = engine64.step(*region)
    assert abs(tiled64.loss - loss64) <= 1e-12 * abs(loss64)
    for tiled, plain in zip(tiled64.gradients, grads64):
        np.testing.assert_allclose(tiled, plain, rtol=0, atol=1e-12 * np.max(np.abs(plain)))
    # The default float32 engine reads the views as it reads arrays: the same step, bit for bit,
    # within the float32 tolerance of the engine's own tests.
    result, on_arrays = engine.step(*region), engine.step(whole_image, whole_mask)
    assert result.tiles == 8 and result.loss == on_arrays.loss
    assert all(np.array_equal(a, b) for a, b in zip(result.gradients, on_arrays.gradients))
    _, plain32 = plain_loss_and_gradients(model, whole_image, whole_mask, loss="dice_bce", dtype="float32")
    assert abs(result.loss - loss64) <= TOLERANCE * abs(loss64)
    tiled_errors, plain_errors = relative_errors(result.gradients, grads64), relative_errors(plain32, grads64)
    assert all(t <= p + TOLERANCE for t, p in zip(tiled_errors, plain_errors)), (tiled_errors, plain_errors)


@pytest.mark.slow
@pytest.mark.parametrize("turns, flip", D4)
def test_tiled_step_on_views_of_a_memory_map_with_uneven_tiles(model, tmp_path, turns, flip):
    from gigaseg.streaming import TiledEngine, plain_loss_and_gradients
    from gigaseg.streaming.reference import float64_copy

    image, mask = tissue_region(512, 768, seed=10 + turns)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "mask.npy", mask)
    image_map, mask_map = (np.load(tmp_path / name, mmap_mode="r") for name in ("image.npy", "mask.npy"))
    augmentation = dataclasses.replace(draw(AugmentConfig(enabled=True), 0, turns, "uneven"), turns=turns, flip=flip)
    region = TransformedRegion(image_map, mask_map, augmentation)
    whole_image, whole_mask = whole_transformed(image, mask, augmentation)
    loss64, grads64 = plain_loss_and_gradients(model, whole_image, whole_mask, loss="dice", dtype="float64")
    # Tiles that divide neither side of the region.
    result = TiledEngine(float64_copy(model), loss="dice", tile_size=(192, 320), evaluator="keras").step(*region)
    assert result.tiles == (8 if turns % 2 else 9)
    assert abs(result.loss - loss64) <= 1e-12 * abs(loss64)
    for tiled, plain in zip(result.gradients, grads64):
        np.testing.assert_allclose(tiled, plain, rtol=0, atol=1e-12 * np.max(np.abs(plain)))


def test_colour_change_per_tile_equals_the_whole_region():
    image, _ = random_region(211, 333, seed=5)  # odd sizes: rows that end inside a vector of pixels
    augmentation = draw(AugmentConfig(enabled=True, hed_sigma=0.2, hed_shift=0.05, brightness=0.1, contrast=0.3, saturation=0.3), 3, 1, "r")
    whole = colour_transform(image, augmentation)
    assert np.mean(whole != image) > 0.5
    for top, left in itertools.product(range(0, 211, 37), range(0, 333, 53)):
        tile = colour_transform(image[top : top + 41, left : left + 59], augmentation)
        np.testing.assert_array_equal(tile, whole[top : top + 41, left : left + 59])


def test_colour_change_matches_scikit_image_stain_round_trip():
    from skimage.color import combine_stains, hed_from_rgb, rgb2hed, rgb_from_hed

    np.testing.assert_allclose(augment.HED_FROM_RGB, hed_from_rgb, rtol=1e-12)
    np.testing.assert_allclose(augment.RGB_FROM_HED, rgb_from_hed, rtol=1e-12)
    pixels = np.random.default_rng(7).integers(0, 256, (400, 500, 3), dtype=np.uint8)
    # rgb2hed clips negative stains to 0; this module keeps them (so that a zero jitter is the
    # identity), so compare on the pixels where rgb2hed's clip does nothing.
    rgb = np.maximum(pixels / 255.0, 1e-6)
    plain = (np.log(rgb) / np.log(1e-6)) @ hed_from_rgb
    keep = np.all(plain >= 0, axis=-1)
    assert keep.sum() > 10_000
    a = Augmentation(**COLOUR)
    stains = rgb2hed(pixels) * np.array(a.hed_scale) + np.array(a.hed_shift)
    x = combine_stains(stains, rgb_from_hed) * 255.0
    x = (x + 255.0 * a.brightness - augment.CONTRAST_PIVOT) * a.contrast + augment.CONTRAST_PIVOT
    luma = (x @ augment.LUMA)[..., None]
    expected = np.rint(np.clip(luma + a.saturation * (x - luma), 0, 255))
    difference = np.abs(colour_transform(pixels, a).astype(np.float64) - expected)[keep]
    assert difference.max() <= 1 and np.mean(difference == 0) > 0.999


def test_identity_parameters_give_back_every_colour():
    # The float32 arithmetic itself: the identity's constants map each of the 2^24 colours to itself.
    pixels = np.empty((256, 256, 256, 3), np.uint8)
    values = np.arange(256, dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = values[:, None, None], values[None, :, None], values
    pixels = pixels.reshape(4096, 4096, 3)
    out = np.empty_like(pixels)
    augment._colour_pixels(pixels.reshape(-1), out.reshape(4096, -1), 0, 4096, 1, *augment.colour_maps(Augmentation()))
    np.testing.assert_array_equal(out, pixels)


def test_disabled_is_the_identity():
    image, mask = random_region(64, 128)
    augmentation = draw(AugmentConfig(), 0, 0, "slide-1/region-0")
    assert augmentation == Augmentation() and not augmentation.changes_colour
    assert draw(AugmentConfig(enabled=True, hed_sigma=0, hed_shift=0, brightness=0, contrast=0, saturation=0), 0, 0, "x").changes_colour is False
    region = TransformedRegion(image, mask, augmentation)
    np.testing.assert_array_equal(region.image[10:50, 20:90], image[10:50, 20:90])
    np.testing.assert_array_equal(region.mask[:, :], mask)
    same = colour_transform(image, augmentation)
    assert same is not image and np.array_equal(same, image)


def draws(keys):
    return [draw(AugmentConfig(enabled=True), seed, epoch, key).describe() for seed, epoch, key in keys]


KEYS = [(0, 0, "slides/a.tiff#0"), (0, 1, "slides/a.tiff#0"), (0, 0, "slides/a.tiff#1"), (1, 0, "slides/a.tiff#0"), (7, 12, "b:ü")]


def test_draws_are_reproducible_across_processes():
    code = (
        "import json, sys; from gigaseg.augment import AugmentConfig, draw; "
        "keys = json.loads(sys.argv[1]); "
        "print(json.dumps([draw(AugmentConfig(enabled=True), s, e, k).describe() for s, e, k in keys]))"
    )
    child = subprocess.run([sys.executable, "-c", code, json.dumps(KEYS)], capture_output=True, text=True, check=True)
    assert json.loads(child.stdout.strip().splitlines()[-1]) == draws(KEYS)


def test_draws_differ_between_epochs_regions_and_seeds_and_stay_in_range():
    described = draws(KEYS)
    assert all(a != b for a, b in itertools.combinations(described, 2))
    config = AugmentConfig(enabled=True)
    many = [draw(config, 0, epoch, f"region-{k}") for epoch in range(4) for k in range(50)]
    assert {(a.turns, a.flip) for a in many} == set(D4)
    scales = np.array([a.hed_scale for a in many])
    shifts = np.array([a.hed_shift for a in many])
    assert np.all(np.abs(scales - 1) <= config.hed_sigma) and np.all(np.abs(shifts) <= config.hed_shift)
    assert scales.std() > config.hed_sigma / 4
    assert all(abs(a.brightness) <= config.brightness and abs(a.contrast - 1) <= config.contrast and abs(a.saturation - 1) <= config.saturation for a in many)
    # Switching flips off, or resizing one change, leaves the other draws as they were.
    still = draw(AugmentConfig(enabled=True, flips=False, brightness=0.2), 0, 0, "region-0")
    first = many[0]
    assert (still.turns, still.flip) == (0, False) and still.hed_scale == first.hed_scale and still.contrast == first.contrast
    assert still.brightness == pytest.approx(first.brightness * 4)


def test_describe_gives_flat_plain_values():
    values = Augmentation(turns=3, flip=True, **COLOUR).describe()
    assert values["turns"] == 3 and values["flip"] is True and values["hed_scale_e"] == 0.95 and values["hed_shift_d"] == 0.003
    assert set(values) == {"turns", "flip", "brightness", "contrast", "saturation"} | {f"hed_{p}_{s}" for p in ("scale", "shift") for s in "hed"}
    assert all(type(v) in (int, float, bool) for v in values.values())


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"hed_sigma": 1.5}, "augment.hed_sigma must be a number in \\[0, 1\\)"),
        ({"contrast": -0.1}, "augment.contrast"),
        ({"brightness": "0.1"}, "augment.brightness"),
        ({"enabled": "yes"}, "augment.enabled must be true or false"),
    ],
)
def test_bad_settings_are_refused(setting, message):
    with pytest.raises(ConfigError, match=message):
        draw(AugmentConfig(**setting), 0, 0, "r")
