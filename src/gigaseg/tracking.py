"""MLflow tracking: the store, the run, flattened configs, tags for code and data versions.

The only module besides the entry points that imports MLflow; training code talks to it
through ``log_metrics`` / ``log_artifact`` and never sees MLflow itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from gigaseg.errors import ConfigError, GigasegError

log = logging.getLogger(__name__)

#: MLflow rejects longer parameter values; longer ones are cut with a marker.
_MAX_PARAM = 6000


class TrackingError(GigasegError):
    """The MLflow store cannot be used."""


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to dotted keys (``train.lr``) with string values."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            text = str(value) if not isinstance(value, (list, tuple)) else str(list(value))
            flat[name] = text if len(text) <= _MAX_PARAM else text[: _MAX_PARAM - 3] + "..."
    return flat


def check_tracking_store(uri: str) -> None:
    """Fail now, not after an hour of training, when the store cannot be written or reached."""
    import mlflow
    from mlflow.tracking import MlflowClient

    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        db_path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if db_path is not None:
            folder = db_path.parent
            if not folder.is_dir():
                raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist; create it or set MLFLOW_TRACKING_URI")
            if not os.access(folder, os.W_OK) or (db_path.exists() and not os.access(db_path, os.W_OK)):
                raise TrackingError(f"MLflow store {uri} is not writable; choose a writable path with MLFLOW_TRACKING_URI")
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises many kinds (connection, SQL, REST).
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"MLflow store {uri} cannot be reached ({first}); start the server or set MLFLOW_TRACKING_URI"
        ) from exc
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous
    mlflow.set_tracking_uri(uri)


def git_state(root: Path | None = None) -> dict[str, str]:
    """The commit of the code and whether the work tree had uncommitted changes.

    ``root`` None: the checkout gigaseg itself runs from (an editable install), wherever the
    project's outputs go; an installed wheel has no commit to record.
    """
    if root is None:
        root = Path(__file__).resolve().parent
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"gigaseg.git_commit": commit, "gigaseg.git_dirty": str(bool(dirty))}


def dvc_data_digest(dvc_file: Path, data_dir: Path) -> str | None:
    """The md5 DVC records in ``dvc_file`` for the folder holding ``data_dir``, if the files on disk have it.

    A run is tagged with a data version only when that is the data it reads: when the folder
    was edited or regenerated differently, this logs why and returns None. The comparison is
    ``dvc status``'s own, which rehashes only files whose size or mtime DVC has not seen.
    """
    if not dvc_file.is_file():
        return None
    import yaml

    try:
        spec = yaml.safe_load(dvc_file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    for out in (spec or {}).get("outs", []):
        tracked = (dvc_file.parent / out.get("path", "")).resolve()
        if tracked == data_dir.resolve() or tracked in data_dir.resolve().parents:
            digest = out.get("md5")
            reason = _dvc_difference(dvc_file, tracked) if digest else "it records no md5"
            if reason is None:
                return digest
            log.warning("%s does not match %s (%s): the run gets no data digest tag", tracked, dvc_file, reason)
            return None
    return None


def _dvc_difference(dvc_file: Path, folder: Path) -> str | None:
    """Why ``folder`` on disk differs from what ``dvc_file`` records, or None when it does not."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(dvc_file.parent)) as repo:
            stage = repo.stage.load_one(str(dvc_file))
            out = next((o for o in stage.outs if Path(o.fs_path).resolve() == folder), None)
            if out is None:
                return f"DVC does not read {folder} as one of its outputs"
            status = out.workspace_status().get(str(out))
            manifest = Path(out.cache.oid_to_path(out.hash_info.value)) if status == "modified" else None
    except DvcException as exc:
        return f"DVC cannot compare them: {exc}"
    if status is None:
        return None
    if manifest is None or not manifest.is_file():
        return status
    # DVC's cache keeps the recorded folder's listing: name the files that differ.
    recorded = {entry["relpath"]: entry["md5"] for entry in json.loads(manifest.read_text())}
    on_disk = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    changed = [name for name, path in on_disk.items() if name in recorded and _md5(path) != recorded[name]]
    parts = [
        ("changed", changed),
        ("missing", sorted(set(recorded) - set(on_disk))),
        ("not recorded", sorted(set(on_disk) - set(recorded))),
    ]
    return "; ".join(f"{what}: {', '.join(names)}" for what, names in parts if names) or status


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # DVC's file hash, not a security check
    with path.open("rb") as f:
        while chunk := f.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


