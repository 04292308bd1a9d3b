"""Sweeps as MLflow parent and child runs: the Hydra callback on a real SQLite store, and real
multiruns of gigaseg-train with the basic sweeper and the Optuna sweeper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from gigaseg.cli.sweep import (
    PARENT_ENV,
    PARENT_FILE,
    MlflowSweepCallback,
    parent_run_id,
)
from gigaseg.tracking import MlflowRun

from conftest import command_env


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the quick tests (creating one costs seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    yield
    os.environ.pop(PARENT_ENV, None)


def _sweep_config(compose, tmp_path, experiment, *sweep_overrides):
    """The config a multirun's callbacks get; ``sweep_overrides`` as typed after ``-m``."""
    from omegaconf import OmegaConf, read_write

    cfg = compose(["hydra.job.name=train", f"hydra.sweep.dir={tmp_path}/sweep", f"mlflow.experiment_name={experiment}"],
                  return_hydra_config=True)
    with read_write(cfg):
        OmegaConf.update(cfg, "hydra.overrides.task", list(sweep_overrides), merge=False)
    return cfg


def test_callback_makes_a_parent_that_jobs_nest_under(compose, tmp_path, monkeypatch, clean_env, store):
    uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = _sweep_config(compose, tmp_path, "basic", "train.lr=0.001,0.003")
    callback = MlflowSweepCallback(apps=["train"])
    callback.on_multirun_start(cfg)
    recorded = json.loads((tmp_path / "sweep" / PARENT_FILE).read_text())
    parent = recorded["run_id"]
    assert parent == os.environ[PARENT_ENV] == parent_run_id(tmp_path / "sweep")
    assert recorded["swept"] == ["train.lr"]
    for lr, dice in (("0.001", 0.4), ("0.003", 0.7)):
        with MlflowRun(uri, "elsewhere", parent_run_id=parent, params={"train.lr": lr}) as run:
            run.log_metrics({"val_dice": dice}, step=3)
    callback.on_multirun_end(cfg)

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("basic").experiment_id])
    by_id = {r.info.run_id: r for r in runs}
    assert len(runs) == 3
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.params["train.lr"] for r in children) == ["0.001", "0.003"]
    top = by_id[parent]
    assert top.info.status == "FINISHED"
    assert top.data.params["sweep.params.train.lr"] == "0.001,0.003"
    assert top.data.params["sweep.sweeper"] == "BasicSweeper"
    assert top.data.metrics["best_val_dice"] == 0.7
    assert by_id[top.data.tags["gigaseg.best_run_id"]].data.params["train.lr"] == "0.003"
    assert PARENT_ENV not in os.environ


def test_under_mlflow_run_the_run_it_made_is_the_parent(compose, tmp_path, monkeypatch, clean_env, store):
    uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    made = client.create_run(client.create_experiment("from-mlflow-run")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", made)
    cfg = _sweep_config(compose, tmp_path, "gigaseg", "train.lr=0.001,0.003")
    callback = MlflowSweepCallback()
    callback.on_multirun_start(cfg)
    # The jobs must not adopt MLflow's run: they become its children instead.
    assert "MLFLOW_RUN_ID" not in os.environ
    assert parent_run_id(tmp_path / "sweep") == made
    with MlflowRun(uri, "gigaseg", parent_run_id=made) as child:
        pass
    callback.on_multirun_end(cfg)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == made
    assert run.info.experiment_id == client.get_run(made).info.experiment_id
    # `mlflow run` ends its own run when the command exits.
    assert client.get_run(made).info.status == "RUNNING"


def test_other_commands_are_not_tracked_as_sweeps(compose, tmp_path, clean_env):
    cfg = compose(["hydra.job.name=prepare", f"hydra.sweep.dir={tmp_path}/sweep"], return_hydra_config=True)
    callback = MlflowSweepCallback(apps=["train"])
    callback.on_multirun_start(cfg)
    callback.on_multirun_end(cfg)
    assert not (tmp_path / "sweep").exists() and PARENT_ENV not in os.environ


# --- real multiruns (slow) ---------------------------------------------------------------

def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = command_env(tmp_path / "mlflow.db")
    env.pop(PARENT_ENV, None)
    common = ["debug=smoke", f"paths.data_dir={tmp_path}/data", "train.progress=false", "train.log_model=false"]
    flags = [o for o in overrides if o.startswith("-")]
    rest = [o for o in overrides if not o.startswith("-")]
    out = subprocess.run([sys.executable, "-m", "gigaseg.cli.train", *flags, *common, *rest], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    out = subprocess.run([sys.executable, "-m", "gigaseg.cli.prepare", "debug=smoke", f"paths.data_dir={root}/data",
                          f"hydra.run.dir={root}/out"], cwd=root, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "data"


def _runs(tmp_path: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("gigaseg").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.mark.slow
def test_multirun_through_joblib_is_one_parent_and_a_child_per_job(tmp_path, smoke_data):
    (tmp_path / "data").symlink_to(smoke_data)
    # Jobs in two joblib worker processes: the parent id must reach them across processes.
    _train(tmp_path, "-m", "train.lr=0.001,0.003", "model=gigaunet_wide", "train.steps=2",
           "train.val_every=2", f"hydra.sweep.dir={tmp_path}/sweep", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2")
    client, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.params["sweep.params.train.lr"] == "0.001,0.003"
    assert parent.data.params["sweep.launcher"] == "JoblibLauncher"
    assert parent.data.tags["gigaseg.sweep_dir"] == str(tmp_path / "sweep")
    assert "train.lr=0.001,0.003 model=gigaunet_wide" in parent.data.params["sweep.overrides"]
    assert sorted(c.data.params["train.lr"] for c in children) == ["0.001", "0.003"]
    assert {c.data.params["model.name"] for c in children} == {"gigaunet_wide"}
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert f"train.lr={params['train.lr']}" in tags["gigaseg.overrides"] == params["overrides"]
        assert tags["gigaseg.sweep"] == "child" and child.info.status == "FINISHED"
        assert tags["gigaseg.sweep_values"] == f"train.lr={params['train.lr']}"
        assert child.info.run_name == f"job {tags['gigaseg.job_num']}: {tags['gigaseg.sweep_values']}"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2]
    best = max(children, key=lambda c: c.data.metrics["val_dice"])
    assert parent.data.tags["gigaseg.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_val_dice"] == best.data.metrics["val_dice"]


@pytest.mark.slow
def test_optuna_sweeper_runs_two_trials_as_children(tmp_path, smoke_data):
    (tmp_path / "data").symlink_to(smoke_data)
    _train(tmp_path, "hparams_search=dice_optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/sweep")
    client, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.data.params["sweep.sweeper"] == "OptunaSweeper"
    assert parent.data.params["sweep.direction"] == "maximize"
    assert parent.data.params["sweep.params.train.lr"] == "tag(log, interval(0.001, 0.02))"
    assert len({c.data.params["train.lr"] for c in children}) == 2  # two sampled trials
    # The sweeper optimised what the task returned: the children's val_dice.
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(c.data.metrics["val_dice"] for c in children)
    assert parent.data.metrics["best_val_dice"] == results["best_value"]
    assert "sweep" in {a.path for a in client.list_artifacts(parent.info.run_id)}
