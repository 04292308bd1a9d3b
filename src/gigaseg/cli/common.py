"""What every Hydra entry point shares: the config folder, the project root, one-line errors."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

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


def hydra_message(exc: BaseException) -> str:
    """A Hydra or OmegaConf error (unknown group option, bad override, ...) in one line.

    Hydra's own report spans several lines (the options of a group one per line, the
    config search path); here they are joined, and the search path is left out.
    """
    from omegaconf.errors import OmegaConfBaseException

    def lines(text: str) -> list[str]:
        kept = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(("Config search path", "See https://hydra.cc")):
                break
            if line and not line.startswith("object_type="):
                kept.append(line)
        return kept

    parts: list[str] = []
    listing = False
    for line in lines(str(exc)):
        if listing and " " not in line:  # an item of a list that follows "...:", e.g. a group's options
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
            continue
        listing = line.endswith(":")
        parts.append(line.rstrip("."))
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException):
        parts.extend(line.rstrip(".") for line in lines(str(cause)))
    return "; ".join(parts) or type(exc).__name__


def run_hydra(hydra_main: Callable[[], Any]) -> Any:
    """Call a ``@hydra.main`` function; a config Hydra cannot compose ends in one line ``error: ...`` (status 2).

    Hydra reports composition errors (``model=nosuch``, an override it cannot parse) on
    several lines with exit status 1; other exceptions keep their traceback.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's exceptions reach us instead of printing them
    try:
        return hydra_main()
    except (HydraException, OmegaConfBaseException) as exc:
        if previous:  # the user asked Hydra for the full traceback
            raise
        log.debug("config error", exc_info=True)
        print(f"error: {hydra_message(exc)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can cause into one line on stderr and exit status 2."""
    try:
        yield
    except GigasegError as exc:
        log.debug("user error", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a file system error no code named more precisely: still one line
        log.debug("OS error", exc_info=True)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
