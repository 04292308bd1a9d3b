"""Open the masks that ``gigaseg-evaluate`` compares: gigaseg prediction TIFFs, mask images, QuPath GeoJSON, synthetic truth.

Every mask is read a band of rows at a time (``TissueRows``), TIFFs tile by tile, so a
gigapixel mask never sits in memory whole.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gigaseg.errors import ConfigError, MaskError, SlideError
from gigaseg.evaluation import ArrayTissue, Evaluation, TissueRows, evaluate_masks

log = logging.getLogger(__name__)

REFERENCE_TYPES = ("auto", "mask", "geojson", "synthetic")
_TIFF = (".tif", ".tiff")
_SYNTHETIC_DESCRIPTION = "gigaseg synthetic slide tissue mask"


def probability_cut(threshold: float) -> int:
    """The smallest stored value v = round(255 p) that counts as tissue for ``p >= threshold``.

    v >= k holds exactly when 255 p >= k - 1/2, so k = floor(255 t + 1/2) keeps every p >= t;
    it is the same pixel set as p >= t for t = 0.5 (k = 128) and whenever t = (k - 1/2) / 255,
    and otherwise adds only probabilities less than 1/255 below t.
    """
    t = float(threshold)
    if not math.isfinite(t):
        raise ConfigError(f"threshold must be a number between 0 and 1, got {threshold}")
    return int(min(256, max(0, math.floor(255 * t + 0.5))))


@dataclass(frozen=True)
class MaskInfo:
    """What a mask file is and how its values become tissue."""

    path: str
    kind: str  # probability | binary | mask | geojson | synthetic
    width: int
    height: int
    downsample: float = 1.0  # level-0 pixels per mask pixel
    mpp: float | None = None  # microns per mask pixel
    threshold: float | None = None
    cut: int | None = None  # stored values >= cut are tissue (probability masks)
    slide: str | None = None
    slide_level: int | None = None
    page: int = 0
    sampled: bool = False  # read at another size, by pixel centres
    bounds_offset: tuple[int, int] | None = None  # level-0 (x, y) added to GeoJSON coordinates


class TiffTissue:
    """One page of a TIFF read band by band (tiles or strips), its values turned into tissue.

    ``cut`` set: values >= cut are tissue. Otherwise values must be 0/1 or 0/255 (checked
    as the bands are read) and nonzero is tissue.
    """

    def __init__(self, path: Path, page: int = 0, cut: int | None = None) -> None:
        import tifffile

        self.path = Path(path)
        self.cut = cut
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:  # tifffile raises many kinds for files that are not TIFFs
            raise MaskError(f"{self.path} is not a readable TIFF ({exc}); check the path or export it again") from exc
        self._page = self._tif.pages[page]
        p = self._page
        if p.samplesperpixel != 1 or p.imagedepth != 1 or p.dtype is None or p.dtype.kind not in "biu":
            self.close()
            raise MaskError(
                f"{self.path.name} page {page} has {p.samplesperpixel} channel(s) of {p.dtype}; "
                "a mask must be single-channel integer (0/1 or 0/255, or a gigaseg probability mask)"
            )
        self.shape = (int(p.imagelength), int(p.imagewidth))
        self._band_h = int(p.tilelength if p.is_tiled else min(p.rowsperstrip or self.shape[0], self.shape[0]))
        self._across = math.ceil(self.shape[1] / p.tilewidth) if p.is_tiled else 1
        self._cached: tuple[int, np.ndarray] | None = None
        self._seen: set[int] = set()

    def _band(self, b: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == b:
            return self._cached[1]
        p, fh = self._page, self._tif.filehandle
        h, w = self.shape
        rows = min(self._band_h, h - b * self._band_h)
        out = np.zeros((rows, w), dtype=p.dtype)
        step = p.tilewidth if p.is_tiled else w
        for i in range(self._across):
            index = b * self._across + i
            if not p.databytecounts[index]:
                continue  # a tile never written reads as 0
            fh.seek(p.dataoffsets[index])
            data, _, shape = p.decode(fh.read(p.databytecounts[index]), index)
            if data is None:
                continue
            tile = data.reshape(shape[1], shape[2])
            x0 = i * step
            out[:, x0 : x0 + step] = tile[:rows, : w - x0]
        self._cached = (b, out)
        return out

    def raw(self, top: int, bottom: int) -> np.ndarray:
        """Stored values of rows ``top`` to ``bottom``."""
        first, last = top // self._band_h, (bottom - 1) // self._band_h
        bands = [self._band(b) for b in range(first, last + 1)]
        stacked = bands[0] if len(bands) == 1 else np.concatenate(bands)
        offset = first * self._band_h
        return stacked[top - offset : bottom - offset]

    def rows(self, top: int, bottom: int) -> np.ndarray:
        values = self.raw(top, bottom)
        if self.cut is not None:
            return values >= self.cut
        tissue = values != 0
        other = tissue & (values != 1) & (values != 255)
        if other.any():
            self._seen.update(int(v) for v in np.unique(values[other])[:10])
        self._seen.update(v for v in (1, 255) if (values == v).any())
        if not (self._seen <= {0, 1} or self._seen <= {0, 255}):
            self._seen.add(0)
            shown = ", ".join(str(v) for v in sorted(self._seen)[:10])
            raise MaskError(f"mask {self.path.name} has values {{{shown}}}; a mask must hold only 0/1 or only 0/255")
        return tissue

    def close(self) -> None:
        self._tif.close()


class SampledTissue:
    """Another mask read at this size: pixel (r, c) takes the source pixel holding its centre.

    ``scale`` is (x, y) source pixels per pixel, e.g. the prediction's downsample for a
    level-0 reference.
    """

    def __init__(self, source: TissueRows, shape: tuple[int, int], scale: tuple[float, float]) -> None:
        self.source, self.shape = source, shape
        sh, sw = source.shape
        self._cols = np.minimum(np.floor((np.arange(shape[1]) + 0.5) * scale[0]).astype(np.int64), sw - 1)
        self._scale_y, self._height = float(scale[1]), sh

    def rows(self, top: int, bottom: int) -> np.ndarray:
        src = np.minimum(np.floor((np.arange(top, bottom) + 0.5) * self._scale_y).astype(np.int64), self._height - 1)
        band = self.source.rows(int(src[0]), int(src[-1]) + 1)
        return band[np.ix_(src - src[0], self._cols)]


def qupath_origin(prediction: MaskInfo) -> tuple[int, int]:
    """Where QuPath's (0, 0) lies on the predicted slide's level 0: the slide's ``bounds_offset``.

    The prediction covers OpenSlide's whole level 0, QuPath only the scanned area (MRXS, Leica
    SCN). A mask that records no slide is taken to share QuPath's origin; a recorded slide that
    cannot be opened is too, with a warning, which is right for every format without bounds.
    """
    if not prediction.slide:
        return (0, 0)
    from gigaseg.slides import open_slide

    try:
        with open_slide(prediction.slide) as slide:
            return slide.bounds_offset
    except SlideError as exc:
        log.warning("cannot open the predicted slide to find QuPath's origin (%s): GeoJSON is read unshifted, "
                    "which is wrong for MRXS or Leica SCN slides", exc)
        return (0, 0)


class GeoJSONTissue:
    """QuPath annotations rasterised band by band at the prediction's level (pixel-centre rule).

    ``offset`` is QuPath's origin on the slide's level 0 (``qupath_origin``); the polygons are
    moved by it as ``GeoJSONMask`` moves training annotations.
    """

    def __init__(self, path: Path, shape: tuple[int, int], downsample: float, classes: Sequence[str] | None,
                 offset: tuple[int, int] = (0, 0)) -> None:
        from gigaseg.data.geojson import bounding_boxes, check_inside, load_annotations

        self.polygons = [p.shifted(*offset) for p in load_annotations(path, classes=classes)]
        # The prediction covers its whole slide level, so annotations must lie on that slide.
        check_inside(self.polygons, shape[1] * downsample, shape[0] * downsample, "the predicted slide")
        self._bboxes = bounding_boxes(self.polygons)
        self.shape, self.downsample = shape, float(downsample)

    def rows(self, top: int, bottom: int) -> np.ndarray:
        from gigaseg.data.geojson import rasterise

        size = (self.shape[1], bottom - top)
        return rasterise(self.polygons, (0, top * self.downsample), self.downsample, size, bboxes=self._bboxes) > 0


def _description(path: Path) -> tuple[str, dict | None, list[tuple[int, int]]]:
    """A TIFF's first ImageDescription, its gigaseg metadata if any, and every page's (w, h)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            text = tif.pages[0].description or ""
            sizes = [(int(p.imagewidth), int(p.imagelength)) for p in tif.pages]
    except Exception as exc:
        raise MaskError(f"{path} is not a readable TIFF ({exc}); check the path or export it again") from exc
    try:
        meta = json.loads(text)
    except ValueError:
        return text, None, sizes
    return text, meta.get("gigaseg") if isinstance(meta, dict) and isinstance(meta.get("gigaseg"), dict) else None, sizes


