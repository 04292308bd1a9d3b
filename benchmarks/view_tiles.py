"""Time and peak memory of the viewer serving Deep Zoom tiles of a 4-gigapixel slide and its predicted mask; prints one JSON object.

The slide is ``predict_slide.py``'s generated one (``--repeat 2``: 128000x32000), its mask
predicted once at level 0 by the untrained default ``gigaunet`` (seed 0, a probability mask)
and cached beside it under ``$TMPDIR/gigaseg-bench-slides/``. The viewer runs in a child
process (``peak_rss_mb`` is its VmHWM); this process asks it, over HTTP on the loopback,
for ``--tiles`` tiles drawn at random (a level uniformly over every Deep Zoom level, then a
tile of it), the slide's JPEG and the mask's PNG as two requests each, one after another,
and times each request (``first_requests``: those not asked for before, which the
viewer's cache cannot answer). Example:

    python benchmarks/view_tiles.py --json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _worker import peak_rss_mb, run_main  # benchmarks/_worker.py, beside this script
from predict_slide import base_slide, repeated_slide

from gigaseg.errors import ConfigError


def prediction_of(slide: Path) -> Path:
    """The cached prediction folder of ``slide`` (level 0, probability), predicted in a child process if missing."""
    folder = slide.with_name(f"{slide.stem}-prediction")
    if not (folder / "summary.json").is_file():
        print(f"predicting {slide} (once) into {folder}", file=sys.stderr)
        code = ("import sys, keras; from gigaseg.model import build_unet; "
                "from gigaseg.inference import PredictOptions, predict_slide; keras.utils.set_random_seed(0); "
                "predict_slide(build_unet(), sys.argv[1], sys.argv[2], PredictOptions(level=0, tile_size=1536, "
                "workers=3, progress=True))")
        subprocess.run([sys.executable, "-c", code, str(slide), str(folder)], check=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return folder


def run_server(args: argparse.Namespace) -> int:
    """The child: serve the prediction, print the URL, and on a line on stdin print the peak RSS."""
    from gigaseg.cli.view import open_viewer

    start = time.perf_counter()
    with open_viewer(args.prediction, None, port=0, cache_mb=args.cache_mb) as server:
        print(json.dumps({"url": server.url, "start_seconds": round(time.perf_counter() - start, 2)}), flush=True)
        sys.stdin.readline()
        cache = server.viewer.tiles.cache
        print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "cache_mb": round(cache.size / 2**20, 1),
                          "cache_hits": cache.hits}), flush=True)
    return 0


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
            "max_ms": round(ordered[-1], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=16000)
    parser.add_argument("--width", type=int, default=64000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2, help="the slide this many times larger in each dimension")
    parser.add_argument("--tiles", type=int, default=200, help="tiles asked for (each a slide and a mask request)")
    parser.add_argument("--draw-seed", type=int, default=0, help="seed of the random tiles")
    parser.add_argument("--cache-mb", type=int, default=128, help="the viewer's tile cache (cache_mb)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (always on; kept for scripts)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prediction", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return run_server(args)
    if args.tiles <= 0:
        raise ConfigError(f"--tiles {args.tiles}: give a positive number of tiles")

    slide = base_slide(args.height, args.width, args.seed)
    if args.repeat > 1:
        slide = repeated_slide(slide, args.repeat)
    folder = prediction_of(slide)
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--prediction", str(folder),
                              "--cache-mb", str(args.cache_mb)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(child.stdout.readline())
        host_port = started["url"].split("//")[1].rstrip("/")
        connection = http.client.HTTPConnection(host_port, timeout=60)

        asked: set[str] = set()
        first: list[float] = []

        def get(path: str) -> float:
            begin = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200 or not body:
                raise RuntimeError(f"{path}: HTTP {response.status}")
            ms = (time.perf_counter() - begin) * 1e3
            if path not in asked:  # the coarse levels have few tiles: many draws ask again, from the cache
                asked.add(path)
                first.append(ms)
            return ms

        info_ms = get("/api/slide/0.json")
        first.clear()
        connection.request("GET", "/api/slide/0.json")
        info = json.loads(connection.getresponse().read())
        layers = info["layers"]
        from gigaseg.slides.deepzoom import DeepZoomGrid

        grids = {name: DeepZoomGrid(layers[name]["width"], layers[name]["height"]) for name in ("slide", "mask")}
        draw = random.Random(args.draw_seed)
        times: dict[str, list[float]] = {"slide": [], "mask": []}
        started_at = time.time()
        for _ in range(args.tiles):
            level = draw.randrange(grids["slide"].level_count)
            cols, rows = grids["slide"].tile_count(level)
            col, row = draw.randrange(cols), draw.randrange(rows)
            times["slide"].append(get(f"/dz/0/slide_files/{level}/{col}_{row}.jpeg"))
            # The mask's own grid (level 0: the same as the slide's); its tile at the same place.
            grid = grids["mask"]
            mask_level = level - (grids["slide"].max_level - grid.max_level)
            if mask_level >= 0:
                mcols, mrows = grid.tile_count(mask_level)
                times["mask"].append(get(f"/dz/0/mask_files/{mask_level}/{min(col, mcols - 1)}_{min(row, mrows - 1)}.png"))
        seconds = time.time() - started_at
        connection.close()
        child.stdin.write("done\n")
        child.stdin.flush()
        ended = json.loads(child.stdout.readline())
    finally:
        if child.poll() is None:
            child.stdin.close()
            child.wait(timeout=60)
    every = times["slide"] + times["mask"]
    print(json.dumps({
        "slide": slide.name,
        "width": info["width"],
        "height": info["height"],
        "mpx": round(info["width"] * info["height"] / 1e6, 1),
        "deep_zoom_levels": grids["slide"].level_count,
        "tiles": args.tiles,
        "requests": len(every),
        "per_request": _ms(every),
        "slide_tiles": _ms(times["slide"]),
        "mask_tiles": _ms(times["mask"]),
        "first_requests": {"count": len(first), **_ms(first)},
        "seconds": round(seconds, 2),
        "server_start_seconds": started["start_seconds"],
        "first_info_ms": round(info_ms, 1),
        "peak_rss_mb": ended["peak_rss_mb"],
        "cache_mb": ended["cache_mb"],
        "cache_limit_mb": args.cache_mb,
        "cache_hits": ended["cache_hits"],
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }))
    return 0


if __name__ == "__main__":
    run_main(main)
