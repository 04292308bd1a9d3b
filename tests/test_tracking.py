"""MLflow tracking on a real SQLite store: params, tags, metrics, store checks."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from gigaseg.tracking import MlflowRun, TrackingError, check_tracking_store, flatten_config, git_state

from conftest import ROOT


def test_flatten_config_gives_dotted_string_params():
    flat = flatten_config({"model": {"kernels": [7, 9, 9], "name": "gigaunet"}, "train": {"lr": 0.01, "tile_size": None}})
    assert flat == {"model.kernels": "[7, 9, 9]", "model.name": "gigaunet", "train.lr": "0.01", "train.tile_size": "None"}
    long = flatten_config({"x": "a" * 10000})["x"]
    assert len(long) == 6000 and long.endswith("...")


def test_run_logs_params_tags_metrics_and_can_be_reopened(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with MlflowRun(uri, "exp", run_name="r1", params={"train.lr": "0.01"}, tags={"gigaseg.x": "1"}) as run:
        run.log_metrics({"loss": 0.5, "nan_is_dropped": float("nan")}, step=1)
        run_id = run.run_id
    with MlflowRun(uri, "exp", run_id=run_id, params={"train.lr": "0.01", "extra": "y"}) as run:
        run.log_metrics({"loss": 0.25}, step=2)
    client = MlflowClient(tracking_uri=uri)
    data = client.get_run(run_id).data
    assert data.params == {"train.lr": "0.01", "extra": "y"}
    assert data.tags["gigaseg.x"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    assert "nan_is_dropped" not in data.metrics
    assert client.get_run(run_id).info.status == "FINISHED"


def test_failed_training_marks_the_run_failed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RuntimeError):
        with MlflowRun(uri, "exp") as run:
            run_id = run.run_id
            raise RuntimeError("boom")
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"


def test_unreachable_store_fails_fast_with_a_clear_message():
    start = time.monotonic()
    with pytest.raises(TrackingError, match="cannot be reached"):
        check_tracking_store("http://127.0.0.1:9")
    assert time.monotonic() - start < 60


def test_store_in_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(TrackingError, match="does not exist"):
        check_tracking_store(f"sqlite:///{tmp_path}/nope/mlflow.db")


def test_git_state():
    # The data digest has its own tests (test_data_digest.py): it needs a real DVC repository.
    state = git_state(ROOT)
    assert len(state["gigaseg.git_commit"]) == 40
    assert state["gigaseg.git_dirty"] in ("True", "False")
    # Without a folder: the checkout gigaseg runs from, whatever the working folder (projects may live elsewhere).
    assert git_state()["gigaseg.git_commit"] == state["gigaseg.git_commit"]
