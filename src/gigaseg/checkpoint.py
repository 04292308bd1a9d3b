"""Training checkpoints: weights, optimizer state, step and history in one atomic ``.npz``.

Plain arrays only (no pickle), so loading a checkpoint never runs code from the file; a
SHA-256 of every array is stored with them, so a truncated or altered file is refused.
Every variable is stored under its Keras path and restored by it, so a checkpoint of
another model layout or optimizer is refused by name instead of loaded into the wrong slots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gigaseg.atomic import atomic_path, write_errors
from gigaseg.errors import GigasegError

log = logging.getLogger(__name__)

LAST = "last.npz"
#: The entry holding the digest of all other entries; its presence marks a complete file.
DIGEST = "sha256"
#: Entry prefixes of model weights and optimizer variables, followed by the variable's name.
WEIGHTS = "weights/"
OPTIMIZER = "optimizer/"
#: Entry prefixes of the first format, which numbered the variables (``weight_0000``).
_OLD_WEIGHTS = "weight_"
_OLD_OPTIMIZER = "optimizer_"

_MODEL_HINT = "the checkpoint was written by a different model layout; resume with the same model config"
_OPTIMIZER_HINT = (
    "the checkpoint was written with a different optimizer or learning-rate schedule; "
    "resume with the same train.optimizer, train.lr_schedule and train.warmup_steps"
)


class CheckpointError(GigasegError):
    """A checkpoint is missing, unreadable, incomplete or does not match the model."""


@dataclass
class Checkpoint:
    """A checkpoint's contents; ``weights`` and ``optimizer`` are in the order they were saved."""

    step: int
    weights: list[np.ndarray]
    optimizer: list[np.ndarray]
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    #: Names of ``weights`` and ``optimizer`` (see ``weight_names``, ``optimizer_names``);
    #: None for a file of the first format, whose variables are known by position only.
    weight_names: list[str] | None = None
    optimizer_names: list[str] | None = None
    path: Path | None = None


def weight_names(model) -> list[str]:
    """The Keras paths of ``model``'s trainable variables (``down1/kernel``), in the model's order."""
    return _unique([v.path for v in model.trainable_variables], "model")


def optimizer_names(optimizer) -> list[str]:
    """Names of ``optimizer``'s variables: their Keras paths under the optimizer class's name.

    Keras prefixes an optimizer's variables with the optimizer's name, and numbers the
    optimizers of one process (``adam``, ``adam_1``, ...): a run resumed in the same process
    as another (a sweep, a test) would not find its own names. The class name is stable
    and still tells an Adam checkpoint from an RMSprop one (``adam/down1_kernel_momentum``).
    """
    prefix = f"{optimizer.name}/"
    kind = type(optimizer).__name__.lower()
    return _unique([f"{kind}/{v.path.removeprefix(prefix)}" for v in optimizer.variables], "optimizer")


