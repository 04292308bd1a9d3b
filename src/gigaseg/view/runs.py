"""A predict run's MLflow artifacts as a prediction folder the viewer can show, with the evaluation logged for it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from gigaseg.errors import ConfigError
from gigaseg.view.predictions import EVALUATION_FILE, SUMMARY_FILE, Prediction, load_prediction

log = logging.getLogger(__name__)

#: What gigaseg-predict logs (the mask only with log_mask=true).
ARTIFACTS = (SUMMARY_FILE, "outlines.geojson", "overlay.png", "mask.tiff")
NO_MASK = ("the mask was not logged with this run (gigaseg-predict logs it with log_mask=true): "
           "the slide is shown with its outlines only")


def prediction_from_run(run_id: str, tracking_uri: str, into: Path) -> Prediction:
    """Download predict run ``run_id``'s artifacts into ``into`` and load them as a prediction.

    The newest ``gigaseg-evaluate`` run of the same experiment tagged with this run
    (``gigaseg.prediction_run_id``) gives the Dice and the reference, when there is one.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from gigaseg.tracking import check_tracking_store

    check_tracking_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"run_id={run_id}: no such run in {tracking_uri} ({first}); "
                          "give the id of a gigaseg-predict run (its page in the MLflow UI shows it)") from exc
    command = run.data.tags.get("gigaseg.command")
    if command != "predict":
        what = f"a gigaseg-{command} run" if command else "not a gigaseg run"
        raise ConfigError(f"run_id={run_id} is {what}; give the id of a gigaseg-predict run")
    logged = {artifact.path for artifact in client.list_artifacts(run_id)}
    if SUMMARY_FILE not in logged:
        raise ConfigError(f"run_id={run_id} logged no {SUMMARY_FILE}; it did not finish its prediction")
    into.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        if name in logged:
            client.download_artifacts(run_id, name, str(into))
    evaluations = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`gigaseg.prediction_run_id` = '{run_id}'",
        order_by=["attributes.start_time DESC"], max_results=5)
    for evaluation in evaluations:
        if EVALUATION_FILE in {a.path for a in client.list_artifacts(evaluation.info.run_id)}:
            client.download_artifacts(evaluation.info.run_id, EVALUATION_FILE, str(into))
            log.info("Dice from evaluate run %s", evaluation.info.run_id)
            break
    prediction = load_prediction(into, 0, name=run.info.run_name or None)
    if prediction is None:
        raise ConfigError(f"run_id={run_id}: its {SUMMARY_FILE} is not one gigaseg-predict wrote")
    if "mask.tiff" not in logged:
        notes = [NO_MASK, *(n for n in prediction.notes if not n.startswith("no predicted mask"))]
        prediction = dataclasses.replace(prediction, notes=tuple(notes))
    for note in prediction.notes:
        log.warning("%s: %s", prediction.name, note)
    return prediction
