"""Compare training recipes on (a crop of) a prepared region: validation Dice along the run.

Trains with ``gigaseg.training.train`` exactly as ``gigaseg-train`` does (tiled steps, one
optimizer step per region) and prints one JSON object: the config, per-step losses, the
validation Dice every ``--val-every`` steps and the median step time. Example (the crop
used for the recipe table in the README):

    python benchmarks/train_recipe.py --rows 2048:4096 --json \
        --set '{"loss": "dice_bce", "lr": 0.01, "warmup_steps": 3}' --model '{"input_range": [-6, 1]}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _worker import run_main  # benchmarks/_worker.py, beside this script


def span(text: str | None, size: int) -> slice:
    if not text:
        return slice(0, size)
    start, stop = (int(v) for v in text.split(":"))
    return slice(start, stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=Path("data/demo/train"), help="prepared training region folder")
    parser.add_argument("--val", type=Path, default=Path("data/demo/val"), help="prepared validation region folder")
    parser.add_argument("--rows", help="crop of the training region, START:STOP (multiples of 64)")
    parser.add_argument("--cols", help="crop of the training region, START:STOP (multiples of 64)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--set", default="{}", help="TrainConfig fields as JSON, e.g. '{\"loss\": \"dice\"}'")
    parser.add_argument("--model", default="{}", help="build_unet arguments as JSON, e.g. '{\"input_range\": [-1, 1]}'")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args()

    from gigaseg.data import load_region
    from gigaseg.training import TrainConfig, TrainRegion, train

    region, val = load_region(args.train), load_region(args.val)
    rows, cols = span(args.rows, region.image.shape[0]), span(args.cols, region.image.shape[1])
    fields = json.loads(args.set)
    model_kwargs = json.loads(args.model)
    config = TrainConfig(steps=args.steps, val_every=args.val_every, checkpoint_every=10**9,
                         progress=not args.json, **fields)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(model_kwargs, [TrainRegion("train", region.image[rows, cols], region.mask[rows, cols])], [TrainRegion("val", val.image, val.mask)], config,
                       checkpoint_dir=Path(tmp))
    history = result.history
    print(json.dumps({
        "train": str(args.train), "rows": [rows.start, rows.stop], "cols": [cols.start, cols.stop],
        "config": {"steps": args.steps, **fields}, "model": model_kwargs,
        "losses": [round(h["loss"], 5) for h in history],
        "val_dice": {h["step"]: round(h["val_dice"], 4) for h in history if "val_dice" in h},
        "median_step_time_s": float(np.median([h["step_time_s"] for h in history])),
        "minutes": round((time.perf_counter() - start) / 60, 2),
    }))
    return 0


if __name__ == "__main__":
    run_main(main)
