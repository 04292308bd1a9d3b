"""``gigaseg-evaluate`` end to end: files written, metrics and artifacts in a real MLflow store, one-line errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluation_inputs import write_prediction

from conftest import command_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path):
    env = command_env(tmp_path / "mlflow.db")
    common = [f"hydra.run.dir={tmp_path}/out", f"mlflow.artifact_location={tmp_path}/artifacts"]
    return tmp_path, env, common


def evaluate(*overrides: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gigaseg.cli.evaluate", *overrides]
    return subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def masks(tmp_path):
    """A probability prediction (with the predict run's summary.json beside it) and a PNG reference."""
    prob = np.zeros((64, 96))
    prob[8:40, 10:60] = 0.9
    prob[50:60, 80:90] = 0.6  # a false-positive blob
    ref = np.zeros((64, 96), np.uint8)
    ref[12:44, 10:60] = 1
    folder = tmp_path / "predicted slide"  # a space in the path on purpose
    folder.mkdir()
    pred = write_prediction(folder / "mask.tiff", np.rint(prob * 255).astype(np.uint8), downsample=2.0, mpp=1.0)
    (folder / "summary.json").write_text(json.dumps({"mlflow_run_id": "0123456789abcdef"}))
    ref_path = tmp_path / "reference.png"
    Image.fromarray(ref * 255).save(ref_path)
    return pred, ref_path, prob, ref


def test_run_from_the_composed_config(tmp_path, masks, monkeypatch):
    """The app's body in process, on the real composed config (no MLflow): both files written."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from gigaseg.cli.evaluate import run

    pred, ref_path, prob, ref = masks
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="gigaseg.conf", version_base="1.3"):
            cfg = compose("evaluate", overrides=[
                f"prediction={pred}", f"reference={ref_path}", f"output_dir={tmp_path}/eval", "log_mlflow=false",
                "threshold=0.7",
            ])
    finally:
        GlobalHydra.instance().clear()
    report = run(cfg)
    # At 0.7 the 0.6 blob is background, so it is no longer a predicted piece.
    tp = int(((prob >= 0.7) & (ref > 0)).sum())
    assert report["overall"]["true_positive"] == tp and report["overall"]["predicted"] == 1600
    assert report["inputs"]["prediction"]["cut"] == 179
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "eval" / "pieces.csv").read_text().count("\n") == 1 + len(report["pieces"]) == 2
    assert not (tmp_path / "mlflow.db").exists()  # log_mlflow=false: no store touched


def test_beside_prediction_writes_into_the_predictions_folder_with_absolute_paths(tmp_path, masks, monkeypatch):
    """What gigaseg-view reads: evaluation.json beside summary.json, naming both masks by absolute path."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from gigaseg.cli.evaluate import run
    from gigaseg.errors import ConfigError

    pred, ref_path, _, _ = masks
    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="gigaseg.conf", version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"prediction={pred.parent.name}", f"reference={ref_path.name}",
                                                 "beside_prediction=true", "log_mlflow=false"])
            both = compose("evaluate", overrides=[f"prediction={pred}", f"reference={ref_path}", "log_mlflow=false",
                                                  "beside_prediction=true", f"output_dir={tmp_path}/eval"])
    finally:
        GlobalHydra.instance().clear()
    report = run(cfg)
    written = json.loads((pred.parent / "evaluation.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["paths"] == {"prediction": str(pred.resolve()), "reference": str(ref_path.resolve())}
    assert (pred.parent / "pieces.csv").is_file()
    assert not [p.name for p in pred.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    with pytest.raises(ConfigError, match="not both"):
        run(both)


@pytest.mark.slow
def test_evaluate_writes_files_and_logs_to_mlflow(workspace, masks):
    from mlflow.tracking import MlflowClient

    tmp_path, env, common = workspace
    pred, ref_path, prob, ref = masks
    # The predict output folder stands for its mask.
    done = evaluate(f"prediction={pred.parent}", f"reference={ref_path}", *common, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    tp, p, r = int(((prob >= 0.5) & (ref > 0)).sum()), int((prob >= 0.5).sum()), int(ref.sum())
    dice = 2 * tp / (p + r)
    assert f"dice {dice:.4f}" in done.stdout

    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["overall"]["dice"] == pytest.approx(dice)
    assert report["overall"]["true_positive"] == tp
    assert report["inputs"]["prediction"]["downsample"] == 2.0
    assert len(report["pieces"]) == 2
    with open(tmp_path / "out" / "pieces.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["predicted_px"]) for row in rows] == [1600, 100]
    assert float(rows[1]["dice"]) == 0.0 and float(rows[1]["x0"]) == 160.0  # level-0 pixels

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("gigaseg").experiment_id])
    assert run.data.metrics["dice"] == pytest.approx(dice)
    assert run.data.metrics["recall"] == pytest.approx(tp / r)
    assert run.data.metrics["pieces"] == 2
    assert run.data.params["prediction"] == str(pred)
    assert run.data.params["reference_type"] == "mask"
    assert run.data.tags["gigaseg.prediction_run_id"] == "0123456789abcdef"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"evaluation.json", "pieces.csv"}


def test_bad_input_is_one_line_and_nonzero(workspace, masks):
    tmp_path, env, common = workspace
    pred, _, _, _ = masks
    done = evaluate(f"prediction={pred}", f"reference={tmp_path}/missing.png", *common, env=env, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: reference") and "does not exist" in lines[-1]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists() or "evaluation.json" not in os.listdir(tmp_path / "out")

    done = evaluate(f"reference={pred}", "log_mlflow=false", *common, env=env, cwd=tmp_path)
    assert done.returncode == 2 and "prediction=PATH reference=PATH" in done.stderr
    assert "Traceback" not in done.stderr
    done = evaluate(f"prediction={tmp_path}", f"reference={pred}", "log_mlflow=false", *common, env=env, cwd=tmp_path)
    assert done.returncode == 2 and "holds no predicted mask" in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_mlflow_project_entry_point(workspace, masks):
    """``mlflow run . -e evaluate`` passes paths with spaces through to the app."""
    import mlflow
    from mlflow.tracking import MlflowClient

    tmp_path, env, _ = workspace
    pred, ref_path, _, _ = masks
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    mlflow.create_experiment("gigaseg", artifact_location=str(tmp_path / "artifacts"))
    cmd = [
        sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "evaluate", "--env-manager", "local",
        "--experiment-name", "gigaseg", "-P", f"prediction={pred}", "-P", f"reference={ref_path}",
        "-P", f"overrides=hydra.run.dir={tmp_path}/out log_mlflow=true",
    ]
    done = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("gigaseg").experiment_id])
    assert run.info.status == "FINISHED"
    assert "dice" in run.data.metrics  # (MLflow itself logs the entry point's parameters, shell-quoted)
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["inputs"]["prediction"]["path"] == str(pred)
    assert report["inputs"]["reference"]["path"] == str(ref_path)
