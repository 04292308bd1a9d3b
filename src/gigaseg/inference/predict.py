"""Whole-slide prediction in bounded memory: tile windows read from the slide in the background, forward only, mask written band by band.

``predict_slide`` writes the pyramidal TIFF mask, the tissue outlines (GeoJSON), a
thumbnail overlay and a summary JSON into one folder; memory depends on the tile size,
not on the slide size.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numba
import numpy as np
from tqdm import tqdm

from gigaseg.atomic import atomic_path, write_errors
from gigaseg.errors import RegionError
from gigaseg.inference.overlay import slide_thumbnail, write_overlay
from gigaseg.inference.tiff import block_sums, write_mask_tiff
from gigaseg.inference.windows import PaddedLevel
from gigaseg.options import DEFAULT_PAD_VALUE, PredictOptions
from gigaseg.slides import open_slide
from gigaseg.slides.base import SlideReader

log = logging.getLogger(__name__)

MASK_FILE = "mask.tiff"
OUTLINES_FILE = "outlines.geojson"
OVERLAY_FILE = "overlay.png"
SUMMARY_FILE = "summary.json"


def choose_level(
    slide: SlideReader, *, level: int | None, mpp: float | None, model_level: int | None, model_mpp: float | None
) -> int:
    """The slide level to predict: ``level``, else the level for ``mpp``, else the model's training resolution.

    The model's resolution is its mpp when both it and the slide know theirs, else its
    level; a model that recorded neither predicts at level 0.
    """
    if level is not None:
        if not 0 <= int(level) < slide.level_count:
            raise RegionError(f"{slide.name}: level {level} does not exist (the slide has levels 0..{slide.level_count - 1})")
        return int(level)
    if mpp is not None:
        return slide.level_for_mpp(float(mpp)).level
    if model_mpp is not None and slide.mpp is not None:
        return slide.level_for_mpp(model_mpp).level
    if model_level is not None:
        if not 0 <= model_level < slide.level_count:
            raise RegionError(
                f"{slide.name}: the model was trained at level {model_level}, which this slide lacks; "
                "give level=... or mpp=..."
            )
        if model_mpp is not None:
            log.warning("%s records no mpp: predicting at the model's level %d", slide.name, model_level)
        return model_level
    return 0


def outline_tolerance(simplify_um: float | None, base_mpp: float | None, outline_pixel: float, name: str) -> float:
    """The outline simplification tolerance in level-0 pixels.

    ``simplify_um`` None is half a pixel of the traced mask (``outline_pixel`` level-0 pixels):
    the traced pixel edges are themselves that far from where a boundary crossing the pixel
    could lie. Without an mpp, ``simplify_um`` is taken as level-0 pixels, as ``min_area_um2`` is.
    """
    if simplify_um is None:
        return 0.5 * outline_pixel
    if base_mpp is None:
        if simplify_um:
            log.warning("%s records no mpp: simplify_um=%g is taken as level-0 pixels", name, simplify_um)
        return float(simplify_um)
    return float(simplify_um) / base_mpp


class OutlineGrid:
    """A downsampled binary tissue mask filled block by block: one cell per ``factor`` x ``factor`` pixels, majority vote."""

    def __init__(self, width: int, height: int, max_pixels: float, max_factor: int) -> None:
        factor = 1
        while math.ceil(width / factor) * math.ceil(height / factor) > max_pixels and factor < max_factor:
            factor *= 2
        self.factor = factor
        self.mask = np.zeros((math.ceil(height / factor), math.ceil(width / factor)), np.uint8)

    def add(self, top: int, left: int, tissue: np.ndarray) -> None:
        f = self.factor
        h, w = tissue.shape
        hh, ww = math.ceil(h / f), math.ceil(w / f)
        if f == 1:
            self.mask[top : top + h, left : left + w] = tissue
            return
        if h % f or w % f:
            padded = np.zeros((hh * f, ww * f), np.uint8)
            padded[:h, :w] = tissue
        else:
            padded = np.ascontiguousarray(tissue).view(np.uint8)
        votes = block_sums(padded, f).astype(np.int64)
        rows = np.minimum(f, h - f * np.arange(hh))
        cols = np.minimum(f, w - f * np.arange(ww))
        self.mask[top // f : top // f + hh, left // f : left // f + ww] = 2 * votes >= rows[:, None] * cols[None, :]


def predict_level_blocks(
    engine,
    slide: SlideReader,
    level: int,
    *,
    pad_value: Sequence[int] = DEFAULT_PAD_VALUE,
    readers: int = 1,
    workers: int = 1,
    progress: bool = False,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Float32 probabilities of a whole slide level, one tile core at a time: ``(top, left, block)``.

    ``engine`` is a :class:`gigaseg.streaming.TiledEngine` with a tile size. The level is
    padded to the total stride as a plain forward pass on the whole padded level would see
    it; blocks are cropped back to the level. Tiles come in row-major order.
    """
    from gigaseg.streaming.engine import predict_tiles

    padded = PaddedLevel(slide, level, engine.total_stride, pad_value)
    plan = engine.plan(padded.shape[:2])
    start = time.perf_counter()
    with tqdm(total=len(plan), unit="tile", desc=f"{slide.name} L{level}", disable=not progress) as bar:
        for tile, core in predict_tiles(engine, plan, lambda tile: padded.read(*tile.window),
                                      readers=readers, workers=workers):
            top, left, bottom, right = tile.core
            h, w = min(bottom, padded.height) - top, min(right, padded.width) - left
            bar.update(1)
            done = (tile.index + 1) / len(plan) * padded.height * padded.width / 1e6
            bar.set_postfix_str(f"{done / max(time.perf_counter() - start, 1e-9):.1f} Mpx/s", refresh=False)
            yield top, left, core[:h, :w]


