"""Region specs, fitting to the total stride, prepare_region and load_region."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gigaseg
from gigaseg.data import (
    GeoJSONMask,
    RegionSpec,
    fit_region,
    load_region,
    prepare_region,
)
from gigaseg.data.masks import BaseMaskSource
from gigaseg.errors import MaskError, RegionError, SlideError
from gigaseg.slides.array_reader import ArrayReader


def slide_image(h=96, w=160, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


class RedMask(BaseMaskSource):
    """Tissue where the red channel of the slide is above 128 (reads the slide itself)."""

    kind = "red"

    def attach(self, reader, region, workdir):
        self.reader = reader

    def read(self, location, level, size):
        return (self.reader.read_region(location, level, size)[..., 0] > 128).astype(np.uint8)

    def describe(self):
        return {"kind": self.kind}


class FlakyReader(ArrayReader):
    """Raises SlideError on the n-th read, like a slide with a corrupt tile."""

    def __init__(self, image, fail_at, **kwargs):
        super().__init__(image, **kwargs)
        self.fail_at, self.reads = fail_at, 0

    def _read(self, location, level, size):
        self.reads += 1
        if self.reads == self.fail_at:
            raise SlideError(f"{self.name}: corrupt tile")
        return super()._read(location, level, size)


# ---------------------------------------------------------------- specs and fitting

def test_region_spec_validation():
    assert RegionSpec(np.int64(3), 4, 5, 6).x == 3
    with pytest.raises(RegionError, match="both level=1 and mpp=2"):
        RegionSpec(0, 0, 10, 10, level=1, mpp=2.0)
    with pytest.raises(RegionError, match="empty"):
        RegionSpec(0, 0, 0, 10)
    with pytest.raises(RegionError, match="width must be an integer"):
        RegionSpec(0, 0, 10.5, 10)
    with pytest.raises(RegionError, match="mpp must be a positive"):
        RegionSpec(0, 0, 10, 10, mpp=-1)


def test_fit_modes():
    reader = ArrayReader(slide_image(), levels=2, mpp=0.5)
    spec = RegionSpec(8, 4, 50, 30, level=1)  # 50 x 30 at level 1
    padded = fit_region(reader, spec, total_stride=16, fit="pad")
    assert padded.size == (64, 32) and padded.padding == (14, 2) and padded.read_size == (50, 30)
    cropped = fit_region(reader, spec, total_stride=16, fit="crop")
    assert cropped.size == (48, 16) and cropped.cropped == (2, 14) and cropped.read_size == (48, 16)
    with pytest.raises(RegionError, match="width 50 is not a multiple of the model's total stride 16; use 48 or 64"):
        fit_region(reader, spec, total_stride=16, fit="none")
    exact = fit_region(reader, RegionSpec(0, 0, 48, 32, level=1), total_stride=16, fit="none")
    assert exact.size == (48, 32) and exact.padding == (0, 0)
    with pytest.raises(RegionError, match="smaller than the model's total stride 64.*fit='pad'"):
        fit_region(reader, spec, total_stride=64, fit="crop")
    with pytest.raises(RegionError, match="fit must be one of"):
        fit_region(reader, spec, total_stride=16, fit="stretch")


def test_region_resolution_and_bounds():
    reader = ArrayReader(slide_image(), levels=3, mpp=0.5)
    by_mpp = fit_region(reader, RegionSpec(0, 0, 20, 10, mpp=1.1), total_stride=1)
    assert by_mpp.level == 1 and by_mpp.downsample == 2.0 and by_mpp.mpp == 1.0 and by_mpp.requested_mpp == 1.1
    with pytest.raises(RegionError, match="lies outside the level"):
        fit_region(reader, RegionSpec(100, 0, 40, 10, level=1), total_stride=1)
    with pytest.raises(RegionError, match="level 5 does not exist"):
        fit_region(reader, RegionSpec(0, 0, 4, 4, level=5), total_stride=1)
    with pytest.raises(RegionError, match="does not record microns per pixel"):
        fit_region(ArrayReader(slide_image()), RegionSpec(0, 0, 4, 4, mpp=1.0), total_stride=1)


# ---------------------------------------------------------------- prepare_region

def test_prepare_round_trip_with_padding(tmp_path):
    image = slide_image()
    reader = ArrayReader(image, levels=2, mpp=0.25, name="slide.tif")
    out = tmp_path / "region"
    manifest = prepare_region(reader, RegionSpec(10, 6, 70, 40, level=1), RedMask(), out,
                              total_stride=16, tile_size=32, extra_manifest={"seed": 7})
    region = load_region(out)
    level1 = reader._levels[1]
    assert region.image.shape == (48, 80, 3) and region.mask.shape == (48, 80)
    assert not region.image.flags.writeable
    # Pixels equal the reader's; padding (right 10, bottom 8) is the background colour with mask 0.
    np.testing.assert_array_equal(region.image[:40, :70], level1[3:43, 5:75])
    np.testing.assert_array_equal(region.mask[:40, :70], level1[3:43, 5:75, 0] > 128)
    assert (region.image[40:] == 242).all() and (region.image[:, 70:] == 242).all()
    assert not region.mask[40:].any() and not region.mask[:, 70:].any()
    assert region.manifest == manifest == json.loads((out / "manifest.json").read_text())
    r = manifest["region"]
    assert (r["x"], r["y"], r["level"], r["downsample"], r["mpp"]) == (10, 6, 1, 2.0, 0.5)
    assert (r["width"], r["height"], r["requested"]) == (80, 48, {"width": 70, "height": 40})
    assert r["fit"] == "pad" and r["padding"] == {"right": 10, "bottom": 8, "value": [242, 242, 242]}
    assert manifest["total_stride"] == 16 and manifest["seed"] == 7
    assert manifest["mask"] == {"kind": "red"} and manifest["gigaseg_version"] == gigaseg.__version__
    assert manifest["slide"]["name"] == "slide.tif" and manifest["slide"]["mpp"] == [0.25, 0.25]
    assert manifest["tissue_fraction"] == pytest.approx(np.asarray(region.mask).mean())
    assert manifest["labelled_pixels"] == 48 * 80  # no ignore: every pixel, padding included
    # An in-memory slide has no file to read windows from: its pixels are decoded.
    assert manifest["files"]["image"] == {"name": "image.npy", "shape": [48, 80, 3], "dtype": "uint8"}
    assert sorted(p.name for p in out.iterdir()) == ["image.npy", "manifest.json", "mask.tiff"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["region"]


def test_prepare_crop_and_custom_pad_value(tmp_path):
    image = slide_image()
    reader = ArrayReader(image)
    cropped = prepare_region(reader, RegionSpec(3, 5, 70, 40), RedMask(), tmp_path / "c", total_stride=16, fit="crop")
    assert cropped["region"]["cropped"] == {"right": 6, "bottom": 8}
    np.testing.assert_array_equal(load_region(tmp_path / "c").image, image[5:37, 3:67])
    # A region flush with the slide's corner: padding never reads outside the slide.
    prepare_region(reader, RegionSpec(150, 90, 10, 6), RedMask(), tmp_path / "p", total_stride=8,
                   pad_value=(0, 10, 20))
    padded = load_region(tmp_path / "p")
    np.testing.assert_array_equal(padded.image[:6, :10], image[90:, 150:])
    assert (padded.image[6:] == (0, 10, 20)).all() and padded.image.shape == (8, 16, 3)


def test_prepare_with_geojson_matches_rasterisation(tmp_path):
    reader = ArrayReader(slide_image(), levels=2)
    ann = tmp_path / "a.geojson"
    ring = [[20, 10], [130, 12], [100, 80], [30, 70], [20, 10]]
    geometry = {"type": "Polygon", "coordinates": [ring]}
    ann.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": geometry}))
    source = GeoJSONMask(ann)
    prepare_region(reader, RegionSpec(0, 0, 80, 48, level=1), source, tmp_path / "g", total_stride=16, tile_size=16)
    from gigaseg.data.geojson import rasterise

    expected = rasterise(source.polygons, (0, 0), 2.0, (80, 48))
    region = load_region(tmp_path / "g")
    np.testing.assert_array_equal(region.mask, expected)
    assert region.manifest["mask"]["sha256"] and 0.3 < region.manifest["tissue_fraction"] < 0.9


def test_prepare_is_deterministic(tmp_path):
    reader = ArrayReader(slide_image(), levels=2, mpp=0.5)
    spec = RegionSpec(4, 2, 60, 30, level=1)
    files = ("image.npy", "mask.tiff", "manifest.json")
    prepare_region(reader, spec, RedMask(), tmp_path / "a", total_stride=16, tile_size=32)
    prepare_region(reader, spec, RedMask(), tmp_path / "b", total_stride=16, tile_size=32)
    first = {f: (tmp_path / "a" / f).read_bytes() for f in files}
    assert first == {f: (tmp_path / "b" / f).read_bytes() for f in files}
    # Re-running into the same folder replaces it with the same bytes.
    prepare_region(reader, spec, RedMask(), tmp_path / "a", total_stride=16, tile_size=32)
    assert first == {f: (tmp_path / "a" / f).read_bytes() for f in files}
    text = first["manifest.json"].decode()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_failure_part_way_leaves_nothing(tmp_path):
    reader = FlakyReader(slide_image(), fail_at=3, name="bad.svs")
    out = tmp_path / "region"
    with pytest.raises(SlideError, match=r"bad.svs: cannot read the region at level-0 \(0, 0\).*corrupt tile"):
        prepare_region(reader, RegionSpec(0, 0, 64, 64), RedMask(), out, total_stride=16, tile_size=16)
    assert list(tmp_path.iterdir()) == []


def test_failure_part_way_keeps_the_old_folder(tmp_path):
    out = tmp_path / "region"
    prepare_region(ArrayReader(slide_image()), RegionSpec(0, 0, 64, 64), RedMask(), out, total_stride=16)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SlideError):
        prepare_region(FlakyReader(slide_image(seed=1), fail_at=5), RegionSpec(0, 0, 64, 64), RedMask(), out,
                       total_stride=16, tile_size=16)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["region"]


@pytest.mark.parametrize("value, produces_ignore, allowed", [
    (3, False, "0/1"),
    (255, False, "0/1"),  # a 0/255 tissue mask must not turn into ignore unnoticed
    (3, True, "0/1/255"),
])
def test_bad_mask_source_output_leaves_nothing(tmp_path, value, produces_ignore, allowed):
    class Wrong(RedMask):
        def read(self, location, level, size):
            return np.full((size[1], size[0]), value, np.uint8)

    source = Wrong()
    source.produces_ignore = produces_ignore
    with pytest.raises(MaskError, match=f"returned mask value {value}; a mask must be {allowed}"):
        prepare_region(ArrayReader(slide_image()), RegionSpec(0, 0, 32, 32), source, tmp_path / "r", total_stride=16)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_folders_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    from gigaseg.atomic import temporary_name

    ended = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True, check=True).stdout)
    target = tmp_path / "region"
    # What a run killed while building (.tmp) or replacing (.old) the region leaves, and a live run's folder.
    stale = [target.with_name(temporary_name(target, suffix).name.replace(f".{os.getpid()}.", f".{ended}.", 1))
             for suffix in (".tmp", ".old")]
    live = temporary_name(target, ".tmp")
    for folder in stale + [live]:
        folder.mkdir()
    prepare_region(ArrayReader(slide_image()), RegionSpec(0, 0, 32, 32), RedMask(), target, total_stride=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "region"])


def test_extra_manifest_cannot_override(tmp_path):
    with pytest.raises(ValueError, match="may not set region"):
        prepare_region(ArrayReader(slide_image()), RegionSpec(0, 0, 32, 32), RedMask(), tmp_path / "r",
                       total_stride=16, extra_manifest={"region": 1})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- load_region

@pytest.fixture
def prepared(tmp_path):
    out = tmp_path / "region"
    prepare_region(ArrayReader(slide_image()), RegionSpec(0, 0, 32, 16), RedMask(), out, total_stride=16)
    return out


def test_load_region_missing(tmp_path):
    with pytest.raises(RegionError, match="no prepared region at .*re-run gigaseg-prepare"):
        load_region(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegionError, match="has no manifest.json"):
        load_region(tmp_path / "empty")


def _rewrite_mask(region: Path, mask: np.ndarray) -> None:
    from gigaseg.data.maskfile import TILE, write_mask

    h, w = mask.shape
    padded = np.zeros((-(-h // TILE) * TILE, -(-w // TILE) * TILE), np.uint8)
    padded[:h, :w] = mask
    tiles = (padded[r : r + TILE, c : c + TILE] for r in range(0, padded.shape[0], TILE)
             for c in range(0, padded.shape[1], TILE))
    write_mask(region / "mask.tiff", tiles, (h, w))


def test_load_region_bad_mask_values(prepared):
    mask = np.asarray(load_region(prepared).mask).copy()
    mask[3, 4] = 255  # ignore: a label value
    _rewrite_mask(prepared, mask)
    assert load_region(prepared).mask[3, 4] == 255
    mask[5, 6] = 7
    _rewrite_mask(prepared, mask)
    region = load_region(prepared)  # opening reads headers only; the values are checked as tiles decode
    with pytest.raises(MaskError, match=r"holds value 7; a mask must hold 0 \(background\), 1 \(tissue\) or 255 "
                                        r"\(ignore\); re-run gigaseg-prepare"):
        region.mask[0:4, 0:4]


def test_load_region_shape_mismatch(prepared):
    _rewrite_mask(prepared, np.zeros((16, 16), np.uint8))
    with pytest.raises(MaskError, match=r"mask is \(16, 16\) but image is \(16, 32\)"):
        load_region(prepared)
    (prepared / "mask.tiff").write_bytes(b"II*\x00garbage")
    with pytest.raises(MaskError, match="mask.tiff is not a readable mask file"):
        load_region(prepared)


def test_load_region_corrupt_files(prepared):
    manifest = (prepared / "manifest.json").read_text()
    (prepared / "manifest.json").write_text("{not json")
    with pytest.raises(RegionError, match="not a readable manifest"):
        load_region(prepared)
    (prepared / "manifest.json").write_text("{}")
    with pytest.raises(RegionError, match="prepared by another gigaseg version"):
        load_region(prepared)
    (prepared / "manifest.json").write_text(manifest)
    (prepared / "image.npy").write_bytes(b"garbage")
    with pytest.raises(RegionError, match="image.npy is not a readable .npy"):
        load_region(prepared)
    (prepared / "image.npy").unlink()
    with pytest.raises(RegionError, match="has no image.npy"):
        load_region(prepared)


MEMORY_SCRIPT = """
import resource, sys
import numpy as np
from gigaseg.data import RegionSpec, prepare_region
from gigaseg.data.masks import BaseMaskSource
from gigaseg.slides.base import SlideReader

