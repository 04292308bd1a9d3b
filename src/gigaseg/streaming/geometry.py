"""Total stride, receptive field and halo of a fully convolutional Keras model, read off its layers.

A model can be tiled exactly when every output pixel depends only on the input pixels in a
window around it, the same way everywhere. That holds for a Keras Functional model with one
image input of any size (``keras.Input((None, None, 3))``), one output of the input's size
with one channel (the tissue probability), and only the layers of :data:`SUPPORTED_LAYERS`:

- windows over pixels: ``Conv2D``, ``DepthwiseConv2D``, ``SeparableConv2D``, ``MaxPooling2D``,
  ``AveragePooling2D`` (square kernels, strides and dilations; 'same' padding, or 'valid'
  where later layers grow the tensor back);
- upsampling: ``Conv2DTranspose`` (without ``output_padding``), ``UpSampling2D`` ('nearest');
- merges of tensors of one size: ``Concatenate`` (on the channel axis), ``Add``, ``Subtract``,
  ``Multiply``, ``Average``, ``Maximum``, ``Minimum``;
- per pixel: ``Rescaling``, ``Identity``, ``Activation``, ``ReLU``, ``LeakyReLU``,
  ``ELU``, ``PReLU`` (its alpha shared over height and width), ``Softmax`` (on channels),
  ``Dense`` (it acts on the channel axis), and the normalisation layers that work on one pixel's
  channels in inference mode: ``BatchNormalization`` (its moving statistics), ``LayerNormalization``
  and ``UnitNormalization`` over the channel axis, ``Normalization``.

Layers with an activation must use one of Keras' built-in activations, and every layer the
channels-last layout. The model is evaluated with ``training=False``, in the tiled and in the
plain step alike: ``BatchNormalization`` normalises with its moving statistics, which training
then leaves as they are (its scale and offset train). Everything else is refused with a
:class:`~gigaseg.errors.ModelLayoutError` naming the layer: ``Dropout`` and the noise layers
(random while training, so tiles cannot repeat the region's draw), ``GroupNormalization``
(its statistics run over pixels), global pooling, ``Flatten``, ``Reshape``, ``Resizing``,
padding and cropping layers, ``Lambda`` and custom layers, nested models.

The walk follows the Functional graph from the input to the output. For every tensor it
keeps its jump (how many image pixels one of its positions advances), how many positions it
has fewer than the input has at its scale (its *trim*: 'valid' layers shrink a tensor), and,
for each position within one total stride, the interval of image pixels it depends on.
Merges take the union of their inputs' intervals, so skip connections are handled like any
other path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
from keras import layers

from gigaseg.errors import ModelLayoutError

#: Layers that slide a window over pixels (all with ``kernel_size`` or ``pool_size``, ``strides`` and ``padding``).
_WINDOWS = (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D, layers.MaxPooling2D, layers.AveragePooling2D)
#: Layers that make a tensor finer by an integer factor.
_UPSAMPLING = (layers.Conv2DTranspose, layers.UpSampling2D)
#: Layers that merge tensors of the same spatial size position by position.
_MERGES = (layers.Concatenate, layers.Add, layers.Subtract, layers.Multiply, layers.Average, layers.Maximum, layers.Minimum)
#: Layers that compute each pixel from that pixel alone (at inference): they leave geometry alone.
_PER_PIXEL = (
    layers.Rescaling,
    layers.Identity,
    layers.Activation,
    layers.ReLU,
    layers.LeakyReLU,
    layers.ELU,
    layers.PReLU,
    layers.Softmax,
    layers.Dense,
    layers.BatchNormalization,
    layers.LayerNormalization,
    layers.UnitNormalization,
    layers.Normalization,
)
#: Every layer type a tileable model may hold (with the conditions of the module docstring).
SUPPORTED_LAYERS: tuple[type, ...] = _WINDOWS + _UPSAMPLING + _MERGES + _PER_PIXEL

#: Why some common layers are refused, and what to do instead, by class name.
_REFUSALS = {
    **dict.fromkeys(
        ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout"),
        "is random while training, so tiles cannot repeat the whole region's draw; remove it",
    ),
    "GroupNormalization": "normalises over pixels, so a tile's statistics are not the region's; "
    "use BatchNormalization or LayerNormalization over channels",
    **dict.fromkeys(
        ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten", "Reshape", "Resizing"),
        "depends on the size of the whole image, so no tile can reproduce it; a tileable model is fully convolutional",
    ),
    "Lambda": "runs code whose geometry cannot be read off; write it with the supported layers",
}


@dataclass(frozen=True)
class Geometry:
    """How far an output pixel looks into the input, in image pixels along one axis.

    ``reach_before``/``reach_after`` are measured from a block of ``total_stride`` output
    pixels that starts on a multiple of ``total_stride``: every output pixel of the block
    depends only on input pixels from ``reach_before`` before the block's first pixel to
    ``reach_after`` after its last one. ``halo`` is the larger reach rounded up to a
    multiple of the total stride, so that windows stay aligned.
    """

    total_stride: int
    receptive_field: int
    reach_before: int
    reach_after: int
    halo: int


@dataclass
class _Span:
    """Dependency intervals of one tensor: position q covers image pixels jump*q + lo[q % P] .. jump*q + hi[q % P].

    For an input of n pixels (a multiple of the total stride) the tensor has n/jump - trim positions.
    """

    jump: int
    lo: list[int]
    hi: list[int]
    trim: int = 0

    def interval(self, q: int) -> tuple[int, int]:
        r = q % len(self.lo)
        return self.jump * q + self.lo[r], self.jump * q + self.hi[r]


def _refuse(op, reason: str) -> ModelLayoutError:
    return ModelLayoutError(f"layer '{op.name}' ({type(op).__name__}) {reason}")


def _square(op, name: str) -> int:
    """The one value of a square kernel/stride/dilation attribute (the geometry is per axis)."""
    value = getattr(op, name)
    a, b = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
    if a != b:
        raise _refuse(op, f"has the non-square {name} {(a, b)}; tiling supports square ones only")
    return a


def _on_channels(axis) -> bool:
    """Whether ``axis`` (an int or a list of them) names the channel axis of a 4-d tensor only."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    return bool(axes) and all(a % 4 == 3 for a in axes)


