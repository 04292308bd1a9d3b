"""The typed schemas of every command's config, registered with Hydra's ConfigStore.

The option dataclasses of the library (``gigaseg.options``, ``RegionRequest``,
``SyntheticRecipe``, ``DistributedConfig``) carry the types and the defaults; here they are
assembled into one schema per command. The YAML files under ``conf/`` only choose values, so
a value of the wrong type or an unknown key is refused while Hydra composes the config.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from gigaseg.data.labels import LabelClasses
from gigaseg.dataset import DatasetSpec, RegionRequest, SyntheticRecipe
from gigaseg.distributed import DistributedConfig
from gigaseg.options import DEFAULT_PAD_VALUE, PredictOptions, TrainConfig, UNetLayout

#: The root config names of the commands' schemas (the first entry of their defaults lists).
TRAIN_SCHEMA = "train_schema"
PREDICT_SCHEMA = "predict_schema"
EVALUATE_SCHEMA = "evaluate_schema"
EXPORT_SCHEMA = "export_schema"
VIEW_SCHEMA = "view_schema"


def mirror(cls: type, name: str, *, drop: tuple[str, ...] = (), replace: dict[str, tuple[Any, Any]] | None = None) -> type:
    """A mutable dataclass with ``cls``'s fields, types and defaults (minus ``drop``, with ``replace``'s (type, default)).

    OmegaConf makes a frozen dataclass read-only, and Hydra merges the YAML files and the
    command line into the schema, so frozen option classes are mirrored instead of reused.
    """
    hints = typing.get_type_hints(cls)
    replace = replace or {}
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in drop:
            continue
        kind, default = replace.get(f.name, (hints[f.name], f.default))
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            specs.append((f.name, kind, field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, kind, field(default=MISSING if default is dataclasses.MISSING else default)))
    made = dataclasses.make_dataclass(name, specs)
    made.__module__ = __name__
    return made


# A region's name is its key under data.regions, or given (else its kind) in a list of regions.
RegionSchema = mirror(RegionRequest, "RegionSchema", replace={"name": (Optional[str], None)})
SyntheticSchema = mirror(SyntheticRecipe, "SyntheticSchema")


@dataclass
class PathsSchema:
    #: The project root: GIGASEG_ROOT, else the checkout above the working folder, else the working folder.
    root: str = "${gigaseg_project_root:}"
    data_dir: str = "${paths.root}/data"


@dataclass
class MlflowSchema:
    #: Local SQLite store by default; set MLFLOW_TRACKING_URI to use a server instead.
    tracking_uri: str = "${oc.env:MLFLOW_TRACKING_URI,sqlite:///${paths.root}/mlflow.db}"
    experiment_name: str = "gigaseg"
    #: Artifacts of new experiments on a local SQLite store go to mlartifacts/ beside the
    #: database file (None for tracking servers, which choose their own).
    artifact_location: Optional[str] = "${gigaseg_artifacts_beside:${mlflow.tracking_uri}}"
    run_name: Optional[str] = None
    #: MLflow's own CPU/memory sampling, logged as system/* metrics.
    log_system_metrics: bool = True


@dataclass
class TrainMlflowSchema(MlflowSchema):
    #: Register the logged model (the best by validation Dice) under this name in the model
    #: registry, as a new version; None: no registration.
    register_as: Optional[str] = None
    #: The alias the new version gets (models:/<register_as>@<alias>); it moves from any older version.
    alias: str = "champion"


@dataclass
class SlideSchema:
    #: Any slide OpenSlide opens (the single-slide form; a cohort lists slides, a glob or a table instead).
    path: Optional[str] = None
    #: Generate the slide from this recipe when it is missing; None for a real slide.
    synthetic: Optional[SyntheticSchema] = None  # type: ignore[valid-type]


@dataclass
class MaskSchema:
    #: synthetic (the generator's truth) | geojson (QuPath export) | image | bootstrap (Otsu)
    source: str = DatasetSpec.mask_source
    path: Optional[str] = None
    #: GeoJSON: QuPath classes counted as tissue; None: every class not named below (unclassified: tissue).
    classes: Optional[list[str]] = None
    #: GeoJSON: classes that are background (a lumen, a hole) and classes not to learn from (label 255).
    #: Overlaps resolve ignore > background > tissue.
    background_classes: list[str] = field(default_factory=list)
    ignore_classes: list[str] = field(default_factory=list)
    #: GeoJSON: what pixels outside every annotation are: background, or ignore for sparse annotations.
    unannotated: str = LabelClasses.unannotated
    #: Mask images: a value that means "not labelled" (0/1 or 0/255 keep meaning tissue).
    ignore_value: Optional[int] = None


@dataclass
class CohortSlideSchema:
    """One slide of data.slides."""

    #: Any slide OpenSlide opens.
    path: str = MISSING
    #: Its folder under data.dir, and how metrics name it; None: the file name without its extension.
    name: Optional[str] = None
    #: train | val | test
    split: str = "train"
    #: Its labels; None: data.mask ({stem} in data.mask.path becomes the slide's file stem).
    mask: Optional[MaskSchema] = None
    #: Its regions; None: data.slide_regions.
    regions: Optional[list[RegionSchema]] = None  # type: ignore[valid-type]
    #: Generate the slide from this recipe when it is missing.
    synthetic: Optional[SyntheticSchema] = None  # type: ignore[valid-type]


@dataclass
class DataSchema:
    """A cohort: data.slides, data.glob or data.table; or one slide (data.slide) with data.regions."""

    name: str = MISSING
    dir: str = "${paths.data_dir}/${data.name}"
    #: Where the prepared regions go: <prepared_dir>/<slide>/<region>/ and the index cohort.json.
    prepared_dir: str = "${data.dir}/prepared"
    #: The cohort as a list of slides, each with its split.
    slides: list[CohortSlideSchema] = field(default_factory=list)
    #: Or a folder or glob of slides: every slide is in train but those named in val_slides / test_slides.
    glob: Optional[str] = None
    val_slides: list[str] = field(default_factory=list)
    test_slides: list[str] = field(default_factory=list)
    #: Or a CSV/YAML table: columns slide, split, and optionally name, mask_source, mask_path, regions, mpp.
    table: Optional[str] = None
    #: The regions of a cohort slide that names none.
    slide_regions: list[RegionSchema] = field(  # type: ignore[valid-type]
        default_factory=lambda: [RegionSchema(name="auto", kind="auto")])
    #: The single-slide form: one slide, regions named train (and val, test) under data.regions.
    slide: SlideSchema = field(default_factory=SlideSchema)
    regions: dict[str, RegionSchema] = field(default_factory=dict)  # type: ignore[valid-type]
    #: Labels of every slide that gives none of its own.
    mask: MaskSchema = field(default_factory=MaskSchema)
    #: Regions must be multiples of the model's total stride: pad (with pad_value) or crop.
    fit: str = DatasetSpec.fit
    pad_value: tuple[int, ...] = DEFAULT_PAD_VALUE
    #: Cap region sizes (height, width); debug=smoke sets it.
    max_region: Optional[tuple[int, ...]] = None
    #: Keep each region's decoded pixels (image.npy, 3 bytes a pixel) instead of reading windows from the slide.
    decoded_cache: bool = DatasetSpec.decoded_cache


@dataclass
class TrainSchema(TrainConfig):
    #: An MLflow run id to continue from its last checkpoint, or auto (the newest unfinished run of this config).
    resume: Optional[str] = None
    log_model: bool = True


@dataclass
class CommonSchema:
    paths: PathsSchema = field(default_factory=PathsSchema)
    mlflow: MlflowSchema = field(default_factory=MlflowSchema)
    #: Show TensorFlow's start-up lines and debug logging.
    verbose: bool = False


@dataclass
class TrainAppSchema(CommonSchema):
    """gigaseg-prepare and gigaseg-train."""

    mlflow: TrainMlflowSchema = field(default_factory=TrainMlflowSchema)
    model: UNetLayout = field(default_factory=UNetLayout)
    data: DataSchema = field(default_factory=DataSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


_PredictOptionsSchema = mirror(
    PredictOptions, "PredictOptionsSchema",
    # None: the threshold recorded with the model.
    replace={"threshold": (Optional[float], None)},
)


@dataclass
class PredictAppSchema(CommonSchema, _PredictOptionsSchema):  # type: ignore[misc, valid-type]
    """gigaseg-predict."""

    #: runs:/<run id>/model, models:/<name>/<version or @alias>, an MLflow model folder or a .keras file.
    model_uri: str = MISSING
    #: Any slide OpenSlide opens.
    slide: str = MISSING
    #: Where mask.tiff, outlines.geojson, overlay.png and summary.json go; None: the Hydra run folder.
    output_dir: Optional[str] = None
    #: Log a predict run to MLflow (params, metrics, summary, outlines, overlay); the mask TIFF too with log_mask.
    log_mlflow: bool = True
    log_mask: bool = False


@dataclass
class EvaluateAppSchema(CommonSchema):
    """gigaseg-evaluate."""

    mlflow: MlflowSchema = field(default_factory=lambda: MlflowSchema(log_system_metrics=False))
    #: The predicted mask: the TIFF gigaseg-predict writes (or its folder), or any 0/1 or 0/255 mask image.
    prediction: Optional[str] = None
    #: The reference: a mask image, a QuPath GeoJSON (level-0 coordinates) or synthetic truth.
    reference: Optional[str] = None
    #: auto | mask | geojson | synthetic (auto: .geojson/.json is GeoJSON, a synthetic mask TIFF is synthetic, else a mask image).
    reference_type: str = "auto"
    #: Probability cut for probability masks; None: the one recorded in the prediction (else 0.5).
    threshold: Optional[float] = None
    #: GeoJSON classes to keep (e.g. [Tissue]); None keeps every annotation.
    classes: Optional[list[str]] = None
    #: Where evaluation.json and pieces.csv go; None: the Hydra run folder.
    output_dir: Optional[str] = None
    #: Write them into the prediction's own folder instead, beside its summary.json, where gigaseg-view finds them.
    beside_prediction: bool = False
    #: Pieces are found on blocks of pixels so that at most this many blocks are labelled.
    max_piece_pixels: int = 2**24
    log_mlflow: bool = True


@dataclass
class ExportAppSchema(CommonSchema):
    """gigaseg-export."""

    #: runs:/<run id>/model, models:/<name>/<version or @alias>, an MLflow model folder or a .keras file.
    model_uri: str = MISSING
    #: The Keras file to write (its name ends in .keras); an existing file is replaced.
    out: str = MISSING


@dataclass
class ViewAppSchema(CommonSchema):
    """gigaseg-view."""

    #: A folder gigaseg-predict wrote, or a folder of them (a multirun); or give run_id instead.
    dir: Optional[str] = None
    #: An MLflow gigaseg-predict run: its summary, outlines, overlay (and mask, logged with log_mask=true).
    run_id: Optional[str] = None
    #: The interface to serve on: 127.0.0.1 keeps the viewer on this machine (any other is warned about).
    host: str = "127.0.0.1"
    #: 0 picks a free port; the URL is printed.
    port: int = 0
    #: Encoded tiles kept in memory, in MiB.
    cache_mb: int = 128


def register() -> None:
    """Store the schemas under the names the primary configs' defaults lists use."""
    store = ConfigStore.instance()
    store.store(name=TRAIN_SCHEMA, node=TrainAppSchema)
    store.store(name=PREDICT_SCHEMA, node=PredictAppSchema)
    store.store(name=EVALUATE_SCHEMA, node=EvaluateAppSchema)
    store.store(name=EXPORT_SCHEMA, node=ExportAppSchema)
    store.store(name=VIEW_SCHEMA, node=ViewAppSchema)


register()
