"""Simplification of traced tissue outlines to a tolerance, keeping them valid polygons.

Outlines traced along pixel edges have a vertex at every step of every staircase; a
gigapixel slide's run to over a hundred thousand. Douglas-Peucker, which keeps a subset of
those corners, removes few of them below a pixel: on a staircase every other corner lies
0.7 to 1 pixel from any segment joining corners. The midpoints of a staircase's edges, though,
line up, with the corners within half a pixel of them. So each ring here may keep its corners
and the midpoints of its edges (all on the traced outline), going round it by the farthest
vertex whose segment keeps every vertex it replaces within the tolerance. The result lies
within the tolerance of the traced outline and the traced outline within the tolerance of it;
square corners stay where they are. It stays valid:

- no segment crosses or touches another (of its own ring, of the piece's other rings, or of
  another piece) except where the traced outlines already met, at shared corners: a segment
  that does is split again at its farthest vertex until none does;
- every ring keeps at least four vertices, so no piece or hole collapses to nothing;
- holes stay inside their exterior and outside each other. Below one pixel of the traced
  raster this follows from the above (the sliver between a segment and the path it replaces
  is narrower than a pixel, too narrow to hold a ring); at larger tolerances it is checked,
  and the segments that cut a hole off are split again (a piece with nothing left to split
  keeps its traced corners).

All geometry tests run on integers (half pixels of the traced raster), so they are exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numba
import numpy as np

log = logging.getLogger(__name__)

Outlines = list[list[np.ndarray]]


def vertex_count(outlines: Sequence[Sequence[np.ndarray]]) -> int:
    """Distinct vertices of all rings (a closed ring's repeated last point not counted)."""
    return sum(max(len(ring) - 1, 0) for rings in outlines for ring in rings)


def simplify_outlines(outlines: Sequence[Sequence[np.ndarray]], tolerance: float, *, pixel: float = 1.0) -> Outlines:
    """``outlines`` (pieces of closed rings, as ``gigaseg.outlines.tissue_outlines`` gives) with fewer vertices.

    ``tolerance`` and ``pixel`` (the traced raster's step, e.g. the outline downsample) are in
    the outlines' units; vertices are kept where they are, so the result lies within
    ``tolerance`` of the traced outline and vice versa. A tolerance of 0 returns the outlines unchanged.
    """
    tolerance, pixel = float(tolerance), float(pixel)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"the simplification tolerance must be zero or positive, got {tolerance}")
    if not np.isfinite(pixel) or pixel <= 0:
        raise ValueError(f"pixel must be a positive number, got {pixel}")
    if tolerance == 0 or not outlines:
        return [list(rings) for rings in outlines]
    # Candidate vertices: the traced corners and the midpoint of every edge between them, in
    # units of half a pixel so all of them are integers.
    open_rings = [_with_midpoints(np.asarray(ring, np.float64)[:-1]) for rings in outlines for ring in rings]
    unit = pixel / 2
    piece = np.repeat(np.arange(len(outlines)), [len(rings) for rings in outlines])
    sizes = np.array([len(r) for r in open_rings], np.int64)
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    points = np.concatenate(open_rings)
    corners = (points - points[0]) / unit
    grid = np.rint(corners)
    if np.abs(grid - corners).max() > 1e-6:
        raise ValueError("the outlines' vertices are not on a raster of the given pixel size")
    x, y = grid[:, 0].copy(), grid[:, 1].copy()
    keep = np.zeros(len(x), np.bool_)
    _fit_rings(x, y, start, sizes, tolerance / unit, keep)
    first_ring = np.concatenate([[0], np.cumsum([len(rings) for rings in outlines])[:-1]])
    while True:
        _refine_crossings(x, y, start, sizes, keep)
        if tolerance < pixel:
            break
        misplaced = _misplaced_holes(x, y, start, sizes, keep, first_ring, len(open_rings))
        if not misplaced:
            break
        if _split_near(x, y, start, sizes, keep, misplaced, tolerance / unit):
            continue
        failed = sorted({p for p, _, _, _ in misplaced})
        for p in failed:  # nothing left to split: these pieces keep their traced corners
            for r in range(first_ring[p], first_ring[p] + len(outlines[p])):
                keep[start[r] : start[r] + sizes[r]] = np.arange(sizes[r]) % 2 == 0
        log.info("%d piece(s) keep their traced outline: simplified, a hole would leave its place", len(failed))
    out: Outlines = []
    for r, ring in enumerate(open_rings):
        kept = ring[keep[start[r] : start[r] + sizes[r]]]
        closed = np.concatenate([kept, kept[:1]])
        if r == first_ring[piece[r]]:
            out.append([closed])
        else:
            out[-1].append(closed)
    return out


