"""A faster, numerically equivalent evaluation of the U-Net for tiles: full-resolution tensors in space-to-depth layout.

Stock TensorFlow CPU kernels are slow on full-resolution tensors with 3-7 channels
(concatenation, the 1x1 head, the filter gradient of the first 7x7/4 convolution take most
of a step). With the first stride ``f``, every full-resolution tensor is kept as
``(h/f, w/f, f*f*C)`` blocks instead: the first strided convolution becomes a stride-1
convolution over blocks, the last transposed convolution (kernel = stride = ``f``) a matrix
product, the 1x1 head a block-diagonal matrix product, and the concatenation with the image
disappears (the head sums one product per part). Kernels are rearranged from the model's own
variables with differentiable ops, so gradients reach ``model.trainable_variables`` directly.
Models this does not recognise fall back to calling the Keras model.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from gigaseg.streaming.geometry import total_stride


@dataclass
class _Part:
    """One piece of a full-resolution tensor in space-to-depth layout; ``data`` if it does not depend on weights."""

    value: tf.Tensor
    channels: int
    data: bool


class _Unsupported(Exception):
    pass


def _square(value) -> int:
    a, b = (value, value) if isinstance(value, int) else value
    if a != b:
        raise _Unsupported
    return int(a)


def _s2d_kernel_index(k: int, f: int, pad: int, cin: int, cout: int) -> tuple[np.ndarray, int, int]:
    """Gather indices that turn a k x k stride-f kernel into a stride-1 kernel over f x f blocks."""
    b_min, b_max = (-pad) // f, (k - 1 - pad) // f
    kb = b_max - b_min + 1
    zero = k * k * cin * cout  # index of an appended 0
    index = np.full((kb, f, kb, f, cin, cout), zero, dtype=np.int64)
    flat = np.arange(k * k * cin * cout).reshape(k, k, cin, cout)
    for ti in range(k):
        bi, ri = divmod(ti - pad, f)
        for tj in range(k):
            bj, rj = divmod(tj - pad, f)
            index[bi - b_min, ri, bj - b_min, rj] = flat[ti, tj]
    return index.transpose(0, 2, 1, 3, 4, 5).reshape(kb, kb, f * f * cin, cout), -b_min, b_max


def _filter_gradient(x: tf.Tensor, dy: tf.Tensor, kernel_shape) -> tf.Tensor:
    """Gradient of a VALID stride-1 convolution of ``x`` with respect to its kernel: one matrix product per offset.

    TensorFlow's Conv2DBackpropFilter is slow for the shapes of the first layer's blocks.
    """
    kb = kernel_shape[0]
    h, w = tf.shape(dy)[1], tf.shape(dy)[2]
    dy2 = tf.reshape(dy, [-1, dy.shape[-1]])
    rows = []
    for di in range(kb):
        for dj in range(kb):
            shifted = tf.reshape(x[:, di : di + h, dj : dj + w, :], [-1, x.shape[-1]])
            rows.append(tf.matmul(shifted, dy2, transpose_a=True))
    return tf.reshape(tf.stack(rows), kernel_shape)


#: The gradient of the convolutions of data, registered once under this name. Not
#: ``tf.custom_gradient``: inside a traced function it registers a new gradient under a fresh
#: name at every trace, and TensorFlow's registry keeps it, and the traced graph it refers to,
#: for the life of the process (tensorflow/tensorflow#97697): about 1 MB per new TiledEngine,
#: e.g. per predicted slide, never freed.
_DATA_CONV_GRADIENT = "GigasegDataConv2D"


@tf.RegisterGradient(_DATA_CONV_GRADIENT)
def _data_conv_gradient(op, dy):
    x, kernel = op.inputs
    return None, _filter_gradient(x, dy, kernel.shape)


def _conv_blocks_of_data(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """VALID stride-1 convolution of data (no gradient wanted for ``x``) with a cheaper filter gradient."""
    # The convolution itself is hidden from gradient tapes; what they record instead is one
    # op from (x, kernel) to the result whose gradient is the one registered above.
    y = tf.nn.conv2d(tf.stop_gradient(x), tf.stop_gradient(kernel), 1, "VALID")
    tf.__internal__.record_gradient(_DATA_CONV_GRADIENT, [x, kernel], (), [y])
    return y


def _block_diagonal(w: tf.Tensor, n: int) -> tf.Tensor:
    """(C, F) -> (n*C, n*F) with ``w`` repeated on the diagonal: a 1x1 convolution per sub-pixel."""
    eye = tf.eye(n, dtype=w.dtype)
    return tf.reshape(tf.einsum("ij,cf->icjf", eye, w), [n * w.shape[0], n * w.shape[1]])


class SpaceToDepthUNet:
    """Evaluates a recognised model on one image in space-to-depth layout: ``(h, w, 3) uint8 -> (h/f, w/f, f*f)``."""

    def __init__(self, model: keras.Model, factor: int, plan: list):
        self.model = model
        self.factor = factor
        self._plan = plan

    @classmethod
    def build(cls, model: keras.Model) -> "SpaceToDepthUNet | None":
        """Return the fast evaluator for ``model``, or None if its layout is not one this module knows."""
        try:
            factor = cls._first_stride(model)
            if factor < 2:
                return None
            net = cls(model, factor, list(model.operations))
            # Trace once symbolically on a tiny input to reject unsupported graphs now, not per tile.
            net._check()
            return net
        except _Unsupported:
            return None

    @staticmethod
    def _first_stride(model: keras.Model) -> int:
        source = id(model.inputs[0])
        full = {source}
        for op in model.operations:
            if isinstance(op, layers.InputLayer):
                continue
            node = op._inbound_nodes[0]
            if any(id(t) in full for t in node.input_tensors):
                if isinstance(op, layers.Conv2D) and not isinstance(op, layers.Conv2DTranspose) and _square(op.strides) > 1:
                    return _square(op.strides)
                for t in node.output_tensors:
                    full.add(id(t))
        raise _Unsupported

    def _check(self) -> None:
        f = self.factor
        size = 4 * total_stride(self.model)
        x = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        fast = tf.nn.depth_to_space(self(tf.constant(x))[tf.newaxis], f)[0, :, :, 0]
        ref = self.model(x[np.newaxis], training=False)[0, :, :, 0]
        if float(tf.reduce_max(tf.abs(fast - ref))) > 1e-5:
            raise _Unsupported

    def __call__(self, image: tf.Tensor) -> tf.Tensor:
        f = self.factor
        model = self.model
        values: dict[int, object] = {}
        jumps: dict[int, int] = {}
        pixels = tf.nn.space_to_depth(image[tf.newaxis], f)
        values[id(model.inputs[0])] = [_Part(pixels, int(model.inputs[0].shape[-1]), True)]
        for op in self._plan:
            if isinstance(op, layers.InputLayer):
                continue
            node = op._inbound_nodes[0]
            keys = [id(t) for t in node.input_tensors]
            args = [values[k] for k in keys]
            if any(isinstance(a, list) for a in args):
                out = self._full_resolution(op, args)
                jump = f
            else:
                jump = max(jumps[k] for k in keys)
                if isinstance(op, layers.Conv2DTranspose):
                    jump //= _square(op.strides)
                elif isinstance(op, layers.Conv2D):
                    jump *= _square(op.strides)
                elif not isinstance(op, (layers.Concatenate, layers.Add, layers.Activation, layers.ReLU)):
                    raise _Unsupported
                if jump == 1:
                    if not (
                        isinstance(op, layers.Conv2DTranspose)
                        and _square(op.strides) == f
                        and _square(op.kernel_size) == f
                        and _square(op.dilation_rate) == 1
                    ):
                        raise _Unsupported
                    out = lower_transposed(op, args[0], f)
                else:
                    out = op(args if len(args) > 1 else args[0])
            for t in node.output_tensors:
                values[id(t)] = out
                jumps[id(t)] = jump
        result = values[id(model.outputs[0])]
        if not isinstance(result, list) or len(result) != 1 or result[0].channels != 1:
            raise _Unsupported
        return result[0].value[0]

    def _full_resolution(self, op, args):
        f = self.factor
        if isinstance(op, layers.Rescaling):
            (parts,) = args
            return [
                _Part(tf.cast(p.value, op.compute_dtype) * op.scale + op.offset, p.channels, p.data) for p in parts
            ]
        if isinstance(op, layers.Concatenate):
            if not all(isinstance(a, list) for a in args) or op.axis not in (-1, 3):
                raise _Unsupported
            return [p for parts in args for p in parts]
        if isinstance(op, (layers.Activation, layers.ReLU)):
            (parts,) = args
            return [_Part(op(p.value), p.channels, p.data) for p in parts]
        if isinstance(op, layers.Conv2DTranspose):
            raise _Unsupported
        if isinstance(op, layers.Conv2D) and type(op) is layers.Conv2D:
            (parts,) = args
            k, s = _square(op.kernel_size), _square(op.strides)
            if _square(op.dilation_rate) != 1 or op.groups != 1:
                raise _Unsupported
            total, start = None, 0
            for p in parts:
                w = op.kernel[:, :, start : start + p.channels, :]
                start += p.channels
                if k == 1 and s == 1:
                    term = tf.einsum("bhwc,cd->bhwd", p.value, _block_diagonal(w[0, 0], f * f))
                elif s == f and op.padding == "same":
                    index, before, after = _s2d_kernel_index(k, f, max(k - f, 0) // 2, p.channels, op.filters)
                    kernel = tf.gather(tf.concat([tf.reshape(w, [-1]), tf.zeros([1], w.dtype)], 0), index)
                    padded = tf.pad(p.value, [[0, 0], [before, after], [before, after], [0, 0]])
                    term = _conv_blocks_of_data(padded, kernel) if p.data else tf.nn.conv2d(padded, kernel, 1, "VALID")
                else:
                    raise _Unsupported
                total = term if total is None else total + term
            if op.use_bias:
                total = total + (tf.tile(op.bias, [f * f]) if s == 1 else op.bias)
            total = op.activation(total)
            return [_Part(total, op.filters, False)] if s == 1 else total
        raise _Unsupported


def lower_transposed(op, value: tf.Tensor, f: int) -> list[_Part]:
    """Transposed convolution with kernel = stride = f into full resolution, as one matrix product."""
    kernel = op.kernel  # (k, k, out, in)
    weights = tf.reshape(tf.transpose(kernel, [3, 0, 1, 2]), [kernel.shape[3], -1])
    out = tf.einsum("bhwc,cd->bhwd", value, weights)
    if op.use_bias:
        out = out + tf.tile(op.bias, [f * f])
    return [_Part(op.activation(out), op.filters, False)]
