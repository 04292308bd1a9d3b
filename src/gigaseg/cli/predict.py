"""``gigaseg-predict``: segment whole slides with a trained model and track each prediction as an MLflow run.

``slides=<folder or glob>`` expands into a Hydra multirun over ``slide=`` (one job per
slide) before Hydra parses the command line, so any Hydra launcher (joblib, submitit) runs it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gigaseg.cli.common import CONFIG_PATH, resolve_model, run_hydra, start, to_plain, user_errors
from gigaseg.cli.schema import PredictAppSchema
from gigaseg.data.cohort import find_slides, slide_name
from gigaseg.errors import ConfigError

log = logging.getLogger("gigaseg.predict")

_SAFE = re.compile(r"^[A-Za-z0-9_./+@%-]+$")


if not OmegaConf.has_resolver("gigaseg_stem"):
    OmegaConf.register_new_resolver("gigaseg_stem", slide_name)


def _quote(value: str) -> str:
    """A value as Hydra's override grammar reads it back verbatim."""
    if _SAFE.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def expand_slides(argv: list[str]) -> list[str]:
    """Turn ``slides=<folder or glob>`` into ``slide=a,b,...`` and ``-m`` (a multirun, one job per slide)."""
    out, expanded = [], False
    for arg in argv:
        if arg.startswith("slides="):
            slides = find_slides(arg[len("slides="):])
            out.append("slide=" + ",".join(_quote(str(s)) for s in slides))
            expanded = True
        else:
            out.append(arg)
    if expanded and not {"-m", "--multirun"} & set(out):
        out.insert(0, "--multirun")
    return out


def predict_options(plain: dict[str, Any], threshold: float):
    """PredictOptions from the composed config."""
    from gigaseg.inference import PredictOptions

    try:
        return PredictOptions(
            level=plain["level"], mpp=plain["mpp"], kind=str(plain["kind"]), threshold=float(threshold),
            tile_size=int(plain["tile_size"]), tiff_tile_size=int(plain["tiff_tile_size"]),
            min_area_um2=float(plain["min_area_um2"]), pad_value=tuple(plain["pad_value"]),
            outline_max_mpx=float(plain["outline_max_mpx"]),
            simplify_um=None if plain["simplify_um"] is None else float(plain["simplify_um"]),
            readers=int(plain["readers"]),
            workers=int(plain["workers"]),
            evaluator=str(plain["evaluator"]),
            jit_compile=bool(plain["jit_compile"]),
            compression_level=int(plain["compression_level"]), thumbnail_size=int(plain["thumbnail_size"]),
            progress=bool(plain["progress"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the predict config has a missing or invalid option ({exc}); compare with conf/predict.yaml") from exc


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict one slide as the composed config says; returns the summary."""
    from gigaseg.inference import load_model, predict_slide
    from gigaseg.slides import open_slide
    from gigaseg.tracking import MlflowRun, check_tracking_store, flatten_config, git_state

    for key in ("model_uri", "slide"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise ConfigError(f"{key}=... is required, e.g. gigaseg-predict model_uri=runs:/<run id>/model slide=/path/slide.svs")
    plain = to_plain(cfg)
    tracking_uri = plain["mlflow"]["tracking_uri"]
    model_uri = str(plain["model_uri"])
    if plain.get("log_mlflow", True) or model_uri.startswith(("runs:/", "models:/")):
        check_tracking_store(tracking_uri)  # an unreachable store fails now, not after the prediction
    slide = Path(str(plain["slide"])).expanduser()
    open_slide(slide).close()  # a bad slide fails now, before any run is logged
    hydra_cfg = HydraConfig.get()
    if plain.get("output_dir"):
        output_dir = Path(plain["output_dir"])
        if hydra_cfg.mode == RunMode.MULTIRUN:
            output_dir = output_dir / slide_name(str(slide))  # one folder per slide
    else:
        output_dir = Path(hydra_cfg.runtime.output_dir)

    with tempfile.TemporaryDirectory(prefix="gigaseg-model-") as tmp:
        loaded = load_model(resolve_model(model_uri, tracking_uri, Path(tmp)))
    threshold = loaded.threshold if plain.get("threshold") is None else float(plain["threshold"])
    options = predict_options(plain, threshold)
    options.validate(loaded.total_stride)  # before a run is logged; predict_slide checks the halo too
    extra = {"model_uri": model_uri, "model_run_id": loaded.run_id, "output_dir": str(output_dir.resolve())}
    kwargs = {"model_level": loaded.level, "model_mpp": loaded.mpp}

    if not plain.get("log_mlflow", True):
        return predict_slide(loaded.model, slide, output_dir, options, extra_summary=extra, **kwargs)

    overrides = list(hydra_cfg.overrides.task)
    params = flatten_config({k: v for k, v in plain.items() if k not in ("hydra", "paths")})
    params["overrides"] = " ".join(overrides) or "(none)"
    tags = {
        "gigaseg.command": "predict",
        "gigaseg.model_uri": model_uri,
        "gigaseg.slide": str(slide.resolve()),
        "gigaseg.output_dir": str(output_dir.resolve()),
        **git_state(),
    }
    if loaded.run_id:
        tags["gigaseg.model_run_id"] = loaded.run_id
    with MlflowRun(
        tracking_uri,
        plain["mlflow"]["experiment_name"],
        run_name=plain["mlflow"].get("run_name") or f"predict {slide_name(str(slide))}",
        params=params,
        tags=tags,
        log_system_metrics=bool(plain["mlflow"].get("log_system_metrics")),
        artifact_location=plain["mlflow"].get("artifact_location"),
    ) as tracked:
        log.info("MLflow run %s in %s", tracked.run_id, tracking_uri)
        summary = predict_slide(
            loaded.model, slide, output_dir, options, extra_summary={**extra, "mlflow_run_id": tracked.run_id}, **kwargs
        )
        metrics = {k: summary[k] for k in ("seconds", "mpx", "mpx_per_s", "tissue_fraction", "tissue_area_mm2", "pieces",
                                           "outline_vertices_traced", "outline_vertices")}
        tracked.log_metrics(metrics, step=0)
        tracked.set_tags({"gigaseg.level": str(summary["level"]), "gigaseg.evaluator": summary["evaluator"]})
        for name in ("summary.json", "outlines.geojson", "overlay.png") + (("mask.tiff",) if plain.get("log_mask") else ()):
            tracked.log_artifact(output_dir / name)
        tracked.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def _hydra_main(cfg: DictConfig) -> dict[str, Any]:
    start(cfg, PredictAppSchema, tensorflow=True)
    with user_errors():
        summary = run(cfg)
        log.info("wrote %s: tissue %.1f %%, %d piece(s), %.1f s", summary["output_dir"],
                 100 * summary["tissue_fraction"], summary["pieces"], summary["seconds"])
        return summary


def main() -> None:
    """Console entry point: expand ``slides=`` into a multirun, then hand over to Hydra."""
    with user_errors():
        sys.argv[1:] = expand_slides(sys.argv[1:])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
