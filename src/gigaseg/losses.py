"""Region losses and the hard Dice metric, written once for plain and tiled steps.

Every loss here is a function of four region sums, which is what lets the tiled engine
compute it exactly: ``A = sum(p*y)``, ``B = sum(p)``, ``C = sum(y)`` and the summed
per-pixel binary cross-entropy, over the ``n`` labelled pixels. Labels are those of prepared
masks: 0 background, 1 tissue, :data:`IGNORE_LABEL` for pixels that count in no sum (nor in
``n``), so they get no gradient either.
"""

from __future__ import annotations

import tensorflow as tf

from gigaseg.evaluation import IGNORE_LABEL

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


def labelled_pixels(y: tf.Tensor, dtype) -> tuple[tf.Tensor, tf.Tensor]:
    """(1 where ``y`` is a label and 0 where it is :data:`IGNORE_LABEL`, ``y`` with ignored pixels as 0), both in ``dtype``.

    Multiplying by the first leaves labelled terms bit for bit as they were (``x * 1 == x``),
    so masks without ignored pixels give the sums they gave before ignore existed.
    """
    if y.dtype == tf.bool:  # a bool mask has no room for the ignore label
        return tf.ones_like(y, dtype), tf.cast(y, dtype)
    labelled = tf.cast(tf.not_equal(y, tf.cast(IGNORE_LABEL, y.dtype)), dtype)
    return labelled, tf.cast(y, dtype) * labelled


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
    """The loss of a whole region, given its probabilities and labels (0, 1 or :data:`IGNORE_LABEL`) of the same shape.

    Callers check that some pixel is labelled (``n > 0``); the BCE of none is 0 / 0.
    """
    check_loss_name(loss)
    labelled, y = labelled_pixels(y, p.dtype)
    a = tf.reduce_sum(p * y)
    b = tf.reduce_sum(p * labelled)
    c = tf.reduce_sum(y)
    # Counted as an integer: a float32 sum of ones stops being exact past 2**24 pixels.
    n = tf.cast(tf.math.count_nonzero(labelled, dtype=tf.int64), p.dtype)
    bce_sum = tf.reduce_sum(bce_pixels(p, y) * labelled) if loss != "dice" else tf.zeros((), p.dtype)
    return loss_from_sums(loss, a, b, c, bce_sum, n)


def hard_dice(intersection: float, predicted: float, truth: float) -> float:
    """Dice of binary masks from their counts; two empty masks agree perfectly (1.0)."""
    denominator = predicted + truth
    if denominator == 0:
        return 1.0
    return 2.0 * intersection / denominator


def hard_counts(p: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Counts for the hard Dice: (predicted tissue that is tissue, predicted tissue), as float64, over labelled pixels."""
    labelled, y = labelled_pixels(y, tf.float64)
    predicted = tf.cast(p >= HARD_THRESHOLD, tf.float64) * labelled
    return tf.reduce_sum(predicted * y), tf.reduce_sum(predicted)


def dice_pixel_weights(a: float, b: float, c: float) -> tuple[float, float]:
    """The soft Dice's derivative with respect to one probability, for a background and a tissue pixel (ignored pixels: 0).

    ``dL/dp_i = -(2 y_i (B + C + eps) - (2A + eps)) / (B + C + eps)^2`` depends on the pixel
    only through its label, so it takes two values. The tiled engine back-propagates
    ``sum_i stop_gradient(dL/dp_i) * p_i`` with these, computed in float64 from the region sums.
    """
    denominator = float(b) + float(c) + DICE_EPS
    numerator = 2.0 * float(a) + DICE_EPS
    background = numerator / denominator**2
    tissue = -(2.0 * denominator - numerator) / denominator**2
    return background, tissue
