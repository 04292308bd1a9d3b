"""Tissue outlines: trace a mask's pixel edges into polygons with holes and write them as QuPath GeoJSON.

The polygons follow pixel edges exactly, so rasterising them with the pixel-centre rule of
``gigaseg.data.geojson`` at the same level and origin gives back the mask (minus the pieces
and holes dropped by the area filter).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from gigaseg.atomic import atomic_path
from gigaseg.errors import MaskError

log = logging.getLogger(__name__)

# Directions of travel along pixel edges are 0: +x, 1: +y, 2: -x, 3: -y (y points down).
# A corner's 4-bit code has its top-left pixel in bit 0, top-right 1, bottom-left 2, bottom-right 3;
# codes 9 and 6 are saddles, where two tissue pixels touch only at the corner.
_EIGHT = np.ones((3, 3), dtype=bool)


def _vertex_codes(mask: np.ndarray) -> np.ndarray:
    """4-bit code of every pixel corner: top-left 1, top-right 2, bottom-left 4, bottom-right 8."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    return (padded[:-1, :-1] | (padded[:-1, 1:] << 1) | (padded[1:, :-1] << 2) | (padded[1:, 1:] << 3))


def _out_direction(code: np.ndarray) -> np.ndarray:
    """Direction leaving a (non-saddle) corner with tissue on the right of travel (y down)."""
    a, b, c, d = ((code >> k) & 1 for k in range(4))
    out = np.full(code.shape, -1, dtype=np.int64)
    out[(d == 1) & (b == 0)] = 0
    out[(c == 1) & (d == 0)] = 1
    out[(a == 1) & (c == 0)] = 2
    out[(b == 1) & (a == 0)] = 3
    return out


