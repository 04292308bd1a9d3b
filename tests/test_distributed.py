"""Distributed tiled training: cluster parsing, tile shares, and real multi-replica runs.

The multi-worker tests start real TensorFlow workers on 127.0.0.1 (``distributed.local_workers``)
and compare them with a single-process tiled run; they are slow (every worker imports
TensorFlow and MLflow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from gigaseg.checkpoint import load_checkpoint
from gigaseg.distributed import DistributedConfig, cluster_from, lost_worker_message
from gigaseg.streaming.engine import share
from gigaseg.errors import ConfigError
from conftest import checkpoint_step, command_env

# --- cluster description ------------------------------------------------------------------


def test_cluster_from_tf_config_names_tasks_and_the_chief():
    env = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2"], "chief": ["c:3"]},
                                    "task": {"type": "worker", "index": 1}})}
    cluster = cluster_from(None, None, env)
    assert not cluster.is_chief
    assert cluster.tasks == [("chief", 0, "c:3"), ("worker", 0, "a:1"), ("worker", 1, "b:2")]
    assert cluster.name("worker", 1) == "worker 1 (b:2)"
    assert cluster_from(None, None, {"TF_CONFIG": json.dumps({"cluster": {"chief": ["c:3"]},
                                                              "task": {"type": "chief", "index": 0}})}).is_chief


def test_cluster_from_config_list_when_tf_config_is_unset():
    cluster = cluster_from(["node1:12345", "node2:12345"], 0, {})
    assert cluster.is_chief and cluster.jobs == {"worker": ["node1:12345", "node2:12345"]}
    assert json.loads(cluster.tf_config())["task"] == {"type": "worker", "index": 0}


@pytest.mark.parametrize(
    ("workers", "index", "env", "message"),
    [
        (None, None, {}, "needs the cluster"),
        (["h:1", "h:2"], None, {}, "distributed.task_index"),
        (["h:1", "h:2"], 2, {}, "not in the cluster"),
        (["h1"], 0, {}, "not host:port"),
        (None, None, {"TF_CONFIG": "{not json"}, "TF_CONFIG is not a valid"),
        (None, None, {"TF_CONFIG": json.dumps({"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 0}})}, "job\\(s\\) ps"),
    ],
)
def test_bad_cluster_descriptions_are_refused_naming_the_option(workers, index, env, message):
    with pytest.raises(ConfigError, match=message):
        cluster_from(workers, index, env)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "horovod"}, "distributed.kind"),
        ({"kind": "none", "local_workers": 2}, "needs distributed=multiworker"),
        ({"kind": "multiworker", "local_workers": -1}, "local_workers"),
        ({"kind": "multiworker", "heartbeat_timeout_s": 0}, "heartbeat_timeout_s"),
    ],
)
def test_bad_distributed_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        DistributedConfig(**options).validate()


def test_lost_worker_message_names_the_peer_by_index_and_address():
    cluster = cluster_from(["127.0.0.1:1000", "127.0.0.1:2000", "127.0.0.1:3000"], 0, {})
    unhealthy = ("Collective ops is aborted by: Error reported from /job:worker/task:2: The following tasks are "
                 "unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:2\nThe tasks have crashed.")
    assert lost_worker_message(RuntimeError(unhealthy), cluster).startswith("lost worker 2 (127.0.0.1:3000): ")
    refused = "Collective ops is aborted by: failed to connect to all addresses; ipv4:127.0.0.1:2000: Connection refused"
    assert "worker 1 (127.0.0.1:2000)" in lost_worker_message(RuntimeError(refused), cluster)
    # Hosts with the same port: only the one whose address resolves to the IP in the message.
    same_port = cluster_from(["localhost:2000", "127.0.0.2:2000", "127.0.0.1:3000"], 2, {})
    named = lost_worker_message(RuntimeError("aborted by: failed; ipv4:127.0.0.1:2000: Connection refused"), same_port)
    assert named.startswith("lost worker 0 (localhost:2000): ") and "worker 1" not in named
    pair = cluster_from(["127.0.0.1:1000", "127.0.0.1:2000"], 1, {})
    assert lost_worker_message(RuntimeError("Connection reset by peer"), pair).startswith("lost worker 0 (127.0.0.1:1000)")


@pytest.mark.parametrize(("tiles", "parts"), [(10, 3), (2, 4), (7, 7), (0, 2), (64, 5)])
def test_shares_cover_every_tile_once_in_order(tiles, parts):
    shares = share(list(range(tiles)), parts)
    assert len(shares) == parts
    assert [t for s in shares for t in s] == list(range(tiles))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


# --- mirrored: several replicas in one process -------------------------------------------

#: Three logical CPU devices as replicas, the default model, and a 192x640 region with its mask.
MIRRORED_SETUP = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 3)
    import keras
    from gigaseg.distributed import DistributedConfig, Replicas, make_replicas
    from gigaseg.model import build_unet
    from gigaseg.streaming import DistributedEngine, TiledEngine

    strategy = tf.distribute.MirroredStrategy(devices=[d.name for d in tf.config.list_logical_devices("CPU")])
    replicas = Replicas(strategy)
    keras.utils.set_random_seed(0)
    model = build_unet()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (192, 640, 3), dtype=np.uint8)
    mask = (rng.random((192, 640)) < 0.4).astype(np.uint8)
    """
)

