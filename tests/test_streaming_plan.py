"""Tile plans: cores partition the region once, windows hold core + halo clipped, everything stride-aligned."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gigaseg.errors import RegionError
from gigaseg.streaming.plan import RegionShapeError, check_region_shape, plan_tiles


@settings(max_examples=150, deadline=None)
@given(
    stride=st.sampled_from([1, 4, 16, 64]),
    blocks=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    tile_blocks=st.tuples(st.integers(1, 25), st.integers(1, 25)),
    halo_blocks=st.integers(0, 3),
)
def test_cores_partition_the_region_and_windows_are_core_plus_clipped_halo(stride, blocks, tile_blocks, halo_blocks):
    h, w = blocks[0] * stride, blocks[1] * stride
    tile = (tile_blocks[0] * stride, tile_blocks[1] * stride)
    halo = halo_blocks * stride
    plan = plan_tiles((h, w), tile, halo, stride)
    covered = np.zeros((h, w), np.int32)
    for t in plan:
        top, left, bottom, right = t.core
        covered[top:bottom, left:right] += 1
        assert all(v % stride == 0 for v in t.core + t.window)
        assert 0 < bottom - top <= tile[0] and 0 < right - left <= tile[1]
        assert t.window == (max(top - halo, 0), max(left - halo, 0), min(bottom + halo, h), min(right + halo, w))
        assert t.core_offset[0] >= 0 and t.core_offset[1] >= 0
    assert (covered == 1).all()
    assert len(plan) == plan.grid[0] * plan.grid[1]
    assert [t.index for t in plan] == list(range(len(plan)))


def test_a_tile_larger_than_the_region_gives_one_tile_that_is_the_region():
    plan = plan_tiles((128, 256), 1024, 64, 64)
    assert len(plan) == 1
    assert plan.tiles[0].core == plan.tiles[0].window == (0, 0, 128, 256)


def test_uneven_last_tiles_are_smaller_multiples_of_the_stride():
    plan = plan_tiles((320, 320), 192, 64, 64)
    assert sorted({t.core_shape for t in plan}) == [(128, 128), (128, 192), (192, 128), (192, 192)]
    assert plan.window_pixels > 320 * 320


@pytest.mark.parametrize("shape", [(100, 128), (128, 0), (64, 65)])
def test_regions_that_are_not_stride_multiples_are_refused_with_a_crop_suggestion(shape):
    with pytest.raises(RegionShapeError, match="multiple of the model's total stride 64") as info:
        check_region_shape(shape, 64)
    assert isinstance(info.value, RegionError) and isinstance(info.value, ValueError)


def test_tile_and_halo_must_be_stride_multiples():
    with pytest.raises(RegionShapeError, match="tile width 100"):
        plan_tiles((128, 128), (64, 100), 64, 64)
    with pytest.raises(RegionShapeError, match="halo 32"):
        plan_tiles((128, 128), 64, 32, 64)
