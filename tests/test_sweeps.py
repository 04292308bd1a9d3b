"""Sweeps as MLflow parent and child runs: the Hydra callback on a real SQLite store, and real
multiruns of gigaseg-train with the basic sweeper and the Optuna sweeper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from gigaseg.cli.sweep import (
    PARENT_ENV,
    PARENT_FILE,
    MlflowSweepCallback,
    ending_parent_on_failure,
    parent_run_id,
    sweeper_problem,
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


@pytest.mark.parametrize("stop, status", [
    (RuntimeError("a job crashed"), "FAILED"),
    (SystemExit(2), "FAILED"),  # a job's one-line error
    (KeyboardInterrupt(), "KILLED"),
    (SystemExit(130), "KILLED"),  # a job's Ctrl-C, after its own runs ended KILLED
])
def test_a_sweep_that_stops_early_ends_its_parent_failed_or_killed(compose, tmp_path, monkeypatch, clean_env, store,
                                                                     stop, status):
    uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    experiment = f"stopped-{status}-{type(stop).__name__}"
    cfg = _sweep_config(compose, tmp_path, experiment, "train.lr=0.001,0.003")
    callback = MlflowSweepCallback(apps=["train"])
    with pytest.raises(type(stop)):
        with ending_parent_on_failure():
            callback.on_multirun_start(cfg)
            parent = parent_run_id(tmp_path / "sweep")
            with MlflowRun(uri, experiment, parent_run_id=parent) as child:
                child.log_metrics({"val_dice": 0.5}, step=1)
            raise stop  # Hydra skips on_multirun_end when the sweep raises
    run = MlflowClient(tracking_uri=uri).get_run(parent)
    assert run.info.status == status
    # What the jobs got done is still summarised.
    assert run.data.tags["gigaseg.sweep_jobs"] == "1" and run.data.metrics["best_val_dice"] == 0.5
    assert PARENT_ENV not in os.environ
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the sweep's handler is gone


def test_sigterm_during_a_sweep_ends_its_parent_killed(compose, tmp_path, monkeypatch, clean_env, store):
    uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = _sweep_config(compose, tmp_path, "terminated", "train.lr=0.001,0.003")
    callback = MlflowSweepCallback(apps=["train"])
    with pytest.raises(KeyboardInterrupt):
        with ending_parent_on_failure():
            callback.on_multirun_start(cfg)
            # Without the sweep's handler SIGTERM would end pytest itself: check before sending it.
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
    assert MlflowClient(tracking_uri=uri).get_run(parent_run_id(tmp_path / "sweep")).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_persistent_optuna_study_is_refused_in_one_line(compose):
    problem = sweeper_problem(compose(["hparams_search=dice_optuna", "hydra.sweeper.storage=sqlite:///study.db"],
                                      return_hydra_config=True).hydra)
    assert problem is not None and "hydra.sweeper.storage=null" in problem and "\n" not in problem
    assert sweeper_problem(compose(["hparams_search=dice_optuna"], return_hydra_config=True).hydra) is None


def test_the_optuna_sweeper_is_an_extra_with_a_hint_when_missing():
    import tomllib

    from hydra.errors import MissingConfigException

    from gigaseg.cli.common import hydra_message

    from conftest import ROOT

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("hydra-optuna-sweeper")]
    assert [d for d in project["optional-dependencies"]["optuna"] if d.startswith("hydra-optuna-sweeper")]
    # Hydra's words when the plugin is not installed, and what the user reads.
    missing = MissingConfigException("In 'hparams_search/dice_optuna': Could not find 'hydra/sweeper/optuna'\n\n"
                                     "Available options in 'hydra/sweeper':\n\tbasic", missing_cfg_file="optuna")
    message = hydra_message(missing)
    assert "\n" not in message and message.endswith("pip install 'gigaseg[optuna]'")


# --- real multiruns (slow) ---------------------------------------------------------------

def _train_args(tmp_path: Path, *overrides: str) -> tuple[list[str], dict[str, str]]:
    env = command_env(tmp_path / "mlflow.db")
    env.pop(PARENT_ENV, None)
    common = ["debug=smoke", f"paths.data_dir={tmp_path}/data", "train.progress=false", "train.log_model=false"]
    flags = [o for o in overrides if o.startswith("-")]
    rest = [o for o in overrides if not o.startswith("-")]
    return [sys.executable, "-m", "gigaseg.cli.train", *flags, *common, *rest], env


def _train(tmp_path: Path, *overrides: str, returncode: int = 0) -> subprocess.CompletedProcess:
    args, env = _train_args(tmp_path, *overrides)
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == returncode, out.stderr[-4000:]
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


@pytest.mark.slow
def test_a_real_sweep_whose_second_job_fails_ends_its_parent_failed(tmp_path, smoke_data):
    (tmp_path / "data").symlink_to(smoke_data)
    out = _train(tmp_path, "-m", "train.lr=0.003,-1", "train.steps=1", "train.val_every=1",
                 f"hydra.sweep.dir={tmp_path}/sweep", returncode=2)
    assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [
        "error: train.lr must be a positive number, got -1.0"]
    _, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and len(children) == 1
    assert parents[0].info.status == "FAILED"
    assert children[0].info.status == "FINISHED" and children[0].data.params["train.lr"] == "0.003"
    assert parents[0].data.tags["gigaseg.sweep_jobs"] == "1"


@pytest.mark.slow
def test_a_real_sweep_stopped_by_sigterm_ends_its_parent_and_job_killed(tmp_path, smoke_data):
    (tmp_path / "data").symlink_to(smoke_data)
    args, env = _train_args(tmp_path, "-m", "train.lr=0.003,0.01", "train.steps=200", "train.val_every=100",
                            f"hydra.sweep.dir={tmp_path}/sweep")
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            try:
                client, _, children = _runs(tmp_path)
                if children and client.get_metric_history(children[0].info.run_id, "loss"):
                    break  # the first job is training
            except Exception:  # noqa: BLE001 (no store or no experiment yet)
                continue
        assert process.poll() is None, process.stderr.read()[-3000:]
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err[-3000:]
    _, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and len(children) == 1
    assert parents[0].info.status == "KILLED" and children[0].info.status == "KILLED"
