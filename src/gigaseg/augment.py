"""Augmentation on the fly that stays exact under tiling: the eight flips and quarter turns of a region as a lazy view, and colour changes that are a function of each pixel's RGB value only.

A region's :class:`Augmentation` is drawn from (seed, epoch, region key) alone. The tiled
engine then reads transformed tile windows straight from the untransformed source (a memory
map, or a slide reader's array) through :class:`TransformedRegion`, and every window equals
the same slice of the fully transformed region, bit for bit: the geometric part maps a window
to one source rectangle, and the colour part uses no statistic of the region (contrast turns
about a fixed pivot, not the region's mean), so a tile cannot tell it was read on its own.

Stain jitter follows the colour-deconvolution augmentation of Tellez et al. (2018): each
pixel's optical densities ``OD = -ln(rgb / 255)`` are split into haematoxylin, eosin and DAB
with the Ruifrok-Johnston matrix of scikit-image's ``rgb2hed``, each stain is scaled and
shifted, and the result goes back to RGB. In optical densities this whole round trip is one
affine map, ``OD' = OD @ (HED diag(scale) RGB) + shift``, so a pixel costs one 3x3 product,
three exponentials and the 3x3 product of brightness, contrast and saturation, in compiled
float32 loops without fast-math, so a pixel's result does not depend on where in a window (or
in a vector lane) it was computed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np

from gigaseg.errors import MaskError
from gigaseg.options import AugmentConfig

#: RGB from stain optical densities (rows: haematoxylin, eosin, DAB), Ruifrok and Johnston
#: (2001), as ``skimage.color.rgb_from_hed``; its inverse takes optical densities to stains.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

#: scikit-image scales optical densities by -ln(1e-6) (a black pixel is 1): stain shifts are in its units.
OD_UNIT = -math.log(1e-6)

#: Contrast turns about this grey level: a fixed value, never the region's mean, so that every
#: tile of a region is changed in the same way.
CONTRAST_PIVOT = 128.0

#: Saturation mixes each channel with this luma (ITU-R BT.601 weights).
LUMA = np.array([0.299, 0.587, 0.114])

_STAINS = ("h", "e", "d")


@dataclass(frozen=True)
class Augmentation:
    """How one region is changed in one epoch.

    The transformed region is ``np.rot90(np.flip(region, 1) if flip else region, turns)``:
    mirrored left to right first, then turned by ``turns`` counter-clockwise quarter turns.
    ``hed_scale`` and ``hed_shift`` change the haematoxylin, eosin and DAB densities
    (``stain * scale + shift``, shifts in scikit-image's ``rgb2hed`` units); then
    ``brightness`` (a fraction of 255) is added, ``contrast`` scales about
    :data:`CONTRAST_PIVOT` and ``saturation`` scales each channel's distance from the pixel's
    luma. The mask gets the geometric part only.
    """

    turns: int = 0
    flip: bool = False
    hed_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hed_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    brightness: float = 0.0
    contrast: float = 1.0
    saturation: float = 1.0

    def __post_init__(self) -> None:
        if self.turns not in (0, 1, 2, 3) or isinstance(self.turns, bool):
            raise ValueError(f"turns must be 0, 1, 2 or 3 quarter turns, got {self.turns!r}")
        for name in ("hed_scale", "hed_shift"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} needs one value per stain (H, E, DAB), got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "turns", int(self.turns))
        object.__setattr__(self, "flip", bool(self.flip))
        for name in ("brightness", "contrast", "saturation"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def changes_colour(self) -> bool:
        """Whether any colour parameter differs from the identity."""
        colour = (self.hed_scale, self.hed_shift, self.brightness, self.contrast, self.saturation)
        return colour != ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), 0.0, 1.0, 1.0)

    def transformed_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of a ``height x width`` region after the transform: swapped by odd turns."""
        return (width, height) if self.turns % 2 else (height, width)

    def describe(self) -> dict[str, int | float | bool]:
        """The parameters as plain, flat values (for logging as run parameters)."""
        values: dict[str, int | float | bool] = {"turns": self.turns, "flip": self.flip}
        for stain, scale, shift in zip(_STAINS, self.hed_scale, self.hed_shift):
            values[f"hed_scale_{stain}"] = scale
            values[f"hed_shift_{stain}"] = shift
        values.update(brightness=self.brightness, contrast=self.contrast, saturation=self.saturation)
        return values


def _generator(seed: int, epoch: int, region_key: str) -> np.random.Generator:
    # A stable hash: Python's hash() of a string differs between processes.
    payload = json.dumps(["gigaseg.augment", int(seed), int(epoch), str(region_key)]).encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(payload).digest()[:16], "little"))


