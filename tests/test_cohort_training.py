"""Training over a cohort: epochs in a seeded order, accumulated steps, validation over every region, the best model."""

from __future__ import annotations

import numpy as np
import pytest

from gigaseg.epochs import epoch_order, step_regions, steps_per_epoch
from gigaseg.errors import ConfigError
from gigaseg.training import TrainConfig, TrainRegion, metric_key, train
from test_training import SMALL, Recorder, blobs


def test_epoch_order_is_a_seeded_permutation():
    first = epoch_order(7, seed=3, epoch=0)
    assert sorted(first.tolist()) == list(range(7))
    assert np.array_equal(first, epoch_order(7, seed=3, epoch=0))
    assert not all(np.array_equal(first, epoch_order(7, seed=3, epoch=e)) for e in range(1, 4))
    assert not np.array_equal(first, epoch_order(7, seed=4, epoch=0))


def test_steps_visit_every_region_once_per_epoch():
    regions, accumulate = 5, 2
    assert steps_per_epoch(regions, accumulate) == 3
    for epoch in range(3):
        visited = []
        for step in range(epoch * 3, epoch * 3 + 3):
            e, chosen = step_regions(step, regions, accumulate, seed=0)
            assert e == epoch and 1 <= len(chosen) <= accumulate
            visited += chosen
        assert sorted(visited) == list(range(regions))
        assert visited == epoch_order(regions, 0, epoch).tolist()


def test_the_order_is_the_same_in_another_process():
    import subprocess
    import sys

    code = "from gigaseg.epochs import epoch_order; print(epoch_order(9, 11, 2).tolist())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str(epoch_order(9, 11, 2).tolist())


def test_exactly_one_of_steps_and_epochs():
    with pytest.raises(ConfigError, match="exactly one of train.steps and train.epochs"):
        TrainConfig(steps=3, epochs=2).validate()
    with pytest.raises(ConfigError, match="exactly one"):
        TrainConfig(steps=None).validate()
    assert TrainConfig(steps=None, epochs=3, accumulate=2).total_steps(5) == 9
    assert metric_key("case 1/auto#0") == "case 1/auto_0"


def _cohort(count: int, seed: int, shape=(128, 256)) -> list[TrainRegion]:
    return [TrainRegion(f"slide{seed + i}/r", *blobs(*shape, seed=seed + i)) for i in range(count)]


def test_epochs_over_a_cohort_with_validation_per_region_and_the_best_model(tmp_path):
    train_regions, val_regions = _cohort(3, 10), _cohort(2, 20)
    recorder = Recorder()
    config = TrainConfig(steps=None, epochs=2, accumulate=2, lr=0.02, warmup_steps=0, val_every=1, checkpoint_every=100,
                         progress=False, tile_size=128)
    result = train(SMALL, train_regions, val_regions, config, checkpoint_dir=tmp_path, logger=recorder)
    # Two epochs of ceil(3 / 2) = 2 steps.
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert [h["epoch"] for h in result.history] == [0, 0, 1, 1]
    logged = dict(recorder.metrics)
    for step in (1, 2, 3, 4):
        metrics = logged[step]
        per_region = [metrics[f"val_dice/slide{20 + i}/r"] for i in range(2)]
        assert metrics["val_dice_mean"] == pytest.approx(np.mean(per_region))
        assert min(per_region) - 1e-12 <= metrics["val_dice"] <= max(per_region) + 1e-12
    best = max(range(1, 5), key=lambda s: (logged[s]["val_dice"], -s))
    assert result.best_step == best and result.metrics["best_val_dice"] == logged[best]["val_dice"]
    assert result.best_checkpoint == tmp_path / "best.npz" and (tmp_path / "last.npz").is_file()
    from gigaseg.checkpoint import load_checkpoint

    kept = load_checkpoint(tmp_path / "best.npz")
    assert kept.step == best
    for a, b in zip(result.model.get_weights(), kept.weights):
        np.testing.assert_array_equal(a, b)


def test_accumulated_step_is_the_mean_of_the_regions_gradients(tmp_path):
    """One step over two regions with SGD moves the weights by lr times the mean of the two regions' gradients."""
    import keras

    from gigaseg.model import build_unet
    from gigaseg.streaming import loss_and_gradients

    regions = _cohort(2, 30)
    config = TrainConfig(steps=1, accumulate=2, optimizer="sgd", lr=0.1, warmup_steps=0, val_every=100, progress=False,
                         tile_size=128, seed=0)
    result = train(SMALL, regions, [], config, checkpoint_dir=None)
    keras.utils.set_random_seed(0)
    start = build_unet(**SMALL)
    each = [loss_and_gradients(start, r.image, r.mask, loss=config.loss, tile_size=128)[1] for r in regions]
    for after, before, g0, g1 in zip(result.model.get_weights(), start.get_weights(), *each):
        np.testing.assert_allclose(after, before - 0.1 * (np.asarray(g0) + np.asarray(g1)) / 2, rtol=1e-5, atol=1e-7)


def test_resume_mid_epoch_ends_with_the_same_weights(tmp_path):
    regions = _cohort(3, 40)
    common = dict(lr=0.02, warmup_steps=0, val_every=100, checkpoint_every=2, progress=False, tile_size=128, seed=5)
    full = train(SMALL, regions, [], TrainConfig(steps=5, **common), checkpoint_dir=tmp_path / "full")
    # A run stopped after step 2 (mid-epoch: 3 regions per epoch), then resumed to step 5.
    train(SMALL, regions, [], TrainConfig(steps=2, **common), checkpoint_dir=tmp_path / "part")
    resumed = train(SMALL, regions, [], TrainConfig(steps=5, **common), checkpoint_dir=tmp_path / "part",
                    resume=tmp_path / "part" / "last.npz")
    assert [h["epoch"] for h in resumed.history] == [0, 0, 0, 1, 1]
    for a, b in zip(resumed.model.get_weights(), full.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_augmented_training_is_exact_under_tiling_and_changes_the_run(tmp_path):
    """With augmentation on, tiled steps on the lazily transformed regions match plain steps on the same draws."""
    from gigaseg.options import AugmentConfig

    regions = _cohort(2, 50, shape=(128, 192))
    common = dict(steps=4, lr=0.02, warmup_steps=0, val_every=100, progress=False, seed=1,
                  augment=AugmentConfig(enabled=True))
    plain = train(SMALL, regions, [], TrainConfig(tiled="never", **common), checkpoint_dir=None)
    tiled = train(SMALL, regions, [], TrainConfig(tiled="always", tile_size=64, **common), checkpoint_dir=None)
    assert tiled.history[0]["tiles"] > 1
    np.testing.assert_allclose([h["loss"] for h in tiled.history], [h["loss"] for h in plain.history], rtol=1e-4)
    off = train(SMALL, regions, [], TrainConfig(tiled="always", tile_size=64, **{**common, "augment": AugmentConfig()}),
                checkpoint_dir=None)
    assert [h["loss"] for h in off.history] != [h["loss"] for h in tiled.history]
