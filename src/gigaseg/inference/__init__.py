"""Whole-slide inference: load a trained model, predict a slide tile by tile, write mask, outlines, overlay and summary."""

from gigaseg.inference.estimate import ModelTissueEstimate
from gigaseg.inference.models import LoadedModel, ModelError, load_model, read_mlmodel, save_keras
from gigaseg.inference.predict import (
    PredictOptions,
    choose_level,
    predict_level_blocks,
    predict_slide,
    write_summary,
)
from gigaseg.inference.tiff import write_mask_tiff
from gigaseg.inference.windows import PaddedLevel

__all__ = [
    "LoadedModel",
    "ModelError",
    "ModelTissueEstimate",
    "PaddedLevel",
    "PredictOptions",
    "choose_level",
    "load_model",
    "predict_level_blocks",
    "predict_slide",
    "read_mlmodel",
    "save_keras",
    "write_mask_tiff",
    "write_summary",
]
