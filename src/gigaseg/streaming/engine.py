"""The exact tiled training step: region loss and gradients computed one tile window at a time.

See ``docs/STREAMING.md``. Binary cross-entropy is a sum over pixels, so one pass of forward
and backward per tile suffices. Soft Dice needs the region sums first: pass 1 runs the model
forward only and adds up ``A = sum(p*y)``, ``B = sum(p)``, ``C = sum(y)`` (and the hard-Dice
counts); pass 2 back-propagates the surrogate ``sum_core stop_gradient(dL/dp) * p`` tile by tile.
Sums and gradients are accumulated in float64 on the host. Every sum runs over the labelled
pixels only (mask value 0 or 1; :data:`~gigaseg.evaluation.IGNORE_LABEL` is neither, see
:mod:`gigaseg.streaming.labels`), and ignored pixels get the weight 0 in pass 2.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from gigaseg.errors import MaskError
from gigaseg.losses import (
    HARD_THRESHOLD,
    bce_pixels,
    check_loss_name,
    dice_pixel_weights,
    hard_dice,
    labelled_pixels,
    loss_from_sums,
)
from gigaseg.streaming.fastpath import SpaceToDepthUNet, from_blocks, to_blocks
from gigaseg.streaming.geometry import model_geometry
from gigaseg.streaming.labels import count_labelled
from gigaseg.streaming.plan import Tile, TilePlan, as_tile_shape, check_region_shape, plan_tiles
from gigaseg.streaming.reader import Prefetcher, WindowReader, ordered_map, release_rows
from gigaseg.streaming.tail import Tail

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# Variable-size windows: one trace serves every tile (shapes are only known at run time).
_WINDOW = tf.TensorSpec((None, None, 3), tf.uint8)
_CORE_MASK = tf.TensorSpec((None, None), tf.uint8)
_OFFSET = tf.TensorSpec((2,), tf.int32)
_SCALAR = tf.TensorSpec((), tf.float64)


@dataclass
class PassSums:
    """Pass-1 sums of some tiles (float64: A, B, C, BCE, hard intersection, hard predicted, all over labelled pixels) and the read wait."""

    sums: np.ndarray
    wait_s: float = 0.0


class TileCounter:
    """Calls ``progress(done, total)`` once per tile done, across both passes."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


@dataclass
class StepResult:
    """Loss, metric and gradients of one region, as the plain whole-region step would give them.

    ``sums`` (tiled steps) holds the region sums behind them, all over the labelled pixels,
    and ``n``, the number of those.
    """

    loss: float
    dice: float
    gradients: list[np.ndarray]
    tiles: int
    data_time_s: float = 0.0
    compute_time_s: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)


