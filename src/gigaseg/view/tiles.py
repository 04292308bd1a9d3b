"""Encoded Deep Zoom tiles of a cohort's slides and masks, with a bounded cache of the encoded bytes.

Each prediction has up to four layers: ``slide`` (JPEG, from the slide reader's Deep Zoom),
``mask`` (PNG: the probability colour map, or the binary mask in green), ``mask_binary`` (a
probability mask cut at its threshold) and ``reference`` (the evaluation's reference mask in
blue). Slides and masks are opened when first asked for; a few stay open.
"""

from __future__ import annotations

import io
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from gigaseg.data.maskfile import TileCache
from gigaseg.errors import GigasegError, MaskError
from gigaseg.slides.deepzoom import OVERLAP, TILE_SIZE, DeepZoomGrid
from gigaseg.view.masks import DECODED_CACHE_BYTES, REFERENCE_RGB, TISSUE_RGB, MaskDeepZoom, MaskStyle, TiffPyramid
from gigaseg.view.predictions import Prediction

log = logging.getLogger(__name__)

#: Encoded tiles kept, all layers of all slides together.
CACHE_BYTES = 128 * 2**20
#: Slides and masks kept open at once (each OpenSlide handle keeps its own decoded-tile cache).
OPEN_SOURCES = 16
JPEG_QUALITY = 85
LAYERS = ("slide", "mask", "mask_binary", "reference")
FORMATS = {"slide": "jpeg", "mask": "png", "mask_binary": "png", "reference": "png"}


class NoSuchTile(GigasegError):
    """A layer or tile that this prediction does not have (a 404, not an error of the server)."""


def encode(pixels: np.ndarray, image_format: str) -> bytes:
    """A tile as JPEG (RGB) or PNG (RGBA) bytes."""
    out = io.BytesIO()
    image = Image.fromarray(pixels)
    if image_format == "jpeg":
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(out, format="PNG", compress_level=1)  # fast: tiles are mostly one colour
    return out.getvalue()


@dataclass(frozen=True)
class Layer:
    """A layer's Deep Zoom image and where it lies on the slide's level 0."""

    name: str
    grid: DeepZoomGrid
    image_format: str
    #: Level-0 pixels per pixel of the layer's full-size image.
    downsample: float

    def describe(self, prediction_id: int) -> dict[str, Any]:
        return {"dzi": f"/dz/{prediction_id}/{self.name}.dzi", "width": self.grid.width, "height": self.grid.height,
                "downsample": self.downsample, "format": self.image_format}


