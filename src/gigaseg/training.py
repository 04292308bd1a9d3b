"""Training on whole regions: one optimizer step per region, batch size 1, no patches.

``train`` takes plain arguments and returns numbers; it knows nothing of Hydra or MLflow.
Metrics and files reach a tracker through the small ``RunLogger`` protocol.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gigaseg import sysinfo
from gigaseg.checkpoint import LAST, load_checkpoint, restore, save_checkpoint
from gigaseg.errors import ConfigError, GigasegError, MemoryPlanError
from gigaseg.evaluation import count
from gigaseg.options import TrainConfig

log = logging.getLogger(__name__)



class TrainingDivergedError(GigasegError):
    """The loss became NaN or infinite."""


class RunLogger(Protocol):
    """Where training sends its numbers and files (an MLflow run, or nothing)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


@dataclass
class TrainResult:
    """What a run produced: final numbers, per-step history and where things were written."""

    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    val_probability: np.ndarray | None = None
    tiled: bool = False
    tile_size: tuple[int, int] | None = None
    model: Any = None


def learning_rate(config: TrainConfig):
    """The learning rate or schedule: linear warm-up, then constant or cosine decay to 0.

    With ``w`` warm-up steps, step ``i`` (from 1) uses ``lr * i / (w + 1)`` for ``i <= w``.
    A run shorter than its warm-up (``debug=smoke``, say) warms up over all but its last step.
    """
    import keras

    warmup = min(config.warmup_steps, config.steps - 1)
    if config.lr_schedule == "constant" and warmup == 0:
        return config.lr
    # alpha=1 keeps the rate constant after the warm-up.
    cosine = config.lr_schedule == "cosine"
    decay, alpha = (config.steps - warmup, 0.0) if cosine else (1, 1.0)
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


def _budget_bytes(config: TrainConfig) -> int:
    from gigaseg.streaming import available_memory_bytes

    if config.memory_budget_mb is not None:
        return int(config.memory_budget_mb * 1024 * 1024)
    return int(available_memory_bytes() * config.memory_fraction)


class PlainEngine:
    """The whole region in one forward and backward pass (fastest when it fits in memory)."""

    def __init__(self, model, *, loss: str) -> None:
        self.model = model
        self.loss = loss

    def step(self, image: np.ndarray, mask: np.ndarray, *, progress=None):
        from gigaseg.streaming import plain_step

        t0 = time.perf_counter()
        image = np.asarray(image)
        mask = np.asarray(mask)
        data_time = time.perf_counter() - t0
        result = plain_step(self.model, image, mask, loss=self.loss)
        result.data_time_s = data_time
        return result


def choose_engine(model, region_shape: tuple[int, int], config: TrainConfig, replicas=None):
    """The tiled engine (exact, and on CPU faster than a plain step), or the plain Keras step.

    ``train.tiled=never`` asks for the plain whole-region step; it is refused before anything
    large is allocated when its memory estimate exceeds the budget. With ``replicas`` (a
    :class:`gigaseg.distributed.Replicas`), the tiles are spread over them; every replica uses
    the chief's tile size.
    """
    from gigaseg.streaming import TiledEngine, check_plain_step_fits, plan_tile_size

    budget = _budget_bytes(config)
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
        return PlainEngine(model, loss=config.loss), None
    plan = plan_tile_size(model, region_shape, budget_bytes=budget, tile_size=config.tile_size)
    if replicas is not None:
        # Hosts may differ in free memory: every replica must cut the region the same way.
        chief = tuple(int(v) for v in replicas.broadcast([np.array(plan.tile_size)], "tile size")[0])
        if chief != tuple(plan.tile_size):
            plan = plan_tile_size(model, region_shape, budget_bytes=budget, tile_size=chief)
    log.info(
        "tiled training: tiles of %s with halo %d, %d tiles per step, estimated peak %.0f MB (budget %.0f MB)",
        plan.tile_size, plan.halo, plan.tiles, plan.estimated_peak_bytes / 2**20, plan.budget_bytes / 2**20,
    )
    if replicas is not None:
        from gigaseg.distributed import DistributedEngine

        log.info("tiles spread over %s", replicas.describe())
        return DistributedEngine(model, replicas, loss=config.loss, tile_size=plan.tile_size, halo=plan.halo), plan
    return TiledEngine(model, loss=config.loss, tile_size=plan.tile_size, halo=plan.halo), plan


def validate(engine, image: np.ndarray, mask: np.ndarray, *, threshold: float) -> tuple[float, np.ndarray]:
    """Hard Dice of the model on a region (tiled forward passes), and the probabilities."""
    probability = engine.predict(image)
    return count(probability, mask, threshold=threshold).scores()["dice"], probability