class MlflowRun:
    """One MLflow run as a context manager: params and tags at start, status at the end.

    With ``run_id`` it re-opens an existing run (to resume training into it); metrics the
    run already holds at a step are then not logged again at that step. With
    ``parent_run_id`` the run is a child of that run (a job of a sweep), in its experiment.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        log_system_metrics: bool = False,
        nested: bool = False,
        parent_run_id: str | None = None,
        artifact_location: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.run_id = run_id
        self.params = dict(params or {})
        self.tags = dict(tags or {})
        self.log_system_metrics = log_system_metrics
        self.parent_run_id = parent_run_id
        self.nested = nested or parent_run_id is not None
        self.artifact_location = artifact_location
        self._run = None
        # (metric, step) pairs a re-opened run already holds: never logged twice.
        self._logged: dict[str, set[int]] = {}

    def __enter__(self) -> "MlflowRun":
        import mlflow

        check_tracking_store(self.tracking_uri)
        # Under `mlflow run`, MLflow has already created the run and passes its id along.
        if self.run_id is None and not self.nested and os.environ.get("MLFLOW_RUN_ID"):
            self.run_id = os.environ["MLFLOW_RUN_ID"]
        experiment_id = None
        if self.run_id is None and self.parent_run_id is not None:
            experiment_id = mlflow.get_run(self.parent_run_id).info.experiment_id
        elif self.run_id is None:
            # A new experiment on a local store keeps its artifacts beside the store,
            # not in whatever folder the command happened to start in.
            experiment_id = experiment_id_for(self.tracking_uri, self.experiment_name, self.artifact_location)
        reopened = self.run_id is not None
        self._run = mlflow.start_run(
            run_id=self.run_id,
            experiment_id=experiment_id,
            run_name=self.run_name if self.run_id is None else None,
            nested=self.nested,
            parent_run_id=self.parent_run_id if self.run_id is None else None,
            log_system_metrics=self.log_system_metrics,
        )
        self.run_id = self._run.info.run_id
        if reopened:
            client = mlflow.tracking.MlflowClient()
            self._logged = {
                key: {m.step for m in client.get_metric_history(self.run_id, key)} for key in self._run.data.metrics
            }
        if self.tags:
            mlflow.set_tags(self.tags)
        if self.params:
            existing = self._run.data.params
            fresh = {k: v for k, v in self.params.items() if k not in existing}
            # MLflow takes at most 100 params per call.
            items = list(fresh.items())
            for start in range(0, len(items), 100):
                mlflow.log_params(dict(items[start : start + 100]))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        mlflow.end_run(status=status)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import mlflow

        clean = {
            k: float(v)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v)) and step not in self._logged.get(k, ())
        }
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        import mlflow

        mlflow.log_text(text, artifact_file)

    def log_dataset(self, name: str, uri: str, digest: str, *, context: str = "training",
                    tags: Mapping[str, str] | None = None) -> None:
        """Record the data a run used as an MLflow input dataset (shown in the run's "Datasets used")."""
        import mlflow
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        dataset = MetaDataset(LocalArtifactDatasetSource(uri), name=name, digest=digest)
        mlflow.log_input(dataset, context=context, tags={k: str(v) for k, v in (tags or {}).items()})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags(dict(tags))

    def log_model(self, model, *, name: str = "model", metadata: Mapping[str, Any] | None = None) -> str:
        """Log a Keras model with a uint8 image signature; returns the model URI."""
        import keras
        import mlflow
        import mlflow.tensorflow
        import tensorflow as tf
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "image")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 1), "tissue")]),
        )
        # Explicit requirements spare MLflow loading the model in a subprocess to infer them.
        requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
        info = mlflow.tensorflow.log_model(
            model,
            name=name,
            signature=signature,
            pip_requirements=requirements,
            metadata=dict(metadata or {}),
        )
        return info.model_uri

    def register_model(self, model_uri: str, name: str, alias: str) -> str:
        """Register ``model_uri`` as a new version of the registered model ``name``, point ``alias`` at it
        and tag this run with both; returns the version."""
        import contextlib
        import io

        import mlflow

        from mlflow.exceptions import MlflowException

        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):  # MLflow prints what the caller logs in one line
                version = str(mlflow.register_model(model_uri, name).version)
        except MlflowException as exc:
            raise TrackingError(f"cannot register the model as {name!r} in {self.tracking_uri} ({exc.message}); "
                                f"the run and its model are logged: register {model_uri} later") from exc
        log.debug("%s", said.getvalue().strip())
        try:
            _client(self.tracking_uri).set_registered_model_alias(name, alias, version)
        except MlflowException as exc:
            raise TrackingError(f"registered {name!r} version {version} but cannot set its alias {alias!r} "
                                f"({exc.message}); set it in the MLflow UI or with set_registered_model_alias") from exc
        self.set_tags({"gigaseg.registered_model": name, "gigaseg.registered_version": version,
                       "gigaseg.registered_alias": alias})
        return version


