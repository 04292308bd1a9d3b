"""Write synthetic H&E slides as pyramidal JPEG TIFFs with their exact tissue mask, and read the mask.

The slide opens in OpenSlide as ``generic-tiff`` with a real microns-per-pixel value. The
mask TIFF has the same level geometry (tiled, deflate, 0 = background, 255 = tissue).
Level 0 is rendered tile by tile (optionally in worker processes); coarser levels are 4x
area averages (masks: majority votes) built from strips kept in temporary files, so memory
stays bounded whatever the slide size. The same seed gives the same bytes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import imagecodecs
import numpy as np
import tifffile
from tqdm import tqdm

from gigaseg.atomic import atomic_path, scratch_dir, write_errors
from gigaseg.errors import ConfigError, MaskError
from gigaseg.slides.synthetic_layout import SyntheticLayout, make_layout
from gigaseg.slides.synthetic_render import render_region

log = logging.getLogger(__name__)

__all__ = ["make_layout", "pyramid_dimensions", "read_mask_region", "render_region", "write_synthetic_slide"]

#: Each pyramid level is this many times smaller than the one above.
LEVEL_FACTOR = 4
JPEG_QUALITY = 85
_SOFTWARE = "gigaseg synthetic slide"


def pyramid_dimensions(height: int, width: int, tile_size: int) -> list[tuple[int, int]]:
    """(width, height) of every level: divide by 4 until a level fits in one or two tiles."""
    dims = [(width, height)]
    while True:
        w, h = dims[-1]
        if math.ceil(w / tile_size) * math.ceil(h / tile_size) <= 2 or min(w, h) < LEVEL_FACTOR:
            return dims
        dims.append((w // LEVEL_FACTOR, h // LEVEL_FACTOR))


def _downsample_rgb(rgb: np.ndarray) -> np.ndarray:
    """4x4 area mean of RGB with exact integer rounding (whole blocks only)."""
    f = LEVEL_FACTOR
    h, w = rgb.shape[0] // f, rgb.shape[1] // f
    blocks = rgb[: h * f, : w * f].reshape(h, f, w, f, 3).astype(np.uint16).sum(axis=(1, 3))
    return ((blocks + f * f // 2) // (f * f)).astype(np.uint8)


def _downsample_mask(mask: np.ndarray) -> np.ndarray:
    """4x4 majority vote of a 0/1 mask (ties count as tissue)."""
    f = LEVEL_FACTOR
    h, w = mask.shape[0] // f, mask.shape[1] // f
    votes = mask[: h * f, : w * f].reshape(h, f, w, f).astype(np.uint16).sum(axis=(1, 3))
    return (votes * 2 >= f * f).astype(np.uint8)


def _encode_rgb(tile: np.ndarray, size: int) -> bytes:
    h, w = tile.shape[:2]
    if (h, w) != (size, size):
        # Edge tiles are padded by repeating the border, which compresses well and adds no ringing.
        tile = np.pad(tile, ((0, size - h), (0, size - w), (0, 0)), mode="edge")
    return imagecodecs.jpeg8_encode(tile, level=JPEG_QUALITY)


def _encode_mask(tile: np.ndarray, size: int) -> bytes:
    h, w = tile.shape
    full = np.zeros((size, size), np.uint8)
    full[:h, :w] = tile * np.uint8(255)
    return imagecodecs.zlib_encode(full, level=6)


# Per-process state of the level-0 renderers, set once by the pool initialiser.
_LAYOUT: SyntheticLayout | None = None
_TILE_SIZE = 0


def _init_tile_worker(layout: SyntheticLayout, tile_size: int, in_pool: bool = False) -> None:
    global _LAYOUT, _TILE_SIZE
    _LAYOUT, _TILE_SIZE = layout, tile_size
    if in_pool:
        # The parent handles Ctrl-C and cleans up; workers just stop when it terminates them.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _render_tile(job: tuple[int, int, int, int]) -> tuple[bytes, bytes, np.ndarray, np.ndarray, int]:
    """Render, encode and downsample one level-0 tile (runs in a worker process)."""
    x, y, w, h = job
    rgb, mask = render_region(_LAYOUT, (x, y), (w, h))
    small, small_mask = _downsample_rgb(rgb), _downsample_mask(mask)
    return _encode_rgb(rgb, _TILE_SIZE), _encode_mask(mask, _TILE_SIZE), small, small_mask, int(mask.sum())


class _Strips:
    """A level kept as raw rows in a temporary file, written top to bottom, read back in strips."""

    def __init__(self, folder: str, name: str, width: int, height: int, channels: int) -> None:
        self.path = os.path.join(folder, name)
        self.width, self.height, self.channels = width, height, channels
        self.row_bytes = width * channels
        self._file: BinaryIO = open(self.path, "w+b")
        self._rows = 0

    def append(self, rows: np.ndarray) -> None:
        rows = rows[: self.height - self._rows, : self.width]
        self._file.write(np.ascontiguousarray(rows).tobytes())
        self._rows += rows.shape[0]

    def read(self, y0: int, y1: int) -> np.ndarray:
        self._file.seek(y0 * self.row_bytes)
        data = self._file.read((y1 - y0) * self.row_bytes)
        shape = (y1 - y0, self.width) + ((self.channels,) if self.channels > 1 else ())
        return np.frombuffer(data, np.uint8).reshape(shape)

    def close(self) -> None:
        self._file.close()


def _write_kwargs(level: int, mpp: float, downsample: float, tile_size: int) -> dict:
    res = 1e4 / (mpp * downsample)  # pixels per centimetre
    return dict(
        tile=(tile_size, tile_size), resolution=(res, res), resolutionunit="CENTIMETER",
        subfiletype=0 if level == 0 else 1, metadata=None, software=_SOFTWARE,
    )


def _level_tiles(
    source: _Strips, next_level: _Strips | None, mask: bool, tile_size: int, bar: tqdm
) -> Iterator[bytes]:
    """Encode one stored level tile by tile, feeding the next level's strips as it goes."""
    t = tile_size
    for y0 in range(0, source.height, t):
        strip = source.read(y0, min(source.height, y0 + t))
        # Feed the next level before yielding: tifffile stops pulling after the last tile.
        if next_level is not None:
            next_level.append(_downsample_mask(strip) if mask else _downsample_rgb(strip))
        for x0 in range(0, source.width, t):
            tile = strip[:, x0 : x0 + t]
            yield _encode_mask(tile, t) if mask else _encode_rgb(tile, t)
            bar.update(1)


