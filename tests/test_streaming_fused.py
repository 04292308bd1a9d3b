"""The fused full-resolution tail: same losses, sums, gradients and probabilities as TensorFlow's evaluation of the layers it replaces."""

from __future__ import annotations

import numpy as np
import pytest

from gigaseg.model import build_unet
from gigaseg.streaming import TiledEngine
from gigaseg.streaming.fastpath import to_blocks
from gigaseg.streaming.fused import FusedTail, RowSplitter, Surrogate, TailParams, _sigmoid
from gigaseg.streaming.fused_conv import FusedFirstConv


def random_params(rng) -> TailParams:
    """A tail of 8 input channels, 4 filters and 4 x 4 blocks, with the demo's rescaling."""
    return TailParams.as_float32(
        rng.standard_normal((8, 64)), rng.standard_normal(64), rng.standard_normal(4), rng.standard_normal(3), 0.2, 7 / 255, -6.0
    )


@pytest.fixture(scope="module")
def region():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)
    mask = (rng.random((384, 512)) > 0.6).astype(np.uint8)
    return image, mask


@pytest.mark.parametrize("loss", ["dice", "bce", "dice_bce"])
def test_fused_step_matches_the_tensorflow_tail(model, region, loss):
    image, mask = region
    fused = TiledEngine(model, loss=loss, tile_size=128)
    assert fused.evaluator.name == "fused" and fused.evaluator.tail.first is not None  # pass 1 runs the first convolution fused
    plain = TiledEngine(model, loss=loss, tile_size=128, evaluator="lowered")
    a, b = fused.step(image, mask), plain.step(image, mask)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    assert a.dice == b.dice
    for key in ("A", "B", "C", "bce_sum", "hard_intersection", "hard_predicted"):
        assert a.sums[key] == pytest.approx(b.sums[key], rel=1e-6, abs=1e-9), key
    for g, r in zip(a.gradients, b.gradients):
        assert np.linalg.norm(g - r) <= 1e-5 * np.linalg.norm(r)


def test_fused_probabilities_match_the_tensorflow_tail(model, region):
    image, _ = region
    fused = TiledEngine(model, tile_size=128).predict(image)
    plain = TiledEngine(model, tile_size=128, evaluator="lowered").predict(image)
    np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-6)


def test_sums_and_gradients_do_not_depend_on_the_number_of_threads():
    rng = np.random.default_rng(3)
    value = rng.standard_normal((37, 21, 8)).astype(np.float32)
    image = rng.integers(0, 256, (37, 21, 48), dtype=np.uint8)
    labels = rng.integers(0, 2, (37, 21, 16), dtype=np.uint8)
    params = random_params(rng)
    one, three = FusedTail(RowSplitter(1)), FusedTail(RowSplitter(3))
    np.testing.assert_array_equal(one.sums(value, image, labels, params, True), three.sums(value, image, labels, params, True))
    for a, b in zip(one.gradients(value, image, labels, params, Surrogate(1e-3, -2e-3, 1e-4)),
                    three.gradients(value, image, labels, params, Surrogate(1e-3, -2e-3, 1e-4))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one.probabilities(value, image, params), three.probabilities(value, image, params))


def test_sigmoid_is_within_float32_rounding():
    z = np.linspace(-60, 60, 240_001).astype(np.float32)
    exact = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    out = z.copy()
    _sigmoid(out, np.empty(z.shape, np.int32))
    assert np.max(np.abs(out - exact) / exact) < 3e-7


def test_a_model_with_another_tail_uses_tensorflow_and_stays_exact(region):
    image, mask = region
    model = build_unet(activation="elu")  # the fused kernels know ReLU only
    engine = TiledEngine(model, loss="dice", tile_size=128)
    assert engine.evaluator.name == "lowered"
    assert "ReLU" in dict(engine.choice.skipped)["fused"]
    whole = TiledEngine(model, loss="dice", tile_size=(384, 512)).step(image, mask)
    tiled = engine.step(image, mask)
    assert tiled.loss == pytest.approx(whole.loss, rel=1e-6)



