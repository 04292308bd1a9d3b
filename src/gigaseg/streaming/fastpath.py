"""A faster, numerically equivalent evaluation of the U-Net for tiles: full-resolution tensors in space-to-depth layout.

Stock TensorFlow CPU kernels are slow on full-resolution tensors with 3-7 channels
(concatenation, the 1x1 head, the filter gradient of the first 7x7/4 convolution take most
of a step). With the first stride ``f``, every full-resolution tensor is kept as
``(h/f, w/f, f*f*C)`` blocks instead (windows are read in that layout, see :func:`to_blocks`):
the first strided convolution becomes a stride-1 convolution over blocks, the last transposed
convolution (kernel = stride = ``f``) a matrix product, the 1x1 head a block-diagonal matrix
product, and the concatenation with the image disappears (the head sums one product per part).
The strided convolutions below full resolution become block convolutions of their
space-to-depth input too; all block convolutions get their gradients from one matrix product
each (:func:`block_conv`). Kernels are rearranged from the model's own variables with
differentiable ops, so gradients reach ``model.trainable_variables`` directly. Models this
does not recognise fall back to calling the Keras model.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numba
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
    cropped: bool = False  # already cut to the tile core (see SpaceToDepthUNet.__call__)


class Unsupported(Exception):
    """A model (or one of its layers) this evaluation does not cover; the message says which and why."""


def _square(value) -> int:
    a, b = (value, value) if isinstance(value, int) else value
    if a != b:
        raise Unsupported(f"a non-square kernel, stride or dilation {value}")
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


@numba.njit(nogil=True, cache=True)
def _swap_middle_axes(source, out):  # pragma: no cover - compiled
    """``out[a, b, c] = source[a, c, b]``: 4-D arrays whose last axis (one block row) is a few machine words."""
    for a in range(out.shape[0]):
        for c in range(out.shape[2]):
            for b in range(out.shape[1]):
                for t in range(out.shape[3]):
                    out[a, b, c, t] = source[a, c, b, t]


def _swap_middle(source: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = source.transpose(0, 2, 1, 3)``, moving machine words in compiled loops where the views allow it.

    Block rows are a few bytes (12 for an RGB window in 4 x 4 blocks): numpy's transposing copy
    moves them one element at a time, the compiled loops a machine word at a time
    (benchmarks/README.md, "Kernel notes").
    """
    chunk = out.shape[3] * out.itemsize
    word = next(size for size in (8, 4, 2, 1) if chunk % size == 0)
    try:
        words = source.view(f"u{word}"), out.view(f"u{word}")
    except ValueError:  # the source's last axis is not contiguous
        out[...] = source.transpose(0, 2, 1, 3)
    else:
        _swap_middle_axes(*words)


