"""Shared test helpers: composing the real Hydra config with overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# Keep TensorFlow quiet and single-threaded enough for a 2-core machine.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def command_env(database: Path) -> dict[str, str]:
    """The environment for running a command as a subprocess against its own SQLite MLflow store."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{database}", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_RUN_ID", None)  # never adopt a run of an outer `mlflow run`
    return env


def checkpoint_step(path: Path) -> int:
    """The step of the checkpoint at ``path``; 0 while there is none, or only a partial one."""
    from gigaseg.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path).step
    except CheckpointError:
        return 0


@pytest.fixture(scope="module")
def model():
    """The default ``gigaunet`` with seed-0 weights, one per test module (a module's own ``model`` fixture wins)."""
    import keras

    from gigaseg.model import build_unet

    keras.utils.set_random_seed(0)
    return build_unet()


@pytest.fixture
def compose():
    """Compose ``conf/config.yaml`` with overrides, as the entry points do."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import gigaseg.cli.common  # noqa: F401  (registers the resolvers and the schemas)

    def _compose(overrides=(), return_hydra_config=False):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="gigaseg.conf", version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()
