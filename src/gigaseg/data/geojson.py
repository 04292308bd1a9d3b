"""QuPath GeoJSON annotations as a mask: parse polygons and rasterise them tile by tile.

Pixel (r, c) of a region at a level with downsample d and level-0 origin (x0, y0) is
inside a polygon when the level-0 point (x0 + (c + 0.5) d, y0 + (r + 0.5) d) is (even-odd
rule, so holes are holes). Points exactly on an edge follow the usual top-left rule: left
and top edges are inside, right and bottom are not. A mask is the union of the tissue
polygons, with background and then ignore polygons painted over it (``LabelClasses``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from gigaseg.data.labels import BACKGROUND, ROLE_VALUES, ROLES, LabelClasses
from gigaseg.data.manifest import file_sha256
from gigaseg.data.masks import BaseMaskSource
from gigaseg.data.regions import FittedRegion
from gigaseg.errors import ConfigError, MaskError
from gigaseg.slides.base import SlideReader

log = logging.getLogger(__name__)

#: Larger coordinates are no slide's level-0 pixels, and would overflow the rasteriser's
#: float arithmetic (edge crossings multiply two coordinate differences).
MAX_COORDINATE = 1e12


@dataclass(frozen=True)
class Polygon:
    """One polygon with its holes, as edges in level-0 pixels (horizontal edges dropped)."""

    edges: np.ndarray  # (E, 4): xa, ya, xb, yb
    bbox: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax
    label: str  # where it came from, for error messages
    classification: str | None

    def shifted(self, dx: float, dy: float) -> "Polygon":
        """The polygon moved by (dx, dy) level-0 pixels."""
        if not (dx or dy):
            return self
        xmin, ymin, xmax, ymax = self.bbox
        edges = self.edges + np.array([dx, dy, dx, dy], dtype=np.float64)
        return Polygon(edges, (xmin + dx, ymin + dy, xmax + dx, ymax + dy), self.label, self.classification)


def _ring(raw: Any, where: str) -> np.ndarray:
    if not isinstance(raw, list):
        raise MaskError(f"{where}: a ring must be a list of [x, y] positions, got {type(raw).__name__}")
    try:
        ring = np.array(raw)
    except ValueError as exc:  # ragged positions
        raise MaskError(f"{where}: ring positions must each be [x, y] numbers ({exc})") from exc
    # JSON true/false would otherwise pass as 1/0.
    has_bool = ring.dtype == object or (ring.ndim == 2 and any(isinstance(v, bool) for p in raw for v in p))
    if ring.ndim != 2 or (ring.size and ring.shape[1] < 2) or (ring.size and ring.dtype.kind not in "iuf") or has_bool:
        sample = raw[:2] if raw else raw
        raise MaskError(f"{where}: ring positions must be [x, y] numbers, got {repr(sample)[:80]}")
    if ring.size == 0:
        raise MaskError(f"{where}: a ring has no points; a polygon ring needs at least 3 distinct points")
    ring = ring[:, :2].astype(np.float64)
    if not np.isfinite(ring).all():
        raise MaskError(f"{where}: ring coordinates must be finite numbers (found NaN or infinity)")
    if np.abs(ring).max() > MAX_COORDINATE:
        raise MaskError(
            f"{where}: coordinate {np.abs(ring).max():g} is beyond +-{MAX_COORDINATE:g}, far outside any slide; "
            "annotations must be in level-0 pixels: export them again from QuPath"
        )
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    # At least three distinct points: one differing from the first, and one from both.
    off_first = (ring != ring[0]).any(axis=1)
    second = ring[int(off_first.argmax())]
    if not (off_first & (ring != second).any(axis=1)).any():
        distinct = len(np.unique(ring, axis=0))
        raise MaskError(f"{where}: a ring has {distinct} distinct point(s); a polygon ring needs at least 3")
    return ring


def _polygon(rings_raw: Any, where: str, classification: str | None) -> Polygon:
    if not isinstance(rings_raw, list) or not rings_raw:
        raise MaskError(f"{where}: Polygon coordinates must be a non-empty list of rings")
    rings = [_ring(raw, f"{where}, ring {i}") for i, raw in enumerate(rings_raw)]
    points = np.concatenate(rings) if len(rings) > 1 else rings[0]
    # Each ring's edges join point k to point k + 1, the last one back to the first.
    nxt = np.concatenate([np.concatenate([r[1:], r[:1]]) for r in rings]) if len(rings) > 1 else \
        np.concatenate([points[1:], points[:1]])
    edges = np.concatenate([points, nxt], axis=1)
    edges = edges[edges[:, 1] != edges[:, 3]]  # horizontal edges never cross a scanline
    lo, hi = points.min(axis=0), points.max(axis=0)
    return Polygon(edges, (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])), where, classification)


def _geometry(geom: Any, where: str, classification: str | None) -> Iterable[Polygon]:
    if not isinstance(geom, dict) or "type" not in geom:
        raise MaskError(f"{where}: expected a GeoJSON geometry object with a 'type', got {repr(geom)[:80]}")
    kind = geom["type"]
    if kind == "Polygon":
        yield _polygon(geom.get("coordinates"), where, classification)
    elif kind == "MultiPolygon":
        parts = geom.get("coordinates")
        if not isinstance(parts, list) or not parts:
            raise MaskError(f"{where}: MultiPolygon coordinates must be a non-empty list of polygons")
        for j, part in enumerate(parts):
            yield _polygon(part, f"{where}, polygon {j}", classification)
    elif kind == "GeometryCollection":
        geometries = geom.get("geometries")
        if geometries is None:
            geometries = []
        if not isinstance(geometries, list):
            raise MaskError(f"{where}: GeometryCollection 'geometries' must be a list of geometries, got {repr(geometries)[:80]}")
        for j, sub in enumerate(geometries):
            yield from _geometry(sub, f"{where}, geometry {j}", classification)
    else:
        raise MaskError(
            f"{where}: geometry type {kind!r} cannot be a tissue mask; only Polygon and MultiPolygon "
            "annotations are used (filter by classification or remove points and lines)"
        )


def _classification(feature: dict) -> str | None:
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        return None
    cls = props.get("classification")
    if isinstance(cls, dict):
        name = cls.get("name")
        return str(name) if name is not None else None
    if isinstance(cls, str):
        return cls
    return None


def _collect(features: list, keep: Callable[[str | None], bool], source: str, found_classes: set,
             polygons: list) -> None:
    """Append the polygons of the features ``keep`` accepts to ``polygons``, and every class seen to ``found_classes``."""
    for i, feature in enumerate(features):
        where = f"{source}: feature {i}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise MaskError(f"{where} is not a GeoJSON Feature object")
        name = _classification(feature)
        found_classes.add(name)
        if not keep(name):
            continue
        if feature.get("geometry") is None:
            raise MaskError(f"{where} has no geometry")
        polygons.extend(_geometry(feature["geometry"], f"{where} ({name or 'unclassified'})", name))


def _features(data: Any, source: str) -> list:
    """The features of a QuPath GeoJSON export (FeatureCollection, list of Features, Feature or geometry)."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise MaskError(f"{source}: FeatureCollection has no 'features' list")
    elif isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "type" in data and "coordinates" in data or (
        isinstance(data, dict) and data.get("type") == "GeometryCollection"
    ):
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise MaskError(
            f"{source}: not a GeoJSON FeatureCollection, Feature list, Feature or geometry; "
            "export the annotations from QuPath as GeoJSON"
        )
    if not features:
        raise MaskError(f"{source}: the file holds no annotations; annotate the slide or pick another file")
    return features