#: What a registered model's name and an alias may hold: a ``models:/NAME@ALIAS`` URI must read back.
_ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")


def check_registration(name: str, alias: str) -> None:
    """Refuse a registered model name or alias that MLflow would refuse only after training, or that no URI could name."""
    if not name.strip() or any(c in name for c in "/:@"):
        raise ConfigError(f"mlflow.register_as={name!r}: give a name without '/', ':' or '@', e.g. mlflow.register_as=tissue")
    # MLflow keeps "latest" and v<number> for versions (models:/NAME/latest, models:/NAME@v3).
    if not _ALIAS.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ConfigError(f"mlflow.alias={alias!r}: use letters, digits, '_' and '-' (not 'latest' or v<number>), "
                          "e.g. mlflow.alias=champion")


def registered_version(tracking_uri: str, name: str, *, alias: str | None = None, version: str | None = None) -> str:
    """The version of the registered model ``name`` that ``alias`` points at (or ``version``, checked).

    Raises TrackingError naming what the registry does hold, so a typo is easy to see.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        held = f"it holds {', '.join(names)}" if names else "it holds none"
        raise TrackingError(f"no registered model {name!r} in {tracking_uri} ({held}); "
                            f"register one with gigaseg-train mlflow.register_as={name}") from exc
    aliases = dict(model.aliases or {})
    if alias is not None:
        if alias not in aliases:
            held = ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
            raise TrackingError(f"registered model {name!r} has no alias {alias!r} (its aliases: {held}); "
                                f"give one of them, or a version as models:/{name}/<version>")
        return str(aliases[alias])
    try:
        return str(client.get_model_version(name, str(version)).version)
    except MlflowException as exc:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise TrackingError(f"registered model {name!r} has no version {version} "
                            f"(its versions: {', '.join(map(str, versions)) or 'none'})") from exc


def version_download_uri(tracking_uri: str, name: str, version: str) -> str:
    """Where the files of version ``version`` of the registered model ``name`` are, looked up in this store's registry."""
    return _client(tracking_uri).get_model_version_download_uri(name, version)


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    # The registry of this store, not of whichever store the process set globally last
    # (MlflowClient falls back to the global one); MLFLOW_REGISTRY_URI still names another.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri)


