"""Mask sources: mask images, the Otsu bootstrap and its tiled clean-up, synthetic truth."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from skimage import morphology

from gigaseg.data.bootstrap import BootstrapMask, filter_components, open_close, otsu_threshold, saturation
from gigaseg.data.masks import MaskImage
from gigaseg.data.regions import RegionSpec, fit_region
from gigaseg.data.tilefile import create_raw
from gigaseg.errors import MaskError
from gigaseg.slides.array_reader import ArrayReader


def attached(source, reader, spec, tmp_path, stride=1, fit="pad"):
    region = fit_region(reader, spec, total_stride=stride, fit=fit)
    source.attach(reader, region, tmp_path)
    return region


# ---------------------------------------------------------------- mask images

@pytest.fixture
def reader():
    return ArrayReader(np.full((80, 120, 3), 240, np.uint8), levels=2, mpp=0.5)


@pytest.mark.parametrize("scale, suffix", [(1, ".png"), (255, ".png"), (1, ".tif"), (255, ".tiff")])
def test_mask_image_values_and_formats(tmp_path, reader, scale, suffix):
    truth = (np.arange(30 * 20).reshape(30, 20) % 7 == 0).astype(np.uint8)
    path = tmp_path / f"mask{suffix}"
    if suffix == ".png":
        Image.fromarray(truth * scale).save(path)
    else:
        tifffile.imwrite(path, truth * scale)
    source = MaskImage(path)
    attached(source, reader, RegionSpec(10, 4, 20, 30, level=1), tmp_path)
    # Tiles are addressed like slide reads: level-0 location, level, size.
    np.testing.assert_array_equal(source.read((10, 4), 1, (20, 30)), truth)
    np.testing.assert_array_equal(source.read((10 + 2 * 5, 4 + 2 * 3), 1, (7, 11)), truth[3:14, 5:12])
    desc = source.describe()
    assert desc["values"] == ("0/1" if scale == 1 else "0/255") and len(desc["sha256"]) == 64


def test_mask_image_size_must_match_region(tmp_path, reader):
    path = tmp_path / "mask.png"
    Image.fromarray(np.zeros((30, 21), np.uint8)).save(path)
    with pytest.raises(MaskError, match=r"mask.png is 21x30 \(w x h\) but the region is 20x30 at level 1"):
        attached(MaskImage(path), reader, RegionSpec(10, 4, 20, 30, level=1), tmp_path)


def test_mask_image_with_crop_uses_requested_size(tmp_path, reader):
    truth = np.random.default_rng(1).integers(0, 2, (30, 20), dtype=np.uint8)
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, truth)
    source = MaskImage(path)
    region = attached(source, reader, RegionSpec(0, 0, 20, 30, level=1), tmp_path, stride=8, fit="crop")
    assert region.size == (16, 24)
    np.testing.assert_array_equal(source.read((0, 0), 1, region.size), truth[:24, :16])


@pytest.mark.parametrize("values, shown", [((0, 1, 255), "0, 1, 255"), ((0, 128), "0, 128"), ((0, 2), "0, 2")])
def test_mask_image_bad_values(tmp_path, reader, values, shown):
    data = np.zeros((30, 20), np.uint8)
    data.flat[: len(values)] = values
    path = tmp_path / "mask.png"
    Image.fromarray(data).save(path)
    with pytest.raises(MaskError, match=f"has values {{{shown}}}.*only 0/1 or only 0/255"):
        attached(MaskImage(path), reader, RegionSpec(0, 0, 20, 30, level=1), tmp_path)


def test_mask_image_bad_files(tmp_path, reader):
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(rgb)
    with pytest.raises(MaskError, match="colour mode RGB"):
        attached(MaskImage(rgb), reader, RegionSpec(0, 0, 20, 30, level=1), tmp_path)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all")
    with pytest.raises(MaskError, match="not a readable TIFF"):
        attached(MaskImage(junk), reader, RegionSpec(0, 0, 20, 30, level=1), tmp_path)
    with pytest.raises(MaskError, match="does not exist"):
        MaskImage(tmp_path / "missing.png")


# ---------------------------------------------------------------- bootstrap

def tissue_slide(seed=0, size=(360, 520)):
    """White noisy glass with pink blobs (one with a small hole), specks of dust and a few pink specks."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    truth = np.zeros((h, w), bool)
    for cy, cx, ry, rx in ((90, 120, 70, 100), (250, 330, 80, 150), (120, 430, 60, 45), (300, 60, 40, 40)):
        truth |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    hole = (yy - 250) ** 2 + (xx - 330) ** 2 < 5**2  # a small hole, filled by the clean-up
    image = np.empty((h, w, 3), np.float32)
    image[:] = (238, 236, 240)
    image[truth & ~hole] = (205, 120, 175)
    image += rng.normal(0, 6, image.shape)
    specks = rng.random((h, w)) < 0.002  # single pink pixels on the glass: removed by opening
    specks &= ~ndimage.binary_dilation(truth, iterations=5)
    image[specks] = (205, 120, 175)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def test_saturation_and_otsu():
    rgb = np.array([[[255, 0, 0], [100, 100, 100], [0, 0, 0], [200, 100, 100]]], np.uint8)
    np.testing.assert_array_equal(saturation(rgb), [[255, 0, 0, 128]])
    hist = np.zeros(256)
    hist[10:20] = 50
    hist[120:140] = 30
    assert 19 <= otsu_threshold(hist) < 120
    single = np.zeros(256)
    single[7] = 100
    assert otsu_threshold(single) == 7  # nothing above a single value


