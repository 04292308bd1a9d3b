"""Tissue outlines: pixel-edge tracing, exact GeoJSON round trip, speck and hole filter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from gigaseg.data.geojson import load_annotations, parse_annotations, rasterise
from gigaseg.errors import MaskError
from gigaseg.outlines import feature_collection, tissue_outlines, write_geojson


def grid(text: str) -> np.ndarray:
    """A hand-drawn mask: '#' is 1, '.' is 0, one line per row."""
    rows = [line.strip() for line in text.strip().splitlines()]
    return np.array([[ch == "#" for ch in row] for row in rows], dtype=np.uint8)


def round_trip(mask, downsample=1.0, origin=(0.0, 0.0), **kwargs):
    """Outline ``mask``, write it as GeoJSON, parse it back and rasterise it at the same level."""
    outlines = tissue_outlines(mask, downsample=downsample, origin=origin, **kwargs)
    h, w = mask.shape
    if not outlines:
        return outlines, np.zeros((h, w), np.uint8)
    data = json.loads(json.dumps(feature_collection(outlines)))
    return outlines, rasterise(parse_annotations(data), origin, downsample, (w, h))


def signed_area(ring):
    x, y = ring[:-1, 0], ring[:-1, 1]
    return float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum()) / 2


SQUARES = grid(
    """
    ..........
    .###....##
    .###....##
    .###......
    ......#...
    """
)
RING_WITH_ISLAND = grid(
    """
    .........
    .#######.
    .#.....#.
    .#.###.#.
    .#.#.#.#.
    .#.###.#.
    .#.....#.
    .#######.
    """
)
DIAGONALS = grid(
    """
    #.#...
    .#....
    #.#...
    .....#
    ....#.
    """
)
# A piece whose diagonal touch lets the background through: (1, 1) is not a hole (4-connected
# background reaches it only through the corner, so it is one) and (2, 2) touches the border.
PINCH = grid(
    """
    ###
    #.#
    ##.
    """
)
CASES = {
    "squares": SQUARES,
    "ring_with_island": RING_WITH_ISLAND,
    "diagonals": DIAGONALS,
    "pinch": PINCH,
    "empty": np.zeros((4, 5), np.uint8),
    "full": np.ones((4, 5), np.uint8),
    "single": np.ones((1, 1), np.uint8),
}


@pytest.mark.parametrize("downsample, origin", [(1.0, (0.0, 0.0)), (4.0, (100.0, -37.5)), (2.5, (0.3, 7.0))])
@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_exact(name, downsample, origin):
    mask = CASES[name]
    outlines, back = round_trip(mask, downsample, origin)
    np.testing.assert_array_equal(back, mask)
    for rings in outlines:
        assert signed_area(rings[0]) > 0  # RFC 7946 exterior: counter-clockwise in (x, y) numbers
        assert all(signed_area(r) < 0 for r in rings[1:])
        assert all(np.array_equal(r[0], r[-1]) for r in rings)
        # Every corner lies on the level's pixel grid.
        for r in rings:
            np.testing.assert_allclose((r - origin) / downsample, np.round((r - origin) / downsample), atol=1e-9)


def test_pieces_and_holes_are_grouped():
    outlines = tissue_outlines(RING_WITH_ISLAND)
    # The frame with one hole (the gap around the island), the island with its own hole.
    assert [len(p) for p in outlines] == [2, 2]
    assert signed_area(outlines[0][0]) == 7 * 7 and signed_area(outlines[0][1]) == -(5 * 5)
    assert signed_area(outlines[1][0]) == 9 and signed_area(outlines[1][1]) == -1


def test_diagonal_pixels_are_one_piece():
    # 8-connected: the X of five pixels is one piece, the separate diagonal run another.
    outlines = tissue_outlines(DIAGONALS)
    assert len(outlines) == 2
    _, n = ndimage.label(DIAGONALS, structure=np.ones((3, 3)))
    assert n == 2
    assert sorted(signed_area(p[0]) for p in outlines) == [2, 5]


def test_full_and_empty_masks():
    assert tissue_outlines(np.zeros((7, 3), bool)) == []
    (rings,) = tissue_outlines(np.ones((7, 3), bool), downsample=2, origin=(10, 20))
    assert len(rings) == 1
    assert sorted(map(tuple, rings[0][:-1].tolist())) == [(10, 20), (10, 34), (16, 20), (16, 34)]


def test_rectangle_has_four_corners():
    mask = np.zeros((50, 80), np.uint8)
    mask[5:45, 10:70] = 1
    (rings,) = tissue_outlines(mask)
    assert rings[0].shape == (5, 2)  # four corners plus the closing point
    (feature,) = feature_collection([rings])["features"]
    assert len(feature["geometry"]["coordinates"][0]) == 5


def test_speck_filter_drops_small_pieces_and_fills_small_holes():
    mask = np.zeros((40, 40), np.uint8)
    mask[2:22, 2:22] = 1  # 400 px, with a hole of 4 px and one of 36 px
    mask[5:7, 5:7] = 0
    mask[10:16, 10:16] = 0
    mask[30:33, 30:33] = 1  # a 9 px speck
    mask[30:38, 2:10] = 1  # 64 px
    d = 2.0  # areas in level-0 px² are 4x the pixel counts
    outlines, back = round_trip(mask, d, (0.0, 0.0), min_area=4 * 20)
    expected = mask.copy()
    expected[30:33, 30:33] = 0
    expected[5:7, 5:7] = 1
    np.testing.assert_array_equal(back, expected)
    assert [len(p) for p in outlines] == [2, 1]
    # Holes can be kept whatever their size.
    _, back = round_trip(mask, d, (0.0, 0.0), min_area=4 * 20, min_hole_area=0)
    expected[5:7, 5:7] = 0
    np.testing.assert_array_equal(back, expected)


def expected_after_filter(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """The mask without 8-connected pieces under ``min_pixels`` and with smaller holes filled."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())
    kept = (sizes >= min_pixels)[labels] & (labels > 0)
    # Holes: 4-connected background components that do not reach the border.
    padded = np.pad(~kept, 1, constant_values=True)
    back, _ = ndimage.label(padded)
    back = back[1:-1, 1:-1]
    outside = np.unique(np.concatenate([back[0], back[-1], back[:, 0], back[:, -1]]))
    small = (np.bincount(back.ravel()) < min_pixels)
    small[outside] = False
    small[0] = False
    return (kept | small[back]).astype(np.uint8)


