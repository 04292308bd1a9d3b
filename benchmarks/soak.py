"""Soak test: many training steps, then many whole-slide predictions, in one process, watching RSS for growth; prints one JSON object.

Phase 1 runs ``gigaseg.training.train`` (tiled engine, Adam updates, validation every
``--val-every`` steps, checkpoints every 50 steps, every step's metrics logged to a
throwaway SQLite MLflow store) on a small synthetic region. Phase 2 does what
``gigaseg-predict`` does per slide ``--predictions`` times: load the trained model from a
``.keras`` file, open an MLflow run, ``predict_slide`` (mask TIFF, outlines, overlay,
summary) and log its metrics and files. After every step and every prediction the script
samples the current RSS and the peak RSS (VmHWM) since the phase began. The goal: the peak
grows by no more than 10 % after warm-up (the first ``--warmup-steps`` steps /
``--warmup-predictions`` predictions). Example (several minutes on 2 cores):

    nice python benchmarks/soak.py --json 2> soak.log
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
from _worker import run_main  # benchmarks/_worker.py, beside this script

HERE = Path(__file__).resolve().parent
FIXTURE_SLIDE = HERE.parent / "tests" / "fixtures" / "prostate_he_pyramid.tiff"
GOAL_GROWTH = 1.10


def current_rss_mb() -> float:
    """Resident set of this process now, in MiB (VmRSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status")


class Samples:
    """RSS after each unit of work of one phase; the peak is the phase's high-water mark so far."""

    def __init__(self, name: str, warmup: int) -> None:
        self.name, self.warmup = name, warmup
        self.rss: list[float] = []
        self.peak: list[float] = []
        self.started = time.perf_counter()

    def sample(self, peak_since_reset: float) -> None:
        self.rss.append(current_rss_mb())
        # Training resets the kernel's high-water mark at every step, so keep the running maximum.
        self.peak.append(max(peak_since_reset, self.peak[-1] if self.peak else 0.0))

    def summary(self) -> dict:
        n = len(self.rss)
        w = min(self.warmup, n) - 1
        after = np.arange(w, n)
        # Least-squares slope of the current RSS after warm-up: a leak shows as a steady climb.
        slope = float(np.polyfit(after, np.array(self.rss)[after], 1)[0]) if len(after) > 2 else 0.0
        return {
            "count": n,
            "seconds": round(time.perf_counter() - self.started, 1),
            "warmup": w + 1,
            "rss_after_warmup_mb": round(self.rss[w], 1),
            "peak_after_warmup_mb": round(self.peak[w], 1),
            "rss_end_mb": round(self.rss[-1], 1),
            "peak_end_mb": round(self.peak[-1], 1),
            "peak_growth": round(self.peak[-1] / self.peak[w], 4),
            "rss_growth": round(self.rss[-1] / self.rss[w], 4),
            "rss_slope_mb_per_100": round(100 * slope, 2),
            # About twenty samples, to see the shape of the curve.
            "rss_trace_mb": [round(v, 1) for v in self.rss[::max(1, n // 20)]],
        }


class SamplingLogger:
    """A training logger that samples RSS after each step, then passes the metrics on (to MLflow, or nowhere)."""

    def __init__(self, samples: Samples, inner=None) -> None:
        self.samples, self.inner = samples, inner

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from gigaseg import sysinfo

        self.samples.sample(sysinfo.peak_rss_mb())
        if self.inner is not None:
            self.inner.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.inner is not None:
            self.inner.log_artifact(path, artifact_path)


def region(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A tissue-like uint8 region and its mask: smooth pink blobs on glass, with pixel noise."""
    rng = np.random.default_rng(seed)
    cell = 64
    coarse = rng.random((height // cell + 2, width // cell + 2))
    field = np.kron(coarse, np.ones((cell, cell)))
    # A box blur of one cell makes blobs rounder than the raw cells.
    kernel = np.ones(cell) / cell
    field = np.apply_along_axis(lambda r: np.convolve(r, kernel, "same"), 1, field)
    field = np.apply_along_axis(lambda c: np.convolve(c, kernel, "same"), 0, field)[cell : cell + height, cell : cell + width]
    mask = (field > np.median(field)).astype(np.uint8)
    tissue, glass = np.array([190, 120, 180]), np.array([235, 232, 236])
    colour = np.where(mask[..., None] == 1, tissue, glass) + rng.integers(-25, 26, (height, width, 3))
    return np.clip(colour, 0, 255).astype(np.uint8), mask


def train_phase(args, work: Path, tracking_uri: str | None) -> tuple[dict, object]:
    from gigaseg.tracking import MlflowRun
    from gigaseg.training import TrainConfig, TrainRegion, train

    image, mask = region(args.height, args.width, seed=0)
    val_image, val_mask = region(args.height, args.width, seed=1)
    config = TrainConfig(
        steps=args.steps, lr=0.01, warmup_steps=3, loss="dice_bce", val_every=args.val_every, checkpoint_every=50,
        tile_size=args.tile_size, progress=args.progress,
    )
    samples = Samples("train", args.warmup_steps)
    if tracking_uri is None:
        result = train({}, [TrainRegion("train", image, mask)], [TrainRegion("val", val_image, val_mask)], config, checkpoint_dir=work / "checkpoints",
                       logger=SamplingLogger(samples))
    else:
        with MlflowRun(tracking_uri, "soak", run_name="soak train") as run:
            result = train({}, [TrainRegion("train", image, mask)], [TrainRegion("val", val_image, val_mask)], config, checkpoint_dir=work / "checkpoints",
                           logger=SamplingLogger(samples, run))
    out = samples.summary()
    out.update(tiles_per_step=result.history[-1]["tiles"], tile_size=list(result.tile_size or ()),
               median_step_s=round(result.metrics["median_step_time_s"], 3),
               final_loss=round(result.metrics["loss"], 4), final_val_dice=round(result.metrics.get("val_dice", float("nan")), 4))
    return out, result.model


def predict_phase(args, work: Path, model, tracking_uri: str | None) -> dict:
    import shutil

    from gigaseg import sysinfo
    from gigaseg.atomic import atomic_path
    from gigaseg.inference import PredictOptions, load_model, predict_slide
    from gigaseg.tracking import MlflowRun

    model_file = work / "model.keras"
    with atomic_path(model_file, suffix=".keras") as tmp:
        model.save(tmp)
    options = PredictOptions(level=args.level, tile_size=args.predict_tile_size, progress=args.progress)
    samples = Samples("predict", args.warmup_predictions)
    sysinfo.reset_peak_rss()
    seconds = []
    for i in range(args.predictions):
        out = work / f"prediction-{i}"
        start = time.perf_counter()
        loaded = load_model(model_file)  # as gigaseg-predict does, once per slide
        if tracking_uri is None:
            summary = predict_slide(loaded.model, args.slide, out, options)
        else:
            with MlflowRun(tracking_uri, "soak", run_name=f"soak predict {i}") as run:
                summary = predict_slide(loaded.model, args.slide, out, options, extra_summary={"mlflow_run_id": run.run_id})
                run.log_metrics({k: summary[k] for k in ("seconds", "mpx", "mpx_per_s", "tissue_fraction", "pieces")}, step=0)
                for name in ("summary.json", "outlines.geojson", "overlay.png"):
                    run.log_artifact(out / name)
        del loaded
        shutil.rmtree(out)
        seconds.append(time.perf_counter() - start)
        samples.sample(sysinfo.peak_rss_mb())
        print(f"prediction {i + 1}/{args.predictions}: {seconds[-1]:.2f} s, rss {samples.rss[-1]:.0f} MiB, "
              f"peak {samples.peak[-1]:.0f} MiB", file=sys.stderr)
    out = samples.summary()
    out.update(slide=Path(args.slide).name, level=summary["level"], width=summary["width"], height=summary["height"],
               median_prediction_s=round(float(np.median(seconds)), 3))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (one optimizer update each)")
    parser.add_argument("--predictions", type=int, default=50, help="whole-slide predictions after training")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--warmup-predictions", type=int, default=5)
    parser.add_argument("--height", type=int, default=256, help="training (and validation) region height")
    parser.add_argument("--width", type=int, default=1024, help="training (and validation) region width")
    parser.add_argument("--tile-size", type=int, default=256, help="training tile side")
    parser.add_argument("--val-every", type=int, default=20, help="validate every this many steps")
    parser.add_argument("--slide", default=str(FIXTURE_SLIDE), help="slide to predict (default: the prostate fixture)")
    parser.add_argument("--level", type=int, default=1, help="slide level to predict (fixture level 1: 1250x1250)")
    parser.add_argument("--predict-tile-size", type=int, default=512)
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="log nothing to MLflow")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print one JSON object (always on; kept for scripts)")
    args = parser.parse_args(argv)
    if args.steps < args.warmup_steps or args.predictions < args.warmup_predictions:
        parser.error("--steps and --predictions must be at least their warm-up counts")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gigaseg-soak-") as tmp:
        work = Path(tmp)
        tracking_uri = f"sqlite:///{work / 'mlflow.db'}" if args.mlflow else None
        train_stats, model = train_phase(args, work, tracking_uri)
        predict_stats = predict_phase(args, work, model, tracking_uri)
    growth = max(train_stats["peak_growth"], predict_stats["peak_growth"])
    result = {
        "steps": args.steps,
        "predictions": args.predictions,
        "region": [args.height, args.width],
        "mlflow": args.mlflow,
        "wall_s": round(time.perf_counter() - start, 1),
        "train": train_stats,
        "predict": predict_stats,
        "peak_growth": growth,
        "goal_peak_growth_le_10pct": growth <= GOAL_GROWTH,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_main(main)
