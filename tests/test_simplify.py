"""Outline simplification: within the tolerance of the traced outline both ways, valid polygons, far fewer vertices."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from scipy import ndimage
from scipy.spatial import cKDTree

from gigaseg.outlines import tissue_outlines
from gigaseg.simplify import simplify_outlines, vertex_count


def blob(size: int = 2400, seed: int = 0) -> np.ndarray:
    """A large round piece with a ragged edge, holes and islands: outlines of some tens of thousands of vertices."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 80)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    return ((xx - c) ** 2 + (yy - c) ** 2 < (0.4 * size) ** 2) & (noise > -0.003)


def densify(ring: np.ndarray, step: float) -> np.ndarray:
    """Points along a closed ring's segments at most ``step`` apart."""
    points = []
    for a, b in zip(ring[:-1], ring[1:]):
        n = max(1, int(np.ceil(np.hypot(*(b - a)) / step)))
        points.append(a + (b - a) * np.linspace(0, 1, n, endpoint=False)[:, None])
    return np.concatenate(points)


def segments(outlines) -> tuple[np.ndarray, np.ndarray]:
    """(S, 4) segments x1, y1, x2, y2 of every ring, and the ring each belongs to."""
    segs, owner = [], []
    k = 0
    for rings in outlines:
        for ring in rings:
            segs.append(np.concatenate([ring[:-1], ring[1:]], axis=1))
            owner.append(np.full(len(ring) - 1, k))
            k += 1
    return np.concatenate(segs), np.concatenate(owner)


def bad_intersections(segs: np.ndarray) -> int:
    """Pairs of segments meeting anywhere but at an end both share (brute force over all pairs)."""
    p1, p2 = segs[:, None, :2], segs[:, None, 2:]
    bad = 0
    for i in range(len(segs)):
        q1, q2 = segs[i + 1 :, :2], segs[i + 1 :, 2:]
        a1, a2 = p1[i], p2[i]

        def cross(o, a, b):
            return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (b[..., 0] - o[..., 0])

        d1, d2 = cross(a1, a2, q1), cross(a1, a2, q2)
        d3, d4 = cross(q1, q2, a1), cross(q1, q2, a2)
        proper = (d1 * d2 < 0) & (d3 * d4 < 0)

        def on(a, b, p, d):  # p collinear with ab, inside it, and not one of its ends
            inside = (np.minimum(a[..., 0], b[..., 0]) <= p[..., 0]) & (p[..., 0] <= np.maximum(a[..., 0], b[..., 0])) \
                & (np.minimum(a[..., 1], b[..., 1]) <= p[..., 1]) & (p[..., 1] <= np.maximum(a[..., 1], b[..., 1]))
            end = (p == a).all(-1) | (p == b).all(-1)
            return (d == 0) & inside & ~end

        touch = on(a1, a2, q1, d1) | on(a1, a2, q2, d2) | on(q1, q2, a1, d3) | on(q1, q2, a2, d4)
        # Collinear segments sharing an end but running over each other.
        collinear = (d1 == 0) & (d2 == 0)
        along = np.abs(a2 - a1).argmax()
        lo = np.maximum(min(a1[0, along], a2[0, along]), np.minimum(q1[:, along], q2[:, along]))
        hi = np.minimum(max(a1[0, along], a2[0, along]), np.maximum(q1[:, along], q2[:, along]))
        overlap = collinear & (hi > lo)
        bad += int((proper | touch | overlap).sum())
    return bad


def signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2)


