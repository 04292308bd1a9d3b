"""Step time of the tiled training step on one process vs its tiles spread over N local workers; prints one JSON object.

Every configuration runs in fresh processes: ``--workers 1`` is a plain single-process
:class:`TiledEngine`; ``--workers N`` starts N processes on 127.0.0.1 with their own
``TF_CONFIG`` (``MultiWorkerMirroredStrategy``), each holding ``cores / N`` TensorFlow threads,
and reports the chief's figures. The region is the synthetic one of ``train_step.py``. Example:

    python benchmarks/distributed_step.py --height 2048 --width 8192 --workers 1 2 --tile-size 1024 --json

On one machine this measures the overhead of the collectives and of splitting the cores, not
a speed-up: N workers share the same cores. Across hosts each worker brings its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _worker import peak_rss_mb, run_main  # benchmarks/_worker.py, beside this script
from train_step import write_region


def run_worker(args: argparse.Namespace) -> dict:
    from gigaseg.distributed import DistributedConfig, make_replicas
    from gigaseg.streaming import DistributedEngine

    replicas = make_replicas(DistributedConfig(kind="multiworker" if args.workers > 1 else "none"))
    import keras

    from gigaseg.model import build_unet
    from gigaseg.streaming import TiledEngine

    keras.utils.set_random_seed(0)
    model = build_unet()
    image = np.load(args.image, mmap_mode="r")
    mask = np.load(args.mask, mmap_mode="r")
    if replicas is None:
        engine = TiledEngine(model, loss=args.loss, tile_size=args.tile_size)
    else:
        engine = DistributedEngine(model, replicas, loss=args.loss, tile_size=args.tile_size)
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        result = engine.step(image, mask)
        times.append(time.perf_counter() - start)
        losses.append(result.loss)
    mpx = image.shape[0] * image.shape[1] / 1e6
    steady = times[1:] or times
    return {
        "height": int(image.shape[0]), "width": int(image.shape[1]), "loss_name": args.loss,
        "workers": args.workers, "tile_size": args.tile_size, "tiles": result.tiles,
        "step_times_s": [round(t, 3) for t in times], "median_step_s": float(np.median(steady)),
        "mpx_per_s": mpx / float(np.median(steady)), "losses": losses, "peak_rss_mb": peak_rss_mb(),
        "threads_per_worker": os.environ.get("TF_NUM_INTRAOP_THREADS", "all"),
    }


def measure(args: argparse.Namespace, workers: int, image: Path, mask: Path) -> dict:
    """Run ``workers`` worker processes of this script; return the chief's JSON."""
    from gigaseg.cli.workers import free_ports

    base = [sys.executable, __file__, "--worker", "--image", str(image), "--mask", str(mask), "--loss", args.loss,
            "--steps", str(args.steps), "--tile-size", str(args.tile_size), "--workers", str(workers)]
    addresses = [f"127.0.0.1:{p}" for p in free_ports(workers)]
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    processes = []
    for index in range(workers):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        if workers > 1:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
            env["TF_NUM_INTRAOP_THREADS"] = threads
        processes.append(subprocess.Popen(base, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate()[0] for p in processes]
    codes = [p.returncode for p in processes]
    if any(codes):
        # 2: a worker has printed its one-line error already.
        raise SystemExit(2 if 2 in codes else f"a worker failed: exit codes {codes}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=2048)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--loss", default="dice_bce")
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration (the first is warm-up)")
    parser.add_argument("--region-dir", default=os.path.join(tempfile.gettempdir(), "gigaseg-bench-regions"))
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--mask", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.workers = args.workers[0]
        print(json.dumps(run_worker(args)))
        return 0
    image, mask = write_region(Path(args.region_dir), args.height, args.width)
    runs = {str(n): measure(args, n, image, mask) for n in args.workers}
    first = runs[str(args.workers[0])]
    summary = {
        "height": args.height, "width": args.width, "tile_size": args.tile_size, "loss": args.loss,
        "cpu_count": os.cpu_count(), "runs": runs,
        "time_ratio_vs_first": {n: r["median_step_s"] / first["median_step_s"] for n, r in runs.items()},
        "max_loss_rel_diff_vs_first": {
            n: max(abs(a - b) / abs(b) for a, b in zip(r["losses"], first["losses"])) for n, r in runs.items()
        },
    }
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    run_main(main)