class _OpenSources:
    """Opened slides' and masks' Deep Zoom sources, the least recently used closed beyond a count."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[tuple, threading.Lock] = {}

    def get(self, key: tuple, opener) -> Any:
        with self._lock:
            source = self._open.get(key)
            if source is not None:
                self._open.move_to_end(key)
                return source
            lock = self._opening.setdefault(key, threading.Lock())
        with lock:  # one thread opens it, others wait for it
            with self._lock:
                source = self._open.get(key)
            if source is None:
                source = opener()
                with self._lock:
                    self._open[key] = source
                    while len(self._open) > self.limit:
                        # Not closed here: a thread may still be reading it; it closes once unreferenced.
                        self._open.popitem(last=False)
            return source

    def clear(self) -> list[Any]:
        with self._lock:
            sources = list(self._open.values())
            self._open.clear()
        return sources


class TileService:
    """The Deep Zoom layers of a cohort's predictions, their tiles encoded and cached."""

    def __init__(self, predictions: list[Prediction], *, cache_bytes: int = CACHE_BYTES,
                 tile_size: int = TILE_SIZE, overlap: int = OVERLAP, open_sources: int = OPEN_SOURCES) -> None:
        self.predictions = {p.id: p for p in predictions}
        # Encoded tiles, sized by their bytes; a tile larger than the whole cache is not kept.
        self.cache = TileCache(cache_bytes, sizeof=len, admit_oversized=False)
        self.decoded = TileCache(min(DECODED_CACHE_BYTES, max(1, cache_bytes // 2)))
        self.tile_size, self.overlap = tile_size, overlap
        self._sources = _OpenSources(open_sources)

    def close(self) -> None:
        for source in self._sources.clear():
            closer = getattr(source, "close", None)
            if closer is not None:
                closer()

    def prediction(self, prediction_id: int) -> Prediction:
        prediction = self.predictions.get(prediction_id)
        if prediction is None:
            raise NoSuchTile(f"no prediction {prediction_id}")
        return prediction

    # ------------------------------------------------------------------ sources

    def _slide(self, prediction: Prediction):
        if prediction.slide is None:
            raise NoSuchTile(f"{prediction.name}: the slide is not there")

        def opener():
            from gigaseg.slides import open_slide

            return _SlideSource(open_slide(prediction.slide), self.tile_size, self.overlap)

        return self._sources.get(("slide", prediction.slide), opener).deep_zoom

    def _pyramid(self, path) -> TiffPyramid:
        return self._sources.get(("tiff", path), lambda: TiffPyramid(path, self.decoded))

    def _mask_source(self, prediction: Prediction, layer: str) -> MaskDeepZoom:
        if layer in ("mask", "mask_binary"):
            if prediction.mask is None:
                raise NoSuchTile(f"{prediction.name}: no mask")
            kind = prediction.summary.get("kind")
            if layer == "mask_binary" and kind != "probability":
                raise NoSuchTile(f"{prediction.name}: the mask is binary already")
            if layer == "mask" and kind == "probability":
                style = MaskStyle("probability")
            else:
                style = MaskStyle("tissue", TISSUE_RGB, _probability_cut(prediction) if kind == "probability" else None)
            return MaskDeepZoom(self._pyramid(prediction.mask), style, self.tile_size, self.overlap)
        reference = prediction.reference
        if reference is None or reference.kind == "geojson":
            raise NoSuchTile(f"{prediction.name}: no reference mask")
        pyramid = self._sources.get(("image", reference.path), lambda: _reference_pyramid(reference.path, self.decoded))
        return MaskDeepZoom(pyramid, MaskStyle("tissue", REFERENCE_RGB, reference.cut), self.tile_size, self.overlap)

    # ------------------------------------------------------------------ layers and tiles

    def layers(self, prediction_id: int) -> dict[str, Layer]:
        """The layers this prediction has (opening its slide and masks to learn their sizes)."""
        prediction = self.prediction(prediction_id)
        found: dict[str, Layer] = {}
        width0 = prediction.level0_size[0]
        for name in LAYERS:
            try:
                if name == "slide":
                    grid = self._slide(prediction).grid
                    downsample = 1.0
                else:
                    grid = self._mask_source(prediction, name).grid
                    # The mask lies on level 0 by the downsample it was predicted at; the reference
                    # (at whatever size) covers the same level 0.
                    downsample = prediction.downsample if name.startswith("mask") else width0 / grid.width
            except NoSuchTile:
                continue
            except GigasegError as exc:
                log.warning("%s: the %s layer cannot be shown: %s", prediction.name, name, exc)
                continue
            found[name] = Layer(name, grid, FORMATS[name], downsample)
        return found

    def dzi(self, prediction_id: int, layer: str) -> str:
        if layer not in LAYERS:
            raise NoSuchTile(f"no layer {layer}")
        found = self.layers(prediction_id).get(layer)
        if found is None:
            raise NoSuchTile(f"prediction {prediction_id} has no {layer} layer")
        return found.grid.dzi(found.image_format)

    def tile(self, prediction_id: int, layer: str, level: int, col: int, row: int) -> tuple[bytes, str]:
        """The encoded tile and its format (jpeg or png)."""
        if layer not in LAYERS:
            raise NoSuchTile(f"no layer {layer}")
        key = (prediction_id, layer, level, col, row)
        cached = self.cache.get(key)
        if cached is not None:
            return cached, FORMATS[layer]
        prediction = self.prediction(prediction_id)
        source = self._slide(prediction) if layer == "slide" else self._mask_source(prediction, layer)
        grid = source.grid
        cols, rows = grid.tile_count(level) if 0 <= level < grid.level_count else (0, 0)
        if not (0 <= col < cols and 0 <= row < rows):
            raise NoSuchTile(f"no tile ({col}, {row}) at level {level}")
        data = encode(source.tile(level, col, row), FORMATS[layer])
        self.cache.put(key, data)
        return data, FORMATS[layer]

    def thumbnail(self, prediction_id: int) -> bytes:
        """The slide as a JPEG of at most two tiles a side: its Deep Zoom level of that size, tiles stitched."""
        key = (prediction_id, "thumbnail")
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        source = self._slide(self.prediction(prediction_id))
        grid = source.grid
        level = max(k for k in range(grid.level_count) if max(grid.level_dimensions(k)) <= 2 * grid.tile_size)
        width, height = grid.level_dimensions(level)
        image = np.empty((height, width, 3), np.uint8)
        cols, rows = grid.tile_count(level)
        for row in range(rows):
            for col in range(cols):
                x0, y0, x1, y1 = grid.tile(level, col, row).box
                image[y0:y1, x0:x1] = source.tile(level, col, row)
        data = encode(image, "jpeg")
        self.cache.put(key, data)
        return data


class _SlideSource:
    """An open slide and its Deep Zoom tiles; the slide is closed by ``close()``, or once nothing refers to its tiles.

    Readers hold the Deep Zoom object while they read, so a slide dropped from the open files
    is closed only after the last read of it (closing it at once would fail reads in flight).
    """

    def __init__(self, slide, tile_size: int, overlap: int) -> None:
        self.deep_zoom = slide.deep_zoom(tile_size, overlap)
        self._closer = weakref.finalize(self.deep_zoom, slide.close)

    def close(self) -> None:
        self._closer()


def _probability_cut(prediction: Prediction) -> int:
    from gigaseg.evaluation_inputs import probability_cut

    return probability_cut(float(prediction.summary.get("threshold", 0.5)))


def _reference_pyramid(path, cache: TileCache) -> TiffPyramid:
    """A reference mask as a pyramid: TIFFs as they are; other images are not drawn (GeoJSON is drawn as outlines)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise MaskError(f"{path.name}: only TIFF reference masks are drawn as a layer")
    return TiffPyramid(path, cache)
