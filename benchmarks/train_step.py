"""Time and peak memory of one training step (plain or tiled) on a synthetic tissue-like region; prints one JSON object.

Each configuration runs in a fresh child process (this script spawns itself) so that its
peak RSS is its own. The region is a uint8 ``.npy`` memory map written once per size and
reused (``--region-dir``). Example:

    python benchmarks/train_step.py --height 8192 --width 8192 --loss dice --tiled --tile-size 1024 --json

``--model`` changes the U-Net's layout (``build_unet`` keywords, lists comma-separated), e.g.
``--model filters=8,8,8 decoder_filters=8,8,8`` or ``--model activation=elu``. Tiled runs
report the evaluator that computed the tiles and the memory planner's estimate of the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _worker import peak_rss_mb, run_in_child, run_main  # benchmarks/_worker.py, beside this script


def write_region(directory: Path, height: int, width: int, seed: int = 0) -> tuple[Path, Path]:
    """A tissue-like region: smooth blobs of pink tissue on near-white glass, with pixel noise."""
    image_path = directory / f"region-{height}x{width}-image.npy"
    mask_path = directory / f"region-{height}x{width}-mask.npy"
    if image_path.exists() and mask_path.exists():
        return image_path, mask_path
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # A coarse random field, blurred by repetition and thresholded, gives blobs ~1000 px across.
    cell = 256
    coarse = rng.random((height // cell + 3, width // cell + 3))
    coarse = (coarse[:-2, :-2] + coarse[1:-1, :-2] + coarse[2:, :-2] + coarse[:-2, 1:-1] + coarse[1:-1, 1:-1]
              + coarse[2:, 1:-1] + coarse[:-2, 2:] + coarse[1:-1, 2:] + coarse[2:, 2:]) / 9
    noise = rng.integers(-25, 26, size=(512, 512, 3), dtype=np.int16)
    tissue = np.array([190, 120, 180], np.int16)
    glass = np.array([235, 232, 236], np.int16)
    image = np.lib.format.open_memmap(str(image_path) + ".tmp.npy", "w+", np.uint8, (height, width, 3))
    mask = np.lib.format.open_memmap(str(mask_path) + ".tmp.npy", "w+", np.uint8, (height, width))
    band = 512
    for top in range(0, height, band):
        bottom = min(top + band, height)
        rows = np.arange(top, bottom) // cell
        field = np.repeat(coarse[rows], cell, axis=1)[:, :width]
        labels = (field > 0.5).astype(np.uint8)
        reps = (1, -(-width // 512), 1)
        pixel_noise = np.tile(noise, reps)[: bottom - top, :width]
        colour = np.where(labels[..., None] == 1, tissue, glass) + pixel_noise
        image[top:bottom] = np.clip(colour, 0, 255).astype(np.uint8)
        mask[top:bottom] = labels
    image.flush()
    mask.flush()
    del image, mask
    os.replace(str(image_path) + ".tmp.npy", image_path)
    os.replace(str(mask_path) + ".tmp.npy", mask_path)
    return image_path, mask_path


def model_options(pairs: list[str]) -> dict:
    """``["filters=8,8,8", "activation=elu"]`` -> ``{"filters": [8, 8, 8], "activation": "elu"}``."""
    def value(text: str):
        if "," in text:
            return [value(part) for part in text.split(",") if part]
        try:
            return int(text)
        except ValueError:
            return text

    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"--model takes key=value pairs (build_unet keywords), got {pair!r}")
        options[key] = value(text)
    return options


def run_worker(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from gigaseg.model import build_unet
    from gigaseg.streaming import TiledEngine, plain_step
    from gigaseg.streaming.reader import release_rows

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(0)
    model = build_unet(**model_options(args.model))
    optimizer = keras.optimizers.Adam(1e-3)
    image = np.load(args.image, mmap_mode="r", allow_pickle=False)
    mask = np.load(args.mask, mmap_mode="r", allow_pickle=False)
    height, width = image.shape[:2]
    if args.tiled:
        engine = TiledEngine(model, loss=args.loss, tile_size=args.tile_size, jit_compile=args.jit, evaluator=args.evaluator)
        engine.check_gradients()  # the evaluator that will run, before planning with its memory model
        memory_plan = engine.memory_plan((height, width))
        engine.tile_size = memory_plan.tile_size
        step = lambda: engine.step(image, mask)  # noqa: E731
        tile_size = list(memory_plan.tile_size)
    else:
        # A plain step needs the whole region in memory; the copy is part of its footprint.
        image_array, mask_array = np.array(image), np.array(mask)
        release_rows(image, 0, height)
        release_rows(mask, 0, height)
        step = lambda: plain_step(model, image_array, mask_array, loss=args.loss)  # noqa: E731
        tile_size = memory_plan = None
    times, data_times, tiles = [], [], 1
    for i in range(args.steps + 1):
        start = time.perf_counter()
        result = step()
        optimizer.apply_gradients(zip([tf.constant(g, v.dtype) for g, v in zip(result.gradients, model.trainable_variables)], model.trainable_variables))
        elapsed = time.perf_counter() - start
        print(f"step {i}: {elapsed:.2f} s (data {result.data_time_s:.2f} s), loss {result.loss:.4f}", file=sys.stderr)
        if i > 0 or args.steps == 0:  # the first step traces graphs and warms caches
            times.append(elapsed)
            data_times.append(result.data_time_s)
        tiles = result.tiles
    step_time = float(np.median(times))
    return {
        "height": height,
        "width": width,
        "loss": args.loss,
        "tiled": bool(args.tiled),
        "model": model_options(args.model),
        "tile_size": tile_size,
        "tiles": tiles,
        "evaluator": engine.evaluator.name if args.tiled else "plain",
        **({"evaluator_reason": engine.choice.describe(),
            "estimated_peak_mb": round(memory_plan.estimated_peak_bytes / 2**20, 1)} if args.tiled else {}),
        "step_time_s": round(step_time, 3),
        "data_time_s": round(float(np.median(data_times)), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "mpx_per_s": round(height * width / 1e6 / step_time, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--loss", choices=("dice", "bce", "dice_bce"), default="dice")
    parser.add_argument("--tiled", action="store_true", help="tiled step (default: plain whole-region step)")
    parser.add_argument("--tile-size", type=int, default=None, help="tile side; default: planned from memory")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (0: report the warm-up step)")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra/inter-op threads (0: default)")
    parser.add_argument("--jit", action="store_true", help="XLA-compile the per-tile graphs")
    parser.add_argument("--evaluator", default="auto", help="how tiles are computed: auto, fused, lowered or keras")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="build_unet keywords, lists comma-separated")
    parser.add_argument("--json", action="store_true", help="print one JSON object (always on; kept for scripts)")
    parser.add_argument("--region-dir", type=Path, default=Path(tempfile.gettempdir()) / "gigaseg-bench-regions")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--mask", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    image_path, mask_path = write_region(args.region_dir, args.height, args.width)
    forwarded = list(argv if argv is not None else sys.argv[1:])
    return run_in_child(__file__, [*forwarded, "--worker", "--image", str(image_path), "--mask", str(mask_path)])


if __name__ == "__main__":
    run_main(main)