def _with_midpoints(ring: np.ndarray) -> np.ndarray:
    """An open ring's vertices with each edge's midpoint after its first vertex."""
    out = np.empty((2 * len(ring), 2), np.float64)
    out[0::2] = ring
    out[1::2] = (ring + np.roll(ring, -1, axis=0)) / 2
    return out


def _segments(start: np.ndarray, sizes: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every kept segment as (ring, first vertex, last vertex), vertices in ring-closed index space (size = vertex 0)."""
    kept = np.flatnonzero(keep)
    ring = np.searchsorted(start, kept, side="right") - 1
    local = kept - start[ring]
    nxt = np.empty_like(local)
    nxt[:-1] = local[1:]
    last = np.ones(len(kept), np.bool_)
    last[:-1] = ring[1:] != ring[:-1]
    nxt[last] = sizes[ring[last]]  # back to the ring's vertex 0, which is always kept
    return ring, local, nxt


def _refine_crossings(x: np.ndarray, y: np.ndarray, start: np.ndarray, sizes: np.ndarray, keep: np.ndarray) -> None:
    """Split kept segments that cross or touch others at their farthest dropped vertex, until none does."""
    rounds = 0
    while True:
        ring, a, b = _segments(start, sizes, keep)
        s = start[ring]
        ia, ib = s + a, s + np.where(b == sizes[ring], 0, b)
        flags = np.zeros(len(ring), np.bool_)
        _flag_conflicts(x[ia], y[ia], x[ib], y[ib], flags)
        split = np.flatnonzero(flags & (b - a > 1))
        # A segment along a traced edge is split no further (its midpoint changes nothing).
        if not len(split) or not _split_at_farthest(x, y, s[split], sizes[ring[split]], a[split], b[split], keep):
            break
        rounds += 1
    if rounds:
        log.debug("simplified outlines: %d round(s) of splitting crossing segments", rounds)


def _misplaced_holes(x, y, start, sizes, keep, first_ring, n_rings) -> list[tuple[int, int, float, float]]:
    """Holes whose simplified ring left its exterior or entered another hole, by one kept vertex each.

    Returns (piece, ring that cut the hole off or swallowed it, the vertex's x, y) for each.
    """
    found = []
    bounds = np.append(first_ring, n_rings)
    for p in range(len(first_ring)):
        rings = list(range(bounds[p], bounds[p + 1]))
        if len(rings) == 1:
            continue
        polys = [_kept_xy(x, y, start[r], sizes[r], keep) for r in rings]
        exterior = polys[0]
        for i in range(1, len(polys)):
            # A vertex off the exterior (holes may share a traced corner with it).
            sides = [_point_in_ring(float(px), float(py), exterior[:, 0], exterior[:, 1]) for px, py in polys[i]]
            off = [k for k, side in enumerate(sides) if side != 0]
            if not off:
                continue
            px, py = (float(v) for v in polys[i][off[0]])
            if sides[off[0]] < 0:
                found.append((p, rings[0], px, py))
                continue
            for j in range(1, len(polys)):
                if j != i and _point_in_ring(px, py, polys[j][:, 0], polys[j][:, 1]) > 0:
                    found.append((p, rings[j], px, py))
                    break
    return found


def _split_near(x, y, start, sizes, keep, misplaced, tolerance) -> int:
    """Split the culprit rings' segments that may have cut a hole's vertex off (it lies within the tolerance of them)."""
    ring, a, b = _segments(start, sizes, keep)
    s = start[ring]
    ia, ib = s + a, s + np.where(b == sizes[ring], 0, b)
    chosen = np.zeros(len(ring), np.bool_)
    for _, culprit, px, py in misplaced:
        chosen |= ((ring == culprit) & (b - a > 1)
                   & (np.minimum(x[ia], x[ib]) - tolerance <= px) & (px <= np.maximum(x[ia], x[ib]) + tolerance)
                   & (np.minimum(y[ia], y[ib]) - tolerance <= py) & (py <= np.maximum(y[ia], y[ib]) + tolerance))
    split = np.flatnonzero(chosen)
    if not len(split):
        return 0
    return _split_at_farthest(x, y, s[split], sizes[ring[split]], a[split], b[split], keep)


def _kept_xy(x, y, s, n, keep) -> np.ndarray:
    mask = keep[s : s + n]
    return np.stack([x[s : s + n][mask], y[s : s + n][mask]], axis=1)


@numba.njit(cache=True, nogil=True)
def _point_in_ring(px, py, rx, ry):  # pragma: no cover - compiled
    """+1 inside, -1 outside, 0 on the boundary (even-odd rule, exact on integers)."""
    n = len(rx)
    inside = False
    for k in range(n):
        ax, ay, bx, by = rx[k], ry[k], rx[(k + 1) % n], ry[(k + 1) % n]
        cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        if cross == 0 and min(ax, bx) <= px <= max(ax, bx) and min(ay, by) <= py <= max(ay, by):
            return 0
        if (ay > py) != (by > py):
            # The crossing's x compared with px, without dividing: sign(cross) against edge direction.
            if (cross > 0) == (by > ay):
                inside = not inside
    return 1 if inside else -1


@numba.njit(cache=True, nogil=True)
def _distance2(px, py, ax, ay, bx, by):  # pragma: no cover - compiled
    """Squared distance from point p to segment ab."""
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    t = 0.0
    if length2 > 0:
        t = min(1.0, max(0.0, ((px - ax) * dx + (py - ay) * dy) / length2))
    qx, qy = ax + t * dx - px, ay + t * dy - py
    return qx * qx + qy * qy


@numba.njit(cache=True, nogil=True)
def _farthest(x, y, s, n, a, b):  # pragma: no cover - compiled
    """The vertex strictly between ring positions a < b (b may be n: vertex 0) farthest from segment a-b, and its squared distance."""
    ib = s + (b % n)
    ax, ay, bx, by = x[s + a], y[s + a], x[ib], y[ib]
    best, far = -1.0, a
    for k in range(a + 1, b):
        d = _distance2(x[s + k], y[s + k], ax, ay, bx, by)
        if d > best:
            best, far = d, k
    return far, best


@numba.njit(cache=True, nogil=True)
def _fits(x, y, s, n, a, b, tol2):  # pragma: no cover - compiled
    """Whether every vertex strictly between ring positions a < b lies within the tolerance of segment a-b."""
    ib = s + (b % n)
    ax, ay, bx, by = x[s + a], y[s + a], x[ib], y[ib]
    for k in range(a + 1, b):
        if _distance2(x[s + k], y[s + k], ax, ay, bx, by) > tol2:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _reach(x, y, s, n, a, tol2):  # pragma: no cover - compiled
    """The farthest ring position (at most n, vertex 0 again) whose segment from a fits.

    Searched by doubling then bisecting over positions a + 2k, of a's own kind (corner or
    midpoint): a staircase's midpoints line up, as do the corners of a straight edge, while a
    segment ending on the other kind may miss by a little. The next position is tried last.
    Every segment taken is checked against every vertex it replaces, so the tolerance holds
    even where the reach is not monotonic.
    """
    good, k = 0, 1
    while a + 2 * k <= n and _fits(x, y, s, n, a, a + 2 * k, tol2):
        good, k = k, 2 * k
    bad = min(k, (n - a) // 2 + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        if _fits(x, y, s, n, a, a + 2 * mid, tol2):
            good = mid
        else:
            bad = mid
    b = a + 2 * good if good else a + 1
    if b + 1 <= n and _fits(x, y, s, n, a, b + 1, tol2):
        b += 1
    return b


@numba.njit(cache=True, nogil=True)
def _fit_rings(x, y, start, sizes, tolerance, keep):  # pragma: no cover - compiled
    """Mark the vertices each ring keeps, going round it from vertex 0 (a corner) by the farthest fitting segment.

    Rings alternate corners (even positions) and edge midpoints (odd). A staircase's corners
    are each the farthest reach of the one before, while its edge midpoints line up, so where a
    reach ends on a corner the midpoint just before it is taken instead if that reaches farther
    on. A ring keeps at least four vertices.
    """
    tol2 = tolerance * tolerance
    for r in range(len(start)):
        s, n = start[r], sizes[r]
        if n <= 8:
            keep[s : s + n] = True
            continue
        keep[s] = True
        count = 1
        a = 0
        while a < n:
            b = _reach(x, y, s, n, a, tol2)
            if (b < n and b % 2 == 0 and b - 1 > a and _fits(x, y, s, n, a, b - 1, tol2)
                    and _reach(x, y, s, n, b - 1, tol2) > _reach(x, y, s, n, b, tol2)):
                b -= 1
            a = b
            if a < n:
                keep[s + a] = True
                count += 1
        if count < 4:
            # A ring smaller than the tolerance: its vertex farthest from vertex 0, and the one
            # farthest from each half's segment, keep it a quadrilateral.
            m, best = 0, -1.0
            for k in range(1, n):
                d = (x[s + k] - x[s]) ** 2 + (y[s + k] - y[s]) ** 2
                if d > best:
                    best, m = d, k
            keep[s + m] = True
            far, _ = _farthest(x, y, s, n, 0, m)
            keep[s + far] = True
            far, _ = _farthest(x, y, s, n, m, n)
            keep[s + far] = True


@numba.njit(cache=True, nogil=True)
def _split_at_farthest(x, y, s, n, a, b, keep):  # pragma: no cover - compiled
    """Keep the farthest vertex of each segment off its line; the number of segments split."""
    count = 0
    for i in range(len(s)):
        far, d = _farthest(x, y, s[i], n[i], a[i], b[i])
        if d > 0:
            keep[s[i] + far] = True
            count += 1
    return count


@numba.njit(cache=True, nogil=True)
def _orient(ax, ay, bx, by, cx, cy):  # pragma: no cover - compiled
    v = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    return 1 if v > 0 else (-1 if v < 0 else 0)


@numba.njit(cache=True, nogil=True)
def _touches(ax, ay, bx, by, px, py):  # pragma: no cover - compiled
    """Whether p, collinear with segment ab, lies on it but is neither of its ends."""
    if (px == ax and py == ay) or (px == bx and py == by):
        return False
    return min(ax, bx) <= px <= max(ax, bx) and min(ay, by) <= py <= max(ay, by)


@numba.njit(cache=True, nogil=True)
def _conflict(p1x, p1y, p2x, p2y, q1x, q1y, q2x, q2y):  # pragma: no cover - compiled
    """Whether segments p and q meet anywhere but at an end they share."""
    o1 = _orient(p1x, p1y, p2x, p2y, q1x, q1y)
    o2 = _orient(p1x, p1y, p2x, p2y, q2x, q2y)
    o3 = _orient(q1x, q1y, q2x, q2y, p1x, p1y)
    o4 = _orient(q1x, q1y, q2x, q2y, p2x, p2y)
    if o1 == 0 and o2 == 0:
        # Collinear: they conflict when they overlap along a stretch, not just at a shared end.
        if abs(p2x - p1x) >= abs(p2y - p1y):
            lo = max(min(p1x, p2x), min(q1x, q2x))
            hi = min(max(p1x, p2x), max(q1x, q2x))
        else:
            lo = max(min(p1y, p2y), min(q1y, q2y))
            hi = min(max(p1y, p2y), max(q1y, q2y))
        return hi > lo
    if o1 * o2 < 0 and o3 * o4 < 0:
        return True
    return ((o1 == 0 and _touches(p1x, p1y, p2x, p2y, q1x, q1y))
            or (o2 == 0 and _touches(p1x, p1y, p2x, p2y, q2x, q2y))
            or (o3 == 0 and _touches(q1x, q1y, q2x, q2y, p1x, p1y))
            or (o4 == 0 and _touches(q1x, q1y, q2x, q2y, p2x, p2y)))


@numba.njit(cache=True, nogil=True)
def _flag_conflicts(x1, y1, x2, y2, flags):  # pragma: no cover - compiled
    """Flag both segments of every conflicting pair, sweeping the segments in order of their left ends."""
    xmin, xmax = np.minimum(x1, x2), np.maximum(x1, x2)
    ymin, ymax = np.minimum(y1, y2), np.maximum(y1, y2)
    order = np.argsort(xmin, kind="mergesort")
    n = len(order)
    for ii in range(n):
        i = order[ii]
        for jj in range(ii + 1, n):
            j = order[jj]
            if xmin[j] > xmax[i]:
                break
            if ymin[j] > ymax[i] or ymin[i] > ymax[j]:
                continue
            if _conflict(x1[i], y1[i], x2[i], y2[i], x1[j], y1[j], x2[j], y2[j]):
                flags[i] = True
                flags[j] = True
