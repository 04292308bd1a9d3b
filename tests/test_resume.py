"""Resuming a run into the same MLflow run: finding it (``train.resume=auto``), picking an intact
checkpoint, not logging a step twice, and a run killed with SIGKILL finishing like an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from gigaseg.checkpoint import CheckpointError, load_checkpoint
from gigaseg.cli.train import resume_checkpoint
from gigaseg.errors import ConfigError
from gigaseg.tracking import MlflowRun, find_resumable_run, process_tags

from conftest import checkpoint_step, command_env


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def test_reopened_run_never_logs_a_step_twice(store):
    with MlflowRun(store, "reopen") as run:
        run.log_metrics({"loss": 0.5}, step=1)
        run.log_metrics({"loss": 0.4}, step=2)
    with MlflowRun(store, "reopen", run_id=run.run_id) as again:
        # Steps 1-2 are re-done after a resume from step 1's checkpoint; 2 is already there.
        again.log_metrics({"loss": 0.4, "val_dice": 0.9}, step=2)
        again.log_metrics({"loss": 0.3}, step=3)
    client = MlflowClient(tracking_uri=store)
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(1, 0.5), (2, 0.4), (3, 0.3)]
    assert [m.step for m in client.get_metric_history(run.run_id, "val_dice")] == [2]


def test_auto_resume_finds_the_newest_unfinished_run_of_the_same_config(store):
    client = MlflowClient(tracking_uri=store)
    experiment = client.create_experiment("auto")

    def make(config_hash: str, status: str, tags: dict | None = None) -> str:
        run_id = client.create_run(experiment, tags={"gigaseg.config_hash": config_hash, **(tags or {})}).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        time.sleep(0.01)  # distinct start times
        return run_id

    killed = make("abc", "RUNNING", {"gigaseg.host": "elsewhere", "gigaseg.pid": "1"})
    make("abc", "FINISHED")
    make("other", "FAILED")
    # RUNNING in a live process on this host (this test): someone's live run, not resumable.
    make("abc", "RUNNING", process_tags())
    assert find_resumable_run(store, "auto", "abc") == killed
    assert find_resumable_run(store, "auto", "nothing") is None
    assert find_resumable_run(store, "no-such-experiment", "abc") is None


def test_resume_prefers_an_intact_checkpoint_over_a_partial_artifact(store, tmp_path):
    import keras

    from gigaseg.checkpoint import save_checkpoint
    from gigaseg.model import build_unet

    model = build_unet()
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    local = tmp_path / "run" / "checkpoints"
    save_checkpoint(local / "last.npz", model, optimizer, 4, [])
    partial = tmp_path / "partial" / "last.npz"
    save_checkpoint(partial, model, optimizer, 5, [])
    partial.write_bytes(partial.read_bytes()[:1000])  # as if killed while MLflow copied it
    with MlflowRun(store, "pick", tags={"gigaseg.checkpoint_dir": str(local)}) as run:
        run.log_artifact(partial, "checkpoints")
    chosen = resume_checkpoint(run.run_id, store, tmp_path / "download")
    assert chosen == local / "last.npz" and load_checkpoint(chosen).step == 4

    (local / "last.npz").unlink()
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        resume_checkpoint(run.run_id, store, tmp_path / "download2")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "download2" / "last.npz")


# --- resuming a training run from a checkpoint, matched by variable name -------------------

TINY = dict(filters=(4, 4), kernels=(3, 3), strides=(2, 2))


def _tiny_region(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    return image, (image[..., 0] > 127).astype(np.uint8)


def _train(tmp_path: Path, out: str, steps: int, layout: dict = TINY, resume: Path | None = None):
    from gigaseg.training import TrainConfig, TrainRegion, train

    image, mask = _tiny_region()
    # A constant rate, whatever the number of steps (a warm-up makes it a schedule, another optimizer state).
    config = TrainConfig(steps=steps, lr=0.01, warmup_steps=0, val_every=100, checkpoint_every=1, progress=False, seed=3)
    return train(layout, [TrainRegion("train", image, mask)], [], config, checkpoint_dir=tmp_path / out, resume=resume)


def test_resume_from_a_checkpoint_of_another_model_layout_is_refused_naming_the_variable(tmp_path):
    _train(tmp_path, "one", 1)
    wider = dict(TINY, filters=(8, 4))
    with pytest.raises(CheckpointError, match=r"model weight 'down1/kernel' of shape \(3, 3, 3, 4\), the model's has "
                                              r"shape \(3, 3, 3, 8\); .*resume with the same model config"):
        _train(tmp_path, "wider", 2, wider, resume=tmp_path / "one" / "last.npz")
    assert not (tmp_path / "wider" / "last.npz").exists()  # refused before the first step


def test_a_run_resumed_from_a_first_format_checkpoint_continues_like_one_resumed_by_name(tmp_path, caplog):
    from gigaseg.checkpoint import DIGEST, arrays_digest

    _train(tmp_path, "one", 1)
    named = tmp_path / "one" / "last.npz"
    # The same state as the first (positional) format wrote it: weight_0000, ..., optimizer_0000, ...
    with np.load(named) as data:
        arrays = {name: data[name] for name in data.files if name != DIGEST}
    old = {k: v for k, v in arrays.items() if not k.startswith(("weights/", "optimizer/"))}
    old.update({f"weight_{i:04d}": v for i, v in enumerate(v for k, v in arrays.items() if k.startswith("weights/"))})
    old.update({f"optimizer_{i:04d}": v for i, v in enumerate(v for k, v in arrays.items() if k.startswith("optimizer/"))})
    old[DIGEST] = np.array(arrays_digest(old))
    positional = tmp_path / "old.npz"
    np.savez(positional, **old)

    by_name = _train(tmp_path, "by_name", 2, resume=named)
    with caplog.at_level("WARNING", logger="gigaseg.checkpoint"):
        by_position = _train(tmp_path, "by_position", 2, resume=positional)
    assert "first checkpoint format" in caplog.text
    assert [h["loss"] for h in by_position.history] == [h["loss"] for h in by_name.history]
    for a, b in zip(by_position.model.get_weights(), by_name.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The resumed run writes the named format.
    assert load_checkpoint(tmp_path / "by_position" / "last.npz").weight_names[0] == "down1/kernel"


def test_config_hash_ignores_paths_resume_and_progress_but_not_options():
    from gigaseg.cli.train import config_hash

    base = {"data.dir": "/a/data", "data.slide.path": "/a/s.tiff", "train.lr": "0.005", "model.filters": "[4, 4, 4]"}
    same = {**base, "data.dir": "/b/data", "data.slide.path": "/b/s.tiff", "train.resume": "auto",
            "train.progress": "False", "mlflow.run_name": "x"}
    assert config_hash(base, ["m1"]) == config_hash(same, ["m1"])
    assert config_hash(base, ["m1"]) != config_hash({**base, "train.lr": "0.01"}, ["m1"])
    assert config_hash(base, ["m1"]) != config_hash(base, ["m2"])  # other data


# --- kill -9 and resume (slow) -----------------------------------------------------------

STEPS = 12


def _env(tmp_path: Path) -> dict:
    env = command_env(tmp_path / "mlflow.db")
    return env


def _args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gigaseg.cli.train", "debug=smoke", f"paths.data_dir={tmp_path}/data",
            f"hydra.run.dir={tmp_path}/{out}", f"train.steps={STEPS}", "train.checkpoint_every=1", "train.val_every=4",
            "train.lr_schedule=cosine", "train.warmup_steps=2", "train.progress=false", "train.log_model=false", *extra]


def _run(tmp_path: Path, out: str, *extra: str) -> None:
    done = subprocess.run(_args(tmp_path, out, *extra), cwd=tmp_path, env=_env(tmp_path), capture_output=True, check=False,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["id", "auto"])
def test_run_killed_with_sigkill_resumes_into_the_same_run_bit_identically(tmp_path, resume):
    prepared = subprocess.run([sys.executable, "-m", "gigaseg.cli.prepare", "debug=smoke",
                               f"paths.data_dir={tmp_path}/data", f"hydra.run.dir={tmp_path}/prep"],
                              cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600, check=False)
    assert prepared.returncode == 0, prepared.stderr[-3000:]

    checkpoint = tmp_path / "killed" / "checkpoints" / "last.npz"
    proc = subprocess.Popen(_args(tmp_path, "killed"), cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while checkpoint_step(checkpoint) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = checkpoint_step(checkpoint)
    assert 3 <= killed_at < STEPS, killed_at

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("gigaseg").experiment_id
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "RUNNING"
    run_id = killed.info.run_id

    _run(tmp_path, "resumed", f"train.resume={run_id if resume == 'id' else 'auto'}")
    _run(tmp_path, "uninterrupted")

    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert len(runs) == 2  # resumed into the killed run, not a new one
    (other,) = [r for r in runs if r != run_id]
    assert runs[run_id].info.status == "FINISHED"
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.npz")
    full = load_checkpoint(tmp_path / "uninterrupted" / "checkpoints" / "last.npz")
    assert resumed.step == full.step == STEPS
    assert all(np.array_equal(a, b) for a, b in zip(resumed.weights, full.weights))
    assert all(np.array_equal(a, b) for a, b in zip(resumed.optimizer, full.optimizer))
    # One value per step in the resumed run's history, equal to the uninterrupted run's.
    for key in ("loss", "dice", "val_dice"):
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        reference = [(m.step, m.value) for m in client.get_metric_history(other, key)]
        assert history == reference, key
        assert len({s for s, _ in history}) == len(history)