def _unique(names: list[str], owner: str) -> list[str]:
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"the {owner} has two variables named {twice!r}; a checkpoint could not tell them apart")
    return names


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``arrays``, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        if name == DIGEST:
            continue
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, model, optimizer, step: int, history: list[dict], extra: dict | None = None) -> Path:
    """Write the checkpoint to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "step": np.array(step, dtype=np.int64),
        "history": np.array(json.dumps(history, sort_keys=True)),
        "extra": np.array(json.dumps(extra or {}, sort_keys=True)),
    }
    # Entries are written in the model's order, which loading keeps (``Checkpoint.weights``).
    for name, v in zip(weight_names(model), model.trainable_variables):
        arrays[WEIGHTS + name] = np.asarray(v.numpy())
    for name, v in zip(optimizer_names(optimizer), optimizer.variables):
        arrays[OPTIMIZER + name] = np.asarray(v.numpy())
    arrays[DIGEST] = np.array(arrays_digest(arrays))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``, after checking it is complete and intact."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # numpy refuses object arrays, which would unpickle (and could run code)
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects, which gigaseg never loads (they could run code); "
                "it was not written by gigaseg: resume from a checkpoint gigaseg wrote"
            ) from exc
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupt ({exc}); delete it or resume from another checkpoint"
        ) from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupt ({exc}); delete it or resume from another checkpoint"
        ) from exc
    if DIGEST not in arrays:
        raise CheckpointError(
            f"checkpoint {path} has no integrity record (incomplete, or written by an older gigaseg); "
            "resume from another checkpoint or start a new run"
        )
    if str(arrays[DIGEST]) != arrays_digest(arrays):
        raise CheckpointError(f"checkpoint {path} fails its integrity check (its arrays were altered); delete it")
    named = any(n.startswith((WEIGHTS, OPTIMIZER)) for n in arrays)
    if named:  # ``np.load`` lists entries in the order they were written: the model's
        weights = {n[len(WEIGHTS):]: a for n, a in arrays.items() if n.startswith(WEIGHTS)}
        slots = {n[len(OPTIMIZER):]: a for n, a in arrays.items() if n.startswith(OPTIMIZER)}
    else:  # the first format: numbered entries (``weight_0000``), in number order
        weights = {n: arrays[n] for n in sorted(arrays) if n.startswith(_OLD_WEIGHTS)}
        slots = {n: arrays[n] for n in sorted(arrays) if n.startswith(_OLD_OPTIMIZER)}
    try:
        return Checkpoint(
            step=int(arrays["step"]),
            weights=list(weights.values()),
            optimizer=list(slots.values()),
            history=json.loads(str(arrays["history"])),
            extra=json.loads(str(arrays["extra"])),
            weight_names=list(weights) if named else None,
            optimizer_names=list(slots) if named else None,
            path=path,
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} lacks {exc}; it was not written by gigaseg") from exc


def restore(checkpoint: Checkpoint, model, optimizer) -> None:
    """Copy a checkpoint's weights and optimizer state into a model and its optimizer, by name.

    The optimizer is built on the model's trainable variables first if it is not yet (Keras
    creates its slots lazily). Nothing is assigned unless every variable of the model and
    the optimizer has its equal in the checkpoint, by name and shape, and the checkpoint
    holds no other: a ``CheckpointError`` names the first that differs.
    """
    variables = model.trainable_variables
    weights = _matched(checkpoint, checkpoint.weights, checkpoint.weight_names, variables, weight_names(model),
                       "model weight", "the model", _MODEL_HINT)
    if not optimizer.built:
        optimizer.build(variables)
    slots = _matched(checkpoint, checkpoint.optimizer, checkpoint.optimizer_names, optimizer.variables,
                     optimizer_names(optimizer), "optimizer variable", "the optimizer", _OPTIMIZER_HINT)
    _warn_if_positional(checkpoint)
    for v, w in zip(variables, weights):
        v.assign(w)
    for v, w in zip(optimizer.variables, slots):
        v.assign(w)


def restore_weights(checkpoint: Checkpoint, model) -> None:
    """Copy a checkpoint's weights into ``model`` by name (no optimizer: for evaluation and prediction)."""
    variables = model.trainable_variables
    weights = _matched(checkpoint, checkpoint.weights, checkpoint.weight_names, variables, weight_names(model),
                       "model weight", "the model", _MODEL_HINT)
    _warn_if_positional(checkpoint)
    for v, w in zip(variables, weights):
        v.assign(w)


def _source(checkpoint: Checkpoint) -> str:
    return f"checkpoint {checkpoint.path}" if checkpoint.path is not None else "the checkpoint"


def _warn_if_positional(checkpoint: Checkpoint) -> None:
    if checkpoint.weight_names is None:
        log.warning("%s has the first checkpoint format, without variable names; its variables were restored "
                    "by position, their count and shapes agreeing with the model's; checkpoints written from now "
                    "on store them by name", _source(checkpoint))


def _matched(checkpoint: Checkpoint, saved: list[np.ndarray], saved_names: list[str] | None, variables, names: list[str],
             what: str, owner: str, hint: str) -> list[np.ndarray]:
    """The checkpoint's arrays in the order of ``variables``, or a ``CheckpointError`` naming the first mismatch."""
    source = _source(checkpoint)
    shapes = [tuple(v.shape) for v in variables]
    if saved_names is None:
        # A file of the first format knows its variables by position only: taken when the count
        # and every shape agree (Keras lists a model's variables in a fixed order), refused otherwise.
        for i, (name, shape) in enumerate(zip(names, shapes)):
            if i < len(saved) and saved[i].shape != shape:
                raise CheckpointError(f"{source} (first format, by position) holds a {what} of shape {saved[i].shape} "
                                      f"where {owner}'s {name!r} has shape {shape}; {hint}")
        if len(saved) < len(names):
            raise CheckpointError(f"{source} (first format, by position) holds {len(saved)} {what}s, {owner} "
                                  f"{len(names)}: none for {names[len(saved)]!r}; {hint}")
        if len(saved) > len(names):
            raise CheckpointError(f"{source} (first format, by position) holds {len(saved)} {what}s, {owner} "
                                  f"{len(names)}: {what} {len(names)} of shape {saved[len(names)].shape} is extra; {hint}")
        return list(saved)
    by_name = dict(zip(saved_names, saved))
    for name, shape in zip(names, shapes):
        if name not in by_name:
            raise CheckpointError(f"{source} has no {what} {name!r}, which {owner} has; {hint}")
        if by_name[name].shape != shape:
            raise CheckpointError(f"{source} holds {what} {name!r} of shape {by_name[name].shape}, "
                                  f"{owner}'s has shape {shape}; {hint}")
    known = set(names)
    for name in saved_names:
        if name not in known:
            raise CheckpointError(f"{source} holds {what} {name!r}, which {owner} lacks; {hint}")
    return [by_name[name] for name in names]
