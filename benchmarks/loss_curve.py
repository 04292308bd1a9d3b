"""Train the same region plain and tiled with the same seed and compare the loss curves.

Prints one JSON object: per-step losses of both runs, the largest relative difference,
and the median step time of each. Example (the demo's training region):

    python benchmarks/loss_curve.py --region data/demo/train --steps 20 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", type=Path, default=Path("data/demo/train"), help="a prepared region folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", default="dice", choices=("dice", "bce", "dice_bce"))
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()

    from gigaseg.data import load_region
    from gigaseg.training import TrainConfig, train

    region = load_region(args.region)
    runs = {}
    for name, tiling in (("plain", dict(tiled="never")), ("tiled", dict(tiled="always", tile_size=args.tile_size))):
        config = TrainConfig(
            steps=args.steps, lr=args.lr, loss=args.loss, seed=0, val_every=10**9, checkpoint_every=10**9,
            progress=not args.json, memory_fraction=0.9, **tiling,
        )
        with tempfile.TemporaryDirectory() as tmp:
            result = train({}, region.image, region.mask, None, None, config, checkpoint_dir=Path(tmp))
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
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
