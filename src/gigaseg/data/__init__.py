"""Regions of slides prepared for training: region specs, mask sources, manifests."""

from gigaseg.data.bootstrap import BootstrapMask
from gigaseg.data.geojson import (
    GeoJSONMask,
    LabelledPolygons,
    load_annotations,
    load_labelled,
    parse_annotations,
    parse_labelled,
    rasterise,
    rasterise_labels,
)
from gigaseg.data.labels import (
    BACKGROUND,
    IGNORE,
    TISSUE,
    LabelClasses,
    LabelCounts,
    count_labels,
)
from gigaseg.data.masks import MaskImage, MaskSource, SyntheticMask
from gigaseg.data.prepare import Region, load_region, prepare_region
from gigaseg.data.regions import DEFAULT_PAD_VALUE, FittedRegion, RegionSpec, fit_region

__all__ = [
    "BACKGROUND",
    "DEFAULT_PAD_VALUE",
    "IGNORE",
    "TISSUE",
    "BootstrapMask",
    "FittedRegion",
    "GeoJSONMask",
    "LabelClasses",
    "LabelCounts",
    "LabelledPolygons",
    "MaskImage",
    "MaskSource",
    "Region",
    "RegionSpec",
    "SyntheticMask",
    "count_labels",
    "fit_region",
    "load_annotations",
    "load_labelled",
    "load_region",
    "parse_annotations",
    "parse_labelled",
    "prepare_region",
    "rasterise",
    "rasterise_labels",
]
