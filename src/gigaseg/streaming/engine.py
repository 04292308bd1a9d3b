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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from gigaseg.errors import MaskError
from gigaseg.losses import check_loss_name, dice_pixel_weights, hard_dice, loss_from_sums
from gigaseg.streaming.evaluators import (
    AUTO,
    BCE,
    SUM_INDEX,
    SUMS,
    Choice,
    EvaluatorError,
    KerasEvaluator,
    SurrogateWeights,
    choose,
    gradient_mismatch,
)
from gigaseg.streaming.geometry import model_geometry
from gigaseg.streaming.labels import count_labelled
from gigaseg.streaming.memory import MemoryPlan, plan_tile_size
from gigaseg.streaming.plan import Tile, TilePlan, as_tile_shape, check_region_shape, plan_tiles
from gigaseg.streaming.reader import Prefetcher, WindowReader, ordered_map, release_rows

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
    stride; ``None`` picks, for each region, the largest tile whose estimated peak fits
    ``budget_bytes`` (default: half the memory available then; see
    :func:`gigaseg.streaming.memory.plan_tile_size`). ``halo`` defaults to the one derived
    from the model's layers. The caller applies the gradients (one optimizer step per region).

    Each tile is computed by an evaluator (:mod:`gigaseg.streaming.evaluators`): ``auto``
    takes the fastest row of the capability table that supports the model, the loss, the
    device (``devices``, TensorFlow's by default) and ``jit_compile``; a name forces that row.
    The choice and its reason are in :attr:`choice` (and logged). Before the first training
    pass the chosen evaluator's gradients are checked against the Keras reference on one small
    window (:meth:`check_gradients`). ``threads`` is how many threads the fused kernels split
    a tile's rows over (default: one per CPU).
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        loss: str = "dice",
        tile_size: int | tuple[int, int] | None = None,
        halo: int | None = None,
        budget_bytes: int | None = None,
        prefetch: bool = True,
        jit_compile: bool = False,
        evaluator: str = AUTO,
        threads: int | None = None,
        devices: Sequence[str] | None = None,
    ):
        self.model = model
        self.loss = check_loss_name(loss)
        self.geometry = model_geometry(model)
        self.total_stride = self.geometry.total_stride
        self.halo = self.geometry.halo if halo is None else int(halo)
        self.tile_size = None if tile_size is None else as_tile_shape(tile_size)
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        self.prefetch = prefetch
        self.jit_compile = bool(jit_compile)
        self._options = dict(evaluator=evaluator, devices=devices, jit_compile=self.jit_compile, threads=threads)
        self._gradients_checked = False
        self._use(choose(model, loss=self.loss, **self._options))

    def _use(self, choice: Choice) -> None:
        """Compute tiles with ``choice.evaluator`` from now on: trace its graphs (lazily, at their first call)."""
        self.choice = choice
        self.evaluator = choice.evaluator
        log.info("tile evaluator: %s", choice.describe())
        window, core_mask = _WINDOW, _CORE_MASK
        f = self.evaluator.factor
        if f is not None:  # windows and mask cores arrive in space-to-depth layout (see window_reader)
            window = tf.TensorSpec((None, None, f * f * 3), tf.uint8)
            core_mask = tf.TensorSpec((None, None, f * f), tf.uint8)
        # The tile graphs have no control flow on tensors, so AutoGraph (rewriting their Python
        # source before tracing) is off: it took most of the time before the first tile.
        graph = dict(reduce_retracing=True, jit_compile=self.jit_compile, autograph=False)
        ev = self.evaluator
        self._sums_fn = tf.function(ev.sums, input_signature=[window, core_mask, _OFFSET], **graph)
        self._grad_fn = tf.function(ev.gradients, input_signature=[window, core_mask, _OFFSET, _SCALAR, _SCALAR, _SCALAR], **graph)
        self._predict_fn = tf.function(ev.probabilities, input_signature=[window, _OFFSET, _OFFSET], **graph)

    @property
    def blocks(self) -> int | None:
        """The space-to-depth factor windows are read in, or None for plain windows."""
        return self.evaluator.factor

    def window_reader(self, image: np.ndarray, mask: np.ndarray | None = None) -> WindowReader:
        """A reader that hands out windows (and mask cores) in the layout this engine's graphs take."""
        return WindowReader(image, mask, blocks=self.blocks)

    def to_layout(self, window: np.ndarray) -> np.ndarray:
        """A window read as plain ``(h, w, 3)`` pixels, in the layout :meth:`core_probabilities` takes."""
        return self.evaluator.to_layout(window)

    def core_probabilities(self, window: np.ndarray, tile: Tile) -> np.ndarray:
        """Float32 ``(h, w)`` probabilities of ``tile``'s core, from its window in this engine's layout (:meth:`to_layout`)."""
        offset, shape = tf.constant(tile.core_offset, tf.int32), tf.constant(tile.core_shape, tf.int32)
        return self.evaluator.from_layout(self._predict_fn(window, offset, shape).numpy())

    # ----- the start-up self-check of training engines ----------------------------------------

    def check_gradients(self) -> None:
        """Once, before the first training pass: the evaluator's pass-2 gradients against the Keras reference's.

        Forward passes were checked when the evaluator was built. On a mismatch the next row of
        the capability table takes over (logged as a warning); a forced evaluator raises
        :class:`EvaluatorError` instead.
        """
        while not self._gradients_checked:
            if self.evaluator.name == KerasEvaluator.name:  # the reference itself
                self._gradients_checked = True
                return
            problem = gradient_mismatch(self, KerasEvaluator(self.model, self.loss))
            if problem is None:
                self._gradients_checked = True
                return
            name = self.evaluator.name
            if self._options["evaluator"] != AUTO:
                raise EvaluatorError(f"the {name} evaluator failed its gradient self-check ({problem})")
            log.warning("the %s evaluator failed its gradient self-check (%s); using the next one", name, problem)
            choice = choose(self.model, loss=self.loss, after=name, **self._options)
            choice.skipped.insert(0, (name, f"failed the gradient self-check: {problem}"))
            self._use(choice)

    # ----- per-tile graphs -------------------------------------------------------------------

    def tile_sums(self, pixels, labels, tile: Tile) -> np.ndarray:
        """Pass 1 of one tile: the six float64 :data:`~gigaseg.streaming.evaluators.SUMS` of its core.

        ``pixels`` and ``labels`` are its window and mask core in this engine's layout (:meth:`window_reader`).
        """
        return self._sums_fn(pixels, labels, tf.constant(tile.core_offset, tf.int32)).numpy()

    def tile_gradients(self, pixels, labels, tile: Tile, weights: SurrogateWeights) -> tuple[list[tf.Tensor], np.ndarray]:
        """Pass 2 of one tile: the surrogate's gradients for ``model.trainable_variables`` and the sums pass 2 adds."""
        args = [tf.constant(w, tf.float64) for w in weights]
        grads, sums = self._grad_fn(pixels, labels, tf.constant(tile.core_offset, tf.int32), *args)
        return grads, sums.numpy()

    @property
    def passes(self) -> int:
        """Passes over the tiles per step: 1 for BCE, 2 for the Dice losses (progress counts tiles x passes)."""
        return 1 if self.loss == "bce" else 2

    # ----- region-level ------------------------------------------------------------------------

    def memory_plan(self, region_shape: tuple[int, int]) -> MemoryPlan:
        """The tile size for a region of ``region_shape`` pixels, chosen (or, when given, checked) against the budget.

        The estimate is the chosen evaluator's memory model; MemoryPlanError when nothing fits.
        """
        return plan_tile_size(self.model, region_shape, budget_bytes=self.budget_bytes, tile_size=self.tile_size,
                              halo=self.halo, tape_factor=self.evaluator.tape_factor)

    def plan(self, region_shape: tuple[int, int]) -> TilePlan:
        """The tile plan this engine uses for a region of ``region_shape`` pixels."""
        tile_size = self.tile_size if self.tile_size is not None else self.memory_plan(region_shape).tile_size
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
        self.check_gradients()  # before the reader: a failed check may change the windows' layout
        plan = self.plan(region_shape)
        counter = TileCounter(progress, self.passes * self.tiles_computed(plan))
        start = time.perf_counter()
        reader = self.window_reader(image, mask)
        first = self.pass_sums(reader, plan.tiles, counter) if self.passes == 2 else None
        weights = self.surrogate_weights(first, labelled)
        gradients, second, wait_s = self.pass_gradients(reader, plan.tiles, weights, counter)
        wait_s += first.wait_s if first is not None else 0.0
        return self.result(labelled, len(plan), first, gradients, second, wait_s, time.perf_counter() - start)

    # The pieces of a step. DistributedEngine overrides the passes (which tiles this process
    # computes, how partial sums are added up) and nothing else.

    def tiles_computed(self, plan: TilePlan) -> int:
        """How many of ``plan``'s tiles this engine computes in each pass (all of them)."""
        return len(plan)

    def pass_sums(self, reader: WindowReader, tiles, progress: Callable[[], None] | None = None) -> "PassSums":
        """Pass 1 (Dice losses): float64 sums A, B, C, BCE, hard intersection and predicted over ``tiles``."""
        fetch = Prefetcher(lambda tile: reader.read(tile.window, tile.core), enabled=self.prefetch)
        self._check_layout(reader)
        sums = np.zeros(len(SUMS), np.float64)
        for tile, (pixels, labels) in fetch(tiles):
            sums += self.tile_sums(pixels, labels, tile)
            if progress is not None:
                progress()
        return PassSums(sums, fetch.wait_s)

    def _check_layout(self, reader: WindowReader) -> None:
        self.check_gradients()
        if reader.blocks != self.blocks:
            raise RuntimeError("the window reader was made for another evaluator's layout; call check_gradients() "
                               "before window_reader()")

    def surrogate_weights(self, first: "PassSums | None", labelled: int) -> SurrogateWeights:
        """Pass 2's constants from the region's pass-1 sums and ``labelled``, its pixels labelled 0 or 1 (``n``)."""
        n = float(labelled)
        background = tissue = 0.0
        if first is not None:
            a, b, c = (first.sums[SUM_INDEX[name]] for name in ("A", "B", "C"))
            background, tissue = dice_pixel_weights(a, b, c)
        bce_scale = 0.0 if self.loss == "dice" else 1.0 / n
        return SurrogateWeights(float(background), float(tissue), bce_scale)

    def pass_gradients(
        self, reader: WindowReader, tiles, weights: SurrogateWeights, progress: Callable[[], None] | None = None
    ) -> tuple[list[np.ndarray], np.ndarray, float]:
        """Pass 2: float64 gradient sums of the surrogate over ``tiles``, their sums, and the read wait.

        The sums are all six for BCE (its only pass); for the Dice losses only the BCE sum is
        filled in (the others came from pass 1).
        """
        self._check_layout(reader)
        fetch = Prefetcher(lambda tile: reader.read(tile.window, tile.core), enabled=self.prefetch)
        gradients = [np.zeros(v.shape, np.float64) for v in self.model.trainable_variables]
        sums = np.zeros(len(SUMS), np.float64)
        for tile, (pixels, labels) in fetch(tiles):
            grads, tile_sums = self.tile_gradients(pixels, labels, tile, weights)
            for total_grad, grad in zip(gradients, grads):
                total_grad += grad.numpy()
            sums += tile_sums
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
            sums[BCE] = second[BCE]
        a, b, c, bce_sum, inter, predicted = (float(sums[SUM_INDEX[name]]) for name in SUMS)
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


