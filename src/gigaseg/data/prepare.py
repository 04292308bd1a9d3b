"""Prepare a region for training (mask.tiff, manifest.json and, when decoded, image.npy; written atomically) and load it back."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gigaseg.atomic import remove_stale_temporaries, temporary_name, write_errors
from gigaseg.data.labels import LabelCounts, count_labels
from gigaseg.data.manifest import (
    IMAGE_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MASK_NAME,
    build_manifest,
    check_extra,
    read_manifest,
    relative_paths,
    slide_facts,
    write_manifest,
)
from gigaseg.data.maskfile import TILE, TiledMask, write_mask
from gigaseg.data.masks import MaskSource, check_mask_tile
from gigaseg.data.regions import DEFAULT_PAD_VALUE, FittedRegion, RegionSpec, fit_region
from gigaseg.data.tilefile import create_npy, tiles
from gigaseg.errors import MaskError, RegionError, SlideError
from gigaseg.data.windows import SlideWindows, reads_are_positional
from gigaseg.slides.base import SlideReader
from gigaseg.slides.tiff_tiles import VENDORS as WINDOW_VENDORS

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


def _mask_tiles(region: FittedRegion, mask_source: MaskSource, totals: np.ndarray, progress: bool, name: str):
    """The region's mask as full TILE x TILE tiles in row-major order, counting its labels into ``totals``.

    The mask source is read a band of tiles at a time (padding, right and bottom, is background).
    """
    width, height = region.size
    read_w, read_h = region.read_size
    ignore = bool(getattr(mask_source, "produces_ignore", False))
    band_w = 8 * TILE
    for row in tqdm(range(0, height, TILE), desc=f"mask of {name}", unit="band", disable=not progress):
        h = min(TILE, height - row)
        for col in range(0, width, band_w):
            w = min(band_w, width - col)
            band = np.zeros((TILE, -(-w // TILE) * TILE), np.uint8)
            in_w, in_h = max(0, min(w, read_w - col)), max(0, min(h, read_h - row))
            if in_w and in_h:
                location = region.level0(col, row)
                band[:in_h, :in_w] = check_mask_tile(mask_source.read(location, region.level, (in_w, in_h)),
                                                     (in_w, in_h), f"mask source {type(mask_source).__name__}",
                                                     ignore=ignore)
            totals += count_labels(band[:h, :w])
            for left in range(0, band.shape[1], TILE):
                yield band[:, left : left + TILE]


def _write_mask(region: FittedRegion, mask_source: MaskSource, tmp: Path, progress: bool, name: str) -> LabelCounts:
    """Write the region's mask (``mask.tiff``) into ``tmp``; return the pixels of each label."""
    totals = np.zeros(len(LabelCounts._fields), dtype=np.int64)
    width, height = region.size
    with open(tmp / MASK_NAME, "wb") as f:
        write_mask(f, _mask_tiles(region, mask_source, totals, progress, name), (height, width))
        f.flush()
        os.fsync(f.fileno())
    return LabelCounts(*(int(v) for v in totals))


