"""Pictures of a run: loss and Dice curves, and a prediction overlaid on its region."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from gigaseg.atomic import atomic_path


def plot_curves(history: Sequence[dict], path: Path) -> Path:
    """Plot loss and Dice per optimizer step, with validation Dice where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "loss" in h]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [h["loss"] for h in history if "loss" in h], label="train loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_dice.plot(steps, [h["dice"] for h in history if "loss" in h], label="train Dice")
    val = [(h["step"], h["val_dice"]) for h in history if "val_dice" in h]
    if val:
        ax_dice.plot(*zip(*val), "o-", label="validation Dice")
    ax_dice.set_xlabel("optimizer step")
    ax_dice.set_ylabel("Dice (threshold 0.5)")
    ax_dice.set_ylim(0, 1.02)
    ax_dice.grid(alpha=0.3)
    ax_dice.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)


def preview_step(shape: Sequence[int], max_side: int = 2048) -> int:
    """The stride of a region's downsampled picture: every ``step``-th pixel, at most ``max_side`` a side."""
    return max(1, int(np.ceil(max(shape[0], shape[1]) / max_side)))


class ProbabilityPreview:
    """Every :func:`preview_step`-th probability of a region, filled a tile core at a time.

    What the overlay picture of a validation region needs, without the region's whole
    probabilities in memory (4 GB for 16000x64000).
    """

    def __init__(self, shape: Sequence[int], max_side: int = 2048) -> None:
        self.step = step = preview_step(shape, max_side)
        self.array = np.zeros((-(-int(shape[0]) // step), -(-int(shape[1]) // step)), np.float32)

    def add(self, core: tuple[int, int, int, int], probability: np.ndarray) -> None:
        """Keep the pixels of ``probability`` (the rectangle ``core`` = top, left, bottom, right) on the stride."""
        top, left, bottom, right = core
        step = self.step
        first_row, first_col = -(-top // step) * step, -(-left // step) * step
        if first_row >= bottom or first_col >= right:
            return
        kept = probability[first_row - top :: step, first_col - left :: step]
        i, j = first_row // step, first_col // step
        self.array[i : i + kept.shape[0], j : j + kept.shape[1]] = kept


def overlay_png(
    image: np.ndarray,
    probability: np.ndarray,
    truth: np.ndarray | None,
    path: Path,
    *,
    max_side: int = 2048,
    threshold: float = 0.5,
) -> Path:
    """Save a downsampled view of ``image`` with predicted tissue tinted green and misses red.

    ``probability`` is the region's probabilities, or their :class:`ProbabilityPreview`
    (already on the picture's stride). Reads the (possibly memory-mapped) arrays with a
    stride, so the full region is never loaded.
    """
    from PIL import Image

    step = preview_step(image.shape[:2], max_side)
    view = np.asarray(image[::step, ::step], dtype=np.float32)
    if isinstance(probability, ProbabilityPreview):
        if probability.step != step:
            raise ValueError(f"the preview has stride {probability.step}, the picture {step}")
        predicted = probability.array >= threshold
    else:
        predicted = np.asarray(probability[::step, ::step]) >= threshold
    out = view.copy()
    green = np.array([40, 200, 60], np.float32)
    out[predicted] = 0.55 * out[predicted] + 0.45 * green
    if truth is not None:
        missed = (np.asarray(truth[::step, ::step]) > 0) & ~predicted
        red = np.array([230, 30, 30], np.float32)
        out[missed] = 0.4 * out[missed] + 0.6 * red
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(tmp, format="PNG")
    return Path(path)
