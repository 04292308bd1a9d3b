"""The schema of the DVC pipeline's ``params.yaml``: gigaseg-train's config without its locations.

DVC's Hydra integration composes ``conf/pipeline_params.yaml`` into ``params.yaml`` on every
``dvc exp run`` and resolves every interpolation while it does. The project root, the MLflow
store and the data folder's default are this machine's and are resolved by our own OmegaConf
resolvers, which DVC's process does not have, so ``paths``, ``verbose`` and the MLflow store's
locations are left out; the stages add them back when they compose ``conf/pipeline.yaml``.
"""

from __future__ import annotations

import dataclasses
import typing

from hydra.core.config_store import ConfigStore

from gigaseg.cli.schema import TrainAppSchema, mirror

#: The root config name ``conf/pipeline_params.yaml`` names first in its defaults list.
PIPELINE_PARAMS_SCHEMA = "pipeline_params_schema"
#: The sections of gigaseg-train's config that ``params.yaml`` holds.
SECTIONS = ("model", "data", "train", "distributed", "mlflow")
#: MLflow options that name a place on this machine, not a value of the run.
MLFLOW_LOCATIONS = ("tracking_uri", "artifact_location")


def params_schema() -> type:
    """A dataclass with gigaseg-train's sections in SECTIONS, types and defaults taken from its schema."""
    hints = typing.get_type_hints(TrainAppSchema)
    specs = []
    for name in SECTIONS:
        kind = hints[name]
        if name == "mlflow":
            kind = mirror(kind, "MlflowParamsSchema", drop=MLFLOW_LOCATIONS)
        specs.append((name, kind, dataclasses.field(default_factory=kind)))
    made = dataclasses.make_dataclass("PipelineParamsSchema", specs)
    made.__module__ = __name__
    return made


PipelineParamsSchema = params_schema()
ConfigStore.instance().store(name=PIPELINE_PARAMS_SCHEMA, node=PipelineParamsSchema)
