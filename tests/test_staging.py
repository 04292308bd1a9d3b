"""A step's region staged in scratch files holds exactly the pixels of the views it was written from."""

from __future__ import annotations

import numpy as np

from gigaseg.augment import Augmentation, TransformedRegion
from gigaseg.data import RegionSpec, SyntheticMask, load_region, prepare_region
from gigaseg.slides import open_slide
from gigaseg.staging import StepStaging


def test_staged_region_equals_the_augmented_slide_windows(tmp_path, monkeypatch):
    from gigaseg.slides import synthetic

    synthetic.write_synthetic_slide(tmp_path / "s.tiff", height=640, width=1000, seed=2, tile_size=256,
                                    mask_path=tmp_path / "s_mask.tiff", workers=1)
    with open_slide(tmp_path / "s.tiff") as reader:
        prepare_region(reader, RegionSpec(0, 0, 960, 600), SyntheticMask(tmp_path / "s_mask.tiff"),
                       tmp_path / "r", total_stride=64)
    region = load_region(tmp_path / "r")
    view = TransformedRegion(region.image, region.mask,
                             Augmentation(turns=1, flip=True, hed_scale=(1.04, 0.97, 1.0), saturation=1.05))
    monkeypatch.setattr("gigaseg.staging.PIECE", 100)  # many pieces and bands, the last ones short
    monkeypatch.setattr("gigaseg.staging.BAND_BYTES", 30_000)
    with StepStaging(tmp_path / "scratch", in_memory=0) as staging:
        image, mask = staging(*view)
        assert isinstance(image, np.memmap) and isinstance(mask, np.memmap)
        assert image.shape == (960, 640, 3) and mask.shape == (960, 640)
        np.testing.assert_array_equal(image, np.asarray(view.image))
        np.testing.assert_array_equal(mask, np.asarray(view.mask))
        assert not np.array_equal(image, np.rot90(np.asarray(region.image)))  # the colours did change
        # Arrays and memory maps are used as they are.
        plain = np.zeros((64, 64, 3), np.uint8)
        image2, mask2 = staging(plain, None)
        assert image2 is plain and mask2 is None
    assert (tmp_path / "scratch").is_dir()  # a folder it was given is the caller's to remove
    with StepStaging(in_memory=0) as own:
        folder = own.folder
        own(region.image, region.mask)
        assert (folder / "image.npy").is_file()
    assert not folder.exists()


def test_small_regions_are_staged_in_memory_into_reused_buffers(tmp_path, monkeypatch):
    from gigaseg.slides import synthetic

    synthetic.write_synthetic_slide(tmp_path / "s.tiff", height=640, width=1000, seed=3, tile_size=256,
                                    mask_path=tmp_path / "s_mask.tiff", workers=1)
    with open_slide(tmp_path / "s.tiff") as reader:
        for name, rect in (("big", RegionSpec(0, 0, 960, 640)), ("small", RegionSpec(64, 0, 320, 448))):
            prepare_region(reader, rect, SyntheticMask(tmp_path / "s_mask.tiff"), tmp_path / name, total_stride=64)
    monkeypatch.setattr("gigaseg.staging.PIECE", 100)
    monkeypatch.setattr("gigaseg.staging.BAND_BYTES", 30_000)
    with StepStaging(tmp_path / "scratch", in_memory=4 * 960 * 640) as staging:
        for name, turns in (("big", 1), ("small", 3), ("big", 2)):  # the small one reuses the big one's buffers
            region = load_region(tmp_path / name)
            view = TransformedRegion(region.image, region.mask, Augmentation(turns=turns, flip=turns == 3,
                                                                             hed_scale=(0.96, 1.02, 1.0)))
            image, mask = staging(*view)
            assert type(image) is np.ndarray and type(mask) is np.ndarray
            assert image.shape == view.image.shape and mask.shape == view.mask.shape
            np.testing.assert_array_equal(image, np.asarray(view.image))
            np.testing.assert_array_equal(mask, np.asarray(view.mask))
    assert list((tmp_path / "scratch").iterdir()) == []  # nothing written to disk
