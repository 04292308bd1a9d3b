"""The console commands end to end: prepare, train with MLflow tracking, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import command_env


def _command(name: str, *overrides: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / name
    cmd = [str(exe) if exe.exists() else name, *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture
def workspace(tmp_path):
    env = command_env(tmp_path / "mlflow.db")
    common = [f"paths.data_dir={tmp_path}/data", f"hydra.run.dir={tmp_path}/out"]
    return tmp_path, env, common


@pytest.mark.slow
def test_smoke_prepare_and_train_log_everything(workspace):
    import mlflow
    import mlflow.pyfunc
    import mlflow.tensorflow
    from mlflow.tracking import MlflowClient

    from gigaseg.checkpoint import load_checkpoint
    from gigaseg.data import load_region
    from gigaseg.model import build_unet

    tmp_path, env, common = workspace
    prepared = _command("gigaseg-prepare", "debug=smoke", *common, env=env, cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    trained = _command("gigaseg-train", "debug=smoke", "train.lr=0.02", *common, env=env, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("gigaseg").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    params, tags = run.data.params, run.data.tags
    assert params["model.kernels"] == "[7, 9, 9]"
    assert params["train.lr"] == "0.02"
    assert "train.lr=0.02" in params["overrides"]
    assert len(tags["gigaseg.git_commit"]) == 40
    assert json.loads(tags["gigaseg.train_manifest"])["region"]["width"] == 1024
    for key in ("loss", "dice", "step_time_s", "data_time_s", "peak_rss_mb", "mpx_per_s", "tiles"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")] == [3]
    # The demo cohort: four training slides, two held-out validation slides, a metric for each.
    assert (tags["gigaseg.train_slides"], tags["gigaseg.val_slides"]) == ("4", "2")
    for slide in ("s4", "s5"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"val_dice/{slide}/whole")] == [3]
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    assert dataset.name == "demo" and len(dataset.digest) >= 16 and "prepared" in dataset.source
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "checkpoints", "data"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/curves.png", "plots/val_overlay.png"}

    # The logged model reloads through both flavours and predicts what the final weights predict.
    model_uri = tags["gigaseg.model_uri"]
    val = load_region(tmp_path / "data" / "smoke" / "demo" / "prepared" / "s4" / "whole")
    x = np.asarray(val.image)[np.newaxis]
    checkpoint = load_checkpoint(Path(client.download_artifacts(run.info.run_id, "checkpoints/last.npz", str(tmp_path))))
    reference = build_unet()
    reference.set_weights(checkpoint.weights)
    expected = np.asarray(reference(x))
    np.testing.assert_allclose(np.asarray(mlflow.tensorflow.load_model(model_uri)(x)), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mlflow.pyfunc.load_model(model_uri).predict(x)), expected, atol=1e-6)


@pytest.mark.slow
def test_smoke_runs_of_other_layouts_record_the_same_fast_evaluator(workspace):
    from mlflow.tracking import MlflowClient

    tmp_path, env, common = workspace
    prepared = _command("gigaseg-prepare", "debug=smoke", *common, env=env, cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    layouts = [[], ["model.filters=[8,8,8]", "model.decoder_filters=[8,8,8]"], ["model.kernels=[5,7,7]"]]
    for layout in layouts:
        trained = _command("gigaseg-train", "debug=smoke", "train.steps=1", "train.log_model=false", *layout, *common,
                           env=env, cwd=tmp_path)
        assert trained.returncode == 0, trained.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("gigaseg").experiment_id])
    assert len(runs) == len(layouts)
    assert {run.data.params["model.kernels"] for run in runs} == {"[7, 9, 9]", "[5, 7, 7]"}
    for run in runs:
        assert run.data.tags["gigaseg.evaluator"] == "fused", run.data.tags.get("gigaseg.evaluator_reason")
        assert run.data.tags["gigaseg.evaluator_reason"].startswith("fused (")


@pytest.mark.slow
def test_train_prepares_missing_regions_first(workspace):
    tmp_path, env, common = workspace
    result = _command("gigaseg-train", "debug=smoke", "train.steps=1", *common, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr  # Hydra's log handler writes to stdout
    assert "not prepared in" in said and "preparing them now" in said
    from gigaseg.data.cohort import read_index

    prepared = tmp_path / "data" / "smoke" / "demo" / "prepared"
    entries = read_index(prepared)
    assert {e["split"] for e in entries} == {"train", "val"}
    assert all((prepared / e["dir"] / "manifest.json").is_file() for e in entries)
    # TensorFlow's start-up lines are dropped unless verbose=true.
    assert "oneDNN" not in said and "cuda" not in said.lower()


def test_train_whose_regions_cannot_be_prepared_prints_one_line(workspace):
    tmp_path, env, common = workspace
    result = _command("gigaseg-train", "data=slide", f"data.slide.path={tmp_path}/missing.svs", *common,
                      env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.svs" in errors[0], result.stderr[-3000:]


def test_unknown_config_option_is_refused(workspace):
    tmp_path, env, common = workspace
    result = _command("gigaseg-train", "model=nonexistent", *common, env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "nonexistent" in result.stderr
