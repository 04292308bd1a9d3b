"""Regions of slides prepared for training: region specs, mask sources, manifests."""

from gigaseg.data.bootstrap import BootstrapMask
from gigaseg.data.geojson import GeoJSONMask, load_annotations, parse_annotations, rasterise
from gigaseg.data.masks import MaskImage, MaskSource, SyntheticMask
from gigaseg.data.prepare import Region, load_region, prepare_region
from gigaseg.data.regions import DEFAULT_PAD_VALUE, FittedRegion, RegionSpec, fit_region

__all__ = [
    "DEFAULT_PAD_VALUE",
    "BootstrapMask",
    "FittedRegion",
    "GeoJSONMask",
    "MaskImage",
    "MaskSource",
    "Region",
    "RegionSpec",
    "SyntheticMask",
    "fit_region",
    "load_annotations",
    "load_region",
    "parse_annotations",
    "prepare_region",
    "rasterise",
]
