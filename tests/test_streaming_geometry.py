"""Total stride, receptive field and halo read off the model's layers, checked against tiled inference."""

import numpy as np
import pytest

from gigaseg.model import build_unet
from gigaseg.streaming import model_geometry, predict_tiled
from gigaseg.streaming.geometry import activation_bytes_per_pixel


def test_gigaunet_geometry_matches_the_design():
    g = model_geometry(build_unet())
    assert (g.total_stride, g.receptive_field, g.reach_before, g.reach_after, g.halo) == (64, 167, 41, 62, 64)
    assert activation_bytes_per_pixel(build_unet()) == pytest.approx(67.25, abs=0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(filters=(4, 4), kernels=(5, 3), strides=(2, 2)),
        dict(filters=(3, 4, 5), kernels=(9, 5, 3), strides=(2, 2, 2)),
        dict(filters=(4, 4), kernels=(7, 9), strides=(4, 2)),
    ],
)
def test_derived_halo_is_enough_and_one_stride_less_is_not(kwargs):
    model = build_unet(**kwargs)
    g = model_geometry(model)
    s = g.total_stride
    image = np.random.default_rng(1).integers(0, 256, (8 * s, 12 * s, 3), dtype=np.uint8)
    whole = model(image[np.newaxis])[0, :, :, 0].numpy()
    tiled = predict_tiled(model, image, tile_size=3 * s, halo=g.halo)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    short = predict_tiled(model, image, tile_size=3 * s, halo=g.halo - s)
    assert np.abs(short - whole).max() > 1e-4


def test_models_that_mix_pixels_across_the_image_are_refused():
    import keras
    from keras import layers

    inputs = keras.Input((None, None, 3), dtype="uint8")
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(4, 3, strides=2, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Conv2DTranspose(1, 2, strides=2, padding="same", activation="sigmoid")(x)
    with pytest.raises(ValueError, match="BatchNormalization"):
        model_geometry(keras.Model(inputs, x))