def _image(path: Path) -> ArrayTissue:
    """A PNG (or other non-TIFF) mask, decoded whole, values checked as ``MaskImage`` does."""
    from gigaseg.data.masks import _load_mask_image, _mask_values

    image = _load_mask_image(path)
    values = _mask_values(image)
    if not (values <= {0, 1} or values <= {0, 255}):
        shown = ", ".join(str(v) for v in sorted(values)[:10])
        raise MaskError(f"mask image {path.name} has values {{{shown}}}; a mask must hold only 0/1 or only 0/255")
    return ArrayTissue(image)


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{what} {path} does not exist; check the path")
    return path


def open_prediction(path: str | Path, *, threshold: float | None = None) -> tuple[TissueRows, MaskInfo]:
    """A predicted mask: a gigaseg prediction TIFF (its metadata gives level, downsample, mpp) or any mask image.

    For a probability TIFF, ``threshold`` (default: the one in the TIFF, else 0.5) becomes
    the stored-value cut of ``probability_cut``. Other masks are taken as level 0 (downsample 1).
    """
    path = _existing(path, "prediction")
    if path.suffix.lower() not in _TIFF:
        tissue = _image(path)
        h, w = tissue.shape
        return tissue, MaskInfo(str(path), "mask", w, h)
    _, meta, sizes = _description(path)
    w, h = sizes[0]
    if meta is None:
        return TiffTissue(path), MaskInfo(str(path), "mask", w, h)
    kind = meta.get("kind")
    if kind not in ("probability", "binary"):
        raise MaskError(f"{path.name}: gigaseg metadata kind {kind!r} is not 'probability' or 'binary'")
    if (meta.get("width"), meta.get("height")) not in ((w, h), (None, None)):
        raise MaskError(f"{path.name}: metadata says {meta.get('width')}x{meta.get('height')} but level 0 is {w}x{h}")
    downsample = float(meta.get("downsample") or 1.0)
    mpp = float(meta["mpp"]) if meta.get("mpp") else None
    t = float(threshold if threshold is not None else meta.get("threshold", 0.5)) if kind == "probability" else None
    cut = probability_cut(t) if t is not None else 1
    info = MaskInfo(str(path), kind, w, h, downsample, mpp, t, cut, meta.get("slide"), meta.get("slide_level"))
    return TiffTissue(path, cut=cut), info