def check_region(image: np.ndarray, mask: np.ndarray | None, total_stride: int) -> tuple[int, int]:
    """Validate shapes and dtypes of a region (and its mask); return (height, width)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be height x width x 3 (RGB), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}; the model rescales uint8 pixels itself")
    if mask is not None and tuple(mask.shape) != tuple(image.shape[:2]):
        raise MaskError(f"mask of shape {tuple(mask.shape)} does not match the image's {tuple(image.shape[:2])}")
    region_shape = (int(image.shape[0]), int(image.shape[1]))
    check_region_shape(region_shape, total_stride)
    return region_shape


class TiledEngine:
    """Computes a region's loss and gradients tile by tile, exactly as one whole-region step would.

    ``tile_size`` is an int (square) or (height, width), a multiple of the model's total
    stride; ``None`` picks the largest tile that fits half the available memory for each
    region (see :func:`gigaseg.streaming.memory.plan_tile_size`). ``halo`` defaults to the
    one derived from the model's layers. The caller applies the gradients (one optimizer
    step per region).

    Three evaluations give the same numbers (to float32 rounding): with ``fused`` (the default,
    for models whose last layers it recognises) the full-resolution tail runs in compiled
    loops (:mod:`gigaseg.streaming.tail`), in forward passes the first convolution too, and
    TensorFlow the rest in space-to-depth layout; with ``fast`` alone TensorFlow runs all of
    it in that layout (:mod:`gigaseg.streaming.fastpath`); with neither, the Keras model
    itself. The compiled loops split each tile's rows over ``fused_threads`` threads
    (default: one per CPU).
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        loss: str = "dice",
        tile_size: int | tuple[int, int] | None = None,
        halo: int | None = None,
        prefetch: bool = True,
        jit_compile: bool = False,
        fast: bool = True,
        fused: bool = True,
        fused_threads: int | None = None,
    ):
        self.model = model
        self.loss = check_loss_name(loss)
        self.geometry = model_geometry(model)
        self.total_stride = self.geometry.total_stride
        self.halo = self.geometry.halo if halo is None else int(halo)
        self.tile_size = None if tile_size is None else as_tile_shape(tile_size)
        self.prefetch = prefetch
        # The space-to-depth evaluation is the same arithmetic, about twice as fast on CPU.
        self.fast = SpaceToDepthUNet.build(model) if fast else None
        # The full-resolution tail in compiled loops over the core (gigaseg.streaming.tail):
        # the same arithmetic, without TensorFlow's whole-window intermediates.
        self.tail = Tail.find(self.fast, fused_threads) if fused and self.fast is not None else None
        window, core_mask = _WINDOW, _CORE_MASK
        if self.fast is not None:
            # Windows and mask cores arrive in space-to-depth layout (see window_reader).
            f = self.fast.factor
            window = tf.TensorSpec((None, None, f * f * 3), tf.uint8)
            core_mask = tf.TensorSpec((None, None, f * f), tf.uint8)
        # The tile graphs have no control flow on tensors, so AutoGraph (rewriting their Python
        # source before tracing) is off: it took about 3 of the 4.5 s before the first tile.
        graph = dict(reduce_retracing=True, jit_compile=jit_compile, autograph=False)
        self._sums_fn = tf.function(self._tile_sums, input_signature=[window, core_mask, _OFFSET], **graph)
        self._grad_fn = tf.function(
            self._tile_gradients, input_signature=[window, core_mask, _OFFSET, _SCALAR, _SCALAR, _SCALAR], **graph
        )
        self._predict_fn = tf.function(self._tile_probabilities, input_signature=[window, _OFFSET, _OFFSET], **graph)

    @property
    def blocks(self) -> int | None:
        """The space-to-depth factor windows are read in (the fast path), or None for plain windows."""
        return None if self.fast is None else self.fast.factor

    def window_reader(self, image: np.ndarray, mask: np.ndarray | None = None) -> WindowReader:
        """A reader that hands out windows (and mask cores) in the layout this engine's graphs take."""
        return WindowReader(image, mask, blocks=self.blocks)

    # ----- per-tile graphs -------------------------------------------------------------------

    def _core_probabilities(self, window, offset, shape, training: bool):
        """Probabilities of the tile core (``shape`` pixels at ``offset`` in the window): (h, w), or (h/f, w/f, f*f) blocks on the fast path."""
        if self.fast is not None:
            f = self.fast.factor
            if self.tail is not None:
                return self.tail.probabilities(window, (offset // f, shape // f))
            return self.fast(window, (offset // f, shape // f))
        p = self.model(window[tf.newaxis], training=training)[0, :, :, 0]
        return tf.slice(p, offset, shape)

    def _core_shape(self, core_mask):
        """The core's size in pixels, from its mask (which is in blocks on the fast path)."""
        if self.fast is not None:
            return tf.shape(core_mask)[:2] * self.fast.factor
        return tf.shape(core_mask)

    def _sums(self, p, y):
        """Float64 sums of one core over its labelled pixels: A, B, C, BCE sum, hard intersection, hard predicted."""
        labelled, yf = labelled_pixels(y, p.dtype)
        predicted = tf.cast(p >= HARD_THRESHOLD, p.dtype)
        terms = [p * yf, p * labelled, yf]
        if self.loss != "dice":
            terms.append(bce_pixels(p, yf) * labelled)
        terms += [predicted * yf, predicted * labelled]
        # Sum the last axis (the f*f pixels of a block on the fast path) in the model's precision,
        # then the rest in float64: exact for the counts, far below the float32 error of p itself.
        partial = [tf.reduce_sum(tf.cast(tf.reduce_sum(t, -1), tf.float64)) for t in terms]
        if self.loss == "dice":
            partial.insert(3, tf.zeros((), tf.float64))
        return tf.stack(partial)

    def _core_blocks(self, core_mask, offset):
        """The core as (offset, size) in blocks, for the fused tail."""
        f = self.fast.factor
        return offset // f, tf.shape(core_mask)[:2]

    def _tile_sums(self, window, core_mask, offset):
        if self.tail is not None:
            return self.tail.sums(window, core_mask, self._core_blocks(core_mask, offset), with_bce=self.loss != "dice")
        p = self._core_probabilities(window, offset, self._core_shape(core_mask), training=False)
        return self._sums(p, core_mask)

    def _tile_gradients(self, window, core_mask, offset, weight_background, weight_tissue, bce_scale):
        labels = core_mask
        if self.tail is not None:
            weights = [tf.cast(w, tf.float32) for w in (weight_background, weight_tissue, bce_scale)]
            core = self._core_blocks(core_mask, offset)
            grads, sums = self.tail.gradients(window, labels, core, weights, self.model.trainable_variables)
            return grads, self._pass2_sums(sums)
        with tf.GradientTape() as tape:
            p = self._core_probabilities(window, offset, self._core_shape(core_mask), training=True)
            labelled, yf = labelled_pixels(labels, p.dtype)
            surrogate = tf.zeros((), p.dtype)
            if self.loss != "bce":
                # dL/dp per pixel from the region sums: one value for background, one for tissue,
                # 0 for ignored pixels (in the model's precision: float32, or float64 for a
                # reference copy of it). Constants here, so this is the surrogate.
                weights = tf.where(yf > 0, tf.cast(weight_tissue, p.dtype), tf.cast(weight_background, p.dtype))
                surrogate += tf.reduce_sum(weights * labelled * p)
            if self.loss != "dice":
                bce = tf.reduce_sum(bce_pixels(p, yf) * labelled, -1)
                surrogate += tf.cast(bce_scale, p.dtype) * tf.reduce_sum(bce)
        grads = tape.gradient(surrogate, self.model.trainable_variables)
        if self.loss == "bce":  # the only pass: every sum comes from here
            return grads, self._sums(tf.stop_gradient(p), labels)
        bce_sum = tf.reduce_sum(tf.cast(bce, tf.float64)) if self.loss == "dice_bce" else tf.zeros((), tf.float64)
        return grads, self._pass2_sums(tf.stack([bce_sum] * 6))

    def _pass2_sums(self, sums):
        """What pass 2 reports of a tile's six sums: all of them for BCE (its only pass), else only the BCE sum.

        Pass 1 gave A, B, C and the hard counts of the Dice losses; only dice_bce's BCE sum is new.
        """
        if self.loss == "bce":
            return sums
        keep = tf.constant([0, 0, 0, 1 if self.loss == "dice_bce" else 0, 0, 0], tf.float64)
        return sums * keep

    def _tile_probabilities(self, window, offset, shape):
        # In blocks on the fast path: predict_tiles turns them back into pixels (cheaper in numpy).
        return self._core_probabilities(window, offset, shape, training=False)

    @property
    def passes(self) -> int:
        """Passes over the tiles per step: 1 for BCE, 2 for the Dice losses (progress counts tiles x passes)."""
        return 1 if self.loss == "bce" else 2

    # ----- region-level ------------------------------------------------------------------------

    def plan(self, region_shape: tuple[int, int]) -> TilePlan:
        """The tile plan this engine uses for a region of ``region_shape`` pixels."""
        tile_size = self.tile_size
        if tile_size is None:
            from gigaseg.streaming.memory import plan_tile_size  # memory imports this module's neighbours

            tile_size = plan_tile_size(self.model, region_shape, halo=self.halo).tile_size
        return plan_tiles(region_shape, tile_size, self.halo, self.total_stride)

    def step(self, image: np.ndarray, mask: np.ndarray, *, progress: Progress | None = None) -> StepResult:
        """Loss, hard Dice and gradients (in the order of ``model.trainable_variables``) of one region.

        ``mask`` holds 0 (background), 1 (tissue) or :data:`~gigaseg.evaluation.IGNORE_LABEL`
        (counts nowhere); MaskError for other values or for a mask without a labelled pixel.
        ``progress(done, total)`` is called after every tile of every pass; ``total`` is
        ``passes x tiles``.
        """
        region_shape = check_region(image, mask, self.total_stride)
        labelled = count_labelled(mask)
        plan = self.plan(region_shape)
        counter = TileCounter(progress, self.passes * len(plan))
        start = time.perf_counter()
        reader = self.window_reader(image, mask)
        first = self.pass_sums(reader, plan.tiles, counter) if self.passes == 2 else None
        weights = self.surrogate_weights(first, labelled)
        gradients, second, wait_s = self.pass_gradients(reader, plan.tiles, weights, counter)
        wait_s += first.wait_s if first is not None else 0.0
        return self.result(labelled, len(plan), first, gradients, second, wait_s, time.perf_counter() - start)

    # The pieces of a step, for callers that spread a region's tiles over several replicas
    # (gigaseg.distributed): each runs the passes on its share and sums the partial results.

    def pass_sums(self, reader: WindowReader, tiles, progress: Callable[[], None] | None = None) -> "PassSums":
        """Pass 1 (Dice losses): float64 sums A, B, C, BCE, hard intersection and predicted over ``tiles``."""
        fetch = Prefetcher(lambda tile: reader.read(tile.window, tile.core), enabled=self.prefetch)
        sums = np.zeros(6, np.float64)
        for tile, (pixels, labels) in fetch(tiles):
            sums += self._sums_fn(pixels, labels, tf.constant(tile.core_offset, tf.int32)).numpy()
            if progress is not None:
                progress()
        return PassSums(sums, fetch.wait_s)

    def surrogate_weights(self, first: "PassSums | None", labelled: int) -> tuple[float, float, float]:
        """(dL/dp for background pixels, for tissue pixels, BCE scale) from the region's pass-1 sums and labelled pixels.

        ``labelled`` is ``n``, the region's pixels labelled 0 or 1 (:func:`~gigaseg.streaming.labels.count_labelled`).
        """
        n = float(labelled)
        weight_background = weight_tissue = 0.0
        if first is not None:
            a, b, c = first.sums[0], first.sums[1], first.sums[2]
            weight_background, weight_tissue = dice_pixel_weights(a, b, c)
        bce_scale = 0.0 if self.loss == "dice" else 1.0 / n
        return float(weight_background), float(weight_tissue), bce_scale

    def pass_gradients(
        self, reader: WindowReader, tiles, weights: tuple[float, float, float], progress: Callable[[], None] | None = None
    ) -> tuple[list[np.ndarray], np.ndarray, float]:
        """Pass 2: float64 gradient sums of the surrogate over ``tiles``, their sums, and the read wait.

        The sums are all six for BCE (its only pass); for the Dice losses only the BCE sum is
        filled in (the others came from pass 1).
        """
        fetch = Prefetcher(lambda tile: reader.read(tile.window, tile.core), enabled=self.prefetch)
        gradients = [np.zeros(v.shape, np.float64) for v in self.model.trainable_variables]
        sums = np.zeros(6, np.float64)
        args = tuple(tf.constant(w, tf.float64) for w in weights)
        for tile, (pixels, labels) in fetch(tiles):
            grads, tile_sums = self._grad_fn(pixels, labels, tf.constant(tile.core_offset, tf.int32), *args)
            for total_grad, grad in zip(gradients, grads):
                total_grad += grad.numpy()
            sums += tile_sums.numpy()
            if progress is not None:
                progress()
        return gradients, sums, fetch.wait_s

    def result(
        self,
        labelled: int,
        tiles: int,
        first: "PassSums | None",
        gradients: list[np.ndarray],
        second: np.ndarray,
        wait_s: float,
        elapsed_s: float,
    ) -> StepResult:
        """The step's loss, hard Dice and gradients from the region-wide sums of both passes and its ``labelled`` pixel count."""
        n = float(labelled)
        if first is None:
            sums = second
        else:
            # The BCE sum is only computed in pass 2 for dice_bce; A, B, C come from pass 1.
            sums = first.sums.copy()
            sums[3] = second[3]
        a, b, c, bce_sum, inter, predicted = (float(v) for v in sums)
        loss = float(loss_from_sums(self.loss, a, b, c, bce_sum, n))
        variables = self.model.trainable_variables
        return StepResult(
            loss=loss,
            dice=hard_dice(inter, predicted, c),
            # Accumulated in float64; handed out in the variables' dtype, ready for apply_gradients.
            gradients=[g.astype(v.dtype) for g, v in zip(gradients, variables)],
            tiles=tiles,
            data_time_s=wait_s,
            compute_time_s=elapsed_s - wait_s,
            sums={"A": a, "B": b, "C": c, "bce_sum": bce_sum, "n": n, "hard_intersection": inter, "hard_predicted": predicted},
        )

    def predict(self, image: np.ndarray, *, out: np.ndarray | None = None, progress: Progress | None = None) -> np.ndarray:
        """Float32 tissue probabilities of the whole region, written tile core by tile core into ``out``."""
        region_shape = check_region(image, None, self.total_stride)
        if out is None:
            out = np.empty(region_shape, np.float32)
        elif tuple(out.shape) != region_shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {region_shape}")
        for (top, left, bottom, right), core in self.predict_cores(image, progress=progress):
            out[top:bottom, left:right] = core
            if right == region_shape[1]:
                # The whole band of rows is written; let it leave the resident set.
                release_rows(out, top, bottom)
        return out

    def predict_cores(
        self, image: np.ndarray, *, progress: Progress | None = None
    ) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray]]:
        """Forward only: every tile core of the region, row-major, as ``((top, left, bottom, right), probabilities)``.

        The float32 probabilities of each core are those :meth:`predict` writes there; a caller
        that reduces them (validation counts) never holds the whole region's probabilities.
        """
        region_shape = check_region(image, None, self.total_stride)
        plan = self.plan(region_shape)
        reader = WindowReader(image)
        for tile, core in predict_tiles(self, plan, lambda tile: reader.read(tile.window)[0]):
            yield tile.core, core
            if progress is not None:
                progress(tile.index + 1, len(plan))


def loss_and_gradients(
    model: keras.Model,
    image: np.ndarray,
    mask: np.ndarray,
    *,
    loss: str = "dice",
    tile_size: int | tuple[int, int] | None = None,
    halo: int | None = None,
) -> tuple[float, list[np.ndarray]]:
    """Region loss and gradients (arrays in the order of ``model.trainable_variables``), tiled.

    For repeated steps build a :class:`TiledEngine` once instead: it keeps its traced graphs.
    """
    result = TiledEngine(model, loss=loss, tile_size=tile_size, halo=halo).step(image, mask)
    return result.loss, result.gradients


def predict_tiles(
    engine: TiledEngine,
    plan: TilePlan,
    load: Callable[[Tile], np.ndarray],
    *,
    readers: int = 1,
    workers: int = 1,
) -> Iterator[tuple[Tile, np.ndarray]]:
    """Forward only: yield every tile of ``plan`` (row-major) with the float32 probabilities of its core.

    ``load(tile)`` returns the tile's window (``tile.window`` of the region) as an h x w x 3
    uint8 array; it runs in ``readers`` background threads while the model computes (with
    ``engine.prefetch`` off, in the caller's thread). ``workers`` tiles are computed at once,
    in threads: TensorFlow's op-level threads alone left about a third of two cores idle.
    Callers assemble cores into whatever they write, so a whole region never needs to be in
    memory.
    """
    f = engine.blocks
    # On the fast path the reader threads also rearrange each window into blocks.
    read = load if f is None else lambda tile: to_blocks(load(tile), f)
    fetch = Prefetcher(read, enabled=engine.prefetch, workers=readers)

    def forward(item: tuple[Tile, np.ndarray]) -> tuple[Tile, np.ndarray]:
        tile, pixels = item
        core = engine._predict_fn(pixels, tf.constant(tile.core_offset, tf.int32), tf.constant(tile.core_shape, tf.int32))
        return tile, core.numpy() if f is None else from_blocks(core.numpy(), f)

    yield from ordered_map(forward, fetch(plan), workers)


def predict_tiled(
    model: keras.Model,
    image: np.ndarray,
    *,
    tile_size: int | tuple[int, int] | None = None,
    halo: int | None = None,
    out: np.ndarray | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Float32 height x width tissue probabilities of a region, forward only, tile by tile (into ``out`` if given)."""
    return TiledEngine(model, tile_size=tile_size, halo=halo).predict(image, out=out, progress=progress)
