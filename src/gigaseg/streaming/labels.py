"""A region's training labels checked and counted before any tile is read: the ``n`` of the region losses.

Prepared masks hold 0 (background), 1 (tissue) and :data:`~gigaseg.evaluation.IGNORE_LABEL`
(a pixel that counts in no loss term and no metric). BCE is a mean over the labelled pixels,
and its one pass needs ``1 / n`` before the first tile, so ``n`` comes from one pass over the
mask here, which also refuses any other value while nothing has been computed yet.
"""

from __future__ import annotations

import numba
import numpy as np

from gigaseg.data.labels import BACKGROUND, TISSUE
from gigaseg.errors import MaskError
from gigaseg.evaluation import IGNORE_LABEL
from gigaseg.streaming.reader import release_rows

#: Mask values a training step accepts, and what they mean.
LABELS = {BACKGROUND: "background", TISSUE: "tissue", IGNORE_LABEL: "ignore"}

# Rows are counted in bands of about this many pixels: large enough for the compiled loop,
# small enough that a memory-mapped mask never sits in the resident set whole (see reader.py).
_BAND_PIXELS = 1 << 22


# Counting in uint8 lanes (at most 255 additions each before they are added up) lets the loop
# run on whole vectors of bytes: an 8192x8192 mask took 10 ms, against 80 with int32 counts
# per row and 70 for numpy's count_nonzero(mask <= 1) alone. Slicing the row per round of
# lanes, rather than a stepped range, is what let the compiler vectorise it.
_LANES = 64
_LANE_ROUNDS = 255


@numba.njit(nogil=True, cache=True)
def _band_counts(band):  # pragma: no cover - compiled
    """(labelled, ignored) pixels of a 2-D uint8 band; the rest hold values no prepared mask has."""
    labelled = 0
    ignored = 0
    lanes_labelled = np.zeros(_LANES, np.uint8)
    lanes_ignored = np.zeros(_LANES, np.uint8)
    for i in range(band.shape[0]):
        row = band[i]
        rounds = row.shape[0] // _LANES
        for start in range(0, rounds, _LANE_ROUNDS):
            for j in range(start, min(rounds, start + _LANE_ROUNDS)):
                lanes = row[j * _LANES : (j + 1) * _LANES]
                for t in range(_LANES):
                    value = lanes[t]
                    lanes_labelled[t] += value <= 1  # 0 background or 1 tissue
                    lanes_ignored[t] += value == IGNORE_LABEL
            for t in range(_LANES):
                labelled += lanes_labelled[t]
                ignored += lanes_ignored[t]
            lanes_labelled[:] = 0
            lanes_ignored[:] = 0
        for j in range(rounds * _LANES, row.shape[0]):
            labelled += row[j] <= 1
            ignored += row[j] == IGNORE_LABEL
    return labelled, ignored


def _counts(band: np.ndarray) -> tuple[int, int]:
    """(labelled, ignored) pixels of a band of any dtype."""
    if band.dtype == np.uint8:
        labelled, ignored = _band_counts(band)
        return int(labelled), int(ignored)
    labelled = np.count_nonzero(band == BACKGROUND) + np.count_nonzero(band == TISSUE)
    return int(labelled), int(np.count_nonzero(band == IGNORE_LABEL))


def count_labelled(mask: np.ndarray) -> int:
    """The number of labelled pixels (0 or 1) of a training mask; MaskError for any other value but the ignore label, or for no labelled pixel.

    A bool mask is all labelled. Memory-mapped masks are read band by band and their pages
    released, as tile windows are.
    """
    if mask.dtype == np.bool_:
        return int(mask.size)
    if mask.ndim != 2:
        raise MaskError(f"a mask must be 2-D (height x width), got shape {tuple(mask.shape)}")
    rows = max(1, _BAND_PIXELS // max(1, mask.shape[1]))
    labelled = 0
    others: set = set()
    for top in range(0, mask.shape[0], rows):
        band = np.asarray(mask[top : top + rows])
        band_labelled, band_ignored = _counts(band)
        labelled += band_labelled
        if band_labelled + band_ignored != band.size and len(others) < 10:
            found = band[~np.isin(band, list(LABELS))]
            others.update(v.item() for v in np.unique(found)[: 10 - len(others)])
        release_rows(mask, top, top + rows)
    allowed = ", ".join(f"{value} ({meaning})" for value, meaning in LABELS.items())
    if others:
        shown = ", ".join(str(v) for v in sorted(others))
        raise MaskError(f"the mask has value(s) {shown}; a training mask may hold only {allowed}")
    if labelled == 0 and mask.size:
        raise MaskError(
            f"every pixel of the mask is {IGNORE_LABEL} (ignore): a loss needs some labelled pixel, "
            "0 (background) or 1 (tissue); label part of the region or leave it out of training"
        )
    return labelled