@numba.njit(nogil=True, cache=True)
def _quantise(probability, threshold, binary, values, tissue):  # pragma: no cover - compiled
    count = 0
    for i in range(probability.shape[0]):
        for j in range(probability.shape[1]):
            p = probability[i, j]
            is_tissue = p >= threshold
            tissue[i, j] = is_tissue
            count += is_tissue
            if binary:
                values[i, j] = 255 if is_tissue else 0
            elif p == p:  # NaN (a diverged model) writes 0, as numpy's cast gives it
                values[i, j] = np.uint8(np.rint(p * np.float32(255)))
            else:
                values[i, j] = 0
    return count


def mask_values(probability: np.ndarray, kind: str, threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The mask TIFF's uint8 values of float32 probabilities (``round(255 p)``, or 0/255 at the threshold
    for ``kind="binary"``), the tissue mask ``p >= threshold`` and its pixel count, in one pass."""
    probability = np.ascontiguousarray(probability, np.float32)
    values = np.empty(probability.shape, np.uint8)
    tissue = np.empty(probability.shape, np.bool_)
    count = _quantise(probability, np.float32(threshold), kind == "binary", values, tissue)
    return values, tissue, int(count)


def predict_slide(
    model,
    slide_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: PredictOptions = PredictOptions(),
    *,
    model_level: int | None = None,
    model_mpp: float | None = None,
    extra_summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict a whole slide and write mask, outlines, overlay and summary into ``output_dir``; return the summary.

    ``model_level``/``model_mpp`` are the resolution the model was trained at (used when
    ``options`` name neither a level nor an mpp). ``extra_summary`` is merged into the
    summary (model URI, MLflow run id, ...).
    """
    from gigaseg.outlines import tissue_outlines, write_geojson
    from gigaseg.simplify import simplify_outlines, vertex_count
    from gigaseg.streaming import TiledEngine

    start = time.perf_counter()
    with _collections_paused():  # tracing sets off a full collection (0.5 s) otherwise
        # The workers already keep the cores busy with whole tiles: splitting each tile's
        # compiled loops over every core as well only adds hand-offs.
        engine = TiledEngine(model, tile_size=options.tile_size, jit_compile=options.jit_compile, evaluator=options.evaluator,
                             threads=max(1, (os.cpu_count() or 1) // options.workers))
    options.validate(engine.total_stride, engine.halo)
    output_dir = Path(output_dir)
    with write_errors(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    slide_path = Path(slide_path)
    with open_slide(slide_path) as slide:
        level = choose_level(slide, level=options.level, mpp=options.mpp, model_level=model_level, model_mpp=model_mpp)
        width, height = slide.level_dimensions[level]
        downsample = float(slide.level_downsamples[level])
        level_mpp = slide.level_mpp(level)
        log.info("predicting %s at level %d (%dx%d, downsample %.4g, mpp %s)", slide.name, level, width, height,
                 downsample, level_mpp)
        description = {"gigaseg": {
            "kind": options.kind, "threshold": options.threshold, "slide": str(slide_path.resolve()),
            "slide_level": level, "downsample": downsample, "mpp": level_mpp, "width": width, "height": height,
        }}
        grid = OutlineGrid(width, height, options.outline_max_mpx * 1e6, max_factor=options.tile_size)
        tissue = 0

        def blocks() -> Iterator[tuple[int, int, np.ndarray]]:
            nonlocal tissue
            for top, left, probability in predict_level_blocks(
                engine, slide, level, pad_value=options.pad_value, readers=options.readers,
                workers=options.workers, progress=options.progress,
            ):
                values, is_tissue, count = mask_values(probability, options.kind, options.threshold)
                tissue += count
                grid.add(top, left, is_tissue)
                yield top, left, values

        write_mask_tiff(
            output_dir / MASK_FILE, blocks(), width=width, height=height, kind=options.kind,
            tile_size=options.tiff_tile_size, mpp=level_mpp, description=description,
            compression_level=options.compression_level, threads=2,
        )
        predict_seconds = time.perf_counter() - start

        # Specks are dropped by area in level-0 pixels: um^2 over level-0 mpp^2, or pixels^2 without mpp.
        base_mpp = None if slide.mpp is None else float(np.mean(slide.mpp))
        min_area = options.min_area_um2 / base_mpp**2 if base_mpp else options.min_area_um2
        outline_pixel = grid.factor * downsample
        tolerance = outline_tolerance(options.simplify_um, base_mpp, outline_pixel, slide.name)
        bounds_x, bounds_y = slide.bounds_offset
        # The thumbnail is decoded (outside the GIL) while the outlines are traced.
        with ThreadPoolExecutor(1, thread_name_prefix="gigaseg-thumbnail") as pool, _collections_paused():
            thumbnail = pool.submit(slide_thumbnail, slide, options.thumbnail_size)
            traced = tissue_outlines(grid.mask, downsample=outline_pixel, min_area=min_area)
            outlines = simplify_outlines(traced, tolerance, pixel=outline_pixel)
            vertices = (vertex_count(traced), vertex_count(outlines))
            log.info("%s: outlines simplified to %.3g level-0 px (%s): %d -> %d vertices", slide.name, tolerance,
                     "no mpp" if base_mpp is None else f"{tolerance * base_mpp:.3g} um", *vertices)
            # GeoJSON in QuPath's coordinates, whose origin is the scanned area's corner.
            qupath = [[ring - (bounds_x, bounds_y) for ring in rings] for rings in outlines]
            write_geojson(qupath, output_dir / OUTLINES_FILE)
            image, scale = thumbnail.result()
            write_overlay(output_dir / OVERLAY_FILE, image, outlines, scale)

    seconds = time.perf_counter() - start
    mpx = width * height / 1e6
    summary = {
        "slide": str(slide_path.resolve()),
        "level": level,
        "mpp": level_mpp,
        "downsample": downsample,
        "width": width,
        "height": height,
        "kind": options.kind,
        "threshold": options.threshold,
        "tile_size": options.tile_size,
        "evaluator": engine.choice.evaluator.name,
        "tiff_tile_size": options.tiff_tile_size,
        "tissue_pixels": tissue,
        "tissue_fraction": tissue / (width * height),
        "tissue_area_mm2": None if level_mpp is None else tissue * level_mpp**2 / 1e6,
        "pieces": len(outlines),
        "min_area_um2": options.min_area_um2,
        "outline_downsample": outline_pixel,
        "simplify_um": options.simplify_um,
        "simplify_tolerance_px": tolerance,
        "simplify_tolerance_um": None if base_mpp is None else tolerance * base_mpp,
        "outline_vertices_traced": vertices[0],
        "outline_vertices": vertices[1],
        "bounds_offset": [bounds_x, bounds_y],
        "mpx": mpx,
        "predict_seconds": predict_seconds,
        "seconds": seconds,
        "mpx_per_s": mpx / seconds,
        "files": {"mask": MASK_FILE, "outlines": OUTLINES_FILE, "overlay": OVERLAY_FILE},
        **(extra_summary or {}),
    }
    write_summary(output_dir / SUMMARY_FILE, summary)
    log.info("%s: tissue %.1f %%, %d piece(s), %.1f Mpx in %.1f s (%.1f Mpx/s)", slide.name,
             100 * summary["tissue_fraction"], summary["pieces"], mpx, seconds, summary["mpx_per_s"])
    # The engine's traced graphs are reference cycles (so is a model that the caller loaded
    # for an earlier slide and dropped), which Python frees only at a full collection; among
    # TensorFlow's half a million objects those come ever more rarely, so a process predicting
    # slide after slide grew by 0.4-0.5 MB per slide without this (benchmarks/soak.py).
    # A full collection takes a few tenths of a second.
    engine = None  # the nested blocks() still refers to this name
    gc.collect()
    return summary


@contextlib.contextmanager
def _collections_paused() -> Iterator[None]:
    """No automatic garbage collection inside.

    Building the engine (tracing its graphs) and the outlines with their GeoJSON (over a
    hundred thousand small lists for a gigapixel slide) each set off a full collection among
    TensorFlow's half a million objects, 0.5 s each. Whatever cycles they leave,
    ``predict_slide`` collects once at the end anyway.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def write_summary(path: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write a summary dict as sorted, indented JSON, atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return path
