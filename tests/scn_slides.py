"""Small Leica SCN slides written in tmp_path: the format whose scanned area OpenSlide places inside a larger
collection, so it reports ``openslide.bounds-x`` and ``openslide.bounds-y`` (as it does for MRXS).

The file is a tiled BigTIFF whose first ImageDescription is Leica's XML (namespace
``http://www.leica-microsystems.com/scn/2010/10/01``). Sizes and offsets in the XML are in
nanometres: a collection (the glass) of ``canvas`` pixels holds one brightfield main image of
``image``'s size at ``offset``. OpenSlide's level 0 is the collection; outside the main image
it reads transparent (white in ``OpenSlideReader``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

SCN_NAMESPACE = "http://www.leica-microsystems.com/scn/2010/10/01"


def write_scn_slide(path: Path, image: np.ndarray, *, offset: tuple[int, int], canvas: tuple[int, int],
                    mpp: float = 0.5, tile: int = 64) -> Path:
    """Write ``image`` (H x W x 3 uint8) as a two-level Leica SCN slide whose main image sits at ``offset`` (x, y) px."""
    height, width = image.shape[:2]
    nm = round(mpp * 1000)
    half = np.ascontiguousarray(image[::2, ::2])
    levels = [image, half]
    dimensions = "".join(
        f'<dimension sizeX="{level.shape[1]}" sizeY="{level.shape[0]}" ifd="{i}"/>' for i, level in enumerate(levels)
    )
    xml = (
        f'<?xml version="1.0" encoding="utf-8"?>'
        f'<scn xmlns="{SCN_NAMESPACE}">'
        f'<collection name="test" uuid="00000000-0000-0000-0000-000000000000" '
        f'sizeX="{canvas[0] * nm}" sizeY="{canvas[1] * nm}">'
        f'<barcode>dGVzdA==</barcode>'
        f'<image name="main" uuid="00000000-0000-0000-0000-000000000001">'
        f'<creationDate>2024-01-01T00:00:00.00Z</creationDate>'
        f'<device model="Leica SCN400" version="1.0"/>'
        f'<pixels sizeX="{width}" sizeY="{height}">{dimensions}</pixels>'
        f'<view sizeX="{width * nm}" sizeY="{height * nm}" offsetX="{offset[0] * nm}" offsetY="{offset[1] * nm}" '
        f'spacingZ="0"/>'
        f'<scanSettings><objectiveSettings><objective>20</objective></objectiveSettings>'
        f'<illuminationSettings><numericalAperture>0.7</numericalAperture>'
        f'<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings>'
        f'</image></collection></scn>'
    )
    resolution = 1e4 / (mpp * 2 ** np.arange(len(levels)))  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, level in enumerate(levels):
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib",
                      resolution=(resolution[i], resolution[i]), resolutionunit="CENTIMETER",
                      description=xml if i == 0 else None, metadata=None)
    return path
