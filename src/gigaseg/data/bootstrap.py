"""A first tissue mask for unlabelled slides: Otsu on HSV saturation, then morphological clean-up.

The threshold is computed once from a low-resolution view of the region, so every tile
uses the same one. Opening and closing run tile by tile with a halo wide enough that the
result does not depend on the tiling; removing small objects and filling small holes,
which are not local, label components per tile and join them across tile borders.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from gigaseg.data.masks import BaseMaskSource
from gigaseg.data.regions import FittedRegion
from gigaseg.data.tilefile import TileFile, create_raw, tiles
from gigaseg.errors import MaskError
from gigaseg.slides.base import SlideReader

log = logging.getLogger(__name__)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB uint8 image as uint8 0..255 (integer arithmetic, so exact)."""
    rgb = np.asarray(rgb)
    mx = rgb.max(axis=-1).astype(np.int32)
    mn = rgb.min(axis=-1).astype(np.int32)
    out = ((mx - mn) * 255 + mx // 2) // np.maximum(mx, 1)
    return out.astype(np.uint8)


def otsu_threshold(histogram: np.ndarray) -> int:
    """Otsu's threshold t on a 256-bin histogram: values > t are the upper class."""
    hist = np.asarray(histogram, dtype=np.float64)
    levels = np.arange(len(hist), dtype=np.float64)
    w0 = np.cumsum(hist)
    total = w0[-1]
    if total == 0:
        return 0
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0 * total) ** 2 / (w0 * w1)
    between = np.nan_to_num(between[:-1], nan=-1.0, posinf=-1.0)
    if between.max() <= 0:  # a single value: nothing to separate
        return int(np.flatnonzero(hist)[-1])
    return int(np.argmax(between))


#: Up to this radius a disc structuring element is faster than a distance transform.
_DISC_MAX_RADIUS = 12


def _disc(radius: float) -> np.ndarray:
    k = int(math.floor(radius))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    return xx * xx + yy * yy <= radius * radius


def _erode(b: np.ndarray, radius: float) -> np.ndarray:
    # Disc erosion; pixels outside the array are ignored (neither tissue nor background),
    # hence border_value=1. Large discs use the Euclidean distance to the nearest background
    # pixel instead, which costs the same whatever the radius.
    if radius < 1 or b.all() or not b.any():
        return b.copy()
    if radius <= _DISC_MAX_RADIUS:
        return ndimage.binary_erosion(b, _disc(radius), border_value=1)
    return ndimage.distance_transform_edt(b) > radius


def _dilate(b: np.ndarray, radius: float) -> np.ndarray:
    if radius < 1 or not b.any() or b.all():
        return b.copy()
    if radius <= _DISC_MAX_RADIUS:
        return ndimage.binary_dilation(b, _disc(radius), border_value=0)
    return ndimage.distance_transform_edt(~b) <= radius


def open_close(b: np.ndarray, opening_radius: float, closing_radius: float) -> np.ndarray:
    """Opening then closing with discs of the given radii (pixels)."""
    b = _dilate(_erode(b, opening_radius), opening_radius)
    return _erode(_dilate(b, closing_radius), closing_radius)


