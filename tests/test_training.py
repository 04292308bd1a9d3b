"""The training loop on small in-memory regions: learning, checkpoints, resume, memory refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from gigaseg.checkpoint import load_checkpoint
from gigaseg.errors import ConfigError, MemoryPlanError
from gigaseg.training import TrainConfig, TrainRegion, learning_rate, train


class Recorder:
    """A RunLogger keeping what training sends, as an MLflow run would receive it."""

    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []
        self.artifacts: list[tuple[str, str | None]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path), artifact_path))


def blobs(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pink-purple elliptic 'tissue' on an off-white noisy background, and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), np.uint8)
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(height / 8, height / 3), rng.uniform(width / 10, width / 4)
        mask |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
    image = np.empty((height, width, 3), np.float32)
    image[:] = (238, 236, 240)
    image[mask == 1] = (205, 120, 175)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


SMALL = dict(filters=(4, 4, 4), kernels=(7, 9, 9), strides=(4, 4, 4))


def test_dice_improves_over_the_first_steps(tmp_path):
    image, mask = blobs(256, 1024, seed=1)
    val_image, val_mask = blobs(256, 1024, seed=2)
    recorder = Recorder()
    # Seed 6 starts from a network that misses the tissue (hard Dice 0.01 at step 1); with the
    # default input range [-6, 1] some seeds start near Dice 1 on these easy blobs.
    config = TrainConfig(steps=16, lr=0.02, loss="dice_bce", val_every=8, checkpoint_every=8, progress=False, seed=6)
    result = train(SMALL, [TrainRegion("train", image, mask)], [TrainRegion("val", val_image, val_mask)], config, checkpoint_dir=tmp_path, logger=recorder)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 16
    assert losses[-1] < losses[0] - 0.1, losses
    assert result.history[0]["dice"] < 0.1
    assert result.history[-1]["dice"] > result.history[0]["dice"] + 0.5
    assert result.metrics["val_dice"] > 0.9
    # Every step is logged with the figures the tracker shows.
    steps = [s for s, _ in recorder.metrics]
    assert steps == list(range(1, 17))
    for key in ("loss", "dice", "step_time_s", "data_time_s", "peak_rss_mb", "mpx_per_s", "tiles"):
        assert all(key in m for _, m in recorder.metrics), key
    assert [s for s, m in recorder.metrics if "val_dice" in m] == [8, 16]
    assert {a for _, a in recorder.artifacts} == {"checkpoints"}
    assert load_checkpoint(tmp_path / "last.npz").step == 16


def test_tiled_and_plain_runs_give_the_same_losses(tmp_path):
    image, mask = blobs(256, 512, seed=4)
    common = dict(steps=4, lr=0.02, val_every=4, checkpoint_every=4, progress=False, seed=0)
    plain = train(SMALL, [TrainRegion("train", image, mask)], [], TrainConfig(tiled="never", **common), checkpoint_dir=tmp_path / "p")
    tiled = train(SMALL, [TrainRegion("train", image, mask)], [], TrainConfig(tiled="always", tile_size=128, **common), checkpoint_dir=tmp_path / "t"
    )
    assert tiled.tiled and not plain.tiled
    assert tiled.history[0]["tiles"] == 8
    np.testing.assert_allclose([h["loss"] for h in tiled.history], [h["loss"] for h in plain.history], rtol=1e-4)


def test_resume_continues_from_the_checkpoint(tmp_path):
    image, mask = blobs(128, 512, seed=5)
    common = dict(lr=0.02, warmup_steps=0, val_every=100, checkpoint_every=3, progress=False, seed=0)
    full = train(SMALL, [TrainRegion("train", image, mask)], [], TrainConfig(steps=6, **common), checkpoint_dir=tmp_path / "full")
    train(SMALL, [TrainRegion("train", image, mask)], [], TrainConfig(steps=3, **common), checkpoint_dir=tmp_path / "half")
    resumed = train(SMALL, [TrainRegion("train", image, mask)], [], TrainConfig(steps=6, **common),
        checkpoint_dir=tmp_path / "half", resume=tmp_path / "half" / "last.npz",
    )
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    np.testing.assert_allclose(
        [h["loss"] for h in resumed.history], [h["loss"] for h in full.history], rtol=1e-6
    )
    for a, b in zip(resumed.model.get_weights(), full.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(steps=10, lr=0.01, lr_schedule="cosine", warmup_steps=4)
    schedule = learning_rate(config)
    rates = [float(schedule(i)) for i in range(10)]
    np.testing.assert_allclose(rates[:5], [0.002, 0.004, 0.006, 0.008, 0.01], rtol=1e-6)
    assert all(a > b for a, b in zip(rates[4:], rates[5:]))
    assert rates[-1] < 0.001
    constant = learning_rate(TrainConfig(steps=10, lr=0.01, warmup_steps=2))
    np.testing.assert_allclose([float(constant(i)) for i in range(6)], [0.01 / 3, 0.02 / 3, 0.01, 0.01, 0.01, 0.01], rtol=1e-6)
    assert learning_rate(TrainConfig(steps=10, lr=0.01, warmup_steps=0)) == 0.01
    # A run shorter than its warm-up still reaches the full rate at its last step.
    short = learning_rate(TrainConfig(steps=3, lr=0.01, warmup_steps=5))
    np.testing.assert_allclose([float(short(i)) for i in range(3)], [0.01 / 3, 0.02 / 3, 0.01], rtol=1e-6)


class KeepFirstCheckpoint:
    """A run logger that keeps a copy of the first checkpoint the run writes (as if it were killed then)."""

    def __init__(self, into: Path) -> None:
        self.into = into

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path, artifact_path=None):
        if not self.into.exists():
            shutil.copy(path, self.into)


def test_resume_in_the_middle_of_a_schedule_matches_an_uninterrupted_run(tmp_path):
    image, mask = blobs(128, 512, seed=8)
    config = TrainConfig(steps=6, lr=0.02, lr_schedule="cosine", warmup_steps=2, val_every=100, checkpoint_every=3,
                         progress=False)
    step3 = tmp_path / "step3.npz"
    full = train(SMALL, [TrainRegion("train", image, mask)], [], config, checkpoint_dir=tmp_path / "full",
                 logger=KeepFirstCheckpoint(step3))
    assert load_checkpoint(step3).step == 3
    resumed = train(SMALL, [TrainRegion("train", image, mask)], [], config, checkpoint_dir=tmp_path / "resumed", resume=step3)
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    # Same learning rates after the resume: the optimizer's iteration count came back with it.
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in full.history], rtol=1e-6)
    for a, b in zip(resumed.model.get_weights(), full.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _one_replica():
    import tensorflow as tf

    from gigaseg.distributed import Replicas

    return Replicas(tf.distribute.MirroredStrategy(devices=["/cpu:0"]))


def test_training_through_a_one_replica_strategy_matches_the_tiled_run(tmp_path):
    """The distributed path of train(): state and tile size broadcast, sums all-reduced (one replica here)."""
    image, mask = blobs(256, 512, seed=4)
    common = dict(steps=3, lr=0.02, val_every=3, checkpoint_every=3, progress=False, seed=0, tile_size=128)
    alone = train(SMALL, [TrainRegion("train", image, mask)], [], TrainConfig(**common), checkpoint_dir=tmp_path / "a")
    spread = train(SMALL, [TrainRegion("train", image, mask)], [], TrainConfig(**common), checkpoint_dir=tmp_path / "s",
                   replicas=_one_replica())
    assert [h["loss"] for h in spread.history] == [h["loss"] for h in alone.history]
    for a, b in zip(load_checkpoint(tmp_path / "s" / "last.npz").weights, load_checkpoint(tmp_path / "a" / "last.npz").weights):
        np.testing.assert_array_equal(a, b)


def test_a_plain_step_cannot_be_spread_over_replicas(tmp_path):
    image, mask = blobs(128, 256, seed=6)
    with pytest.raises(ConfigError, match="train.tiled=never .*cannot be spread over replicas"):
        train(SMALL, [TrainRegion("train", image, mask)], [], TrainConfig(steps=1, tiled="never", progress=False),
              checkpoint_dir=tmp_path, replicas=_one_replica())
    assert not (tmp_path / "last.npz").exists()


def test_memory_estimate_refuses_an_impossible_plain_step(tmp_path):
    image, mask = blobs(128, 256, seed=6)
    config = TrainConfig(steps=1, tiled="never", memory_budget_mb=1, progress=False)
    with pytest.raises(MemoryPlanError) as info:
        train(SMALL, [TrainRegion("train", image, mask)], [], config, checkpoint_dir=tmp_path)
    message = str(info.value)
    assert "GiB" in message and "available" in message
    assert "train.tiled" in message
    assert not (tmp_path / "last.npz").exists()


def test_bad_train_config_is_refused_with_the_option_name(tmp_path):
    image, mask = blobs(128, 256, seed=7)
    with pytest.raises(ConfigError, match="train.optimizer"):
        train(SMALL, [TrainRegion("train", image, mask)], [], TrainConfig(optimizer="lbfgs"), checkpoint_dir=tmp_path)