def train(
    model_kwargs: dict[str, Any],
    train_image: np.ndarray,
    train_mask: np.ndarray,
    val_image: np.ndarray | None,
    val_mask: np.ndarray | None,
    config: TrainConfig,
    *,
    checkpoint_dir: Path | None,
    resume: Path | None = None,
    logger: RunLogger | None = None,
    replicas=None,
) -> TrainResult:
    """Train ``build_unet(**model_kwargs)`` on one region, one optimizer step per pass.

    ``train_image`` is H x W x 3 uint8 and ``train_mask`` H x W 0/1, numpy arrays or
    memory maps; the validation pair may be None. Checkpoints go to ``checkpoint_dir``
    (None: none written) every ``checkpoint_every`` steps and at the end; ``resume``
    continues from one. With ``replicas`` (:func:`gigaseg.distributed.make_replicas`) every
    step's tiles are spread over the replicas of a distributed run; call ``train`` on every
    worker, with the same arguments except that only the chief passes a logger, a checkpoint
    folder, ``resume`` and validation data (the chief's state is broadcast at the start).
    """
    from tqdm.auto import tqdm

    from gigaseg.model import build_unet

    config.validate()
    # Traced graphs of an earlier run in this process (a sweep's jobs) are reference cycles
    # that only a full collection frees; without one, every run adds ~10 MB until it comes.
    gc.collect()
    seed_everything(config.seed)
    model = build_unet(**model_kwargs)
    optimizer = build_optimizer(config.optimizer, learning_rate(config))
    optimizer.build(model.trainable_variables)
    height, width = train_image.shape[:2]
    if replicas is not None and not replicas.is_chief and (logger is not None or checkpoint_dir is not None):
        raise ValueError("only the chief of a distributed run logs and writes checkpoints")
    engine, plan = choose_engine(model, (height, width), config, replicas)
    tile_size = plan.tile_size if plan is not None else None
    val_engine = None
    if val_image is not None:
        from gigaseg.streaming import TiledEngine

        # One engine for every validation, so its compiled forward pass is reused.
        val_tile = tile_size or _val_tile_size(model, val_image, config)
        val_engine = TiledEngine(model, loss=config.loss, tile_size=val_tile)

    history: list[dict[str, Any]] = []
    start = 0
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        restore(checkpoint, model, optimizer)
        start, history = checkpoint.step, checkpoint.history
        log.info("resumed from %s at step %d", resume, start)
    if replicas is not None:
        start = replicas.sync_state(model, optimizer, start)
    last_checkpoint = resume
    mpx = height * width / 1e6
    val_probability = None
    val_dice = None

    steps = tqdm(range(start, config.steps), total=config.steps, initial=start, desc="train", unit="step",
                 disable=not config.progress)
    for index in steps:
        step = index + 1
        sysinfo.reset_peak_rss()
        t0 = time.perf_counter()
        bar = None
        progress = None
        if plan is not None and plan.tiles > 1 and config.progress:
            bar = tqdm(total=plan.tiles * engine.passes, desc=f"step {step} tiles x passes", unit="tile", leave=False)
            progress = _bar_progress(bar)
        result = engine.step(train_image, train_mask, progress=progress)
        if bar is not None:
            bar.close()
        finite_gradients = all(np.isfinite(g).all() for g in result.gradients)
        if not (math.isfinite(result.loss) and finite_gradients):
            what = f"the loss became {result.loss}" if not math.isfinite(result.loss) else "a gradient became NaN or infinite"
            where = (f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint
                     else "; no checkpoint was written yet (a lower train.checkpoint_every keeps more)")
            raise TrainingDivergedError(f"{what} at step {step} (no update applied){where}; lower train.lr or check the data")
        optimizer.apply_gradients(zip(result.gradients, model.trainable_variables))
        step_time = time.perf_counter() - t0
        record: dict[str, Any] = {
            "step": step,
            "loss": result.loss,
            "dice": result.dice,
            "step_time_s": step_time,
            "data_time_s": result.data_time_s,
            "peak_rss_mb": sysinfo.peak_rss_mb(),
            "mpx_per_s": mpx / step_time if step_time > 0 else float("nan"),
            "tiles": result.tiles,
        }
        if val_image is not None and (step % config.val_every == 0 or step == config.steps):
            val_dice, val_probability = validate(val_engine, val_image, val_mask, threshold=config.threshold)
            record["val_dice"] = val_dice
        history.append(record)
        if logger is not None:
            logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)
        steps.set_postfix(loss=f"{result.loss:.4f}", dice=f"{result.dice:.3f}",
                          **({"val": f"{val_dice:.3f}"} if val_dice is not None else {}))
        if checkpoint_dir is not None and (step % config.checkpoint_every == 0 or step == config.steps):
            last_checkpoint = save_checkpoint(Path(checkpoint_dir) / LAST, model, optimizer, step, history)
            if logger is not None:
                logger.log_artifact(last_checkpoint, "checkpoints")
    steps.close()

    if val_image is not None and val_probability is None:
        val_dice, val_probability = validate(val_engine, val_image, val_mask, threshold=config.threshold)
    final = history[-1] if history else {}
    metrics = {
        "loss": float(final.get("loss", float("nan"))),
        "dice": float(final.get("dice", float("nan"))),
        "steps": float(config.steps),
    }
    if val_dice is not None:
        metrics["val_dice"] = float(val_dice)
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
        model=model,
    )


def _bar_progress(bar):
    """``progress(done, total)`` for a tqdm bar (the total is this replica's share of the tiles)."""

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return progress


def _val_tile_size(model, image: np.ndarray | None, config: TrainConfig):
    """Forward-only tiles for validation: the largest that the memory budget allows."""
    from gigaseg.streaming import plan_tile_size

    if image is None:
        return None
    plan = plan_tile_size(model, image.shape[:2], budget_bytes=_budget_bytes(config), tile_size=config.tile_size)
    return plan.tile_size