@settings(max_examples=150, deadline=None)
@given(
    mask=arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 1)),
    downsample=st.sampled_from([1.0, 3.0, 0.5]),
    min_pixels=st.sampled_from([0, 2, 5]),
)
def test_round_trip_property(mask, downsample, min_pixels):
    origin = (-3.0, 11.0)
    _, back = round_trip(mask, downsample, origin, min_area=min_pixels * downsample**2)
    np.testing.assert_array_equal(back, expected_after_filter(mask.astype(bool), min_pixels))


def test_write_geojson_is_read_back_as_annotations(tmp_path):
    outlines = tissue_outlines(RING_WITH_ISLAND, downsample=4, origin=(8, 8))
    path = write_geojson(outlines, tmp_path / "tissue.geojson", properties={"source": "test"})
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    props = data["features"][0]["properties"]
    assert props["objectType"] == "annotation" and props["source"] == "test"
    assert props["classification"]["name"] == "Tissue" and len(props["classification"]["color"]) == 3
    polygons = load_annotations(path, classes=["Tissue"])
    back = rasterise(polygons, (8, 8), 4.0, RING_WITH_ISLAND.shape[::-1])
    np.testing.assert_array_equal(back, RING_WITH_ISLAND)
    assert [p.name for p in tmp_path.iterdir()] == ["tissue.geojson"]  # no temporary left behind


def test_bad_mask_is_refused():
    with pytest.raises(MaskError, match="2-D"):
        tissue_outlines(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="downsample"):
        tissue_outlines(np.zeros((2, 3)), downsample=0)


def test_large_mask_is_fast():
    import time

    from skimage.draw import ellipse

    rng = np.random.default_rng(1)
    mask = np.zeros((2000, 2000), bool)
    for _ in range(15):
        rr, cc = ellipse(*rng.integers(0, 2000, 2), *rng.integers(30, 400, 2), shape=mask.shape, rotation=rng.random())
        mask[rr, cc] = True
    for _ in range(100):
        rr, cc = ellipse(*rng.integers(0, 2000, 2), *rng.integers(2, 20, 2), shape=mask.shape)
        mask[rr, cc] = ~mask[rr, cc]
    start = time.perf_counter()
    _, back = round_trip(mask.astype(np.uint8), 4.0, (0.0, 0.0))
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(back, mask)
    assert elapsed < 10, f"outlining and rasterising 4 Mpx took {elapsed:.1f} s"
