"""Training on whole regions: one optimizer step per region, batch size 1, no patches.

``train`` takes plain arguments and returns numbers; it knows nothing of Hydra or MLflow.
Metrics and files reach a tracker through the small ``RunLogger`` protocol.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gigaseg import sysinfo
from gigaseg.checkpoint import LAST, load_checkpoint, restore, save_checkpoint
from gigaseg.errors import ConfigError, GigasegError, MemoryPlanError
from gigaseg.evaluation import count_cores
from gigaseg.options import TrainConfig
from gigaseg.plots import ProbabilityPreview

log = logging.getLogger(__name__)



class TrainingDivergedError(GigasegError):
    """The loss became NaN or infinite."""


class RunLogger(Protocol):
    """Where training sends its numbers and files (an MLflow run, or nothing)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


@dataclass
class TrainRegion:
    """A region to train or validate on: its key (``slide/region``), pixels (H x W x 3 uint8) and labels (H x W)."""

    key: str
    image: Any
    mask: Any

    @property
    def pixels(self) -> int:
        return int(self.image.shape[0]) * int(self.image.shape[1])


@dataclass
class TrainResult:
    """What a run produced: final numbers, per-step history and where things were written.

    ``model`` holds the best weights by pooled validation Dice when there was validation
    (``best_step``, ``best_checkpoint``), else the last; ``checkpoint`` is the last checkpoint.
    """

    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    val_probability: ProbabilityPreview | None = None
    tiled: bool = False
    tile_size: tuple[int, int] | None = None
    #: How tiles were computed (gigaseg.streaming.evaluators) and why.
    evaluator: str = ""
    evaluator_reason: str = ""
    model: Any = None
    best_step: int | None = None
    best_checkpoint: Path | None = None


def learning_rate(config: TrainConfig, total_steps: int | None = None):
    """The learning rate or schedule: linear warm-up, then constant or cosine decay to 0.

    With ``w`` warm-up steps, step ``i`` (from 1) uses ``lr * i / (w + 1)`` for ``i <= w``.
    A run shorter than its warm-up (``debug=smoke``, say) warms up over all but its last step.
    """
    import keras

    steps = config.steps if total_steps is None else total_steps
    warmup = min(config.warmup_steps, steps - 1)
    if config.lr_schedule == "constant" and warmup == 0:
        return config.lr
    # alpha=1 keeps the rate constant after the warm-up.
    cosine = config.lr_schedule == "cosine"
    decay, alpha = (steps - warmup, 0.0) if cosine else (1, 1.0)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(config.lr, decay, alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(
        config.lr / (warmup + 1), decay, alpha=alpha, warmup_target=config.lr, warmup_steps=warmup
    )


def build_optimizer(name: str, lr):
    """A Keras optimizer by name (``lr``: a number or a Keras schedule)."""
    import keras

    choices = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
    }
    if name not in choices:
        raise ConfigError(f"train.optimizer '{name}' is unknown; choose one of {', '.join(choices)}")
    return choices[name](learning_rate=lr)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TensorFlow's ops deterministic."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


def memory_budget(config: TrainConfig) -> int:
    """The bytes a training step may use: ``train.memory_budget_mb``, else ``train.memory_fraction`` of what is available now."""
    from gigaseg.streaming import available_memory_bytes

    if config.memory_budget_mb is not None:
        return int(config.memory_budget_mb * 1024 * 1024)
    return int(available_memory_bytes() * config.memory_fraction)