def share(tiles: Sequence[Tile], parts: int) -> list[list[Tile]]:
    """``tiles`` cut into ``parts`` contiguous runs of near-equal length (row-major neighbours stay together)."""
    bounds = np.linspace(0, len(tiles), parts + 1).round().astype(int)
    return [list(tiles[bounds[i]:bounds[i + 1]]) for i in range(parts)]


class DistributedEngine(TiledEngine):
    """The tiled step with a region's tiles shared among replicas, their partial sums added up by the strategy.

    ``replicas`` (:class:`gigaseg.distributed.Replicas`) gives the devices this process
    drives, which replicas they are (``first_replica``, ``num_replicas``) and ``all_reduce``.
    The plan is cut into one contiguous run of tiles per replica; each local device runs the
    passes of :class:`TiledEngine` on its run, in its own thread, with an engine of the same
    options. Everything else (plan, weights, result) is the tiled step's.
    """

    def __init__(self, model: keras.Model, replicas, **options):
        self.replicas = replicas
        self._locals: list[TiledEngine] = []
        super().__init__(model, **options)
        self._locals = [self]
        for device in replicas.devices[1:]:
            with tf.device(device):
                self._locals.append(TiledEngine(model, **options))

    @property
    def tile_size(self):
        return self._tile_size

    @tile_size.setter
    def tile_size(self, value) -> None:
        self._tile_size = None if value is None else as_tile_shape(value)
        for engine in self._locals[1:]:
            engine.tile_size = self._tile_size

    def check_gradients(self) -> None:
        TiledEngine.check_gradients(self)
        for engine in self._locals[1:]:
            engine.check_gradients()

    def _mine(self, tiles) -> list[list[Tile]]:
        """This process's runs of ``tiles``: one per local device."""
        everyone = share(list(tiles), self.replicas.num_replicas)
        return everyone[self.replicas.first_replica:self.replicas.first_replica + len(self._locals)]

    def tiles_computed(self, plan: TilePlan) -> int:
        return sum(len(run) for run in self._mine(plan.tiles))

    def _on_locals(self, work: Callable, runs: list[list[Tile]]) -> list:
        """``work(engine, run)`` for every local device (in parallel threads when there are several)."""
        def run(j: int):
            with tf.device(self.replicas.devices[j]):
                return work(self._locals[j], runs[j])

        if len(self._locals) == 1:
            return [run(0)]
        with ThreadPoolExecutor(max_workers=len(self._locals), thread_name_prefix="gigaseg-replica") as pool:
            return list(pool.map(run, range(len(self._locals))))

    def pass_sums(self, reader: WindowReader, tiles, progress: Callable[[], None] | None = None) -> PassSums:
        parts = self._on_locals(lambda engine, run: TiledEngine.pass_sums(engine, reader, run, progress), self._mine(tiles))
        return PassSums(self.replicas.all_reduce([p.sums for p in parts], "pass-1 sums"), sum(p.wait_s for p in parts))

    def pass_gradients(
        self, reader: WindowReader, tiles, weights: SurrogateWeights, progress: Callable[[], None] | None = None
    ) -> tuple[list[np.ndarray], np.ndarray, float]:
        parts = self._on_locals(
            lambda engine, run: TiledEngine.pass_gradients(engine, reader, run, weights, progress), self._mine(tiles)
        )
        shapes = [g.shape for g in parts[0][0]]
        # One reduction for every gradient and the sums, flattened side by side.
        total = self.replicas.all_reduce(
            [np.concatenate([g.ravel() for g in grads] + [sums]) for grads, sums, _ in parts], "gradient sums"
        )
        gradients, at = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            gradients.append(total[at:at + size].reshape(shape))
            at += size
        return gradients, total[at:], sum(p[2] for p in parts)


class WholeRegionEngine(TiledEngine):
    """The plain step as the engine runs it: the whole region as one tile, computed by the Keras evaluator.

    No halo and no tile size to plan; its memory grows with the region (check it first with
    :func:`~gigaseg.streaming.memory.check_plain_step_fits`). Training uses it for
    ``train.tiled=never``. The float64 reference the engine is tested against is
    :func:`~gigaseg.streaming.reference.plain_step`, which does not go through the engine.
    """

    def __init__(self, model: keras.Model, *, loss: str = "dice"):
        super().__init__(model, loss=loss, halo=0, evaluator="keras", prefetch=False)

    def plan(self, region_shape: tuple[int, int]) -> TilePlan:
        return plan_tiles(region_shape, region_shape, 0, self.total_stride)


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
    # The reader threads also rearrange each window into the evaluator's layout.
    fetch = Prefetcher(lambda tile: engine.to_layout(load(tile)), enabled=engine.prefetch, workers=readers)

    def forward(item: tuple[Tile, np.ndarray]) -> tuple[Tile, np.ndarray]:
        tile, pixels = item
        return tile, engine.core_probabilities(pixels, tile)

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