def experiment_id_for(tracking_uri: str, experiment_name: str, artifact_location: str | None = None) -> str:
    """The id of the experiment named ``experiment_name``, created (artifacts beside a local store) if missing."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    local = urllib.parse.urlparse(tracking_uri).scheme in ("sqlite", "file", "")
    return client.create_experiment(experiment_name, artifact_location=artifact_location if local else None)


def start_parent_run(
    tracking_uri: str,
    experiment_name: str,
    *,
    run_id: str | None = None,
    run_name: str | None = None,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    artifact_location: str | None = None,
) -> str:
    """Create the parent run of a sweep (or adopt ``run_id``); it stays RUNNING until ``end_parent_run``.

    The run is created through the client, not made active, so the sweep's jobs can start
    their own runs in this process (basic launcher) or in workers (joblib).
    """
    from mlflow.entities import Param, RunTag

    check_tracking_store(tracking_uri)
    client = _client(tracking_uri)
    if run_id is None:
        experiment_id = experiment_id_for(tracking_uri, experiment_name, artifact_location)
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, v) for k, v in flatten_config(dict(params or {})).items() if k not in existing]
    for start in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[start : start + 100])
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    return run_id


def child_runs(tracking_uri: str, parent_run_id: str) -> list:
    """The runs nested under ``parent_run_id``, oldest first."""
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def end_parent_run(
    tracking_uri: str,
    parent_run_id: str,
    *,
    metric: str = "val_dice",
    files: tuple[Path, ...] | list[Path] = (),
    terminate: bool = True,
    status: str = "FINISHED",
) -> dict[str, Any]:
    """Summarise a sweep in its parent run (best child by ``metric``, job count, files) and end it with ``status``.

    A sweep that crashed ends FAILED, one that was interrupted KILLED, with what its jobs got done.
    """
    client = _client(tracking_uri)
    children = child_runs(tracking_uri, parent_run_id)
    scored = [(r.data.metrics[metric], r) for r in children if metric in r.data.metrics]
    summary: dict[str, Any] = {"jobs": len(children)}
    tags = {"gigaseg.sweep_jobs": str(len(children))}
    if scored:
        best_value, best = max(scored, key=lambda item: item[0])
        summary.update(best_run_id=best.info.run_id, best_value=best_value)
        tags.update({"gigaseg.best_run_id": best.info.run_id, "gigaseg.best_overrides": best.data.tags.get("gigaseg.overrides", "")})
        client.log_metric(parent_run_id, f"best_{metric}", float(best_value), step=0)
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    for path in files:
        if Path(path).is_file():
            client.log_artifact(parent_run_id, str(path), artifact_path="sweep")
    if terminate:
        client.set_terminated(parent_run_id, status)
    summary["status"] = status
    return summary


def process_tags() -> dict[str, str]:
    """The host and process id of this run, so that ``find_resumable_run`` can skip live runs."""
    return {"gigaseg.host": socket.gethostname(), "gigaseg.pid": str(os.getpid())}


def _alive_here(tags: Mapping[str, str]) -> bool:
    if tags.get("gigaseg.host") != socket.gethostname():
        return False
    try:
        os.kill(int(tags.get("gigaseg.pid", "")), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def find_resumable_run(tracking_uri: str, experiment_name: str, config_hash: str) -> str | None:
    """The newest unfinished run of this config (killed, failed or interrupted), or None.

    A run still RUNNING whose process lives on this host is someone else's live run and is skipped.
    """
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`gigaseg.config_hash` = '{config_hash}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if run.info.status == "FINISHED":
            continue
        if run.info.status == "RUNNING" and _alive_here(run.data.tags):
            continue
        return run.info.run_id
    return None


def run_info(tracking_uri: str, run_id: str):
    """The MLflow run ``run_id`` (info, params, tags, metrics), or raise TrackingError."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"no MLflow run {run_id} in {tracking_uri}; check the run id") from exc


def download_artifact(tracking_uri: str, run_id: str, path: str, into: Path) -> Path | None:
    """Download one artifact of a run into ``into``; None when the run has no such artifact."""
    from mlflow.exceptions import MlflowException

    try:
        return Path(_client(tracking_uri).download_artifacts(run_id, path, str(into)))
    except (MlflowException, OSError):
        return None