def filter_components(store: TileFile, min_area: float, *, holes: bool, tile_size: int) -> None:
    """Remove small components from the 0/1 array in ``store``, in place and tile by tile.

    With ``holes=False``, 4-connected tissue components of fewer than ``min_area`` pixels
    become background; with ``holes=True``, background components of fewer than
    ``min_area`` pixels that do not touch the array's border become tissue. Components are
    labelled per tile and joined across tile borders, so the result does not depend on
    ``tile_size``.
    """
    if min_area <= 1:
        return
    height, width = store.shape[:2]
    grid = list(tiles(height, width, tile_size))

    def labelled(row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, int]:
        tile = store.read(row, col, h, w)
        lab, n = ndimage.label(tile == 0 if holes else tile != 0)
        return tile, lab, n

    offset = 0
    areas, pairs, border = [], [], []
    above = np.zeros(width, dtype=np.int64)  # global labels of the row just above the current tile row
    below = np.zeros(width, dtype=np.int64)
    left = None
    for row, col, h, w in grid:
        if col == 0:
            above, below, left = below, np.zeros(width, dtype=np.int64), None
        _, lab, n = labelled(row, col, h, w)
        g = lab.astype(np.int64)
        g[lab > 0] += offset
        areas.append(np.bincount(lab.reshape(-1), minlength=n + 1)[1:])
        for a, b in ((left, g[:, 0]), (above[col : col + w] if row else None, g[0])):
            if a is not None:
                touching = (a > 0) & (b > 0)
                pairs.append(np.stack([a[touching], b[touching]]))
        if holes:
            edges = [g[0]] if row == 0 else []
            edges += [g[-1]] if row + h == height else []
            edges += [g[:, 0]] if col == 0 else []
            edges += [g[:, -1]] if col + w == width else []
            border.extend(e[e > 0] for e in edges)
        left = g[:, -1].copy()
        below[col : col + w] = g[-1]
        offset += n
    if offset == 0:
        return
    links = np.concatenate(pairs, axis=1) - 1 if pairs else np.zeros((2, 0), dtype=np.int64)
    graph = sparse.coo_matrix((np.ones(links.shape[1], dtype=np.int8), (links[0], links[1])), shape=(offset, offset))
    _, component = connected_components(graph, directed=False)
    area = np.bincount(component, weights=np.concatenate(areas).astype(np.float64))
    change = area < min_area
    if holes and border:
        change[np.unique(component[np.concatenate(border) - 1])] = False
    lut = np.zeros(offset + 1, dtype=bool)
    lut[1:] = change[component]
    if not lut.any():
        return
    offset = 0
    for row, col, h, w in grid:
        tile, lab, n = labelled(row, col, h, w)
        hit = lut[np.where(lab > 0, lab + offset, 0)]
        if hit.any():
            tile[hit] = 1 if holes else 0
            store.write(row, col, tile)
        offset += n


