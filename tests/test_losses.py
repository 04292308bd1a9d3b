"""Region losses from sums, the Dice pixel weights used by the tiled engine, and the hard Dice."""

import numpy as np
import pytest
import tensorflow as tf

from gigaseg.losses import (
    IGNORE_LABEL,
    dice_pixel_weights,
    hard_counts,
    hard_dice,
    loss_from_sums,
    region_loss,
)


@pytest.fixture
def region():
    rng = np.random.default_rng(0)
    p = tf.constant(rng.random((32, 48)), tf.float64)
    y = tf.constant((rng.random((32, 48)) > 0.6).astype(np.float64))
    return p, y


@pytest.mark.parametrize("loss", ["dice", "bce", "dice_bce"])
def test_region_loss_equals_loss_from_its_sums(region, loss):
    p, y = region
    a, b, c = (float(tf.reduce_sum(t)) for t in (p * y, p, y))
    bce = float(tf.reduce_sum(-(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))))
    assert float(region_loss(loss, p, y)) == pytest.approx(loss_from_sums(loss, a, b, c, bce, 32 * 48), rel=1e-12)


def test_dice_pixel_weights_are_the_derivative_of_the_soft_dice(region):
    p, y = region
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss = region_loss("dice", p, y)
    grad = tape.gradient(loss, p).numpy()
    a, b, c = (float(tf.reduce_sum(t)) for t in (p * y, p, y))
    background, tissue = dice_pixel_weights(a, b, c)
    expected = np.where(y.numpy() > 0, tissue, background)
    np.testing.assert_allclose(grad, expected, rtol=1e-12)


def test_hard_dice_counts_pixels_at_or_above_one_half():
    p = tf.constant([[0.2, 0.5, 0.9, 0.7]])
    y = tf.constant([[0, 1, 0, 1]], tf.uint8)
    intersection, predicted = hard_counts(p, y)
    assert (float(intersection), float(predicted)) == (2.0, 3.0)
    assert hard_dice(2.0, 3.0, 2.0) == pytest.approx(0.8)


def test_two_empty_masks_have_dice_one_and_soft_dice_loss_zero():
    assert hard_dice(0, 0, 0) == 1.0
    assert loss_from_sums("dice", 0.0, 0.0, 0.0, 0.0, 10) == 0.0


@pytest.mark.parametrize("loss", ["dice", "bce", "dice_bce"])
def test_ignored_pixels_count_in_no_sum_and_get_no_gradient(region, loss):
    p, y = region
    rng = np.random.default_rng(1)
    ignored = rng.random(y.shape) < 0.3
    labels = tf.constant(np.where(ignored, IGNORE_LABEL, y.numpy()))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(p)
        with_ignore = region_loss(loss, p, labels)
        kept = tf.boolean_mask(p, ~ignored)
        labelled_only = region_loss(loss, kept, tf.boolean_mask(y, ~ignored))
    assert float(with_ignore) == pytest.approx(float(labelled_only), rel=1e-12)
    grad = tape.gradient(with_ignore, p).numpy()
    assert np.all(grad[ignored] == 0)
    np.testing.assert_allclose(grad[~ignored], tape.gradient(labelled_only, p).numpy()[~ignored], rtol=1e-12)


def test_hard_counts_leave_ignored_pixels_out():
    p = tf.constant([[0.2, 0.5, 0.9, 0.7, 0.8, 0.1]])
    y = tf.constant([[0, 1, 0, 1, 255, 255]], tf.uint8)
    intersection, predicted = hard_counts(p, y)
    assert (float(intersection), float(predicted)) == (2.0, 3.0)
