"""Label settings and prepared masks with an ignore value: GeoJSON classes, mask images, manifests."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_geojson import feature, polygon, rect, write

from gigaseg.data import (
    GeoJSONMask,
    LabelClasses,
    MaskImage,
    RegionSpec,
    count_labels,
    fit_region,
    load_region,
    prepare_region,
    rasterise_labels,
)
from gigaseg.errors import ConfigError, MaskError
from gigaseg.slides.array_reader import ArrayReader


def labels_grid(text: str) -> np.ndarray:
    """A hand-drawn label mask: '.' is 0 (background), '#' is 1 (tissue), 'x' is 255 (ignore)."""
    values = {".": 0, "#": 1, "x": 255}
    return np.array([[values[ch] for ch in line.strip()] for line in text.strip().splitlines()], dtype=np.uint8)


def read_mask(source, tmp_path, size=(10, 8)):
    """Attach ``source`` to a blank level-0 slide and read its whole ``size`` (w, h) mask."""
    reader = ArrayReader(np.zeros((size[1], size[0], 3), np.uint8))
    source.attach(reader, fit_region(reader, RegionSpec(0, 0, *size), total_stride=1), tmp_path)
    return source.read((0, 0), 0, size)


# Tissue cols 1..8, rows 1..6; a lumen (background) cols 2..4, rows 2..3; a fold (ignore) cols 4..6,
# rows 3..5 overlapping both. Written ignore first, so the file's order is not what decides.
ANNOTATIONS = [
    feature(polygon(rect(4, 3, 7, 6)), "Fold"),
    feature(polygon(rect(2, 2, 5, 4)), "Lumen"),
    feature(polygon(rect(1, 1, 9, 7)), "Tumor"),
]
OVERLAPS = labels_grid(
    """
    ..........
    .########.
    .#...####.
    .#..xxx##.
    .###xxx##.
    .###xxx##.
    .########.
    ..........
    """
)


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize("labels, message", [
    (LabelClasses(tissue=("Tumor",), background=("Tumor",)), r"labels.tissue and labels.background both name class 'Tumor'"),
    (LabelClasses(background=("Fold",), ignore=("Fold",)), r"labels.background and labels.ignore both name class 'Fold'"),
    (LabelClasses(unannotated="unknown"), r"labels.unannotated 'unknown' is unknown; choose one of background, ignore"),
    (LabelClasses(tissue=()), r"labels.tissue is an empty list"),
    (LabelClasses(ignore="Fold"), r"labels.ignore must be a list of QuPath class names"),
    (LabelClasses(background=("",)), r"labels.background must hold non-empty class names"),
])
def test_inconsistent_settings_name_the_option(labels, message):
    with pytest.raises(ConfigError, match=message):
        labels.validate()


def test_settings_roles_and_description():
    labels = LabelClasses(tissue=["Tumor", "Stroma"], background=["Lumen"], ignore=["Fold"], unannotated="ignore")
    labels.validate(where="data.mask")
    assert labels.tissue == ("Tumor", "Stroma")  # lists from a config become tuples
    assert [labels.role(c) for c in ("Tumor", "Lumen", "Fold", "Other", None)] == \
        ["tissue", "background", "ignore", None, None]
    every = LabelClasses(background=("Lumen",))
    assert [every.role(c) for c in ("Tumor", "Lumen", None)] == ["tissue", "background", "tissue"]
    assert labels.describe() == {"tissue": ["Tumor", "Stroma"], "background": ["Lumen"], "ignore": ["Fold"],
                                 "unannotated": "ignore"}
    with pytest.raises(ConfigError, match="data.mask.tissue and data.mask.ignore both name class 'Fold'"):
        LabelClasses(tissue=("Fold",), ignore=("Fold",)).validate(where="data.mask")


def test_count_labels():
    counts = count_labels(OVERLAPS)
    assert counts == (80 - 48 + 5, 48 - 5 - 9, 9)  # (background, tissue, ignore)
    assert counts.labelled == 80 - 9


# ---------------------------------------------------------------- GeoJSON

def test_geojson_classes_to_labels_with_precedence(tmp_path):
    labels = LabelClasses(tissue=("Tumor",), background=("Lumen",), ignore=("Fold",))
    source = GeoJSONMask(write(tmp_path, {"type": "FeatureCollection", "features": ANNOTATIONS}), labels=labels)
    np.testing.assert_array_equal(read_mask(source, tmp_path), OVERLAPS)
    assert source.produces_ignore
    desc = source.describe()
    assert desc["labels"] == labels.describe()
    assert desc["polygons"] == {"tissue": 1, "background": 1, "ignore": 1}
    assert desc["classes_used"] == ["Fold", "Lumen", "Tumor"]


def test_default_settings_make_every_annotation_tissue(tmp_path):
    # The plain tissue mask of before: the union of all annotations, unclassified included.
    features = ANNOTATIONS + [feature(polygon(rect(0, 7, 3, 8)))]
    mask = read_mask(GeoJSONMask(write(tmp_path, features)), tmp_path)
    expected = np.zeros((8, 10), np.uint8)
    expected[1:7, 1:9] = 1
    expected[7, 0:3] = 1
    np.testing.assert_array_equal(mask, expected)


def test_unclassified_annotations_are_tissue_unless_tissue_classes_are_named(tmp_path):
    features = ANNOTATIONS + [feature(polygon(rect(0, 7, 3, 8)))]  # unclassified: row 7, cols 0..2
    path = write(tmp_path, features)
    every = read_mask(GeoJSONMask(path, labels=LabelClasses(background=("Lumen",), ignore=("Fold",))), tmp_path)
    expected = OVERLAPS.copy()
    expected[7, 0:3] = 1
    np.testing.assert_array_equal(every, expected)
    # Named tissue classes are the only tissue: the unclassified outline is not used.
    named = LabelClasses(tissue=("Tumor",), background=("Lumen",), ignore=("Fold",))
    np.testing.assert_array_equal(read_mask(GeoJSONMask(path, labels=named), tmp_path), OVERLAPS)


def test_unannotated_ignore_and_holes(tmp_path):
    # A tissue outline with a hole, a background patch, the rest unannotated: all but the two are ignore.
    features = [
        feature(polygon(rect(1, 1, 8, 7), rect(3, 3, 5, 5)), "Tissue"),
        feature(polygon(rect(8, 0, 10, 2)), "Glass"),
    ]
    labels = LabelClasses(background=("Glass",), unannotated="ignore")
    source = GeoJSONMask(write(tmp_path, features), labels=labels)
    expected = labels_grid(
        """
        xxxxxxxx..
        x#######..
        x#######xx
        x##xx###xx
        x##xx###xx
        x#######xx
        x#######xx
        xxxxxxxxxx
        """
    )
    np.testing.assert_array_equal(read_mask(source, tmp_path), expected)
    assert source.produces_ignore


def test_tiles_agree_with_the_whole_mask(tmp_path):
    rng = np.random.default_rng(3)
    features = []
    for i in range(12):
        x, y = rng.uniform(-5, 60, 2)
        w, h = rng.uniform(3, 30, 2)
        features.append(feature(polygon(rect(x, y, x + w, y + h)), ("Tumor", "Lumen", "Fold")[i % 3]))
    labels = LabelClasses(tissue=("Tumor",), background=("Lumen",), ignore=("Fold",), unannotated="ignore")
    source = GeoJSONMask(write(tmp_path, features), labels=labels)
    whole = rasterise_labels(source.layers, (2, 1), 1.0, (70, 60), unannotated=255)
    assert set(np.unique(whole)) == {0, 1, 255}
    tiled = np.zeros_like(whole)
    for r0, r1 in ((0, 17), (17, 60)):
        for c0, c1 in ((0, 33), (33, 34), (34, 70)):
            tiled[r0:r1, c0:c1] = rasterise_labels(source.layers, (2 + c0, 1 + r0), 1.0, (c1 - c0, r1 - r0),
                                                   unannotated=255)
    np.testing.assert_array_equal(tiled, whole)


def test_classes_argument_means_tissue_classes(tmp_path):
    path = write(tmp_path, ANNOTATIONS)
    old = read_mask(GeoJSONMask(path, classes=["Tumor"]), tmp_path)
    new = read_mask(GeoJSONMask(path, labels=LabelClasses(tissue=("Tumor",))), tmp_path)
    np.testing.assert_array_equal(old, new)
    assert old.sum() == 48 and old.max() == 1
    with pytest.raises(ConfigError, match="not both"):
        GeoJSONMask(path, classes=["Tumor"], labels=LabelClasses())
    with pytest.raises(ConfigError, match="labels.unannotated"):
        GeoJSONMask(path, labels=LabelClasses(unannotated="tissue"))


def test_unknown_class_names_are_refused_in_one_message(tmp_path):
    path = write(tmp_path, ANNOTATIONS + [feature(polygon(rect(0, 7, 3, 8)))], name="slide 7.geojson")
    labels = LabelClasses(tissue=("Tumor", "tumour"), ignore=("Folds",))
    with pytest.raises(MaskError) as caught:
        GeoJSONMask(path, labels=labels)
    message = str(caught.value)
    assert message == (
        "annotation file slide 7.geojson: no annotation of class 'tumour' (named as tissue), 'Folds' (named as "
        "ignore); classes in the file: 'Fold', 'Lumen', 'Tumor' (and unclassified annotations); check the "
        "spelling (QuPath class names are case-sensitive)"
    )
    # The older classes= argument is held to the same rule.
    with pytest.raises(MaskError, match="no annotation of class 'Stroma' \\(named as tissue\\)"):
        GeoJSONMask(path, classes=["Tumor", "Stroma"])


def test_a_mask_without_tissue_annotations_is_warned_about(tmp_path, caplog):
    labels = LabelClasses(tissue=("Tumor",), background=("Lumen",), ignore=("Fold",))
    with caplog.at_level(logging.WARNING, logger="gigaseg.data.geojson"):
        GeoJSONMask(write(tmp_path, ANNOTATIONS[:2] + [feature(polygon(rect(1, 1, 2, 2)), "Tumor")]), labels=labels)
    assert not caplog.records
    # Every class is background or ignore, and no unclassified annotation: a mask without tissue.
    with caplog.at_level(logging.WARNING, logger="gigaseg.data.geojson"):
        source = GeoJSONMask(write(tmp_path, ANNOTATIONS[:2]), labels=LabelClasses(background=("Lumen",),
                                                                                     ignore=("Fold",)))
    assert "no annotation is tissue" in caplog.text
    assert 1 not in read_mask(source, tmp_path)


# ---------------------------------------------------------------- mask images

@pytest.fixture
def reader():
    return ArrayReader(np.full((80, 120, 3), 240, np.uint8), levels=2, mpp=0.5)


def attach_image(source, reader, tmp_path, size=(20, 30)):
    region = fit_region(reader, RegionSpec(0, 0, *size, level=1), total_stride=1)
    source.attach(reader, region, tmp_path)
    return source.read((0, 0), 1, size)


@pytest.mark.parametrize("tissue, ignore, suffix", [(1, 2, ".png"), (255, 128, ".png"), (1, 2, ".tif"),
                                                    (1, 255, ".tif")])
def test_mask_image_with_an_ignore_value(tmp_path, reader, tissue, ignore, suffix):
    rng = np.random.default_rng(0)
    truth = rng.choice(np.array([0, 1, 255], np.uint8), size=(30, 20))
    image = np.select([truth == 1, truth == 255], [tissue, ignore], 0).astype(np.uint8)
    path = tmp_path / f"mask{suffix}"
    if suffix == ".png":
        Image.fromarray(image).save(path)
    else:
        tifffile.imwrite(path, image)
    source = MaskImage(path, ignore_value=ignore)
    assert source.produces_ignore
    np.testing.assert_array_equal(attach_image(source, reader, tmp_path), truth)
    desc = source.describe()
    assert desc["ignore_value"] == ignore and desc["values"] == ("0/255" if tissue == 255 else "0/1")


def test_mask_image_ignore_value_checks(tmp_path, reader):
    image = np.zeros((30, 20), np.uint8)
    image.flat[:4] = (1, 2, 3, 0)
    path = tmp_path / "mask.png"
    Image.fromarray(image).save(path)
    with pytest.raises(MaskError, match=r"has values \{0, 1, 2, 3\}; a mask must hold only 0/1 or only 0/255, "
                                        r"and the ignore value 2"):
        attach_image(MaskImage(path, ignore_value=2), reader, tmp_path)
    # Without an ignore value, a third value is refused as before.
    image.flat[2] = 0
    Image.fromarray(image).save(path)
    with pytest.raises(MaskError, match=r"has values \{0, 1, 2\}; a mask must hold only 0/1 or only 0/255$"):
        attach_image(MaskImage(path), reader, tmp_path)
    assert MaskImage(path).produces_ignore is False
    for bad in (0, -1, True, 2.5, "2"):
        with pytest.raises(ConfigError, match="ignore_value must be a positive integer"):
            MaskImage(path, ignore_value=bad)


# ---------------------------------------------------------------- prepared regions

def test_manifest_counts_labelled_pixels_and_records_the_settings(tmp_path):
    slide = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    reader = ArrayReader(slide, levels=2)
    labels = LabelClasses(tissue=("Tumor",), background=("Lumen",), ignore=("Fold",), unannotated="ignore")
    features = [
        feature(polygon(rect(4, 4, 40, 30)), "Tumor"),
        feature(polygon(rect(10, 10, 20, 20)), "Lumen"),
        feature(polygon(rect(30, 0, 50, 12)), "Fold"),
    ]
    source = GeoJSONMask(write(tmp_path, features), labels=labels)
    # Level 1 (downsample 2), 25 x 17 padded to 32 x 24: padding is background, hence labelled.
    manifest = prepare_region(reader, RegionSpec(0, 0, 25, 17, level=1), source, tmp_path / "r",
                              total_stride=8, tile_size=8)
    region = load_region(tmp_path / "r")
    mask = np.asarray(region.mask)
    assert set(np.unique(mask)) == {0, 1, 255}
    assert manifest["labelled_pixels"] == int(np.isin(mask, (0, 1)).sum()) == region.manifest["labelled_pixels"]
    assert manifest["tissue_fraction"] == pytest.approx((mask == 1).mean())
    assert manifest["mask"]["labels"] == labels.describe()
    np.testing.assert_array_equal(mask[:17, :25], rasterise_labels(source.layers, (0, 0), 2.0, (25, 17),
                                                                  unannotated=255))
    assert not mask[17:].any() and not mask[:, 25:].any()


def test_region_without_labelled_pixels_is_prepared_with_a_warning(tmp_path, caplog):
    reader = ArrayReader(np.zeros((32, 32, 3), np.uint8))
    # The only annotation lies beside the region: everything in it is unannotated, so ignore.
    path = write(tmp_path, [feature(polygon(rect(20, 20, 30, 30)), "Tumor")])
    source = GeoJSONMask(path, labels=LabelClasses(unannotated="ignore"))
    with caplog.at_level(logging.WARNING, logger="gigaseg.data.prepare"):
        manifest = prepare_region(reader, RegionSpec(0, 0, 16, 16), source, tmp_path / "r", total_stride=16)
    assert manifest["labelled_pixels"] == 0 and manifest["tissue_fraction"] == 0
    assert (np.asarray(load_region(tmp_path / "r").mask) == 255).all()
    assert "no labelled pixel" in caplog.text and str(tmp_path / "r") in caplog.text
