"""The MLflow model registry and exported models: ``gigaseg-train mlflow.register_as=NAME`` registers the
run's model with an alias, ``gigaseg-predict`` reads ``models:/NAME@ALIAS``, ``gigaseg-export`` writes a
``.keras`` file that predicts the same. Real SQLite stores, real Hydra commands, real TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
from mlflow.tracking import MlflowClient

from conftest import command_env

from gigaseg.errors import ConfigError
from gigaseg.tracking import TrackingError, check_registration, registered_version


def _command(name: str, *args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / name
    cmd = [str(exe) if exe.exists() else name, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a command that failed on bad input (status 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_registration_names_and_aliases_are_checked_before_training():
    check_registration("tissue", "champion")
    check_registration("tissue model", "challenger-2")
    for name in ("", "a/b", "models:x", "x@y"):
        with pytest.raises(ConfigError, match="mlflow.register_as="):
            check_registration(name, "champion")
    for alias in ("latest", "v3", "V12", "two words", "a/b", ""):
        with pytest.raises(ConfigError, match="mlflow.alias="):
            check_registration("tissue", alias)


@pytest.mark.slow  # creating an SQLite store takes seconds
def test_registered_version_names_what_the_registry_holds(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("tissue")
    for _ in range(2):
        client.create_model_version("tissue", source=str(tmp_path / "model"))
    client.set_registered_model_alias("tissue", "champion", "2")
    assert registered_version(uri, "tissue", alias="champion") == "2"
    assert registered_version(uri, "tissue", version="1") == "1"
    with pytest.raises(TrackingError, match=r"has no alias 'best' \(its aliases: champion \(version 2\)\)"):
        registered_version(uri, "tissue", alias="best")
    with pytest.raises(TrackingError, match=r"has no version 7 \(its versions: 1, 2\)"):
        registered_version(uri, "tissue", version="7")
    with pytest.raises(TrackingError, match=r"no registered model 'tisue' .*\(it holds tissue\); .*register_as=tisue"):
        registered_version(uri, "tisue", alias="champion")


@pytest.mark.slow
def test_a_second_registration_moves_the_alias_and_tags_each_run(tmp_path):
    import keras

    from gigaseg.model import build_unet
    from gigaseg.tracking import MlflowRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    keras.utils.set_random_seed(0)
    runs = []
    for _ in range(2):
        with MlflowRun(uri, "gigaseg", artifact_location=str(tmp_path / "artifacts")) as run:
            version = run.register_model(run.log_model(build_unet()), "tissue", "champion")
        runs.append((run.run_id, version))
    assert [v for _, v in runs] == ["1", "2"]
    client = MlflowClient(tracking_uri=uri)
    assert str(client.get_model_version_by_alias("tissue", "champion").version) == "2"
    for run_id, version in runs:
        tags = client.get_run(run_id).data.tags
        assert (tags["gigaseg.registered_model"], tags["gigaseg.registered_version"],
                tags["gigaseg.registered_alias"]) == ("tissue", version, "champion")
        assert client.get_model_version("tissue", version).run_id == run_id


# --- end to end: train, register, predict from the registry, export (slow) ----------------------

@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A smoke training run registered as ``tissue`` (alias ``champion``) in its own SQLite store."""
    root = tmp_path_factory.mktemp("registry")
    env = {**command_env(root / "mlflow.db"), "GIGASEG_ROOT": str(root)}
    trained = _command("gigaseg-train", "debug=smoke", "mlflow.register_as=tissue", "train.progress=false",
                       f"hydra.run.dir={root}/train", env=env, cwd=root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("gigaseg").experiment_id])
    return root, env, run, trained


@pytest.mark.slow
def test_train_registers_its_model_with_the_champion_alias(registered):
    root, env, run, trained = registered
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("tissue", "champion")
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    tags = run.data.tags
    assert (tags["gigaseg.registered_model"], tags["gigaseg.registered_version"],
            tags["gigaseg.registered_alias"]) == ("tissue", "1", "champion")
    # The registered version is the model the run logged (the best weights by validation Dice).
    assert version.source == tags["gigaseg.model_uri"]
    assert "model registered as tissue version 1 with alias champion (models:/tissue@champion)" in trained.stdout + trained.stderr


