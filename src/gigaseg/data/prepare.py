"""Prepare a region for training (image.npy, mask.npy, manifest.json, written atomically) and load it back."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gigaseg.atomic import remove_stale_temporaries, temporary_name, write_errors
from gigaseg.data.labels import BACKGROUND, IGNORE, TISSUE, LabelCounts, count_labels
from gigaseg.data.manifest import (
    IMAGE_NAME,
    MANIFEST_NAME,
    MASK_NAME,
    build_manifest,
    check_extra,
    read_manifest,
    relative_paths,
    slide_facts,
    write_manifest,
)
from gigaseg.data.masks import MaskSource, check_mask_tile
from gigaseg.data.regions import DEFAULT_PAD_VALUE, FittedRegion, RegionSpec, fit_region
from gigaseg.data.tilefile import create_npy, tiles
from gigaseg.errors import MaskError, RegionError, SlideError
from gigaseg.slides.base import SlideReader

log = logging.getLogger(__name__)

#: Suffixes of the sibling folders beside ``out_dir``: the one being built, and the previous one being replaced.
_BUILDING = ".tmp"
_REPLACED = ".old"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_region(reader: SlideReader, region: FittedRegion, mask_source: MaskSource, tmp: Path,
                  tile_size: int, progress: bool) -> LabelCounts:
    """Write image.npy and mask.npy into ``tmp`` tile by tile; return the pixels of each label."""
    width, height = region.size
    read_w, read_h = region.read_size
    totals = np.zeros(len(LabelCounts._fields), dtype=np.int64)
    ignore = bool(getattr(mask_source, "produces_ignore", False))
    pad_tile = np.empty((tile_size, tile_size, 3), dtype=np.uint8)
    pad_tile[:] = region.pad_value
    zero_mask = np.zeros((tile_size, tile_size), dtype=np.uint8)
    grid = list(tiles(height, width, tile_size))
    with create_npy(tmp / IMAGE_NAME, (height, width, 3)) as image_file, \
            create_npy(tmp / MASK_NAME, (height, width)) as mask_file:
        for row, col, h, w in tqdm(grid, desc=f"preparing {reader.name}", unit="tile", disable=not progress):
            # The part of this tile inside the read (in-slide) area; the rest is padding.
            in_w, in_h = max(0, min(w, read_w - col)), max(0, min(h, read_h - row))
            image = pad_tile[:h, :w].copy() if (in_w, in_h) != (w, h) else None
            mask = zero_mask[:h, :w].copy() if image is not None else None
            if in_w and in_h:
                location = region.level0(col, row)
                try:
                    pixels = reader.read_region(location, region.level, (in_w, in_h))
                except SlideError as exc:
                    raise SlideError(
                        f"{reader.name}: cannot read the region at level-0 ({region.x}, {region.y}), level "
                        f"{region.level}: tile at level-0 {location} of {in_w}x{in_h} px failed ({exc}); "
                        "the slide file may be corrupt"
                    ) from exc
                labels = check_mask_tile(mask_source.read(location, region.level, (in_w, in_h)), (in_w, in_h),
                                         f"mask source {type(mask_source).__name__}", ignore=ignore)
                if image is None:
                    image, mask = pixels, labels
                else:
                    image[:in_h, :in_w] = pixels
                    mask[:in_h, :in_w] = labels
            image_file.write(row, col, image)
            mask_file.write(row, col, mask)
            totals += count_labels(mask)
        image_file.sync()
        mask_file.sync()
    return LabelCounts(*(int(v) for v in totals))


def prepare_region(
    reader: SlideReader,
    spec: RegionSpec,
    mask_source: MaskSource,
    out_dir: str | Path,
    *,
    total_stride: int,
    fit: str = "pad",
    pad_value: tuple[int, int, int] = DEFAULT_PAD_VALUE,
    tile_size: int = 2048,
    extra_manifest: dict | None = None,
    progress: bool = False,
    slide_path: str | Path | None = None,
    dataset_dir: str | Path | None = None,
) -> dict:
    """Write a region's pixels, mask and manifest into ``out_dir``; return the manifest.

    Pixels are read tile by tile (memory for a few tiles only, whatever the region size).
    Everything is built in a temporary sibling folder that replaces ``out_dir`` only when
    complete, so a failure leaves the previous ``out_dir`` (or none), never a partial one.
    The slide file is taken from ``slide_path`` or the reader's ``path`` attribute. Paths under
    ``dataset_dir`` (default ``out_dir``'s parent) are written relative to ``out_dir``.
    Re-running with the same inputs writes byte-identical files.
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size <= 0:
        raise RegionError(f"tile_size must be a positive number of pixels, got {tile_size!r}")
    check_extra(extra_manifest)  # fail before the long work, not after it
    out_dir = Path(out_dir)
    region = fit_region(reader, spec, total_stride=total_stride, fit=fit, pad_value=pad_value)
    slide = slide_facts(reader, slide_path if slide_path is not None else getattr(reader, "path", None))
    with write_errors(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir, (_BUILDING, _REPLACED))  # left by runs killed on this host
        tmp = temporary_name(out_dir, _BUILDING)
        tmp.mkdir()
    try:
        with write_errors(out_dir, folder=tmp):
            scratch = tmp / ".scratch"
            scratch.mkdir()
            attach = getattr(mask_source, "attach", None)
            try:
                if attach is not None:
                    try:
                        attach(reader, region, scratch)
                    except SlideError as exc:
                        raise SlideError(
                            f"{reader.name}: cannot read the region at level-0 ({region.x}, {region.y}), level "
                            f"{region.level}, for the {getattr(mask_source, 'kind', 'mask')} mask ({exc})"
                        ) from exc
                counts = _write_region(reader, region, mask_source, tmp, tile_size, progress)
                mask_desc = mask_source.describe()
            finally:
                close = getattr(mask_source, "close", None)
                if close is not None:
                    close()
            shutil.rmtree(scratch)
            width, height = region.size
            manifest = build_manifest(
                slide=slide,
                region=region.describe(),
                mask=mask_desc,
                total_stride=total_stride,
                tissue_fraction=counts.tissue / (width * height),
                labelled_pixels=counts.labelled,
                image_shape=(height, width, 3),
                mask_shape=(height, width),
                extra=extra_manifest,
            )
            manifest = relative_paths(manifest, out_dir, dataset_dir)
            write_manifest(tmp / MANIFEST_NAME, manifest)
            _fsync_dir(tmp)
            old = None
            if out_dir.exists() or out_dir.is_symlink():
                old = temporary_name(out_dir, _REPLACED)
                out_dir.rename(old)
            tmp.rename(out_dir)
            _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    log.info("prepared %s: %dx%d px at level %d, tissue fraction %.3f, %d labelled px",
             out_dir, width, height, region.level, manifest["tissue_fraction"], counts.labelled)
    if counts.labelled == 0:
        log.warning("%s has no labelled pixel (every pixel is ignore), so training cannot use it; annotate "
                    "tissue or background inside the region, or count unannotated pixels as background", out_dir)
    return manifest


@dataclass(frozen=True)
class Region:
    """A prepared region: read-only memory-mapped pixels and mask, and its manifest."""

    image: np.ndarray  # H x W x 3 uint8, memory-mapped read-only
    mask: np.ndarray  # H x W uint8 0 background, 1 tissue, 255 ignore; memory-mapped read-only
    manifest: dict[str, Any]
    path: Path


_LABEL_VALUES = (BACKGROUND, TISSUE, IGNORE)


def _unknown_value(path: Path, chunk_bytes: int = 1 << 24) -> int | None:
    """A byte of a uint8 .npy's data that is no label value, or None; read in chunks (no mapping, bounded memory)."""
    mm = np.load(path, mmap_mode="r", allow_pickle=False)
    offset, nbytes = int(mm.offset), int(mm.nbytes)
    del mm
    with open(path, "rb") as f:
        for start in range(0, nbytes, chunk_bytes):
            f.seek(offset + start)
            block = np.frombuffer(f.read(min(chunk_bytes, nbytes - start)), dtype=np.uint8)
            present = np.flatnonzero(np.bincount(block, minlength=256))
            unknown = np.setdiff1d(present, _LABEL_VALUES)
            if unknown.size:
                return int(unknown[0])
    return None


def load_region(path: str | Path, *, check_mask: bool = True) -> Region:
    """Open a folder written by ``prepare_region``, checking that its files agree with each other.

    With ``check_mask`` the mask is scanned once (in chunks) to confirm it holds only
    0 (background), 1 (tissue) and 255 (ignore).
    """
    path = Path(path)
    hint = "re-run gigaseg-prepare for this region"
    if not path.is_dir():
        raise RegionError(f"no prepared region at {path}; {hint}")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise RegionError(f"{path} has no {MANIFEST_NAME}; it is not a prepared region; {hint}")
    manifest = read_manifest(manifest_path)
    arrays = {}
    for name in (IMAGE_NAME, MASK_NAME):
        file = path / name
        if not file.is_file():
            raise RegionError(f"{path} has no {name}; {hint}")
        try:
            arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RegionError(f"{file} is not a readable .npy array ({exc}); {hint}") from exc
    image, mask = arrays[IMAGE_NAME], arrays[MASK_NAME]
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise RegionError(f"{path / IMAGE_NAME} is {image.shape} {image.dtype}, expected H x W x 3 uint8; {hint}")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise MaskError(f"{path / MASK_NAME} is {mask.shape} {mask.dtype}, expected H x W uint8; {hint}")
    if mask.shape != image.shape[:2]:
        raise MaskError(f"{path}: mask is {mask.shape} but image is {image.shape[:2]} (h x w); {hint}")
    files = manifest.get("files", {})
    for key, array in (("image", image), ("mask", mask)):
        expected = files.get(key, {}).get("shape")
        if expected is not None and list(array.shape) != list(expected):
            raise RegionError(
                f"{path}: {key} is {tuple(array.shape)} but the manifest says {tuple(expected)}; {hint}"
            )
    if check_mask:
        unknown = _unknown_value(path / MASK_NAME)
        if unknown is not None:
            raise MaskError(
                f"{path / MASK_NAME} holds value {unknown}; a mask must hold 0 (background), 1 (tissue) "
                f"or 255 (ignore); {hint}"
            )
    return Region(image=image, mask=mask, manifest=manifest, path=path)