def _trace_rings(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every boundary ring's corners, traced with tissue on the right of travel (y down).

    Returns the (M, 2) integer (row, col) corners of all rings one after another, where
    each ring begins in that array, a tissue pixel (row, col) beside each ring, and each
    ring's shoelace area in (x, y) = (col, row) numbers: positive for outer boundaries,
    negative for holes. Points along straight runs are never produced.
    """
    codes = _vertex_codes(mask)
    corner = (codes != 0) & (codes != 15) & (codes != 3) & (codes != 12) & (codes != 5) & (codes != 10)
    rows, cols = np.nonzero(corner)
    n = len(rows)
    if not n:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros(0)
    code = codes[rows, cols]
    # Neighbours along a row are adjacent in row-major order (np.nonzero's); along a column,
    # in column-major order, found through a grid of row-major indices read transposed.
    grid = np.zeros(corner.shape, dtype=np.int32 if n < 2**31 else np.int64)
    grid[rows, cols] = np.arange(n)
    by_col = grid.T[corner.T].astype(np.int64)
    del grid
    pos_col = np.empty(n, dtype=np.int64)
    pos_col[by_col] = np.arange(n)
    # Node 2 v + k is the k-th pass through corner v (k = 1 only at saddles).
    saddle = (code == 9) | (code == 6)
    node_dir = np.full((n, 2), -1, dtype=np.int64)
    node_dir[:, 0] = np.where(saddle, np.where(code == 9, 0, 1), _out_direction(code))
    node_dir[saddle, 1] = np.where(code[saddle] == 9, 2, 3)
    exists = node_dir >= 0
    v = np.repeat(np.arange(n), 2).reshape(n, 2)[exists]
    o = node_dir[exists]
    node = 2 * v + np.tile(np.arange(2), n).reshape(n, 2)[exists]
    # The next corner in the direction of travel is the adjacent one in the matching order.
    nxt = np.where(o == 0, v + 1, v - 1)
    vertical = (o == 1) | (o == 3)
    nxt[vertical] = by_col[pos_col[v[vertical]] + np.where(o[vertical] == 1, 1, -1)]
    # Which pass of the next corner continues this one: at a saddle, the turn that keeps the two
    # diagonal pixels in one outline (8-connected tissue). Saddle 9 (top-left, bottom-right):
    # in moving down -> out right (pass 0), in moving up -> out left (pass 1). Saddle 6:
    # in moving left -> out down (pass 0), in moving right -> out up (pass 1).
    nc = code[nxt]
    k = (((nc == 9) & (o == 3)) | ((nc == 6) & (o == 0))).astype(np.int64)
    index = np.full(2 * n, -1, dtype=np.int64)
    m = len(node)
    index[node] = np.arange(m)
    succ = index[2 * nxt + k]
    graph = coo_matrix((np.ones(m, dtype=np.int8), (np.arange(m), succ)), shape=(m, m)).tocsr()
    n_rings, ring = connected_components(graph, directed=True, connection="weak")
    # Rank each node within its ring from the ring's smallest node, by pointer jumping.
    start = np.full(n_rings, m, dtype=np.int64)
    np.minimum.at(start, ring, np.arange(m))
    last = succ == start[ring]
    hop = np.where(last, np.arange(m), succ)
    dist = (~last).astype(np.int64)  # steps to the ring's last node
    while True:
        dist = dist + dist[hop]
        jump = hop[hop]
        if np.array_equal(jump, hop):
            break
        hop = jump
    sizes = np.bincount(ring, minlength=n_rings)
    begin = np.cumsum(sizes) - sizes
    order = np.empty(m, dtype=np.int64)
    order[begin[ring] + sizes[ring] - 1 - dist] = np.arange(m)
    points = np.stack([rows[v[order]], cols[v[order]]], axis=1)
    following = np.arange(1, m + 1)
    following[begin + sizes - 1] = begin
    y, x = points[:, 0], points[:, 1]
    area = np.bincount(ring[order], weights=x * y[following] - x[following] * y, minlength=n_rings) / 2
    # The tissue pixel on the right of each ring's first edge names the ring's piece.
    first = order[begin]
    fr, fc, fo = rows[v[first]], cols[v[first]], o[first]
    pixel = np.stack([fr - (fo >= 2), fc - ((fo == 1) | (fo == 2))], axis=1)
    return points, begin, pixel, area


def tissue_outlines(
    mask: np.ndarray,
    *,
    downsample: float = 1.0,
    origin: Sequence[float] = (0.0, 0.0),
    min_area: float = 0.0,
    min_hole_area: float | None = None,
) -> list[list[np.ndarray]]:
    """The outline of every tissue piece of ``mask`` (H x W, tissue = nonzero) in level-0 pixels.

    A piece is an 8-connected component of tissue (pixels touching only at a corner belong
    to one piece; background is then 4-connected, so a hole is a 4-connected background
    component that the piece encloses). Each piece is ``[exterior, hole, ...]``: closed
    (N, 2) float arrays of (x, y) = ``origin + corner * downsample`` along pixel edges, only
    at the corners. Exteriors have a positive shoelace area in these (x, y) numbers (counter-
    clockwise as RFC 7946 reads them, clockwise on screen since y points down), holes a
    negative one. Where two pixels of a piece touch only at a corner, its ring passes that
    point twice. Pieces whose area (pixels x downsample²) is below ``min_area`` are dropped;
    holes smaller than ``min_hole_area`` (default ``min_area``) are filled, with anything in them.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskError(f"a tissue mask must be 2-D (H x W), got shape {mask.shape}")
    d = float(downsample)
    if not np.isfinite(d) or d <= 0:
        raise ValueError(f"downsample must be a positive number, got {downsample}")
    ox, oy = (float(v) for v in origin)
    min_hole = float(min_area if min_hole_area is None else min_hole_area)
    tissue = (mask != 0).astype(np.uint8)
    labels, n_pieces = ndimage.label(tissue, structure=_EIGHT)
    if n_pieces == 0:
        return []
    pixels = np.bincount(labels.ravel(), minlength=n_pieces + 1)
    points, begin, beside, area = _trace_rings(tissue)
    piece = labels[beside[:, 0], beside[:, 1]]
    keep_piece = pixels * d * d >= float(min_area)
    exterior = area > 0
    keep = keep_piece[piece] & (exterior | (-area * d * d >= min_hole))
    # Exteriors first within a piece, then its holes in the order they were traced.
    chosen = np.flatnonzero(keep)
    chosen = chosen[np.lexsort((~exterior[chosen], piece[chosen]))]
    ends = np.append(begin[1:], len(points))
    xy = np.empty((len(points), 2), dtype=np.float64)
    xy[:, 0] = ox + points[:, 1] * d
    xy[:, 1] = oy + points[:, 0] * d
    outlines: list[list[np.ndarray]] = []
    last = -1
    for i, p in zip(chosen.tolist(), piece[chosen].tolist()):
        ring = np.concatenate([xy[begin[i] : ends[i]], xy[begin[i] : begin[i] + 1]])
        if p != last:
            outlines.append([ring])
            last = p
        else:
            outlines[-1].append(ring)
    dropped = int(n_pieces - keep_piece[1:].sum())
    if dropped:
        log.info("dropped %d of %d tissue pieces smaller than %g level-0 px²", dropped, n_pieces, min_area)
    return outlines


def feature_collection(
    outlines: Sequence[Sequence[np.ndarray]],
    *,
    classification: str = "Tissue",
    color: Sequence[int] = (20, 160, 20),
    properties: Mapping[str, Any] | None = None,
) -> dict:
    """A GeoJSON FeatureCollection of one Polygon annotation per piece, as QuPath 0.3+ imports it."""
    features = []
    for rings in outlines:
        props = {
            "objectType": "annotation",
            "classification": {"name": classification, "color": [int(c) for c in color]},
            **dict(properties or {}),
        }
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [_closed(r).tolist() for r in rings]},
            "properties": props,
        })
    return {"type": "FeatureCollection", "features": features}


def _closed(ring: np.ndarray) -> np.ndarray:
    ring = np.asarray(ring, dtype=np.float64)
    return ring if len(ring) and np.array_equal(ring[0], ring[-1]) else np.concatenate([ring, ring[:1]])


def write_geojson(outlines: Sequence[Sequence[np.ndarray]], path: str | Path, **kwargs: Any) -> Path:
    """Write ``feature_collection(outlines, **kwargs)`` to ``path`` atomically; returns the path."""
    path = Path(path)
    data = feature_collection(outlines, **kwargs)
    with atomic_path(path, suffix=path.suffix or ".geojson") as tmp:
        tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    return path
