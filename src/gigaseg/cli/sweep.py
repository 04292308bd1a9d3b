"""Hydra callback that tracks a multirun as one MLflow parent run with a nested child run per job.

The parent is created when the sweep starts (or, under ``mlflow run``, the run MLflow
created becomes the parent); its id reaches the jobs through a file in the sweep folder and
an environment variable, so it works with the basic launcher (jobs in this process) and with
joblib (jobs in worker processes) alike. Hydra calls ``on_multirun_end`` only when the sweep
succeeds, so the entry point wraps the sweep in ``ending_parent_on_failure``: a sweep that
crashes ends its parent FAILED, one interrupted (Ctrl-C, SIGTERM) KILLED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import gigaseg.cli.common  # noqa: F401  (registers the resolvers the config uses)
from gigaseg.atomic import atomic_path

log = logging.getLogger("gigaseg.sweep")

#: Where the parent run id is kept: a JSON file in the sweep folder, and this variable.
PARENT_FILE = "mlflow_parent_run.json"
PARENT_ENV = "GIGASEG_SWEEP_PARENT_RUN_ID"


#: The sweep parent this process opened and has not ended yet: its callback, else None.
_open: "MlflowSweepCallback | None" = None


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM (a scheduler, `kill`) as an interruption, so the runs it stops end KILLED, not RUNNING.
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def status_for(exc: BaseException) -> str:
    """The MLflow status of a run stopped by ``exc``: KILLED when interrupted, FAILED otherwise.

    The entry points turn Ctrl-C into exit status 130, so that exit counts as an interruption too.
    """
    if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == 130):
        return "KILLED"
    return "FAILED"


@contextlib.contextmanager
def ending_parent_on_failure() -> Iterator[None]:
    """Run a Hydra app; if it ends by an exception while a sweep parent run is open, end that run FAILED or KILLED."""
    try:
        yield
    except BaseException as exc:
        callback = _open
        clean_exit = isinstance(exc, SystemExit) and exc.code in (0, None)
        if callback is not None and not clean_exit:
            callback.end_unfinished(status_for(exc))
        raise


def sweep_info(sweep_dir: str | Path) -> dict[str, Any]:
    """``{"run_id": parent run id or None, "swept": [keys the sweep varies]}`` for ``sweep_dir``."""
    path = Path(sweep_dir) / PARENT_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = {}
    run_id = info.get("run_id") or os.environ.get(PARENT_ENV) or None
    return {"run_id": run_id, "swept": list(info.get("swept") or [])}


def parent_run_id(sweep_dir: str | Path) -> str | None:
    """The parent run id of the sweep writing into ``sweep_dir``, if a sweep callback made one."""
    return sweep_info(sweep_dir)["run_id"]


def sweeper_problem(hydra_cfg: DictConfig) -> str | None:
    """Why the configured sweeper cannot run with the installed packages, in one line; None when it can.

    hydra-optuna-sweeper holds optuna below 3, and optuna 2.10's database storage fails on
    SQLAlchemy 2 (an AssertionError in its schema check, after the sweep has started).
    """
    from importlib.metadata import PackageNotFoundError, version

    storage = hydra_cfg.sweeper.get("storage")
    if not storage or "optuna" not in str(hydra_cfg.sweeper.get("_target_", "")).lower():
        return None
    try:
        optuna, sqlalchemy = version("optuna"), version("sqlalchemy")
    except PackageNotFoundError:
        return None
    if int(optuna.split(".")[0]) >= 3 or int(sqlalchemy.split(".")[0]) < 2:
        return None
    return (f"hydra.sweeper.storage={storage}: optuna {optuna} (the newest the Optuna sweeper plugin allows) cannot "
            f"keep a study in a database with SQLAlchemy {sqlalchemy}, which MLflow needs; leave "
            "hydra.sweeper.storage=null (the sweep's MLflow parent run and optimization_results.yaml keep the trials)")


def sweep_params(hydra_cfg: DictConfig) -> dict[str, str]:
    """What defines a sweep: the command-line overrides, sweeper, launcher and search space."""
    overrides = list(hydra_cfg.overrides.task)
    params = {
        "sweep.overrides": " ".join(overrides) or "(none)",
        "sweep.sweeper": str(hydra_cfg.sweeper.get("_target_", "")).rsplit(".", 1)[-1],
        "sweep.launcher": str(hydra_cfg.launcher.get("_target_", "")).rsplit(".", 1)[-1],
    }
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 (Hydra has already parsed them; this is only for display)
        parsed = []
    for override in parsed:
        if override.is_sweep_override():
            text = override.input_line or ""
            params[f"sweep.params.{override.get_key_element()}"] = text.split("=", 1)[-1]
    search = hydra_cfg.sweeper.get("params")
    if search:
        for key, value in OmegaConf.to_container(search, resolve=True).items():
            params[f"sweep.params.{key}"] = str(value)
    for key in ("direction", "n_trials", "n_jobs"):
        if hydra_cfg.sweeper.get(key) is not None:
            params[f"sweep.{key}"] = str(OmegaConf.select(hydra_cfg.sweeper, key))
    return params


class MlflowSweepCallback(Callback):
    """Open the sweep's parent run at ``on_multirun_start``; summarise and close it at ``on_multirun_end``.

    ``apps``: the Hydra job names (``train``) whose sweeps are tracked; other commands sharing
    the config (prepare) are left alone. ``metric``: the child metric that picks the best job.
    """

    def __init__(self, apps: list[str] | None = None, metric: str = "val_dice") -> None:
        self.apps = list(apps or ["train"])
        self.metric = metric
        self.run_id: str | None = None
        self.adopted = False
        self.tracking_uri: str | None = None
        self.sweep_dir: Path | None = None
        self._previous_sigterm: Any = None

    def _applies(self, config: DictConfig) -> bool:
        return str(config.hydra.job.name) in self.apps and "mlflow" in config

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from gigaseg.tracking import start_parent_run

        if not self._applies(config):
            return
        problem = sweeper_problem(config.hydra)
        if problem:
            # Exiting, not raising: Hydra turns a callback's exception into a warning and sweeps on.
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        mlflow_cfg = OmegaConf.to_container(config.mlflow, resolve=True)
        self.tracking_uri = mlflow_cfg["tracking_uri"]
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        # Under `mlflow run` the run MLflow made is the parent; the jobs must not adopt it.
        adopted = os.environ.pop("MLFLOW_RUN_ID", None)
        self.adopted = adopted is not None
        params = sweep_params(config.hydra)
        self.run_id = start_parent_run(
            self.tracking_uri,
            mlflow_cfg["experiment_name"],
            run_id=adopted,
            run_name=mlflow_cfg.get("run_name") or f"sweep {self.sweep_dir.parent.name} {self.sweep_dir.name}",
            params=params,
            tags={
                "gigaseg.sweep": "parent",
                "gigaseg.sweep_dir": str(self.sweep_dir),
                "gigaseg.sweep_overrides": params["sweep.overrides"],
            },
            artifact_location=mlflow_cfg.get("artifact_location"),
        )
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        swept = sorted(k[len("sweep.params."):] for k in params if k.startswith("sweep.params."))
        with atomic_path(self.sweep_dir / PARENT_FILE) as tmp:
            tmp.write_text(json.dumps({"run_id": self.run_id, "swept": swept}, indent=2) + "\n")
        os.environ[PARENT_ENV] = self.run_id
        self._opened()
        log.info("sweep parent MLflow run %s (%s)", self.run_id, self.sweep_dir)

    def _opened(self) -> None:
        global _open
        _open = self
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _terminated)

    def _closed(self) -> None:
        global _open
        if _open is self:
            _open = None
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        os.environ.pop(PARENT_ENV, None)
        self.run_id = None

    def end_unfinished(self, status: str) -> None:
        """End the open parent run with ``status`` (FAILED, KILLED) after a crash or an interruption."""
        from gigaseg.tracking import end_parent_run

        if self.run_id is None:
            return
        run_id = self.run_id
        self._closed()
        if self.adopted:  # `mlflow run` ends its own run with the command's status
            return
        try:
            summary = end_parent_run(self.tracking_uri, run_id, metric=self.metric, status=status)
        except Exception as exc:  # noqa: BLE001 (the store may be what failed; the sweep's own error matters more)
            log.warning("could not end the sweep parent MLflow run %s as %s: %s", run_id, status, exc)
            return
        log.info("sweep parent MLflow run %s: %s", run_id, summary)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from gigaseg.tracking import end_parent_run

        if self.run_id is None:
            return
        files = [self.sweep_dir / "optimization_results.yaml", self.sweep_dir / "multirun.yaml"]
        summary = end_parent_run(
            self.tracking_uri, self.run_id, metric=self.metric, files=files,
            # `mlflow run` ends the run it made itself when this process exits.
            terminate=not self.adopted,
        )
        log.info("sweep parent MLflow run %s: %s", self.run_id, summary)
        self._closed()
