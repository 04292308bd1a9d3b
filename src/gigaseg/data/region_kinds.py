"""Turn a slide's region requests (``whole``, ``auto``, ``annotations``) into rectangles.

``auto`` regions are chosen on a low-resolution tissue estimate: by default the saturation
of a view of the slide of at most ``VIEW_SIZE`` pixels a side, cut at its Otsu threshold
(the same estimate as the bootstrap labels); or, for a request naming a ``tissue_model``,
the tissue that model predicts (a :data:`TissueEstimate` the caller loads, such as
:class:`gigaseg.inference.ModelTissueEstimate`). Windows of the requested size, aligned to
the total stride, are scored by their tissue fraction with an integral image and taken
greedily, best first, without overlap.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from gigaseg.data.bootstrap import otsu_threshold, saturation
from gigaseg.dataset import STUDY_REGION, RegionRequest
from gigaseg.errors import ConfigError, MaskError, RegionError
from gigaseg.slides.base import SlideReader

log = logging.getLogger(__name__)

#: The longest side of the low-resolution view auto regions are chosen on.
VIEW_SIZE = 2048

#: A slide's low-resolution tissue estimate: (bool view, True = tissue; its downsample from level 0).
TissueEstimate = Callable[[SlideReader], "tuple[np.ndarray, float]"]


def region_level(reader: SlideReader, region: RegionRequest) -> int:
    """The pyramid level a region is read at: its ``level``, or the level its ``mpp`` resolves to."""
    if region.mpp is not None:
        return reader.level_for_mpp(region.mpp).level
    level = 0 if region.level is None else int(region.level)
    if not 0 <= level < reader.level_count:
        raise RegionError(f"{reader.name}: level {level} does not exist (the slide has levels 0..{reader.level_count - 1})")
    return level


def tissue_view(reader: SlideReader) -> tuple[np.ndarray, float]:
    """A low-resolution tissue estimate of the whole slide (bool, True = tissue) and its downsample from level 0."""
    width, height = reader.dimensions
    level = reader.level_for_downsample(max(1.0, max(width, height) / VIEW_SIZE))
    downsample = float(reader.level_downsamples[level])
    lw, lh = reader.level_dimensions[level]
    stride = max(1, math.ceil(max(lw, lh) / VIEW_SIZE))
    pixels = reader.read_region((0, 0), level, (lw, lh))[::stride, ::stride]
    sat = saturation(pixels)
    threshold = otsu_threshold(np.bincount(sat.reshape(-1), minlength=256))
    return sat > threshold, downsample * stride


def choose_windows(tissue: np.ndarray, size: tuple[int, int], step: int, count: int,
                   min_fraction: float) -> list[tuple[int, int, float]]:
    """Up to ``count`` non-overlapping ``size`` (h, w) windows of ``tissue`` on a grid of ``step``, by tissue fraction.

    Returns (row, col, fraction) in ``tissue``'s pixels, best first; none under ``min_fraction``.
    """
    h, w = size
    rows, cols = tissue.shape
    if h > rows or w > cols:
        return []
    integral = np.zeros((rows + 1, cols + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(tissue, axis=0, dtype=np.int64), axis=1)
    tops = np.arange(0, rows - h + 1, step)
    lefts = np.arange(0, cols - w + 1, step)
    t, l = np.meshgrid(tops, lefts, indexing="ij")
    sums = integral[t + h, l + w] - integral[t, l + w] - integral[t + h, l] + integral[t, l]
    fraction = sums / float(h * w)
    taken: list[tuple[int, int, float]] = []
    free = np.ones(fraction.shape, dtype=bool)
    for _ in range(count):
        score = np.where(free, fraction, -1.0)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        if score[i, j] < min_fraction:
            break
        top, left = int(tops[i]), int(lefts[j])
        taken.append((top, left, float(fraction[i, j])))
        # Windows that would overlap this one are no longer free.
        free &= ~((np.abs(t - top) < h) & (np.abs(l - left) < w))
    return taken


def auto_regions(reader: SlideReader, region: RegionRequest, total_stride: int,
                 estimate: TissueEstimate | None = None) -> list[RegionRequest]:
    """The ``auto`` rectangles of a slide: tissue-rich, aligned to the total stride, not overlapping.

    ``estimate`` gives the tissue view they are chosen on (default :func:`tissue_view`, Otsu).
    """
    level = region_level(reader, region)
    lw, lh = reader.level_dimensions[level]
    level_ds = float(reader.level_downsamples[level])
    height = min(region.height or STUDY_REGION[0], lh)
    width = min(region.width or STUDY_REGION[1], lw)
    # Whole strides where the level allows it; a level smaller than one stride is padded instead.
    height = max(total_stride, height // total_stride * total_stride) if lh >= total_stride else height
    width = max(total_stride, width // total_stride * total_stride) if lw >= total_stride else width
    tissue, view_ds = (estimate or tissue_view)(reader)
    scale = level_ds / view_ds  # level pixels to view pixels
    size = (max(1, int(height * scale)), max(1, int(width * scale)))
    grid = max(1, int(total_stride * scale))
    chosen = choose_windows(tissue, size, grid, int(region.count), float(region.min_tissue))
    if not chosen:
        log.warning("%s: no %dx%d region at level %d holds %.0f %% tissue or more (by %s); none chosen",
                    reader.name, width, height, level, 100 * region.min_tissue,
                    region.tissue_model or "the Otsu estimate")
    out = []
    for index, (top, left, fraction) in enumerate(chosen):
        # View pixels to level-0 pixels, on the total stride of the region's level.
        unit = total_stride * level_ds
        x = int(round(left * view_ds / unit)) * int(unit)
        y = int(round(top * view_ds / unit)) * int(unit)
        x = min(x, int((lw - width) * level_ds) // int(unit) * int(unit)) if lw >= width else 0
        y = min(y, int((lh - height) * level_ds) // int(unit) * int(unit)) if lh >= height else 0
        name = region.name if region.count == 1 else f"{region.name}{index}"
        log.info("%s: auto region %s at (%d, %d) level %d, %dx%d, tissue %.0f %% of the estimate",
                 reader.name, name, x, y, level, width, height, 100 * fraction)
        out.append(replace(region, name=name, kind="rect", x=x, y=y, width=width, height=height, count=1))
    return out


def annotation_regions(reader: SlideReader, region: RegionRequest, geojson: Path | None) -> list[RegionRequest]:
    """A rectangle per QuPath annotation of ``region.annotation_class``: its bounding box at the region's level."""
    from gigaseg.data.geojson import bounding_boxes, load_annotations

    path = Path(region.annotations_path) if region.annotations_path else geojson
    if path is None:
        raise MaskError(f"{reader.name}: annotation regions need a GeoJSON file (regions' annotations_path, "
                        "or data.mask.path with data.mask.source=geojson)")
    polygons = load_annotations(path, classes=[region.annotation_class])
    level = region_level(reader, region)
    ds = float(reader.level_downsamples[level])
    # QuPath's coordinates start at the scanned area's corner, ours at the slide's.
    offset = np.array(reader.bounds_offset * 2, dtype=np.float64)
    out = []
    for index, (x0, y0, x1, y1) in enumerate(bounding_boxes(polygons) + offset):
        x, y = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
        width = max(1, int(math.ceil((x1 - x) / ds)))
        height = max(1, int(math.ceil((y1 - y) / ds)))
        out.append(replace(region, name=f"{region.name}{index}", kind="rect", x=x, y=y, width=width, height=height))
    log.info("%s: %d region(s) from the %s annotations of %s", reader.name, len(out), region.annotation_class, path)
    return out


