"""The engine as a library: a Keras model built by hand steps tiled exactly as a whole region, or is refused in one line."""

import keras
import numpy as np
import pytest
from keras import layers
from test_streaming_engine import assert_exact, tissue_region

from gigaseg.errors import ModelLayoutError
from gigaseg.streaming import (
    TiledEngine,
    loss_and_gradients,
    model_geometry,
    plain_loss_and_gradients,
    plain_step,
)

TILE = 64


def user_model(*, frozen_statistics: bool, extra=None) -> keras.Model:
    """A small encoder-decoder of the kind a user would write, its normalisation statistics far from 0 and 1.

    ``frozen_statistics`` makes BatchNormalization non-trainable, which Keras evaluates in
    inference mode even under ``training=True``. ``extra(x)``, if given, is applied after it.
    """
    keras.utils.set_random_seed(7)
    inputs = keras.Input((None, None, 3), dtype="uint8", name="image")
    x = layers.Rescaling(2 / 255, offset=-1.0, name="rescale")(inputs)
    full = layers.Conv2D(4, 3, padding="same", name="full")(x)
    half = layers.Conv2D(8, 5, strides=2, padding="same", activation="relu", name="down")(x)
    norm = layers.BatchNormalization(name="norm", trainable=not frozen_statistics)
    half = norm(half)
    if extra is not None:
        half = extra(half)
    quarter = layers.MaxPooling2D(2, name="pool")(half)
    quarter = layers.Conv2D(8, 3, padding="same", activation="relu", name="deep")(quarter)
    up = layers.Conv2DTranspose(8, 2, strides=2, padding="same", activation="relu", name="up_half")(quarter)
    merged = layers.Concatenate(name="skip")([up, half])
    up = layers.Conv2DTranspose(4, 4, strides=2, padding="same", name="up_full")(merged)
    x = layers.Activation("relu", name="relu")(layers.Add(name="add")([up, full]))
    model = keras.Model(inputs, layers.Conv2D(1, 1, activation="sigmoid", name="tissue")(x), name="user_unet")
    rng = np.random.default_rng(0)
    norm.moving_mean.assign(rng.normal(0.3, 0.1, 8).astype(np.float32))
    norm.moving_variance.assign(rng.uniform(0.5, 2.0, 8).astype(np.float32))
    norm.gamma.assign(rng.uniform(0.5, 1.5, 8).astype(np.float32))
    norm.beta.assign(rng.normal(0.0, 0.2, 8).astype(np.float32))
    return model


def region():
    """128x192 pixels of tissue and glass; the mask holds 0, 1 and 255 (ignored, across a tile border)."""
    image, mask = tissue_region(128, 192, seed=5)
    mask[50:80, 40:90] = 255
    return image, mask


def assert_steps_exactly(model, loss):
    image, mask = region()
    assert set(np.unique(mask)) == {0, 1, 255}
    reference_loss, reference = plain_loss_and_gradients(model, image, mask, loss=loss, dtype="float64")
    value, gradients = loss_and_gradients(model, image, mask, loss=loss, tile_size=TILE)
    assert_exact(value, gradients, reference_loss, reference)


@pytest.mark.parametrize("loss", ["dice", "bce", "dice_bce"])
def test_a_user_built_model_steps_tiled_as_the_float64_plain_step(loss):
    model = user_model(frozen_statistics=True)
    engine = TiledEngine(model, loss=loss, tile_size=TILE)
    # Neither the space-to-depth form nor the fused tail knows this model: Keras evaluates it.
    assert engine.evaluator.name == "keras"
    assert "BatchNormalization" in dict(engine.choice.skipped)["lowered"]
    assert len(engine.plan((128, 192))) == 6 and engine.halo == model_geometry(model).halo == 12
    assert_steps_exactly(model, loss)


@pytest.mark.parametrize("loss", ["dice", "bce", "dice_bce"])
def test_trainable_batch_normalisation_steps_exactly_in_inference_mode(loss):
    # Exact tiles need every layer per pixel: BatchNormalization with its moving statistics,
    # in every pass. Its scale and offset get gradients; the statistics stay as they are.
    model = user_model(frozen_statistics=False)
    statistics = [v.numpy().copy() for v in model.non_trainable_variables]
    assert_steps_exactly(model, loss)
    for before, after in zip(statistics, model.non_trainable_variables):
        np.testing.assert_array_equal(after.numpy(), before)


def test_the_plain_step_runs_in_inference_mode_and_keeps_the_statistics():
    from gigaseg.losses import region_loss

    model = user_model(frozen_statistics=False)
    image, mask = region()
    statistics = [v.numpy().copy() for v in model.non_trainable_variables]
    result = plain_step(model, image, mask, loss="dice_bce")
    for before, after in zip(statistics, model.non_trainable_variables):
        np.testing.assert_array_equal(after.numpy(), before)

    def loss_of(training):
        p = model(image[np.newaxis], training=training)[0, :, :, 0]
        return float(region_loss("dice_bce", p, np.asarray(mask, np.float32)))

    assert result.loss == pytest.approx(loss_of(False), rel=1e-6)
    assert abs(result.loss - loss_of(True)) > 1e-3  # the region's own batch statistics would differ
    gamma = [v.path for v in model.trainable_variables].index("norm/gamma")
    assert np.abs(result.gradients[gamma]).max() > 0


@pytest.mark.parametrize(
    ("extra", "name", "kind"),
    [
        (lambda: layers.Dropout(0.1, name="regularise"), "regularise", "Dropout"),
        (lambda: layers.Lambda(lambda t: t * 0.5, name="halve"), "halve", "Lambda"),
        (lambda: layers.UpSampling2D(1, interpolation="bilinear", name="smooth"), "smooth", "UpSampling2D"),
        (lambda: (lambda t: layers.Multiply()([t, layers.Reshape((1, 1, 8))(layers.GlobalAveragePooling2D(name="squeeze")(t))])),
         "squeeze", "GlobalAveragePooling2D"),
    ],
)
def test_a_user_built_model_with_an_unsupported_layer_is_refused_in_one_line(extra, name, kind):
    model = user_model(frozen_statistics=True, extra=extra())
    image, mask = region()
    for step in (loss_and_gradients, plain_loss_and_gradients):
        with pytest.raises(ModelLayoutError) as refused:
            step(model, image, mask, loss="dice")
        message = str(refused.value)
        assert message.startswith(f"layer '{name}' ({kind}) ") and "\n" not in message