@pytest.mark.slow
def test_predict_from_the_registry_and_from_the_exported_file_gives_the_same_mask(registered, tmp_path):
    import keras

    from gigaseg.cli.common import resolve_model
    from gigaseg.inference import load_model

    root, env, run, _ = registered
    slide = root / "data" / "smoke" / "demo" / "slides" / "s4.tiff"
    from_registry = _command("gigaseg-predict", "model_uri=models:/tissue@champion", f"slide={slide}",
                             f"output_dir={tmp_path}/registry", "progress=false", env=env, cwd=root)
    assert from_registry.returncode == 0, from_registry.stderr[-3000:]
    summary = json.loads((tmp_path / "registry" / "summary.json").read_text())
    assert summary["model_run_id"] == run.info.run_id and summary["model_uri"] == "models:/tissue@champion"

    (tmp_path / "exported").mkdir()
    out = tmp_path / "exported" / "tissue.keras"
    exported = _command("gigaseg-export", "model_uri=models:/tissue@champion", f"out={out}", env=env, cwd=root)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert [p.name for p in out.parent.iterdir()] == ["tissue.keras"]  # no temporary left beside it

    # Plain Keras loads the file and computes what the registered model computes.
    plain = keras.saving.load_model(out, compile=False)
    (tmp_path / "download").mkdir()
    original = load_model(resolve_model("models:/tissue/1", env["MLFLOW_TRACKING_URI"], tmp_path / "download"))
    image = np.random.default_rng(0).integers(0, 256, (1, 256, 512, 3), dtype=np.uint8)
    np.testing.assert_array_equal(plain.predict(image, verbose=0), original.model.predict(image, verbose=0))
    # gigaseg reads the training metadata back from the file, so the defaults are the same.
    again = load_model(out)
    assert (again.run_id, again.level, again.mpp, again.threshold) == (
        original.run_id, original.level, original.mpp, original.threshold)

    from_file = _command("gigaseg-predict", f"model_uri={out}", f"slide={slide}", f"output_dir={tmp_path}/file",
                         "progress=false", "log_mlflow=false", env=env, cwd=root)
    assert from_file.returncode == 0, from_file.stderr[-3000:]
    other = json.loads((tmp_path / "file" / "summary.json").read_text())
    assert (other["level"], other["threshold"], other["tissue_pixels"]) == (
        summary["level"], summary["threshold"], summary["tissue_pixels"])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "file" / "mask.tiff"),
                                  tifffile.imread(tmp_path / "registry" / "mask.tiff"))


@pytest.mark.slow
def test_registry_and_export_errors_are_one_line(registered, tmp_path):
    root, env, _, _ = registered
    slide = root / "data" / "smoke" / "demo" / "slides" / "s4.tiff"
    predict = ["log_mlflow=false", f"slide={slide}", f"hydra.run.dir={tmp_path}/out"]
    cases = [
        ("gigaseg-predict", ["model_uri=models:/tissue@best", *predict],
         "model_uri=models:/tissue@best: registered model 'tissue' has no alias 'best' (its aliases: champion (version 1))"),
        ("gigaseg-predict", ["model_uri=models:/tisue@champion", *predict], "no registered model 'tisue'"),
        ("gigaseg-predict", ["model_uri=models:/tissue/4", *predict], "has no version 4 (its versions: 1)"),
        ("gigaseg-export", ["model_uri=models:/tissue@best", f"out={tmp_path}/m.keras"], "has no alias 'best'"),
        ("gigaseg-export", ["model_uri=models:/tissue@champion", f"out={tmp_path}/m.h5"], "end in .keras"),
        ("gigaseg-export", ["model_uri=models:/tissue@champion", f"out={tmp_path}"], "is a folder"),
        ("gigaseg-export", ["model_uri=models:/tissue@champion", f"out={tmp_path}/no/m.keras"], "does not exist"),
        ("gigaseg-export", [f"model_uri={tmp_path}/none.keras", f"out={tmp_path}/m.keras"], "no such model"),
        ("gigaseg-export", [f"out={tmp_path}/m.keras"], "model_uri=... is required"),
        ("gigaseg-train", ["debug=smoke", "mlflow.register_as=tissue", "train.log_model=false"],
         "error: mlflow.register_as=tissue registers the model the run logs, but train.log_model=false; "
         "set train.log_model=true or drop mlflow.register_as"),
        ("gigaseg-train", ["debug=smoke", "mlflow.register_as=tissue", "mlflow.alias=latest"], "mlflow.alias='latest'"),
    ]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs_before = len(client.search_runs([client.get_experiment_by_name("gigaseg").experiment_id]))
    for command, args, message in cases:
        result = _command(command, *args, env=env, cwd=root)
        assert message in _error_line(result), (command, args)
    assert not (tmp_path / "m.keras").exists()
    # The training errors came before any run was opened.
    assert len(client.search_runs([client.get_experiment_by_name("gigaseg").experiment_id])) == runs_before


@pytest.mark.slow
def test_mlflow_project_export_entry_point_passes_paths_with_spaces(tmp_path, model):
    """``mlflow run . -e export`` hands model_uri and out to gigaseg-export as the other entry points do."""
    import sys

    import keras

    from conftest import ROOT

    (tmp_path / "my models").mkdir()
    (tmp_path / "out dir").mkdir()
    source, out = tmp_path / "my models" / "in.keras", tmp_path / "out dir" / "out.keras"
    keras.saving.save_model(model, source)
    env = command_env(tmp_path / "mlflow.db")
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "export", "--env-manager", "local",
           "-P", f"model_uri={source}", "-P", f"out={out}", "-P", f"overrides=hydra.run.dir={tmp_path}/run"]
    done = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    image = np.random.default_rng(1).integers(0, 256, (1, 128, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(keras.saving.load_model(out, compile=False).predict(image, verbose=0),
                                  model.predict(image, verbose=0))
