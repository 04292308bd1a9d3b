"""TensorFlow side of the fused full-resolution layers (:mod:`gigaseg.streaming.fused`, :mod:`gigaseg.streaming.fused_conv`): recognising them in a model, and the per-tile graphs that call them.

The tail is the U-Net's last transposed convolution (kernel = stride = the first stride,
ReLU), its concatenation with the rescaled input image and the 1x1 sigmoid head. TensorFlow
evaluates everything below it (:class:`~gigaseg.streaming.fastpath.SpaceToDepthUNet`, cut
to the tile core); the kernels do the rest and hand back the gradients of the tail's input
and parameters, which the gradient tape carries down to the variables. In forward passes
(prediction, pass 1 sums) the first convolution, the strided one that reads the rescaled
image, runs in compiled loops too; pass 2 leaves it to TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from gigaseg.losses import BCE_CLIP
from gigaseg.streaming.fastpath import SpaceToDepthUNet, Unsupported, _crop, _square, from_blocks, to_blocks, transposed_as_product
from gigaseg.streaming.fused import SUMS, FusedTail, RowSplitter, TailParams
from gigaseg.streaming.fused_conv import FusedFirstConv
from gigaseg.streaming.geometry import total_stride


def _producer(tensor):
    return tensor._keras_history.operation


def _consumers(model: keras.Model, tensor) -> list:
    return [op for op in model.operations if any(t is tensor for t in op._inbound_nodes[0].input_tensors)]


def _first_conv(model: keras.Model, rescaling: layers.Rescaling, f: int) -> "layers.Conv2D | None":
    """The strided convolution that reads the rescaled image, if it and the tail are the image's only readers."""
    image = rescaling._inbound_nodes[0].output_tensors[0]
    readers = [op for op in _consumers(model, image) if not isinstance(op, layers.Concatenate)]
    if len(readers) != 1 or len(_consumers(model, image)) != 2:
        return None
    (conv,) = readers
    if not (
        type(conv) is layers.Conv2D
        and _square(conv.strides) == f
        and conv.padding == "same"
        and _square(conv.dilation_rate) == 1
        and conv.groups == 1
        and conv.activation is keras.activations.relu
        and conv.use_bias
    ):
        return None
    return conv