def _read_image(reader: SlideReader, region: FittedRegion, tile_size: int, progress: bool,
                image_path: Path | None) -> None:
    """Read the region's pixels tile by tile, writing them to ``image_path`` (a decoded copy) when given.

    Without a copy to write the pixels are still read once: a tile the slide cannot give
    fails preparation, not a training run hours later.
    """
    width, height = region.size
    read_w, read_h = region.read_size
    pad_tile = np.empty((tile_size, tile_size, 3), dtype=np.uint8)
    pad_tile[:] = region.pad_value
    grid = list(tiles(height, width, tile_size))
    with contextlib.ExitStack() as stack:
        image_file = None if image_path is None else stack.enter_context(create_npy(image_path, (height, width, 3)))
        verb = "decoding" if image_file is not None else "reading"
        for row, col, h, w in tqdm(grid, desc=f"{verb} {reader.name}", unit="tile", disable=not progress):
            # The part of this tile inside the read (in-slide) area; the rest is padding.
            in_w, in_h = max(0, min(w, read_w - col)), max(0, min(h, read_h - row))
            image = pad_tile[:h, :w].copy() if (in_w, in_h) != (w, h) else None
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
                if image is None:
                    image = pixels
                else:
                    image[:in_h, :in_w] = pixels
            if image_file is not None:
                image_file.write(row, col, image)
        if image_file is not None:
            image_file.sync()


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
    decoded_cache: bool = False,
    slide_sha256: str | None = None,
) -> dict:
    """Write a region's mask and manifest into ``out_dir``; return the manifest.

    The region's pixels stay in the slide: training reads its windows from the slide file
    (:class:`gigaseg.data.windows.SlideWindows`). They are decoded into ``image.npy`` only
    with ``decoded_cache``, or when windows could differ from the whole region's pixels (a
    format other than generic TIFF or Aperio SVS, a level whose downsample is not a whole
    number, a region starting between level pixels) or the reader has no file to reopen. Either way every pixel is read
    once, so a slide that cannot be read fails here.

    Pixels are read tile by tile (memory for a few tiles only, whatever the region size).
    Everything is built in a temporary sibling folder that replaces ``out_dir`` only when
    complete, so a failure leaves the previous ``out_dir`` (or none), never a partial one.
    The slide file is taken from ``slide_path`` or the reader's ``path`` attribute. Paths under
    ``dataset_dir`` (default ``out_dir``'s parent) are written relative to ``out_dir``.
    ``slide_sha256`` spares hashing the slide again when the caller has its digest.
    Re-running with the same inputs writes byte-identical files.
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size <= 0:
        raise RegionError(f"tile_size must be a positive number of pixels, got {tile_size!r}")
    check_extra(extra_manifest)  # fail before the long work, not after it
    out_dir = Path(out_dir)
    region = fit_region(reader, spec, total_stride=total_stride, fit=fit, pad_value=pad_value)
    slide_file = slide_path if slide_path is not None else getattr(reader, "path", None)
    slide = slide_facts(reader, slide_file, slide_sha256)
    # Windows come from the slide where their pixels are known to be the whole region's: TIFF
    # pyramids OpenSlide reads tile for tile (generic TIFF, Aperio SVS), at whole level pixels.
    # Other formats (overlapping or offset tiles: MIRAX, NDPI, VMS) are decoded once, here.
    from_slide = (slide_file is not None and Path(slide_file).is_file()
                  and getattr(reader, "vendor", None) in WINDOW_VENDORS
                  and reads_are_positional(reader, region.x, region.y, region.level))
    decoded = decoded_cache or not from_slide
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
                _read_image(reader, region, tile_size, progress, tmp / IMAGE_NAME if decoded else None)
                counts = _write_mask(region, mask_source, tmp, progress, out_dir.name)
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
                decoded=decoded,
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
    """A prepared region: its pixels and mask, read a window at a time, and its manifest."""

    image: SlideWindows | np.ndarray  # H x W x 3 uint8: windows of the slide, or a read-only memory map
    mask: TiledMask  # H x W uint8: 0 background, 1 tissue, 255 ignore
    manifest: dict[str, Any]
    path: Path


def _slide_windows(path: Path, manifest: dict, hint: str) -> SlideWindows:
    """The region's pixels as windows of the slide the manifest names, after checking it is the same file."""
    slide, region = manifest.get("slide") or {}, manifest.get("region") or {}
    if not slide.get("path"):
        raise RegionError(f"{path}: the manifest names no slide file to read the pixels from; {hint}")
    file = Path(os.path.normpath(os.path.join(os.path.abspath(path), slide["path"])))  # as the manifest wrote it
    if not file.is_file():
        raise RegionError(f"{path}: its slide {file} is missing; restore the slide (dvc pull) or {hint}")
    if slide.get("bytes") is not None and file.stat().st_size != slide["bytes"]:
        raise RegionError(f"{path}: its slide {file} changed since the region was prepared "
                          f"({file.stat().st_size} bytes, was {slide['bytes']}); {hint}")
    try:
        width, height = int(region["width"]), int(region["height"])
        padding = region["padding"]
        return SlideWindows(
            file, x=int(region["x"]), y=int(region["y"]), level=int(region["level"]),
            downsample=float(region["downsample"]), size=(width, height),
            read_size=(width - int(padding["right"]), height - int(padding["bottom"])),
            pad_value=tuple(int(v) for v in padding["value"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RegionError(f"{path}: the manifest's region is incomplete ({exc!r}); {hint}") from exc


def load_region(path: str | Path) -> Region:
    """Open a folder written by ``prepare_region``, checking that its files agree with each other.

    Nothing is read but the manifest and the files' headers; the mask's values are checked
    as its tiles are decoded.
    """
    path = Path(path)
    hint = "re-run gigaseg-prepare for this region"
    if not path.is_dir():
        raise RegionError(f"no prepared region at {path}; {hint}")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise RegionError(f"{path} has no {MANIFEST_NAME}; it is not a prepared region; {hint}")
    manifest = read_manifest(manifest_path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RegionError(f"{path} was prepared by another gigaseg version (format "
                          f"{manifest.get('format_version')}, this one reads {FORMAT_VERSION}); {hint}")
    files = manifest.get("files", {})
    if not (path / MASK_NAME).is_file():
        raise RegionError(f"{path} has no {MASK_NAME}; {hint}")
    mask = TiledMask(path / MASK_NAME)
    if "name" in files.get("image", {}):
        file = path / IMAGE_NAME
        if not file.is_file():
            raise RegionError(f"{path} has no {IMAGE_NAME}; {hint}")
        try:
            image = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RegionError(f"{file} is not a readable .npy array ({exc}); {hint}") from exc
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise RegionError(f"{file} is {image.shape} {image.dtype}, expected H x W x 3 uint8; {hint}")
    else:
        image = _slide_windows(path, manifest, hint)
    if tuple(mask.shape) != tuple(image.shape[:2]):
        raise MaskError(f"{path}: mask is {tuple(mask.shape)} but image is {tuple(image.shape[:2])} (h x w); {hint}")
    for key, array in (("image", image), ("mask", mask)):
        expected = files.get(key, {}).get("shape")
        if expected is not None and list(array.shape) != list(expected):
            raise RegionError(
                f"{path}: {key} is {tuple(array.shape)} but the manifest says {tuple(expected)}; {hint}"
            )
    return Region(image=image, mask=mask, manifest=manifest, path=path)
