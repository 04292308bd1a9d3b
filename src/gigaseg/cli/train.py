"""``gigaseg-train``: train the U-Net on a prepared region and track the run in MLflow."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gigaseg.cli.common import CONFIG_PATH, run_hydra, start, to_plain, user_errors
from gigaseg.cli.workers import LAUNCHED, SWEEP_JOB
from gigaseg.cli.schema import TrainAppSchema
from gigaseg.errors import ConfigError

log = logging.getLogger("gigaseg.train")


def model_kwargs(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``build_unet`` arguments of a ``model`` config node."""
    keys = ("filters", "kernels", "strides", "decoder_filters", "activation", "input_range", "name")
    unknown = sorted(set(model_cfg) - set(keys))
    if unknown:
        raise ConfigError(f"model config has unknown option(s) {', '.join('model.' + k for k in unknown)}")
    return {k: model_cfg[k] for k in keys if k in model_cfg and model_cfg[k] is not None}


def train_config(train_cfg: dict[str, Any]):
    """A validated TrainConfig from the ``train`` config node (``resume``/``log_model`` stay here)."""
    from gigaseg.options import AugmentConfig, TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    extra = {"resume", "log_model"}
    unknown = sorted(set(train_cfg) - names - extra)
    if unknown:
        raise ConfigError(f"train config has unknown option(s) {', '.join('train.' + k for k in unknown)}")
    values = {k: v for k, v in train_cfg.items() if k in names}
    if isinstance(values.get("augment"), dict):
        values["augment"] = AugmentConfig(**values["augment"])
    config = TrainConfig(**values)
    config.validate()
    return config


def registration(plain: dict[str, Any]) -> tuple[str, str] | None:
    """``(mlflow.register_as, mlflow.alias)`` checked before any work is done; None without ``register_as``."""
    from gigaseg.tracking import check_registration

    name = plain["mlflow"].get("register_as")
    if not name:
        return None
    if not plain["train"].get("log_model", True):
        raise ConfigError(f"mlflow.register_as={name} registers the model the run logs, but train.log_model=false; "
                          "set train.log_model=true or drop mlflow.register_as")
    alias = str(plain["mlflow"].get("alias") or "")
    check_registration(str(name), alias)
    return str(name), alias


def config_hash(params: dict[str, str], data_digests: list[str]) -> str:
    """What makes two runs the same experiment: model, data and train options and the data's digests.

    Folders and file paths are left out (the manifests' digests stand for the data), so the
    hash is the same in any checkout.
    """
    keep = {k: v for k, v in params.items()
            if k.split(".", 1)[0] in ("model", "data", "train") and not k.endswith(("dir", "path"))
            and k not in ("train.resume", "train.progress")}
    text = json.dumps({"params": keep, "data": data_digests}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resume_run_id(resume: str | None, tracking_uri: str, experiment_name: str, digest: str) -> str | None:
    """The MLflow run to continue: ``train.resume=<run id>``, or with ``auto`` the newest
    unfinished run of the same config hash (None: start a new run)."""
    from gigaseg.tracking import find_resumable_run, run_info

    if resume in (None, "", "none", "null"):
        return None
    if str(resume) == "auto":
        found = find_resumable_run(tracking_uri, experiment_name, digest)
        log.info("train.resume=auto: %s", f"resuming run {found}" if found else "no unfinished run of this config")
        return found
    run_info(tracking_uri, str(resume))
    return str(resume)


def resume_checkpoint(run_id: str, tracking_uri: str, into: Path) -> Path:
    """The newest intact checkpoint of a run: its local ``last.npz`` or its logged artifact.

    A process killed while MLflow copied the artifact leaves a partial file there; the local
    file is renamed into place atomically. Each is checked, and the one with more steps wins.
    """
    from gigaseg.checkpoint import CheckpointError, load_checkpoint
    from gigaseg.tracking import download_artifact, run_info

    tags = run_info(tracking_uri, run_id).data.tags
    candidates = []
    if tags.get("gigaseg.checkpoint_dir"):
        candidates.append(Path(tags["gigaseg.checkpoint_dir"]) / "last.npz")
    artifact = download_artifact(tracking_uri, run_id, "checkpoints/last.npz", into)
    if artifact is not None:
        candidates.append(artifact)
    best, best_step, reasons = None, -1, []
    for path in candidates:
        try:
            step = load_checkpoint(path).step
        except CheckpointError as exc:
            reasons.append(str(exc))
            log.warning("not resuming from %s: %s", path, exc)
            continue
        if step > best_step:
            best, best_step = path, step
    if best is None:
        why = f" ({'; '.join(reasons)})" if reasons else ""
        raise ConfigError(f"train.resume={run_id}: the run has no intact checkpoint to resume from{why}")
    log.info("resuming run %s from %s (step %d)", run_id, best, best_step)
    return best


def sweep_job() -> tuple[str | None, dict[str, str]]:
    """In a multirun, the sweep's parent run id and this job's tags; (None, {}) otherwise.

    The tag ``gigaseg.sweep_values`` holds the overrides of the keys the sweep varies.
    """
    from hydra.types import RunMode

    from gigaseg.cli.sweep import sweep_info

    hydra_cfg = HydraConfig.get()
    handed = os.environ.get(SWEEP_JOB)
    if handed:  # a local worker of a sweep job: the launcher passed the job's parent and tags on
        job = json.loads(handed)
        return job["parent_id"], job["tags"]
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, {}
    info = sweep_info(hydra_cfg.sweep.dir)
    overrides = list(hydra_cfg.overrides.task)
    swept = set(info["swept"])
    values = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] if swept else overrides
    tags = {"gigaseg.sweep": "child", "gigaseg.sweep_dir": str(hydra_cfg.sweep.dir),
            "gigaseg.job_num": str(hydra_cfg.job.num), "gigaseg.sweep_values": " ".join(values) or "(none)"}
    return info["run_id"], tags