class BootstrapMask(BaseMaskSource):
    """Tissue = HSV saturation above Otsu's threshold, cleaned by opening, closing and area filters.

    Sizes are in microns (radii) and square microns (areas) when the slide records its
    resolution, else in pixels at the region's level. ``min_saturation`` (0..1) is a floor
    for the threshold so that a region of plain background is not split in two by noise.
    ``tile_size`` changes speed and memory only, never the mask.
    """

    kind = "bootstrap"

    def __init__(
        self,
        *,
        opening_radius: float = 2.0,
        closing_radius: float = 4.0,
        min_object_area: float = 2500.0,
        min_hole_area: float = 2500.0,
        min_saturation: float = 0.08,
        view_size: int = 1024,
        tile_size: int = 1024,
        progress: bool = False,
    ) -> None:
        for name, value in (("opening_radius", opening_radius), ("closing_radius", closing_radius),
                            ("min_object_area", min_object_area), ("min_hole_area", min_hole_area)):
            if not (value >= 0 and math.isfinite(value)):
                raise MaskError(f"bootstrap {name} must be a non-negative number, got {value!r}")
        if not 0 <= min_saturation < 1:
            raise MaskError(f"bootstrap min_saturation must be in [0, 1), got {min_saturation!r}")
        if view_size < 16 or tile_size < 16:
            raise MaskError("bootstrap view_size and tile_size must be at least 16 pixels")
        self.opening_radius = float(opening_radius)
        self.closing_radius = float(closing_radius)
        self.min_object_area = float(min_object_area)
        self.min_hole_area = float(min_hole_area)
        self.min_saturation = float(min_saturation)
        self.view_size = int(view_size)
        self.tile_size = int(tile_size)
        self.progress = bool(progress)
        self._store: TileFile | None = None
        self._region: FittedRegion | None = None
        self._facts: dict = {}

    def _threshold(self, reader: SlideReader, region: FittedRegion) -> int:
        """Otsu threshold of the saturation of a strided low-resolution view of the region."""
        rw, rh = region.read_size
        target = region.downsample * max(1.0, max(rw, rh) / self.view_size)
        level = reader.level_for_downsample(target)
        ds = float(reader.level_downsamples[level])
        lw, lh = reader.level_dimensions[level]
        vw = max(1, min(int(rw * region.downsample / ds), int(lw - region.x / ds)))
        vh = max(1, min(int(rh * region.downsample / ds), int(lh - region.y / ds)))
        stride = max(1, math.ceil(max(vw, vh) / self.view_size))
        step = stride * max(1, 2048 // stride)  # read chunks aligned to the sampling stride
        hist = np.zeros(256, dtype=np.int64)
        for row, col, h, w in tiles(vh, vw, step):
            loc = (region.x + int(round(col * ds)), region.y + int(round(row * ds)))
            pixels = reader.read_region(loc, level, (w, h))[::stride, ::stride]
            hist += np.bincount(saturation(pixels).reshape(-1), minlength=256)
        otsu = otsu_threshold(hist)
        floor = int(round(self.min_saturation * 255))
        self._facts["threshold_view"] = {"level": level, "stride": stride, "width": vw, "height": vh}
        self._facts["otsu_threshold"] = otsu
        return max(otsu, floor)

    def attach(self, reader: SlideReader, region: FittedRegion, workdir: Path) -> None:
        threshold = self._threshold(reader, region)
        mpp = region.mpp
        if mpp is None:
            log.warning("%s records no microns per pixel: bootstrap sizes are taken as pixels", reader.name)
        scale = 1.0 if mpp is None else 1.0 / mpp
        r_open, r_close = self.opening_radius * scale, self.closing_radius * scale
        a_object, a_hole = self.min_object_area * scale**2, self.min_hole_area * scale**2
        # Opening then closing reads input up to 2 r_open + 2 r_close away from each output pixel.
        halo = int(math.ceil(2 * r_open + 2 * r_close)) + 1
        width, height = region.read_size
        store = create_raw(Path(workdir) / "bootstrap-mask.u8", (height, width))
        try:
            grid = list(tiles(height, width, self.tile_size))
            for row, col, h, w in tqdm(grid, desc="bootstrap mask", unit="tile", disable=not self.progress):
                r0, c0 = max(0, row - halo), max(0, col - halo)
                r1, c1 = min(height, row + h + halo), min(width, col + w + halo)
                pixels = reader.read_region(region.level0(c0, r0), region.level, (c1 - c0, r1 - r0))
                tissue = open_close(saturation(pixels) > threshold, r_open, r_close)
                store.write(row, col, tissue[row - r0 : row - r0 + h, col - c0 : col - c0 + w].astype(np.uint8))
            filter_components(store, a_object, holes=False, tile_size=self.tile_size)
            filter_components(store, a_hole, holes=True, tile_size=self.tile_size)
        except BaseException:
            store.close()
            raise
        self._store, self._region = store, region
        self._facts.update(
            threshold=threshold,
            units="um" if mpp is not None else "px",
            pixels={"opening_radius": r_open, "closing_radius": r_close,
                    "min_object_area": a_object, "min_hole_area": a_hole, "halo": halo},
        )

    def read(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        if self._store is None or self._region is None:
            raise MaskError("BootstrapMask.read called before attach(); prepare_region attaches it")
        region = self._region
        if level != region.level:
            raise MaskError(f"bootstrap mask was computed for level {region.level}, not level {level}")
        col = int(round((int(location[0]) - region.x) / region.downsample))
        row = int(round((int(location[1]) - region.y) / region.downsample))
        w, h = (int(v) for v in size)
        return self._store.read(row, col, h, w)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "method": "otsu on HSV saturation, opening, closing, small objects removed, small holes filled",
            "opening_radius": self.opening_radius,
            "closing_radius": self.closing_radius,
            "min_object_area": self.min_object_area,
            "min_hole_area": self.min_hole_area,
            "min_saturation": self.min_saturation,
            "view_size": self.view_size,
            **self._facts,
        }

    def close(self) -> None:
        if self._store is not None:
            path = self._store.path
            self._store.close()
            path.unlink(missing_ok=True)
            self._store = None