def bootstrap_mask(reader, spec, tmp_path, **kwargs):
    source = BootstrapMask(**kwargs)
    region = attached(source, reader, spec, tmp_path)
    try:
        return source.read((spec.x, spec.y), region.level, region.read_size), source.describe()
    finally:
        source.close()


def test_bootstrap_finds_tissue(tmp_path):
    image, truth = tissue_slide()
    reader = ArrayReader(image, levels=3, mpp=1.0)
    mask, desc = bootstrap_mask(reader, RegionSpec(0, 0, 520, 360), tmp_path, view_size=128,
                                opening_radius=1.5, closing_radius=3, min_object_area=200, min_hole_area=200)
    iou = (mask.astype(bool) & truth).sum() / (mask.astype(bool) | truth).sum()
    assert iou > 0.97
    assert mask[250, 330] == 1  # the hole was filled
    assert ndimage.label(mask)[1] == 4  # four blobs, no specks
    assert desc["threshold_view"]["level"] == 2  # threshold from the coarse view
    assert 20 < desc["threshold"] < 120 and desc["units"] == "um"
    assert not list(tmp_path.glob("bootstrap-mask*")), "scratch file left behind"


def test_bootstrap_does_not_depend_on_tiling(tmp_path):
    image, _ = tissue_slide(seed=3)
    # Extra dust-sized and hole-sized structures near every tile size used below.
    rng = np.random.default_rng(7)
    for _ in range(120):
        y, x, r = rng.integers(0, 355), rng.integers(0, 515), rng.integers(2, 9)
        image[max(0, y - r) : y + r, max(0, x - r) : x + r] = (205, 120, 175) if rng.random() < 0.6 else (238, 236, 240)
    reader = ArrayReader(image, mpp=0.5)  # sizes in microns: radii 2 and 4 px, areas 240 px
    spec = RegionSpec(7, 5, 501, 347)
    options = dict(opening_radius=1.0, closing_radius=2.0, min_object_area=60.0, min_hole_area=60.0)
    masks = []
    for tile in (16, 45, 128, 1024):
        (tmp_path / str(tile)).mkdir()
        masks.append(bootstrap_mask(reader, spec, tmp_path / str(tile), tile_size=tile, **options)[0])
    for other in masks[1:]:
        np.testing.assert_array_equal(other, masks[0])
    assert 0.2 < masks[0].mean() < 0.8


def test_filter_components_matches_skimage(tmp_path):
    rng = np.random.default_rng(5)
    binary = ndimage.binary_opening(rng.random((150, 170)) < 0.55)
    expected_objects = morphology.remove_small_objects(binary, max_size=39, connectivity=1)
    # Holes: background components smaller than 40 px not touching the border.
    lab, n = ndimage.label(~expected_objects)
    sizes = np.bincount(lab.ravel())
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    small = sizes < 40
    small[0] = False
    small[border] = False
    expected = expected_objects | small[lab]
    for tile in (16, 33, 200):
        store = create_raw(tmp_path / f"m{tile}.u8", binary.shape)
        store.write(0, 0, binary.astype(np.uint8))
        filter_components(store, 40, holes=False, tile_size=tile)
        np.testing.assert_array_equal(store.read(0, 0, *binary.shape), expected_objects)
        filter_components(store, 40, holes=True, tile_size=tile)
        np.testing.assert_array_equal(store.read(0, 0, *binary.shape), expected)
        store.close()


def test_open_close_is_disc_morphology():
    rng = np.random.default_rng(2)
    b = rng.random((60, 70)) < 0.6
    disc = morphology.disk(2)
    # Pad so that skimage's border handling does not matter; compare the interior.
    expected = ndimage.binary_closing(ndimage.binary_opening(b, disc), disc)
    np.testing.assert_array_equal(open_close(b, 2.0, 2.0)[10:-10, 10:-10], expected[10:-10, 10:-10])


def test_bootstrap_rejects_bad_options():
    with pytest.raises(MaskError, match="opening_radius"):
        BootstrapMask(opening_radius=-1)
    with pytest.raises(MaskError, match="min_saturation"):
        BootstrapMask(min_saturation=2)