def _fit(source: TissueRows, info: MaskInfo, target: MaskInfo, label: str) -> tuple[TissueRows, MaskInfo]:
    """``source`` as-is when its size is the prediction's, else sampled when it covers the same area."""
    h, w = source.shape
    if (w, h) == (target.width, target.height):
        return source, info
    W, H = target.width, target.height
    if abs(w - W * h / H) > 1 and abs(h - H * w / W) > 1:
        raise MaskError(
            f"{label} is {w}x{h} (w x h) but the prediction is {W}x{H}; it is neither the same size nor the same "
            "area at another scale: give the reference of the predicted slide at the predicted level"
        )
    log.info("%s is %dx%d: sampled at the prediction's %dx%d pixel centres", label, w, h, W, H)
    return SampledTissue(source, (H, W), (w / W, h / H)), MaskInfo(**{**asdict(info), "sampled": True})


def open_reference(
    path: str | Path, prediction: MaskInfo, *, kind: str = "auto", classes: Sequence[str] | None = None
) -> tuple[TissueRows, MaskInfo]:
    """A reference read at the prediction's size: a mask image, QuPath GeoJSON, or synthetic truth.

    ``auto`` picks GeoJSON for .geojson/.json, synthetic for a mask TIFF that
    ``write_synthetic_slide`` wrote, a mask image otherwise. GeoJSON (QuPath's level-0
    coordinates, moved by ``qupath_origin``) is rasterised at the prediction's downsample;
    synthetic truth is read from the pyramid level of the prediction's size, or sampled from
    level 0 at the prediction's downsample.
    A mask image must be the prediction's size (a pyramid page of that size is used) or
    cover the same area at another scale (then sampled at pixel centres).
    """
    if kind not in REFERENCE_TYPES:
        raise ConfigError(f"reference_type={kind!r}: choose one of {', '.join(REFERENCE_TYPES)}")
    path = _existing(path, "reference")
    shape = (prediction.height, prediction.width)
    tiff = path.suffix.lower() in _TIFF
    if kind == "auto":
        if path.suffix.lower() in (".geojson", ".json"):
            kind = "geojson"
        elif tiff and _description(path)[0].startswith(_SYNTHETIC_DESCRIPTION):
            kind = "synthetic"
        else:
            kind = "mask"
    if kind == "geojson":
        offset = qupath_origin(prediction)
        tissue = GeoJSONTissue(path, shape, prediction.downsample, classes, offset)
        info = MaskInfo(str(path), "geojson", prediction.width, prediction.height, prediction.downsample,
                        bounds_offset=offset)
        return tissue, info
    if not tiff:
        if kind == "synthetic":
            raise MaskError(f"synthetic truth {path.name} must be the mask TIFF that write_synthetic_slide wrote")
        tissue = _image(path)
        return _fit(tissue, MaskInfo(str(path), "mask", tissue.shape[1], tissue.shape[0]), prediction, f"reference {path.name}")
    _, meta, sizes = _description(path)
    wanted = (prediction.width, prediction.height)
    page = sizes.index(wanted) if wanted in sizes else 0
    cut = None
    if meta is not None and meta.get("kind") == "probability":  # another prediction as the reference
        cut = probability_cut(float(meta.get("threshold", 0.5)))
    tissue = TiffTissue(path, page=page, cut=cut)
    w, h = sizes[page]
    if kind == "synthetic" and page == 0 and wanted != sizes[0]:
        info = MaskInfo(str(path), kind, w, h, page=0, sampled=True)
        d = prediction.downsample
        if abs(w - prediction.width * d) > d or abs(h - prediction.height * d) > d:
            tissue.close()
            raise MaskError(
                f"synthetic truth {path.name} is {w}x{h} at level 0, but the prediction is {prediction.width}x"
                f"{prediction.height} at downsample {d:g}; give the truth of the predicted slide"
            )
        return SampledTissue(tissue, shape, (d, d)), info
    return _fit(tissue, MaskInfo(str(path), kind, w, h, page=page), prediction, f"reference {path.name}")


def evaluate_files(
    prediction: str | Path,
    reference: str | Path,
    *,
    reference_type: str = "auto",
    threshold: float | None = None,
    classes: Sequence[str] | None = None,
    max_piece_pixels: int = 2**24,
    progress: bool = False,
) -> tuple[Evaluation, dict[str, Any]]:
    """Open both masks and evaluate them; returns the evaluation and a description of the inputs."""
    opened: list[TissueRows] = []
    try:
        pred, pred_info = open_prediction(prediction, threshold=threshold)
        opened.append(pred)
        ref, ref_info = open_reference(reference, pred_info, kind=reference_type, classes=classes)
        opened.append(ref)
        result = evaluate_masks(
            pred, ref, downsample=pred_info.downsample, mpp=pred_info.mpp,
            max_piece_pixels=max_piece_pixels, progress=progress,
        )
    finally:
        for tissue in opened:
            _close(tissue)
    return result, {"prediction": asdict(pred_info), "reference": asdict(ref_info)}


def _close(tissue: TissueRows) -> None:
    """Close the file behind a mask reader, if it has one."""
    while tissue is not None:
        close = getattr(tissue, "close", None)
        if close is not None:
            close()
            return
        tissue = getattr(tissue, "source", None)
