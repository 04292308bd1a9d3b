"""The manifest of a prepared region: what was read, from where, and how, as canonical JSON.

Nothing in it depends on when or where it was written (no timestamps, sorted keys), so a
re-run with the same inputs writes the same bytes; DVC relies on that.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

import gigaseg
from gigaseg.errors import RegionError

MANIFEST_NAME = "manifest.json"
IMAGE_NAME = "image.npy"
MASK_NAME = "mask.tiff"
#: 2: the mask as a tiled TIFF, pixels read from the slide unless decoded to image.npy.
FORMAT_VERSION = 2

#: Keys of the manifest that ``extra_manifest`` may not override.
RESERVED_KEYS = frozenset(
    {"format_version", "gigaseg_version", "slide", "region", "mask", "total_stride", "tissue_fraction",
     "labelled_pixels", "files"}
)


def file_sha256(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks so that multi-gigabyte slides need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """Turn numpy scalars, tuples and paths into JSON values; reject NaN and infinities."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"manifest value {value} is not a finite number")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"manifest value {value!r} of type {type(value).__name__} is not JSON-ready")


def dumps(manifest: dict) -> str:
    """Canonical JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(_plain(manifest), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_manifest(path: str | Path, manifest: dict) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(dumps(manifest))


def read_manifest(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise RegionError(f"{path} is not a readable manifest ({exc}); re-run gigaseg-prepare") from exc
    if not isinstance(manifest, dict):
        raise RegionError(f"{path} does not hold a JSON object; re-run gigaseg-prepare")
    return manifest


def slide_facts(reader: Any, slide_path: str | Path | None, sha256: str | None = None) -> dict:
    """Name, path, checksum and geometry of the slide a region was read from (``sha256``: the file's, if known)."""
    path = Path(slide_path) if slide_path is not None else None
    if sha256 is None and path is not None and path.is_file():
        sha256 = file_sha256(path)
    facts: dict[str, Any] = {
        "name": path.name if path is not None else reader.name,
        # Absolute, so that the region finds its slide from any working directory (relative_paths
        # then writes it relative to the region when the slide lies in the dataset folder).
        "path": os.path.abspath(path) if path is not None else None,
        "sha256": sha256,
        "bytes": path.stat().st_size if path is not None and path.is_file() else None,
        "dimensions": list(reader.dimensions),
        "level_count": reader.level_count,
        "level_downsamples": [float(d) for d in reader.level_downsamples],
        "mpp": None if reader.mpp is None else [float(v) for v in reader.mpp],
    }
    return facts


def relative_paths(manifest: Any, region_dir: Path, base: Path | None = None) -> Any:
    """Paths inside the region's dataset folder, written relative to the region folder.

    A manifest must not depend on where the project was cloned: the same recipe prepared
    in another checkout has to give the same bytes (DVC records their digest). Values of
    keys ending in ``path`` that point into ``base`` (default ``region_dir``'s parent: the
    dataset folder) become relative to ``region_dir`` (``../../slides/s0.tiff``); paths
    elsewhere stay as given.
    """
    if base is None:
        base = Path(os.path.abspath(region_dir)).parent
    base = Path(os.path.abspath(base))
    if isinstance(manifest, dict):
        out = {}
        for key, value in manifest.items():
            if isinstance(key, str) and key.endswith("path") and isinstance(value, str) and value:
                # A relative path is relative to the working directory, as the user gave it.
                resolved = Path(os.path.abspath(value))  # not following links: DVC may link data into its cache
                if resolved == base or base in resolved.parents:
                    value = os.path.relpath(resolved, os.path.abspath(region_dir))
            else:
                value = relative_paths(value, region_dir, base)
            out[key] = value
        return out
    if isinstance(manifest, list):
        return [relative_paths(v, region_dir, base) for v in manifest]
    return manifest


def check_extra(extra: dict | None) -> dict:
    """Return ``extra`` as JSON-ready values, refusing keys gigaseg writes itself."""
    extra = dict(extra or {})
    clash = sorted(RESERVED_KEYS & set(extra))
    if clash:
        raise ValueError(f"extra_manifest may not set {', '.join(clash)}: gigaseg writes those itself")
    return _plain(extra)


def build_manifest(
    *,
    slide: dict,
    region: dict,
    mask: dict,
    total_stride: int,
    tissue_fraction: float,
    labelled_pixels: int,
    image_shape: tuple[int, ...],
    mask_shape: tuple[int, ...],
    decoded: bool,
    extra: dict | None = None,
) -> dict:
    """Assemble the manifest; ``extra`` (e.g. ``{"seed": 3}``) is merged at the top level.

    ``tissue_fraction`` is the share of mask pixels that are 1 over the whole fitted region,
    padding included (padding is background). ``labelled_pixels`` counts the pixels that are
    0 or 1, i.e. not ignore (255): those the loss and the metrics see. ``decoded`` says
    whether the pixels were written to ``image.npy``; otherwise they are read from the slide.
    """
    image = {"shape": list(image_shape), "dtype": "uint8"}
    image.update({"name": IMAGE_NAME} if decoded else {"source": "slide"})
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "gigaseg_version": gigaseg.__version__,
        "slide": slide,
        "region": region,
        "mask": mask,
        "total_stride": int(total_stride),
        "tissue_fraction": float(tissue_fraction),
        "labelled_pixels": int(labelled_pixels),
        "files": {
            "image": image,
            "mask": {"name": MASK_NAME, "shape": list(mask_shape), "dtype": "uint8"},
            "manifest": {"name": MANIFEST_NAME},
        },
    }
    manifest.update(check_extra(extra))
    manifest.setdefault("seed", None)
    return manifest
