"""Region losses and the hard Dice metric, written once for plain and tiled steps.

Every loss here is a function of four region sums, which is what lets the tiled engine
compute it exactly: ``A = sum(p*y)``, ``B = sum(p)``, ``C = sum(y)`` and the summed
per-pixel binary cross-entropy, over ``n`` pixels.
"""

from __future__ import annotations

import tensorflow as tf

LOSSES = ("dice", "bce", "dice_bce")

#: Smoothing of the soft Dice; two empty masks give a loss of 0 (Dice 1).
DICE_EPS = 1.0
#: Probabilities are clipped like Keras' binary cross-entropy does.
BCE_CLIP = 1e-7
#: A pixel counts as tissue for the hard Dice when its probability is at least this.
HARD_THRESHOLD = 0.5


def check_loss_name(loss: str) -> str:
    """Return ``loss`` if it is known, else raise ValueError naming the choices."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss '{loss}'; choose one of {', '.join(LOSSES)}")
    return loss


def bce_pixels(p: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Per-pixel binary cross-entropy of probabilities ``p`` against 0/1 labels ``y``."""
    p = tf.clip_by_value(p, BCE_CLIP, 1.0 - BCE_CLIP)
    return -(y * tf.math.log(p) + (1.0 - y) * tf.math.log(1.0 - p))


def loss_from_sums(loss: str, a, b, c, bce_sum, n):
    """The region loss from its sums (works on tensors and on Python floats)."""
    dice = 1.0 - (2.0 * a + DICE_EPS) / (b + c + DICE_EPS)
    if loss == "dice":
        return dice
    bce = bce_sum / n
    if loss == "bce":
        return bce
    return dice + bce


def region_loss(loss: str, p: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """The loss of a whole region, given its probabilities and labels of the same shape."""
    check_loss_name(loss)
    a = tf.reduce_sum(p * y)
    b = tf.reduce_sum(p)
    c = tf.reduce_sum(y)
    n = tf.cast(tf.size(p), p.dtype)
    bce_sum = tf.reduce_sum(bce_pixels(p, y)) if loss != "dice" else tf.zeros((), p.dtype)
    return loss_from_sums(loss, a, b, c, bce_sum, n)


def hard_dice(intersection: float, predicted: float, truth: float) -> float:
    """Dice of binary masks from their counts; two empty masks agree perfectly (1.0)."""
    denominator = predicted + truth
    if denominator == 0:
        return 1.0
    return 2.0 * intersection / denominator


def hard_counts(p: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Counts for the hard Dice: (predicted tissue that is tissue, predicted tissue), as float64."""
    predicted = tf.cast(p >= HARD_THRESHOLD, tf.float64)
    return tf.reduce_sum(predicted * tf.cast(y, tf.float64)), tf.reduce_sum(predicted)


def dice_pixel_weights(a: float, b: float, c: float) -> tuple[float, float]:
    """The soft Dice's derivative with respect to one probability, for a background and a tissue pixel.

    ``dL/dp_i = -(2 y_i (B + C + eps) - (2A + eps)) / (B + C + eps)^2`` depends on the pixel
    only through its label, so it takes two values. The tiled engine back-propagates
    ``sum_i stop_gradient(dL/dp_i) * p_i`` with these, computed in float64 from the region sums.
    """
    denominator = float(b) + float(c) + DICE_EPS
    numerator = 2.0 * float(a) + DICE_EPS
    background = numerator / denominator**2
    tissue = -(2.0 * denominator - numerator) / denominator**2
    return background, tissue
