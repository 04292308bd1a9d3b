"""CPU time of the tile engine's per-window graphs (pass 1 sums, pass 2 gradients, forward only) and where it goes; prints one JSON object.

Each pass runs on one random window of ``tile + 2 * halo`` pixels (random pixels, random 0/1
mask core) of the default ``gigaunet``, ``--rounds`` rounds of ``--repeat`` calls after two
warm-up calls, and reports the median CPU milliseconds per call (``time.process_time``, all
of TensorFlow's threads included) and per core megapixel. ``--tile-size`` takes several
sizes for a sweep (the sum of both passes per core Mpx is what picks a tile size).
``--profile`` adds, for the first tile size, the share of each kind of TensorFlow op in each
pass from ``tf.profiler`` (run it with ``--threads 1`` so op times add up to CPU time; that
also gives the fused kernels one thread). ``--no-fused`` measures the TensorFlow evaluation
of the full-resolution layers instead.
Example:

    python benchmarks/tile_passes.py --tile-size 512 1024 1536 2048 --json
    python benchmarks/tile_passes.py --tile-size 1024 --threads 1 --profile --json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time

from _worker import run_main  # benchmarks/_worker.py, beside this script

HALO = 64


def _op_kind(name: str) -> str | None:
    """The group of a profiled TensorFlow op, by its ``name:type``; None for executor bookkeeping."""
    if ":" not in name or "::" in name:  # e.g. ExecutorState::Process, which contains the ops
        return None
    op_name, op_type = name.rsplit(":", 1)
    backward = op_name.startswith("gradient_tape")
    if op_type == "PyFuncStateless":  # the fused numba kernels (gigaseg.streaming.fused*), wall time
        return "fused kernels"
    if op_type == "MatMul":
        return "matrix-product gradients" if backward else "forward matrix products"
    if op_type in ("Conv2D", "_FusedConv2D") and not backward:
        return "convolutions"
    return "other gradient ops" if backward else "other ops"


def _profile(call, repeat: int) -> dict[str, float]:
    """Milliseconds per call of each op kind, from a ``tf.profiler`` trace of ``repeat`` calls."""
    import glob

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="gigaseg-profile-")
    tf.profiler.experimental.start(logdir)
    for _ in range(repeat):
        call()
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1], "rb") as f:
        space.ParseFromString(f.read())
    kinds: collections.Counter = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                kind = _op_kind(plane.event_metadata[event.metadata_id].name)
                if kind is not None:
                    kinds[kind] += event.duration_ps / 1e9 / repeat
    return {kind: round(ms, 2) for kind, ms in kinds.most_common()}


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    from gigaseg.model import build_unet
    from gigaseg.streaming import Tile, TiledEngine
    from gigaseg.streaming.evaluators import SurrogateWeights

    keras.utils.set_random_seed(0)
    model = build_unet()
    engine = TiledEngine(model, loss=args.loss, evaluator="lowered" if args.no_fused else "auto", threads=args.threads or None)
    rng = np.random.default_rng(0)
    weights = SurrogateWeights(1e-9, -1e-9, 1e-9 if args.loss != "dice" else 0.0)
    sizes = {}
    profile = {}
    for tile in args.tile_size:
        window = rng.integers(0, 256, (tile + 2 * HALO, tile + 2 * HALO, 3), dtype=np.uint8)
        mask = (rng.random((tile, tile)) > 0.5).astype(np.uint8)
        reader = engine.window_reader(window, np.pad(mask, HALO))
        pixels, labels = reader.read((0, 0, tile + 2 * HALO, tile + 2 * HALO), (HALO, HALO, tile + HALO, tile + HALO))
        piece = Tile(0, 0, 0, core=(HALO, HALO, tile + HALO, tile + HALO), window=(0, 0, tile + 2 * HALO, tile + 2 * HALO))
        calls = {
            "pass1_sums": lambda: engine.tile_sums(pixels, labels, piece),
            "pass2_gradients": lambda: engine.tile_gradients(pixels, labels, piece, weights),
            "forward_only": lambda: engine.core_probabilities(pixels, piece),
        }
        per_call = {}
        for name, call in calls.items():
            call(), call()
            samples = []
            for _ in range(args.rounds):
                start = time.process_time()
                for _ in range(args.repeat):
                    call()
                samples.append((time.process_time() - start) / args.repeat * 1e3)
            per_call[name] = round(statistics.median(samples), 2)
        core_mpx = tile * tile / 1e6
        sizes[str(tile)] = {
            "window": tile + 2 * HALO,
            "cpu_ms": per_call,
            "cpu_s_per_core_mpx_both_passes": round((per_call["pass1_sums"] + per_call["pass2_gradients"]) / 1e3 / core_mpx, 4),
        }
        if args.profile and not profile:
            profile = {name: _profile(call, args.repeat) for name, call in calls.items() }
    return {"loss": args.loss, "halo": HALO, "threads": args.threads or "default", "evaluator": engine.evaluator.name,
            "tiles": sizes, **({"profile_ms": profile} if profile else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile-size", type=int, nargs="+", default=[1024], help="tile (core) sides, multiples of 64")
    parser.add_argument("--loss", choices=("dice", "bce", "dice_bce"), default="dice")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra/inter-op threads and the fused kernels' threads (0: default)")
    parser.add_argument("--no-fused", action="store_true", help="TensorFlow for the full-resolution layers too (TiledEngine(evaluator='lowered'))")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="add the share of each kind of op (tf.profiler)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (always on; kept for scripts)")
    args = parser.parse_args(argv)
    if any(t <= 0 or t % 64 for t in args.tile_size):
        from gigaseg.errors import ConfigError

        raise ConfigError(f"--tile-size must be positive multiples of 64 (the model's total stride), got {args.tile_size}")
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    run_main(main)