def draw(config: AugmentConfig, seed: int, epoch: int, region_key: str) -> Augmentation:
    """The augmentation of region ``region_key`` in ``epoch``: the same in every process, new in every epoch.

    All parameters are drawn every time, in a fixed order, and only then scaled by the
    settings: switching one kind of change off, or resizing it, leaves the others' draws alone.
    """
    config.validate()
    if not config.enabled:
        return Augmentation()
    rng = _generator(seed, epoch, region_key)
    turns = int(rng.integers(4))
    flip = bool(rng.integers(2))
    u = rng.uniform(-1.0, 1.0, 9)
    if not config.flips:
        turns, flip = 0, False
    return Augmentation(
        turns=turns,
        flip=flip,
        hed_scale=tuple(1.0 + config.hed_sigma * u[0:3]),
        hed_shift=tuple(config.hed_shift * u[3:6]),
        brightness=float(config.brightness * u[6]),
        contrast=float(1.0 + config.contrast * u[7]),
        saturation=float(1.0 + config.saturation * u[8]),
    )


# ----- colour ------------------------------------------------------------------------------


class ColourMaps(NamedTuple):
    """The float32 constants of a colour change, as the compiled loops take them.

    ``od2`` (256,): each channel value's optical density in base 2, ``-log2(max(v / 255, 1e-6))``.
    ``exponent`` (4, 3): the stain-jittered RGB of a pixel is ``rgb = 2 ** t`` (at most 255)
    with ``t = od2[pixel] @ exponent[:3] + exponent[3]``. ``mix`` (4, 3): the output is
    ``rgb @ mix[:3] + mix[3]`` (brightness, contrast, saturation), rounded and clipped to uint8.
    """

    od2: np.ndarray
    exponent: np.ndarray
    mix: np.ndarray


def colour_maps(augmentation: Augmentation) -> ColourMaps:
    """The constants of ``augmentation``'s colour change, computed in float64 and stored in float32."""
    a = augmentation
    # Optical densities in base 2 (so the kernel's exponential is a power of two), floored as in rgb2hed.
    values = np.arange(256) / 255.0
    od2 = -np.log2(np.maximum(values, 1e-6))
    # OD' = OD @ M + shift, and the output 255 * exp(-OD') = 2 ** (log2(255) - OD' / ln 2).
    matrix = HED_FROM_RGB @ np.diag(a.hed_scale) @ RGB_FROM_HED
    shift = OD_UNIT * np.asarray(a.hed_shift) @ RGB_FROM_HED / math.log(2.0)
    exponent = np.vstack([-matrix, math.log2(255.0) - shift])
    # Brightness, contrast about the pivot, saturation about the luma: one affine map of RGB.
    saturate = a.saturation * np.eye(3) + (1.0 - a.saturation) * np.outer(np.ones(3), LUMA)
    offset = a.contrast * 255.0 * a.brightness + (1.0 - a.contrast) * CONTRAST_PIVOT
    # The rows of ``saturate`` sum to 1, so a grey offset passes through it unchanged.
    mix = np.vstack([(a.contrast * saturate).T, np.full(3, offset)])
    return ColourMaps(*(np.ascontiguousarray(v, np.float32) for v in (od2, exponent, mix)))


# 2 ** r for |r| <= 1/2: least squares on Chebyshev nodes (near minimax), error 1.3e-7.
_NODES = 0.5 * np.cos(np.pi * (np.arange(200) + 0.5) / 200)
_EXP2 = tuple(np.float32(c) for c in np.polynomial.polynomial.polyfit(_NODES, 2.0**_NODES, 5))
_LOG2_255 = np.float32(math.log2(255.0))