MIRRORED = MIRRORED_SETUP + textwrap.dedent(
    """
    out = {"replicas": replicas.num_replicas}
    for loss in ("dice_bce", "bce"):
        spread = DistributedEngine(model, replicas, loss=loss, tile_size=128).step(image, mask)
        single = TiledEngine(model, loss=loss, tile_size=128).step(image, mask)
        out[loss] = {
            "loss": [spread.loss, single.loss], "tiles": spread.tiles,
            "error": max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))
                         for a, b in zip(spread.gradients, single.gradients)),
        }
    broadcast = replicas.broadcast([np.arange(6.0).reshape(2, 3), np.array(7, np.int64)], "test")
    out["broadcast"] = [broadcast[0].tolist(), int(broadcast[1])]
    print(json.dumps(out))
    """
)


def test_mirrored_replicas_in_one_process_give_the_single_enginecheckpoint_step():
    """Three logical CPU devices stand in for GPUs: the tiles are split three ways."""
    done = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 3
    for loss in ("dice_bce", "bce"):
        spread, single = out[loss]["loss"]
        assert out[loss]["tiles"] == 10  # 2 x 5 tiles of 128, shared 4/3/3
        assert abs(spread - single) <= 1e-6 * abs(single)
        assert out[loss]["error"] <= 1e-6
    assert out["broadcast"] == [[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], 7]


# --- multiworker: real workers on 127.0.0.1 ----------------------------------------------

STEPS = 8


def _args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gigaseg.cli.train", "debug=smoke", f"paths.data_dir={tmp_path}/data",
            f"hydra.run.dir={tmp_path}/{out}", f"train.steps={STEPS}", "train.tile_size=128",
            "train.checkpoint_every=1", "train.val_every=4", "train.progress=false", "train.log_model=false", *extra]


WORKERS = ("distributed=multiworker", "distributed.local_workers=2", "distributed.heartbeat_timeout_s=5")


@pytest.fixture
def prepared(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gigaseg.cli.prepare", "debug=smoke", f"paths.data_dir={tmp_path}/data",
                           f"hydra.run.dir={tmp_path}/prep"], cwd=tmp_path, env=command_env(tmp_path / "mlflow.db"),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path


def _train(tmp_path: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_args(tmp_path, out, *extra), cwd=tmp_path, env=command_env(tmp_path / "mlflow.db"),
                          capture_output=True, text=True, timeout=900, check=False)