class Procedural(SlideReader):
    name = "procedural"
    level_dimensions = property(lambda self: ((16384, 4096),))
    level_downsamples = property(lambda self: (1.0,))
    mpp = property(lambda self: None)
    def _read(self, location, level, size):
        return np.full((size[1], size[0], 3), location[0] % 251, np.uint8)

class Stripes(BaseMaskSource):
    def read(self, location, level, size):
        columns = (np.arange(location[0], location[0] + size[0]) // 2048) % 2
        return np.broadcast_to(columns.astype(np.uint8), (size[1], size[0]))
    def describe(self):
        return {"kind": "stripes"}

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare_region(Procedural(), RegionSpec(0, 0, 16384, 4096), Stripes(), sys.argv[1], total_stride=64)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.slow
def test_prepare_memory_is_bounded_by_tiles(tmp_path):
    import subprocess
    import sys

    # 64 Mpx: 192 MiB of pixels and 64 MiB of mask, written without holding them.
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big")],
                            capture_output=True, text=True, check=True)
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    assert growth_mb < 120, f"peak RSS grew by {growth_mb:.0f} MiB while preparing 64 Mpx"
    region = load_region(tmp_path / "big")
    assert region.mask[0, 2048] == 1 and region.mask[0, 2047] == 0 and region.image[0, 2048, 0] == 2048 % 251
    assert region.manifest["tissue_fraction"] == 0.5


