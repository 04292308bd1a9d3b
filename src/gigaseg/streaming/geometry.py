"""Total stride, receptive field and halo of a fully convolutional Keras model, read off its layers.

The walk follows the Functional graph from the input to the output. For every tensor it
keeps its jump (how many image pixels one of its positions advances) and, for each
position within one total stride, the interval of image pixels it depends on. Concatenations
and element-wise layers take the union of their inputs' intervals, so skip connections are
handled like any other path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
from keras import layers

#: Layers that act on every pixel independently (or only rescale it): they leave geometry alone.
_POINTWISE = (
    layers.InputLayer,
    layers.Rescaling,
    layers.Activation,
    layers.ReLU,
    layers.LeakyReLU,
    layers.ELU,
    layers.PReLU,
    layers.Softmax,
    layers.Identity,
)
#: Layers that merge tensors of the same spatial size position by position.
_MERGES = (layers.Concatenate, layers.Add, layers.Subtract, layers.Multiply, layers.Average, layers.Maximum, layers.Minimum)
#: Layers that mix statistics across pixels (or randomness): tiles could not reproduce them.
_NOT_TILEABLE = (
    layers.BatchNormalization,
    layers.LayerNormalization,
    layers.GroupNormalization,
    layers.Dropout,
    layers.SpatialDropout2D,
    layers.GlobalAveragePooling2D,
    layers.GlobalMaxPooling2D,
)


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
    """Dependency intervals of one tensor: position q covers image pixels jump*q + lo[q % P] .. jump*q + hi[q % P]."""

    jump: int
    lo: list[int]
    hi: list[int]

    def interval(self, q: int) -> tuple[int, int]:
        r = q % len(self.lo)
        return self.jump * q + self.lo[r], self.jump * q + self.hi[r]


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _square(layer, name: str) -> int:
    """The one value of a square kernel/stride/dilation attribute (the geometry is per axis)."""
    a, b = _pair(getattr(layer, name))
    if a != b:
        raise ValueError(f"layer '{layer.name}' has non-square {name} {(a, b)}; tiling supports square ones only")
    return a


def _conv_span(span: _Span, kernel: int, stride: int, dilation: int, padding: str, period: int) -> _Span:
    """Span after a strided convolution or pooling (output position o reads inputs o*s - pad .. o*s - pad + ke - 1)."""
    extent = dilation * (kernel - 1) + 1
    # With input sizes that are multiples of the stride, 'same' pads max(extent - stride, 0) in total.
    pad_before = max(extent - stride, 0) // 2 if padding == "same" else 0
    jump = span.jump * stride
    if period % jump:
        raise ValueError(f"the strides multiply to more than the total stride {period}")
    n = period // jump
    lo, hi = [], []
    for o in range(n):
        first = o * stride - pad_before
        ends = [span.interval(q) for q in range(first, first + extent)]
        lo.append(min(e[0] for e in ends) - jump * o)
        hi.append(max(e[1] for e in ends) - jump * o)
    return _Span(jump, lo, hi)


def _transpose_span(span: _Span, kernel: int, stride: int, dilation: int, padding: str, period: int) -> _Span:
    """Span after a transposed convolution or upsampling (output o = q*s + t - pad for kernel tap t)."""
    extent = dilation * (kernel - 1) + 1
    pad_before = max(extent - stride, 0) // 2 if padding == "same" else 0
    if span.jump % stride:
        raise ValueError(f"an upsampling by {stride} goes finer than the input pixels")
    jump = span.jump // stride
    n = period // jump
    lo, hi = [], []
    for o in range(n):
        q_first = math.ceil((o + pad_before - extent + 1) / stride)
        q_last = (o + pad_before) // stride
        ends = [span.interval(q) for q in range(q_first, q_last + 1)]
        lo.append(min(e[0] for e in ends) - jump * o)
        hi.append(max(e[1] for e in ends) - jump * o)
    return _Span(jump, lo, hi)


def _union(spans: list[_Span], period: int) -> _Span:
    jumps = {s.jump for s in spans}
    if len(jumps) != 1:
        raise ValueError(f"a merge layer joins tensors at different scales (jumps {sorted(jumps)})")
    jump = jumps.pop()
    n = period // jump
    lo = [min(s.interval(o)[0] for s in spans) - jump * o for o in range(n)]
    hi = [max(s.interval(o)[1] for s in spans) - jump * o for o in range(n)]
    return _Span(jump, lo, hi)


def _walk(model: keras.Model, period: int) -> tuple[dict[int, _Span], dict[int, int]]:
    """Span and channel count of every tensor of the model, keyed by id of the Keras tensor."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("tiling needs a model with exactly one image input and one output")
    spans: dict[int, _Span] = {id(model.inputs[0]): _Span(1, [0] * period, [0] * period)}
    channels: dict[int, int] = {id(model.inputs[0]): int(model.inputs[0].shape[-1])}
    for op in model.operations:
        if isinstance(op, layers.InputLayer):
            continue
        node = op._inbound_nodes[0]
        inputs = [spans[id(t)] for t in node.input_tensors]
        if isinstance(op, _NOT_TILEABLE):
            raise ValueError(
                f"layer '{op.name}' ({type(op).__name__}) mixes pixels across the image or is random; "
                "tiled training would not reproduce the whole-region step"
            )
        if isinstance(op, _MERGES):
            out = _union(inputs, period)
        elif isinstance(op, layers.Conv2DTranspose):
            out = _transpose_span(
                inputs[0], _square(op, "kernel_size"), _square(op, "strides"), _square(op, "dilation_rate"), op.padding, period
            )
        elif isinstance(op, layers.Conv2D):  # includes SeparableConv2D/DepthwiseConv2D subclasses where present
            out = _conv_span(
                inputs[0], _square(op, "kernel_size"), _square(op, "strides"), _square(op, "dilation_rate"), op.padding, period
            )
        elif isinstance(op, (layers.MaxPooling2D, layers.AveragePooling2D)):
            out = _conv_span(inputs[0], _square(op, "pool_size"), _square(op, "strides"), 1, op.padding, period)
        elif isinstance(op, layers.UpSampling2D):
            size = _square(op, "size")
            out = _transpose_span(inputs[0], size, size, 1, "valid", period)
        elif isinstance(op, _POINTWISE) or len(inputs) == 1 and type(op).__name__ in ("Lambda",):
            out = inputs[0]
        else:
            raise ValueError(
                f"layer '{op.name}' ({type(op).__name__}) is not one the tiling geometry knows; "
                "add it to gigaseg.streaming.geometry or use a plain whole-region step"
            )
        for t in node.output_tensors:
            spans[id(t)] = out
            channels[id(t)] = int(t.shape[-1])
    return spans, channels