def _runs(tmp_path: Path):
    """The MLflow client of the test's store and the runs of its experiment (none before one exists)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("gigaseg")
    return client, [] if experiment is None else client.search_runs([experiment.experiment_id])


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


@pytest.mark.slow
def test_two_local_workers_train_like_one_process_with_one_mlflow_run(prepared):
    tmp_path = prepared
    spread = _train(tmp_path, "spread", *WORKERS)
    assert spread.returncode == 0, spread.stderr[-4000:]
    _, runs = _runs(tmp_path)
    assert len(runs) == 1  # only the chief logs; the launcher and worker 1 create no run
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.tags["gigaseg.replicas"].startswith("2 replicas")
    # Worker 1 wrote nothing shared: no checkpoint of its own.
    assert not (tmp_path / "spread" / "worker_1" / "checkpoints").exists()

    single = _train(tmp_path, "single")
    assert single.returncode == 0, single.stderr[-4000:]
    a = load_checkpoint(tmp_path / "spread" / "worker_0" / "checkpoints" / "last.npz")
    b = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.npz")
    assert a.step == b.step == STEPS
    losses_a = np.array([h["loss"] for h in a.history])
    losses_b = np.array([h["loss"] for h in b.history])
    assert _relative(losses_a, losses_b) <= 1e-5
    assert max(_relative(x, y) for x, y in zip(a.weights, b.weights)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_worker_stops_the_other_with_its_name_and_the_run_resumes(prepared, victim):
    tmp_path = prepared
    heartbeat = 5.0
    proc = subprocess.Popen(_args(tmp_path, "killed", *WORKERS, "train.steps=60"), cwd=tmp_path,
                            env=command_env(tmp_path / "mlflow.db"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "killed" / "worker_0" / "checkpoints" / "last.npz"
    deadline = time.monotonic() + 600
    while checkpoint_step(checkpoint) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = json.loads((tmp_path / "killed" / "workers.json").read_text())
    lost, survivor = workers[victim], workers[1 - victim]
    os.kill(lost["pid"], signal.SIGKILL)
    killed = time.monotonic()
    while True:  # the survivor notices on its own, within the documented bound
        try:
            os.kill(survivor["pid"], 0)
        except ProcessLookupError:
            break
        assert time.monotonic() - killed < 3 * heartbeat + 30, "the surviving worker did not stop"
        time.sleep(0.05)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0
    assert "Traceback" not in stderr
    name = f"worker {victim} ({lost['address']}"
    survivor_lines = [line for line in stderr.splitlines() if line.startswith("error: lost ")]
    assert survivor_lines and name in survivor_lines[0], stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(f"error: {name}")  # the launcher's summary
    stopped_at = checkpoint_step(checkpoint)
    assert stopped_at < 60

    resumed = _train(tmp_path, "resumed", *WORKERS, "train.steps=60", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    _, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    final = load_checkpoint(tmp_path / "resumed" / "worker_0" / "checkpoints" / "last.npz")
    assert final.step == 60
    assert [h["step"] for h in final.history] == list(range(1, 61))


@pytest.mark.slow
def test_a_cluster_that_never_comes_up_ends_within_the_startup_timeout(prepared):
    """Worker 1 is never started: worker 0 stops after distributed.startup_timeout_s with one line."""
    tmp_path = prepared
    from gigaseg.cli.workers import free_ports

    addresses = [f"127.0.0.1:{p}" for p in free_ports(2)]
    start = time.monotonic()
    alone = _train(tmp_path, "alone", "distributed=multiworker", f"distributed.workers=[{','.join(addresses)}]",
                   "distributed.task_index=0", "distributed.startup_timeout_s=5")
    assert alone.returncode != 0
    assert time.monotonic() - start < 120
    (line,) = [line for line in alone.stderr.splitlines() if line.startswith("error:")]
    assert "distributed.startup_timeout_s=5" in line and f"worker 1 ({addresses[1]})" in line
    assert "Traceback" not in alone.stderr
    _, runs = _runs(tmp_path)
    assert runs == []  # no MLflow run was opened

