"""The tissue U-Net: large kernels and high strides, small enough for whole gigapixel regions.

The default layout (``gigaunet``) has exactly 4492 trainable parameters; see
``docs/STREAMING.md`` for the layer table.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

from gigaseg.errors import ConfigError
from gigaseg.options import UNetLayout


def _as_tuple(name: str, values: Sequence[int] | int, depth: int) -> tuple[int, ...]:
    if isinstance(values, int):
        values = [values] * depth
    values = tuple(int(v) for v in values)
    if len(values) != depth:
        raise ConfigError(f"model.{name} has {len(values)} entries but the model has depth {depth}; give one per level")
    if any(v <= 0 for v in values):
        raise ConfigError(f"model.{name} must be positive integers, got {list(values)}")
    return values


def build_unet(
    filters: Sequence[int] = UNetLayout.filters,
    kernels: Sequence[int] | int = UNetLayout.kernels,
    strides: Sequence[int] | int = UNetLayout.strides,
    decoder_filters: Sequence[int] | int | None = UNetLayout.decoder_filters,
    activation: str = UNetLayout.activation,
    input_range: Sequence[float] = UNetLayout.input_range,
    name: str = UNetLayout.name,
) -> keras.Model:
    """Build the U-Net as a Keras Functional model on RGB uint8 input of any size.

    The encoder has one strided convolution per entry of ``filters``. The decoder mirrors
    it with transposed convolutions (kernel = stride), each followed by concatenation
    with the encoder feature of the same scale, the last with the input image itself.
    A 1x1 convolution with sigmoid gives the per-pixel tissue probability. Input height
    and width must be multiples of the total stride (the product of ``strides``).
    ``input_range`` is the interval uint8 pixels are rescaled to inside the model. The defaults
    are ``gigaseg.options.UNetLayout``'s (the study's layout, and why its input range).
    """
    filters = tuple(int(f) for f in filters)
    depth = len(filters)
    if depth == 0:
        raise ConfigError("model.filters must list at least one encoder level")
    if any(f <= 0 for f in filters):
        raise ConfigError(f"model.filters must be positive integers, got {list(filters)}")
    kernels = _as_tuple("kernels", kernels, depth)
    strides = _as_tuple("strides", strides, depth)
    decoder_filters = _as_tuple("decoder_filters", filters if decoder_filters is None else decoder_filters, depth)
    for level, (k, s) in enumerate(zip(kernels, strides)):
        if k < s:
            raise ConfigError(
                f"model.kernels[{level}]={k} is smaller than model.strides[{level}]={s}: "
                "pixels would be skipped; use a kernel at least as large as its stride"
            )
    try:
        keras.activations.get(activation)
    except ValueError as exc:
        raise ConfigError(f"model.activation '{activation}' is not a Keras activation") from exc

    low, high = (float(v) for v in input_range)
    if not high > low:
        raise ConfigError(f"model.input_range must be [low, high] with low < high, got {list(input_range)}")
    inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    x = layers.Rescaling((high - low) / 255.0, offset=low, name="rescale")(inputs)
    skips = [x]
    for level, (f, k, s) in enumerate(zip(filters, kernels, strides)):
        x = layers.Conv2D(f, k, strides=s, padding="same", activation=activation, name=f"down{level + 1}")(x)
        skips.append(x)
    # Walk back up: the deepest feature is x itself, so skip it.
    for i, level in enumerate(reversed(range(depth))):
        s = strides[level]
        x = layers.Conv2DTranspose(
            decoder_filters[i], s, strides=s, padding="same", activation=activation, name=f"up{i + 1}"
        )(x)
        x = layers.Concatenate(name=f"concat{i + 1}")([x, skips[level]])
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="tissue")(x)
    return keras.Model(inputs, outputs, name=name)


def total_stride(strides: Sequence[int]) -> int:
    """Product of the encoder strides: region and tile sizes must be multiples of it."""
    product = 1
    for s in strides:
        product *= int(s)
    return product