# ---------------------------------------------------------------- real slides

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory):
    from gigaseg.slides import synthetic
    folder = tmp_path_factory.mktemp("synthetic")
    info = synthetic.write_synthetic_slide(folder / "slide.tiff", height=768, width=1024, seed=3, tile_size=256,
                                           mask_path=folder / "slide_mask.tiff", workers=1)
    return folder / "slide.tiff", folder / "slide_mask.tiff", info


def tiff_reader(path, mpp):
    """The TIFF's pages as an in-memory slide (independent of the OpenSlide reader)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return ArrayReader([page.asarray() for page in tif.pages], mpp=mpp, name=path.name)


def test_prepare_synthetic_slide_with_truth_mask(synthetic_slide, tmp_path):
    import tifffile

    from gigaseg.data import SyntheticMask

    slide, mask_path, info = synthetic_slide
    reader = tiff_reader(slide, info["mpp"])
    truth = tifffile.imread(mask_path, key=1)
    manifest = prepare_region(reader, RegionSpec(64, 128, 200, 120, mpp=2.0), SyntheticMask(mask_path),
                              tmp_path / "r", total_stride=64, slide_path=slide, extra_manifest={"seed": info["seed"]})
    region = load_region(tmp_path / "r")
    assert manifest["region"]["level"] == 1 and region.mask.shape == (128, 256)
    np.testing.assert_array_equal(region.image[:120, :200], reader._levels[1][32:152, 16:216])
    np.testing.assert_array_equal(region.mask[:120, :200], truth[32:152, 16:216] > 0)
    assert manifest["seed"] == 3 and manifest["slide"]["name"] == "slide.tiff"
    assert manifest["slide"]["sha256"] and manifest["mask"]["kind"] == "synthetic"
    assert 0.05 < manifest["tissue_fraction"] < 0.95
    # Synthetic truth has no ignore: 0/1 only, every pixel labelled.
    assert np.asarray(region.mask).max() == 1 and manifest["labelled_pixels"] == region.mask.size


def test_prepare_synthetic_slide_with_openslide(synthetic_slide, tmp_path):
    from gigaseg import slides
    from gigaseg.data import SyntheticMask

    slide, mask_path, info = synthetic_slide
    with slides.open_slide(slide) as reader:
        manifest = prepare_region(reader, RegionSpec(0, 0, 1024, 768), SyntheticMask(mask_path), tmp_path / "r",
                                  total_stride=64, tile_size=256)
        expected = reader.read_region((0, 0), 0, (1024, 768))
    region = load_region(tmp_path / "r")
    np.testing.assert_array_equal(region.image, expected)
    assert manifest["tissue_fraction"] == pytest.approx(info["tissue_fraction"])
    assert manifest["slide"]["sha256"] is not None


def test_prepare_fixture_with_bootstrap(tmp_path):
    from gigaseg import slides
    path = FIXTURES / "prostate_he_pyramid.tiff"
    from gigaseg.data import BootstrapMask

    with slides.open_slide(path) as reader:
        level = reader.level_count - 1
        w, h = reader.level_dimensions[level]
        manifest = prepare_region(reader, RegionSpec(0, 0, w, h, level=level), BootstrapMask(), tmp_path / "r",
                                  total_stride=64)
    region = load_region(tmp_path / "r")
    assert 0.05 < np.asarray(region.mask).mean() < 0.95
    assert manifest["mask"]["kind"] == "bootstrap" and manifest["slide"]["sha256"]
    # The bootstrap has no ignore: 0/1 only, every pixel labelled.
    assert np.asarray(region.mask).max() == 1 and manifest["labelled_pixels"] == region.mask.size


def test_prepare_unreadable_slide_leaves_nothing(tmp_path):
    from gigaseg import slides
    path = FIXTURES / "openslide" / "unreadable.svs"
    out = tmp_path / "region"
    with slides.open_slide(path) as reader:
        w, h = reader.level_dimensions[0]
        with pytest.raises(SlideError, match=r"unreadable.svs: cannot read the region at level-0 \(0, 0\)"):
            prepare_region(reader, RegionSpec(0, 0, w, h), RedMask(), out, total_stride=1, tile_size=256)
    assert list(tmp_path.iterdir()) == []
