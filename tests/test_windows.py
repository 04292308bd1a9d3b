"""Prepared regions read from their slide window by window, and their masks from a compressed tiled file."""

from __future__ import annotations

import numpy as np
import pytest

from gigaseg.data import RegionSpec, SyntheticMask, load_region, prepare_region
from gigaseg.data.maskfile import TILE, TileCache, TiledMask, write_mask
from gigaseg.data.windows import ReaderPool, SlideWindows
from gigaseg.errors import RegionError
from gigaseg.slides import open_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from gigaseg.slides import synthetic

    folder = tmp_path_factory.mktemp("slide")
    synthetic.write_synthetic_slide(folder / "slide.tiff", height=900, width=1300, seed=5, tile_size=256,
                                    mask_path=folder / "slide_mask.tiff", workers=1)
    return folder / "slide.tiff", folder / "slide_mask.tiff"


def _prepare(slide, out, spec, *, decoded):
    path, mask = slide
    with open_slide(path) as reader:
        return prepare_region(reader, spec, SyntheticMask(mask), out, total_stride=64, decoded_cache=decoded,
                              tile_size=256)


WINDOWS = [(0, 0, 64, 64), (37, 251, 300, 700), (100, 5, 411, 389), (0, 0, 10**6, 10**6), (450, 600, 10**6, 10**6)]


@pytest.mark.parametrize("spec", [RegionSpec(64, 128, 1100, 650), RegionSpec(128, 64, 250, 130, level=1)],
                         ids=["level0-padded", "level1-padded"])
def test_windows_read_from_the_slide_equal_the_decoded_region(slide, tmp_path, spec):
    streamed = _prepare(slide, tmp_path / "slide", spec, decoded=False)
    decoded = _prepare(slide, tmp_path / "decoded", spec, decoded=True)
    assert streamed["files"]["image"] == {"source": "slide", "shape": decoded["files"]["image"]["shape"],
                                          "dtype": "uint8"}
    assert sorted(p.name for p in (tmp_path / "slide").iterdir()) == ["manifest.json", "mask.tiff"]
    a, b = load_region(tmp_path / "slide"), load_region(tmp_path / "decoded")
    assert isinstance(a.image, SlideWindows) and isinstance(b.image, np.memmap)
    assert a.image.shape == b.image.shape and a.image.shape[0] % 64 == 0 and a.image.shape[1] % 64 == 0
    assert streamed["region"]["padding"]["right"] > 0  # windows cross into the padding too
    for top, left, bottom, right in WINDOWS:
        np.testing.assert_array_equal(a.image[top:bottom, left:right], b.image[top:bottom, left:right])
        np.testing.assert_array_equal(a.mask[top:bottom, left:right], b.mask[top:bottom, left:right])
    np.testing.assert_array_equal(a.image[::7, 3::5], b.image[::7, 3::5])  # a downsampled picture
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.image[5, 9].tolist() == b.image[5, 9].tolist() and a.mask[-1, -1] == 0
    assert streamed["tissue_fraction"] == decoded["tissue_fraction"] and 0.05 < streamed["tissue_fraction"] < 0.95


def test_a_region_between_level_pixels_is_decoded(slide, tmp_path):
    # Level 1 is a quarter of the slide: a region starting on a level-0 column not a multiple of 4 lies between level-1 pixels, where
    # a window's read could resample differently from the whole region's, so its pixels are decoded.
    manifest = _prepare(slide, tmp_path / "r", RegionSpec(65, 128, 256, 128, level=1), decoded=False)
    assert manifest["files"]["image"]["name"] == "image.npy"
    assert isinstance(load_region(tmp_path / "r").image, np.memmap)


def test_a_missing_or_changed_slide_is_refused(slide, tmp_path):
    path, mask = slide
    copy = tmp_path / "copy.tiff"
    copy.write_bytes(path.read_bytes())
    with open_slide(copy) as reader:
        prepare_region(reader, RegionSpec(0, 0, 256, 256), SyntheticMask(mask), tmp_path / "r", total_stride=64)
    assert load_region(tmp_path / "r").image.shape == (256, 256, 3)
    with open(copy, "ab") as f:
        f.write(b"\0")
    with pytest.raises(RegionError, match=r"copy.tiff changed since the region was prepared .*re-run gigaseg-prepare"):
        load_region(tmp_path / "r")
    copy.unlink()
    with pytest.raises(RegionError, match=r"its slide .*copy.tiff is missing; restore the slide"):
        load_region(tmp_path / "r")


