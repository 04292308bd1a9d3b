"""``gigaseg-evaluate``: compare a predicted tissue mask with a reference, write the scores and log them to MLflow."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gigaseg.cli.common import CONFIG_PATH, run_hydra, start, to_plain, user_errors
from gigaseg.cli.schema import EvaluateAppSchema
from gigaseg.errors import ConfigError, MaskError

log = logging.getLogger("gigaseg.evaluate")


def prediction_run_id(prediction: Path) -> str | None:
    """The MLflow run named by the ``summary.json`` that gigaseg-predict writes beside its mask."""
    summary = prediction.parent / "summary.json"
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    run_id = data.get("mlflow_run_id") if isinstance(data, dict) else None
    return str(run_id) if run_id else None


def prediction_file(path: Path) -> Path:
    """The mask itself, also when ``path`` is the folder gigaseg-predict wrote (its summary.json names the mask)."""
    if not path.is_dir():
        return path
    try:
        files = json.loads((path / "summary.json").read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError, AttributeError):
        files = {}
    name = str(files.get("mask") or "mask.tiff")
    if Path(name).name != name or name in (".", ".."):
        raise MaskError(f"{path / 'summary.json'} names the mask {name!r}, which is not a file in that folder; "
                        "give the mask file itself")
    mask = path / name
    if not mask.is_file():
        raise MaskError(f"prediction folder {path} holds no predicted mask ({mask.name}); give the mask file itself")
    return mask


def pieces_csv(pieces: list[dict[str, Any]]) -> str:
    """The per-piece table as CSV text (a header only when there are no pieces)."""
    columns = ["id", "x0", "y0", "x1", "y1", "reference_px", "predicted_px", "true_positive_px",
               "reference_mm2", "predicted_mm2", "dice", "iou", "precision", "recall"]
    present = [c for c in columns if not pieces or c in pieces[0]]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=present, lineterminator="\n")
    writer.writeheader()
    writer.writerows(pieces)
    return out.getvalue()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as the composed config says; returns what evaluation.json holds."""
    from gigaseg.atomic import atomic_path
    from gigaseg.evaluation_inputs import REFERENCE_TYPES, evaluate_files
    from gigaseg.tracking import MlflowRun, check_tracking_store, flatten_config, git_state

    plain = to_plain(cfg)
    if not plain.get("prediction") or not plain.get("reference"):
        raise ConfigError("give both masks: gigaseg-evaluate prediction=PATH reference=PATH")
    if plain.get("reference_type", "auto") not in REFERENCE_TYPES:
        raise ConfigError(f"reference_type={plain['reference_type']!r}: choose one of {', '.join(REFERENCE_TYPES)}")
    threshold = plain.get("threshold")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise ConfigError(f"threshold={threshold!r}: give a probability between 0 and 1, or null")
    classes = plain.get("classes")
    if isinstance(classes, str):
        classes = [classes]
    if plain.get("log_mlflow", True):
        check_tracking_store(plain["mlflow"]["tracking_uri"])  # an unreachable store fails now, not after the work
    prediction, reference = prediction_file(Path(plain["prediction"])), Path(plain["reference"])
    if plain.get("beside_prediction"):
        if plain.get("output_dir"):
            raise ConfigError("give output_dir=... or beside_prediction=true, not both: beside_prediction writes "
                              "into the prediction's folder")
        output_dir = prediction.parent
    else:
        output_dir = Path(plain.get("output_dir") or HydraConfig.get().runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    evaluation, inputs = evaluate_files(
        prediction, reference, reference_type=plain.get("reference_type", "auto"), threshold=threshold,
        classes=classes, max_piece_pixels=int(plain.get("max_piece_pixels", 2**24)), progress=True,
    )
    # Absolute paths too, so that a reader of the file elsewhere (gigaseg-view) finds both masks.
    paths = {"prediction": str(prediction.resolve()), "reference": str(reference.resolve())}
    report = {"inputs": inputs, "paths": paths, **evaluation.to_dict()}
    json_path, csv_path = output_dir / "evaluation.json", output_dir / "pieces.csv"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    with atomic_path(csv_path) as tmp:
        tmp.write_text(pieces_csv(report["pieces"]), encoding="utf-8")
    scores = evaluation.scores()
    print(
        f"dice {scores['dice']:.4f}  iou {scores['iou']:.4f}  precision {scores['precision']:.4f}  "
        f"recall {scores['recall']:.4f}  pieces {len(evaluation.pieces)}  -> {json_path}"
    )

    if plain.get("log_mlflow", True):
        mlflow_cfg = plain["mlflow"]
        params = flatten_config({
            "prediction": str(prediction), "reference": str(reference),
            "reference_type": inputs["reference"]["kind"], "threshold": inputs["prediction"]["threshold"],
            "classes": classes, "piece_block": evaluation.piece_block,
        })
        tags = {"gigaseg.command": "evaluate", **git_state()}
        run_id = prediction_run_id(prediction)
        if run_id:
            tags["gigaseg.prediction_run_id"] = run_id
        with MlflowRun(
            mlflow_cfg["tracking_uri"], mlflow_cfg["experiment_name"], run_name=mlflow_cfg.get("run_name"),
            params=params, tags=tags, log_system_metrics=bool(mlflow_cfg.get("log_system_metrics")),
            artifact_location=mlflow_cfg.get("artifact_location"),
        ) as tracked:
            tracked.log_metrics({**scores, "pieces": len(evaluation.pieces)}, step=0)
            tracked.log_artifact(json_path)
            tracked.log_artifact(csv_path)
            log.info("MLflow run %s in %s", tracked.run_id, mlflow_cfg["tracking_uri"])
    return report


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> None:
    start(cfg, EvaluateAppSchema)
    with user_errors():
        run(cfg)


def main() -> None:
    """Console entry point: Hydra composes the config; a config it cannot compose is one line ``error: ...``."""
    run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
