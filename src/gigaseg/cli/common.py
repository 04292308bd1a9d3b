"""What every Hydra entry point shares: the config folder, the project root, one-line errors."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

import gigaseg.cli.schema  # noqa: F401  (registers the configs' schemas before Hydra composes)
from gigaseg.errors import GigasegError

log = logging.getLogger("gigaseg")


#: The file whose folder marks a gigaseg checkout or project (DVC's record of its data).
PROJECT_MARKER = "data.dvc"
#: The configs installed with the package (the checkout's ``conf/``, as the package ``gigaseg.conf``).
PACKAGE_CONFIGS = "pkg://gigaseg.conf"


def project_root() -> Path:
    """Where outputs, data and the default MLflow store go.

    ``GIGASEG_ROOT`` if set, else the nearest folder at or above the working folder that holds
    ``data.dvc`` (a checkout), else the working folder; never the installed package.
    """
    env = os.environ.get("GIGASEG_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / PROJECT_MARKER).is_file():
            return folder
    return here


def config_path() -> str:
    """Hydra's primary config folder: the project's own ``conf/`` when it has one (a checkout, or a
    copy of it), else the configs installed with the package. ``--config-dir`` adds a user's own."""
    local = project_root() / "conf"
    return str(local) if (local / "config.yaml").is_file() else PACKAGE_CONFIGS


#: Resolved when an entry point is imported, as ``@hydra.main`` needs it.
CONFIG_PATH = config_path()


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


#: How a type check names what it expected, by OmegaConf's word for the type.
_EXPECTED = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def typed_message(exc: BaseException) -> str | None:
    """A wrong type or an unknown key in one line naming the key, the value and what is expected; None for other errors."""
    import re

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = exc if isinstance(exc, (ValidationError, ConfigKeyError, ConfigAttributeError)) else exc.__cause__
    key = getattr(cause, "full_key", None)
    if not key:
        return None
    if isinstance(cause, ValidationError):
        words = str(getattr(cause, "msg", cause)).splitlines()[0]
        converted = re.search(r"could not be converted to (\w+)|is not a valid (\w+)|Cannot convert '\w+' to (\w+)", words)
        if converted:
            word = converted.group(1) or (converted.group(2) or converted.group(3)).capitalize()
            expected = _EXPECTED.get(word, _EXPECTED.get(word.replace("Bool", "Boolean"), word.lower()))
        elif "is not a ListConfig, list or tuple" in words:
            expected = "a list, e.g. [a, b]"
        elif "Non optional field cannot be assigned None" in words:
            expected = "a value (it cannot be null)"
        else:  # e.g. a mapping with a key its schema lacks: OmegaConf's own words say more
            return None
        return f"{key}={getattr(cause, 'value', '')!s}: expected {expected}; fix the value in the override or config file"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        owner = getattr(cause, "object_type", None)
        parent = key.rpartition(".")[0]
        if dataclasses.is_dataclass(owner):
            options = ", ".join(f.name for f in dataclasses.fields(owner))
            return f"{key} is not an option{f' of {parent}' if parent else ''}; the options are: {options}"
        return f"{key} is not an option; check its spelling against the config files"
    return None


def hydra_message(exc: BaseException) -> str:
    """A Hydra or OmegaConf error (unknown group option, bad override, ...) in one line.

    Hydra's own report spans several lines (the options of a group one per line, the
    config search path); here they are joined, and the search path is left out.
    """
    from omegaconf.errors import OmegaConfBaseException

    typed = typed_message(exc)
    if typed:
        return typed

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
    if "Could not find 'hydra/sweeper/optuna'" in str(exc):
        parts.append("the Optuna sweeper is an extra: pip install 'gigaseg[optuna]'")
    return "; ".join(parts) or type(exc).__name__