@numba.njit(nogil=True, cache=True)
def _exp2(t):  # pragma: no cover - compiled
    """``2 ** t`` in float32, at most 255 (rgb2hed's clip of the stains' RGB to [0, 1]), in operations the compiler vectorises."""
    c0, c1, c2, c3, c4, c5 = _EXP2
    t = min(max(t, np.float32(-100.0)), _LOG2_255)
    n = np.floor(t + np.float32(0.5))
    r = t - n
    power = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    return (c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * c5))))) * power


@numba.njit(nogil=True, cache=True)
def _colour_row(d0, d1, d2, exponent, mix, out):  # pragma: no cover - compiled
    """One row: the channels' base-2 densities ``d0, d1, d2`` (planar, float32) to interleaved uint8 pixels in ``out``."""
    e00, e01, e02 = exponent[0, 0], exponent[0, 1], exponent[0, 2]
    e10, e11, e12 = exponent[1, 0], exponent[1, 1], exponent[1, 2]
    e20, e21, e22 = exponent[2, 0], exponent[2, 1], exponent[2, 2]
    e30, e31, e32 = exponent[3, 0], exponent[3, 1], exponent[3, 2]
    m00, m01, m02 = mix[0, 0], mix[0, 1], mix[0, 2]
    m10, m11, m12 = mix[1, 0], mix[1, 1], mix[1, 2]
    m20, m21, m22 = mix[2, 0], mix[2, 1], mix[2, 2]
    m30, m31, m32 = mix[3, 0], mix[3, 1], mix[3, 2]
    zero, top, half = np.float32(0.0), np.float32(255.0), np.float32(0.5)
    for q in range(d0.shape[0]):
        a, b, c = d0[q], d1[q], d2[q]
        r = _exp2(a * e00 + b * e10 + c * e20 + e30)
        g = _exp2(a * e01 + b * e11 + c * e21 + e31)
        u = _exp2(a * e02 + b * e12 + c * e22 + e32)
        x0 = r * m00 + g * m10 + u * m20 + m30
        x1 = r * m01 + g * m11 + u * m21 + m31
        x2 = r * m02 + g * m12 + u * m22 + m32
        out[3 * q] = np.uint8(np.int32(min(max(x0, zero), top) + half))
        out[3 * q + 1] = np.uint8(np.int32(min(max(x1, zero), top) + half))
        out[3 * q + 2] = np.uint8(np.int32(min(max(x2, zero), top) + half))


@numba.njit(nogil=True, cache=True)
def _colour_pixels(source, out, start, row_step, col_step, od2, exponent, mix):  # pragma: no cover - compiled
    """Output pixel (i, q) (``out`` is rows x 3*columns, C order) = the colour change of pixel ``start + i*row_step + q*col_step`` of ``source`` (flat RGB bytes)."""
    width = out.shape[1] // 3
    d0 = np.empty(width, np.float32)
    d1 = np.empty(width, np.float32)
    d2 = np.empty(width, np.float32)
    for i in range(out.shape[0]):
        # The table look-ups (and the turn's strides) in their own loop; the arithmetic on
        # planar rows vectorises (in one loop with the look-ups it did not, and took 4x as long).
        first = start + i * row_step
        for q in range(width):
            e = 3 * (first + q * col_step)
            d0[q] = od2[source[e]]
            d1[q] = od2[source[e + 1]]
            d2[q] = od2[source[e + 2]]
        _colour_row(d0, d1, d2, exponent, mix, out[i])


