"""The training tables for dvc plots: a row per step, a row per validation, and every number passed on."""

from __future__ import annotations

import csv
from pathlib import Path

from gigaseg.cli.history import HistoryTables


class Recorder:
    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict]] = []
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((path, artifact_path))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_steps_and_validations_go_to_their_own_tables_and_on_to_the_run(tmp_path):
    inner = Recorder()
    tables = HistoryTables(tmp_path / "history", inner)
    tables.log_metrics({"loss": 0.5, "dice": 0.25}, step=1)
    assert [r["step"] for r in _rows(tmp_path / "history" / "train.csv")] == ["1"]
    assert not (tmp_path / "history" / "val.csv").exists()
    tables.log_metrics({"loss": 0.25, "dice": 0.5, "val_dice": 0.75, "val_dice/s4/whole": 0.5}, step=2)
    tables.log_artifact(tmp_path / "last.npz", "checkpoints")

    train = _rows(tmp_path / "history" / "train.csv")
    assert train == [{"step": "1", "loss": "0.5", "dice": "0.25"}, {"step": "2", "loss": "0.25", "dice": "0.5"}]
    assert _rows(tmp_path / "history" / "val.csv") == [{"step": "2", "val_dice": "0.75", "val_dice/s4/whole": "0.5"}]
    assert inner.metrics[1] == (2, {"loss": 0.25, "dice": 0.5, "val_dice": 0.75, "val_dice/s4/whole": 0.5})
    assert inner.artifacts == [(tmp_path / "last.npz", "checkpoints")]


def test_a_key_first_seen_later_becomes_a_column(tmp_path):
    tables = HistoryTables(tmp_path)
    tables.log_metrics({"loss": 1.0}, step=1)
    tables.log_metrics({"loss": 0.5, "peak_rss_mb": 100.0}, step=2)
    rows = _rows(tmp_path / "train.csv")
    assert rows == [{"step": "1", "loss": "1.0", "peak_rss_mb": ""}, {"step": "2", "loss": "0.5", "peak_rss_mb": "100.0"}]