def choose_engine(model, region_shape: tuple[int, int], config: TrainConfig, replicas=None):
    """The tiled engine (exact, and on CPU faster than a plain step), or the whole region as one tile.

    ``train.tiled=never`` asks for the plain whole-region step; it is refused before anything
    large is allocated when its memory estimate exceeds the budget. With ``replicas`` (a
    :class:`gigaseg.distributed.Replicas`), the tiles are spread over them; every replica uses
    the chief's tile size.
    """
    from gigaseg.streaming import TiledEngine, WholeRegionEngine, check_plain_step_fits

    budget = memory_budget(config)
    if replicas is not None:
        if config.tiled == "never":
            raise ConfigError("train.tiled=never (one plain whole-region step) cannot be spread over replicas; "
                              "use train.tiled=auto with distributed")
        budget = int(budget * replicas.memory_share)
    if config.tiled == "never":
        try:
            check_plain_step_fits(model, region_shape[0], region_shape[1], budget)
        except MemoryPlanError as exc:
            raise MemoryPlanError(f"{exc} (train.tiled=auto does this when needed)") from exc
        return WholeRegionEngine(model, loss=config.loss), None
    options = dict(loss=config.loss, tile_size=config.tile_size, budget_bytes=budget, evaluator=config.evaluator)
    if replicas is not None:
        from gigaseg.streaming import DistributedEngine

        engine = DistributedEngine(model, replicas, **options)
    else:
        engine = TiledEngine(model, **options)
    plan = engine.memory_plan(region_shape)
    if replicas is not None:
        # Hosts may differ in free memory: every replica must cut the region the same way.
        chief = tuple(int(v) for v in replicas.broadcast([np.array(plan.tile_size)], "tile size")[0])
        if chief != tuple(plan.tile_size):
            engine.tile_size = chief
            plan = engine.memory_plan(region_shape)
        log.info("tiles spread over %s", replicas.describe())
    # Every region of the run is cut with the tiles planned for the largest.
    engine.tile_size = plan.tile_size
    log.info(
        "tiled training: tiles of %s with halo %d, planned for regions up to %dx%d pixels, estimated peak %.0f MB "
        "(budget %.0f MB)", plan.tile_size, plan.halo, region_shape[0], region_shape[1],
        plan.estimated_peak_bytes / 2**20, plan.budget_bytes / 2**20,
    )
    return engine, plan


BEST = "best.npz"


def metric_key(name: str) -> str:
    """A region's key as MLflow allows it in a metric name (letters, digits, ``_ - . / :`` and spaces)."""
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", name)


def validate_regions(engine, regions: list[TrainRegion], *, threshold: float) -> tuple[dict[str, float], ProbabilityPreview]:
    """Validation metrics over every region: ``val_dice`` pooled over all their pixels, ``val_dice_mean``
    over regions, ``val_dice/<slide>/<region>`` each; and the first region's probabilities on the
    stride of its picture.

    Counted a tile core at a time (:meth:`~gigaseg.streaming.TiledEngine.predict_cores`), so
    memory does not grow with a region's size.
    """
    pooled = None
    metrics: dict[str, float] = {}
    preview = None
    for region in regions:
        cores = engine.predict_cores(region.image)
        if preview is None:
            preview = ProbabilityPreview(region.image.shape[:2])
            cores = _previewed(cores, preview)
        counts = count_cores(cores, region.mask, threshold=threshold)
        metrics[f"val_dice/{metric_key(region.key)}"] = counts.scores()["dice"]
        pooled = counts if pooled is None else pooled + counts
    per_region = list(metrics.values())
    metrics["val_dice"] = pooled.scores()["dice"]
    metrics["val_dice_mean"] = float(np.mean(per_region))
    return metrics, preview


def probability_preview(engine, image) -> ProbabilityPreview:
    """A region's probabilities on the stride of its picture, predicted a tile core at a time."""
    preview = ProbabilityPreview(image.shape[:2])
    for core, probability in engine.predict_cores(image):
        preview.add(core, probability)
    return preview


def _previewed(cores, preview: ProbabilityPreview):
    for core, probability in cores:
        preview.add(core, probability)
        yield core, probability


