"""Registers the schema of the DVC pipeline's ``params.yaml`` with Hydra inside DVC's own process.

``dvc exp run`` composes ``conf/pipeline_params.yaml`` itself, and the first entry of its
defaults list is a schema that only exists once gigaseg has stored it in Hydra's ConfigStore.
DVC puts its ``hydra.plugins_path`` (the project root by default) on ``sys.path`` and lets
Hydra import every module of the ``hydra_plugins`` package it finds there, this one included.
"""

import gigaseg.cli.pipeline_schema  # noqa: F401  (stores pipeline_params_schema)
