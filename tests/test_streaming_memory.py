"""Memory estimates and tile-size planning against a budget."""

import re

import pytest

from gigaseg.errors import MemoryPlanError
from gigaseg.model import build_unet
from gigaseg.streaming import (
    available_memory_bytes,
    check_plain_step_fits,
    plain_step_bytes,
    plan_tile_size,
    tiled_step_bytes,
)
from gigaseg.streaming.memory import MAX_TILE

GB = 10**9


@pytest.fixture(scope="module")
def model():
    return build_unet()


def test_plain_estimate_matches_the_measured_peaks(model):
    # The peaks the model is calibrated on (benchmarks/README.md, "Memory model calibration").
    assert plain_step_bytes(model, 4096, 4096) == pytest.approx(3.0 * GB, rel=0.15)
    assert plain_step_bytes(model, 8192, 8192) == pytest.approx(10.3 * GB, rel=0.15)


def test_tiled_estimate_grows_with_the_tile_and_not_with_the_region(model):
    assert tiled_step_bytes(model, 512) < tiled_step_bytes(model, 1024) < tiled_step_bytes(model, 2048)
    plan_small = plan_tile_size(model, (8192, 8192), budget_bytes=4 * GB)
    plan_large = plan_tile_size(model, (16000, 64000), budget_bytes=4 * GB)
    assert plan_small.estimated_peak_bytes <= 4 * GB and plan_large.estimated_peak_bytes <= 4 * GB
    assert not plan_large.plain_fits and plan_large.plain_step_bytes > 100 * GB


def test_planner_picks_the_largest_aligned_tile_within_budget_and_cap(model):
    plan = plan_tile_size(model, (16000, 64000), budget_bytes=20 * GB)
    assert max(plan.tile_size) <= MAX_TILE
    assert all(t % 64 == 0 for t in plan.tile_size)
    # 16000 = 250 strides: the tile height is shrunk to split it evenly with the same tile count.
    assert -(-16000 // plan.tile_size[0]) == -(-16000 // MAX_TILE)
    tight = plan_tile_size(model, (16000, 64000), budget_bytes=tiled_step_bytes(model, 512) + 1)
    assert max(tight.tile_size) <= 512


def test_a_tile_size_that_cannot_fit_is_refused_naming_one_that_does(model):
    budget = tiled_step_bytes(model, 640)
    with pytest.raises(MemoryPlanError, match="more than the budget") as info:
        plan_tile_size(model, (8192, 8192), budget_bytes=budget, tile_size=2048)
    fit = int(re.search(r"tile_size=(\d+)", str(info.value)).group(1))
    assert fit % 64 == 0 and tiled_step_bytes(model, fit) <= budget


def test_an_impossible_budget_is_refused(model):
    with pytest.raises(MemoryPlanError, match="no tile fits"):
        plan_tile_size(model, (8192, 8192), budget_bytes=10 * 2**20)


def test_plain_step_check_says_what_to_change(model):
    assert check_plain_step_fits(model, 1024, 1024, 4 * GB) == plain_step_bytes(model, 1024, 1024)
    with pytest.raises(MemoryPlanError, match="use tiled training"):
        check_plain_step_fits(model, 16000, 64000, 24 * GB)


def test_available_memory_is_positive():
    assert 0 < available_memory_bytes()