def test_the_reader_pool_keeps_few_slides_open(slide, tmp_path):
    path, _ = slide
    copies = []
    for i in range(3):
        copies.append(tmp_path / f"s{i}.tiff")
        copies[-1].write_bytes(path.read_bytes())
    opened = []

    def opener(p):
        opened.append(p)
        return open_slide(p)

    pool = ReaderPool(opener, size=2)
    with open_slide(path) as reference:
        expected = reference.read_region((40, 30), 0, (50, 20))
    for p in copies + copies[:1]:
        np.testing.assert_array_equal(pool.read(p, (40, 30), 0, (50, 20)), expected)
        assert len(pool._open) <= 2
    # The first slide was closed when the third opened, so reading it again reopened it.
    assert opened == copies + copies[:1]
    pool.close()
    assert not pool._open


def test_tiled_mask_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((1100, 1700), np.uint8)
    mask[200:900, 300:1400] = 1
    mask[rng.random(mask.shape) < 0.01] = 255
    padded = np.zeros((3 * TILE, 4 * TILE), np.uint8)
    padded[:1100, :1700] = mask
    tiles = (padded[r : r + TILE, c : c + TILE] for r in range(0, 3 * TILE, TILE) for c in range(0, 4 * TILE, TILE))
    write_mask(tmp_path / "m.tiff", tiles, mask.shape)
    cache = TileCache(3 * TILE * TILE)
    stored = TiledMask(tmp_path / "m.tiff", cache=cache)
    assert stored.shape == mask.shape and stored.dtype == np.uint8 and stored.ndim == 2
    for top, left, bottom, right in WINDOWS + [(511, 511, 513, 1025)]:
        np.testing.assert_array_equal(stored[top:bottom, left:right], mask[top:bottom, left:right])
    np.testing.assert_array_equal(stored[::3, 1::4], mask[::3, 1::4])
    np.testing.assert_array_equal(stored[-1], mask[-1])
    assert stored[250, 350] == 1 and len(cache) <= 3  # the cache stays within its bytes
    # Another mask shares the cache, and its tiles never stand in for the first one's.
    other = TiledMask(tmp_path / "m.tiff", cache=cache)
    np.testing.assert_array_equal(other[:600, :600], mask[:600, :600])
    (tmp_path / "n.tiff").write_bytes((tmp_path / "m.tiff").read_bytes())
    third = TiledMask(tmp_path / "n.tiff", cache=cache)
    assert third._key != stored._key and len(cache) <= 3
    assert (tmp_path / "m.tiff").stat().st_size < mask.nbytes / 5


def test_a_region_prepared_with_relative_paths_finds_its_slide_from_anywhere(slide, tmp_path, monkeypatch):
    path, mask = slide
    (tmp_path / "data" / "slides").mkdir(parents=True)
    (tmp_path / "data" / "slides" / "s.tiff").write_bytes(path.read_bytes())
    monkeypatch.chdir(tmp_path)
    relative = "data/slides/s.tiff"
    with open_slide(relative) as reader:
        manifest = prepare_region(reader, RegionSpec(0, 0, 256, 128), SyntheticMask(mask), "data/prepared/s/r",
                                  total_stride=64, slide_path=relative, dataset_dir="data")
    assert manifest["slide"]["path"] == "../../../slides/s.tiff"  # inside the dataset folder: relative to the region
    monkeypatch.chdir(tmp_path / "data" / "slides")
    region = load_region(tmp_path / "data" / "prepared" / "s" / "r")
    with open_slide(path) as reader:
        np.testing.assert_array_equal(region.image[:, :], reader.read_region((0, 0), 0, (256, 128)))


def test_a_slide_replaced_at_the_same_path_is_read_anew_and_masks_keep_no_file_open(tmp_path):
    from gigaseg.slides import synthetic

    for seed, name in ((1, "a.tiff"), (2, "b.tiff")):
        synthetic.write_synthetic_slide(tmp_path / name, height=256, width=256, seed=seed, tile_size=256)
    path = tmp_path / "s.tiff"
    path.write_bytes((tmp_path / "a.tiff").read_bytes())
    pool = ReaderPool(open_slide)
    first = pool.read(path, (0, 0), 0, (256, 256))
    (tmp_path / "b.tiff").replace(path)  # another slide under the same name
    second = pool.read(path, (0, 0), 0, (256, 256))
    with open_slide(path) as reader:
        np.testing.assert_array_equal(second, reader.read_region((0, 0), 0, (256, 256)))
    assert not np.array_equal(first, second)
    pool.close()

    import os

    mask = np.zeros((TILE, TILE), np.uint8)
    write_mask(tmp_path / "m.tiff", iter([mask]), (TILE, TILE))
    before = len(os.listdir("/proc/self/fd"))
    masks = [TiledMask(tmp_path / "m.tiff") for _ in range(50)]
    assert all(m[0:8, 0:8].sum() == 0 for m in masks)
    assert len(os.listdir("/proc/self/fd")) <= before + 1
