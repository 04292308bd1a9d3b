"""``gigaseg-prepare``: generate or open the slide and cut the dataset's regions into ``data/``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from gigaseg.cli.common import CONFIG_PATH, run_hydra, start, to_plain, user_errors
from gigaseg.cli.schema import TrainAppSchema
from gigaseg.errors import ConfigError

log = logging.getLogger("gigaseg.prepare")


def dataset_spec(data: dict[str, Any]):
    """A DatasetSpec from the ``data`` config node."""
    from gigaseg.dataset import DatasetSpec, RegionRequest, SyntheticRecipe

    try:
        slide = data["slide"]
        mask = data["mask"]
        regions = [
            RegionRequest(name=name, **{k: v for k, v in region.items()})
            for name, region in (data.get("regions") or {}).items()
        ]
        synthetic = SyntheticRecipe(**slide["synthetic"]) if slide.get("synthetic") else None
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"the data config is incomplete or has an unknown option ({exc}); compare with conf/data/demo.yaml") from exc
    return DatasetSpec(
        out_dir=Path(data["dir"]),
        slide_path=Path(slide["path"]),
        regions=regions,
        mask_source=mask.get("source", "synthetic"),
        mask_path=None if mask.get("path") is None else Path(mask["path"]),
        classes=mask.get("classes"),
        synthetic=synthetic,
        fit=data.get("fit", "pad"),
        pad_value=tuple(data.get("pad_value", (242, 242, 242))),
        max_region=None if data.get("max_region") is None else tuple(data["max_region"]),
    )


def run(cfg: DictConfig) -> dict[str, dict]:
    from gigaseg.dataset import prepare_dataset

    plain = to_plain(cfg)
    spec = dataset_spec(plain["data"])
    # The product of the strides, without importing TensorFlow for it.
    strides = plain["model"]["strides"]
    if not isinstance(strides, list) or not strides or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0
                                                            for s in strides):
        raise ConfigError(f"model.strides must be a list of positive integers, got {strides!r}")
    stride = math.prod(strides)
    return prepare_dataset(spec, total_stride=stride, progress=True)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    start(cfg, TrainAppSchema)
    with user_errors():
        manifests = run(cfg)
        for name, manifest in manifests.items():
            region = manifest.get("region", {})
            log.info("%s: %s", name, region)


def main() -> None:
    """Console entry point: Hydra composes the config; a config it cannot compose is one line ``error: ...``."""
    run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
