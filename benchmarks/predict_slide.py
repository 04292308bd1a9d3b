"""Time and peak memory of whole-slide prediction (decode, forward, mask TIFF, outlines, overlay); prints one JSON object.

The slide is a synthetic H&E slide written once by ``write_synthetic_slide`` and cached
under ``$TMPDIR/gigaseg-bench-slides/`` (16000x64000 takes about 10 minutes). ``--repeat 2``
predicts a slide 2x larger in each dimension (4x the pixels) built cheaply from the cached
one by repeating its compressed JPEG tiles (no re-encoding; coarser levels repeat the
cached slide's coarser tiles, so they are not exact reductions of level 0). The prediction
runs in a fresh child process, so ``peak_rss_mb`` (VmHWM) is its own. Example:

    python benchmarks/predict_slide.py --height 16000 --width 64000 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from _worker import peak_rss_mb, run_in_child, run_main  # benchmarks/_worker.py, beside this script

CACHE = Path(tempfile.gettempdir()) / "gigaseg-bench-slides"


def base_slide(height: int, width: int, seed: int) -> Path:
    """The cached synthetic slide, generated (with 2 render workers and a progress bar) if missing."""
    from gigaseg.slides.synthetic import write_synthetic_slide

    path = CACHE / f"synthetic-{height}x{width}-seed{seed}.tiff"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"generating {path} (once)", file=sys.stderr)
        write_synthetic_slide(path, height=height, width=width, seed=seed, progress=True)
    return path


def repeated_slide(source: Path, repeat: int) -> Path:
    """A slide ``repeat`` x larger in each dimension, every level made of the source level's whole JPEG tiles, repeated."""
    import numpy as np
    import tifffile

    path = source.with_name(f"{source.stem}-x{repeat}.tiff")
    if path.exists():
        return path
    tmp = path.with_name(f".{path.name}.partial")
    with tifffile.TiffFile(source) as src, tifffile.TiffWriter(tmp, bigtiff=True) as out:
        for k, page in enumerate(src.pages):
            t = page.tilewidth
            full_rows, full_cols = page.imagelength // t, page.imagewidth // t
            across = math.ceil(page.imagewidth / t)
            height, width = page.imagelength * repeat, page.imagewidth * repeat
            if full_rows == 0 or full_cols == 0:
                break

            def tiles(page=page, t=t, full_rows=full_rows, full_cols=full_cols, across=across, height=height, width=width):
                fh = src.filehandle
                for row in range(math.ceil(height / t)):
                    for col in range(math.ceil(width / t)):
                        index = (row % full_rows) * across + col % full_cols
                        fh.seek(page.dataoffsets[index])
                        yield fh.read(page.databytecounts[index])

            x_res, y_res = page.tags["XResolution"].value, page.tags["YResolution"].value
            out.write(tiles(), shape=(height, width, 3), dtype=np.uint8, photometric="ycbcr", subsampling=(2, 2),
                      compression="jpeg", tile=(t, t), subfiletype=0 if k == 0 else 1, metadata=None,
                      resolution=(x_res[0] / x_res[1], y_res[0] / y_res[1]), resolutionunit="CENTIMETER",
                      description=page.description if k == 0 else None)
    os.replace(tmp, path)
    return path


def run_worker(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from gigaseg.inference import PredictOptions, predict_slide
    from gigaseg.model import build_unet

    keras.utils.set_random_seed(0)
    model = build_unet()
    options = PredictOptions(level=0, kind=args.kind, tile_size=args.tile_size, readers=args.readers,
                             workers=args.workers,
                             jit_compile=args.jit, progress=True)
    with tempfile.TemporaryDirectory(prefix="gigaseg-bench-predict-", dir=args.out_dir) as out:
        start, cpu_start = time.perf_counter(), time.process_time()
        summary = predict_slide(model, args.slide, out, options)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        mask_mb = (Path(out) / "mask.tiff").stat().st_size / 2**20
    return {
        "slide": Path(args.slide).name,
        "width": summary["width"],
        "height": summary["height"],
        "mpx": round(summary["mpx"], 1),
        "seconds": round(seconds, 1),
        "mpx_per_s": round(summary["mpx"] / seconds, 2),
        "predict_seconds": round(summary["predict_seconds"], 1),
        # CPU time of all threads: Mpx per CPU-second barely depends on what else the machine runs.
        "cpu_seconds": round(cpu_seconds, 1),
        "mpx_per_cpu_s": round(summary["mpx"] / cpu_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "tile_size": args.tile_size,
        "readers": args.readers,
        "workers": args.workers,
        "jit": args.jit,
        "kind": args.kind,
        "tissue_fraction": round(summary["tissue_fraction"], 4),
        "pieces": summary["pieces"],
        "mask_mb": round(mask_mb, 1),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=16000)
    parser.add_argument("--width", type=int, default=64000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="predict a slide this many times larger in each dimension")
    parser.add_argument("--slide", help="predict this slide instead of a synthetic one")
    parser.add_argument("--tile-size", type=int, default=1536)
    parser.add_argument("--readers", type=int, default=1)
    parser.add_argument("--workers", type=int, default=3, help="tiles computed at once (PredictOptions.workers)")
    parser.add_argument("--kind", choices=("probability", "binary"), default="probability")
    parser.add_argument("--jit", action="store_true", help="XLA-compile the per-tile forward graph")
    parser.add_argument("--out-dir", default=None, help="where the outputs are written (and deleted); default: $TMPDIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object (always on; kept for scripts)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    slide = Path(args.slide) if args.slide else base_slide(args.height, args.width, args.seed)
    if args.repeat > 1:
        slide = repeated_slide(slide, args.repeat)
    forwarded = list(argv if argv is not None else sys.argv[1:])
    return run_in_child(__file__, [*forwarded, "--worker", "--slide", str(slide)])


if __name__ == "__main__":
    run_main(main)