def _gather(span: _Span, jump: int, period: int, reads) -> list[tuple[int, int]]:
    """(lo, hi) of each output position o < period/jump, from the input positions ``reads(o)`` it depends on."""
    bounds = []
    for o in range(period // jump):
        ends = [span.interval(q) for q in reads(o)]
        bounds.append((min(e[0] for e in ends) - jump * o, max(e[1] for e in ends) - jump * o))
    return bounds


def _span(jump: int, bounds: list[tuple[int, int]], trim: int) -> _Span:
    return _Span(jump, [b[0] for b in bounds], [b[1] for b in bounds], trim)


def _window_span(op, span: _Span, period: int) -> _Span:
    """After a convolution or pooling: output o reads inputs o*s - pad_before .. + extent - 1."""
    kernel = _square(op, "pool_size" if isinstance(op, (layers.MaxPooling2D, layers.AveragePooling2D)) else "kernel_size")
    stride = _square(op, "strides")
    extent = _square(op, "dilation_rate") * (kernel - 1) + 1 if hasattr(op, "dilation_rate") else kernel
    jump = span.jump * stride
    if op.padding == "same":
        # TensorFlow pads extent - stride in all (plus what the input lacks of a stride multiple), the smaller half first.
        pad_before = max(extent - stride + span.trim % stride, 0) // 2
        trim = span.trim // stride
    else:
        pad_before = 0
        trim = math.ceil((span.trim + extent) / stride) - 1
    bounds = _gather(span, jump, period, lambda o: range(o * stride - pad_before, o * stride - pad_before + extent))
    return _span(jump, bounds, trim)


def _upsampling_span(op, span: _Span, period: int) -> _Span:
    """After a transposed convolution (output o = q*s + t - pad_before for tap t) or an upsampling layer."""
    if isinstance(op, layers.UpSampling2D):
        if op.interpolation != "nearest":
            # Keras' other interpolations fail in a compiled graph on windows of unknown size (Keras 3.15).
            raise _refuse(op, f"interpolates '{op.interpolation}'; tiling supports 'nearest' (or use a Conv2DTranspose)")
        # Each output pixel repeats one input pixel: a transposed convolution with kernel = stride.
        stride = _square(op, "size")
        extent, pad_before, grow = stride, 0, 0
    else:
        if op.output_padding is not None:
            raise _refuse(op, "has an output_padding; tiling supports transposed convolutions without one")
        stride = _square(op, "strides")
        extent = _square(op, "dilation_rate") * (_square(op, "kernel_size") - 1) + 1
        pad_before = max(extent - stride, 0) // 2 if op.padding == "same" else 0
        grow = max(extent - stride, 0) if op.padding == "valid" else 0
    if span.jump % stride:
        raise _refuse(op, f"upsamples by {stride} a tensor at 1/{span.jump} of the input: finer than its pixels")
    jump = span.jump // stride

    def reads(o):
        return range(math.ceil((o + pad_before - extent + 1) / stride), (o + pad_before) // stride + 1)

    return _span(jump, _gather(span, jump, period, reads), span.trim * stride - grow)


def _union(op, spans: list[_Span], period: int) -> _Span:
    if isinstance(op, layers.Concatenate) and not _on_channels(op.axis):
        raise _refuse(op, f"concatenates along axis {op.axis}; tiling supports the channel axis (-1) only")
    if len({(s.jump, s.trim) for s in spans}) != 1:
        sizes = sorted({f"1/{s.jump} of the input" + (f" less {s.trim} positions" if s.trim else "") for s in spans})
        raise _refuse(op, f"merges tensors of different sizes ({'; '.join(sizes)}); merge tensors of one size")
    jump = spans[0].jump
    bounds = [
        (min(s.interval(o)[0] for s in spans) - jump * o, max(s.interval(o)[1] for s in spans) - jump * o)
        for o in range(period // jump)
    ]
    return _span(jump, bounds, spans[0].trim)


def _check_per_pixel(op) -> None:
    """Refuse settings of a per-pixel layer type under which it looks at other pixels."""
    if isinstance(op, (layers.Softmax, layers.LayerNormalization, layers.UnitNormalization)) and not _on_channels(op.axis):
        raise _refuse(op, f"works along axis {op.axis}, across pixels; use the channel axis (-1)")
    if isinstance(op, layers.BatchNormalization) and not _on_channels(op.axis):
        raise _refuse(op, f"keeps statistics per axis {op.axis}; use the channel axis (-1)")
    if isinstance(op, layers.Normalization) and op.axis is not None and not _on_channels(op.axis):
        raise _refuse(op, f"keeps a mean per axis {op.axis}, per position; use the channel axis (-1)")
    if isinstance(op, layers.PReLU) and not {1, 2} <= set(op.shared_axes or ()):
        raise _refuse(op, "has an alpha per position; share it over height and width (shared_axes=[1, 2])")


def _check_common(op) -> None:
    """Channels-last layout and built-in activations, for the layers that have them."""
    if getattr(op, "data_format", "channels_last") != "channels_last":
        raise _refuse(op, f"uses {op.data_format}; tiling supports channels_last only")
    activation = getattr(op, "activation", None)
    if activation is not None and getattr(keras.activations, getattr(activation, "__name__", ""), None) is not activation:
        raise _refuse(op, f"has the custom activation {activation!r}; tiling supports Keras' built-in activations only")


def _layer_span(op, inputs: list[_Span], period: int) -> _Span:
    """The span of a layer's output from its inputs' spans, or ModelLayoutError for a layer tiling cannot reproduce."""
    if not isinstance(op, SUPPORTED_LAYERS):
        reason = _REFUSALS.get(
            type(op).__name__,
            "is not a layer whose geometry tiling can derive; "
            "use only the layers of gigaseg.streaming.geometry.SUPPORTED_LAYERS (convolutions, pooling, "
            "upsampling, merges, per-pixel layers)",
        )
        raise _refuse(op, reason)
    _check_common(op)
    if isinstance(op, _MERGES):
        return _union(op, inputs, period)
    if isinstance(op, _WINDOWS):
        return _window_span(op, inputs[0], period)
    if isinstance(op, _UPSAMPLING):
        return _upsampling_span(op, inputs[0], period)
    _check_per_pixel(op)
    return inputs[0]


def _nodes(model: keras.Model) -> list:
    """The model's layer calls from its input to its output (a layer called twice appears twice)."""
    if isinstance(model, keras.Sequential):
        raise ModelLayoutError(
            f"model '{model.name}' is a Sequential model; tiling needs a Functional one: "
            "keras.Model(model.inputs, model.outputs) makes one of it"
        )
    by_depth = getattr(model, "_nodes_by_depth", None)
    if by_depth is None:
        raise ModelLayoutError(
            f"model '{model.name}' ({type(model).__name__}) is not a Keras Functional model; "
            "tiling reads the layers off keras.Model(inputs, outputs)"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelLayoutError(f"model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} outputs; tiling needs one of each")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[1:] != (None, None, 3):
        raise ModelLayoutError(
            f"model '{model.name}' takes input of shape {shape[1:]}; tiles are windows of any size: "
            "build it on keras.Input((None, None, 3))"
        )
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]


def _walk(model: keras.Model, nodes: list, period: int) -> tuple[dict[int, _Span], dict[int, int]]:
    """Span and channel count of every tensor of the model, keyed by id of the Keras tensor."""
    source = model.inputs[0]
    spans: dict[int, _Span] = {id(source): _Span(1, [0] * period, [0] * period)}
    channels: dict[int, int] = {id(source): int(source.shape[-1])}
    for node in nodes:
        op = node.operation
        if isinstance(op, layers.InputLayer):
            continue
        out = _layer_span(op, [spans[id(t)] for t in node.input_tensors], period)
        for t in node.output_tensors:
            spans[id(t)] = out
            channels[id(t)] = int(t.shape[-1])
    return spans, channels


def _derive(model: keras.Model) -> tuple[int, dict[int, _Span], dict[int, int]]:
    """The total stride and the spans and channel counts of every tensor, walked with that period."""
    nodes = _nodes(model)
    # The product of all strides is a multiple of every jump, so it is a safe period for a
    # first walk; the total stride is the least common multiple of the jumps found.
    product = 1
    for node in nodes:
        if isinstance(node.operation, _WINDOWS):
            product *= _square(node.operation, "strides")
    spans, channels = _walk(model, nodes, product)
    stride = math.lcm(*(s.jump for s in spans.values()))
    if stride != product:
        spans, channels = _walk(model, nodes, stride)
    out = spans[id(model.outputs[0])]
    if out.jump != 1:
        raise ModelLayoutError(f"model '{model.name}' outputs at 1/{out.jump} of the input resolution; tiling needs full resolution")
    if out.trim:
        raise ModelLayoutError(
            f"model '{model.name}' outputs {abs(out.trim)} pixels {'fewer' if out.trim > 0 else 'more'} per axis than it takes in "
            "('valid' padding); tiling needs an output of the input's size: use 'same' padding"
        )
    if channels[id(model.outputs[0])] != 1:
        raise ModelLayoutError(
            f"model '{model.name}' outputs {channels[id(model.outputs[0])]} channels; "
            "tiling needs one, the tissue probability"
        )
    return stride, spans, channels


def total_stride(model: keras.Model) -> int:
    """The least common multiple of the stride products along every path: region, tile and halo sizes must be multiples of it."""
    return _derive(model)[0]


def model_geometry(model: keras.Model) -> Geometry:
    """Derive total stride, receptive field and halo by walking the model's layers (ModelLayoutError if it cannot be tiled)."""
    stride, spans, _ = _derive(model)
    out = spans[id(model.outputs[0])]
    receptive_field = max(h - l + 1 for l, h in zip(out.lo, out.hi))
    # Output pixel r of a block (0 <= r < stride) reads r + lo[r] .. r + hi[r] relative to the block start.
    reach_before = max(0, max(-(r + l) for r, l in enumerate(out.lo)))
    reach_after = max(0, max(r + h - (stride - 1) for r, h in enumerate(out.hi)))
    halo = math.ceil(max(reach_before, reach_after) / stride) * stride
    return Geometry(stride, receptive_field, reach_before, reach_after, halo)


def activation_bytes_per_pixel(model: keras.Model, dtype_bytes: int = 4) -> float:
    """Bytes of all layer outputs per input pixel: the forward activations a gradient tape keeps."""
    _, spans, channels = _derive(model)
    total = 0.0
    for key, span in spans.items():
        if key == id(model.inputs[0]):
            total += channels[key] * 1  # the uint8 image itself
            continue
        total += channels[key] * dtype_bytes / span.jump**2
    return total
