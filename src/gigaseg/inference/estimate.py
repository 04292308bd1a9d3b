"""A trained model's tissue as the low-resolution estimate ``auto`` regions are chosen on.

The model predicts the whole slide at the resolution it was trained at (its recorded mpp,
else its level), tile by tile as ``gigaseg-predict`` does; the tissue mask (probability at or
above the model's threshold) is sampled every ``stride`` pixels into a view of at most
``max_side`` pixels a side, as the Otsu estimate samples the slide's pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

import numpy as np

from gigaseg.inference.models import LoadedModel
from gigaseg.inference.predict import choose_level, predict_level_blocks
from gigaseg.options import DEFAULT_PAD_VALUE, PredictOptions
from gigaseg.slides.base import SlideReader

log = logging.getLogger(__name__)


class ModelTissueEstimate:
    """Callable on a :class:`SlideReader`: (bool tissue view, its downsample from level 0).

    ``name`` (the model's URI) is only for the log. ``identity`` digests what the estimate
    depends on (weights, threshold, resolution, view size), so that a saved estimate can be
    reused while none of them changes. The tiled engine is built on the first slide and
    reused for the others.
    """

    def __init__(self, loaded: LoadedModel, name: str, *, max_side: int | None = None,
                 tile_size: int = PredictOptions.tile_size, progress: bool = False) -> None:
        from gigaseg.data.region_kinds import VIEW_SIZE

        self.loaded = loaded
        self.name = name
        self.max_side = int(max_side or VIEW_SIZE)
        self.tile_size = int(tile_size)
        self.progress = progress
        self._engine = None
        digest = hashlib.sha256(json.dumps(
            [loaded.threshold, loaded.level, loaded.mpp, self.max_side, loaded.model.to_json()]).encode())
        for weights in loaded.model.get_weights():
            digest.update(np.ascontiguousarray(weights).tobytes())
        self.identity = digest.hexdigest()

    def _tiled(self):
        if self._engine is None:
            from gigaseg.streaming import TiledEngine

            self._engine = TiledEngine(self.loaded.model, tile_size=self.tile_size,
                                       threads=max(1, (os.cpu_count() or 1) // PredictOptions.workers))
        return self._engine

    def __call__(self, reader: SlideReader) -> tuple[np.ndarray, float]:
        level = choose_level(reader, level=None, mpp=None, model_level=self.loaded.level, model_mpp=self.loaded.mpp)
        width, height = reader.level_dimensions[level]
        stride = max(1, math.ceil(max(width, height) / self.max_side))
        view = np.zeros((math.ceil(height / stride), math.ceil(width / stride)), dtype=bool)
        threshold = np.float32(self.loaded.threshold)
        log.info("%s: estimating tissue with %s at level %d (%dx%d)", reader.name, self.name, level, width, height)
        for top, left, probability in predict_level_blocks(
            self._tiled(), reader, level, pad_value=DEFAULT_PAD_VALUE, workers=PredictOptions.workers,
            progress=self.progress,
        ):
            # The block's pixels on the view's grid (multiples of stride in level coordinates).
            r0, c0 = (-top) % stride, (-left) % stride
            sampled = probability[r0::stride, c0::stride] >= threshold
            row, col = (top + r0) // stride, (left + c0) // stride
            view[row:row + sampled.shape[0], col:col + sampled.shape[1]] = sampled
        return view, float(reader.level_downsamples[level]) * stride