def to_blocks(array: np.ndarray, f: int) -> np.ndarray:
    """``(h, w[, c])`` -> ``(h/f, w/f, f*f*c)`` in one copy, in the channel order of ``tf.nn.space_to_depth``.

    Windows are read straight into this layout in the prefetch thread, which is cheaper than
    TensorFlow's SpaceToDepth on uint8 tensors (benchmarks/README.md, "Kernel notes"). Windows
    cut from a memory map (rows apart, each row contiguous) are read where they lie.
    """
    h, w = array.shape[:2]
    c = array.shape[2] if array.ndim == 3 else 1
    out = np.empty((h // f, w // f, f * f * c), array.dtype)
    _swap_middle(array.reshape(h // f, f, w // f, f * c), out.reshape(h // f, w // f, f, f * c))
    return out


def from_blocks(blocks: np.ndarray, f: int) -> np.ndarray:
    """``(h/f, w/f, f*f)`` one-channel blocks -> ``(h, w)``: the inverse of :func:`to_blocks`."""
    hb, wb = blocks.shape[:2]
    out = np.empty((hb * f, wb * f), blocks.dtype)
    _swap_middle(blocks.reshape(hb, wb, f, f), out.reshape(hb, f, wb, f))
    return out


def _shifted_outputs(dy: tf.Tensor, kb: int, before: int) -> tf.Tensor:
    """``D[r, s, ab] = dy[r - a + before, s - b + before]`` (zero outside): the gradient of the products."""
    h, w = tf.shape(dy)[0], tf.shape(dy)[1]
    padded = tf.pad(dy, [[kb - 1, kb - 1], [kb - 1, kb - 1], [0, 0]])
    parts = []
    for a in range(kb):
        for b in range(kb):
            top, left = before + kb - 1 - a, before + kb - 1 - b
            parts.append(padded[top : top + h, left : left + w, :])
    return tf.concat(parts, -1)


# The gradients of the block convolution, registered once under these names (not
# ``tf.custom_gradient``: inside a traced function it registers a new gradient under a fresh
# name at every trace, and TensorFlow's registry keeps it, and the traced graph it refers to,
# for the life of the process, tensorflow/tensorflow#97697: memory lost with every new
# TiledEngine; benchmarks/README.md, "Kernel notes" and "Soak").
_BLOCK_CONV = "GigasegBlockConv2D"
_BLOCK_CONV_OF_DATA = "GigasegBlockConv2DOfData"


def _block_conv_gradients(op, dy, *, data: bool):
    """Both gradients of a block convolution as single matrix products against the shifted output gradient.

    TensorFlow's Conv2DBackpropFilter is slow for these shapes (many positions, 4 filters); so is
    taking one shifted slice of the wide input per kernel offset. Shifting the narrow output
    gradient instead (``kb*kb`` copies of 4 channels) lets one product do all offsets at once.
    """
    x, kernel, before = op.inputs
    before = int(tf.get_static_value(before))
    kb, _, channels, filters = kernel.shape
    shifted = tf.reshape(_shifted_outputs(dy[0], kb, before), [-1, kb * kb * filters])
    grad = tf.matmul(tf.reshape(x, [-1, channels]), shifted, transpose_a=True)  # (c, kb*kb*filters)
    kernel_gradient = tf.transpose(tf.reshape(grad, [channels, kb, kb, filters]), [1, 2, 0, 3])
    if data:
        return None, kernel_gradient, None
    side_by_side = tf.reshape(tf.transpose(kernel, [2, 0, 1, 3]), [channels, -1])
    x_gradient = tf.reshape(tf.matmul(shifted, side_by_side, transpose_b=True), tf.shape(x))
    return x_gradient, kernel_gradient, None


@tf.RegisterGradient(_BLOCK_CONV)
def _block_conv_gradient(op, dy):
    return _block_conv_gradients(op, dy, data=False)


@tf.RegisterGradient(_BLOCK_CONV_OF_DATA)
def _block_conv_of_data_gradient(op, dy):
    return _block_conv_gradients(op, dy, data=True)


def block_conv(x: tf.Tensor, kernel: tf.Tensor, before: int, *, data: bool = False) -> tf.Tensor:
    """Stride-1 convolution of ``x`` (1, h, w, c) over blocks: ``kernel`` (kb, kb, c, filters), ``before`` blocks of zeros first.

    The output has the input's size. The gradient tape records one op from (x, kernel) whose
    gradient is the registered one. With ``data`` no gradient flows to ``x``.
    """
    after = kernel.shape[0] - 1 - before
    y = tf.nn.conv2d(tf.stop_gradient(x), tf.stop_gradient(kernel), 1, [[0, 0], [before, after], [before, after], [0, 0]])
    # ``before`` (a python int) rides along as a constant input: the gradient function only sees the op.
    tf.__internal__.record_gradient(
        _BLOCK_CONV_OF_DATA if data else _BLOCK_CONV, [x, kernel, tf.constant(before, tf.int32)], (), [y]
    )
    return y


def _block_kernel(op, w: tf.Tensor, cin: int, f: int) -> tuple[tf.Tensor, int]:
    """The strided kernel ``w`` of ``op`` as a stride-1 kernel over f x f blocks, and the blocks of padding before."""
    k = _square(op.kernel_size)
    index, before, _ = _s2d_kernel_index(k, f, max(k - f, 0) // 2, cin, op.filters)
    return tf.gather(tf.concat([tf.reshape(w, [-1]), tf.zeros([1], w.dtype)], 0), index), before


def _pointwise(value: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """``(1, h, w, c) x (c, d) -> (1, h, w, d)`` as one 2-D matrix product (its gradients are plain products too, unlike einsum's)."""
    shape = tf.shape(value)
    out = tf.matmul(tf.reshape(value, [-1, value.shape[-1]]), weights)
    return tf.reshape(out, tf.concat([shape[:3], [weights.shape[-1]]], 0))


def _block_diagonal(w: tf.Tensor, n: int) -> tf.Tensor:
    """(C, F) -> (n*C, n*F) with ``w`` repeated on the diagonal: a 1x1 convolution per sub-pixel."""
    eye = tf.eye(n, dtype=w.dtype)
    return tf.reshape(tf.einsum("ij,cf->icjf", eye, w), [n * w.shape[0], n * w.shape[1]])


class SpaceToDepthUNet:
    """Evaluates a recognised model on one image in space-to-depth layout: ``(h/f, w/f, f*f*3) uint8 -> (h/f, w/f, f*f)``.

    Images go in as :func:`to_blocks` gives them and probabilities come out in the same
    layout (:func:`from_blocks` turns them back into an ``h`` x ``w`` map).
    """

    def __init__(self, model: keras.Model, factor: int, plan: list):
        self.model = model
        self.factor = factor
        self._plan = plan
        self.crops = True  # whether a core given to __call__ skips the halo after the last transposed convolution

    @classmethod
    def build(cls, model: keras.Model) -> "SpaceToDepthUNet | None":
        """Return the fast evaluator for ``model``, or None if its layout is not one this module knows."""
        try:
            return cls.lower(model)
        except Unsupported:
            return None

    @classmethod
    def lower(cls, model: keras.Model) -> "SpaceToDepthUNet":
        """The fast evaluator for ``model``; :class:`Unsupported`, saying why, if its layout is not one this module knows."""
        factor = cls._first_stride(model)
        if factor < 2:
            raise Unsupported(f"the first convolution reading the image has stride {factor}: there are no blocks to lower to")
        net = cls(model, factor, list(model.operations))
        # Evaluate once on a tiny input to reject unsupported graphs now, not per tile.
        net._check()
        try:
            net._check(core=True)
        except Unsupported:  # e.g. a 1x1 convolution before a strided one: evaluate whole windows
            net.crops = False
        return net

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
        raise Unsupported("no strided convolution reads the image")

    def _check(self, core: bool = False) -> None:
        f = self.factor
        stride = total_stride(self.model)
        size = 4 * stride
        x = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        ref = self.model(x[np.newaxis], training=False)[0, :, :, 0]
        if core:  # the middle two total strides of the window
            box = (tf.constant([stride // f] * 2), tf.constant([2 * stride // f] * 2))
            ref = ref[stride : 3 * stride, stride : 3 * stride]
            fast = from_blocks(self(tf.constant(to_blocks(x, f)), box).numpy(), f)
        else:
            fast = from_blocks(self(tf.constant(to_blocks(x, f))).numpy(), f)
        if fast.shape != tuple(ref.shape) or float(tf.reduce_max(tf.abs(fast - ref))) > 1e-5:
            raise Unsupported("its probabilities differ from the Keras model's on a test window")

    def __call__(self, blocks: tf.Tensor, core: tuple[tf.Tensor, tf.Tensor] | None = None) -> tf.Tensor:
        """Probabilities of ``blocks``; with ``core`` = (offset, size) in blocks, of that part of the window only.

        Everything after the last transposed convolution is pointwise in block layout, so
        it runs on the core alone (the halo is only needed by the convolutions below it),
        which leaves out ``1 - 1024**2 / 1152**2``, about a fifth, of the full-resolution work
        for a 1024-pixel tile with a 64-pixel halo.
        """
        early = core if self.crops else None
        values = self._evaluate(blocks, early)
        result = values[id(self.model.outputs[0])]
        if not isinstance(result, list) or len(result) != 1 or result[0].channels != 1:
            raise Unsupported("the output is not one full-resolution channel")
        return (result[0].value if result[0].cropped else _crop(result[0].value, core))[0]

    def _evaluate(self, blocks: tf.Tensor, early, skip: frozenset = frozenset(), given: dict | None = None) -> dict:
        """The value of every tensor of the model (by id), leaving out the operations in ``skip``.

        ``given`` maps tensor ids to values at 1/f resolution computed elsewhere (their
        operations must be in ``skip``).
        """
        f = self.factor
        model = self.model
        values: dict[int, object] = dict(given or {})
        jumps: dict[int, int] = {key: f for key in values}
        pixels = blocks[tf.newaxis]
        values[id(model.inputs[0])] = [_Part(pixels, int(model.inputs[0].shape[-1]), True)]
        for op in self._plan:
            if isinstance(op, layers.InputLayer) or id(op) in skip:
                continue
            node = op._inbound_nodes[0]
            keys = [id(t) for t in node.input_tensors]
            args = [values[k] for k in keys]
            if any(isinstance(a, list) for a in args):
                out = self._full_resolution(op, args, early)
                jump = f
            else:
                jump = max(jumps[k] for k in keys)
                if isinstance(op, layers.Conv2DTranspose):
                    jump //= _square(op.strides)
                elif isinstance(op, layers.Conv2D):
                    jump *= _square(op.strides)
                elif not isinstance(op, (layers.Concatenate, layers.Add, layers.Activation, layers.ReLU)):
                    raise Unsupported(f"layer {op.name} ({type(op).__name__}) is outside the space-to-depth lowering")
                if jump == 1:
                    if not (
                        isinstance(op, layers.Conv2DTranspose)
                        and _square(op.strides) == f
                        and _square(op.kernel_size) == f
                        and _square(op.dilation_rate) == 1
                    ):
                        raise Unsupported(f"layer {op.name} returns to full resolution other than by a transposed "
                                          f"convolution with kernel = stride = {f}")
                    out = lower_transposed(op, _crop(args[0], early), f, cropped=early is not None)
                elif _strided_same(op):
                    out = lower_strided(op, args[0])
                elif _transposed_unmixed(op):
                    out = lower_transposed_unmixed(op, args[0])
                else:
                    out = op(args if len(args) > 1 else args[0])
            for t in node.output_tensors:
                values[id(t)] = out
                jumps[id(t)] = jump
        return values

    def _full_resolution(self, op, args, core):
        f = self.factor
        if isinstance(op, layers.Rescaling):
            (parts,) = args
            return [
                _Part(tf.cast(p.value, op.compute_dtype) * op.scale + op.offset, p.channels, p.data, p.cropped)
                for p in parts
            ]
        if isinstance(op, layers.Concatenate):
            if not all(isinstance(a, list) for a in args) or op.axis not in (-1, 3):
                raise Unsupported(f"layer {op.name} concatenates tensors of different resolutions or not along channels")
            return [p for parts in args for p in parts]
        if isinstance(op, (layers.Activation, layers.ReLU)):
            (parts,) = args
            return [_Part(op(p.value), p.channels, p.data, p.cropped) for p in parts]
        if isinstance(op, layers.Conv2DTranspose):
            raise Unsupported(f"layer {op.name} is a transposed convolution at full resolution")
        if isinstance(op, layers.Conv2D) and type(op) is layers.Conv2D:
            (parts,) = args
            k, s = _square(op.kernel_size), _square(op.strides)
            if _square(op.dilation_rate) != 1 or op.groups != 1:
                raise Unsupported(f"layer {op.name} is dilated or grouped")
            total, start = None, 0
            for p in parts:
                w = op.kernel[:, :, start : start + p.channels, :]
                start += p.channels
                if k == 1 and s == 1:
                    value = p.value if p.cropped else _crop(p.value, core)
                    term = _pointwise(value, _block_diagonal(w[0, 0], f * f))
                elif p.cropped:  # a wider kernel needs the halo the core has lost
                    raise Unsupported(f"layer {op.name} needs the halo after the core was cut")
                elif s == f and op.padding == "same":
                    kernel, before = _block_kernel(op, w, p.channels, f)
                    term = block_conv(p.value, kernel, before, data=p.data)
                else:
                    raise Unsupported(f"layer {op.name} is a full-resolution convolution other than 1x1 or strided 'same' by {f}")
                total = term if total is None else total + term
            if op.use_bias:
                total = total + (tf.tile(op.bias, [f * f]) if s == 1 else op.bias)
            total = op.activation(total)
            return [_Part(total, op.filters, False, core is not None)] if s == 1 else total
        raise Unsupported(f"layer {op.name} ({type(op).__name__}) at full resolution is outside the space-to-depth lowering")


def _crop(value: tf.Tensor, core) -> tf.Tensor:
    """``value`` (1, h, w, c) cut to ``core`` = (offset, size) in blocks; unchanged if ``core`` is None."""
    if core is None:
        return value
    offset, size = core
    # tf.slice, not a strided slice: its gradient is a cheap Pad, where StridedSliceGrad was slow
    # (benchmarks/README.md, "Kernel notes").
    return tf.slice(value, tf.concat([[0], offset, [0]], 0), tf.concat([[1], size, [value.shape[-1]]], 0))


def _strided_same(op) -> bool:
    return (
        type(op) is layers.Conv2D
        and op.padding == "same"
        and _square(op.strides) > 1
        and _square(op.dilation_rate) == 1
        and op.groups == 1
    )


def _transposed_unmixed(op) -> bool:
    """A transposed convolution whose kernel equals its stride: every input pixel fills its own output block."""
    return (
        type(op) is layers.Conv2DTranspose
        and _square(op.strides) == _square(op.kernel_size) > 1
        and _square(op.dilation_rate) == 1
        and op.output_padding is None
        and op.data_format == "channels_last"
    )


def lower_transposed_unmixed(op, value: tf.Tensor) -> tf.Tensor:
    """A transposed convolution with kernel = stride below full resolution, as one matrix product and DepthToSpace.

    TensorFlow's Conv2DBackpropInput, which Keras runs for it, took most of the low-resolution
    network's forward time (and its gradients more); with kernel = stride the output blocks
    do not overlap, so padding 'same' and 'valid' agree.
    """
    s = _square(op.strides)
    weights, bias = transposed_as_product(op, s)
    out = _pointwise(value, weights)
    if bias is not None:
        out = out + bias
    return tf.nn.depth_to_space(op.activation(out), s)


def lower_strided(op, value: tf.Tensor) -> tf.Tensor:
    """A strided 'same' convolution below full resolution, as a block convolution of its space-to-depth input.

    TensorFlow's filter gradient for these small strided convolutions costs more than the rest
    of the low-resolution network together.
    """
    s = _square(op.strides)
    kernel, before = _block_kernel(op, op.kernel, int(value.shape[-1]), s)
    out = block_conv(tf.nn.space_to_depth(value, s), kernel, before)
    if op.use_bias:
        out = out + op.bias
    return op.activation(out)


def transposed_as_product(op, f: int) -> tuple[tf.Tensor, tf.Tensor | None]:
    """A transposed convolution with kernel = stride = f as (in, f*f*out) weights and (f*f*out,) bias (None without one).

    Output column ``(sub-pixel row * f + sub-pixel column) * out + filter``: the space-to-depth order.
    """
    kernel = op.kernel  # (k, k, out, in)
    weights = tf.reshape(tf.transpose(kernel, [3, 0, 1, 2]), [kernel.shape[3], -1])
    return weights, (tf.tile(op.bias, [f * f]) if op.use_bias else None)


def lower_transposed(op, value: tf.Tensor, f: int, *, cropped: bool = False) -> list[_Part]:
    """Transposed convolution with kernel = stride = f into full resolution, as one matrix product."""
    weights, bias = transposed_as_product(op, f)
    out = _pointwise(value, weights)
    if bias is not None:
        out = out + bias
    return [_Part(op.activation(out), op.filters, False, cropped)]