def total_stride(model: keras.Model) -> int:
    """Product of the strides on the deepest path: region, tile and halo sizes must be multiples of it."""
    # The product of all downsampling strides is a multiple of every jump, so it is a safe
    # period for the walk; the largest jump found is the total stride.
    product = 1
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.MaxPooling2D, layers.AveragePooling2D)) and not isinstance(
            layer, layers.Conv2DTranspose
        ):
            product *= _square(layer, "strides")
    spans, _ = _walk(model, product)
    return max(s.jump for s in spans.values())


def model_geometry(model: keras.Model) -> Geometry:
    """Derive total stride, receptive field and halo by walking the model's layers."""
    stride = total_stride(model)
    spans, _ = _walk(model, stride)
    out = spans[id(model.outputs[0])]
    if out.jump != 1:
        raise ValueError(f"the model's output is at 1/{out.jump} of the input resolution; tiling needs full resolution")
    receptive_field = max(h - l + 1 for l, h in zip(out.lo, out.hi))
    # Output pixel r of a block (0 <= r < stride) reads r + lo[r] .. r + hi[r] relative to the block start.
    reach_before = max(0, max(-(r + l) for r, l in enumerate(out.lo)))
    reach_after = max(0, max(r + h - (stride - 1) for r, h in enumerate(out.hi)))
    halo = math.ceil(max(reach_before, reach_after) / stride) * stride
    return Geometry(stride, receptive_field, reach_before, reach_after, halo)


def activation_bytes_per_pixel(model: keras.Model, dtype_bytes: int = 4) -> float:
    """Bytes of all layer outputs per input pixel: the forward activations a gradient tape keeps."""
    stride = total_stride(model)
    spans, channels = _walk(model, stride)
    total = 0.0
    for key, span in spans.items():
        if key == id(model.inputs[0]):
            total += channels[key] * 1  # the uint8 image itself
            continue
        total += channels[key] * dtype_bytes / span.jump**2
    return total
