"""Agreement between a predicted and a reference tissue mask, overall and per tissue piece, chunk by chunk.

Two kinds of masks meet here. Prepared training masks (the ``mask`` of a prepared region)
hold labels: 0 background, 1 tissue, :data:`IGNORE_LABEL` for pixels that count in no loss
term and no metric; :func:`count`, which scores validation regions, reads them so. Mask
files given as references (0/1 or 0/255 images, read by :mod:`gigaseg.evaluation_inputs`
into :class:`TissueRows`) are tissue masks, where 255 is tissue: :func:`evaluate_masks`
keeps reading every nonzero value of an array as tissue.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from gigaseg.data.labels import IGNORE
from gigaseg.errors import MaskError

#: The label of unlabelled pixels in prepared masks (0 background, 1 tissue), defined with
#: them in :mod:`gigaseg.data.labels`: they count in no loss term and no metric. Only
#: prepared masks use it; in 0/255 mask images 255 is tissue.
IGNORE_LABEL = IGNORE


@dataclass(frozen=True)
class Counts:
    """Pixel counts of a binary comparison; ``total`` counts the pixels compared (not the ignored ones)."""

    true_positive: int
    predicted: int
    reference: int
    total: int

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def scores(self) -> dict[str, float]:
        """Dice, IoU, precision and recall; each is 1.0 when both masks are empty."""
        tp, p, r = self.true_positive, self.predicted, self.reference
        union = p + r - tp
        return {
            "dice": 1.0 if p + r == 0 else 2.0 * tp / (p + r),
            "iou": 1.0 if union == 0 else tp / union,
            "precision": (1.0 if r == 0 else 0.0) if p == 0 else tp / p,
            "recall": (1.0 if p == 0 else 0.0) if r == 0 else tp / r,
        }


def count(
    prediction: np.ndarray,
    reference: np.ndarray,
    *,
    threshold: float = 0.5,
    rows: int = 2048,
    ignore: int | None = IGNORE_LABEL,
) -> Counts:
    """Count agreement of ``prediction >= threshold`` with ``reference > 0``, ``rows`` rows at a time.

    ``reference`` is a prepared mask: pixels labelled ``ignore`` count nowhere (``total`` is
    the number of the others), the rest is tissue where nonzero. The default suits the
    masks this is called with (validation regions); a 0/255 tissue image needs
    ``ignore=None``, which counts every nonzero value as tissue, as :func:`evaluate_masks`
    does. The ignore value is a parameter rather than a guess from the values, because a
    0/255 tissue mask and a prepared mask of background and ignored pixels hold the same
    values. MaskError if every pixel is ignored: no metric means anything then.
    """
    if prediction.shape[:2] != reference.shape[:2]:
        raise MaskError(
            f"prediction is {prediction.shape[1]}x{prediction.shape[0]} (w x h) but the reference is "
            f"{reference.shape[1]}x{reference.shape[0]}; compare masks of the same region and level"
        )
    bands = ((slice(top, top + rows), slice(None)) for top in range(0, prediction.shape[0], rows))
    return _count_pieces(((key, prediction[key]) for key in bands), reference, threshold=threshold, ignore=ignore)


def count_cores(
    cores: Iterable[tuple[tuple[int, int, int, int], np.ndarray]],
    reference: np.ndarray,
    *,
    threshold: float = 0.5,
    ignore: int | None = IGNORE_LABEL,
) -> Counts:
    """:func:`count` of a region's probabilities that come a rectangle at a time, never whole.

    ``cores`` yields ``((top, left, bottom, right), probabilities)`` that cover the region
    once (as :meth:`gigaseg.streaming.TiledEngine.predict_cores` does); each is compared with
    the same rectangle of ``reference``.
    """
    pieces = (((slice(top, bottom), slice(left, right)), core) for (top, left, bottom, right), core in cores)
    return _count_pieces(pieces, reference, threshold=threshold, ignore=ignore)


def _count_pieces(pieces, reference: np.ndarray, *, threshold: float, ignore: int | None) -> Counts:
    total, size = Counts(0, 0, 0, 0), 0
    for key, probability in pieces:
        pred = np.asarray(probability) >= threshold
        labels = np.asarray(reference[key])
        total = total + band_counts(pred, labels > 0, None if ignore is None else labels == ignore)
        size += pred.size
    if total.total == 0 and size:
        raise MaskError(f"every pixel of the reference is {ignore} (ignore): there is nothing to score; check the mask")
    return total


def band_counts(pred: np.ndarray, ref: np.ndarray, ignored: np.ndarray | None = None) -> Counts:
    """Counts of two bool arrays of the same shape (True = tissue), leaving out the pixels ``ignored`` marks."""
    if ignored is None or not ignored.any():
        return Counts(int(np.count_nonzero(pred & ref)), int(np.count_nonzero(pred)), int(np.count_nonzero(ref)), int(pred.size))
    pred, ref = pred & ~ignored, ref & ~ignored
    labelled = int(pred.size - np.count_nonzero(ignored))
    return Counts(int(np.count_nonzero(pred & ref)), int(np.count_nonzero(pred)), int(np.count_nonzero(ref)), labelled)


# ------------------------------------------------------------------ whole masks and pieces


@runtime_checkable
class TissueRows(Protocol):
    """A tissue mask read a band of rows at a time (huge masks never sit in memory whole)."""

    shape: tuple[int, int]  # (h, w)

    def rows(self, top: int, bottom: int) -> np.ndarray:
        """Rows ``top`` to ``bottom`` (exclusive) as an h x w bool array, True = tissue."""


class ArrayTissue:
    """An in-memory or memory-mapped array as tissue: ``>= threshold``, or ``> 0`` without one."""

    def __init__(self, array: np.ndarray, threshold: float | None = None) -> None:
        if array.ndim != 2:
            raise MaskError(f"a mask must be 2-D (h x w), got shape {array.shape}")
        self.array = array
        self.threshold = threshold
        self.shape = (int(array.shape[0]), int(array.shape[1]))

    def rows(self, top: int, bottom: int) -> np.ndarray:
        band = np.asarray(self.array[top:bottom])
        return band > 0 if self.threshold is None else band >= self.threshold


@dataclass(frozen=True)
class Piece:
    """Agreement within one tissue piece; bbox is (x0, y0, x1, y1) in level-0 pixels, counts.total its pixels."""

    id: int
    bbox: tuple[float, float, float, float]
    counts: Counts

    def row(self, mpp: float | None = None) -> dict[str, Any]:
        """The piece as a flat record (areas in mask pixels, and in mm² when ``mpp`` is known)."""
        c = self.counts
        record: dict[str, Any] = {"id": self.id}
        record.update(zip(("x0", "y0", "x1", "y1"), self.bbox))
        record.update(reference_px=c.reference, predicted_px=c.predicted, true_positive_px=c.true_positive)
        if mpp:
            record.update(reference_mm2=c.reference * mpp**2 / 1e6, predicted_mm2=c.predicted * mpp**2 / 1e6)
        record.update(c.scores())
        return record


@dataclass(frozen=True)
class Evaluation:
    """Overall and per-piece agreement of a predicted with a reference mask."""

    counts: Counts
    pieces: list[Piece]
    piece_block: int  # pieces were found on blocks of piece_block x piece_block mask pixels
    downsample: float
    mpp: float | None = None

    def scores(self) -> dict[str, float]:
        return self.counts.scores()

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": {**self.scores(), **asdict(self.counts)},
            "pieces": [p.row(self.mpp) for p in self.pieces],
            "piece_block": self.piece_block,
            "downsample": self.downsample,
            "mpp": self.mpp,
        }


def _block_sums(band: np.ndarray, block: int, width: int, dtype: np.dtype) -> np.ndarray:
    """Sum of a bool band over block x block squares (the band is padded with False)."""
    if block == 1:
        return band.astype(dtype)
    h = -(-band.shape[0] // block) * block
    padded = np.zeros((h, width * block), dtype=np.uint8)
    padded[: band.shape[0], : band.shape[1]] = band
    return padded.reshape(h // block, block, width, block).sum(axis=(1, 3), dtype=dtype)


def evaluate_masks(
    prediction: np.ndarray | TissueRows,
    reference: np.ndarray | TissueRows,
    *,
    threshold: float = 0.5,
    downsample: float = 1.0,
    mpp: float | None = None,
    rows: int = 2048,
    max_piece_pixels: int = 2**24,
    progress: bool = False,
) -> Evaluation:
    """Dice, IoU, precision and recall overall and per tissue piece, reading ``rows`` rows at a time.

    Arrays count as tissue where ``prediction >= threshold`` and ``reference > 0`` (as
    ``count`` with ``ignore=None``: a reference here is a tissue mask, 255 is tissue). A piece is an 8-connected component of the union of predicted and reference
    tissue, so false-positive blobs are pieces too. Pieces are found on blocks of b x b mask
    pixels, b the smallest with at most ``max_piece_pixels`` blocks (b = 1, exact pixels, up
    to 16.8 Mpx by default); a block belongs to the union when any of its pixels does, and
    every piece's counts are still exact pixel counts. ``downsample`` (level-0 pixels per
    mask pixel) scales the bounding boxes; ``mpp`` (microns per mask pixel) adds areas in mm².
    """
    pred = prediction if isinstance(prediction, TissueRows) else ArrayTissue(prediction, threshold)
    ref = reference if isinstance(reference, TissueRows) else ArrayTissue(reference)
    if pred.shape != ref.shape:
        (ph, pw), (rh, rw) = pred.shape, ref.shape
        raise MaskError(
            f"prediction is {pw}x{ph} (w x h) but the reference is {rw}x{rh}; "
            "compare masks of the same region and level"
        )
    h, w = pred.shape
    block = max(1, math.ceil(math.sqrt(h * w / max(1, int(max_piece_pixels)))))
    bh, bw = -(-h // block), -(-w // block)
    dtype = np.dtype(np.uint8 if block * block < 256 else np.uint16 if block * block < 65536 else np.uint32)
    sums = {k: np.zeros((bh, bw), dtype) for k in ("tp", "p", "r")}
    step = max(block, int(rows) // block * block)
    total = Counts(0, 0, 0, 0)
    for top in tqdm(range(0, h, step), desc="evaluate", unit="band", disable=not progress):
        bottom = min(h, top + step)
        p, r = pred.rows(top, bottom), ref.rows(top, bottom)
        if p.shape != (bottom - top, w) or r.shape != (bottom - top, w):
            raise MaskError(f"a mask reader returned rows of shape {p.shape} / {r.shape}, expected {(bottom - top, w)}")
        total = total + band_counts(p, r)
        tp = p & r
        b0, b1 = top // block, -(-bottom // block)
        for key, band in (("tp", tp), ("p", p), ("r", r)):
            sums[key][b0:b1] = _block_sums(band, block, bw, dtype)
    return Evaluation(total, _pieces(sums, block, h, w, float(downsample)), block, float(downsample), mpp)


def _pieces(sums: dict[str, np.ndarray], block: int, h: int, w: int, downsample: float) -> list[Piece]:
    """Per-piece counts from per-block counts: label the union of blocks, add up by label."""
    labels, n = ndimage.label((sums["p"] > 0) | (sums["r"] > 0), structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    by_label = {k: np.zeros(n + 1, dtype=np.int64) for k in sums}
    step = max(1, 2**20 // labels.shape[1])  # about a million blocks at a time bounds the temporaries
    for top in range(0, labels.shape[0], step):
        flat = labels[top : top + step].ravel()
        for k, v in sums.items():
            by_label[k] += np.bincount(flat, weights=v[top : top + step].ravel(), minlength=n + 1).astype(np.int64)
    pieces = []
    for i, found in enumerate(ndimage.find_objects(labels), start=1):
        rows, cols = found
        bbox = (
            cols.start * block * downsample,
            rows.start * block * downsample,
            min(w, cols.stop * block) * downsample,
            min(h, rows.stop * block) * downsample,
        )
        area = (min(h, rows.stop * block) - rows.start * block) * (min(w, cols.stop * block) - cols.start * block)
        counts = Counts(int(by_label["tp"][i]), int(by_label["p"][i]), int(by_label["r"][i]), int(area))
        pieces.append(Piece(i, bbox, counts))
    return pieces
