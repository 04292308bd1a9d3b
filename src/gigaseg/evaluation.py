"""Agreement between a predicted and a reference tissue mask, computed chunk by chunk."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gigaseg.errors import MaskError


@dataclass(frozen=True)
class Counts:
    """Pixel counts of a binary comparison."""

    true_positive: int
    predicted: int
    reference: int
    total: int

    def __add__(self, other: "Counts") -> "Counts":
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


def count(prediction: np.ndarray, reference: np.ndarray, *, threshold: float = 0.5, rows: int = 2048) -> Counts:
    """Count agreement of ``prediction >= threshold`` with ``reference > 0``, ``rows`` rows at a time."""
    if prediction.shape[:2] != reference.shape[:2]:
        raise MaskError(
            f"prediction is {prediction.shape[1]}x{prediction.shape[0]} (w x h) but the reference is "
            f"{reference.shape[1]}x{reference.shape[0]}; compare masks of the same region and level"
        )
    total = Counts(0, 0, 0, 0)
    for top in range(0, prediction.shape[0], rows):
        pred = np.asarray(prediction[top : top + rows]) >= threshold
        ref = np.asarray(reference[top : top + rows]) > 0
        total = total + Counts(
            int(np.count_nonzero(pred & ref)), int(np.count_nonzero(pred)), int(np.count_nonzero(ref)), int(pred.size)
        )
    return total