def resolve(reader: SlideReader, regions: tuple[RegionRequest, ...], total_stride: int,
            geojson: Path | None = None, estimates: Mapping[str, TissueEstimate] | None = None) -> list[RegionRequest]:
    """Every request of a slide as ``rect`` regions (``auto`` and ``annotations`` may give several, or none).

    ``estimates`` maps each ``tissue_model`` URI of the ``auto`` requests to its loaded estimate.
    """
    out: list[RegionRequest] = []
    for region in regions:
        if region.kind == "rect":
            out.append(region)
        elif region.kind == "whole":
            lw, lh = reader.level_dimensions[region_level(reader, region)]
            out.append(replace(region, kind="rect", x=0, y=0, width=int(lw), height=int(lh)))
        elif region.kind == "auto":
            estimate = None
            if region.tissue_model:
                estimate = (estimates or {}).get(region.tissue_model)
                if estimate is None:
                    raise ConfigError(f"{reader.name}: region {region.name} is chosen on tissue_model="
                                      f"{region.tissue_model}, which was not loaded; gigaseg-prepare loads it")
            out.extend(auto_regions(reader, region, total_stride, estimate))
        else:
            out.extend(annotation_regions(reader, region, geojson))
    names = [r.name for r in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegionError(f"{reader.name}: two regions are named {duplicates[0]}; give each request its own name")
    return out
