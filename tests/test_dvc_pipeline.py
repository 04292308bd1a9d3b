"""The DVC pipeline (dvc.yaml) with DVC's Hydra integration, in a copy of the project: ``dvc exp run
-S ...`` composes conf/ into params.yaml and runs every stage on the shrunk config, ``dvc exp show``
has a column per parameter, ``dvc plots show`` draws the training tables, a change of ``train.*``
leaves the data stages alone, and a second clone pulls the outputs from the project's remote."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

STAGES = ("slide", "prepare", "train", "evaluate")
#: The shrunk run every slow test here starts from (log_model off: it only costs time here).
SMOKE = ("-S", "debug=smoke", "-S", "train.steps=2", "-S", "train.log_model=false")
#: What the project copy needs besides src/gigaseg.
PROJECT_FILES = ("conf", "hydra_plugins", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore")
GIT_USER = ("-c", "user.name=test", "-c", "user.email=test@example.invalid")


def _run(*args: str, cwd: Path, env: dict) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _dvc(*args: str, cwd: Path, env: dict) -> str:
    return _run(sys.executable, "-m", "dvc", *args, cwd=cwd, env=env)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _flat_numbers(metrics: dict) -> bool:
    return bool(metrics) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())


def test_params_yaml_is_conf_composed_as_dvc_composes_it(tmp_path):
    """The committed params.yaml is what `dvc exp run` would write, without this machine's places;
    the stages' config (conf/pipeline.yaml) holds its values plus the shared settings."""
    from gigaseg.cli.pipeline import compose, write_params

    fresh = write_params([], tmp_path / "params.yaml")
    assert fresh.read_text() == (ROOT / "params.yaml").read_text(), (
        "params.yaml is out of date with conf/: run `python -m gigaseg.cli.pipeline params` (or `dvc exp run`)")
    params = yaml.safe_load(fresh.read_text())
    assert set(params) == {"model", "data", "train", "distributed", "mlflow"}
    assert "tracking_uri" not in params["mlflow"] and "paths" not in params
    assert params["data"]["dir"] == "pipeline/data" and params["data"]["prepared_dir"] == "pipeline/data/prepared"

    stage = compose([])
    for section in params:
        assert {k: v for k, v in stage[section].items() if k in params[section]} == params[section], section
    assert stage["paths"]["root"] and stage["mlflow"]["tracking_uri"]

    # A group choice and a value, as `dvc exp run -S debug=smoke -S train.lr=0.003` passes them.
    shrunk = yaml.safe_load(write_params(["debug=smoke", "train.lr=0.003"], tmp_path / "smoke.yaml").read_text())
    assert shrunk["data"]["max_region"] == [256, 1024] and shrunk["train"]["steps"] == 3
    assert shrunk["train"]["lr"] == 0.003 and shrunk["data"]["dir"] == "pipeline/data"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A git copy of the project after `dvc exp run` of the shrunk config: (project, env, output)."""
    tmp = tmp_path_factory.mktemp("dvc_pipeline")
    project = tmp / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(
            source, project / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if source.is_dir() else {}))
    shutil.copytree(ROOT / "src" / "gigaseg", project / "src" / "gigaseg", ignore=shutil.ignore_patterns("__pycache__"))
    # The copy's conf/ and params.yaml are the ones composed (GIGASEG_ROOT), and MLflow writes beside them.
    env = {**os.environ, "GIGASEG_ROOT": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_RUN_ID", None)
    _run("git", "init", "-q", cwd=project, env=env)
    _dvc("init", "-q", cwd=project, env=env)
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")  # the project's remote and Hydra settings
    _run("git", "add", "-A", cwd=project, env=env)
    _run("git", *GIT_USER, "commit", "-q", "-m", "project", cwd=project, env=env)

    output = _dvc("exp", "run", *SMOKE, cwd=project, env=env)
    return project, env, output


@pytest.mark.slow
def test_dvc_exp_run_composes_params_runs_every_stage_and_shows_columns_and_plots(pipeline, tmp_path):
    project, env, output = pipeline
    for stage in STAGES:
        assert f"Running stage '{stage}'" in output, stage
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["steps"] == 2 and params["data"]["max_region"] == [256, 1024]
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == set(STAGES)

    # Metrics files are flat JSON of numbers; evaluation scores the checkpoint as training's last validation did.
    trained = json.loads((project / "pipeline" / "train" / "metrics.json").read_text())
    scored = json.loads((project / "pipeline" / "metrics.json").read_text())
    assert _flat_numbers(trained) and _flat_numbers(scored)
    assert scored["step"] == 2 and 0.0 <= scored["val_dice"] <= 1.0
    assert scored["val_dice"] == pytest.approx(trained["final_val_dice"], abs=1e-12)
    shown = json.loads(_dvc("metrics", "show", "--json", cwd=project, env=env))
    files = next(iter(shown.values()))["data"]
    assert files["pipeline/metrics.json"]["data"]["val_dice"] == scored["val_dice"]

    # The training tables: a row per step, a row per validation (the last step validates).
    steps = _table(project / "pipeline" / "train" / "history" / "train.csv")
    validations = _table(project / "pipeline" / "train" / "history" / "val.csv")
    assert [row["step"] for row in steps] == ["1", "2"] and {"loss", "dice"} <= set(steps[0])
    assert [row["step"] for row in validations] == ["2"]
    assert float(validations[0]["val_dice"]) == pytest.approx(trained["final_val_dice"])

    # One column per parameter, none for this machine's places.
    table = _dvc("exp", "show", "--csv", "--no-pager", cwd=project, env=env)
    header = next(csv.reader(table.splitlines()))
    assert {"train.steps", "train.lr", "data.max_region", "model.name", "val_dice"} <= set(header)
    assert not any(column.startswith(("paths.", "mlflow.tracking_uri")) for column in header)
    rows = list(csv.DictReader(table.splitlines()))
    assert any(row["train.steps"] == "2" for row in rows)

    # dvc plots show writes the curves, with the tables' numbers in the page.
    _dvc("plots", "show", "-o", str(tmp_path / "plots"), cwd=project, env=env)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "val_dice" in page and validations[0]["val_dice"] in page and steps[0]["loss"] in page


@pytest.mark.slow
def test_a_train_parameter_re_runs_training_only(pipeline):
    project, env, _ = pipeline
    data_before = _digests(project / "pipeline" / "data")
    unchanged = _dvc("repro", cwd=project, env=env)
    assert "Running stage" not in unchanged

    output = _dvc("exp", "run", *SMOKE, "-S", "train.lr=0.003", cwd=project, env=env)
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["lr"] == 0.003
    assert "Running stage 'train'" in output and "Running stage 'evaluate'" in output
    for stage in ("slide", "prepare"):
        assert f"Running stage '{stage}'" not in output and f"Stage '{stage}' didn't change" in output, stage
    assert _digests(project / "pipeline" / "data") == data_before
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock["train"]["params"]["params.yaml"]["train"]["lr"] == 0.003
    assert set(lock["prepare"]["params"]["params.yaml"]) == {"data", "model.strides"}


@pytest.mark.slow
def test_a_second_clone_pulls_the_outputs_from_the_remote(pipeline, tmp_path):
    project, env, _ = pipeline
    # The project's default remote is a folder in the user's cache: DVC expands ~ for each user.
    assert "url = ~/.cache/gigaseg/dvc-storage" in (project / ".dvc" / "config").read_text()
    home = tmp_path / "home"
    storage = home / ".cache" / "gigaseg" / "dvc-storage"
    _dvc("push", cwd=project, env={**env, "HOME": str(home)})
    assert (storage / "files" / "md5").is_dir()
    _run("git", "add", "-A", cwd=project, env=env)
    _run("git", *GIT_USER, "commit", "-q", "-m", "results", cwd=project, env=env)

    clone = tmp_path / "clone"
    _run("git", "clone", "-q", str(project), str(clone), cwd=tmp_path, env=env)
    assert not (clone / "pipeline" / "data" / "prepared").exists()
    # Another machine points the remote elsewhere without touching the committed config.
    _dvc("remote", "modify", "--local", "storage", "url", str(storage), cwd=clone, env=env)
    _dvc("pull", cwd=clone, env=env)
    for folder in ("pipeline/data/prepared", "pipeline/data/slides"):
        assert _digests(clone / folder) == _digests(project / folder), folder
    assert (clone / "pipeline" / "train" / "checkpoints" / "last.npz").read_bytes() == \
        (project / "pipeline" / "train" / "checkpoints" / "last.npz").read_bytes()
    assert "up to date" in _dvc("status", cwd=clone, env=env).lower()
    assert (ROOT / ".dvc" / "config").read_text() == (clone / ".dvc" / "config").read_text()