@dataclass
class Tail:
    """The fused tail of a model evaluated by ``net``; build it with :meth:`Tail.match`."""

    net: SpaceToDepthUNet
    transposed: layers.Conv2DTranspose
    head: layers.Conv2D
    rescaling: layers.Rescaling
    image_first: bool  # the concatenation's order: [image, activations] or [activations, image]
    kernels: FusedTail
    first: layers.Conv2D | None = None  # the first convolution, when its kernel runs it in forward passes
    first_kernels: FusedFirstConv | None = None

    @classmethod
    def match(cls, net: SpaceToDepthUNet, threads: int | None = None) -> "Tail":
        """The fused tail of ``net``'s model; :class:`~gigaseg.streaming.fastpath.Unsupported`, saying why, if there is none."""
        model, f = net.model, net.factor
        pattern = (f"the model does not end in the tail the kernels compute (a transposed convolution with kernel = "
                   f"stride = {f}, concatenated with the rescaled image, then a 1x1 sigmoid convolution to one channel)")
        try:
            head = _producer(model.outputs[0])
            concat = _producer(head._inbound_nodes[0].input_tensors[0])
            inputs = concat._inbound_nodes[0].input_tensors
            kinds = [_producer(t) for t in inputs]
        except (AttributeError, IndexError):
            raise Unsupported(pattern) from None
        if model.compute_dtype != "float32":
            raise Unsupported(f"the kernels compute in float32 and the model in {model.compute_dtype}")
        if not (
            type(head) is layers.Conv2D
            and _square(head.kernel_size) == 1
            and _square(head.strides) == 1
            and head.filters == 1
            and head.activation is keras.activations.sigmoid
            and isinstance(concat, layers.Concatenate)
            and concat.axis in (-1, 3)
            and len(kinds) == 2
        ):
            raise Unsupported(pattern)
        image_first = isinstance(kinds[0], layers.Rescaling)
        rescaling, transposed = kinds if image_first else kinds[::-1]
        if not (
            type(rescaling) is layers.Rescaling
            and rescaling._inbound_nodes[0].input_tensors[0] is model.inputs[0]
            and np.ndim(rescaling.scale) == 0
            and np.ndim(rescaling.offset) == 0
            and type(transposed) is layers.Conv2DTranspose
            and _square(transposed.strides) == f
            and _square(transposed.kernel_size) == f
            and _square(transposed.dilation_rate) == 1
        ):
            raise Unsupported(pattern)
        if transposed.activation is not keras.activations.relu:
            name = getattr(transposed.activation, "__name__", str(transposed.activation))
            raise Unsupported(f"the kernels compute ReLU and layer {transposed.name} uses {name}")
        rows = RowSplitter(threads)
        tail = cls(net, transposed, head, rescaling, image_first, FusedTail(rows, clip=BCE_CLIP))
        if not tail._agrees():
            raise Unsupported("the fused probabilities differ from the lowered ones on a test window")
        first = _first_conv(model, rescaling, f)
        if first is not None:
            tail.first, tail.first_kernels = first, FusedFirstConv(f, _square(first.kernel_size), rows)
            if not tail._agrees():
                tail.first = tail.first_kernels = None
        return tail

    def _agrees(self) -> bool:
        """Whether the fused probabilities match the TensorFlow evaluation on a small random image."""
        f, size = self.net.factor, 2 * total_stride(self.net.model)
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        blocks = tf.constant(to_blocks(image, f))
        core = (tf.constant([0, 0]), tf.constant([size // f] * 2))
        fused = from_blocks(self.probabilities(blocks, core).numpy(), f)
        reference = from_blocks(self.net(blocks).numpy(), f)
        return bool(np.max(np.abs(fused - reference)) <= 1e-5)

    # ----- TensorFlow pieces ------------------------------------------------------------------

    def _first_output(self, blocks: tf.Tensor) -> tf.Tensor:
        """The first convolution's activations of the whole window, (1, rows, cols, filters), from its kernel."""
        inputs = [blocks, self.first.kernel, self.first.bias, *self._rescale()]
        out = tf.numpy_function(self.first_kernels.forward, inputs, tf.float32, stateful=False, name="fused_first_conv")
        return tf.ensure_shape(out, [None, None, self.first.filters])[tf.newaxis]

    def _below(self, blocks: tf.Tensor, core, forward_only: bool = False) -> tf.Tensor:
        """The transposed convolution's input, cut to the core: (rows, cols, C).

        With ``forward_only`` (nothing is differentiated) the fused first convolution is used, if any.
        """
        ops = [self.transposed, self.head, _producer(self.head._inbound_nodes[0].input_tensors[0])]
        given = None
        if forward_only and self.first is not None:
            ops += [self.first, self.rescaling]
            given = {id(self.first._inbound_nodes[0].output_tensors[0]): self._first_output(blocks)}
        values = self.net._evaluate(blocks, None, frozenset(id(op) for op in ops), given)
        below = values[id(self.transposed._inbound_nodes[0].input_tensors[0])]
        return _crop(below, core)[0]

    def parameters(self) -> TailParams:
        """The tail's parameters as tensors: the learned ones from the layers' variables with differentiable ops, and the rescaling."""
        t, head = self.transposed, self.head
        weights, bias = transposed_as_product(t, self.net.factor)
        if bias is None:
            bias = tf.zeros([weights.shape[1]], weights.dtype)
        head_weights = head.kernel[0, 0, :, 0]
        if self.image_first:
            image_weights, activation_weights = head_weights[:3], head_weights[3:]
        else:
            activation_weights, image_weights = head_weights[: t.filters], head_weights[t.filters :]
        head_bias = head.bias[0] if head.use_bias else tf.zeros([], head_weights.dtype)
        return TailParams(weights, bias, activation_weights, image_weights, head_bias, *self._rescale())

    def _rescale(self) -> list[tf.Tensor]:
        return [tf.constant(float(self.rescaling.scale), tf.float32), tf.constant(float(self.rescaling.offset), tf.float32)]

    @staticmethod
    def _image(blocks: tf.Tensor, core) -> tf.Tensor:
        return _crop(blocks[tf.newaxis], core)[0]

    # tf.numpy_function hands its function the tensors' values as separate arguments: the
    # kernels' calls below gather the TailParams' seven fields back into one tuple.

    def probabilities(self, blocks: tf.Tensor, core) -> tf.Tensor:
        """(rows, cols, f*f) probabilities of the core, as ``net(blocks, core)`` gives them."""
        kernels = self.kernels

        def run(value, image, *params):
            return kernels.probabilities(value, image, params)

        inputs = [self._below(blocks, core, True), self._image(blocks, core), *self.parameters()]
        p = tf.numpy_function(run, inputs, tf.float32, stateful=False, name="fused_tail")
        return tf.ensure_shape(p, [None, None, self.net.factor**2])

    def sums(self, blocks: tf.Tensor, labels: tf.Tensor, core, with_bce: bool) -> tf.Tensor:
        """The six float64 sums of the core (:data:`gigaseg.streaming.fused.SUMS`)."""
        kernels = self.kernels

        def run(value, image, labels, *params_and_flag):
            return kernels.sums(value, image, labels, params_and_flag[:-1], params_and_flag[-1])

        inputs = [self._below(blocks, core, True), self._image(blocks, core), labels, *self.parameters(), tf.constant(with_bce)]
        sums = tf.numpy_function(run, inputs, tf.float64, stateful=False, name="fused_tail_sums")
        return tf.ensure_shape(sums, [len(SUMS)])

    def gradients(self, blocks, labels, core, weights, variables) -> tuple[list[tf.Tensor], tf.Tensor]:
        """Gradients of the core's surrogate for ``variables`` and the core's six sums.

        ``weights`` = (dL/dp of background, of tissue, BCE scale), float32 tensors
        (:class:`gigaseg.streaming.fused.Surrogate`'s order).
        """
        kernels, count = self.kernels, len(TailParams._fields)

        def run(value, image, labels, *params_and_surrogate):
            return kernels.gradients(value, image, labels, params_and_surrogate[:count], params_and_surrogate[count:])

        with tf.GradientTape() as tape:
            below = self._below(blocks, core)
            parameters = self.parameters()
        inputs = [below, self._image(blocks, core), labels, *parameters, *weights]
        outputs = tf.numpy_function(
            run, inputs, [tf.float32] * 6 + [tf.float64], stateful=False, name="fused_tail_gradients"
        )
        # The kernels' TailGradients: the input's and the learned parameters' gradients, then the sums.
        targets = [below, *parameters.learned]
        upstream = [tf.ensure_shape(g, t.shape) if t.shape.is_fully_defined() else g for g, t in zip(outputs[:6], targets)]
        upstream[0] = tf.reshape(upstream[0], tf.shape(below))
        grads = tape.gradient(targets, variables, output_gradients=upstream)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        return grads, tf.ensure_shape(outputs[6], [len(SUMS)])