def train(
    model_kwargs: dict[str, Any],
    train_regions: list[TrainRegion],
    val_regions: list[TrainRegion],
    config: TrainConfig,
    *,
    checkpoint_dir: Path | None,
    resume: Path | None = None,
    logger: RunLogger | None = None,
    replicas=None,
) -> TrainResult:
    """Train ``build_unet(**model_kwargs)`` on a cohort's regions, one optimizer step per ``accumulate`` regions.

    An epoch visits every training region once in an order drawn from ``train.seed`` and
    the epoch (:mod:`gigaseg.epochs`); the run lasts ``train.steps`` steps or ``train.epochs``
    epochs. Validation every ``val_every`` steps and at the end covers every validation
    region; the best weights by pooled validation Dice are kept (``best.npz``) and returned.
    Checkpoints go to ``checkpoint_dir`` (None: none written) every ``checkpoint_every``
    steps and at the end; ``resume`` continues from one, in the same order. With ``replicas``
    (:func:`gigaseg.distributed.make_replicas`) every step's tiles are spread over them; call
    ``train`` on every worker with the same training regions; only the chief passes a
    logger, a checkpoint folder, ``resume`` and validation regions.
    """
    from tqdm.auto import tqdm

    from gigaseg.augment import TransformedRegion, draw
    from gigaseg.epochs import step_regions, steps_per_epoch
    from gigaseg.model import build_unet
    from gigaseg.staging import StepStaging

    config.validate()
    if not train_regions:
        raise ConfigError("no training region: the cohort needs at least one region in split train")
    total = config.total_steps(len(train_regions))
    # Traced graphs of an earlier run in this process (a sweep's jobs) are reference cycles
    # that only a full collection frees; without one, every run adds ~10 MB until it comes.
    gc.collect()
    seed_everything(config.seed)
    model = build_unet(**model_kwargs)
    optimizer = build_optimizer(config.optimizer, learning_rate(config, total))
    optimizer.build(model.trainable_variables)
    if replicas is not None and not replicas.is_chief and (logger is not None or checkpoint_dir is not None):
        raise ValueError("only the chief of a distributed run logs and writes checkpoints")
    # One engine for every region: tiles planned for the largest height and width (either way round
    # when quarter turns may swap them).
    largest = (max(int(r.image.shape[0]) for r in train_regions), max(int(r.image.shape[1]) for r in train_regions))
    if config.augment.enabled and config.augment.flips:
        largest = (max(largest), max(largest))
    engine, plan = choose_engine(model, largest, config, replicas)
    tile_size = plan.tile_size if plan is not None else None
    val_engine = None
    if val_regions:
        from gigaseg.streaming import TiledEngine

        # One engine for every validation, so its compiled forward pass is reused; with the
        # training engine's tiles when it has any, else planned for each validation region.
        val_engine = TiledEngine(model, loss=config.loss, tile_size=tile_size or config.tile_size,
                                 budget_bytes=memory_budget(config), evaluator=config.evaluator)

    history: list[dict[str, Any]] = []
    start = 0
    best = {"dice": -1.0, "step": None, "weights": None, "path": None}
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        restore(checkpoint, model, optimizer)
        start, history = checkpoint.step, checkpoint.history
        log.info("resumed from %s at step %d", resume, start)
        _resume_best(Path(resume).parent / BEST, best)
    if replicas is not None:
        start = replicas.sync_state(model, optimizer, start)
    last_checkpoint = resume
    val_probability = None
    val_metrics: dict[str, float] = {}
    log.info("training on %d region(s), %d step(s) per epoch, %d step(s)", len(train_regions),
             steps_per_epoch(len(train_regions), config.accumulate), total)

    steps = tqdm(range(start, total), total=total, initial=start, desc="train", unit="step", disable=not config.progress)
    # Each step's region is decoded and augmented once, into scratch files both passes of the
    # tiled step read. Not for the plain step (it reads its region once) nor across replicas
    # (each reads only its own tiles).
    with contextlib.ExitStack() as stack:
        biggest = max((tuple(r.image.shape[:2]) for r in train_regions), key=lambda s: s[0] * s[1])
        staging = (stack.enter_context(StepStaging(largest=biggest)) if plan is not None and replicas is None
                   else None)
        for index in steps:
            step = index + 1
            epoch, chosen = step_regions(index, len(train_regions), config.accumulate, config.seed)
            sysinfo.reset_peak_rss()
            t0 = time.perf_counter()
            losses, dices, data_time, tiles, gradients = [], [], 0.0, 0, None
            for i in chosen:
                region = train_regions[i]
                image, mask = region.image, region.mask
                if config.augment.enabled:
                    image, mask = TransformedRegion(image, mask, draw(config.augment, config.seed, epoch, region.key))
                if staging is not None:
                    staged = time.perf_counter()
                    image, mask = staging(image, mask)
                    data_time += time.perf_counter() - staged
                bar = progress = None
                if plan is not None and plan.tiles > 1 and config.progress:
                    bar = tqdm(total=plan.tiles * engine.passes, desc=f"step {step} {region.key}", unit="tile", leave=False)
                    progress = _bar_progress(bar)
                result = engine.step(image, mask, progress=progress)
                if bar is not None:
                    bar.close()
                losses.append(result.loss)
                dices.append(result.dice)
                data_time += result.data_time_s
                tiles += result.tiles
                gradients = list(result.gradients) if gradients is None else [g + h for g, h in zip(gradients, result.gradients)]
            gradients = [g / len(chosen) for g in gradients]
            loss = float(np.mean(losses))
            finite_gradients = all(np.isfinite(g).all() for g in gradients)
            if not (math.isfinite(loss) and finite_gradients):
                what = f"the loss became {loss}" if not math.isfinite(loss) else "a gradient became NaN or infinite"
                where = (f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint
                         else "; no checkpoint was written yet (a lower train.checkpoint_every keeps more)")
                raise TrainingDivergedError(f"{what} at step {step} (no update applied){where}; lower train.lr or check the data")
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            step_time = time.perf_counter() - t0
            mpx = sum(train_regions[i].pixels for i in chosen) / 1e6
            record: dict[str, Any] = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "dice": float(np.mean(dices)),
                "step_time_s": step_time,
                "data_time_s": data_time,
                "peak_rss_mb": sysinfo.peak_rss_mb(),
                "mpx_per_s": mpx / step_time if step_time > 0 else float("nan"),
                "tiles": tiles,
            }
            if val_regions and (step % config.val_every == 0 or step == total):
                val_metrics, val_probability = validate_regions(val_engine, val_regions, threshold=config.threshold)
                record.update(val_metrics)
                if val_metrics["val_dice"] > best["dice"]:
                    best.update(dice=val_metrics["val_dice"], step=step, weights=[w.copy() for w in model.get_weights()])
                    if checkpoint_dir is not None:
                        best["path"] = save_checkpoint(Path(checkpoint_dir) / BEST, model, optimizer, step, history,
                                                       extra={"val_dice": val_metrics["val_dice"]})
            history.append(record)
            if logger is not None:
                logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)
            steps.set_postfix(loss=f"{loss:.4f}", dice=f"{record['dice']:.3f}",
                              **({"val": f"{val_metrics['val_dice']:.3f}"} if val_metrics else {}))
            if checkpoint_dir is not None and (step % config.checkpoint_every == 0 or step == total):
                last_checkpoint = save_checkpoint(Path(checkpoint_dir) / LAST, model, optimizer, step, history)
                if logger is not None:
                    logger.log_artifact(last_checkpoint, "checkpoints")
    steps.close()

    if val_regions and val_probability is None:
        val_metrics, val_probability = validate_regions(val_engine, val_regions, threshold=config.threshold)
    final = history[-1] if history else {}
    metrics = {
        "loss": float(final.get("loss", float("nan"))),
        "dice": float(final.get("dice", float("nan"))),
        "steps": float(total),
    }
    metrics.update({k: float(v) for k, v in val_metrics.items()})
    if best["weights"] is not None:
        metrics["best_val_dice"], metrics["best_step"] = float(best["dice"]), float(best["step"])
        if best["step"] != final.get("step"):
            log.info("keeping the weights of step %d (pooled validation Dice %.4f), not the last step's",
                     best["step"], best["dice"])
            model.set_weights(best["weights"])
            # The picture shows the model that is kept.
            val_probability = probability_preview(val_engine, val_regions[0].image)
        if logger is not None and best["path"] is not None:
            logger.log_artifact(best["path"], "checkpoints")
    times = [h["step_time_s"] for h in history[1:]] or [h["step_time_s"] for h in history]
    if times:
        metrics["median_step_time_s"] = float(np.median(times))
        metrics["max_peak_rss_mb"] = float(max(h["peak_rss_mb"] for h in history))
    return TrainResult(
        metrics=metrics,
        history=history,
        checkpoint=last_checkpoint,
        val_probability=val_probability,
        tiled=plan is not None,
        tile_size=tile_size,
        evaluator=engine.choice.evaluator.name,
        evaluator_reason=engine.choice.describe() if plan is not None else "train.tiled=never: the whole region as one tile",
        model=model,
        best_step=best["step"],
        best_checkpoint=best["path"],
    )


def _resume_best(path: Path, best: dict) -> None:
    """The best weights so far of a run being resumed (its ``best.npz`` beside the checkpoint), if any."""
    if not path.is_file():
        return
    from gigaseg.checkpoint import CheckpointError

    try:
        saved = load_checkpoint(path)
    except CheckpointError as exc:
        log.warning("not using %s as the best weights so far: %s", path, exc)
        return
    if "val_dice" in saved.extra:
        best.update(dice=float(saved.extra["val_dice"]), step=saved.step, weights=list(saved.weights), path=path)


def _bar_progress(bar):
    """``progress(done, total)`` for a tqdm bar (the total is this replica's share of the tiles)."""

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return progress
