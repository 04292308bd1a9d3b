"""The plain whole-region step (one gradient tape over the whole region), in float32 or float64.

Training uses the float32 step for regions that fit in memory; the float64 step is the
reference the tiled engine is checked against (see docs/STREAMING.md on rounding). The model
runs in inference mode (``training=False``), as tiles need it to: normalisation layers use
their moving statistics (see :mod:`gigaseg.streaming.geometry`).
"""

from __future__ import annotations

import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from gigaseg.losses import check_loss_name, hard_counts, hard_dice, region_loss
from gigaseg.streaming.engine import StepResult, check_region
from gigaseg.streaming.geometry import total_stride
from gigaseg.streaming.labels import count_labelled

_FLOAT64_COPIES: "weakref.WeakKeyDictionary[keras.Model, keras.Model]" = weakref.WeakKeyDictionary()


def float64_copy(model: keras.Model) -> keras.Model:
    """A copy of ``model`` computing in float64, with the same (cast) weights. Copies are cached per model."""
    copy = _FLOAT64_COPIES.get(model)
    if copy is None:

        def to_float64(layer):
            config = layer.get_config()
            if isinstance(layer, keras.layers.InputLayer):
                return layer.__class__.from_config(config)
            config["dtype"] = "float64"
            return layer.__class__.from_config(config)

        copy = keras.models.clone_model(model, clone_function=to_float64)
        _FLOAT64_COPIES[model] = copy
    # Weights may have changed since the copy was made.
    for target, source in zip(copy.weights, model.weights):
        target.assign(np.asarray(source.numpy(), np.float64))
    return copy


def plain_step(model: keras.Model, image: np.ndarray, mask: np.ndarray, *, loss: str = "dice", dtype: str = "float32") -> StepResult:
    """Loss, hard Dice and gradients of a region from one tape over the whole region.

    ``mask`` holds 0, 1 or :data:`~gigaseg.evaluation.IGNORE_LABEL` (counted nowhere), as for the tiled step.
    """
    check_loss_name(loss)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    check_region(image, mask, total_stride(model))
    count_labelled(mask)
    net = float64_copy(model) if dtype == "float64" else model
    start = time.perf_counter()
    x = tf.convert_to_tensor(np.asarray(image)[np.newaxis])
    y = tf.convert_to_tensor(np.asarray(mask), dtype=dtype)
    with tf.GradientTape() as tape:
        p = net(x, training=False)[0, :, :, 0]
        value = region_loss(loss, p, y)
    grads = tape.gradient(value, net.trainable_variables)
    inter, predicted = hard_counts(p, y)
    c = float(np.count_nonzero(np.asarray(mask) == 1))
    elapsed = time.perf_counter() - start
    return StepResult(
        loss=float(value),
        dice=hard_dice(float(inter), float(predicted), c),
        gradients=[g.numpy() for g in grads],
        tiles=1,
        data_time_s=0.0,
        compute_time_s=elapsed,
    )


def plain_loss_and_gradients(
    model: keras.Model, image: np.ndarray, mask: np.ndarray, *, loss: str = "dice", dtype: str = "float32"
) -> tuple[float, list[np.ndarray]]:
    """Region loss and gradients (in the order of ``model.trainable_variables``) from a whole-region tape.

    With ``dtype="float64"`` a float64 copy of the model with the same weights computes them.
    """
    result = plain_step(model, image, mask, loss=loss, dtype=dtype)
    return result.loss, result.gradients
