"""Exact tiled training and inference on whole regions: tile plans, halo, two-pass losses, memory planning.

See docs/STREAMING.md for the method. The public entry points are re-exported here.
"""

from gigaseg.streaming.engine import (
    DistributedEngine,
    StepResult,
    TiledEngine,
    WholeRegionEngine,
    loss_and_gradients,
    predict_tiled,
)
from gigaseg.streaming.geometry import Geometry, activation_bytes_per_pixel, model_geometry, total_stride
from gigaseg.streaming.labels import count_labelled
from gigaseg.streaming.memory import (
    MemoryPlan,
    available_memory_bytes,
    check_plain_step_fits,
    plain_step_bytes,
    plan_tile_size,
    tiled_step_bytes,
)
from gigaseg.streaming.plan import RegionShapeError, Tile, TilePlan, check_region_shape, plan_tiles
from gigaseg.streaming.reference import plain_loss_and_gradients, plain_step

__all__ = [
    "DistributedEngine",
    "Geometry",
    "MemoryPlan",
    "RegionShapeError",
    "StepResult",
    "Tile",
    "TilePlan",
    "TiledEngine",
    "WholeRegionEngine",
    "activation_bytes_per_pixel",
    "available_memory_bytes",
    "check_plain_step_fits",
    "check_region_shape",
    "count_labelled",
    "loss_and_gradients",
    "model_geometry",
    "plain_loss_and_gradients",
    "plain_step_bytes",
    "plain_step",
    "plan_tile_size",
    "plan_tiles",
    "predict_tiled",
    "tiled_step_bytes",
    "total_stride",
]
