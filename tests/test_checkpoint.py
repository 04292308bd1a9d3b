"""Checkpoints: a complete file round-trips; a truncated, altered or unmarked file is refused; variables are
restored by name, a checkpoint of another layout or optimizer is refused, and the first (positional) format still loads."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from gigaseg.checkpoint import (
    DIGEST,
    OPTIMIZER,
    WEIGHTS,
    CheckpointError,
    arrays_digest,
    load_checkpoint,
    restore,
    restore_weights,
    save_checkpoint,
)

SMALL = dict(filters=(4, 4), kernels=(3, 3), strides=(2, 2))


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
    altered = dict(arrays, **{"weights/down1/kernel": arrays["weights/down1/kernel"] + 1})
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


# --- variables by name -------------------------------------------------------------------


def _fresh(optimizer: str = "adam", built: bool = True, **layout):
    """A new model and optimizer (Keras names the optimizers of a process adam, adam_1, adam_2, ...)."""
    from gigaseg.model import build_unet
    from gigaseg.training import build_optimizer

    model = build_unet(**layout)
    optimizer = build_optimizer(optimizer, 1e-3)
    if built:
        optimizer.build(model.trainable_variables)
    return model, optimizer


def _trained(tmp_path, optimizer: str = "adam", **layout):
    """A model and optimizer with non-trivial state (one update), and the checkpoint they were saved to."""
    model, optimizer = _fresh(optimizer, **layout)
    gradients = [np.full(v.shape, 0.5, np.float32) for v in model.trainable_variables]
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return model, optimizer, save_checkpoint(tmp_path / "last.npz", model, optimizer, 1, [])


def _rewrite(path, arrays):
    """Write ``arrays`` as a checkpoint gigaseg would accept (a fresh digest), in the given order."""
    arrays = {k: v for k, v in arrays.items() if k != DIGEST}
    arrays[DIGEST] = np.array(arrays_digest(arrays))
    np.savez(path, **arrays)


def _entries(path):
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def test_every_variable_is_stored_under_its_keras_path(tmp_path):
    import keras

    keras.optimizers.Adam()  # so that the optimizer saved is not the process's first, named "adam"
    model, optimizer, path = _trained(tmp_path)
    names = list(_entries(path))
    weights = [n for n in names if n.startswith(WEIGHTS)]
    assert weights == [WEIGHTS + v.path for v in model.trainable_variables]  # in the model's order
    assert weights[:2] == ["weights/down1/kernel", "weights/down1/bias"]
    slots = [n for n in names if n.startswith(OPTIMIZER)]
    assert len(slots) == len(optimizer.variables)
    # Under the optimizer's class, not its per-process name (adam_1, ... in newer Keras releases).
    assert {"optimizer/adam/iteration", "optimizer/adam/down1_kernel_momentum", "optimizer/adam/down1_kernel_velocity"} <= set(slots)
    checkpoint = load_checkpoint(path)
    assert checkpoint.weight_names == [v.path for v in model.trainable_variables]
    assert checkpoint.optimizer_names[0] == "adam/iteration"


def test_restore_matches_variables_by_name_whatever_their_order_in_the_file(tmp_path):
    model, optimizer, path = _trained(tmp_path)
    reversed_file = tmp_path / "reversed.npz"
    _rewrite(reversed_file, dict(reversed(list(_entries(path).items()))))
    target, target_optimizer = _fresh(built=False)  # optimizer slots made lazily: restore builds them
    restore(load_checkpoint(reversed_file), target, target_optimizer)
    for mine, theirs in zip(target.trainable_variables, model.trainable_variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    assert len(target_optimizer.variables) == len(optimizer.variables) and int(target_optimizer.iterations.numpy()) == 1
    for mine, theirs in zip(target_optimizer.variables, optimizer.variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    # Weights only, for evaluation: by name too.
    alone, _ = _fresh()
    restore_weights(load_checkpoint(reversed_file), alone)
    np.testing.assert_array_equal(alone.trainable_variables[-1].numpy(), model.trainable_variables[-1].numpy())


@pytest.mark.parametrize(
    "layout, message",
    [
        # Another kernel size: same names, other shapes.
        (dict(SMALL, kernels=(5, 3)), r"holds model weight 'down1/kernel' of shape \(3, 3, 3, 4\), the model's has shape \(5, 5, 3, 4\)"),
        # One level more: the checkpoint lacks the model's down3.
        (dict(filters=(4, 4, 4), kernels=(3, 3, 3), strides=(2, 2, 2)), r"has no model weight 'down3/kernel', which the model has"),
        # One level less: the checkpoint holds the model's missing down2.
        (dict(filters=(4,), kernels=(3,), strides=(2,)), r"holds model weight 'down2/kernel', which the model lacks"),
    ],
)
def test_a_checkpoint_of_another_model_layout_is_refused_naming_the_variable(tmp_path, layout, message):
    _, _, path = _trained(tmp_path, **SMALL)
    model, optimizer = _fresh(**layout)
    before = [v.numpy().copy() for v in model.trainable_variables]
    with pytest.raises(CheckpointError, match=message) as refused:
        restore(load_checkpoint(path), model, optimizer)
    assert str(path) in str(refused.value) and "resume with the same model config" in str(refused.value)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))  # nothing assigned


def test_a_checkpoint_of_another_optimizer_is_refused_before_anything_is_assigned(tmp_path):
    _, _, path = _trained(tmp_path, "adam", **SMALL)
    model, optimizer = _fresh("rmsprop", **SMALL)
    before = [v.numpy().copy() for v in model.trainable_variables]
    with pytest.raises(CheckpointError, match=r"has no optimizer variable 'rmsprop/iteration', which the optimizer has.*"
                                              r"resume with the same train.optimizer"):
        restore(load_checkpoint(path), model, optimizer)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))


def _first_format(path, model, optimizer):
    """Write ``model`` and ``optimizer`` as the first checkpoint format did: numbered entries, no names."""
    arrays = {"step": np.array(2, np.int64), "history": np.array("[]"), "extra": np.array("{}")}
    for i, v in enumerate(model.trainable_variables):
        arrays[f"weight_{i:04d}"] = v.numpy()
    for i, v in enumerate(optimizer.variables):
        arrays[f"optimizer_{i:04d}"] = v.numpy()
    _rewrite(path, arrays)


def test_a_checkpoint_of_the_first_positional_format_loads_with_a_warning(tmp_path, caplog):
    model, optimizer, _ = _trained(tmp_path, **SMALL)
    old = tmp_path / "old.npz"
    _first_format(old, model, optimizer)
    checkpoint = load_checkpoint(old)
    assert checkpoint.step == 2 and checkpoint.weight_names is None and checkpoint.optimizer_names is None
    target, target_optimizer = _fresh(built=False, **SMALL)
    with caplog.at_level("WARNING", logger="gigaseg.checkpoint"):
        restore(checkpoint, target, target_optimizer)
    assert "first checkpoint format" in caplog.text and str(old) in caplog.text
    for mine, theirs in zip(target.trainable_variables + target_optimizer.variables,
                            model.trainable_variables + optimizer.variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())


def test_a_checkpoint_of_the_first_format_and_another_layout_is_refused(tmp_path):
    model, optimizer, _ = _trained(tmp_path, **SMALL)
    old = tmp_path / "old.npz"
    _first_format(old, model, optimizer)
    other, other_optimizer = _fresh(**dict(SMALL, kernels=(5, 3)))
    with pytest.raises(CheckpointError, match=r"first format, by position.*the model's 'down1/kernel' has shape "
                                              r"\(5, 5, 3, 4\).*same model config"):
        restore(load_checkpoint(old), other, other_optimizer)
    deeper, deeper_optimizer = _fresh(filters=(4, 4, 4), kernels=(3, 3, 3), strides=(2, 2, 2))
    with pytest.raises(CheckpointError, match=r"first format, by position"):
        restore(load_checkpoint(old), deeper, deeper_optimizer)