def _parse(data: Any, keep: Callable[[str | None], bool], source: str) -> tuple[list[Polygon], set[str | None]]:
    """The polygons of the kept features, and the classes of every feature in ``data``."""
    features = _features(data, source)
    found_classes: set[str | None] = set()
    polygons: list[Polygon] = []
    try:
        _collect(features, keep, source, found_classes, polygons)
    except RecursionError:
        raise MaskError(f"{source}: geometry collections nested too deeply; flatten the annotations") from None
    return polygons, found_classes


def _shown_classes(found_classes: set[str | None]) -> str:
    shown = ", ".join(sorted(repr(c) for c in found_classes if c is not None)) or "none"
    if None in found_classes:
        shown += " (and unclassified annotations)"
    return shown


def parse_annotations(data: Any, *, classes: Sequence[str] | None = None, source: str = "GeoJSON") -> list[Polygon]:
    """Polygons of a QuPath GeoJSON export (FeatureCollection, list of Features, Feature or geometry).

    With ``classes``, only features whose ``properties.classification.name`` is one of them
    are kept. Raises MaskError for anything malformed or when nothing is left.
    """
    wanted = None if classes is None else {str(c) for c in classes}
    polygons, found_classes = _parse(data, lambda name: wanted is None or name in wanted, source)
    if not polygons and wanted is None:
        raise MaskError(f"{source}: the file holds no polygon annotations (only empty geometry collections)")
    if not polygons:
        shown = ", ".join(sorted(repr(c) for c in found_classes if c is not None)) or "none"
        raise MaskError(
            f"{source}: no annotations of class {', '.join(sorted(wanted))}; classes in the file: {shown}"
        )
    return polygons


