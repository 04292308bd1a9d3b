"""Training checkpoints: weights, optimizer state, step and history in one atomic ``.npz``.

Plain arrays only (no pickle), so loading a checkpoint never runs code from the file; a
SHA-256 of every array is stored with them, so a truncated or altered file is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gigaseg.atomic import atomic_path, write_errors
from gigaseg.errors import GigasegError

LAST = "last.npz"
#: The entry holding the digest of all other entries; its presence marks a complete file.
DIGEST = "sha256"


class CheckpointError(GigasegError):
    """A checkpoint is missing, unreadable, incomplete or does not match the model."""


@dataclass
class Checkpoint:
    step: int
    weights: list[np.ndarray]
    optimizer: list[np.ndarray]
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


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
    for i, v in enumerate(model.trainable_variables):
        arrays[f"weight_{i:04d}"] = np.asarray(v.numpy())
    for i, v in enumerate(optimizer.variables):
        arrays[f"optimizer_{i:04d}"] = np.asarray(v.numpy())
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
    try:
        names = sorted(arrays)
        return Checkpoint(
            step=int(arrays["step"]),
            weights=[arrays[n] for n in names if n.startswith("weight_")],
            optimizer=[arrays[n] for n in names if n.startswith("optimizer_")],
            history=json.loads(str(arrays["history"])),
            extra=json.loads(str(arrays["extra"])),
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} lacks {exc}; it was not written by gigaseg") from exc


def restore(checkpoint: Checkpoint, model, optimizer) -> None:
    """Copy a checkpoint's weights and optimizer state into a built model and optimizer."""
    variables = model.trainable_variables
    if len(variables) != len(checkpoint.weights) or any(
        tuple(v.shape) != w.shape for v, w in zip(variables, checkpoint.weights)
    ):
        raise CheckpointError("the checkpoint was written for a different model layout; use the same model config")
    for v, w in zip(variables, checkpoint.weights):
        v.assign(w)
    optimizer.build(variables)
    if len(optimizer.variables) != len(checkpoint.optimizer):
        raise CheckpointError("the checkpoint was written with a different optimizer; use the same train.optimizer")
    for v, w in zip(optimizer.variables, checkpoint.optimizer):
        v.assign(w)
