"""Checkpoints: a complete file round-trips; a truncated, altered or unmarked file is refused."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from gigaseg.checkpoint import (
    DIGEST,
    CheckpointError,
    load_checkpoint,
    restore,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def model_and_optimizer():
    import keras

    from gigaseg.model import build_unet

    model = build_unet()
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def test_round_trip_keeps_weights_optimizer_step_and_history(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    path = save_checkpoint(tmp_path / "last.npz", model, optimizer, 7, [{"step": 7, "loss": 0.5}], {"k": 1})
    checkpoint = load_checkpoint(path)
    assert checkpoint.step == 7 and checkpoint.history == [{"step": 7, "loss": 0.5}] and checkpoint.extra == {"k": 1}
    assert all(np.array_equal(w, v.numpy()) for w, v in zip(checkpoint.weights, model.trainable_variables))
    restore(checkpoint, model, optimizer)
    assert [p.name for p in tmp_path.iterdir()] == ["last.npz"]  # no temporary file left behind


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_checkpoint_is_refused(tmp_path, model_and_optimizer, keep):
    model, optimizer = model_and_optimizer
    path = save_checkpoint(tmp_path / "last.npz", model, optimizer, 3, [])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        load_checkpoint(path)


def test_altered_or_unmarked_checkpoint_is_refused(tmp_path, model_and_optimizer):
    model, optimizer = model_and_optimizer
    path = save_checkpoint(tmp_path / "last.npz", model, optimizer, 3, [])
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    # A well-formed zip whose weights differ from the recorded digest.
    altered = dict(arrays, weight_0000=arrays["weight_0000"] + 1)
    np.savez(tmp_path / "altered.npz", **altered)
    with pytest.raises(CheckpointError, match="integrity check"):
        load_checkpoint(tmp_path / "altered.npz")
    # A file without the digest entry (for example cut before it was written).
    np.savez(tmp_path / "unmarked.npz", **{k: v for k, v in arrays.items() if k != DIGEST})
    with pytest.raises(CheckpointError, match="no integrity record"):
        load_checkpoint(tmp_path / "unmarked.npz")
    assert zipfile.is_zipfile(tmp_path / "unmarked.npz")


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.npz")
