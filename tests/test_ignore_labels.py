"""Masks with ignored pixels (label 255): the tiled step on every evaluator path against a float64 step over the labelled pixels alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from gigaseg.errors import MaskError
from gigaseg.evaluation import IGNORE_LABEL
from gigaseg.losses import region_loss
from gigaseg.model import build_unet
from gigaseg.streaming import TiledEngine, loss_and_gradients, plain_step
from gigaseg.streaming.reference import float64_copy
from test_distributed import MIRRORED_SETUP
from test_streaming_engine import tissue_region

TOLERANCE = 1e-4  # as tests/test_streaming_engine.py
TILE = 128  # the default model's halo is 64 and its total stride 64
LOSSES = ("bce", "dice", "dice_bce")
#: How TiledEngine evaluates a tile: fused numba tail, space-to-depth TensorFlow, the Keras model.
PATHS = {name: {"evaluator": name} for name in ("fused", "lowered", "keras")}


def with_ignored(mask: np.ndarray, kind: str, tile: int = TILE, seed: int = 0) -> np.ndarray:
    """``mask`` with some pixels set to the ignore label, in one of the layouts the tests use."""
    mask = mask.copy()
    height, width = mask.shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    if kind == "blobs":
        # Discs centred on tile borders (so in some tile's core and in its neighbours' halos),
        # and a few anywhere.
        borders_y = [b for b in range(tile, height, tile)] or [height // 2]
        borders_x = [b for b in range(tile, width, tile)] or [width // 2]
        centres = [(rng.choice(borders_y) + rng.integers(-8, 9), rng.integers(0, width)) for _ in range(4)]
        centres += [(rng.integers(0, height), rng.choice(borders_x) + rng.integers(-8, 9)) for _ in range(4)]
        centres += [(rng.integers(0, height), rng.integers(0, width)) for _ in range(3)]
        for cy, cx in centres:
            radius = rng.uniform(6, 0.3 * tile)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = IGNORE_LABEL
    elif kind == "tile":
        mask[:tile, tile : 2 * tile] = IGNORE_LABEL  # the whole core of tile (0, 1)
    elif kind == "mostly":
        # A few labelled patches, one across the tissue's edge, the rest ignored (about 97%).
        keep = np.zeros_like(mask, dtype=bool)
        keep[int(0.4 * height) - 12 : int(0.4 * height) + 12, int(0.15 * width) - 20 : int(0.15 * width) + 20] = True
        keep[height - 24 : height - 8, 8:40] = True
        keep[int(0.4 * height) - 8 : int(0.4 * height) + 8, int(0.45 * width) - 8 : int(0.45 * width) + 8] = True
        mask[~keep] = IGNORE_LABEL
    else:
        raise ValueError(kind)
    return mask


def labelled_only_step(model, image: np.ndarray, mask: np.ndarray, loss: str):
    """Loss and gradients of a float64 copy of ``model`` whose loss sees only the labelled pixels (no ignore label reaches it)."""
    net = float64_copy(model)
    keep = mask != IGNORE_LABEL
    labels = tf.constant(mask[keep], tf.float64)
    with tf.GradientTape() as tape:
        p = net(image[np.newaxis], training=True)[0, :, :, 0]
        value = region_loss(loss, tf.boolean_mask(p, keep), labels)
    return float(value), [g.numpy() for g in tape.gradient(value, net.trainable_variables)]


def relative_errors(gradients, reference):
    return [float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)) for g, r in zip(gradients, reference)]


def assert_exact(loss, gradients, reference_loss, reference_gradients, tolerance=TOLERANCE):
    assert abs(loss - reference_loss) <= tolerance * abs(reference_loss), (loss, reference_loss)
    errors = relative_errors(gradients, reference_gradients)
    assert max(errors) <= tolerance, errors


@pytest.fixture(scope="module")
def region():
    return tissue_region(256, 384, seed=5)


@pytest.fixture(scope="module")
def references(model, region):
    """Float64 labelled-only references, computed once per (mask kind, loss)."""
    cache = {}

    def get(kind: str, loss: str):
        if (kind, loss) not in cache:
            image, mask = region
            cache[kind, loss] = labelled_only_step(model, image, with_ignored(mask, kind), loss)
        return cache[kind, loss]

    return get


@pytest.fixture(scope="module")
def engines(model):
    """One engine per (loss, path), so each traces its graphs once for every mask."""
    cache = {}

    def get(loss: str, path: str) -> TiledEngine:
        if (loss, path) not in cache:
            engine = TiledEngine(model, loss=loss, tile_size=TILE, **PATHS[path])
            assert engine.evaluator.name == path  # the engine really evaluates tiles the way this test means
            cache[loss, path] = engine
        return cache[loss, path]

    return get


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", ["blobs", "tile", "mostly"])
def test_tiled_step_with_ignored_pixels_is_exact(region, references, engines, kind, loss, path):
    image, mask = region
    labels = with_ignored(mask, kind)
    assert np.any(labels == IGNORE_LABEL) and np.any(labels == 0) and np.any(labels == 1)
    reference_loss, reference = references(kind, loss)
    result = engines(loss, path).step(image, labels)
    assert_exact(result.loss, result.gradients, reference_loss, reference)
    assert result.sums["n"] == np.count_nonzero(labels != IGNORE_LABEL)
    assert result.sums["C"] == np.count_nonzero(labels == 1)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", ["blobs", "mostly"])
def test_plain_steps_with_ignored_pixels_match_the_labelled_only_step(model, region, references, engines, kind, loss):
    image, mask = region
    labels = with_ignored(mask, kind)
    reference_loss, reference = references(kind, loss)
    plain64 = plain_step(model, image, labels, loss=loss, dtype="float64")
    assert_exact(plain64.loss, plain64.gradients, reference_loss, reference, tolerance=1e-10)
    plain32 = plain_step(model, image, labels, loss=loss)
    assert_exact(plain32.loss, plain32.gradients, reference_loss, reference)
    # The hard Dice counts labelled pixels only, here and in the tiled step.
    keep = labels != IGNORE_LABEL
    predicted = model(image[np.newaxis])[0, :, :, 0].numpy() >= 0.5
    tissue = labels == 1
    expected = 2 * np.count_nonzero(predicted & tissue) / (np.count_nonzero(predicted & keep) + np.count_nonzero(tissue))
    assert plain32.dice == pytest.approx(expected, abs=1e-12)
    tiled = engines(loss, "fused").step(image, labels)
    assert tiled.dice == pytest.approx(plain32.dice, abs=1e-6)


def test_ignoring_half_the_region_is_not_the_step_on_all_of_it(model, region, engines):
    image, mask = region
    labels = mask.copy()
    labels[:, 192:] = IGNORE_LABEL  # the right half, whose pixels still feed the left half's halo
    engine = engines("dice_bce", "fused")
    ignored = engine.step(image, labels)
    reference_loss, reference = labelled_only_step(model, image, labels, "dice_bce")
    assert_exact(ignored.loss, ignored.gradients, reference_loss, reference)
    everything = engine.step(image, mask)
    assert abs(everything.loss - ignored.loss) > 1e-3 * abs(ignored.loss)
    assert max(relative_errors(everything.gradients, ignored.gradients)) > 1e-2


def test_a_region_without_labelled_pixels_is_refused(model, region):
    image, _ = region
    ignored = np.full(image.shape[:2], IGNORE_LABEL, np.uint8)
    for loss in LOSSES:
        with pytest.raises(MaskError, match="every pixel of the mask is 255"):
            TiledEngine(model, loss=loss, tile_size=TILE).step(image, ignored)
    with pytest.raises(MaskError, match="every pixel of the mask is 255"):
        loss_and_gradients(model, image, ignored, loss="bce", tile_size=TILE)
    with pytest.raises(MaskError, match="every pixel of the mask is 255"):
        plain_step(model, image, ignored, loss="dice_bce")


@pytest.mark.parametrize("values", [(2,), (254,), (2, 254), (7, 128, 200)])
def test_masks_with_other_values_are_refused_naming_them(model, region, values):
    image, mask = region
    bad = mask.copy()
    bad[5, 7] = IGNORE_LABEL
    for i, value in enumerate(values):
        bad[100 + i, 50 : 60 + i] = value
    shown = ", ".join(str(v) for v in sorted(values))
    allowed = r"0 \(background\), 1 \(tissue\), 255 \(ignore\)"
    with pytest.raises(MaskError, match=f"value\\(s\\) {shown}; a training mask may hold only {allowed}"):
        TiledEngine(model, loss="dice", tile_size=TILE).step(image, bad)
    with pytest.raises(MaskError, match=f"value\\(s\\) {shown}"):
        plain_step(model, image, bad, loss="bce")


def test_labels_are_counted_exactly_in_bands_and_lanes(tmp_path):
    from gigaseg.streaming.labels import count_labelled

    rng = np.random.default_rng(2)
    # Widths around the counting lanes (64 bytes, 255 rounds) and a memory map read in bands.
    for shape in [(3, 1), (5, 63), (4, 64), (6, 65), (2, 64 * 255 + 17), (9, 64 * 511)]:
        mask = rng.choice(np.array([0, 1, IGNORE_LABEL], np.uint8), size=shape, p=[0.45, 0.3, 0.25])
        assert count_labelled(mask) == np.count_nonzero(mask != IGNORE_LABEL)
        assert count_labelled(mask[:, ::-1]) == np.count_nonzero(mask != IGNORE_LABEL)
    big = rng.choice(np.array([0, 1, IGNORE_LABEL], np.uint8), size=(3000, 2000))
    np.save(tmp_path / "mask.npy", big)
    assert count_labelled(np.load(tmp_path / "mask.npy", mmap_mode="r")) == np.count_nonzero(big != IGNORE_LABEL)
    assert count_labelled(big.astype(np.int64)) == np.count_nonzero(big != IGNORE_LABEL)
    assert count_labelled(np.zeros((4, 4), bool)) == 16


@pytest.fixture(scope="module")
def unit_range_model():
    """gigaunet with its input rescaled to [-1, 1], where float32 itself stays within 1e-4 of float64."""
    import keras

    keras.utils.set_random_seed(0)
    return build_unet(input_range=(-1.0, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", ["blobs", "tile", "mostly"])
def test_tiled_step_with_ignored_pixels_is_exact_on_larger_regions(unit_range_model, kind, loss):
    image, mask = tissue_region(768, 1536, seed=9)
    labels = with_ignored(mask, kind, tile=256, seed=3)
    reference_loss, reference = labelled_only_step(unit_range_model, image, labels, loss)
    for path, options in PATHS.items():
        engine = TiledEngine(unit_range_model, loss=loss, tile_size=256, **options)
        for tile_size in [(256, 256), (320, 448)]:
            engine.tile_size = tile_size
            result = engine.step(image, labels)
            assert abs(result.loss - reference_loss) <= TOLERANCE * abs(reference_loss), (path, tile_size)
            errors = relative_errors(result.gradients, reference)
            assert max(errors) <= TOLERANCE, (path, tile_size, errors)

MIRRORED = MIRRORED_SETUP + textwrap.dedent(
    """
    mask[40:150, 100:300] = 255  # across tiles of every replica's share
    mask[:, 600:] = 255
    out = {}
    for loss in ("dice_bce", "bce"):
        spread = DistributedEngine(model, replicas, loss=loss, tile_size=128).step(image, mask)
        single = TiledEngine(model, loss=loss, tile_size=128).step(image, mask)
        out[loss] = {
            "loss": [spread.loss, single.loss], "n": [spread.sums["n"], single.sums["n"]],
            "error": max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))
                         for a, b in zip(spread.gradients, single.gradients)),
        }
    out["labelled"] = int(np.count_nonzero(mask != 255))
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_replicas_share_a_region_with_ignored_pixels_like_one_engine():
    """Three logical CPU devices split the tiles; their sums over labelled pixels add up to one engine's."""
    done = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for loss in ("dice_bce", "bce"):
        spread, single = out[loss]["loss"]
        assert abs(spread - single) <= 1e-6 * abs(single)
        assert out[loss]["n"] == [out["labelled"]] * 2
        assert out[loss]["error"] <= 1e-6
