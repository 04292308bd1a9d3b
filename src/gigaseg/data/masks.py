"""Where a region's label mask comes from: synthetic truth, a mask image, or (elsewhere) annotations.

Every mask source has ``read(location, level, size)`` returning an H x W uint8 array of
0 (background) and 1 (tissue) in the slide-reader convention, and ``describe()`` returning
JSON-ready facts for the manifest. A source whose ``produces_ignore`` is true may also
return 255 (ignore: neither, counted in no loss and no metric). ``attach(reader, region,
workdir)`` is called once before the first read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from gigaseg.data.labels import IGNORE
from gigaseg.data.manifest import file_sha256
from gigaseg.data.regions import FittedRegion
from gigaseg.errors import ConfigError, MaskError
from gigaseg.slides.base import SlideReader

log = logging.getLogger(__name__)


@runtime_checkable
class MaskSource(Protocol):
    """Anything that can give the label mask (0/1, or 0/1/255 when it has ignored pixels) of a rectangle of a slide."""

    def read(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        """The H x W uint8 mask of ``size`` (w, h) at ``level`` with level-0 origin ``location``."""

    def describe(self) -> dict:
        """JSON-ready description for the manifest (kind, path, sha256, options)."""


class BaseMaskSource:
    """Default no-op hooks shared by the built-in mask sources."""

    kind = "mask"
    #: Whether ``read`` may return 255 (ignore); a source that says no is checked to return only 0/1.
    produces_ignore = False

    def attach(self, reader: SlideReader, region: FittedRegion, workdir: Path) -> None:
        """Called once before reading, with the slide and the fitted region."""

    def close(self) -> None:
        """Release files and scratch space."""


def check_mask_tile(mask: np.ndarray, size: Sequence[int], source: str, *, ignore: bool = False) -> np.ndarray:
    """Return ``mask`` as uint8 after checking its shape against ``size`` (w, h) and its values.

    Values must be 0/1, or 0/1/255 with ``ignore``: a source that does not produce ignored
    pixels and returns 255 most likely means tissue by it, and must not lose it silently.
    """
    w, h = (int(v) for v in size)
    mask = np.asarray(mask)
    if mask.shape != (h, w):
        raise MaskError(f"{source} returned a mask of shape {mask.shape}, expected {(h, w)} (h x w)")
    if mask.size:
        # Checked before the cast to uint8, which would wrap 256 round to 0.
        bad = (mask < 0) | (mask > 1)
        if ignore:
            bad &= mask != IGNORE
        if bad.any():
            allowed = "0/1/255 (background, tissue, ignore)" if ignore else "0/1"
            raise MaskError(f"{source} returned mask value {mask[bad][0]}; a mask must be {allowed}")
    return mask.astype(np.uint8, copy=False)


class SyntheticMask(BaseMaskSource):
    """The exact tissue mask written alongside a synthetic slide (``write_synthetic_slide``)."""

    kind = "synthetic"

    def __init__(self, mask_path: str | Path) -> None:
        self.path = Path(mask_path)
        if not self.path.is_file():
            raise MaskError(
                f"synthetic mask {self.path} does not exist; write it with the slide "
                "(write_synthetic_slide(..., mask_path=...)) or check the path"
            )
        self._sha256: str | None = None

    def read(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        from gigaseg.slides.synthetic import read_mask_region

        mask = read_mask_region(self.path, tuple(location), level, tuple(size))
        return check_mask_tile(mask, size, f"synthetic mask {self.path.name}")

    def describe(self) -> dict:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return {"kind": self.kind, "path": str(self.path), "file": self.path.name, "sha256": self._sha256}


def _load_mask_image(path: Path) -> np.ndarray:
    """Load a 2-D mask image: memory-mapped when it is an uncompressed TIFF, else decoded."""
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            try:
                image = tifffile.memmap(path, mode="r")
            except ValueError:  # compressed or tiled: decode it
                image = tifffile.imread(path)
        except Exception as exc:  # tifffile raises many kinds for a bad file
            raise MaskError(f"mask image {path} is not a readable TIFF ({exc}); export it again") from exc
    else:
        from PIL import Image

        try:
            with Image.open(path) as im:
                if im.mode not in ("1", "L", "I", "I;16", "P"):
                    raise MaskError(
                        f"mask image {path} has colour mode {im.mode}; save it as single-channel "
                        "(greyscale) 0/1 or 0/255"
                    )
                image = np.asarray(im.convert("L") if im.mode == "1" else im)
        except MaskError:
            raise
        except Image.DecompressionBombError as exc:
            raise MaskError(f"mask image {path} is too large for PNG decoding limits; save it as TIFF") from exc
        except Exception as exc:
            raise MaskError(f"mask image {path} is not a readable image ({exc}); export it again") from exc
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2 or image.dtype.kind not in "buif":
        raise MaskError(
            f"mask image {path} has shape {image.shape} and type {image.dtype}; "
            "a mask image must be single-channel with values 0/1 or 0/255"
        )
    return image


def _mask_values(image: np.ndarray, rows_per_chunk: int = 1024) -> set[int | float]:
    """The distinct values of ``image``, scanned in row chunks to bound memory.

    The scan stops once more than three values are found (background, tissue, ignore):
    the image is refused then, and the message shows those found.
    """
    found: set = set()
    for r in range(0, image.shape[0], rows_per_chunk):
        chunk = np.asarray(image[r : r + rows_per_chunk])
        if chunk.dtype == np.uint8 or chunk.dtype == np.bool_:
            counts = np.bincount(chunk.reshape(-1).view(np.uint8), minlength=256)
            found.update(int(v) for v in np.flatnonzero(counts))
        else:
            found.update(v.item() for v in np.unique(chunk))
        if len(found) > 3:
            break
    return found


class MaskImage(BaseMaskSource):
    """A mask drawn elsewhere and saved as an image (PNG or TIFF) of exactly the region's size.

    The image covers the requested region (before fitting): with ``fit="crop"`` its right
    and bottom are dropped with the region; with ``fit="pad"`` the padding is mask 0.
    Values 0/1 or 0/255 are accepted (0 background, the other tissue). ``ignore_value``
    names one more value of the image whose pixels become ignore (255) in the prepared
    mask: 2 in a 0/1/2 image, 128 in a 0/128/255 one.
    """

    kind = "image"

    def __init__(self, path: str | Path, *, ignore_value: int | None = None) -> None:
        if ignore_value is not None and (isinstance(ignore_value, bool) or not isinstance(ignore_value, (int, np.integer))
                                         or ignore_value <= 0):
            raise ConfigError(
                f"ignore_value must be a positive integer value of the mask image (0 is background), "
                f"got {ignore_value!r}"
            )
        self.path = Path(path)
        if not self.path.is_file():
            raise MaskError(f"mask image {self.path} does not exist; check the path")
        self.ignore_value = None if ignore_value is None else int(ignore_value)
        self.produces_ignore = self.ignore_value is not None
        self._image: np.ndarray | None = None
        self._region: FittedRegion | None = None
        self._scale = 1
        self._sha256: str | None = None

    def attach(self, reader: SlideReader, region: FittedRegion, workdir: Path) -> None:
        image = _load_mask_image(self.path)
        h, w = image.shape
        rw, rh = region.requested_size
        if (w, h) != (rw, rh):
            raise MaskError(
                f"mask image {self.path.name} is {w}x{h} (w x h) but the region is {rw}x{rh} at level "
                f"{region.level}; the mask must cover exactly the requested region at that level"
            )
        values = _mask_values(image)
        labels = values - {self.ignore_value}
        if labels <= {0, 1}:
            self._scale = 1
        elif labels <= {0, 255}:
            self._scale = 255
        else:
            shown = ", ".join(str(v) for v in sorted(values)[:10])
            if self.ignore_value is None:
                allowed = "only 0/1 or only 0/255"
            else:
                allowed = f"only 0/1 or only 0/255, and the ignore value {self.ignore_value}"
            raise MaskError(f"mask image {self.path.name} has values {{{shown}}}; a mask must hold {allowed}")
        self._image = image
        self._region = region

    def read(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        if self._image is None or self._region is None:
            raise MaskError("MaskImage.read called before attach(); prepare_region attaches it")
        region = self._region
        if level != region.level:
            raise MaskError(f"mask image {self.path.name} is for level {region.level}, not level {level}")
        col = int(round((int(location[0]) - region.x) / region.downsample))
        row = int(round((int(location[1]) - region.y) / region.downsample))
        w, h = (int(v) for v in size)
        if col < 0 or row < 0 or col + w > self._image.shape[1] or row + h > self._image.shape[0]:
            raise MaskError(f"mask image {self.path.name}: tile at ({col}, {row}) of {w}x{h} is outside it")
        tile = np.asarray(self._image[row : row + h, col : col + w])
        labels = (tile != 0).astype(np.uint8)
        if self.ignore_value is not None:
            labels[tile == self.ignore_value] = IGNORE
        return labels

    def describe(self) -> dict:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        desc = {"kind": self.kind, "path": str(self.path), "file": self.path.name, "sha256": self._sha256}
        if self._image is not None:
            desc["values"] = "0/255" if self._scale == 255 else "0/1"
        desc["ignore_value"] = self.ignore_value
        return desc

    def close(self) -> None:
        self._image = None
