"""QuPath GeoJSON annotations: parsing, errors, and pixel-centre rasterisation."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from gigaseg.data.geojson import GeoJSONMask, load_annotations, parse_annotations, rasterise
from gigaseg.data.regions import RegionSpec, fit_region
from gigaseg.errors import MaskError
from gigaseg.slides.array_reader import ArrayReader


def grid(text: str) -> np.ndarray:
    """A hand-drawn mask: '#' is 1, '.' is 0, one line per row."""
    rows = [line.strip() for line in text.strip().splitlines()]
    return np.array([[ch == "#" for ch in row] for row in rows], dtype=np.uint8)


def rect(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry, cls=None):
    props = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def polygon(*rings):
    return {"type": "Polygon", "coordinates": [list(r) for r in rings]}


def write(tmp_path, data, name="annotations.geojson"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# Outer (1, 1)-(8, 7) with a hole (3, 3)-(5, 5): centres c + 0.5 inside when 1 <= c + .5 < 8.
RING_WITH_HOLE = polygon(rect(1, 1, 8, 7), rect(3, 3, 5, 5))
EXPECTED_HOLE = grid(
    """
    ..........
    .#######..
    .#######..
    .##..###..
    .##..###..
    .#######..
    .#######..
    ..........
    """
)


def test_polygon_with_hole_pixel_by_pixel():
    polys = parse_annotations(RING_WITH_HOLE)
    np.testing.assert_array_equal(rasterise(polys, (0, 0), 1.0, (10, 8)), EXPECTED_HOLE)


def test_rasterise_triangle_pixel_by_pixel():
    # Inside when (c + .5) + (r + .5) < 6.3, i.e. c + r <= 5; the ring is not closed.
    tri = {"type": "Polygon", "coordinates": [[[0, 0], [6.3, 0], [0, 6.3]]]}
    expected = grid(
        """
        ######..
        #####...
        ####....
        ###.....
        ##......
        #.......
        """
    )
    np.testing.assert_array_equal(rasterise(parse_annotations(tri), (0, 0), 1.0, (8, 6)), expected)


def test_rasterise_at_level_one_with_origin():
    # Level 1 (downsample 2), origin (4, 2): pixel (r, c) samples level-0 (5 + 2c, 3 + 2r).
    # Outer x in [6, 16), y in [4, 14) -> c, r in 1..5; hole x in [8, 12), y in [8, 10) -> c 2..3, r 3.
    polys = parse_annotations(polygon(rect(6, 4, 16, 14), rect(8, 8, 12, 10)))
    expected = grid(
        """
        ........
        .#####..
        .#####..
        .#..##..
        .#####..
        .#####..
        ........
        """
    )
    np.testing.assert_array_equal(rasterise(polys, (4, 2), 2.0, (8, 7)), expected)


def test_edges_follow_top_left_rule():
    # Edges exactly on pixel centres: left/top inside, right/bottom outside.
    polys = parse_annotations(polygon(rect(1.5, 1.5, 4.5, 3.5)))
    expected = grid(
        """
        ......
        .###..
        .###..
        ......
        """
    )
    np.testing.assert_array_equal(rasterise(polys, (0, 0), 1.0, (6, 4)), expected)


def test_tiles_agree_with_whole_and_with_brute_force():
    # A star with 3000 vertices, rasterised in uneven tiles, matches a direct even-odd test.
    rng = np.random.default_rng(0)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 3000))
    radius = rng.uniform(15, 60, 3000)
    ring = np.stack([70 + radius * np.cos(angles), 65 + radius * np.sin(angles)], axis=1)
    hole = np.array([[60.3, 60.1], [80.2, 61.7], [75.5, 79.9]])
    polys = parse_annotations(polygon(ring.tolist(), hole.tolist()))
    whole = rasterise(polys, (3, 1), 1.0, (140, 130))
    tiled = np.zeros_like(whole)
    for r0, r1 in ((0, 37), (37, 90), (90, 130)):
        for c0, c1 in ((0, 51), (51, 52), (52, 140)):
            tiled[r0:r1, c0:c1] = rasterise(polys, (3 + c0, 1 + r0), 1.0, (c1 - c0, r1 - r0))
    np.testing.assert_array_equal(tiled, whole)
    ys, xs = np.mgrid[0:130, 0:140]
    px, py = (3 + xs + 0.5).ravel(), (1 + ys + 0.5).ravel()
    inside = np.zeros(px.size, dtype=bool)
    for r in (ring, hole):
        a, b = r, np.roll(r, -1, axis=0)
        for (xa, ya), (xb, yb) in zip(a, b):
            crosses = (ya <= py) != (yb <= py)
            with np.errstate(divide="ignore", invalid="ignore"):
                xi = xa + (py - ya) * (xb - xa) / (yb - ya)
            inside ^= crosses & (xi > px)
    np.testing.assert_array_equal(whole.ravel(), inside.astype(np.uint8))
    assert 0.2 < whole.mean() < 0.9


def test_big_polygon_is_fast():
    angles = np.linspace(0, 2 * np.pi, 20000, endpoint=False)
    ring = np.stack([2048 + 2000 * np.cos(angles), 2048 + 1900 * np.sin(angles)], axis=1)
    polys = parse_annotations(polygon(ring.tolist()))
    start = time.perf_counter()
    total = 0
    for r0 in range(0, 4096, 1024):
        for c0 in range(0, 4096, 1024):
            total += int(rasterise(polys, (c0, r0), 1.0, (1024, 1024)).sum())
    elapsed = time.perf_counter() - start
    assert abs(total - np.pi * 2000 * 1900) / (np.pi * 2000 * 1900) < 1e-3
    assert elapsed < 5.0


def test_multipolygon_union_and_formats(tmp_path):
    multi = {"type": "MultiPolygon", "coordinates": [[rect(0, 0, 2, 2)], [rect(3, 1, 5, 3)]]}
    expected = grid(
        """
        ##....
        ##.##.
        ...##.
        """
    )
    for data in (multi, feature(multi), [feature(multi)], {"type": "FeatureCollection", "features": [feature(multi)]}):
        polys = load_annotations(write(tmp_path, data))
        np.testing.assert_array_equal(rasterise(polys, (0, 0), 1.0, (6, 3)), expected)
    # Overlapping features are united, not cancelled by even-odd.
    overlap = [feature(polygon(rect(0, 0, 4, 2))), feature(polygon(rect(2, 0, 6, 2)))]
    assert rasterise(parse_annotations(overlap), (0, 0), 1.0, (6, 2)).all()


def test_classification_filter():
    data = {
        "type": "FeatureCollection",
        "features": [
            feature(polygon(rect(0, 0, 2, 2)), "Tissue"),
            feature(polygon(rect(4, 0, 6, 2)), "Artifact"),
            feature({"type": "Point", "coordinates": [1, 1]}, "Other"),
        ],
    }
    tissue = rasterise(parse_annotations(data, classes=["Tissue"]), (0, 0), 1.0, (6, 2))
    np.testing.assert_array_equal(tissue, grid("##....\n##...."))
    both = rasterise(parse_annotations(data, classes=["Tissue", "Artifact"]), (0, 0), 1.0, (6, 2))
    np.testing.assert_array_equal(both, grid("##..##\n##..##"))
    with pytest.raises(MaskError, match="no annotations of class Stroma.*'Artifact', 'Other', 'Tissue'"):
        parse_annotations(data, classes=["Stroma"])
    with pytest.raises(MaskError, match="'Point'"):
        parse_annotations(data)  # unfiltered, the point annotation is not a polygon


@pytest.mark.parametrize(
    "data, message",
    [
        ({"type": "FeatureCollection", "features": []}, "no annotations"),
        ([], "no annotations"),
        ({"foo": 1}, "not a GeoJSON"),
        ({"type": "FeatureCollection"}, "no 'features' list"),
        ([{"type": "Polygon"}], "not a GeoJSON Feature"),
        ([{"type": "Feature", "properties": {}}], "has no geometry"),
        (feature({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}), "'LineString'"),
        (polygon([[0, 0], [1, 1], [0, 0]]), "at least 3"),
        (polygon([[0, 0], [5, 0], [5, 5], [0, 5], [0, 0]], [[1, 1], [2, 2]]), "ring 1.*at least 3"),
        (polygon([["a", "b"], [1, 0], [1, 1]]), "numbers"),
        (polygon([[0, 0], [1], [1, 1]]), "numbers"),
        (polygon([[0, 0], [1, True], [1, 1]]), "numbers"),
        ({"type": "Polygon", "coordinates": []}, "non-empty list of rings"),
        ({"type": "MultiPolygon", "coordinates": []}, "non-empty list of polygons"),
        (polygon([[0, 0], [float("nan"), 0], [1, 1]]), "finite"),
    ],
)
def test_malformed_annotations(data, message):
    with pytest.raises(MaskError, match=message):
        parse_annotations(data)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(MaskError, match="bad.geojson is not valid JSON"):
        load_annotations(bad)
    with pytest.raises(MaskError, match="does not exist"):
        load_annotations(tmp_path / "missing.geojson")


def test_mask_source_at_level_and_wrong_coordinate_space(tmp_path):
    reader = ArrayReader(np.zeros((64, 96, 3), np.uint8), levels=2)
    source = GeoJSONMask(write(tmp_path, feature(polygon(rect(6, 4, 16, 14), rect(8, 8, 12, 10)), "T")),
                         classes=["T"])
    region = fit_region(reader, RegionSpec(4, 2, 8, 7, level=1), total_stride=1)
    source.attach(reader, region, tmp_path)
    mask = source.read((4, 2), 1, (8, 7))
    assert mask.dtype == np.uint8 and mask.sum() == 23
    desc = source.describe()
    assert desc["kind"] == "geojson" and desc["labels"]["tissue"] == ["T"] and len(desc["sha256"]) == 64
    assert desc["polygons"] == {"tissue": 1, "background": 0, "ignore": 0} and source.produces_ignore is False

    far = GeoJSONMask(write(tmp_path, feature(polygon(rect(500, 500, 600, 600))), "far.geojson"))
    with pytest.raises(MaskError, match="entirely outside.*level-0 pixels"):
        far.attach(reader, region, tmp_path)


def test_qupath_coordinates_land_on_the_slide_pixels_of_a_slide_with_bounds(tmp_path):
    from scn_slides import write_scn_slide

    from gigaseg.data.region_kinds import annotation_regions
    from gigaseg.dataset import RegionRequest
    from gigaseg.slides import open_slide

    # A Leica SCN scan at (37, 21) of a 200x130 canvas; QuPath's (0, 0) is the scan's corner.
    # The scan holds a dark 30x20 square at (10, 5) of it; a QuPath annotation drawn around it
    # must cover the same pixels of OpenSlide's level 0, at (47, 26).
    scan = np.full((80, 120, 3), 235, np.uint8)
    scan[5:25, 10:40] = (90, 30, 110)
    path = write_scn_slide(tmp_path / "slide.scn", scan, offset=(37, 21), canvas=(200, 130))
    annotations = write(tmp_path, feature(polygon(rect(10, 5, 40, 25)), "Tissue"))
    source = GeoJSONMask(annotations, classes=["Tissue"])
    with open_slide(path) as slide:
        assert slide.bounds_offset == (37, 21)
        region = fit_region(slide, RegionSpec(0, 0, 200, 130, level=0), total_stride=1)
        source.attach(slide, region, tmp_path)
        mask = source.read((0, 0), 0, (200, 130))
        dark = slide.read_region((0, 0), 0, (200, 130)).sum(axis=2) < 400
        # At level 1 too (each level-1 pixel's centre decides).
        half = source.read((0, 0), 1, (100, 65))
        regions = annotation_regions(slide, RegionRequest(name="a", kind="annotations", annotation_class="Tissue"),
                                     annotations)
    assert dark.sum() == 600 and np.array_equal(mask == 1, dark)
    # Level-1 pixel (r, c) has its centre at level-0 (2c + 1, 2r + 1): inside for 47 <= 2c + 1 < 77, 26 <= 2r + 1 < 46.
    assert np.array_equal(np.argwhere(half == 1), np.argwhere(np.pad(np.ones((10, 15)), ((13, 42), (23, 62)))))
    # An annotation region is the annotation's box on the slide's pixels.
    assert [(r.x, r.y, r.width, r.height) for r in regions] == [(47, 26, 30, 20)]
    # attach again (another region of the slide) does not move the polygons twice.
    with open_slide(path) as slide:
        source.attach(slide, region, tmp_path)
        assert np.array_equal(source.read((0, 0), 0, (200, 130)) == 1, dark)
