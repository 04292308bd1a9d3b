"""Datasets as the data config describes them: every mask source through prepare_dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gigaseg.data import load_region
from gigaseg.dataset import DatasetSpec, RegionRequest, SyntheticRecipe, prepare_dataset
from gigaseg.errors import ConfigError

from conftest import FIXTURES

PROSTATE = FIXTURES / "prostate_he_pyramid.tiff"


def test_bootstrap_labels_on_the_real_prostate_slide(tmp_path):
    spec = DatasetSpec(
        out_dir=tmp_path / "prostate",
        slide_path=PROSTATE,
        mask_source="bootstrap",
        regions=[RegionRequest(name="train", x=0, y=0, width=1250, height=2500)],
    )
    manifest = prepare_dataset(spec, total_stride=64, progress=False)["train"]
    region = load_region(tmp_path / "prostate" / "train")
    assert region.image.shape == (2560, 1280, 3)  # padded up to multiples of 64
    assert manifest["region"]["padding"] == {"right": 30, "bottom": 60, "value": [242, 242, 242]}
    assert manifest["mask"]["kind"] == "bootstrap"
    assert 0.3 < np.asarray(region.mask).mean() < 0.95
    assert region.mask[-60:].max() == 0  # padding is background


def test_geojson_and_image_masks_and_smoke_shrinking(tmp_path):
    geojson = tmp_path / "annotations.geojson"
    square = [[[64, 64], [448, 64], [448, 192], [64, 192], [64, 64]]]
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}}}]}))
    common = dict(
        slide_path=tmp_path / "slide.tiff",
        synthetic=SyntheticRecipe(height=512, width=1024, seed=1, tile_size=256),
    )
    spec = DatasetSpec(
        out_dir=tmp_path / "geo", mask_source="geojson", mask_path=geojson, classes=["Tissue"],
        regions=[RegionRequest(name="train", x=0, y=0, width=512, height=256)], **common,
    )
    prepare_dataset(spec, total_stride=64, progress=False)
    mask = np.asarray(load_region(tmp_path / "geo" / "train").mask)
    expected = np.zeros((256, 512), np.uint8)
    expected[64:192, 64:448] = 1
    np.testing.assert_array_equal(mask, expected)

    png = tmp_path / "mask.png"
    Image.fromarray(expected * 255).save(png)
    spec = DatasetSpec(
        out_dir=tmp_path / "img", mask_source="image",
        regions=[RegionRequest(name="train", x=0, y=0, width=512, height=256, mask_path=str(png))], **common,
    )
    prepare_dataset(spec, total_stride=64, progress=False)
    np.testing.assert_array_equal(np.asarray(load_region(tmp_path / "img" / "train").mask), expected)

    # debug=smoke's cap: the synthetic slide and its regions are scaled down together.
    spec = DatasetSpec(
        out_dir=tmp_path / "smoke", mask_source="synthetic", mask_path=tmp_path / "smoke" / "mask.tiff",
        slide_path=tmp_path / "smoke" / "slide.tiff",
        synthetic=SyntheticRecipe(height=2048, width=8192, seed=1, tile_size=256),
        regions=[RegionRequest(name="train", x=0, y=0, width=8192, height=1024),
                 RegionRequest(name="val", x=0, y=1024, width=8192, height=1024)],
        max_region=(256, 1024),
    )
    manifests = prepare_dataset(spec, total_stride=64, progress=False)
    assert manifests["train"]["region"]["width"] == 1024 and manifests["train"]["region"]["height"] == 128
    assert manifests["val"]["region"]["y"] == 128


def test_incomplete_dataset_specs_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match="data.mask.source"):
        DatasetSpec(out_dir=tmp_path, slide_path=PROSTATE, mask_source="magic",
                    regions=[RegionRequest("train", 0, 0, 64, 64)]).validate()
    with pytest.raises(ConfigError, match="mask_path"):
        DatasetSpec(out_dir=tmp_path, slide_path=PROSTATE, mask_source="image",
                    regions=[RegionRequest("train", 0, 0, 64, 64)]).validate()
