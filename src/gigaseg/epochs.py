"""Which training regions each optimizer step of a cohort run visits.

An epoch visits every training region once, in an order shuffled from the run's seed and
the epoch number; each optimizer step takes the next ``accumulate`` regions of that order
(the last step of an epoch may take fewer). The order depends on nothing else, so a run
resumed at any step visits exactly the regions an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def steps_per_epoch(regions: int, accumulate: int) -> int:
    """Optimizer steps in one epoch over ``regions`` regions, ``accumulate`` regions per step."""
    return math.ceil(regions / accumulate)


def epoch_order(regions: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of region indices in epoch ``epoch`` (from 0)."""
    # A stable digest, not Python's hash(), which is salted per process.
    key = hashlib.sha256(f"gigaseg-epoch|{int(seed)}|{int(epoch)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(key[:8], "little")).permutation(regions)


def step_regions(step: int, regions: int, accumulate: int, seed: int) -> tuple[int, list[int]]:
    """The epoch (from 0) and the region indices of optimizer step ``step`` (from 0)."""
    per_epoch = steps_per_epoch(regions, accumulate)
    epoch, within = divmod(int(step), per_epoch)
    order = epoch_order(regions, seed, epoch)
    return epoch, [int(i) for i in order[within * accumulate : (within + 1) * accumulate]]
