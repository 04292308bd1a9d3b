"""Which rectangle of a slide to prepare, at which level, and how it is fitted to the model's stride."""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

from gigaseg.errors import RegionError
from gigaseg.options import DEFAULT_PAD_VALUE
from gigaseg.slides.base import SlideReader

log = logging.getLogger(__name__)

FitMode = Literal["pad", "crop", "none"]
FIT_MODES = ("pad", "crop", "none")


@dataclass(frozen=True)
class RegionSpec:
    """A rectangle asked for by the user.

    ``x``, ``y`` are level-0 pixels (OpenSlide convention); ``width`` and ``height`` are
    pixels at the chosen resolution, which is either a pyramid ``level`` or a target
    ``mpp`` (microns per pixel, resolved with ``SlideReader.level_for_mpp``). Give at most
    one of them; with neither, level 0 is used.
    """

    x: int
    y: int
    width: int
    height: int
    level: int | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        for name in ("x", "y", "width", "height", "level"):
            value = getattr(self, name)
            if value is None and name == "level":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise RegionError(f"region {name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.width <= 0 or self.height <= 0:
            raise RegionError(
                f"region size {self.width}x{self.height} (w x h) is empty; give a positive width and height"
            )
        if self.level is not None and self.mpp is not None:
            raise RegionError(
                f"region gives both level={self.level} and mpp={self.mpp}; choose the resolution by one of them"
            )
        if self.mpp is not None:
            if isinstance(self.mpp, bool) or not isinstance(self.mpp, numbers.Real) or not (
                self.mpp > 0 and math.isfinite(self.mpp)
            ):
                raise RegionError(f"region mpp must be a positive number of microns per pixel, got {self.mpp!r}")
            object.__setattr__(self, "mpp", float(self.mpp))


@dataclass(frozen=True)
class FittedRegion:
    """A region resolved on a slide and fitted to a multiple of the total stride.

    ``size`` is the fitted (width, height) of the arrays that will be written;
    ``read_size`` is the part read from the slide, anchored at the top-left corner.
    With ``fit="pad"`` the rest (right and bottom) is filled with ``pad_value`` and mask 0;
    with ``fit="crop"`` the right and bottom of the requested rectangle are dropped.
    """

    x: int
    y: int
    level: int
    downsample: float
    mpp: float | None
    requested_size: tuple[int, int]
    size: tuple[int, int]
    fit: str
    total_stride: int
    pad_value: tuple[int, int, int] = DEFAULT_PAD_VALUE
    requested_mpp: float | None = field(default=None)

    @property
    def read_size(self) -> tuple[int, int]:
        return (min(self.size[0], self.requested_size[0]), min(self.size[1], self.requested_size[1]))

    @property
    def padding(self) -> tuple[int, int]:
        """(right, bottom) pixels of background padding."""
        return (self.size[0] - self.read_size[0], self.size[1] - self.read_size[1])

    @property
    def cropped(self) -> tuple[int, int]:
        """(right, bottom) pixels of the requested rectangle that were dropped."""
        return (self.requested_size[0] - self.read_size[0], self.requested_size[1] - self.read_size[1])

    def level0(self, col: int, row: int) -> tuple[int, int]:
        """Level-0 (x, y) of the pixel at (col, row) of the region."""
        return (self.x + int(round(col * self.downsample)), self.y + int(round(row * self.downsample)))

    def describe(self) -> dict:
        """The region as plain JSON-ready values, for the manifest."""
        return {
            "x": self.x,
            "y": self.y,
            "level": self.level,
            "downsample": self.downsample,
            "mpp": self.mpp,
            "requested_mpp": self.requested_mpp,
            "width": self.size[0],
            "height": self.size[1],
            "requested": {"width": self.requested_size[0], "height": self.requested_size[1]},
            "fit": self.fit,
            "padding": {"right": self.padding[0], "bottom": self.padding[1], "value": list(self.pad_value)},
            "cropped": {"right": self.cropped[0], "bottom": self.cropped[1]},
            "total_stride": self.total_stride,
        }


def _fit_length(name: str, n: int, stride: int, fit: str) -> int:
    down = (n // stride) * stride
    up = -(-n // stride) * stride
    if fit == "pad":
        return up
    if fit == "crop":
        if down == 0:
            raise RegionError(
                f"region {name} {n} is smaller than the model's total stride {stride}, so cropping leaves "
                f"nothing; ask for at least {stride} pixels or use fit='pad'"
            )
        return down
    if n != down:
        nearest = f"{down} or {up}" if down else f"{up}"
        raise RegionError(
            f"region {name} {n} is not a multiple of the model's total stride {stride}; use {nearest}, "
            "or set fit='pad' or fit='crop'"
        )
    return n


def _check_pad_value(pad_value: tuple[int, int, int]) -> tuple[int, int, int]:
    values = tuple(pad_value)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                   for v in values):
        raise RegionError(f"pad_value must be three integers 0..255 (an RGB colour), got {pad_value!r}")
    return values  # type: ignore[return-value]


def fit_region(
    reader: SlideReader,
    spec: RegionSpec,
    *,
    total_stride: int,
    fit: str = "pad",
    pad_value: tuple[int, int, int] = DEFAULT_PAD_VALUE,
) -> FittedRegion:
    """Resolve ``spec`` on ``reader`` and fit its size to a multiple of ``total_stride``.

    Raises RegionError when the requested rectangle is outside the slide, the level does
    not exist, or the size cannot be fitted as asked.
    """
    if fit not in FIT_MODES:
        raise RegionError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
    if isinstance(total_stride, bool) or not isinstance(total_stride, int) or total_stride <= 0:
        raise RegionError(f"total_stride must be a positive integer, got {total_stride!r}")
    pad_value = _check_pad_value(pad_value)
    if spec.mpp is not None:
        level = reader.level_for_mpp(float(spec.mpp)).level
    else:
        level = 0 if spec.level is None else spec.level
    requested = (spec.width, spec.height)
    reader.check_region((spec.x, spec.y), level, requested)
    size = (
        _fit_length("width", spec.width, total_stride, fit),
        _fit_length("height", spec.height, total_stride, fit),
    )
    region = FittedRegion(
        x=spec.x,
        y=spec.y,
        level=level,
        downsample=float(reader.level_downsamples[level]),
        mpp=reader.level_mpp(level),
        requested_size=requested,
        size=size,
        fit=fit,
        total_stride=total_stride,
        pad_value=pad_value,
        requested_mpp=None if spec.mpp is None else float(spec.mpp),
    )
    if region.padding != (0, 0):
        log.info("%s: padding region by %d px right and %d px bottom to a multiple of %d",
                 reader.name, *region.padding, total_stride)
    if region.cropped != (0, 0):
        log.info("%s: cropping %d px right and %d px bottom to a multiple of %d",
                 reader.name, *region.cropped, total_stride)
    return region