def _check_args(height: int, width: int, mpp: float, tile_size: int) -> None:
    if int(height) < 1 or int(width) < 1:
        raise ConfigError(f"synthetic slide size {width}x{height} (width x height) must be at least 1x1 pixels")
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and 0.05 <= mpp <= 50):
        raise ConfigError(f"synthetic slide mpp={mpp!r} must be a number of microns per pixel between 0.05 and 50")
    if tile_size < 16 or tile_size % 16:
        raise ConfigError(f"synthetic slide tile_size={tile_size} must be a positive multiple of 16 (a TIFF rule)")


def write_synthetic_slide(
    path: str | os.PathLike,
    *,
    height: int,
    width: int,
    seed: int = 0,
    mpp: float = 0.5,
    tile_size: int = 512,
    mask_path: str | os.PathLike | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> dict:
    """Write a synthetic H&E slide (and optionally its exact tissue mask) and describe it.

    Both files are written next to their destination under temporary names and moved into
    place only when complete. ``workers`` processes render level 0 (default: up to 2); the
    output does not depend on it. Returns sizes, level dimensions, seed, mpp and the
    level-0 tissue fraction.
    """
    _check_args(height, width, mpp, tile_size)
    height, width, tile_size = int(height), int(width), int(tile_size)
    path = Path(path)
    targets = [path] + ([Path(mask_path)] if mask_path is not None else [])
    for target in targets:
        if not target.parent.is_dir():
            raise ConfigError(f"cannot write {target}: folder {target.parent} does not exist; create it first")
    layout = make_layout(height, width, seed, mpp)
    dims = pyramid_dimensions(height, width, tile_size)
    downsamples = [((width / w) + (height / h)) / 2 for w, h in dims]
    n_tiles = [math.ceil(w / tile_size) * math.ceil(h / tile_size) for w, h in dims]
    bigtiff = height * width * 3 > 2**31
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    log.info("writing synthetic slide %s: %dx%d, %d levels, seed %d", path, width, height, len(dims), seed)

    with ExitStack() as stack:
        stack.enter_context(write_errors(path))  # a read-only or full disk is named as such
        # Left in reverse order, the mask is moved into place before the slide: a slide there has its mask.
        temps = [stack.enter_context(atomic_path(t, suffix=".partial")) for t in targets]
        scratch = str(stack.enter_context(scratch_dir(path)))
        bar = stack.enter_context(
            tqdm(total=sum(n_tiles) * len(targets), unit="tile", desc=path.name, disable=not progress)
        )
        tissue = _write_all(layout, dims, downsamples, tile_size, temps, scratch, bigtiff, workers, bar)
    return {
        "path": str(path),
        "mask_path": None if mask_path is None else str(mask_path),
        "height": height,
        "width": width,
        "seed": int(seed),
        "mpp": float(mpp),
        "tile_size": tile_size,
        "level_dimensions": [list(d) for d in dims],
        "level_downsamples": downsamples,
        "tissue_fraction": tissue / (height * width),
    }


def _write_all(layout, dims, downsamples, tile_size, temps, scratch, bigtiff, workers, bar) -> int:
    """Write level 0 from rendered tiles, then every coarser level from its stored strips."""
    t = tile_size
    width, height = dims[0]
    ncols = math.ceil(width / t)
    jobs = [(x, y, min(t, width - x), min(t, height - y)) for y in range(0, height, t) for x in range(0, width, t)]
    rgb_strips = [_Strips(scratch, f"rgb{k}", w, h, 3) for k, (w, h) in enumerate(dims[1:], 1)]
    mask_strips = [_Strips(scratch, f"mask{k}", w, h, 1) for k, (w, h) in enumerate(dims[1:], 1)]
    mask_tiles = open(os.path.join(scratch, "mask0"), "w+b")
    mask_sizes: list[int] = []
    tissue = 0

    with ExitStack() as stack:
        if workers > 1 and len(jobs) >= 4 * workers:
            # Fork needs no importable __main__ (spawn would re-run a caller's unguarded script).
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = stack.enter_context(
                multiprocessing.get_context(method).Pool(workers, _init_tile_worker, (layout, t, True))
            )
            results = pool.imap(_render_tile, jobs, chunksize=2)
        else:
            _init_tile_worker(layout, t)
            results = map(_render_tile, jobs)

        def level0() -> Iterator[bytes]:
            nonlocal tissue
            strip_rgb = strip_mask = None
            for i, (jpeg, mask_bytes, small, small_mask, count) in enumerate(results):
                col = i % ncols
                if rgb_strips:
                    if col == 0:
                        rows = small.shape[0]
                        strip_rgb = np.zeros((rows, rgb_strips[0].width + t, 3), np.uint8)
                        strip_mask = np.zeros((rows, rgb_strips[0].width + t), np.uint8)
                    q = t // LEVEL_FACTOR
                    strip_rgb[:, col * q : col * q + small.shape[1]] = small
                    strip_mask[:, col * q : col * q + small.shape[1]] = small_mask
                    if col == ncols - 1:
                        rgb_strips[0].append(strip_rgb)
                        mask_strips[0].append(strip_mask)
                mask_tiles.write(mask_bytes)
                mask_sizes.append(len(mask_bytes))
                tissue += count
                bar.update(1)
                yield jpeg

        with tifffile.TiffWriter(temps[0], bigtiff=bigtiff) as tif:
            rgb_args = dict(dtype=np.uint8, photometric="ycbcr", subsampling=(2, 2), compression="jpeg")
            tif.write(level0(), shape=(height, width, 3), description=_SOFTWARE + f"; seed={layout.seed}; mpp={layout.mpp}",
                      **rgb_args, **_write_kwargs(0, layout.mpp, 1.0, t))
            for k in range(1, len(dims)):
                nxt = rgb_strips[k] if k < len(rgb_strips) else None
                w, h = dims[k]
                tif.write(_level_tiles(rgb_strips[k - 1], nxt, False, t, bar), shape=(h, w, 3),
                          **rgb_args, **_write_kwargs(k, layout.mpp, downsamples[k], t))

    if len(temps) > 1:
        def mask0() -> Iterator[bytes]:
            mask_tiles.seek(0)
            for size in mask_sizes:
                bar.update(1)
                yield mask_tiles.read(size)

        with tifffile.TiffWriter(temps[1], bigtiff=bigtiff) as tif:
            mask_args = dict(dtype=np.uint8, photometric="minisblack", compression="zlib")
            tif.write(mask0(), shape=(height, width), description=_SOFTWARE + " tissue mask",
                      **mask_args, **_write_kwargs(0, layout.mpp, 1.0, t))
            for k in range(1, len(dims)):
                nxt = mask_strips[k] if k < len(mask_strips) else None
                w, h = dims[k]
                tif.write(_level_tiles(mask_strips[k - 1], nxt, True, t, bar), shape=(h, w),
                          **mask_args, **_write_kwargs(k, layout.mpp, downsamples[k], t))
    for s in rgb_strips + mask_strips:
        s.close()
    mask_tiles.close()
    return tissue


def read_mask_region(
    mask_path: str | os.PathLike, location: Sequence[int], level: int, size: Sequence[int]
) -> np.ndarray:
    """Tissue mask (h x w uint8, 1 = tissue) of a rectangle, decoding only the tiles it touches.

    Coordinates follow ``SlideReader.read_region``: ``location`` is level-0 (x, y) and
    ``size`` is (w, h) at ``level``; the level-0 position maps to ``floor(x / downsample)``.
    """
    mask_path = Path(mask_path)
    if not mask_path.is_file():
        raise MaskError(f"no such mask file: {mask_path}")
    x, y = (int(v) for v in location)
    w, h = (int(v) for v in size)
    if w <= 0 or h <= 0:
        raise MaskError(f"{mask_path.name}: region size {w}x{h} (w x h) is empty; give a positive width and height")
    try:
        tif = tifffile.TiffFile(mask_path)
    except Exception as exc:  # tifffile raises several types for files that are not TIFFs
        raise MaskError(f"{mask_path}: not a readable TIFF mask ({exc})") from exc
    with tif:
        pages = tif.pages
        if not 0 <= level < len(pages):
            raise MaskError(f"{mask_path.name}: level {level} does not exist (the mask has levels 0..{len(pages) - 1})")
        page = pages[level]
        base = pages[0]
        if not page.is_tiled:
            raise MaskError(f"{mask_path.name}: level {level} is not tiled; write masks with write_synthetic_slide")
        lw, lh = page.imagewidth, page.imagelength
        ds = (base.imagewidth / lw + base.imagelength / lh) / 2
        lx, ly = int(math.floor(x / ds + 1e-9)), int(math.floor(y / ds + 1e-9))
        if x < 0 or y < 0 or lx + w > lw or ly + h > lh:
            raise MaskError(
                f"{mask_path.name}: region at level-0 (x={x}, y={y}) of {w}x{h} at level {level} "
                f"lies outside the level ({lw}x{lh}); move or shrink it"
            )
        tw, th = page.tilewidth, page.tilelength
        across = math.ceil(lw / tw)
        out = np.zeros((h, w), np.uint8)
        fh = tif.filehandle
        decode = page.decode
        for ty in range(ly // th, (ly + h - 1) // th + 1):
            for tx in range(lx // tw, (lx + w - 1) // tw + 1):
                index = ty * across + tx
                fh.seek(page.dataoffsets[index])
                data = fh.read(page.databytecounts[index])
                tile = decode(data, index)[0].reshape(th, tw)
                x0, y0 = tx * tw, ty * th
                sx0, sy0 = max(lx, x0), max(ly, y0)
                sx1, sy1 = min(lx + w, x0 + tw), min(ly + h, y0 + th)
                out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = tile[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
    return (out > 0).astype(np.uint8)
