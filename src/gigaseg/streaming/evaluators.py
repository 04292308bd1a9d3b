"""Evaluators: the ways of computing one tile's probabilities, sums and gradients, and the table that picks one.

See ``docs/STREAMING.md`` ("Evaluators"). The engine (:mod:`gigaseg.streaming.engine`) plans
the tiles, reads the windows and adds up what an evaluator returns for each of them; an
evaluator only knows one window at a time:

- ``probabilities(window, offset, shape)``: the tile core's probabilities (forward only);
- ``sums(window, core_mask, offset)``: pass 1 of the Dice losses, the six float64 sums of the
  core over its labelled pixels (:data:`SUMS`);
- ``gradients(window, core_mask, offset, background, tissue, bce_scale)``: pass 2, the
  gradients of the surrogate (``dL/dp`` per label class, and the BCE scale) for the model's
  trainable variables, and the sums pass 2 adds (all six for BCE alone, else only BCE's);
- ``tape_factor``: its memory model, what a window pixel costs in units of the model's own
  activation bytes (the memory planner multiplies the two).

Windows (and mask cores) arrive in the evaluator's ``factor`` layout: ``None`` for plain
``(h, w, 3)`` pixels, ``f`` for ``(h/f, w/f, f*f*3)`` space-to-depth blocks
(:func:`gigaseg.streaming.fastpath.to_blocks`); probabilities leave in the same layout.

Three evaluators, fastest first, make the capability table :data:`TABLE`:

- ``fused``: the lowered evaluation below the full-resolution tail, the tail itself (and, in
  forward passes, the first convolution) in compiled CPU loops (:mod:`gigaseg.streaming.tail`);
- ``lowered``: TensorFlow in space-to-depth layout (:mod:`gigaseg.streaming.fastpath`);
- ``keras``: the Keras model itself, the reference, for any model the geometry walk accepts.

:func:`choose` takes the first row whose conditions the model, the loss, the device and
``jit_compile`` meet (a fixed order, never timings, so runs are reproducible) and says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import keras
import numpy as np
import tensorflow as tf

from gigaseg.errors import ConfigError
from gigaseg.losses import HARD_THRESHOLD, bce_pixels, check_loss_name, labelled_pixels
from gigaseg.streaming.fastpath import SpaceToDepthUNet, Unsupported, from_blocks, to_blocks
from gigaseg.streaming.fused import SUMS
from gigaseg.streaming.geometry import model_geometry
from gigaseg.streaming.memory import COMPACT_TAPE_FACTOR, KERAS_TAPE_FACTOR

log = logging.getLogger(__name__)

#: Where each of the six float64 sums sits in the vectors evaluators return.
SUM_INDEX = {name: i for i, name in enumerate(SUMS)}
BCE = SUM_INDEX["bce"]


AUTO = "auto"


class EvaluatorError(RuntimeError):
    """A forced evaluator failed its self-check against the Keras reference (a bug, not bad input)."""


class SurrogateWeights(NamedTuple):
    """Pass 2's constants from the region's pass-1 sums: ``dL/dp`` of a background and of a tissue pixel, and BCE's 1/n."""

    background: float
    tissue: float
    bce_scale: float