@dataclass(frozen=True, eq=False)
class LabelledPolygons:
    """The polygons of each label of a mask, with their bounding boxes to skip them quickly per tile."""

    tissue: tuple[Polygon, ...]
    background: tuple[Polygon, ...] = ()
    ignore: tuple[Polygon, ...] = ()
    _bboxes: dict[str, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_bboxes", {role: bounding_boxes(getattr(self, role)) for role in ROLES})

    @property
    def all(self) -> tuple[Polygon, ...]:
        return self.tissue + self.background + self.ignore

    def bboxes(self, role: str) -> np.ndarray:
        return self._bboxes[role]

    def shifted(self, dx: float, dy: float) -> "LabelledPolygons":
        """Every polygon moved by (dx, dy) level-0 pixels."""
        return LabelledPolygons(**{role: tuple(p.shifted(dx, dy) for p in getattr(self, role)) for role in ROLES})


def parse_labelled(data: Any, labels: LabelClasses, *, source: str = "GeoJSON") -> LabelledPolygons:
    """The tissue, background and ignore polygons of a QuPath GeoJSON export, sorted by ``labels``.

    A class named in ``labels`` that no annotation has is refused (MaskError naming the
    class and the classes the file has), as is a file with no polygon of any label.
    """
    polygons, found_classes = _parse(data, lambda name: labels.role(name) is not None, source)
    missing = [(name, role) for name, role in labels.named().items() if name not in found_classes]
    if missing:
        named = ", ".join(f"{name!r} (named as {role})" for name, role in missing)
        raise MaskError(
            f"{source}: no annotation of class {named}; classes in the file: {_shown_classes(found_classes)}; "
            "check the spelling (QuPath class names are case-sensitive)"
        )
    if not polygons:
        raise MaskError(
            f"{source}: the file holds no polygon annotation of the classes used; classes in the file: "
            f"{_shown_classes(found_classes)}"
        )
    by_role: dict[str, list[Polygon]] = {role: [] for role in ROLES}
    for polygon in polygons:
        by_role[labels.role(polygon.classification)].append(polygon)
    if not by_role["tissue"]:
        log.warning("%s: no annotation is tissue (tissue classes: %s); the mask has no tissue", source,
                    "every class not named" if labels.tissue is None else ", ".join(labels.tissue))
    return LabelledPolygons(**{role: tuple(found) for role, found in by_role.items()})


def _read_json(path: Path) -> Any:
    try:
        # utf-8-sig also reads files that an editor saved with a byte-order mark.
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise MaskError(f"annotation file {path} does not exist; check the path") from exc
    except OSError as exc:
        raise MaskError(f"annotation file {path} cannot be read ({exc.strerror or exc}); check the path") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise MaskError(f"annotation file {path.name} is not valid JSON ({exc}); export it again from QuPath") from exc
    except RecursionError:
        raise MaskError(f"annotation file {path.name} is nested too deeply to be GeoJSON; export it again from QuPath") from None


def load_annotations(path: str | Path, *, classes: Sequence[str] | None = None) -> list[Polygon]:
    """Read and parse a GeoJSON file (see ``parse_annotations``)."""
    path = Path(path)
    return parse_annotations(_read_json(path), classes=classes, source=f"annotation file {path.name}")


def load_labelled(path: str | Path, labels: LabelClasses) -> LabelledPolygons:
    """Read a GeoJSON file and sort its polygons by label (see ``parse_labelled``)."""
    path = Path(path)
    return parse_labelled(_read_json(path), labels, source=f"annotation file {path.name}")


def _rasterise_one(poly: Polygon, out: np.ndarray, x0: float, y0: float, d: float) -> None:
    """OR the even-odd interior of ``poly`` into ``out`` (h x w), pixel centres at x0 + (c + .5) d."""
    h, w = out.shape
    xmin, ymin, xmax, ymax = poly.bbox
    # Only rows and columns whose pixel centres can lie inside the bounding box.
    r_lo = max(0, int(np.ceil((ymin - y0) / d - 0.5)))
    r_hi = min(h, int(np.ceil((ymax - y0) / d - 0.5)))
    c_lo = max(0, int(np.ceil((xmin - x0) / d - 0.5)))
    c_hi = min(w, int(np.ceil((xmax - x0) / d - 0.5)))
    if r_lo >= r_hi or c_lo >= c_hi:
        return
    e = poly.edges
    # Edges wholly right of the window never change parity inside it.
    e = e[np.minimum(e[:, 0], e[:, 2]) < x0 + (c_hi - 0.5) * d]
    if not len(e):
        return
    ymn = np.minimum(e[:, 1], e[:, 3])
    ymx = np.maximum(e[:, 1], e[:, 3])
    # Rows whose centre Y satisfies ymn <= Y < ymx (half-open, so vertices count once).
    start = np.clip(np.ceil((ymn - y0) / d - 0.5), r_lo, r_hi).astype(np.int64)
    stop = np.clip(np.ceil((ymx - y0) / d - 0.5), r_lo, r_hi).astype(np.int64)
    n = stop - start
    keep = n > 0
    e, start, n = e[keep], start[keep], n[keep]
    total = int(n.sum())
    if total == 0:
        return
    first = np.repeat(np.cumsum(n) - n, n)
    rows = np.repeat(start, n) + (np.arange(total, dtype=np.int64) - first)
    ys = y0 + (rows + 0.5) * d
    xa, ya, xb, yb = (np.repeat(e[:, k], n) for k in range(4))
    xs = xa + (ys - ya) * (xb - xa) / (yb - ya)
    # Column of the first pixel centre at or right of each crossing: parity toggles there.
    cols = np.clip(np.ceil((xs - x0) / d - 0.5), c_lo, c_hi).astype(np.int64) - c_lo
    cw = c_hi - c_lo
    counts = np.bincount((rows - r_lo) * (cw + 1) + cols, minlength=(r_hi - r_lo) * (cw + 1))
    toggles = (counts & 1).astype(np.uint8).reshape(r_hi - r_lo, cw + 1)[:, :cw]
    inside = np.bitwise_xor.accumulate(toggles, axis=1)
    out[r_lo:r_hi, c_lo:c_hi] |= inside


def bounding_boxes(polygons: Sequence[Polygon]) -> np.ndarray:
    """(P, 4) array of the polygons' (xmin, ymin, xmax, ymax), to skip them quickly per tile."""
    return np.array([p.bbox for p in polygons], dtype=np.float64).reshape(-1, 4)


def rasterise(polygons: Sequence[Polygon], location: Sequence[int], downsample: float,
              size: Sequence[int], *, bboxes: np.ndarray | None = None) -> np.ndarray:
    """The h x w uint8 0/1 mask of ``polygons`` for a tile at level-0 ``location`` and ``size`` (w, h).

    Pass ``bboxes`` (from ``bounding_boxes``) when rasterising many tiles of many polygons.
    """
    w, h = (int(v) for v in size)
    x0, y0 = (float(v) for v in location)
    d = float(downsample)
    out = np.zeros((h, w), dtype=np.uint8)
    if bboxes is None:
        bboxes = bounding_boxes(polygons)
    hit = (bboxes[:, 2] > x0) & (bboxes[:, 3] > y0) & (bboxes[:, 0] < x0 + w * d) & (bboxes[:, 1] < y0 + h * d)
    for i in np.flatnonzero(hit):
        _rasterise_one(polygons[i], out, x0, y0, d)
    return out


def rasterise_labels(layers: LabelledPolygons, location: Sequence[int], downsample: float, size: Sequence[int],
                     *, unannotated: int = BACKGROUND) -> np.ndarray:
    """The h x w uint8 label mask (0 background, 1 tissue, 255 ignore) of a tile, like ``rasterise``.

    Pixels outside every polygon are ``unannotated``; the union of the tissue polygons is 1,
    then background and ignore polygons are painted over it, so ignore > background > tissue.
    """
    w, h = (int(v) for v in size)
    out = np.full((h, w), unannotated, dtype=np.uint8)
    for role in ROLES:
        polygons = getattr(layers, role)
        if polygons:
            inside = rasterise(polygons, location, downsample, size, bboxes=layers.bboxes(role))
            np.copyto(out, np.uint8(ROLE_VALUES[role]), where=inside.view(bool))
    return out


#: How far a polygon may overhang the slide, as a share of its width or height: outlines drawn
#: up to the edge can overshoot it a little (they are clipped); further out, the coordinates
#: are in another space.
OVERHANG = 0.05


def check_inside(polygons: Sequence[Polygon], width: float, height: float, name: str) -> None:
    """Refuse polygons entirely outside a ``width`` x ``height`` level-0 extent, or overhanging it by more than ``OVERHANG``."""
    for poly in polygons:
        xmin, ymin, xmax, ymax = poly.bbox
        if xmax <= 0 or ymax <= 0 or xmin >= width or ymin >= height:
            where = "entirely outside"
        elif (xmin < -OVERHANG * width or ymin < -OVERHANG * height
              or xmax > (1 + OVERHANG) * width or ymax > (1 + OVERHANG) * height):
            where = "far outside"
        else:
            continue
        raise MaskError(
            f"{poly.label} spans x {xmin:g}..{xmax:g}, y {ymin:g}..{ymax:g}, {where} {name} "
            f"({width:g}x{height:g} level-0 px); the coordinates are probably in another space "
            "(microns, a downsampled level, or another slide): export them in level-0 pixels"
        )


class GeoJSONMask(BaseMaskSource):
    """Label mask rasterised from a QuPath GeoJSON export (coordinates in level-0 pixels).

    QuPath's coordinates start at the slide's scanned area (``SlideReader.bounds_offset``, e.g.
    for MRXS); ``attach`` moves the polygons onto the slide's own level-0 pixels.

    ``labels`` says which classes are tissue, background or ignore (default: every
    annotation is tissue, the rest background). ``classes`` is the older way to name the
    tissue classes alone: ``classes=["Tissue"]`` is ``labels=LabelClasses(tissue=("Tissue",))``.
    """

    kind = "geojson"

    def __init__(self, path: str | Path, *, labels: LabelClasses | None = None,
                 classes: Sequence[str] | None = None) -> None:
        if labels is not None and classes is not None:
            raise ConfigError("give the tissue classes in labels (LabelClasses.tissue) or as classes, not both")
        if labels is None:
            # Class names may come from a config as numbers; a bare string is refused by validate().
            tissue = classes if classes is None or isinstance(classes, str) else tuple(str(c) for c in classes)
            labels = LabelClasses(tissue=tissue)
        labels.validate()
        self.path = Path(path)
        self.labels = labels
        self.annotated = load_labelled(self.path, labels)  # in QuPath's coordinates
        self.layers = self.annotated
        self.polygons = list(self.layers.all)
        self.produces_ignore = labels.unannotated == "ignore" or bool(self.layers.ignore)
        self._downsamples: tuple[float, ...] | None = None
        self._sha256: str | None = None

    def attach(self, reader: SlideReader, region: FittedRegion, workdir: Path) -> None:
        self.layers = self.annotated.shifted(*reader.bounds_offset)
        self.polygons = list(self.layers.all)
        self.check_bounds(reader)
        self._downsamples = tuple(float(d) for d in reader.level_downsamples)

    def check_bounds(self, reader: SlideReader) -> None:
        """Refuse polygons outside the slide (see ``check_inside``): their coordinates are likely not level-0 px."""
        width, height = reader.dimensions
        check_inside(self.polygons, width, height, reader.name)

    def read(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        if self._downsamples is None:
            raise MaskError("GeoJSONMask.read called before attach(); prepare_region attaches it")
        return rasterise_labels(self.layers, location, self._downsamples[level], size,
                                unannotated=self.labels.unannotated_value)

    def describe(self) -> dict:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        found = sorted({p.classification or "" for p in self.polygons})
        return {
            "kind": self.kind,
            "path": str(self.path),
            "file": self.path.name,
            "sha256": self._sha256,
            "labels": self.labels.describe(),
            "classes_used": found,
            "polygons": {role: len(getattr(self.layers, role)) for role in ROLES},
        }