@numba.njit(nogil=True, cache=True)
def _move_pixels(source, out, start, row_step, col_step):  # pragma: no cover - compiled
    """Output pixel (i, q) (``out`` is rows x 3*columns, C order) = pixel ``start + i*row_step + q*col_step`` of ``source`` (flat RGB bytes)."""
    # numpy copies a turned RGB view one 3-byte run at a time: 4-7x slower than this loop.
    for i in range(out.shape[0]):
        first = start + i * row_step
        row = out[i]
        for q in range(out.shape[1] // 3):
            e = 3 * (first + q * col_step)
            row[3 * q] = source[e]
            row[3 * q + 1] = source[e + 1]
            row[3 * q + 2] = source[e + 2]


def _pixel_steps(piece: np.ndarray, turned: np.ndarray) -> tuple[int, int, int]:
    """Where pixel (i, q) of the view ``turned`` lies in the C-ordered ``piece``: at ``start + i*row_step + q*col_step`` (numpy's own view arithmetic)."""
    pixel = piece.strides[1]
    offset = turned.__array_interface__["data"][0] - piece.__array_interface__["data"][0]
    return offset // pixel, turned.strides[0] // pixel, turned.strides[1] // pixel


def _check_rgb(pixels: np.ndarray) -> None:
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"colour changes take height x width x 3 uint8 RGB pixels, got {pixels.dtype} of shape {pixels.shape}")


def colour_transform(pixels: np.ndarray, augmentation: Augmentation) -> np.ndarray:
    """``augmentation``'s colour change of RGB ``pixels`` (height x width x 3 uint8) as a new array; a copy when it changes no colour.

    Each output pixel depends on that pixel's value alone, so a window of the result equals the
    result of the window.
    """
    _check_rgb(pixels)
    if not augmentation.changes_colour or pixels.size == 0:
        return np.array(pixels, order="C")
    source = np.ascontiguousarray(pixels)
    out = np.empty(source.shape, np.uint8)
    _colour_pixels(source.reshape(-1), out.reshape(len(out), -1), 0, source.shape[1], 1, *colour_maps(augmentation))
    return out


# ----- geometry ----------------------------------------------------------------------------