class Evaluator:
    """One way of computing a tile; subclasses say how the core's probabilities are found.

    The sums and the surrogate's gradients here go through a gradient tape over
    :meth:`core_probabilities`; ``fused`` replaces them with its kernels.
    """

    name = ""
    tape_factor = KERAS_TAPE_FACTOR
    #: Whether XLA can compile its graphs (``jit_compile``).
    xla = True

    def __init__(self, model: keras.Model, loss: str):
        self.model = model
        self.loss = check_loss_name(loss)
        self.factor: int | None = None

    def __repr__(self) -> str:
        return f"<{self.name} evaluator>"

    # ----- layout ------------------------------------------------------------------------------

    def to_layout(self, array: np.ndarray) -> np.ndarray:
        """A window (or mask core) read as plain pixels, in the layout this evaluator takes."""
        return array if self.factor is None else to_blocks(array, self.factor)

    def from_layout(self, core: np.ndarray) -> np.ndarray:
        """A core's probabilities in this evaluator's layout as an ``(h, w)`` map."""
        return core if self.factor is None else from_blocks(core, self.factor)

    def core_shape(self, core_mask) -> tf.Tensor:
        """The core's size in pixels, from its mask (in blocks when ``factor`` is set)."""
        shape = tf.shape(core_mask)[:2]
        return shape if self.factor is None else shape * self.factor

    # ----- per tile ----------------------------------------------------------------------------

    def core_probabilities(self, window, offset, shape) -> tf.Tensor:
        """Probabilities of the ``shape`` pixels at ``offset`` in ``window``, in this evaluator's layout."""
        raise NotImplementedError

    def probabilities(self, window, offset, shape) -> tf.Tensor:
        return self.core_probabilities(window, offset, shape)

    def sums(self, window, core_mask, offset) -> tf.Tensor:
        p = self.core_probabilities(window, offset, self.core_shape(core_mask))
        return self._sums(p, core_mask)

    def gradients(self, window, core_mask, offset, background, tissue, bce_scale):
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            p = self.core_probabilities(window, offset, self.core_shape(core_mask))
            labelled, yf = labelled_pixels(core_mask, p.dtype)
            surrogate = tf.zeros((), p.dtype)
            if self.loss != "bce":
                # dL/dp per pixel from the region sums: one value for background, one for tissue,
                # 0 for ignored pixels (in the model's precision). Constants, so this is the surrogate.
                weights = tf.where(yf > 0, tf.cast(tissue, p.dtype), tf.cast(background, p.dtype))
                surrogate += tf.reduce_sum(weights * labelled * p)
            if self.loss != "dice":
                bce = tf.reduce_sum(bce_pixels(p, yf) * labelled, -1)
                surrogate += tf.cast(bce_scale, p.dtype) * tf.reduce_sum(bce)
        grads = tape.gradient(surrogate, variables)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        if self.loss == "bce":  # the only pass: every sum comes from here
            return grads, self._sums(tf.stop_gradient(p), core_mask)
        if self.loss == "dice":
            return grads, tf.zeros(len(SUMS), tf.float64)
        # Pass 1 gave A, B, C and the hard counts; only dice_bce's BCE sum is new.
        return grads, tf.one_hot(BCE, len(SUMS), dtype=tf.float64) * tf.reduce_sum(tf.cast(bce, tf.float64))

    def _sums(self, p, y) -> tf.Tensor:
        """The :data:`SUMS` of one core over its labelled pixels, float64 (BCE 0 for the Dice loss)."""
        labelled, yf = labelled_pixels(y, p.dtype)
        predicted = tf.cast(p >= HARD_THRESHOLD, p.dtype)
        terms = {"A": p * yf, "B": p * labelled, "C": yf, "hard_intersection": predicted * yf, "hard_predicted": predicted * labelled}
        if self.loss != "dice":
            terms["bce"] = bce_pixels(p, yf) * labelled
        # The last axis (one pixel, or the f*f pixels of a block) in the model's precision, the
        # rest in float64: exact for the counts, far below the float32 error of p itself.
        return tf.stack([
            tf.reduce_sum(tf.cast(tf.reduce_sum(terms[name], -1), tf.float64)) if name in terms else tf.zeros((), tf.float64)
            for name in SUMS
        ])


class KerasEvaluator(Evaluator):
    """The reference: the Keras model on the whole window, cut to the core (any model the geometry walk accepts).

    The model runs in inference mode (``training=False``) in every pass: normalisation layers
    use their stored statistics, which is what makes them per-pixel and so tileable.
    """

    name = "keras"
    tape_factor = KERAS_TAPE_FACTOR

    @classmethod
    def build(cls, model: keras.Model, loss: str, threads: int | None = None) -> "KerasEvaluator":
        model_geometry(model)  # refuses layouts tiles cannot reproduce
        return cls(model, loss)

    def core_probabilities(self, window, offset, shape):
        p = self.model(window[tf.newaxis], training=False)[0, :, :, 0]
        return tf.slice(p, offset, shape)


