"""Total stride, receptive field and halo read off the model's layers, checked against perturbed inputs and tiled inference."""

import keras
import numpy as np
import pytest
from keras import layers

from gigaseg.errors import ModelLayoutError
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


# ------------------------------------------------------------------ models built by hand


def _stem(name: str):
    inputs = keras.Input((None, None, 3), dtype="uint8", name=f"{name}_image")
    return inputs, layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)


def pooling_and_upsampling():
    """Overlapping and plain pooling, a layer called twice, transposed and nearest-neighbour upsampling."""
    inputs, x = _stem("pooling")
    shared = layers.Conv2D(3, 3, padding="same", activation="tanh", name="shared")
    x = shared(shared(x))
    x = layers.Conv2D(6, 3, strides=2, padding="same", activation="elu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    x = layers.AveragePooling2D(2)(x)
    x = layers.Conv2DTranspose(6, 3, strides=2, padding="same", activation="tanh")(x)
    x = layers.UpSampling2D(2)(x)
    x = layers.UpSampling2D(2)(x)
    return keras.Model(inputs, layers.Conv2D(1, 3, padding="same", activation="sigmoid")(x))


def valid_padding():
    """'valid' layers that shrink the tensors and transposed ones that grow them back to the input's size."""
    inputs, x = _stem("valid")
    x = layers.Conv2D(4, 3, activation="elu")(x)
    x = layers.Conv2D(4, 4, strides=2, activation="elu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", activation="tanh")(x)
    x = layers.SeparableConv2D(4, 3, dilation_rate=2, padding="same", activation="elu")(x)
    x = layers.Conv2DTranspose(4, 4, strides=2, activation="elu")(x)
    x = layers.Conv2DTranspose(4, 3)(x)
    return keras.Model(inputs, layers.Conv2D(1, 1, activation="sigmoid")(x))


def same_after_valid():
    """A strided 'same' convolution on a tensor one pixel short of a stride multiple: TensorFlow pads it differently."""
    inputs, x = _stem("odd")
    v = layers.Conv2D(4, 2, activation="elu")(x)
    d = layers.Conv2D(4, 3, strides=2, padding="same", activation="elu")(v)
    d = layers.MaxPooling2D(2, padding="same")(d)
    u = layers.Conv2DTranspose(4, 4, strides=4, padding="same")(d)
    return keras.Model(inputs, layers.Conv2D(1, 3, padding="same", activation="sigmoid")(layers.Concatenate()([u, x])))


def per_pixel_layers():
    """Every per-pixel layer type and every merge, normalisation with non-trivial statistics."""
    inputs = keras.Input((None, None, 3), dtype="uint8")
    x = layers.Normalization(mean=[180.0, 150.0, 190.0], variance=[900.0, 1600.0, 700.0])(inputs)
    a = layers.Conv2D(6, 5, strides=2, padding="same")(x)
    norm = layers.BatchNormalization()
    a = layers.PReLU(shared_axes=[1, 2])(norm(a))
    b = layers.LeakyReLU(0.1)(layers.LayerNormalization()(a))
    c = layers.Identity()(layers.Softmax()(layers.UnitNormalization()(layers.ELU()(layers.Dense(6)(b)))))
    m = layers.Average()([layers.Add()([a, c]), layers.Subtract()([a, b])])
    m = layers.Minimum()([layers.Maximum()([layers.Multiply()([b, c]), m]), a])
    m = layers.Activation("swish")(layers.ReLU(max_value=3.0)(m))
    u = layers.Conv2DTranspose(4, 2, strides=2)(m)
    outputs = layers.Conv2D(1, 3, padding="same", activation="sigmoid")(layers.Concatenate()([u, x]))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(2)
    norm.moving_mean.assign(rng.normal(0.0, 0.5, 6).astype(np.float32))
    norm.moving_variance.assign(rng.uniform(0.3, 3.0, 6).astype(np.float32))
    return model


def strides_two_and_three():
    """Two paths, downsampled by 2 and by 3: the total stride is their least common multiple, 6."""
    inputs, x = _stem("lcm")
    by_two = layers.Conv2DTranspose(4, 2, strides=2)(layers.Conv2D(4, 3, strides=2, padding="same", activation="elu")(x))
    by_three = layers.Conv2DTranspose(4, 3, strides=3)(layers.Conv2D(4, 5, strides=3, padding="same", activation="elu")(x))
    return keras.Model(inputs, layers.Conv2D(1, 1, activation="sigmoid")(layers.Add()([by_two, by_three])))


def seeded(build):
    """The hand-built model with seed-0 weights, its geometry and its total stride."""
    keras.utils.set_random_seed(0)
    model = build()
    g = model_geometry(model)
    return model, g, g.total_stride


HAND_BUILT = [pooling_and_upsampling, valid_padding, same_after_valid, per_pixel_layers, strides_two_and_three]


@pytest.mark.parametrize("build", HAND_BUILT, ids=lambda b: b.__name__)
def test_the_derived_reach_is_exactly_where_a_block_stops_depending_on_the_input(build):
    model, g, s = seeded(build)
    # One block of s output columns, starting on a multiple of s well inside the image.
    first = (g.reach_before // s + 2) * s
    last = first + s - 1
    width = (last + g.reach_after + 2 * s) // s * s
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (4 * s, width, 3), dtype=np.uint8)

    def block(pixels):
        return model(pixels[np.newaxis], training=False)[0, :, first : last + 1, 0].numpy()

    reference = block(image)
    # Every column outside [first - reach_before, last + reach_after] may change: the block does not.
    outside = rng.integers(0, 256, image.shape, dtype=np.uint8)
    outside[:, first - g.reach_before : last + g.reach_after + 1] = image[:, first - g.reach_before : last + g.reach_after + 1]
    np.testing.assert_allclose(block(outside), reference, atol=1e-6)
    # The two columns at the reach's ends each change it.
    for column in (first - g.reach_before, last + g.reach_after):
        changed = image.copy()
        changed[:, column] = 255 - changed[:, column]
        assert np.abs(block(changed) - reference).max() > 1e-4, (build.__name__, column)


@pytest.mark.parametrize("build", HAND_BUILT, ids=lambda b: b.__name__)
def test_hand_built_models_predict_tiled_as_whole(build):
    model, g, s = seeded(build)
    tile = max(2 * s, 16 // s * s)
    image = np.random.default_rng(3).integers(0, 256, (5 * tile, 7 * tile, 3), dtype=np.uint8)
    whole = model(image[np.newaxis], training=False)[0, :, :, 0].numpy()
    np.testing.assert_allclose(predict_tiled(model, image, tile_size=tile), whole, atol=1e-5)


def test_hand_built_geometries():
    found = {b.__name__: model_geometry(b()) for b in HAND_BUILT}
    assert {name: g.total_stride for name, g in found.items()} == {
        "pooling_and_upsampling": 8,
        "valid_padding": 2,
        "same_after_valid": 4,
        "per_pixel_layers": 2,
        "strides_two_and_three": 6,
    }
    # TensorFlow pads the strided 'same' convolution of an odd-sized tensor one pixel more before
    # it than it would an even one: without that the reach would be (4, 6).
    odd = found["same_after_valid"]
    assert (odd.reach_before, odd.reach_after, odd.halo) == (5, 5, 8)


# ------------------------------------------------------------------ refusals


def _refused(name: str, make):
    """A model with ``make(x)`` between a strided convolution and a transposed one."""
    inputs, x = _stem(name)
    x = layers.Conv2D(4, 3, strides=2, padding="same")(x)
    x = make(x)
    x = layers.Conv2DTranspose(1, 2, strides=2, activation="sigmoid")(x)
    return keras.Model(inputs, x)


class Shift(layers.Layer):
    """A custom layer: the geometry of its call cannot be read off."""

    def call(self, x):
        return keras.ops.roll(x, 1, axis=1)


def _centred():
    """A convolution whose activation subtracts the image's mean: a custom activation that mixes pixels."""
    return layers.Conv2D(4, 3, padding="same", activation=lambda t: t - keras.ops.mean(t, axis=(1, 2), keepdims=True), name="centred")


def _padded():
    def make(x):
        up = layers.Conv2DTranspose(4, 3, strides=2, output_padding=1, name="padded")(x)
        return layers.Conv2D(4, 3, strides=2, padding="same")(up)

    return make


def _nested():
    inner_in = keras.Input((None, None, 4))
    return keras.Model(inner_in, layers.Conv2D(4, 3, padding="same")(inner_in), name="inner")


REFUSED = {
    "Dropout": (lambda: layers.Dropout(0.2, name="drop"), "drop", "random"),
    "SpatialDropout2D": (lambda: layers.SpatialDropout2D(0.2, name="drop2d"), "drop2d", "random"),
    "GaussianNoise": (lambda: layers.GaussianNoise(0.1, name="noise"), "noise", "random"),
    "GroupNormalization": (lambda: layers.GroupNormalization(2, name="groups"), "groups", "over pixels"),
    "Lambda": (lambda: layers.Lambda(lambda t: t * 2.0, name="double"), "double", "geometry"),
    "UpSampling2D": (lambda: layers.UpSampling2D(1, interpolation="bilinear", name="smooth"), "smooth", "'bilinear'"),
    "ZeroPadding2D": (lambda: (lambda x: layers.Cropping2D(1)(layers.ZeroPadding2D(1, name="pad")(x))), "pad", "SUPPORTED_LAYERS"),
    "Concatenate": (lambda: (lambda x: layers.Concatenate(axis=1, name="rows")([x, x])), "rows", "axis 1"),
    "Softmax": (lambda: layers.Softmax(axis=1, name="over_rows"), "over_rows", "across pixels"),
    "Shift": (lambda: Shift(name="shift"), "shift", "SUPPORTED_LAYERS"),
    "Conv2D": (_centred, "centred", "custom activation"),
    "Functional": (_nested, "inner", "SUPPORTED_LAYERS"),
    "Conv2DTranspose": (_padded, "padded", "output_padding"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_a_layer_tiling_cannot_reproduce_is_refused_in_one_line_naming_it(kind):
    make, name, reason = REFUSED[kind]
    model = _refused(name, make())
    with pytest.raises(ModelLayoutError) as refused:
        model_geometry(model)
    message = str(refused.value)
    assert f"layer '{name}' ({kind})" in message and reason in message
    assert "\n" not in message
    assert isinstance(refused.value, ValueError)  # callers that catch ValueError keep working


def test_models_that_cannot_be_tiled_as_a_whole_are_refused_in_one_line():
    inputs, x = _stem("whole")
    cases = {
        "outputs 2 pixels fewer": layers.Conv2D(1, 3, activation="sigmoid")(x),
        "at 1/2 of the input": layers.Conv2D(1, 3, strides=2, padding="same")(x),
        "outputs 2 channels": layers.Conv2D(2, 3, padding="same")(x),
    }
    for expected, outputs in cases.items():
        with pytest.raises(ModelLayoutError, match=expected) as refused:
            model_geometry(keras.Model(inputs, outputs))
        assert "\n" not in str(refused.value)
    fixed = keras.Input((64, 64, 3), dtype="uint8")
    with pytest.raises(ModelLayoutError, match=r"keras.Input\(\(None, None, 3\)\)"):
        model_geometry(keras.Model(fixed, layers.Conv2D(1, 3, padding="same")(fixed)))
    sequential = keras.Sequential([keras.Input((None, None, 3)), layers.Conv2D(1, 3, padding="same")])
    with pytest.raises(ModelLayoutError, match="Sequential"):
        model_geometry(sequential)
    assert model_geometry(keras.Model(sequential.inputs, sequential.outputs)).halo == 1


def test_normalisation_over_channels_is_accepted_and_over_pixels_is_not():
    inputs, x = _stem("norms")
    x = layers.Conv2D(4, 3, strides=2, padding="same")(x)
    head = layers.Conv2DTranspose(1, 2, strides=2, activation="sigmoid")
    accepted = head(layers.LayerNormalization()(layers.BatchNormalization()(x)))
    assert model_geometry(keras.Model(inputs, accepted)).halo == 2
    refused = layers.Conv2DTranspose(1, 2, strides=2)(layers.GroupNormalization(2, name="gn")(x))
    with pytest.raises(ModelLayoutError, match=r"layer 'gn' \(GroupNormalization\) normalises over pixels"):
        model_geometry(keras.Model(inputs, refused))


def test_the_documented_layer_list_is_the_accepted_one():
    from pathlib import Path

    from gigaseg.streaming import geometry

    guide = (Path(__file__).resolve().parents[1] / "docs" / "STREAMING.md").read_text(encoding="utf-8")
    for layer in geometry.SUPPORTED_LAYERS:
        assert f"``{layer.__name__}``" in geometry.__doc__, layer.__name__
        assert f"`{layer.__name__}`" in guide, layer.__name__