def source_rectangle(augmentation: Augmentation, source_shape: tuple[int, int], window: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The rectangle (top, left, bottom, right) of the source that ``window`` of the transformed region shows."""
    h, w = source_shape
    t, l, b, r = window
    turns = augmentation.turns
    # Undo the turns: rows and columns of the mirrored source ``m``, where
    # rot90(m)[i, j] = m[j, w-1-i] and rot90(m, 3)[i, j] = m[h-1-j, i].
    if turns == 0:
        rows, cols = (t, b), (l, r)
    elif turns == 1:
        rows, cols = (l, r), (w - b, w - t)
    elif turns == 2:
        rows, cols = (h - b, h - t), (w - r, w - l)
    else:
        rows, cols = (h - r, h - l), (t, b)
    if augmentation.flip:
        cols = (w - cols[1], w - cols[0])
    return rows[0], cols[0], rows[1], cols[1]


def _turn(piece: np.ndarray, augmentation: Augmentation) -> np.ndarray:
    """The transform applied to a source rectangle: a view, no copy (``piece`` itself for the identity)."""
    if augmentation.flip:
        piece = piece[:, ::-1]
    return np.rot90(piece, augmentation.turns) if augmentation.turns else piece


class TransformedArray:
    """A lazy view of a transformed image or mask: slicing ``[top:bottom, left:right]`` reads only the source rectangle it needs.

    Has what the tile engine asks of a region (``shape``, ``ndim``, ``dtype``, ``size``, 2-D
    slices with step 1, ``np.asarray``). Each slice is a new C-ordered array. With ``colour``
    the colour change is applied to the pixels read (RGB uint8 only). With ``release``, rows
    of a memory-mapped source leave the resident set once read (as the engine's reader does for
    plain memory maps, which it cannot recognise behind this view).
    """

    def __init__(self, source: np.ndarray, augmentation: Augmentation, *, colour: bool = False, release: bool = True):
        if source.ndim not in (2, 3):
            raise ValueError(f"a region is height x width (x channels), got shape {tuple(source.shape)}")
        self.colour = bool(colour and augmentation.changes_colour)
        if self.colour:
            _check_rgb(source)
        self.source = source
        self.augmentation = augmentation
        self.release = release
        self.maps = colour_maps(augmentation) if self.colour else None
        self.shape = augmentation.transformed_shape(*source.shape[:2]) + tuple(source.shape[2:])
        self.dtype = source.dtype
        self.ndim = source.ndim

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"TransformedArray(shape={self.shape}, dtype={self.dtype}, {self.augmentation})"

    def _window(self, key) -> tuple[int, int, int, int]:
        key = key if isinstance(key, tuple) else (key,)
        whole = slice(None)
        if len(key) > self.ndim or not all(isinstance(k, slice) for k in key) or any(k != whole for k in key[2:]):
            raise IndexError(f"a transformed region is read as [top:bottom, left:right] (whole channels), got {key!r}")
        key = key + (whole,) * (2 - len(key[:2]))
        bounds = []
        for k, size in zip(key[:2], self.shape[:2]):
            start, stop, step = k.indices(size)
            if step != 1:
                raise IndexError(f"a transformed region is read as [top:bottom, left:right] in steps of 1, got {k!r}")
            bounds.append((start, max(start, stop)))
        (top, bottom), (left, right) = bounds
        return top, left, bottom, right

    def __getitem__(self, key) -> np.ndarray:
        top, left, bottom, right = source_rectangle(self.augmentation, self.source.shape[:2], self._window(key))
        # One copy of the source rectangle first, row by row as it lies (a memory map's pages in
        # order): turning the source itself read a wide region's columns 2-3x slower.
        piece = np.array(self.source[top:bottom, left:right], order="C")
        if self.release and isinstance(self.source, np.memmap):
            # Imported here: gigaseg.streaming loads TensorFlow, which this module needs nowhere else.
            from gigaseg.streaming.reader import release_rows

            release_rows(self.source, top, bottom)
        turned = _turn(piece, self.augmentation)
        rgb = piece.ndim == 3 and piece.shape[2] == 3 and piece.dtype == np.uint8
        if piece.size == 0 or not (self.colour or rgb):
            # Masks: numpy turns one-byte pixels at least as fast as a compiled loop.
            return np.ascontiguousarray(turned)
        if turned is piece and not self.colour:
            return piece
        out = np.empty(turned.shape, np.uint8)
        steps = _pixel_steps(piece, turned)
        if self.colour:
            _colour_pixels(piece.reshape(-1), out.reshape(len(out), -1), *steps, *self.maps)
        else:
            _move_pixels(piece.reshape(-1), out.reshape(len(out), -1), *steps)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:, :]
        return whole if dtype is None else whole.astype(dtype, copy=False)


class TransformedRegion:
    """A region (RGB image and optional mask) seen through an :class:`Augmentation`, without materialising it.

    ``region.image`` and ``region.mask`` are :class:`TransformedArray` views (the mask without
    the colour change), to pass to the tile engine as they are: ``engine.step(*region)``.
    """

    def __init__(self, image: np.ndarray, mask: np.ndarray | None, augmentation: Augmentation, *, release: bool = True):
        if mask is not None and tuple(mask.shape) != tuple(image.shape[:2]):
            raise MaskError(f"mask of shape {tuple(mask.shape)} does not match the image's {tuple(image.shape[:2])}")
        self.augmentation = augmentation
        self.image = TransformedArray(image, augmentation, colour=True, release=release)
        self.mask = None if mask is None else TransformedArray(mask, augmentation, release=release)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the transformed region."""
        return self.image.shape[:2]

    def __iter__(self) -> Iterator[TransformedArray | None]:
        return iter((self.image, self.mask))


def transform_region(image: np.ndarray, mask: np.ndarray | None, augmentation: Augmentation) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole transformed image and mask as arrays, for the plain (untiled) step."""
    region = TransformedRegion(image, mask, augmentation)
    return np.asarray(region.image), None if region.mask is None else np.asarray(region.mask)


__all__ = [
    "AugmentConfig",
    "Augmentation",
    "ColourMaps",
    "TransformedArray",
    "TransformedRegion",
    "colour_maps",
    "colour_transform",
    "draw",
    "source_rectangle",
    "transform_region",
]