class LoweredEvaluator(Evaluator):
    """TensorFlow in space-to-depth layout (:class:`~gigaseg.streaming.fastpath.SpaceToDepthUNet`): the same arithmetic on blocks."""

    name = "lowered"
    tape_factor = COMPACT_TAPE_FACTOR

    def __init__(self, model: keras.Model, loss: str, net: SpaceToDepthUNet):
        super().__init__(model, loss)
        self.net = net
        self.factor = net.factor

    @classmethod
    def build(cls, model: keras.Model, loss: str, threads: int | None = None) -> "LoweredEvaluator":
        return cls(model, loss, SpaceToDepthUNet.lower(model))

    def core_probabilities(self, window, offset, shape):
        f = self.factor
        return self.net(window, (offset // f, shape // f))


class FusedEvaluator(LoweredEvaluator):
    """The lowered evaluation up to the full-resolution tail, which runs in compiled CPU loops (:class:`~gigaseg.streaming.tail.Tail`).

    The kernels are called through ``tf.numpy_function``: CPU only, and XLA cannot compile them.
    """

    name = "fused"
    xla = False

    def __init__(self, model: keras.Model, loss: str, net: SpaceToDepthUNet, tail):
        super().__init__(model, loss, net)
        self.tail = tail

    @classmethod
    def build(cls, model: keras.Model, loss: str, threads: int | None = None) -> "FusedEvaluator":
        from gigaseg.streaming.tail import Tail

        net = SpaceToDepthUNet.lower(model)
        return cls(model, loss, net, Tail.match(net, threads))

    def _core(self, core_mask, offset):
        f = self.factor
        return offset // f, tf.shape(core_mask)[:2]

    def core_probabilities(self, window, offset, shape):
        f = self.factor
        return self.tail.probabilities(window, (offset // f, shape // f))

    def sums(self, window, core_mask, offset):
        return self.tail.sums(window, core_mask, self._core(core_mask, offset), with_bce=self.loss != "dice")

    def gradients(self, window, core_mask, offset, background, tissue, bce_scale):
        weights = [tf.cast(w, tf.float32) for w in (background, tissue, bce_scale)]
        grads, sums = self.tail.gradients(window, core_mask, self._core(core_mask, offset), weights,
                                          self.model.trainable_variables)
        if self.loss == "bce":
            return grads, sums
        keep = np.zeros(len(SUMS))
        keep[BCE] = 1.0 if self.loss == "dice_bce" else 0.0
        return grads, sums * tf.constant(keep, tf.float64)


@dataclass(frozen=True)
class Row:
    """One row of the capability table: an evaluator, the devices it runs on, and whether XLA compiles it."""

    name: str
    build: Callable[..., Evaluator]
    devices: tuple[str, ...]
    xla: bool


#: Fastest first. ``fused`` runs its kernels on the host through tf.numpy_function: on a GPU
#: every tile would make round trips to the host, so it is a CPU row only.
TABLE: tuple[Row, ...] = (
    Row("fused", FusedEvaluator.build, ("CPU",), xla=False),
    Row("lowered", LoweredEvaluator.build, ("CPU", "GPU"), xla=True),
    Row("keras", KerasEvaluator.build, ("CPU", "GPU"), xla=True),
)
NAMES = tuple(row.name for row in TABLE)


@dataclass
class Choice:
    """The evaluator the table picked, why, and why each faster row was passed over."""

    evaluator: Evaluator
    reason: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    device: str = "CPU"

    def describe(self) -> str:
        passed = "; ".join(f"not {name}: {why}" for name, why in self.skipped)
        return f"{self.evaluator.name} ({self.reason}{'; ' + passed if passed else ''})"


def compute_device(devices: Sequence[str] | None = None) -> str:
    """``GPU`` when TensorFlow sees one (it places the tile graphs there), else ``CPU``.

    ``devices`` is a list of device types (``tf.config.list_logical_devices()``'s, by default).
    """
    if devices is None:
        devices = [d.device_type for d in tf.config.list_logical_devices()]
    return "GPU" if "GPU" in devices else "CPU"


def check_name(evaluator: str) -> str:
    if evaluator != AUTO and evaluator not in NAMES:
        raise ConfigError(f"evaluator '{evaluator}' is unknown; choose auto or one of {', '.join(NAMES)}")
    return evaluator


def choose(
    model: keras.Model,
    *,
    loss: str = "dice",
    evaluator: str = AUTO,
    devices: Sequence[str] | None = None,
    jit_compile: bool = False,
    threads: int | None = None,
    after: str | None = None,
) -> Choice:
    """The first row of :data:`TABLE` that supports ``model``, ``loss``, the device and ``jit_compile``.

    ``evaluator`` names one row instead of ``auto``: ConfigError (one line, saying why) when
    that row cannot run. ``after`` starts the search below the named row (a failed self-check).
    ``threads`` is how many threads the fused kernels split a tile's rows over.
    """
    check_name(evaluator)
    check_loss_name(loss)
    device = compute_device(devices)
    rows = list(TABLE)
    if after is not None:
        rows = rows[NAMES.index(after) + 1:]
    if evaluator != AUTO:
        rows = [row for row in rows if row.name == evaluator]
    skipped: list[tuple[str, str]] = []
    for row in rows:
        if device not in row.devices:
            why = f"it runs on {'/'.join(row.devices)} only and TensorFlow computes on the {device}"
        elif jit_compile and not row.xla:
            why = "jit_compile is on and XLA cannot compile its tf.numpy_function kernels"
        else:
            try:
                built = row.build(model, loss, threads)
            except Unsupported as exc:
                why = str(exc)
            else:
                reason = "forced" if evaluator != AUTO else (
                    "the fastest row of the capability table that supports this model" if not skipped else "the next row that does")
                return Choice(built, reason, skipped, device)
        if evaluator != AUTO:
            hint = "use evaluator=auto" + (" or jit_compile=false" if jit_compile and not row.xla else "")
            raise ConfigError(f"evaluator={row.name} cannot run this model: {why}; {hint}")
        skipped.append((row.name, why))
    raise ConfigError("no evaluator supports this model: " + "; ".join(f"{n}: {w}" for n, w in skipped))


def gradient_mismatch(engine, reference: Evaluator, *, rtol: float = 1e-3) -> str | None:
    """How ``engine``'s evaluator's pass-2 gradients differ from ``reference``'s on one small random window, or None if they agree.

    The window is four total strides square with the core in its middle two, labels 0, 1 and
    255 at random, and surrogate weights that make every term of the engine's loss count. A variable's
    gradient agrees when it is within ``rtol`` of the largest magnitude of the reference's
    (float32 on both sides: rounding near a ReLU's kink moves single terms, never by that much).
    """
    stride = model_geometry(engine.model).total_stride
    rng = np.random.default_rng(0)
    window = rng.integers(0, 256, (4 * stride, 4 * stride, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 1, 255], np.uint8), size=(2 * stride, 2 * stride), p=[0.45, 0.45, 0.1])
    offset = tf.constant([stride, stride], tf.int32)
    # The constants pass 2 gets for this loss (engine.surrogate_weights): no Dice weights for BCE, no BCE scale for Dice.
    dice, bce = (0.0, 0.0) if engine.loss == "bce" else (0.25, -0.75), 0.0 if engine.loss == "dice" else 1e-3
    weights = [tf.constant(w, tf.float64) for w in (*dice, bce)]
    candidate = engine.evaluator
    grads, sums = engine._grad_fn(tf.constant(candidate.to_layout(window)), tf.constant(candidate.to_layout(mask)), offset, *weights)
    reference_fn = tf.function(reference.gradients, autograph=False)
    expected, expected_sums = reference_fn(tf.constant(window), tf.constant(mask), offset, *weights)
    for variable, got, want in zip(engine.model.trainable_variables, grads, expected):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        error, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
        if not error <= rtol * scale + 1e-12:
            return f"gradient of {variable.path} off by {error:.3g} where the reference's largest is {scale:.3g}"
    error = float(np.max(np.abs(np.asarray(sums) - np.asarray(expected_sums))))
    if not error <= rtol * max(1.0, float(np.max(np.abs(np.asarray(expected_sums))))):
        return f"pass-2 sums off by {error:.3g}"
    return None
