"""CPU time of each stage of whole-slide prediction, per tile window, on the cached synthetic slide; prints one JSON object.

Runs the stages of ``predict_slide`` one after another in this thread for ``--windows``
consecutive tiles of one band of level 0 (after two warm-up tiles): the slide read as
prediction reads it (tiles decoded straight from the file, ``gigaseg.slides.tiff_tiles``), and,
for comparison only, the same read through OpenSlide's ``read_region`` and conversion to RGB
(the way gigaseg read slides before), rearranging into blocks, the forward pass (TensorFlow's threads
included), back from blocks, rounding to uint8 with thresholding and counting, the outline grid, and
deflating the 512² mask tiles as the TIFF writer does. ``time.process_time`` per stage,
reported as CPU milliseconds per window and CPU seconds per output megapixel. The slide is
the one ``benchmarks/predict_slide.py`` generates and caches. Example:

    python benchmarks/predict_stages.py --height 16000 --width 64000 --json
"""

from __future__ import annotations

import argparse
import json
import time

from _worker import run_main  # benchmarks/_worker.py, beside this script
from predict_slide import base_slide


def run(args: argparse.Namespace) -> dict:
    import imagecodecs
    import keras
    import numpy as np

    from gigaseg.inference.predict import DEFAULT_PAD_VALUE, OutlineGrid, PredictOptions, mask_values
    from gigaseg.inference.windows import PaddedLevel
    from gigaseg.model import build_unet
    from gigaseg.slides import open_slide
    from gigaseg.slides.openslide_reader import _read_rgb
    from gigaseg.streaming import TiledEngine

    keras.utils.set_random_seed(0)
    engine = TiledEngine(build_unet(), tile_size=args.tile_size)
    options = PredictOptions(tile_size=args.tile_size)
    stages: dict[str, float] = {}
    with open_slide(base_slide(args.height, args.width, 0)) as slide:
        padded = PaddedLevel(slide, 0, engine.total_stride, DEFAULT_PAD_VALUE)
        plan = engine.plan(padded.shape[:2])
        grid = OutlineGrid(padded.width, padded.height, options.outline_max_mpx * 1e6, max_factor=args.tile_size)
        row = min(plan.grid[0] // 2, plan.grid[0] - 1)
        tiles = [t for t in plan.tiles if t.row == row][: args.windows + 2]
        for i, tile in enumerate(tiles):
            clock = time.process_time()

            def lap(name: str) -> None:
                nonlocal clock
                now = time.process_time()
                if i >= 2:  # the first two tiles warm up (tracing, caches)
                    stages[name] = stages.get(name, 0.0) + now - clock
                clock = now

            top, left, bottom, right = tile.window
            size = (min(right, padded.width) - left, min(bottom, padded.height) - top)
            # Alternate which read comes first, in case one warms the page cache for the other.
            for read in ("openslide", "direct") if i % 2 else ("direct", "openslide"):
                if read == "direct":
                    window = padded.read(*tile.window)
                    lap("read_rgb")
                else:
                    _read_rgb(slide._slide, (left, top), 0, size)
                    lap("compare_openslide_read_region")
            blocks = engine.to_layout(window)
            lap("to_blocks")
            # Forward, and the core back from blocks to pixels.
            probability = engine.core_probabilities(blocks, tile)
            lap("forward")
            mask, tissue, _ = mask_values(probability, options.kind, options.threshold)
            lap("round_to_uint8_threshold_count")
            grid.add(tile.core[0], tile.core[1], tissue)
            lap("outline_grid")
            t = options.tiff_tile_size
            for top in range(0, mask.shape[0], t):
                for left in range(0, mask.shape[1], t):
                    imagecodecs.deflate_encode(np.ascontiguousarray(mask[top : top + t, left : left + t]),
                                               level=options.compression_level)
            lap("deflate_mask_tiles")
    n = len(tiles) - 2
    core_mpx = args.tile_size * args.tile_size / 1e6
    return {
        "slide": f"{args.width}x{args.height}", "tile_size": args.tile_size, "windows": n,
        "cpu_ms_per_window": {k: round(v / n * 1e3, 2) for k, v in stages.items()},
        "cpu_s_per_output_mpx": {k: round(v / n / core_mpx, 4) for k, v in stages.items()},
        "total_cpu_s_per_output_mpx": round(
            sum(v for k, v in stages.items() if not k.startswith("compare_")) / n / core_mpx, 4
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=16000)
    parser.add_argument("--width", type=int, default=64000)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=18)
    parser.add_argument("--json", action="store_true", help="print one JSON object (always on; kept for scripts)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    run_main(main)
