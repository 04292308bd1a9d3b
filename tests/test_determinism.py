"""Same config, seed and data give bit-identical losses at every step, plain and tiled, in one
process (library) and across processes (the command, through MLflow)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from gigaseg.training import TrainConfig, TrainRegion, train


def blobs(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), np.uint8)
    for _ in range(3):
        cy, cx, ry, rx = rng.uniform(0, height), rng.uniform(0, width), height / 4, width / 6
        mask |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
    image = np.where(mask[..., None] == 1, (205, 120, 175), (238, 236, 240)) + rng.normal(0, 6, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


SMALL = {"filters": (4, 4, 4), "kernels": (7, 9, 9), "strides": (4, 4, 4)}


@pytest.mark.parametrize("tiling", [{"tiled": "never"}, {"tiled": "always", "tile_size": 128}])
def test_two_runs_give_bit_identical_losses_and_weights(tmp_path, tiling):
    image, mask = blobs(128, 256, seed=1)
    config = TrainConfig(steps=3, lr=0.01, loss="dice_bce", val_every=100, checkpoint_every=100, progress=False,
                         seed=5, **tiling)
    runs = [train(SMALL, [TrainRegion("train", image, mask)], [], config, checkpoint_dir=tmp_path / str(i)) for i in range(2)]
    losses = [[h["loss"] for h in run.history] for run in runs]
    assert len(losses[0]) == 3
    assert losses[0] == losses[1]  # exact float equality, step by step
    assert all(np.array_equal(a, b) for a, b in zip(runs[0].model.get_weights(), runs[1].model.get_weights()))
    if tiling["tiled"] == "always":
        return
    # A different seed starts elsewhere: the equality above is not vacuous.
    other = train(SMALL, [TrainRegion("train", image, mask)], [], TrainConfig(**{**config.__dict__, "seed": 6}),
                  checkpoint_dir=tmp_path / "other")
    assert [h["loss"] for h in other.history] != losses[0]


@pytest.mark.slow
def test_two_command_runs_log_identical_per_step_losses(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_RUN_ID", None)
    common = ["debug=smoke", f"paths.data_dir={tmp_path}/data", "train.progress=false", "train.log_model=false",
              "train.steps=4", "train.val_every=2"]

    def command(module: str, *extra: str) -> None:
        out = subprocess.run([sys.executable, "-m", module, *common, *extra], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600, check=False)
        assert out.returncode == 0, out.stderr[-3000:]

    command("gigaseg.cli.prepare", f"hydra.run.dir={tmp_path}/prep")
    command("gigaseg.cli.train", f"hydra.run.dir={tmp_path}/a")
    command("gigaseg.cli.train", f"hydra.run.dir={tmp_path}/b")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("gigaseg").experiment_id])
    assert len(runs) == 2
    assert runs[0].data.tags["gigaseg.config_hash"] == runs[1].data.tags["gigaseg.config_hash"]
    for key in ("loss", "dice", "val_dice"):
        histories = [[(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)] for r in runs]
        assert histories[0] == histories[1], key
        assert [s for s, _ in histories[0]] == ([1, 2, 3, 4] if key != "val_dice" else [2, 4])
