"""CPU cost of augmentation on the fly (gigaseg.augment) per megapixel: the colour change, and reading flipped or turned windows through the lazy view against a plain slice copy; prints one JSON object.

The process is pinned to one CPU (``--cpu``), so the figures are one core's. Windows of
``--window`` pixels are read from the middle of a ``--region`` square region, in memory and
as a read-only ``.npy`` memory map (written to a temporary folder; the page cache holds it,
so this is the cost of the copy and the arithmetic, not of the disk). Each figure is the
median over ``--rounds`` rounds of ``--repeat`` reads, after a warm-up read (compiling).
``--step`` adds a tiled training step (Dice, ``--tile-size``) on a ``--step-region`` region,
plain, through a coloured, turned view, and (as training does) with that view staged once in scratch files, and the share of the step the augmented reads
should take from the per-pixel figures. Example:

    python benchmarks/augment_cost.py --json
    python benchmarks/augment_cost.py --step --step-region 2048 --tile-size 1024 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from _worker import run_main  # benchmarks/_worker.py, beside this script

# A colour change of the size the default settings draw (every parameter away from the identity).
COLOUR = {"hed_scale": (1.04, 0.96, 1.02), "hed_shift": (0.008, -0.006, 0.003), "brightness": 0.04, "contrast": 0.92, "saturation": 1.08}


def cpu_ms(call, rounds: int, repeat: int) -> float:
    """Median CPU milliseconds per call, after one warm-up call."""
    call()
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(repeat):
            call()
        samples.append((time.process_time() - start) / repeat * 1e3)
    return statistics.median(samples)


def tissue_region(side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pink blobs on near-white glass with pixel noise, and their mask."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((side // 128 + 1, side // 128 + 1))
    mask = (np.kron(coarse, np.ones((128, 128)))[:side, :side] > 0.5).astype(np.uint8)
    colour = np.where(mask[..., None] == 1, np.array([190, 120, 180]), np.array([235, 232, 236]))
    image = np.clip(colour + rng.integers(-25, 26, (side, side, 3)), 0, 255).astype(np.uint8)
    return image, mask


def read_costs(args: argparse.Namespace, directory: Path) -> dict:
    from gigaseg.augment import Augmentation, TransformedArray, colour_transform

    image, mask = tissue_region(args.region)
    np.save(directory / "image.npy", image)
    np.save(directory / "mask.npy", mask)
    mapped = np.load(directory / "image.npy", mmap_mode="r")
    mapped_mask = np.load(directory / "mask.npy", mmap_mode="r")
    top = (args.region - args.window) // 2
    window = (slice(top, top + args.window), slice(top, top + args.window))
    mpx = args.window * args.window / 1e6

    def per_mpx(call) -> float:
        return round(cpu_ms(call, args.rounds, args.repeat) / mpx, 3)

    contiguous = np.ascontiguousarray(image[window])
    costs = {
        "slice_copy": per_mpx(lambda: np.ascontiguousarray(image[window])),
        "slice_copy_memmap": per_mpx(lambda: np.ascontiguousarray(mapped[window])),
        "mask_slice_copy_memmap": per_mpx(lambda: np.ascontiguousarray(mapped_mask[window])),
        "colour_transform": per_mpx(lambda: colour_transform(contiguous, Augmentation(**COLOUR))),
    }
    views = {}
    for turns, flip in itertools.product(range(4), (False, True)):
        name = f"turns{turns}{'_flip' if flip else ''}"
        geometric, coloured = Augmentation(turns=turns, flip=flip), Augmentation(turns=turns, flip=flip, **COLOUR)
        image_view = TransformedArray(mapped, geometric)
        coloured_view = TransformedArray(mapped, coloured, colour=True)
        mask_view = TransformedArray(mapped_mask, geometric)
        views[name] = {
            "geometry_memmap": per_mpx(lambda view=image_view: view[window]),
            "geometry_and_colour_memmap": per_mpx(lambda view=coloured_view: view[window]),
            "mask_geometry_memmap": per_mpx(lambda view=mask_view: view[window]),
        }
    costs["view_reads"] = views
    for kind in ("geometry_memmap", "geometry_and_colour_memmap", "mask_geometry_memmap"):
        values = [v[kind] for v in views.values()]
        costs[f"view_{kind}_mean"] = round(statistics.mean(values), 3)
        costs[f"view_{kind}_max"] = max(values)
    return costs


def step_costs(args: argparse.Namespace, directory: Path, costs: dict) -> dict:
    import keras

    from gigaseg.augment import Augmentation, TransformedRegion
    from gigaseg.model import build_unet
    from gigaseg.staging import IN_MEMORY_BYTES, StepStaging
    from gigaseg.streaming import TiledEngine

    image, mask = tissue_region(args.step_region, seed=1)
    np.save(directory / "step-image.npy", image)
    np.save(directory / "step-mask.npy", mask)
    image = np.load(directory / "step-image.npy", mmap_mode="r")
    mask = np.load(directory / "step-mask.npy", mmap_mode="r")
    keras.utils.set_random_seed(0)
    engine = TiledEngine(build_unet(), loss="dice", tile_size=args.tile_size)
    region = TransformedRegion(image, mask, Augmentation(turns=1, flip=True, **COLOUR))
    plain_s = cpu_ms(lambda: engine.step(image, mask), args.steps, 1) / 1e3
    unstaged_s = cpu_ms(lambda: engine.step(*region), args.steps, 1) / 1e3
    # As training does: the augmented region staged once (in memory, or in scratch files for a
    # region over the limit), which both passes read.
    in_memory = IN_MEMORY_BYTES if args.stage_in_memory_mb is None else int(args.stage_in_memory_mb * 2**20)
    with StepStaging(directory / "staging", in_memory=in_memory) as staging:
        augmented_s = cpu_ms(lambda: engine.step(*staging(*region)), args.steps, 1) / 1e3
    plan = engine.plan(region.shape)
    # Every window is read once per pass; the mask cores once per pass too.
    window_mpx = engine.passes * plan.window_pixels / 1e6
    core_mpx = engine.passes * args.step_region**2 / 1e6
    extra_ms = window_mpx * (costs["view_geometry_and_colour_memmap_max"] - costs["slice_copy_memmap"]) + core_mpx * (
        costs["view_mask_geometry_memmap_max"] - costs["mask_slice_copy_memmap"]
    )
    return {
        "region": [args.step_region, args.step_region],
        "tile_size": args.tile_size,
        "tiles": len(plan),
        "plain_step_cpu_s": round(plain_s, 3),
        "augmented_step_cpu_s": round(augmented_s, 3),
        "measured_share": round((augmented_s - plain_s) / augmented_s, 4),
        "staged_in_memory": 4 * args.step_region**2 <= in_memory,
        "unstaged_augmented_step_cpu_s": round(unstaged_s, 3),
        "unstaged_measured_share": round((unstaged_s - plain_s) / unstaged_s, 4),
        "estimated_read_cpu_s": round(extra_ms / 1e3, 4),
        "estimated_share": round(extra_ms / 1e3 / plain_s, 4),
    }


def run(args: argparse.Namespace) -> dict:
    if hasattr(os, "sched_setaffinity") and args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    with tempfile.TemporaryDirectory(prefix="gigaseg-augment-") as folder:
        costs = read_costs(args, Path(folder))
        result = {
            "window": [args.window, args.window],
            "region": [args.region, args.region],
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "ms_per_mpx": costs,
            "colour_ms_per_window": round(costs["colour_transform"] * args.window**2 / 1e6, 2),
        }
        if args.step:
            result["step"] = step_costs(args, Path(folder), costs)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=1152, help="window side in pixels (a 1024 tile with its 64-pixel halo)")
    parser.add_argument("--region", type=int, default=4096, help="side of the square region the windows are read from")
    parser.add_argument("--cpu", type=int, default=min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
                        help="the CPU to pin this process to (-1: no pinning)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--step", action="store_true", help="also time a tiled Dice step plain and through an augmented view")
    parser.add_argument("--step-region", type=int, default=2048, help="side of the square region of --step")
    parser.add_argument("--tile-size", type=int, default=1024, help="tile side of --step, a multiple of 64")
    parser.add_argument("--stage-in-memory-mb", type=float, default=None,
                        help="--step: stage regions of up to this many MB in memory, else in scratch files "
                             "(default: gigaseg.staging's; 0: always files)")
    parser.add_argument("--steps", type=int, default=3, help="steps timed (median) for --step, after one warm-up step")
    parser.add_argument("--json", action="store_true", help="print one JSON object (always on; kept for scripts)")
    args = parser.parse_args(argv)
    if args.window <= 0 or args.region < args.window:
        from gigaseg.errors import ConfigError

        raise ConfigError(f"--window must be positive and at most --region, got {args.window} and {args.region}")
    if args.step and (args.tile_size <= 0 or args.tile_size % 64 or args.step_region % 64):
        from gigaseg.errors import ConfigError

        raise ConfigError(f"--tile-size and --step-region must be multiples of 64 (the model's total stride), got {args.tile_size} and {args.step_region}")
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    run_main(main)
