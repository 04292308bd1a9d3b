"""What every Hydra entry point shares: the config folder, the project root, one-line errors."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from gigaseg.errors import GigasegError

log = logging.getLogger("gigaseg")


def project_root() -> Path:
    """The folder holding ``conf/``: ``GIGASEG_ROOT`` if set, else this checkout."""
    env = os.environ.get("GIGASEG_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[3]


def config_dir() -> str:
    """Absolute path of the Hydra config folder."""
    return str(project_root() / "conf")


def artifacts_beside_store(tracking_uri: str) -> str | None:
    """``mlartifacts/`` beside a local SQLite store's file; None (MLflow's default) for other stores."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = tracking_uri[len(prefix):]
    if not database or database == ":memory:":
        return None
    return str(Path(database).resolve().parent / "mlartifacts")


if not OmegaConf.has_resolver("gigaseg_project_root"):
    OmegaConf.register_new_resolver("gigaseg_project_root", lambda: str(project_root()))
if not OmegaConf.has_resolver("gigaseg_artifacts_beside"):
    OmegaConf.register_new_resolver("gigaseg_artifacts_beside", artifacts_beside_store)


def to_plain(cfg: Any) -> Any:
    """A resolved plain-Python copy of a config node (dicts, lists, scalars)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can cause into one line on stderr and exit status 2."""
    try:
        yield
    except GigasegError as exc:
        log.debug("user error", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
