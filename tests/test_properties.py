"""Property-based tests of the tile planner and of GeoJSON parsing, rasterising and reading for evaluation.

They add to tests/test_streaming_plan.py (cores partition the region, windows are the
clipped core + halo) and tests/test_outlines.py (mask -> outlines -> GeoJSON -> mask in
memory): here the planner is checked against an independent grid and against arbitrary
invalid arguments, the memory planner's choice against its own estimate, the GeoJSON
round trip through a file and the band reader ``gigaseg-evaluate`` uses, and the parser
and file reader against garbage, which must end in MaskError, never another exception.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gigaseg.data.geojson import MAX_COORDINATE, load_annotations, parse_annotations, rasterise
from gigaseg.errors import MaskError, MemoryPlanError, RegionError
from gigaseg.evaluation_inputs import MaskInfo, evaluate_files, open_reference
from gigaseg.outlines import tissue_outlines, write_geojson
from gigaseg.streaming.plan import RegionShapeError, as_tile_shape, check_region_shape, plan_tiles

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----- tile planner ------------------------------------------------------------------------------


@FAST
@given(
    stride=st.sampled_from([1, 2, 8, 64]),
    blocks=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    tile_blocks=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    halo_blocks=st.integers(0, 4),
    form=st.sampled_from(["tuple", "list", "numpy"]),
)
def test_plan_matches_an_independent_grid(stride, blocks, tile_blocks, halo_blocks, form):
    h, w = blocks[0] * stride, blocks[1] * stride
    th, tw = tile_blocks[0] * stride, tile_blocks[1] * stride
    halo = halo_blocks * stride
    tile = {"tuple": (th, tw), "list": [th, tw], "numpy": np.array([th, tw])}[form]
    plan = plan_tiles((np.int64(h), w), tile, np.int64(halo), stride)

    # The grid: ceil(size / tile) cores per axis, a tile larger than the region being the region.
    rows, cols = math.ceil(h / th), math.ceil(w / tw)
    assert plan.grid == (rows, cols) and len(plan) == rows * cols
    assert plan.tile_shape == (min(th, h), min(tw, w))
    for t in plan:
        assert t.index == t.row * cols + t.col  # row-major
        assert t.core == (t.row * th, t.col * tw, min((t.row + 1) * th, h), min((t.col + 1) * tw, w))
        # Every coordinate is a plain int (the engine slices arrays and builds tensors with them).
        assert all(type(v) is int for v in t.core + t.window)
        # The window holds every pixel within `halo` of its core that lies in the region, and no more.
        top, left, bottom, right = t.window
        assert (top, left) == (max(t.core[0] - halo, 0), max(t.core[1] - halo, 0))
        assert (bottom, right) == (min(t.core[2] + halo, h), min(t.core[3] + halo, w))
        assert 0 <= top <= t.core[0] < t.core[2] <= bottom <= h and 0 <= left <= t.core[1] < t.core[3] <= right <= w
        oy, ox = t.core_offset
        assert oy + t.core_shape[0] <= t.window_shape[0] and ox + t.core_shape[1] <= t.window_shape[1]
    # Tiles of one row of the grid share their image rows (the engine reads a band per row).
    for r in range(rows):
        assert len({(t.core[0], t.core[2], t.window[0], t.window[2]) for t in plan if t.row == r}) == 1
    assert plan.window_pixels >= h * w
    assert plan.max_window_shape[0] <= min(th, h) + 2 * halo and plan.max_window_shape[1] <= min(tw, w) + 2 * halo


def _valid_pixels(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# Sizes a caller might pass by mistake: negative, zero, off-stride, float, bool, None, text, wrong length.
_ANY_SIZE = st.one_of(
    st.integers(-130, 300),
    st.sampled_from([0, 64, 128, 256, -64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([True, False, None, "64", b"64", 64.0]),
)
_ANY_SHAPE = st.one_of(
    _ANY_SIZE,
    st.tuples(_ANY_SIZE, _ANY_SIZE),
    st.lists(_ANY_SIZE, max_size=3),
    st.tuples(st.sampled_from([64, 128, 192]), st.sampled_from([64, 128, 320])),
)


def _expected_valid(region, tile, halo, stride) -> bool:
    """Whether plan_tiles must accept these arguments (an oracle written from its documented contract)."""
    if not _valid_pixels(stride) or stride <= 0:
        return False

    def multiples(value) -> bool:
        return _valid_pixels(value) and value > 0 and value % stride == 0

    if not (isinstance(region, (tuple, list)) and len(region) == 2 and all(map(multiples, region))):
        return False
    tiles = (tile, tile) if _valid_pixels(tile) else tile
    if not (isinstance(tiles, (tuple, list)) and len(tiles) == 2 and all(map(multiples, tiles))):
        return False
    return _valid_pixels(halo) and halo >= 0 and halo % stride == 0


@settings(max_examples=300, deadline=None)
@given(region=_ANY_SHAPE, tile=_ANY_SHAPE, halo=_ANY_SIZE, stride=st.one_of(_ANY_SIZE, st.sampled_from([1, 32, 64])))
def test_invalid_plan_arguments_raise_region_shape_error(region, tile, halo, stride):
    if _expected_valid(region, tile, halo, stride):
        plan = plan_tiles(region, tile, halo, stride)
        assert len(plan) >= 1
        return
    with pytest.raises(RegionShapeError) as info:
        plan_tiles(region, tile, halo, stride)
    # One error class for all of them: a RegionError for the entry points, a ValueError for callers.
    assert isinstance(info.value, RegionError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert any(word in message for word in ("stride", "tile", "halo", "region")), message


@FAST
@given(
    region=st.tuples(st.integers(-3, 300), st.integers(-3, 300)),
    stride=st.sampled_from([1, 16, 64]),
)
def test_region_check_suggests_a_shape_that_passes(region, stride):
    try:
        check_region_shape(region, stride)
    except RegionShapeError as exc:
        # "crop it to HxW": the suggestion is itself a valid region.
        suggestion = str(exc).split("crop it to ")[1].split(" ")[0]
        fit = tuple(int(v) for v in suggestion.split("x"))
        check_region_shape(fit, stride)
        assert all(f <= max(v, stride) for f, v in zip(fit, region))
    else:
        assert all(v > 0 and v % stride == 0 for v in region)


@FAST
@given(side=st.integers(1, 5000), numpy=st.booleans())
def test_square_tile_size_forms_agree(side, numpy):
    value = np.int32(side) if numpy else side
    assert as_tile_shape(value) == as_tile_shape((side, side)) == as_tile_shape([side, np.int64(side)]) == (side, side)


@functools.cache
def _gigaunet():
    from gigaseg.model import build_unet

    return build_unet()


@settings(max_examples=40, deadline=None)
@given(
    blocks=st.tuples(st.integers(1, 60), st.integers(1, 60)),
    budget_mib=st.integers(900, 2600),
    max_tile=st.sampled_from([256, 512, 1024]),
)
def test_memory_planner_picks_a_tile_that_fits_and_covers_the_region(blocks, budget_mib, max_tile):
    from gigaseg.streaming.memory import plan_tile_size, tiled_step_bytes

    model = _gigaunet()
    region = (blocks[0] * 64, blocks[1] * 64)
    budget = budget_mib * 2**20
    try:
        plan = plan_tile_size(model, region, budget_bytes=budget, max_tile=max_tile)
    except MemoryPlanError as exc:
        # Only when even the smallest tile does not fit, and the message says so.
        assert tiled_step_bytes(model, 64, 64) > budget and "64x64" in str(exc)
        return
    th, tw = plan.tile_size
    assert th % 64 == 0 and tw % 64 == 0 and 0 < th <= min(max_tile, region[0]) and 0 < tw <= min(max_tile, region[1])
    assert plan.estimated_peak_bytes == tiled_step_bytes(model, (th, tw), plan.halo) <= budget
    assert plan.tiles == len(plan_tiles(region, (th, tw), plan.halo, 64))
    # Balancing shrinks tiles without adding any: the count is that of the square tile it started from.
    square = max(t for t in range(64, min(max_tile, max(region)) + 1, 64) if tiled_step_bytes(model, t, 64) <= budget)
    assert plan.tiles == math.ceil(region[0] / square) * math.ceil(region[1] / square)


@settings(max_examples=40, deadline=None)
@given(
    tile=st.integers(1, 40).map(lambda b: 64 * b),
    budget_mib=st.integers(960, 2000),
)
def test_memory_planner_refusal_names_a_tile_that_fits(tile, budget_mib):
    from gigaseg.streaming.memory import plan_tile_size, tiled_step_bytes

    model = _gigaunet()
    budget = budget_mib * 2**20
    region = (64 * 48, 64 * 48)
    if tiled_step_bytes(model, tile, 64) <= budget:
        assert plan_tile_size(model, region, budget_bytes=budget, tile_size=tile).tile_size == (tile, tile)
        return
    with pytest.raises(MemoryPlanError, match=f"{tile}x{tile} tiles") as info:
        plan_tile_size(model, region, budget_bytes=budget, tile_size=tile)
    hint = str(info.value).split("use tile_size=")
    if len(hint) == 2:  # "use tile_size=N or less": N fits, N + 64 does not
        suggested = int(hint[1].split(" ")[0])
        assert tiled_step_bytes(model, suggested, 64) <= budget < tiled_step_bytes(model, suggested + 64, 64)
    else:
        assert tiled_step_bytes(model, 64, 64) > budget


def test_memory_planner_reports_a_bad_tile_size_as_such():
    from gigaseg.streaming.memory import plan_tile_size

    # Not as a memory shortfall: a tile that is no stride multiple is refused before estimating.
    with pytest.raises(RegionShapeError, match="tile height -64"):
        plan_tile_size(_gigaunet(), (128, 128), budget_bytes=1, tile_size=-64)
    with pytest.raises(RegionShapeError, match="tile_size must be an integer or a"):
        plan_tile_size(_gigaunet(), (128, 128), budget_bytes=2**40, tile_size=(64, 64, 64))


# ----- GeoJSON: round trip through a file and the evaluation reader ---------------------------------

_MASKS = arrays(np.uint8, st.tuples(st.integers(1, 14), st.integers(1, 14)), elements=st.integers(0, 1))


@FAST
@given(mask=_MASKS, downsample=st.sampled_from([1.0, 2.0, 4.0, 0.5, 3.0]), cuts=st.lists(st.integers(1, 13), max_size=4))
def test_geojson_reference_read_in_bands_gives_the_mask_back(mask, downsample, cuts):
    assume(mask.any())  # an empty mask has no outlines (its GeoJSON is refused, see below)
    h, w = mask.shape
    with tempfile.TemporaryDirectory() as folder:
        path = write_geojson(tissue_outlines(mask, downsample=downsample), Path(folder) / "reference.geojson")
        prediction = MaskInfo("prediction.tiff", "binary", w, h, downsample)
        tissue, info = open_reference(path, prediction)
    assert info.kind == "geojson" and (info.width, info.height, info.downsample) == (w, h, downsample)
    bounds = sorted({0, h, *(c for c in cuts if c < h)})
    bands = [tissue.rows(top, bottom) for top, bottom in zip(bounds, bounds[1:])]
    assert all(b.dtype == bool for b in bands)
    np.testing.assert_array_equal(np.concatenate(bands), mask.astype(bool))


@settings(max_examples=25, deadline=None)
@given(mask=_MASKS)
def test_evaluating_a_mask_against_its_own_outlines_scores_one(mask):
    from PIL import Image

    assume(mask.any())
    with tempfile.TemporaryDirectory() as folder:
        prediction = Path(folder) / "prediction.png"
        Image.fromarray(mask * 255).save(prediction)
        reference = write_geojson(tissue_outlines(mask), Path(folder) / "reference.geojson")
        result, inputs = evaluate_files(prediction, reference)
    assert inputs["reference"]["kind"] == "geojson"
    assert result.counts.predicted == result.counts.reference == result.counts.true_positive == int(mask.sum())
    assert result.scores()["dice"] == 1.0


def test_an_empty_feature_collection_is_refused_by_evaluation(tmp_path):
    # What gigaseg-predict writes for a slide without tissue: a defined one-line error, not a crash.
    from PIL import Image

    prediction = tmp_path / "prediction.png"
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(prediction)
    reference = write_geojson(tissue_outlines(np.zeros((4, 6), np.uint8)), tmp_path / "empty.geojson")
    assert json.loads(reference.read_text()) == {"type": "FeatureCollection", "features": []}
    with pytest.raises(MaskError, match="empty.geojson: the file holds no annotations"):
        evaluate_files(prediction, reference)


# ----- GeoJSON: rasterising arbitrary polygons ----------------------------------------------------

# Quarters land exactly on pixel centres and corners (ties for the top-left rule, computed exactly);
# thirds never come within 1/12 of one, so rounding cannot move them across.
_COORD = st.one_of(st.integers(-16, 80).map(lambda v: v / 4), st.integers(-12, 60).map(lambda v: v / 3))
_RING = st.lists(st.tuples(_COORD, _COORD), min_size=3, max_size=9)


def _valid_polygons(rings: list[list[tuple[float, float]]]) -> list:
    """The rings that parse as polygons (enough distinct points), one polygon each."""
    polygons = []
    for ring in rings:
        try:
            polygons.extend(parse_annotations({"type": "Polygon", "coordinates": [[list(p) for p in ring]]}))
        except MaskError as exc:
            assert "distinct point" in str(exc)
    return polygons


@FAST
@given(
    rings=st.lists(_RING, min_size=1, max_size=3),
    origin=st.tuples(st.integers(-3, 3), st.integers(-3, 3)),
    downsample=st.sampled_from([1.0, 0.5, 2.0, 1.5]),
    row_cut=st.integers(0, 16),
    col_cut=st.integers(0, 16),
)
def test_rasterising_in_tiles_equals_whole_and_features_unite(rings, origin, downsample, row_cut, col_cut):
    polygons = _valid_polygons(rings)
    assume(polygons)
    w, h = 16, 16
    whole = rasterise(polygons, origin, downsample, (w, h))
    assert whole.dtype == np.uint8 and whole.shape == (h, w) and set(np.unique(whole)) <= {0, 1}
    tiled = np.zeros_like(whole)
    for r0, r1 in ((0, row_cut), (row_cut, h)):
        for c0, c1 in ((0, col_cut), (col_cut, w)):
            if r1 > r0 and c1 > c0:
                location = (origin[0] + c0 * downsample, origin[1] + r0 * downsample)
                tiled[r0:r1, c0:c1] = rasterise(polygons, location, downsample, (c1 - c0, r1 - r0))
    np.testing.assert_array_equal(tiled, whole)
    # Separate features are united (not cancelled by the even-odd rule, which holds within one polygon).
    union = np.zeros_like(whole)
    for polygon in polygons:
        union |= rasterise([polygon], origin, downsample, (w, h))
    np.testing.assert_array_equal(whole, union)


def _segment_distance(px, py, xa, ya, xb, yb):
    dx, dy = xb - xa, yb - ya
    t = np.clip(((px - xa) * dx + (py - ya) * dy) / (dx * dx + dy * dy or 1.0), 0.0, 1.0)
    return np.hypot(px - (xa + t * dx), py - (ya + t * dy))


@FAST
@given(ring=_RING, origin=st.tuples(st.integers(-3, 3), st.integers(-3, 3)), downsample=st.sampled_from([1.0, 0.5, 2.0]))
def test_rasterised_pixels_are_the_centres_inside_by_the_even_odd_rule(ring, origin, downsample):
    polygons = _valid_polygons([ring])
    assume(polygons)
    w, h = 14, 12
    mask = rasterise(polygons, origin, downsample, (w, h))
    ys, xs = np.mgrid[0:h, 0:w]
    px, py = origin[0] + (xs + 0.5) * downsample, origin[1] + (ys + 0.5) * downsample
    points = np.asarray(ring, dtype=np.float64)
    inside = np.zeros((h, w), bool)
    near_edge = np.zeros((h, w), bool)
    for (xa, ya), (xb, yb) in zip(points, np.roll(points, -1, axis=0)):
        near_edge |= _segment_distance(px, py, xa, ya, xb, yb) < 1e-9
        if ya == yb:
            continue
        crosses = (ya <= py) != (yb <= py)
        xi = xa + (py - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (xi > px)
    # Centres on an edge follow the top-left rule (tested by hand in test_geojson.py); all others are exact.
    np.testing.assert_array_equal(mask[~near_edge], inside[~near_edge].astype(np.uint8))


# ----- GeoJSON: garbage in, MaskError out ---------------------------------------------------------

_NUMBER = st.one_of(
    st.integers(-50, 50),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e300, -1e300, 2 * MAX_COORDINATE, 10**30, True, None, "1"]),
)
_JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
_JSON = st.recursive(
    _JSON_SCALAR,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=20,
)

# Mostly well-formed documents with something wrong somewhere (pure garbage is refused at the
# top, and would never reach the rings): rings of sound positions, of extreme numbers (NaN,
# infinite, beyond any slide, near the float limit where rasterising would overflow), or junk.
_EXTREME = st.one_of(
    st.integers(-5, 30),
    st.sampled_from([1e300, -1.7e308, 1.7e308, 2 * MAX_COORDINATE, MAX_COORDINATE, math.nan, math.inf]),
    st.floats(),
)
_GOOD_RING = st.lists(st.tuples(st.integers(-5, 30), st.integers(-5, 30)), min_size=3, max_size=6, unique=True).map(
    lambda ring: [list(p) for p in ring]
)
_EXTREME_RING = st.lists(st.tuples(_EXTREME, _EXTREME), min_size=3, max_size=5, unique_by=repr).map(
    lambda ring: [list(p) for p in ring]
)
_BAD_RING = st.one_of(st.lists(st.lists(_NUMBER, max_size=3), max_size=6), _JSON)
_ANY_RING = st.one_of(_GOOD_RING, _EXTREME_RING, _BAD_RING)
_POLYGON_COORDINATES = st.one_of(st.lists(_ANY_RING, min_size=1, max_size=3), _JSON)


@st.composite
def _geometries(draw, depth=0):
    kind = draw(st.sampled_from(["Polygon"] * 4 + ["MultiPolygon"] * 2 + ["GeometryCollection"] * 2 + ["Point", "Nonsense", 7]))
    if kind == "GeometryCollection":
        children = st.lists(_geometries(depth + 1), max_size=3) if depth < 2 else st.just([])
        return {"type": kind, "geometries": draw(st.one_of(children, children, _JSON_SCALAR, _JSON))}
    if kind == "MultiPolygon":
        return {"type": kind, "coordinates": draw(st.one_of(st.lists(_POLYGON_COORDINATES, min_size=1, max_size=2), _JSON))}
    return {"type": kind, "coordinates": draw(_POLYGON_COORDINATES)}


_PROPERTIES = st.one_of(
    st.just({"classification": {"name": "Tissue"}}),
    st.none(),
    _JSON,
    st.fixed_dictionaries({"classification": st.one_of(_JSON, st.fixed_dictionaries({"name": _JSON_SCALAR}))}),
)
_FEATURES = st.fixed_dictionaries(
    {"type": st.sampled_from(["Feature"] * 5 + ["feature"]), "geometry": st.one_of(_geometries(), _geometries(), st.none(), _JSON)},
    optional={"properties": _PROPERTIES},
)
_DOCUMENTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("FeatureCollection"), "features": st.lists(_FEATURES, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"type": st.just("FeatureCollection"), "features": st.lists(_FEATURES, min_size=1, max_size=3)}),
    _geometries(),
    _FEATURES,
    st.lists(_FEATURES, max_size=3),
    st.fixed_dictionaries({"type": st.just("FeatureCollection"), "features": _JSON}),
    _JSON,
)


def _parse_or_mask_error(data, **kwargs):
    """The polygons of ``data``, or None after a MaskError; any other exception fails the test."""
    try:
        polygons = parse_annotations(data, **kwargs)
    except MaskError as exc:
        assert str(exc).startswith("GeoJSON") and "\n" not in str(exc)
        return None
    assert polygons
    return polygons


@settings(max_examples=250, deadline=None)
@given(data=_DOCUMENTS, classes=st.one_of(st.none(), st.lists(st.sampled_from(["Tissue", "1", "None"]), max_size=2)))
def test_arbitrary_json_parses_or_raises_mask_error(data, classes):
    polygons = _parse_or_mask_error(data, classes=classes)
    if polygons is None:
        return
    # Whatever parses has finite, bounded coordinates and rasterises to a 0/1 mask.
    for polygon in polygons:
        assert np.isfinite(polygon.edges).all() and np.abs(polygon.edges).max(initial=0) <= MAX_COORDINATE
        assert polygon.bbox[0] <= polygon.bbox[2] and polygon.bbox[1] <= polygon.bbox[3]
    for downsample in (0.5, 1.0, 4.0):
        mask = rasterise(polygons, (-5, -5), downsample, (12, 10))
        assert mask.shape == (10, 12) and set(np.unique(mask)) <= {0, 1}


@FAST
@given(
    ring=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)).map(list), min_size=3, max_size=8),
    position=st.integers(0, 7),
    axis=st.integers(0, 1),
    bad=st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -2 * MAX_COORDINATE]),
    wrapper=st.sampled_from(["geometry", "feature", "collection", "multipolygon"]),
)
def test_non_finite_or_huge_coordinates_are_refused_wherever_they_are(ring, position, axis, bad, wrapper):
    ring = [list(p) for p in ring]
    ring[position % len(ring)][axis] = bad
    geometry = {"type": "Polygon", "coordinates": [ring]}
    data = {
        "geometry": geometry,
        "feature": {"type": "Feature", "geometry": geometry, "properties": {}},
        "collection": {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": geometry}]},
        "multipolygon": {"type": "MultiPolygon", "coordinates": [[[[0, 0], [9, 0], [9, 9]]], [ring]]},
    }[wrapper]
    message = "finite numbers" if not math.isfinite(bad) else "far outside any slide"
    with pytest.raises(MaskError, match=message):
        parse_annotations(data)


def _write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


_VALID_TEXT = json.dumps({"type": "FeatureCollection", "features": [
    {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [9, 1], [9, 7], [1, 7], [1, 1]]]},
     "properties": {"classification": {"name": "Tissue"}}}]})


@settings(max_examples=100, deadline=None)
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8")),
        st.integers(0, len(_VALID_TEXT)).map(lambda n: _VALID_TEXT[:n].encode()),  # truncated exports
        st.tuples(st.integers(0, len(_VALID_TEXT) - 1), st.characters(codec="utf-8")).map(
            lambda p: (_VALID_TEXT[: p[0]] + p[1] + _VALID_TEXT[p[0] + 1 :]).encode("utf-8")  # one character changed
        ),
        _DOCUMENTS.map(lambda d: json.dumps(d).encode()),
    ),
    bom=st.booleans(),
)
def test_any_file_content_loads_or_raises_mask_error_also_in_evaluation(content, bom):
    with tempfile.TemporaryDirectory() as folder:
        path = _write(Path(folder), "reference.geojson", (b"\xef\xbb\xbf" if bom else b"") + content)
        try:
            polygons = load_annotations(path)
        except MaskError as exc:
            assert "reference.geojson" in str(exc) and "\n" not in str(exc)
            polygons = None
        # The evaluation reader refuses what the parser refuses, and annotations off the predicted
        # slide; anything else it reads as a boolean mask.
        prediction = MaskInfo("prediction.tiff", "binary", 12, 9, 1.0)
        if polygons is None:
            with pytest.raises(MaskError):
                open_reference(path, prediction)
        else:
            try:
                tissue, _ = open_reference(path, prediction)
            except MaskError as exc:
                assert "outside the predicted slide" in str(exc)
            else:
                rows = tissue.rows(0, 9)
                assert rows.shape == (9, 12) and rows.dtype == bool
    if content == _VALID_TEXT.encode():
        assert polygons is not None and len(polygons) == 1  # a byte-order mark is no reason to refuse a file


def test_unreadable_and_pathologically_nested_files_raise_mask_error(tmp_path):
    (tmp_path / "folder.geojson").mkdir()
    with pytest.raises(MaskError, match="cannot be read"):
        load_annotations(tmp_path / "folder.geojson")
    deep = _write(tmp_path, "deep.geojson", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(MaskError, match="deep.geojson is nested too deeply"):
        load_annotations(deep)
    nested: dict = {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4]]]}
    for _ in range(5000):
        nested = {"type": "GeometryCollection", "geometries": [nested]}
    with pytest.raises(MaskError, match="nested too deeply"):
        parse_annotations(nested)
    with pytest.raises(MaskError, match="'geometries' must be a list"):
        parse_annotations({"type": "GeometryCollection", "geometries": 5})
    with pytest.raises(MaskError, match="holds no polygon annotations"):
        parse_annotations({"type": "GeometryCollection", "geometries": []})