#: ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``: a registered model's version (not a logged model's id).
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def resolve_model(uri: str, tracking_uri: str, into: Path) -> Path:
    """A local path for a model URI: ``runs:/`` and ``models:/`` (and other MLflow URIs) are downloaded into ``into``.

    A registered model's alias or version is looked up first, so an unknown name, alias or
    version is named in one line with what the registry holds instead.
    """
    from gigaseg.inference import ModelError

    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" not in uri and not uri.startswith(("runs:/", "models:/")):
        return Path(uri).expanduser()
    from mlflow.artifacts import download_artifacts

    from gigaseg.tracking import TrackingError, registered_version, version_download_uri

    asked = uri
    registered = _REGISTERED.match(uri)
    if registered:
        name, alias = registered["name"], registered["alias"]
        try:
            version = registered_version(tracking_uri, name, alias=alias, version=registered["version"])
        except TrackingError as exc:
            raise ModelError(f"model_uri={uri}: {exc}") from exc
        if alias:
            log.info("model_uri=%s is version %s of %s", uri, version, name)
        uri = version_download_uri(tracking_uri, name, version)
    try:
        return Path(download_artifacts(artifact_uri=uri, dst_path=str(into), tracking_uri=tracking_uri))
    except Exception as exc:  # MLflow raises MlflowException, OSError, REST errors, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model_uri={asked}: cannot fetch it from the MLflow store {tracking_uri} ({first})") from exc


#: TensorFlow's start-up lines on a machine without a GPU: its native logging ignores
#: TF_CPP_MIN_LOG_LEVEL since it moved to absl (TensorFlow 2.19 and later).
_TF_NOISE = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|cudart_stub|cpu_feature_guard|To enable the following instructions"
    r"|failed call to cuInit|Could not find cuda drivers|Unable to register cu(DNN|BLAS|FFT) factory"
)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and find its devices with the native stderr captured, and pass on what is not start-up noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # initialises the platforms, which log too
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        for line in sink.read().decode(errors="replace").splitlines():
            if line.strip() and not _TF_NOISE.search(line):
                print(line, file=sys.stderr)


def start(cfg: DictConfig, schema: type, *, tensorflow: bool = False) -> None:
    """What every ``@hydra.main`` function does first: check the config, quiet TensorFlow unless ``verbose``.

    Hydra types the config while composing it, but ``+key=value`` adds keys past the
    schema; merging into the schema refuses those too. ``tensorflow``: the command will
    load TensorFlow, so it is loaded here, where its start-up lines can be dropped.
    """
    from omegaconf.errors import OmegaConfBaseException

    body = OmegaConf.to_container(cfg, resolve=False)
    body.pop("hydra", None)
    try:
        OmegaConf.merge(OmegaConf.structured(schema), body)
    except OmegaConfBaseException as exc:
        # Exiting here, not raising: Hydra would first print the failed job's overrides.
        log.debug("config error", exc_info=True)
        print(f"error: {hydra_message(exc)}", file=sys.stderr)
        sys.exit(2)
    if cfg.get("verbose"):
        logging.getLogger("gigaseg").setLevel(logging.DEBUG)
        return
    # The older native logging of TensorFlow still reads this (INFO and WARNING off).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if tensorflow and "tensorflow" not in sys.modules:
        import_tensorflow_quietly()


def run_hydra(hydra_main: Callable[[], Any]) -> Any:
    """Call a ``@hydra.main`` function; a config Hydra cannot compose ends in one line ``error: ...`` (status 2).

    Hydra reports composition errors (``model=nosuch``, an override it cannot parse) on
    several lines with exit status 1; other exceptions keep their traceback. A multirun that
    fails or is interrupted ends its MLflow parent run FAILED or KILLED (``gigaseg.cli.sweep``).
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gigaseg.cli.sweep import ending_parent_on_failure

    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's exceptions reach us instead of printing them
    try:
        with ending_parent_on_failure():
            return hydra_main()
    except KeyboardInterrupt:  # between jobs of a sweep, outside any job's user_errors
        print("interrupted", file=sys.stderr)
        sys.exit(130)
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