@pytest.mark.slow
def test_large_blob_is_simplified_within_the_tolerance_and_stays_valid():
    traced = tissue_outlines(blob(), downsample=2.0, origin=(100.0, 40.0))
    before = vertex_count(traced)
    assert before > 20_000
    for tolerance in (1.0, 4.0):  # half a traced pixel (the default), and two
        simplified = simplify_outlines(traced, tolerance, pixel=2.0)
        after = vertex_count(simplified)
        assert after < before / (3 if tolerance == 1.0 else 15), (tolerance, before, after)
        assert [len(p) for p in simplified] == [len(p) for p in traced]  # no piece or hole lost
        for rings, original in zip(simplified, traced):
            for ring, old in zip(rings, original):
                assert len(ring) >= 5 and np.array_equal(ring[0], ring[-1])
                # Orientation kept: exteriors positive, holes negative, and about the same area.
                assert np.sign(signed_area(ring)) == np.sign(signed_area(old))
                # Hausdorff distance: the traced outline lies within the tolerance of the simplified
                # one, and the simplified one within the tolerance of the traced one.
                step = 0.05
                traced_points, simple_points = densify(old, step), densify(ring, step)
                assert cKDTree(simple_points).query(traced_points)[0].max() <= tolerance + step
                assert cKDTree(traced_points).query(simple_points)[0].max() <= tolerance + step
        # Valid: no two segments meet but at a shared end, and every hole is inside its exterior.
        assert bad_intersections(segments(simplified)[0]) == 0
        for rings in simplified:
            exterior = MplPath(rings[0])
            for hole in rings[1:]:
                assert exterior.contains_points(hole[:-1], radius=-1e-9).any()


def test_zero_tolerance_leaves_the_outlines_unchanged():
    traced = tissue_outlines(blob(400, seed=1))
    same = simplify_outlines(traced, 0.0)
    assert len(same) == len(traced)
    for rings, original in zip(same, traced):
        assert all(np.array_equal(a, b) for a, b in zip(rings, original))
        assert len(rings) == len(original)


def test_staircases_lose_their_steps_at_half_a_pixel_but_right_angles_stay():
    mask = np.zeros((60, 80), np.uint8)
    mask[10:50, 10:70] = 1
    for i in range(30):  # a 45 degree staircase cut off the top-right corner
        mask[10 + i, 70 - 30 + i :] = 0
    traced = tissue_outlines(mask)
    simplified = simplify_outlines(traced, 0.5)
    ring = simplified[0][0][:-1]
    assert vertex_count(traced) > 60 and len(ring) <= 7
    # The rectangle's three square corners are kept exactly.
    for corner in ([10, 10], [10, 50], [70, 50]):
        assert (ring == corner).all(axis=1).any(), corner


def test_crossings_between_close_pieces_and_holes_are_split_away():
    # Ragged pieces one pixel apart and holes one pixel inside their exterior: at a tolerance of
    # several pixels the plain fits would cross; every crossing is split away.
    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.standard_normal((300, 300)), 3) > 0
    traced = tissue_outlines(mask)
    for tolerance in (0.5, 3.0, 8.0):
        simplified = simplify_outlines(traced, tolerance)
        assert vertex_count(simplified) < vertex_count(traced)
        assert [len(p) for p in simplified] == [len(p) for p in traced]
        assert bad_intersections(segments(simplified)[0]) == 0, tolerance
        for rings in simplified:
            exterior = MplPath(rings[0])
            for hole in rings[1:]:
                inside = exterior.contains_points(hole[:-1], radius=-1e-9)
                assert inside.any(), tolerance
                others = [MplPath(h) for h in rings[1:] if h is not hole]
                assert not any(o.contains_points(hole[:-1], radius=1e-9).any() for o in others), tolerance


def test_pieces_smaller_than_the_tolerance_do_not_vanish():
    mask = np.zeros((40, 40), np.uint8)
    mask[5:8, 5:9] = 1
    mask[20:30, 20:23] = 1
    simplified = simplify_outlines(tissue_outlines(mask), 50.0)
    assert len(simplified) == 2
    for rings in simplified:
        assert len(rings[0]) - 1 >= 4 and signed_area(rings[0]) > 0


def test_bad_tolerances_are_refused():
    traced = tissue_outlines(np.ones((4, 4), np.uint8))
    with pytest.raises(ValueError, match="zero or positive"):
        simplify_outlines(traced, -1.0)
    with pytest.raises(ValueError, match="zero or positive"):
        simplify_outlines(traced, float("nan"))
    with pytest.raises(ValueError, match="not on a raster"):
        simplify_outlines(tissue_outlines(np.ones((3, 3), np.uint8), downsample=1.25), 1.0, pixel=1.0)
