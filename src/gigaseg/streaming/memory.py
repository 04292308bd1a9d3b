"""Peak-memory estimates for plain and tiled steps, and choosing a tile size from a memory budget.

Estimates are linear in the pixels a step holds at once: ``fixed overhead + pixels x bytes
per pixel``. Bytes per pixel are the model's own activation footprint (sum of every layer
output's channels x 4 bytes / jump^2, see :func:`activation_bytes_per_pixel`) times a
factor for what a gradient tape keeps besides (gradients of those activations, temporaries
of the loss), calibrated against measured peak RSS (benchmarks/README.md, "Memory model
calibration").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import psutil

from gigaseg.errors import MemoryPlanError
from gigaseg.streaming.geometry import activation_bytes_per_pixel, model_geometry
from gigaseg.streaming.plan import as_tile_shape, check_region_shape, check_tile_shape, plan_tiles, tile_below_halo

# Slopes and intercepts of peak RSS against pixels held, fitted to peaks measured with
# benchmarks/train_step.py (benchmarks/README.md, "Memory model calibration"). A plain step's
# tape keeps every activation and its gradient; the overhead is the TensorFlow runtime, the
# model and the region itself. The compact evaluators keep fewer full-resolution tensors;
# their overhead is the runtime, the traced graphs and the reading buffers.
PLAIN_TAPE_FACTOR = 2.15
PLAIN_OVERHEAD_BYTES = 600 * 2**20
#: What a window pixel costs the evaluators that keep few full-resolution tensors (``lowered``,
#: ``fused``; :mod:`gigaseg.streaming.evaluators`), in units of the model's activation bytes.
COMPACT_TAPE_FACTOR = 1.3
#: The Keras reference evaluator keeps every full-resolution activation and its gradient, like
#: the plain step: its factor, not the compact one.
KERAS_TAPE_FACTOR = PLAIN_TAPE_FACTOR
TILED_TAPE_FACTOR = COMPACT_TAPE_FACTOR
TILED_OVERHEAD_BYTES = 930 * 2**20
#: The largest tile the planner picks by itself. Larger tiles recompute less halo, but
#: 1024^2 tiles were faster per pixel than 2048^2 (cache locality; benchmarks/README.md,
#: "Training step: plain and tiled", tile size).
MAX_TILE = 1024


@dataclass(frozen=True)
class MemoryPlan:
    """A tile size chosen (or checked) against a memory budget, with the numbers behind the choice."""

    tile_size: tuple[int, int]
    halo: int
    tiles: int
    estimated_peak_bytes: int
    budget_bytes: int
    plain_step_bytes: int
    plain_fits: bool


def available_memory_bytes() -> int:
    """Memory this process can still use: the smaller of what the machine and its cgroup leave free."""
    available = psutil.virtual_memory().available
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            available = min(available, int(limit) - usage)
        break
    return max(int(available), 0)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def plain_step_bytes(model: keras.Model, height: int, width: int) -> int:
    """Estimated peak RSS of one plain (whole-region, float32) training step."""
    pixels = height * width
    per_pixel = PLAIN_TAPE_FACTOR * activation_bytes_per_pixel(model) + 4  # + the label as float32
    return int(PLAIN_OVERHEAD_BYTES + pixels * per_pixel)


def tiled_step_bytes(
    model: keras.Model, tile_size: int | tuple[int, int], halo: int | None = None, tape_factor: float = TILED_TAPE_FACTOR
) -> int:
    """Estimated peak RSS of one tiled step with tiles of ``tile_size`` (plus the halo on each side).

    The region itself is read lazily and released (see reader.py), so it does not count;
    two windows are held at once (the current one and the prefetched one). ``tape_factor`` is
    the evaluator's memory model (``Evaluator.tape_factor``); the default is the compact evaluators'.
    """
    th, tw = as_tile_shape(tile_size)
    if halo is None:
        halo = model_geometry(model).halo
    window = (th + 2 * halo) * (tw + 2 * halo)
    per_pixel = tape_factor * activation_bytes_per_pixel(model)
    io = 2 * window * 4  # uint8 RGB window + uint8 mask core, current and prefetched
    return int(TILED_OVERHEAD_BYTES + window * per_pixel + io)


def _balanced(size: int, tile: int, stride: int) -> int:
    """The smallest stride multiple that covers ``size`` with as many tiles as ``tile`` would need."""
    count = math.ceil(size / tile)
    return min(tile, math.ceil(size / count / stride) * stride)


def plan_tile_size(
    model: keras.Model,
    region_hw: tuple[int, int],
    *,
    budget_bytes: int | None = None,
    budget_fraction: float = 0.5,
    tile_size: int | tuple[int, int] | None = None,
    halo: int | None = None,
    max_tile: int = MAX_TILE,
    tape_factor: float = TILED_TAPE_FACTOR,
) -> MemoryPlan:
    """Pick (or check) a tile size for a region so that a tiled step fits the memory budget.

    Without ``tile_size``, the largest square stride multiple up to ``max_tile`` that fits
    is taken, then shrunk per axis to split the region into equal tiles (same tile count,
    less ragged last tiles). With ``tile_size``, it is checked and MemoryPlanError raised,
    naming a tile size that would fit, if it does not. ``tape_factor`` is the evaluator's
    memory model (see :func:`tiled_step_bytes`).
    """
    geometry = model_geometry(model)
    stride = geometry.total_stride
    halo = geometry.halo if halo is None else int(halo)
    height, width = int(region_hw[0]), int(region_hw[1])
    check_region_shape((height, width), stride)
    budget = int(budget_bytes if budget_bytes is not None else budget_fraction * available_memory_bytes())
    plain = plain_step_bytes(model, height, width)

    def fitting(limit: int) -> int | None:
        for t in range(limit - limit % stride, 0, -stride):
            if tiled_step_bytes(model, t, halo, tape_factor) <= budget:
                return t
        return None

    if tile_size is not None:
        # Checked before estimating, so a bad size is reported as such, not as a memory shortfall.
        th, tw = check_tile_shape(tile_size, stride)
        if (th < halo and th < height) or (tw < halo and tw < width):  # a tile as large as the region has no halo
            raise tile_below_halo(f"{th}x{tw}", halo, stride)
        estimate = tiled_step_bytes(model, (th, tw), halo, tape_factor)
        if estimate > budget:
            fit = fitting(max(th, tw))
            hint = (
                f"use tile_size={fit} or less"
                if fit
                else f"even a {stride}x{stride} tile needs {_gib(tiled_step_bytes(model, stride, halo, tape_factor))}; free memory or raise the budget"
            )
            raise MemoryPlanError(
                f"a tiled step with {th}x{tw} tiles (halo {halo}) needs about {_gib(estimate)}, "
                f"more than the budget of {_gib(budget)}; {hint}"
            )
    else:
        t = fitting(min(max_tile, max(height, width)))
        if t is None:
            raise MemoryPlanError(
                f"no tile fits the budget of {_gib(budget)}: even a {stride}x{stride} tile (halo {halo}) needs about "
                f"{_gib(tiled_step_bytes(model, stride, halo, tape_factor))}; free memory or raise the budget"
            )
        th, tw = _balanced(height, t, stride), _balanced(width, t, stride)
        estimate = tiled_step_bytes(model, (th, tw), halo, tape_factor)
    plan = plan_tiles((height, width), (th, tw), halo, stride)
    return MemoryPlan(
        tile_size=plan.tile_shape,
        halo=halo,
        tiles=len(plan),
        estimated_peak_bytes=estimate,
        budget_bytes=budget,
        plain_step_bytes=plain,
        plain_fits=plain <= budget,
    )


def check_plain_step_fits(model: keras.Model, height: int, width: int, budget_bytes: int | None = None) -> int:
    """Return the plain step's estimated peak bytes, or raise MemoryPlanError if it exceeds the budget.

    The budget defaults to the memory available now.
    """
    estimate = plain_step_bytes(model, height, width)
    available = available_memory_bytes()
    budget = available if budget_bytes is None else int(budget_bytes)
    if estimate > budget:
        raise MemoryPlanError(
            f"a plain training step on a {height}x{width} region needs about {_gib(estimate)}, "
            f"but the budget is {_gib(budget)} ({_gib(available)} available); "
            "use tiled training (gigaseg.streaming.TiledEngine) or a smaller region"
        )
    return estimate

