"""A training run's numbers as tables ``dvc plots`` draws: a CSV row per step and one per validation."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from gigaseg.atomic import atomic_path
from gigaseg.training import RunLogger

#: The tables' file names under the history folder.
TRAIN_TABLE = "train.csv"
VAL_TABLE = "val.csv"


class HistoryTables:
    """A :class:`~gigaseg.training.RunLogger` that keeps every step's metrics in ``train.csv`` and
    every validation's (the ``val_*`` metrics) in ``val.csv``, both keyed by ``step``, and hands
    everything on to ``inner`` (the MLflow run).

    Each table is rewritten whole (atomically) after every step, so it can be plotted while the
    run goes on and is never left half written; a new key adds a column. A resumed run's tables
    start at the step it resumes from (the MLflow run holds the earlier ones).
    """

    def __init__(self, folder: Path, inner: RunLogger | None = None) -> None:
        self.folder = Path(folder)
        self.inner = inner
        self.rows: dict[str, list[dict[str, Any]]] = {TRAIN_TABLE: [], VAL_TABLE: []}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        validation = {k: v for k, v in metrics.items() if k.startswith("val_")}
        self._append(TRAIN_TABLE, {"step": step, **{k: v for k, v in metrics.items() if k not in validation}})
        if validation:
            self._append(VAL_TABLE, {"step": step, **validation})
        if self.inner is not None:
            self.inner.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.inner is not None:
            self.inner.log_artifact(path, artifact_path)

    def _append(self, name: str, row: dict[str, Any]) -> None:
        rows = self.rows[name]
        rows.append(row)
        columns = list(dict.fromkeys(key for r in rows for key in r))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / name, suffix=".csv") as tmp:
            tmp.write_text(text.getvalue())
