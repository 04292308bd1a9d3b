"""Train the same region plain and tiled with the same seed and compare the loss curves.

Prints one JSON object: per-step losses of both runs, the largest relative difference,
and the median step time of each. With ``--float64`` a third run trains a float64 copy of
the model tiled (the engine's Keras path, float64 throughout, Adam on float64 weights): the
curve both float32 runs approximate, so each run's own drift from it is shown. Example (the
demo's training region):

    python benchmarks/loss_curve.py --region data/demo/train --steps 20 --float64 --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from _worker import run_main  # benchmarks/_worker.py, beside this script


def float64_curve(region, args) -> list[float]:
    """Losses of the same run in float64: a float64 copy of the seeded model, tiled on the Keras path."""
    from tqdm.auto import tqdm

    from gigaseg.model import build_unet
    from gigaseg.streaming import TiledEngine
    from gigaseg.streaming.reference import float64_copy
    from gigaseg.training import TrainConfig, build_optimizer, learning_rate, seed_everything

    config = TrainConfig(steps=args.steps, lr=args.lr, loss=args.loss, lr_schedule=args.lr_schedule,
                         warmup_steps=args.warmup_steps)
    seed_everything(0)
    model = float64_copy(build_unet())
    optimizer = build_optimizer(config.optimizer, learning_rate(config))
    optimizer.build(model.trainable_variables)
    engine = TiledEngine(model, loss=args.loss, tile_size=args.tile_size, evaluator="keras")
    losses = []
    for _ in tqdm(range(args.steps), desc="float64", disable=args.json):
        result = engine.step(region.image, region.mask)
        optimizer.apply_gradients(zip(result.gradients, model.trainable_variables))
        losses.append(result.loss)
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", type=Path, default=Path("data/demo/train"), help="a prepared region folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", default="dice", choices=("dice", "bce", "dice_bce"))
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--float64", action="store_true", help="also train a float64 copy tiled, as the reference curve")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()

    from gigaseg.data import load_region
    from gigaseg.training import TrainConfig, TrainRegion, train

    region = load_region(args.region)
    runs = {}
    for name, tiling in (("plain", dict(tiled="never")), ("tiled", dict(tiled="always", tile_size=args.tile_size))):
        config = TrainConfig(
            steps=args.steps, lr=args.lr, loss=args.loss, seed=0, val_every=10**9, checkpoint_every=10**9,
            progress=not args.json, memory_fraction=0.9, lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps, **tiling,
        )
        with tempfile.TemporaryDirectory() as tmp:
            result = train({}, [TrainRegion("train", region.image, region.mask)], [], config, checkpoint_dir=Path(tmp))
        runs[name] = result.history
    plain = np.array([h["loss"] for h in runs["plain"]])
    tiled = np.array([h["loss"] for h in runs["tiled"]])
    out = {
        "region": str(args.region),
        "height": int(region.image.shape[0]),
        "width": int(region.image.shape[1]),
        "loss": args.loss,
        "steps": args.steps,
        "tile_size": args.tile_size,
        "plain_losses": plain.tolist(),
        "tiled_losses": tiled.tolist(),
        "max_relative_difference": float(np.max(np.abs(tiled - plain) / np.abs(plain))),
        "plain_step_time_s": float(np.median([h["step_time_s"] for h in runs["plain"][1:]])),
        "tiled_step_time_s": float(np.median([h["step_time_s"] for h in runs["tiled"][1:]])),
        "plain_peak_rss_mb": float(max(h["peak_rss_mb"] for h in runs["plain"])),
        "tiled_peak_rss_mb": float(max(h["peak_rss_mb"] for h in runs["tiled"])),
    }
    if args.float64:
        reference = np.array(float64_curve(region, args))
        out["float64_losses"] = reference.tolist()
        for name, curve in (("plain", plain), ("tiled", tiled)):
            out[f"{name}_vs_float64_max_relative_difference"] = float(np.max(np.abs(curve - reference) / np.abs(reference)))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_main(main)
