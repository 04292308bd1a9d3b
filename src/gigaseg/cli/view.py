"""``gigaseg-view``: a local web viewer of predictions, a cohort table and each slide at every zoom.

Serves until interrupted (Ctrl-C). Imports neither TensorFlow nor the prediction code, so it
starts in about a second.
"""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from gigaseg.cli.common import CONFIG_PATH, run_hydra, start, to_plain, user_errors
from gigaseg.cli.schema import ViewAppSchema
from gigaseg.errors import ConfigError

if TYPE_CHECKING:
    from gigaseg.view import ViewerServer


def open_viewer(directory: str | None, run_id: str | None, *, host: str = "127.0.0.1", port: int = 0,
                cache_mb: int = 128, tracking_uri: str | None = None, scratch: Path | None = None) -> "ViewerServer":
    """A running ``ViewerServer`` of the predictions in ``directory``, or of MLflow predict run ``run_id``.

    ``scratch``: where a run's artifacts are downloaded (``run_id`` only).
    """
    from gigaseg.view import Viewer, ViewerServer, find_predictions

    if bool(directory) == bool(run_id):
        raise ConfigError("give either dir=<prediction folder or multirun folder> or run_id=<predict run id>, "
                          f"not {'both' if directory else 'neither'}")
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"port={port}: give a port between 1 and 65535, or 0 for a free one")
    if int(cache_mb) <= 0:
        raise ConfigError(f"cache_mb={cache_mb}: give a positive number of MiB")
    if not host:
        raise ConfigError("host= is empty; give 127.0.0.1 (this machine only) or the interface to serve on")
    if directory:
        predictions, source = find_predictions(directory), str(Path(directory).expanduser().resolve())
    else:
        from gigaseg.view.runs import prediction_from_run

        if scratch is None or tracking_uri is None:
            raise ValueError("run_id needs a tracking_uri and a scratch folder")
        predictions, source = [prediction_from_run(str(run_id), tracking_uri, scratch)], f"MLflow run {run_id}"
    viewer = Viewer(predictions, source, cache_bytes=int(cache_mb) * 2**20)
    try:
        return ViewerServer(viewer, host, int(port))
    except OSError as exc:
        viewer.close()
        raise ConfigError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); "
                          "choose another port=, or port=0 for a free one") from exc


def run(cfg: DictConfig) -> None:
    plain: dict[str, Any] = to_plain(cfg)
    with tempfile.TemporaryDirectory(prefix="gigaseg-view-") as scratch:
        server = open_viewer(plain.get("dir"), plain.get("run_id"), host=str(plain["host"]), port=int(plain["port"]),
                             cache_mb=int(plain["cache_mb"]), tracking_uri=plain["mlflow"]["tracking_uri"],
                             scratch=Path(scratch))
        count = len(server.viewer.predictions)
        print(f"gigaseg-view: {count} slide{'s' if count != 1 else ''} from {server.viewer.source} at {server.url} "
              "(Ctrl-C stops it)", flush=True)
        # SIGTERM (kill, a service manager, the end of `mlflow run`) stops it as Ctrl-C does, so
        # the downloaded artifacts of run_id= are removed too.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.wait()
        except KeyboardInterrupt:
            print("stopped", flush=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
            server.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="view")
def _hydra_main(cfg: DictConfig) -> None:
    start(cfg, ViewAppSchema)
    with user_errors():
        run(cfg)


def main() -> None:
    """Console entry point: Hydra composes the config; a config it cannot compose is one line ``error: ...``."""
    run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
