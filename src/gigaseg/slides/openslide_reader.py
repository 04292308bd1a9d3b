"""SlideReader over OpenSlide: every format OpenSlide opens (Aperio, generic TIFF, DICOM, ...).

This is the only module that touches ``openslide``. Pixels outside the scanned area come
back transparent from OpenSlide and are composited onto white here.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from pathlib import Path

import numpy as np
import openslide
import openslide.lowlevel

from gigaseg.errors import SlideError
from gigaseg.slides.base import SlideReader
from gigaseg.slides.tiff_tiles import TiffTiles

log = logging.getLogger(__name__)

#: Microns per pixel outside this range is not a microscope scan: generic TIFF writers put
#: screen resolutions (72 or 96 dpi, i.e. ~350 or ~265 um/px) in the tags by default.
PLAUSIBLE_MPP = (0.01, 50.0)


def _float_property(props: dict, key: str) -> float | None:
    try:
        value = float(props[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _int_property(props: dict, key: str) -> int:
    """An integer property such as ``openslide.bounds-x``; 0 when absent or not an integer."""
    try:
        return int(props[key])
    except (KeyError, TypeError, ValueError):
        return 0


class OpenSlideReader(SlideReader):
    """A whole slide image opened with OpenSlide (``openslide-python`` + ``openslide-bin``)."""

    def __init__(self, path: str | os.PathLike, *, direct_tiles: bool = True) -> None:
        """Open ``path``; ``direct_tiles=False`` reads every pixel through OpenSlide (see ``tiff_tiles``)."""
        self.path = Path(path)
        self.name = self.path.name
        if not self.path.exists():
            raise SlideError(f"no such slide file: {self.path}")
        if self.path.is_dir():
            raise SlideError(f"{self.path} is a folder, not a slide file; give the path of the slide itself")
        try:
            with open(self.path, "rb") as f:  # OpenSlide reports an unreadable file as "unsupported"
                f.read(1)
        except OSError as exc:
            raise SlideError(f"cannot read slide file {self.path}: {exc.strerror or exc}; check its permissions") from exc
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(
                f"{self.path} is not a slide OpenSlide can read ({exc}); "
                "check the file is a whole slide image (SVS, TIFF, NDPI, MRXS, DICOM, ...)"
            ) from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"OpenSlide cannot open {self.path}: {exc}; the file may be corrupt or unsupported") from exc
        props = dict(self._slide.properties)
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
        self._dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        mpp_x = _float_property(props, openslide.PROPERTY_NAME_MPP_X)
        mpp_y = _float_property(props, openslide.PROPERTY_NAME_MPP_Y)
        self._mpp: tuple[float, float] | None = None
        if mpp_x is not None and mpp_y is not None:
            if PLAUSIBLE_MPP[0] <= mpp_x <= PLAUSIBLE_MPP[1] and PLAUSIBLE_MPP[0] <= mpp_y <= PLAUSIBLE_MPP[1]:
                self._mpp = (mpp_x, mpp_y)
            else:
                log.warning("%s: ignoring implausible resolution %.4g x %.4g um/px (not a microscope scan)",
                            self.name, mpp_x, mpp_y)
        self._power = _float_property(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        self._bounds_offset = (_int_property(props, openslide.PROPERTY_NAME_BOUNDS_X),
                               _int_property(props, openslide.PROPERTY_NAME_BOUNDS_Y))
        # Tiles decoded straight from the file where that gives OpenSlide's pixels (tiff_tiles.py).
        self._tiles = TiffTiles.open(self.path, self.vendor, self._dimensions) if direct_tiles else None
        self._closed = False

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def mpp(self) -> tuple[float, float] | None:
        return self._mpp

    @property
    def objective_power(self) -> float | None:
        return self._power

    @property
    def bounds_offset(self) -> tuple[int, int]:
        return self._bounds_offset

    @property
    def properties(self) -> dict[str, str]:
        """All of OpenSlide's properties of the slide (vendor metadata included)."""
        self._check_open()
        return dict(self._slide.properties)

    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(f"{self.name}: the slide is closed; open it again to read it")

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        self._check_open()
        if self._tiles is not None:
            pixels = self._direct(location, level, size)
            if pixels is not None:
                return pixels
        try:
            return _read_rgb(self._slide, location, level, size)
        except openslide.OpenSlideError as exc:
            self._reopen()
            raise SlideError(
                f"{self.name}: cannot read the region at level-0 (x={location[0]}, y={location[1]}) of "
                f"{size[0]}x{size[1]} (w x h) at level {level}: {exc}; the slide file is probably corrupt"
            ) from exc

    def _direct(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray | None:
        """The region decoded by ``self._tiles``, or None where OpenSlide must read it."""
        ds = self._downsamples[level]
        x, y = location[0] / ds, location[1] / ds
        if not (x.is_integer() and y.is_integer()):  # OpenSlide resamples reads at fractional positions
            return None
        try:
            return self._tiles.read(level, int(x), int(y), size[0], size[1], self._direct_reference(level))
        except Exception as exc:  # noqa: BLE001 - OpenSlide reads it, and reports a corrupt tile its own way
            log.debug("%s: direct tile read failed (%s); reading through OpenSlide", self.name, exc)
            return None

    def _direct_reference(self, level: int):
        """OpenSlide's read of a rectangle given in pixels of ``level``: what decoded tiles are checked against."""
        ds = self._downsamples[level]

        def reference(x: int, y: int, w: int, h: int) -> np.ndarray:
            try:
                return _read_rgb(self._slide, (round(x * ds), round(y * ds)), level, (w, h))
            except openslide.OpenSlideError:
                self._reopen()  # this handle now fails every call; the caller's own read must not
                raise

        return reference

    def _reopen(self) -> None:
        """A fresh handle after a failed read: OpenSlide fails every later call on a handle that saw an error,
        which would blame the next regions for this one's corrupt tile."""
        try:
            fresh = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError:
            return  # keep the failed handle: later reads fail and say so
        # Not closed here: another reader thread may be inside a call on it; it is closed once unreferenced.
        self._slide = fresh

    def close(self) -> None:
        if not self._closed:
            if self._tiles is not None:
                self._tiles.close()
            self._slide.close()
            self._closed = True

    def __repr__(self) -> str:
        return f"OpenSlideReader({str(self.path)!r})"


_RAW_READ = getattr(openslide.lowlevel, "_read_region", None)


def _read_rgb(slide: openslide.OpenSlide, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """RGB pixels of a region composited onto white, straight from OpenSlide's premultiplied ARGB buffer.

    ``OpenSlide.read_region`` hands back a PIL image: un-premultiplying into it, then copying it
    into numpy, made a read about 8 % dearer (``benchmarks/predict_stages.py``). Blank
    (unscanned) areas are transparent; over white a premultiplied colour ``c`` with alpha ``a``
    is ``c + 255 - a``.
    """
    w, h = size
    if _RAW_READ is None or not hasattr(slide, "_osr") or w <= 0 or h <= 0:  # an openslide-python without it
        return _read_rgb_via_pil(slide, location, level, size)
    argb = np.empty((h, w), np.uint32)
    _RAW_READ(slide._osr, argb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), location[0], location[1], level, w, h)
    return argb_to_rgb(argb)


def argb_to_rgb(argb: np.ndarray) -> np.ndarray:
    """Premultiplied native-endian 0xAARRGGBB words (OpenSlide's buffer) -> RGB uint8 composited onto white."""
    h, w = argb.shape
    channels = argb.view(np.uint8).reshape(h, w, 4)
    if np.little_endian:  # bytes B, G, R, A
        bgr, alpha = channels[..., :3], channels[..., 3]
        rgb = np.empty((h, w, 3), np.uint8)
        rgb[...] = bgr[..., ::-1]
    else:
        rgb, alpha = np.ascontiguousarray(channels[..., 1:]), channels[..., 0]
    if alpha.min() < 255:
        rgb += (255 - alpha)[..., None]
    return rgb


def _read_rgb_via_pil(slide: openslide.OpenSlide, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    image = slide.read_region(location, level, size)
    rgba = np.asarray(image)
    image.close()
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # Un-premultiplied RGBA here: composite onto white.
    a = alpha.astype(np.uint16)[..., None]
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
