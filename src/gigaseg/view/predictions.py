"""The predictions a viewer shows: folders that ``gigaseg-predict`` wrote, found under a folder and resolved once.

Every file the viewer may read is named here, at start-up, by its resolved path: the files a
prediction's ``summary.json`` lists (plain names, inside the folder, symbolic links that
leave the folder refused), the slide it names, and the evaluation written beside it with the
reference mask that evaluation names. Nothing else is ever opened.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gigaseg.errors import ConfigError

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
EVALUATION_FILE = "evaluation.json"
#: What a prediction folder's files are served as: name in the URL -> the summary's ``files`` key (or a fixed name).
SERVED_FILES = {"overlay.png": "overlay", "outlines.geojson": "outlines", "summary.json": None, "evaluation.json": None}
#: Folders this deep below the given one are not searched (a multirun is date/time/job).
MAX_DEPTH = 6


@dataclass(frozen=True)
class Reference:
    """The reference an evaluation beside a prediction compared it with."""

    path: Path
    #: geojson | mask | synthetic (``gigaseg.evaluation_inputs``)
    kind: str
    #: GeoJSON: level-0 (x, y) of QuPath's origin, added to its coordinates.
    bounds_offset: tuple[int, int] = (0, 0)
    #: Probability masks as references: stored values at least this are tissue.
    cut: int | None = None


@dataclass(frozen=True)
class Prediction:
    """One slide's prediction folder and everything the viewer may read for it, resolved."""

    id: int
    name: str
    folder: Path
    summary: dict[str, Any]
    #: Files served as they are, by their name in the URL.
    files: dict[str, Path]
    mask: Path | None
    slide: Path | None
    evaluation: dict[str, Any] | None = None
    reference: Reference | None = None
    #: What the viewer could not find, said on the slide page and in the log.
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def dice(self) -> float | None:
        overall = (self.evaluation or {}).get("overall") or {}
        value = overall.get("dice")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def downsample(self) -> float:
        """Level-0 pixels per mask pixel."""
        return float(self.summary.get("downsample") or 1.0)

    @property
    def level0_size(self) -> tuple[int, int]:
        """The slide's level-0 (width, height) as the summary records it (the mask's size times its downsample)."""
        return (round(int(self.summary["width"]) * self.downsample), round(int(self.summary["height"]) * self.downsample))

    @property
    def base_mpp(self) -> float | None:
        """Microns per level-0 pixel, or None when the slide does not say."""
        mpp = self.summary.get("mpp")
        return float(mpp) / self.downsample if isinstance(mpp, (int, float)) and mpp > 0 else None


def inside(path: Path, folder: Path) -> Path | None:
    """``path`` resolved, when it is a file inside ``folder`` (resolved) also after following links; else None."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not resolved.is_file() or folder not in resolved.parents:
        return None
    return resolved


def _existing_file(value: Any) -> Path | None:
    """An absolute path recorded in a summary or evaluation, resolved, when it names an existing file."""
    if not isinstance(value, str) or not value or not os.path.isabs(value):
        return None
    try:
        resolved = Path(value).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return resolved if resolved.is_file() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_prediction(summary: dict[str, Any] | None) -> bool:
    """Whether a ``summary.json`` is one that gigaseg-predict wrote."""
    return bool(summary) and isinstance(summary.get("files"), dict) and all(
        k in summary for k in ("slide", "width", "height", "downsample", "kind"))


def _reference(evaluation: dict[str, Any], notes: list[str]) -> Reference | None:
    inputs = (evaluation.get("inputs") or {}).get("reference") or {}
    recorded = (evaluation.get("paths") or {}).get("reference") or inputs.get("path")
    path = _existing_file(recorded)
    if path is None:
        if recorded:
            notes.append(f"the evaluation's reference {recorded} is not an existing file given by its absolute path")
        return None
    kind = str(inputs.get("kind") or "mask")
    offset = inputs.get("bounds_offset") or (0, 0)
    cut = inputs.get("cut") if isinstance(inputs.get("cut"), int) else None
    return Reference(path, kind, (int(offset[0]), int(offset[1])), cut)


def load_prediction(folder: Path, id: int, name: str | None = None, notes: tuple[str, ...] = ()) -> Prediction | None:
    """The prediction in ``folder`` (resolved), or None when its ``summary.json`` is not gigaseg-predict's."""
    folder = folder.resolve()
    summary = _read_json(folder / SUMMARY_FILE)
    if not is_prediction(summary):
        return None
    found = list(notes)
    listed = summary.get("files") or {}
    files: dict[str, Path] = {}
    for url_name, key in SERVED_FILES.items():
        file_name = url_name if key is None else str(listed.get(key) or url_name)
        if Path(file_name).name != file_name or file_name in (".", ".."):
            found.append(f"summary.json names {file_name!r}, which is not a file in the folder: not shown")
            continue
        path = inside(folder / file_name, folder)
        if path is not None:
            files[url_name] = path
        elif os.path.lexists(folder / file_name):
            found.append(f"{file_name} leaves the prediction folder (a link to elsewhere): not shown")
    mask_name = str(listed.get("mask") or "mask.tiff")
    mask = inside(folder / mask_name, folder) if Path(mask_name).name == mask_name else None
    if mask is None:
        found.append(f"no predicted mask ({mask_name}) in {folder}")
    slide = _existing_file(summary.get("slide"))
    if slide is None:
        found.append(f"the slide {summary.get('slide')} is not there: only the mask and outlines are shown")
    evaluation = _read_json(files["evaluation.json"]) if "evaluation.json" in files else None
    reference = _reference(evaluation, found) if evaluation else None
    label = name or _slide_name(str(summary.get("slide") or folder.name))
    return Prediction(id, label, folder, summary, files, mask, slide, evaluation, reference, tuple(found))


def _slide_name(path: str) -> str:
    from gigaseg.data.cohort import slide_name

    return slide_name(path)


def find_predictions(root: str | os.PathLike) -> list[Prediction]:
    """The predictions in ``root``: the folder itself, or every folder below it (a multirun) holding a prediction.

    Folders are walked without following symbolic links, hidden ones (``.hydra``) skipped; the
    order is by path, so a slide keeps its number while the folder does not change.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise ConfigError(f"dir={root}: no such folder; give a folder gigaseg-predict wrote, or a multirun folder of them")
    if not root_path.is_dir():
        raise ConfigError(f"dir={root} is a file; give the folder gigaseg-predict wrote (it holds summary.json)")
    root_path = root_path.resolve()
    folders = []
    for here, dirs, names in os.walk(root_path):
        depth = len(Path(here).relative_to(root_path).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
        if SUMMARY_FILE in names:
            folders.append(Path(here))
    predictions = []
    for folder in sorted(folders):
        prediction = load_prediction(folder, len(predictions))
        if prediction is not None:
            predictions.append(prediction)
    if not predictions:
        raise ConfigError(f"dir={root} holds no prediction (no summary.json of gigaseg-predict in it or below it); "
                          "give a folder gigaseg-predict wrote, e.g. its output_dir")
    for prediction in predictions:
        for note in prediction.notes:
            log.warning("%s: %s", prediction.name, note)
    return predictions
