"""The steps of the DVC pipeline (``dvc.yaml``) that no other command does on its own.

``params`` writes ``params.yaml`` as ``dvc exp run`` does (``conf/pipeline_params.yaml``
composed with Hydra overrides), ``slide`` makes only the synthetic slides, ``score`` writes the
validation metrics of a trained checkpoint. Like ``gigaseg-prepare`` and ``gigaseg-train`` in the
pipeline, ``slide`` and ``score`` compose ``conf/pipeline.yaml``: the values of ``params.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from gigaseg.atomic import atomic_path
from gigaseg.cli.common import PACKAGE_CONFIGS, config_path, project_root, to_plain, user_errors
from gigaseg.errors import ConfigError

log = logging.getLogger("gigaseg.pipeline")

#: The primary config every stage composes: the schema, common settings and params.yaml.
STAGE_CONFIG = "pipeline"
#: The primary config DVC composes into params.yaml (``hydra.config_name`` in ``.dvc/config``).
PARAMS_CONFIG = "pipeline_params"


def compose(overrides: list[str], config_name: str = STAGE_CONFIG) -> dict[str, Any]:
    """``conf/<config_name>.yaml`` composed with ``overrides`` and resolved, as plain Python."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        where = config_path()
        context = (initialize_config_module(config_module="gigaseg.conf", version_base="1.3")
                   if where == PACKAGE_CONFIGS else initialize_config_dir(config_dir=where, version_base="1.3"))
        with context:
            return to_plain(hydra_compose(config_name, overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot compose {config_name} with {' '.join(overrides) or 'no overrides'}: {exc}") from exc
    finally:
        GlobalHydra.instance().clear()


def write_params(overrides: list[str], path: Path) -> Path:
    """``params.yaml`` exactly as ``dvc exp run -S <override> ...`` writes it (DVC's own composer)."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import gigaseg.cli.pipeline_schema  # noqa: F401  (stores the schema pipeline_params.yaml names)

    where = config_path()
    if where == PACKAGE_CONFIGS:
        raise ConfigError(f"no conf/ in the project folder {project_root()}: params.yaml belongs to a checkout")
    GlobalHydra.instance().clear()
    try:
        with atomic_path(path, suffix=".yaml") as tmp:
            compose_and_dump(tmp, where, None, PARAMS_CONFIG, str(project_root()), list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot compose {PARAMS_CONFIG} with {' '.join(overrides) or 'no overrides'}: {exc}") from exc
    finally:
        GlobalHydra.instance().clear()
    return path


def make_slide(config: dict[str, Any]) -> list[dict]:
    """Generate the cohort's synthetic slides (shrunk as ``data.max_region`` asks), nothing else."""
    from gigaseg.cli.prepare import cohort_from_config
    from gigaseg.dataset import ensure_synthetic_slides

    data = config["data"]
    cohort = cohort_from_config(data)
    if not any(slide.synthetic is not None for slide in cohort.slides):
        raise ConfigError(f"data '{data.get('name')}' has no synthetic slide recipe; the slide stage only makes synthetic slides")
    max_region = None if data.get("max_region") is None else tuple(data["max_region"])
    return ensure_synthetic_slides(cohort, max_region=max_region, progress=True)


def score(config: dict[str, Any], checkpoint: Path) -> dict[str, float]:
    """Validation metrics of a checkpoint's model over the prepared cohort's validation regions."""
    from gigaseg.checkpoint import load_checkpoint, restore_weights
    from gigaseg.cli.train import cohort_regions, model_kwargs, train_config
    from gigaseg.model import build_unet
    from gigaseg.streaming import TiledEngine
    from gigaseg.training import memory_budget, validate_regions

    train = train_config(config["train"])
    _, regions, _ = cohort_regions(Path(config["data"]["prepared_dir"]))
    if not regions:
        raise ConfigError("the prepared cohort has no validation region to score; put a slide in split val")
    state = load_checkpoint(checkpoint)
    model = build_unet(**model_kwargs(config["model"]))
    restore_weights(state, model)
    engine = TiledEngine(model, loss=train.loss, tile_size=train.tile_size, budget_bytes=memory_budget(train),
                         evaluator=train.evaluator)
    metrics, _ = validate_regions(engine, regions, threshold=train.threshold)
    return {**metrics, "step": state.step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gigaseg.cli.pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    params_cmd = commands.add_parser("params", help="write params.yaml as dvc exp run composes it")
    params_cmd.add_argument("--out", type=Path, default=None, help="file to write (default: params.yaml in the project)")
    commands.add_parser("slide", help="generate the synthetic slides of params.yaml's data section")
    score_cmd = commands.add_parser("score", help="validation metrics of a checkpoint, as a DVC metrics file")
    score_cmd.add_argument("--checkpoint", type=Path, required=True)
    score_cmd.add_argument("--metrics", type=Path, required=True, help="JSON file to write")
    for command in commands.choices.values():
        command.add_argument("overrides", nargs="*", help="Hydra overrides, as for gigaseg-train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with user_errors():
        if args.command == "params":
            log.info("wrote %s", write_params(args.overrides, args.out or project_root() / "params.yaml"))
            return 0
        config = compose(args.overrides)
        if args.command == "slide":
            log.info("slide recipe: %s", make_slide(config))
        else:
            metrics = score(config, args.checkpoint)
            args.metrics.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(args.metrics) as tmp:
                tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            log.info("validation metrics: %s", json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
