"""Benchmark: generate a synthetic slide, then read it back region by region through OpenSlideReader.

Prints one JSON object: generation seconds and peak memory, read-back speed, and sizes.
Example: python benchmarks/synth_and_read.py --height 16000 --width 64000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from gigaseg.slides import open_slide
from gigaseg.slides.synthetic import write_synthetic_slide
from _worker import run_main  # benchmarks/_worker.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=4096)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--region", type=int, default=4096, help="side of the square regions read back")
    parser.add_argument("--folder", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        slide, mask = Path(folder) / "bench.tiff", Path(folder) / "bench_mask.tiff"
        start = time.perf_counter()
        info = write_synthetic_slide(slide, height=args.height, width=args.width, seed=args.seed,
                                     tile_size=args.tile_size, mask_path=mask, progress=not args.json,
                                     workers=args.workers)
        gen_s = time.perf_counter() - start
        parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        workers = args.workers or min(2, os.cpu_count() or 1)

        pixels = 0
        start = time.perf_counter()
        with open_slide(slide) as reader:
            width, height = reader.dimensions
            for y in range(0, height, args.region):
                for x in range(0, width, args.region):
                    size = (min(args.region, width - x), min(args.region, height - y))
                    pixels += reader.read_region((x, y), 0, size).shape[0] * size[0]
        read_s = time.perf_counter() - start
        result = {
            "height": args.height,
            "width": args.width,
            "megapixels": round(args.height * args.width / 1e6, 1),
            "levels": info["level_dimensions"],
            "tissue_fraction": round(info["tissue_fraction"], 4),
            "generate_s": round(gen_s, 1),
            "generate_mpx_per_s": round(args.height * args.width / gen_s / 1e6, 2),
            "workers": workers,
            "peak_rss_parent_mb": round(parent_mb),
            "peak_rss_worker_mb": round(child_mb),
            "peak_rss_total_mb": round(parent_mb + workers * child_mb),
            "slide_mb": round(slide.stat().st_size / 1e6, 1),
            "mask_mb": round(mask.stat().st_size / 1e6, 2),
            "read_region": args.region,
            "read_s": round(read_s, 1),
            "read_mpx_per_s": round(pixels / read_s / 1e6, 1),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
