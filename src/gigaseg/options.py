"""The options of the model, training and prediction as typed dataclasses: their one set of types and defaults.

Library code takes these objects; the Hydra entry points register the same classes as
structured-config schemas (``gigaseg.cli.schema``), so a YAML file only chooses values.
This module imports neither TensorFlow nor Hydra: a config is checked before either loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gigaseg.errors import ConfigError

#: The colour regions and slide levels are padded with up to a multiple of the total stride:
#: the glass of an H&E scan, so padding looks like background to the model.
DEFAULT_PAD_VALUE = (242, 242, 242)

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine")
TILING = ("auto", "always", "never")
#: auto, then the rows of gigaseg.streaming.evaluators.TABLE, fastest first.
EVALUATORS = ("auto", "fused", "lowered", "keras")


@dataclass
class UNetLayout:
    """A U-Net layout, as ``gigaseg.model.build_unet`` takes it (the ``model`` config group).

    The defaults are the study's 4492-parameter ``gigaunet``: large kernels, stride 4 per
    level, total stride 64. ``decoder_filters`` null mirrors ``filters``. ``input_range`` is
    the interval uint8 pixels are rescaled to inside the model: [-6, 1] puts glass near 0.6
    and spreads tissue over several units, which trained faster than [-1, 1] on the demo.
    """

    name: str = "gigaunet"
    filters: tuple[int, ...] = (4, 4, 4)
    kernels: tuple[int, ...] = (7, 9, 9)
    strides: tuple[int, ...] = (4, 4, 4)
    decoder_filters: tuple[int, ...] | None = None
    activation: str = "relu"
    input_range: tuple[float, ...] = (-6.0, 1.0)


@dataclass
class AugmentConfig:
    """The augmentation settings of a training run; :func:`draw` turns them into each region's :class:`Augmentation`.

    Every amplitude ``a`` means a uniform draw in ``[-a, a]``: stain scales ``1 + u * hed_sigma``
    and shifts ``u * hed_shift`` (as Tellez et al. 2018), brightness ``u * brightness`` (of 255),
    contrast and saturation factors ``1 + u * amplitude``. ``flips`` allows the eight flips and
    quarter turns, each equally likely. Off by default, so that adding these settings to a run
    changes nothing until they are switched on.
    """

    enabled: bool = False
    flips: bool = True
    hed_sigma: float = 0.05
    hed_shift: float = 0.01
    brightness: float = 0.05
    contrast: float = 0.1
    saturation: float = 0.1

    def validate(self) -> None:
        """ConfigError naming the first setting out of its range."""
        limits = {
            "hed_sigma": (0.0, 1.0, False),
            "hed_shift": (0.0, 1.0, True),
            "brightness": (0.0, 1.0, True),
            "contrast": (0.0, 1.0, False),
            "saturation": (0.0, 1.0, True),
        }
        for name, (low, high, closed) in limits.items():
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and low <= value and (value <= high if closed else value < high)):
                bracket = "]" if closed else ")"
                raise ConfigError(f"train.augment.{name} must be a number in [{low:g}, {high:g}{bracket}, got {value!r}")
        for name in ("enabled", "flips"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"train.augment.{name} must be true or false, got {getattr(self, name)!r}")


@dataclass
class TrainConfig:
    """The knobs of a training run (the ``train`` config group): one optimiser step per whole region."""

    #: Optimizer steps of the run; or epochs (give exactly one of the two; train.steps=null with epochs).
    steps: int | None = 30
    #: Epochs over the training regions (each visited once per epoch, in a seeded shuffled order).
    epochs: int | None = None
    #: Regions per optimizer step (the mean of their gradients); 1 is the study's batch size 1.
    accumulate: int = 1
    lr: float = 0.01
    #: constant | cosine (decays to 0 at the last step)
    lr_schedule: str = "constant"
    #: Linear warm-up: step i <= warmup_steps uses lr * i / (warmup_steps + 1).
    warmup_steps: int = 3
    #: adam | adamw | sgd | rmsprop
    optimizer: str = "adam"
    #: dice_bce (soft Dice + BCE) | dice (soft Dice) | bce
    loss: str = "dice_bce"
    seed: int = 0
    #: Validation Dice on the held-out region every N steps (and at the end).
    val_every: int = 5
    threshold: float = 0.5
    #: Also at the end.
    checkpoint_every: int = 10
    #: auto/always: exact tiled steps (faster on CPU) | never: the whole region as one tile (a plain Keras step).
    tiled: str = "auto"
    #: None: chosen from the memory budget.
    tile_size: int | None = None
    #: How tiles are computed: auto (the fastest that supports the model, docs/STREAMING.md) or
    #: one of fused, lowered, keras (the reference).
    evaluator: str = "auto"
    #: None: memory_fraction of the memory available at start.
    memory_budget_mb: float | None = None
    memory_fraction: float = 0.6
    progress: bool = True
    #: Flips, quarter turns and colour changes of each region, drawn from (seed, epoch, region).
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def total_steps(self, regions: int) -> int:
        """Optimizer steps of the run over ``regions`` training regions."""
        if self.steps is not None:
            return int(self.steps)
        return int(self.epochs) * -(-int(regions) // int(self.accumulate))

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid option."""
        from gigaseg.losses import LOSSES

        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"give exactly one of train.steps and train.epochs (got steps={self.steps}, "
                              f"epochs={self.epochs}); e.g. train.epochs=5 train.steps=null")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"train.steps must be positive, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs must be positive, got {self.epochs}")
        if self.accumulate <= 0:
            raise ConfigError(f"train.accumulate must be positive, got {self.accumulate}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"train.lr_schedule '{self.lr_schedule}' is unknown; choose one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be 0 or more, got {self.warmup_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer '{self.optimizer}' is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"train.loss '{self.loss}' is unknown; choose one of {', '.join(LOSSES)}")
        if self.val_every <= 0:
            raise ConfigError(f"train.val_every must be positive, got {self.val_every}")
        if self.checkpoint_every <= 0:
            raise ConfigError(f"train.checkpoint_every must be positive, got {self.checkpoint_every}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"train.threshold must lie strictly between 0 and 1, got {self.threshold}")
        if self.tiled not in TILING:
            raise ConfigError(f"train.tiled '{self.tiled}' is unknown; choose one of {', '.join(TILING)}")
        if self.tile_size is not None and self.tile_size <= 0:
            raise ConfigError(f"train.tile_size must be positive, got {self.tile_size}")
        if self.evaluator not in EVALUATORS:
            raise ConfigError(f"train.evaluator '{self.evaluator}' is unknown; choose one of {', '.join(EVALUATORS)}")
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise ConfigError(f"train.memory_budget_mb must be positive, got {self.memory_budget_mb}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ConfigError(f"train.memory_fraction must lie in (0, 1], got {self.memory_fraction}")
        self.augment.validate()


@dataclass(frozen=True)
class PredictOptions:
    """How to predict and what to write (the ``gigaseg-predict`` options, minus model and slide)."""

    #: A level, or a target mpp (the closest level, never coarser); both None: the model's resolution.
    level: int | None = None
    mpp: float | None = None
    #: probability (uint8, round(255 p)) or binary (0/255 at the threshold).
    kind: str = "probability"
    threshold: float = 0.5
    #: Model tile (core) side: a multiple of the total stride and of tiff_tile_size. Memory grows
    #: with it, not with the slide; benchmarks/README.md has the figures behind the default.
    tile_size: int = 1536
    tiff_tile_size: int = 512
    #: Tissue pieces smaller than this are dropped from the outlines (level-0 pixels^2 without an mpp).
    min_area_um2: float = 1000.0
    pad_value: tuple[int, ...] = DEFAULT_PAD_VALUE
    #: Outlines are traced on a copy of the mask downsampled by a power of two to at most this many Mpx.
    outline_max_mpx: float = 16.0
    #: How far (um; level-0 pixels without an mpp) a simplified outline may stray from the traced
    #: pixel edges; None: half a pixel of the traced mask (docs/PREDICTION.md); 0: not simplified.
    simplify_um: float | None = None
    #: Threads decoding slide windows ahead of the model.
    readers: int = 1
    #: Tiles computed at once, in threads (each adds one tile's memory); 3 kept two cores busiest.
    workers: int = 3
    #: How tiles are computed: auto, fused, lowered or keras (docs/STREAMING.md, "Evaluators").
    evaluator: str = "auto"
    #: XLA-compile the tile graphs (with evaluator auto, the fused kernels are then passed over).
    jit_compile: bool = False
    #: Deflate level of the mask tiles (1: fastest).
    compression_level: int = 1
    thumbnail_size: int = 1024
    progress: bool = True

    def validate(self, total_stride: int, halo: int | None = None) -> None:
        """Raise ConfigError naming the first invalid option (``halo``: the model's, when known)."""
        from gigaseg.inference.tiff import KINDS, TIFF_TILE_SIZES
        from gigaseg.streaming.plan import tile_below_halo

        if self.kind not in KINDS:
            raise ConfigError(f"kind '{self.kind}' is unknown; choose one of {', '.join(KINDS)}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        if self.tiff_tile_size not in TIFF_TILE_SIZES:
            raise ConfigError(f"tiff_tile_size must be one of {TIFF_TILE_SIZES}, got {self.tiff_tile_size}")
        unit = math.lcm(total_stride, self.tiff_tile_size)
        if self.tile_size <= 0 or self.tile_size % unit:
            raise ConfigError(
                f"tile_size {self.tile_size} must be a positive multiple of {unit} (the model's total stride "
                f"{total_stride} and the TIFF tile {self.tiff_tile_size}), e.g. {max(unit, self.tile_size // unit * unit)}"
            )
        if halo is not None and self.tile_size < halo:
            raise tile_below_halo(str(self.tile_size), halo, unit)
        if self.min_area_um2 < 0:
            raise ConfigError(f"min_area_um2 must be zero or positive, got {self.min_area_um2}")
        if self.simplify_um is not None and not (math.isfinite(self.simplify_um) and self.simplify_um >= 0):
            raise ConfigError(f"simplify_um must be zero or positive (um), got {self.simplify_um}; "
                              "null for half a pixel of the traced mask, 0 for no simplification")
        if self.outline_max_mpx <= 0:
            raise ConfigError(f"outline_max_mpx must be positive, got {self.outline_max_mpx}")
        if self.readers < 1:
            raise ConfigError(f"readers must be at least 1, got {self.readers}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.thumbnail_size < 1:
            raise ConfigError(f"thumbnail_size must be a positive number of pixels, got {self.thumbnail_size}")
        if not 0 <= self.compression_level <= 9:
            raise ConfigError(f"compression_level must lie in 0..9 (deflate), got {self.compression_level}")