@pytest.mark.parametrize(("factor", "kernel"), [(4, 7), (4, 4), (2, 5), (4, 11)])
def test_first_convolution_matches_tensorflow(factor, kernel):
    import tensorflow as tf

    rng = np.random.default_rng(kernel)
    height, width = 12 * factor, 9 * factor
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    weights = rng.standard_normal((kernel, kernel, 3, 4)).astype(np.float32) * 0.2
    bias = rng.standard_normal(4).astype(np.float32) * 0.5
    scale, offset = 7 / 255, -6.0
    x = tf.cast(image[np.newaxis], tf.float32) * scale + offset
    reference = tf.nn.relu(tf.nn.conv2d(x, weights, factor, "SAME") + bias)[0].numpy()
    assert (reference > 0).mean() > 0.2 and (reference == 0).mean() > 0.05  # both sides of the ReLU
    conv = FusedFirstConv(factor, kernel, RowSplitter(2))
    out = conv.forward(to_blocks(image, factor), weights, bias, scale, offset)
    np.testing.assert_allclose(out, reference, rtol=0, atol=2e-5)


def test_forward_passes_run_the_first_convolution_fused_and_match_tensorflow(model):
    image = np.random.default_rng(3).integers(0, 256, (384, 256, 3), dtype=np.uint8)
    fused = TiledEngine(model, tile_size=128)
    assert fused.evaluator.tail.first is model.get_layer("down1")
    unfused = TiledEngine(model, tile_size=128)
    unfused.evaluator.tail.first = unfused.evaluator.tail.first_kernels = None  # TensorFlow's first convolution, the fused tail
    plain = TiledEngine(model, tile_size=128, evaluator="lowered")
    a, b, c = fused.predict(image), unfused.predict(image), plain.predict(image)
    np.testing.assert_allclose(a, c, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b, c, rtol=0, atol=1e-6)
    assert not np.array_equal(a, b)  # the fused convolution was really used: its rounding differs


def test_kernels_leave_ignored_pixels_out_of_sums_and_gradients():
    rng = np.random.default_rng(4)
    value = rng.standard_normal((23, 19, 8)).astype(np.float32)
    image = rng.integers(0, 256, (23, 19, 48), dtype=np.uint8)
    labels = rng.integers(0, 2, (23, 19, 16), dtype=np.uint8)
    params = random_params(rng)
    weights = Surrogate(1e-3, -2e-3, 1e-4)
    tail = FusedTail(RowSplitter(2))
    part = rng.random(labels.shape) < 0.4
    first, second = np.where(part, 255, labels).astype(np.uint8), np.where(part, labels, 255).astype(np.uint8)
    # The sums over the labelled pixels, from the kernel's own probabilities.
    p32 = tail.probabilities(value, image, params)
    p = p32.astype(np.float64)
    keep, y = first != 255, (first == 1).astype(np.float64)
    # Clipped in float32 as the kernel does (1 - 1e-7 is 1 - 2**-23 there): these weights saturate the sigmoid.
    q = np.clip(p32, np.float32(1e-7), np.float32(1) - np.float32(1e-7)).astype(np.float64)
    hard = (p >= 0.5) & keep
    expected = [np.sum(p * y), np.sum(p[keep]), np.sum(y), -np.sum((y * np.log(q) + (1 - y) * np.log(1 - q))[keep]),
                np.sum(hard * y), np.sum(hard)]
    np.testing.assert_allclose(tail.sums(value, image, first, params, True), expected, rtol=1e-6)
    # Every pixel's terms are its own: ignoring complementary halves splits the whole in two.
    whole = tail.gradients(value, image, labels, params, weights)
    halves = [tail.gradients(value, image, half, params, weights) for half in (first, second)]
    for total, a, b in zip(whole, *halves):
        np.testing.assert_allclose(a + b, total, rtol=1e-5, atol=1e-6 * np.max(np.abs(total)))
    for total, a, b in zip(tail.sums(value, image, labels, params, True), *(tail.sums(value, image, h, params, True) for h in (first, second))):
        assert a + b == pytest.approx(total, rel=1e-6)