def run(cfg: DictConfig) -> float | None:
    """Train as the composed config says; returns the final validation Dice (for sweepers)."""
    from gigaseg.atomic import atomic_path
    from gigaseg.cli.history import HistoryTables
    from gigaseg.data.cohort import INDEX_NAME
    from gigaseg.data.manifest import file_sha256
    from gigaseg.plots import overlay_png, plot_curves
    from gigaseg.tracking import (
        MlflowRun,
        check_tracking_store,
        dvc_data_digest,
        flatten_config,
        git_state,
        process_tags,
    )
    plain = to_plain(cfg)
    root = Path(plain["paths"]["root"])
    config = train_config(plain["train"])
    registered = registration(plain)
    kwargs = model_kwargs(plain["model"])
    tracking_uri = plain["mlflow"]["tracking_uri"]
    distributed = distributed_config(plain.get("distributed"))
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)

    data_dir = Path(plain["data"]["dir"])
    prepared = Path(plain["data"]["prepared_dir"])
    if not os.environ.get(LAUNCHED):  # local workers find what their launcher prepared
        prepare_missing(cfg, prepared)
    train_regions, val_regions, loaded = cohort_regions(prepared)
    if distributed.local_workers and not os.environ.get(LAUNCHED):
        check_tracking_store(tracking_uri)  # fail now, not once the workers are up
        return launch_workers(distributed, overrides, output_dir)
    from gigaseg.distributed import make_replicas
    from gigaseg.model import build_unet
    from gigaseg.training import train

    # Before any other TensorFlow work: a multi-worker strategy reconfigures the runtime.
    replicas = make_replicas(distributed, memory_share=1.0 / max(1, distributed.local_workers))
    build_unet(**kwargs)  # a model config that cannot be built fails here, before any run is opened
    if replicas is not None and not replicas.is_chief:
        # Other workers compute their share of every step and write nothing shared.
        train(kwargs, train_regions, [], config, checkpoint_dir=None, replicas=replicas)
        log.info("worker finished its %d steps", config.total_steps(len(train_regions)))
        return None
    check_tracking_store(tracking_uri)

    first = loaded[0]
    digests = [file_sha256(region.path / "manifest.json") for region in loaded]
    tags = {
        "gigaseg.overrides": " ".join(overrides) or "(none)",
        "gigaseg.data_dir": str(data_dir),
        "gigaseg.train_slides": str(len({r.key.split("/")[0] for r in train_regions})),
        "gigaseg.train_regions": str(len(train_regions)),
        "gigaseg.val_slides": str(len({r.key.split("/")[0] for r in val_regions})),
        "gigaseg.val_regions": str(len(val_regions)),
        "gigaseg.train_manifest_sha256": digests[0],
        **git_state(),
    }
    digest = dvc_data_digest(root / "data.dvc", data_dir)
    if digest:
        tags["gigaseg.data_dvc_md5"] = digest
    tags["gigaseg.train_manifest"] = json.dumps(first.manifest, sort_keys=True)[:5000]
    params = flatten_config({k: v for k, v in plain.items() if k != "hydra"})
    params["overrides"] = " ".join(overrides) or "(none)"
    cfg_hash = config_hash(params, digests)
    tags.update({"gigaseg.config_hash": cfg_hash, "gigaseg.checkpoint_dir": str(output_dir / "checkpoints"),
                 **process_tags()})
    parent_id, sweep_tags = sweep_job()
    tags.update(sweep_tags)
    run_name = plain["mlflow"].get("run_name")
    if sweep_tags:
        run_name = f"{run_name or 'job'} {sweep_tags['gigaseg.job_num']}: {sweep_tags['gigaseg.sweep_values']}"[:250]

    experiment_name = plain["mlflow"]["experiment_name"]
    resume_id = resume_run_id(plain["train"].get("resume"), tracking_uri, experiment_name, cfg_hash)
    with tempfile.TemporaryDirectory() as scratch:
        # Found before the run is reopened: that points its gigaseg.checkpoint_dir tag at this folder.
        checkpoint = resume_checkpoint(resume_id, tracking_uri, Path(scratch)) if resume_id else None
        with MlflowRun(
            tracking_uri,
            experiment_name,
            run_name=run_name,
            run_id=resume_id,
            parent_run_id=parent_id,
            params=params,
            tags=tags,
            log_system_metrics=bool(plain["mlflow"].get("log_system_metrics")),
            artifact_location=plain["mlflow"].get("artifact_location"),
        ) as tracked:
            log.info("MLflow run %s in %s%s", tracked.run_id, tracking_uri, f" (sweep parent {parent_id})" if parent_id else "")
            tracked.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            # The cohort as an input dataset: DVC's digest of the data when the files on disk match it,
            # else a digest of the regions' manifests (which name the slides and hold their digests).
            cohort_digest = digest or hashlib.sha256("".join(digests).encode()).hexdigest()[:32]
            tracked.log_dataset(plain["data"]["name"], str(prepared), cohort_digest, context="training",
                                tags={k: tags[f"gigaseg.{k}"] for k in ("train_slides", "train_regions",
                                                                          "val_slides", "val_regions")})
            tracked.log_artifact(prepared / INDEX_NAME, "data")
            for region in loaded:
                tracked.log_artifact(region.path / "manifest.json", f"data/{region.path.relative_to(prepared)}")
            result = train(
                kwargs,
                train_regions,
                val_regions,
                config,
                checkpoint_dir=output_dir / "checkpoints",
                resume=checkpoint,
                # Also as CSV tables beside the run's other files, for dvc plots.
                logger=HistoryTables(output_dir / "history", tracked),
                replicas=replicas,
            )
            tracked.set_tags({"gigaseg.tiled": str(result.tiled), "gigaseg.tile_size": str(result.tile_size),
                              "gigaseg.evaluator": result.evaluator, "gigaseg.evaluator_reason": result.evaluator_reason,
                              "gigaseg.replicas": replicas.describe() if replicas is not None else "1",
                              "gigaseg.last_checkpoint": str(result.checkpoint),
                              **({"gigaseg.best_checkpoint": str(result.best_checkpoint),
                                  "gigaseg.best_step": str(result.best_step)} if result.best_step else {})})
            curves = plot_curves(result.history, output_dir / "curves.png")
            tracked.log_artifact(curves, "plots")
            if val_regions and result.val_probability is not None:
                overlay = overlay_png(val_regions[0].image, result.val_probability, val_regions[0].mask,
                                      output_dir / "val_overlay.png", threshold=config.threshold)
                tracked.log_artifact(overlay, "plots")
            summary = {f"final_{k}": v for k, v in result.metrics.items()}
            with atomic_path(output_dir / "metrics.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
            tracked.log_metrics(summary, step=int(result.metrics["steps"]))
            if plain["train"].get("log_model", True):
                manifest = first.manifest
                region = manifest.get("region", {})
                uri = tracked.log_model(
                    result.model,
                    metadata={
                        "gigaseg_level": region.get("level"),
                        "gigaseg_mpp": region.get("mpp"),
                        "gigaseg_total_stride": manifest.get("total_stride"),
                        "gigaseg_threshold": config.threshold,
                    },
                )
                tracked.set_tags({"gigaseg.model_uri": uri})
                log.info("model logged as %s", uri)
                if registered:
                    name, alias = registered
                    version = tracked.register_model(uri, name, alias)
                    log.info("model registered as %s version %s with alias %s (models:/%s@%s)",
                             name, version, alias, name, alias)
            log.info("final metrics: %s", json.dumps(result.metrics, sort_keys=True))
    return result.metrics.get("val_dice")


def prepare_missing(cfg: DictConfig, data_dir: Path) -> None:
    """Prepare the cohort's regions that are missing or changed before training, as ``mlflow run .`` does.

    Preparing keeps every region already prepared from the same request, so when nothing
    changed this only reads the slides' headers.
    """
    from gigaseg.cli.prepare import run as prepare
    from gigaseg.data.cohort import INDEX_NAME, read_index
    from gigaseg.errors import ConfigError

    try:
        missing = [e["dir"] for e in read_index(data_dir) if not (data_dir / e["dir"] / "manifest.json").is_file()]
    except ConfigError:
        missing = [INDEX_NAME]
    if missing:
        log.info("regions not prepared in %s yet (%s): preparing them now (gigaseg-prepare with the same overrides)",
                 data_dir, ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    prepare(cfg)


def cohort_regions(data_dir: Path):
    """The prepared cohort's training and validation regions (as ``TrainRegion``), and every loaded region."""
    from gigaseg.data import load_region
    from gigaseg.data.cohort import read_index
    from gigaseg.errors import ConfigError
    from gigaseg.training import TrainRegion

    regions: dict[str, list] = {"train": [], "val": []}
    loaded: dict[str, list] = {"train": [], "val": []}
    for entry in read_index(data_dir):
        if entry["split"] in regions:
            region = load_region(data_dir / entry["dir"])
            loaded[entry["split"]].append(region)
            regions[entry["split"]].append(
                TrainRegion(key=f"{entry['slide']}/{entry['region']}", image=region.image, mask=region.mask))
    if not regions["train"]:
        raise ConfigError(f"the cohort prepared in {data_dir} has no training region; put a slide in split train")
    return regions["train"], regions["val"], loaded["train"] + loaded["val"]


def distributed_config(node: dict[str, Any] | None):
    """A validated DistributedConfig from the ``distributed`` config node."""
    from gigaseg.distributed import DistributedConfig

    names = {f.name for f in dataclasses.fields(DistributedConfig)}
    node = dict(node or {})
    unknown = sorted(set(node) - names)
    if unknown:
        raise ConfigError(f"distributed config has unknown option(s) {', '.join('distributed.' + k for k in unknown)}")
    config = DistributedConfig(**node)
    config.validate()
    return config


def launch_workers(distributed, overrides: list[str], output_dir: Path) -> float | None:
    """Run this training as ``distributed.local_workers`` workers on 127.0.0.1; the chief's val Dice."""
    from gigaseg.cli.workers import launch

    parent_id, tags = sweep_job()
    chief = launch("gigaseg.cli.train", overrides, distributed.local_workers, output_dir,
                   heartbeat_timeout_s=distributed.heartbeat_timeout_s,
                   sweep_job={"parent_id": parent_id, "tags": tags} if parent_id else None)
    metrics = json.loads((chief / "metrics.json").read_text())
    return metrics.get("final_val_dice")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    start(cfg, TrainAppSchema, tensorflow=True)
    with user_errors():
        return run(cfg)


def main() -> float | None:
    """Console entry point (config errors Hydra finds end in one line, too)."""
    return run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
