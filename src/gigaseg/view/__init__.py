"""A local web viewer of predictions: a cohort table and each slide at every zoom with its mask and outlines.

``gigaseg-view`` (``gigaseg.cli.view``) serves it; nothing here imports TensorFlow.
"""

from gigaseg.view.predictions import Prediction, find_predictions, load_prediction
from gigaseg.view.server import Viewer, ViewerServer

__all__ = ["Prediction", "Viewer", "ViewerServer", "find_predictions", "load_prediction"]
