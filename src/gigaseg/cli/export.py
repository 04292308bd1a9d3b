"""``gigaseg-export``: write a trained model as one ``.keras`` file, for use outside MLflow.

The model is fetched (``runs:/``, ``models:/NAME@ALIAS``, ...), loaded and checked as
``gigaseg-predict`` loads it, and written atomically with its training metadata inside.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from gigaseg.cli.common import CONFIG_PATH, resolve_model, run_hydra, start, to_plain, user_errors
from gigaseg.cli.schema import ExportAppSchema
from gigaseg.errors import ConfigError

log = logging.getLogger("gigaseg.export")


def run(cfg: DictConfig) -> Path:
    """Export the model ``model_uri`` to the ``.keras`` file ``out``; returns the file written."""
    from gigaseg.atomic import atomic_path
    from gigaseg.inference import load_model, save_keras
    from gigaseg.tracking import check_tracking_store

    for key in ("model_uri", "out"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise ConfigError(f"{key}=... is required, e.g. gigaseg-export model_uri=models:/tissue@champion out=tissue.keras")
    plain = to_plain(cfg)
    model_uri = str(plain["model_uri"])
    out = Path(str(plain["out"])).expanduser()
    if out.is_dir():
        raise ConfigError(f"out={out} is a folder; give a file name inside it, e.g. out={out / 'model.keras'}")
    if out.suffix != ".keras":
        raise ConfigError(f"out={out}: Keras files end in .keras; give a name such as {out.with_suffix('.keras').name}")
    if not out.parent.is_dir():
        raise ConfigError(f"out={out}: the folder {out.parent} does not exist; create it or choose another")
    tracking_uri = plain["mlflow"]["tracking_uri"]
    if model_uri.startswith(("runs:/", "models:/")):
        check_tracking_store(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="gigaseg-model-") as tmp:
        loaded = load_model(resolve_model(model_uri, tracking_uri, Path(tmp)))
    # Keras chooses the format by the name, so the temporary file ends in .keras too.
    with atomic_path(out, suffix=".keras") as tmp_file:
        save_keras(loaded, tmp_file)
    log.info("wrote %s (%s, total stride %d, level %s, threshold %s)", out, model_uri, loaded.total_stride,
             loaded.level, loaded.threshold)
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def _hydra_main(cfg: DictConfig) -> Path:
    start(cfg, ExportAppSchema, tensorflow=True)
    with user_errors():
        return run(cfg)


def main() -> None:
    """Console entry point (config errors Hydra finds end in one line, too)."""
    run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
