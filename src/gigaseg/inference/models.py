"""Load a trained model for inference from a local MLflow model folder or a ``.keras`` file, without running stored code.

Keras loads the architecture from its JSON config with ``safe_mode=True`` (no lambdas, no
pickles); the metadata training records with the model (level, mpp, total stride,
threshold) is read from the folder's ``MLmodel`` file with a YAML safe loader, or from the
``gigaseg.json`` member that ``save_keras`` adds to an exported ``.keras`` file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gigaseg.errors import GigasegError

log = logging.getLogger(__name__)

#: Where ``mlflow.tensorflow.log_model`` puts a Keras 3 model inside the model folder.
KERAS_FILE = Path("data") / "model.keras"
DEFAULT_THRESHOLD = 0.5
#: The member of an exported ``.keras`` file (a zip) that holds the training metadata; Keras ignores it.
METADATA_MEMBER = "gigaseg.json"


class ModelError(GigasegError):
    """A model cannot be found, loaded or used for tiled inference."""


@dataclass
class LoadedModel:
    """A Keras model ready for inference, with what training recorded about it."""

    model: Any
    path: Path
    total_stride: int
    level: int | None = None
    mpp: float | None = None
    threshold: float = DEFAULT_THRESHOLD
    run_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def read_mlmodel(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``MLmodel`` file of an MLflow model folder."""
    import yaml

    path = Path(folder) / "MLmodel"
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ModelError(f"{folder} is not an MLflow model folder (no readable MLmodel file: {exc})") from exc
    except yaml.YAMLError as exc:
        raise ModelError(f"{path} is not valid YAML ({exc}); the model folder is damaged") from exc
    if not isinstance(spec, dict):
        raise ModelError(f"{path} does not describe a model; the model folder is damaged")
    return spec


def _keras_file(folder: Path, spec: dict[str, Any]) -> Path:
    flavor = (spec.get("flavors") or {}).get("tensorflow") or (spec.get("flavors") or {}).get("keras")
    if not flavor:
        raise ModelError(
            f"{folder} holds an MLflow model without a TensorFlow/Keras flavour; give a model logged by gigaseg-train"
        )
    candidates = [folder / str(flavor.get("data", "data")) / "model.keras", folder / KERAS_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"{folder}: no Keras 3 model file (data/model.keras) in the MLflow model; "
        "models saved in the TensorFlow SavedModel format are not supported"
    )


def save_keras(loaded: LoadedModel, path: str | os.PathLike) -> None:
    """Write ``loaded``'s model to the ``.keras`` file ``path``, with its training metadata and run id inside.

    ``keras.saving.load_model`` reads the file as any other; ``load_model`` here also gets the
    level, mpp and threshold back, so a prediction from the file matches one from the MLflow model.
    """
    import json
    import zipfile

    import keras

    keras.saving.save_model(loaded.model, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(METADATA_MEMBER, json.dumps({"metadata": loaded.metadata, "run_id": loaded.run_id},
                                                     indent=2, sort_keys=True))


def _keras_metadata(path: Path) -> tuple[dict[str, Any], str | None]:
    """The metadata and run id ``save_keras`` put in a ``.keras`` file; ({}, None) for other ``.keras`` files."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            if METADATA_MEMBER not in archive.namelist():
                return {}, None
            recorded = json.loads(archive.read(METADATA_MEMBER))
    except (OSError, zipfile.BadZipFile, ValueError):
        return {}, None  # Keras names what is wrong with the file when it loads it
    if not isinstance(recorded, dict) or not isinstance(recorded.get("metadata"), dict):
        raise ModelError(f"{path}: its {METADATA_MEMBER} does not hold gigaseg metadata; the file is damaged")
    run_id = recorded.get("run_id")
    return dict(recorded["metadata"]), None if run_id is None else str(run_id)


def _optional_float(value: Any, name: str, where: Path) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: metadata {name}={value!r} is not a number") from exc


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a model from an MLflow model folder (with ``MLmodel``) or a ``.keras`` file.

    Raises ``ModelError`` when the path is missing, not a model, or the model cannot be
    tiled (layers mixing pixels across the image, non-RGB input).
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"no such model: {path}; give an MLflow model folder, a .keras file, or a runs:/ or models:/ URI")
    metadata: dict[str, Any] = {}
    run_id = None
    if path.is_dir():
        spec = read_mlmodel(path)
        keras_file = _keras_file(path, spec)
        metadata = dict(spec.get("metadata") or {})
        run_id = spec.get("run_id")
    elif path.suffix == ".keras":
        keras_file = path
        metadata, run_id = _keras_metadata(path)
    else:
        raise ModelError(f"{path} is neither an MLflow model folder nor a .keras file")

    import keras

    from gigaseg.streaming.geometry import model_geometry

    try:
        model = keras.saving.load_model(keras_file, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors, ... for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the Keras model {keras_file}: {first}") from exc
    if len(model.inputs) != 1 or model.inputs[0].shape[-1] != 3:
        raise ModelError(f"{keras_file}: the model must take one RGB image input, got inputs {model.inputs}")
    try:
        geometry = model_geometry(model)
    except ValueError as exc:
        raise ModelError(f"{keras_file}: the model cannot be evaluated tile by tile: {exc}") from exc

    recorded = metadata.get("gigaseg_total_stride")
    if recorded is not None and int(recorded) != geometry.total_stride:
        log.warning("%s: recorded total stride %s differs from the layers' %d; using the layers'",
                    path, recorded, geometry.total_stride)
    level = metadata.get("gigaseg_level")
    threshold = _optional_float(metadata.get("gigaseg_threshold"), "gigaseg_threshold", path)
    return LoadedModel(
        model=model,
        path=path,
        total_stride=geometry.total_stride,
        level=None if level is None else int(level),
        mpp=_optional_float(metadata.get("gigaseg_mpp"), "gigaseg_mpp", path),
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
        run_id=None if run_id is None else str(run_id),
        metadata=metadata,
    )
