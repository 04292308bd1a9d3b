"""Prepared regions versioned by DVC: regenerating gives the same digest; push and pull restore them."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gigaseg.dataset import DatasetSpec, RegionRequest, SyntheticRecipe, prepare_dataset


def _run(*args: str, cwd: Path) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _dvc(*args: str, cwd: Path) -> str:
    return _run(sys.executable, "-m", "dvc", *args, cwd=cwd)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _tiny_dataset(data_dir: Path) -> DatasetSpec:
    return DatasetSpec(
        out_dir=data_dir,
        slide_path=data_dir / "slide.tiff",
        mask_path=data_dir / "slide_mask.tiff",
        mask_source="synthetic",
        synthetic=SyntheticRecipe(height=512, width=1024, seed=3, mpp=0.5, tile_size=256),
        regions=[
            RegionRequest(name="train", x=0, y=0, width=512, height=256),
            RegionRequest(name="val", x=512, y=256, width=512, height=256),
        ],
    )


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    _run("git", "init", "-q", cwd=root)
    _dvc("init", "-q", cwd=root)
    _dvc("config", "core.analytics", "false", cwd=root)
    _dvc("remote", "add", "-d", "local", str(tmp_path / "remote"), cwd=root)
    return root


def test_prepare_then_dvc_add_push_pull_round_trip(repo):
    data = repo / "data"
    prepare_dataset(_tiny_dataset(data), total_stride=64, progress=False)
    before = _digests(data)
    # A prepared region is its mask and manifest: training reads the pixels from slide.tiff.
    assert {"train/mask.tiff", "train/manifest.json", "slide.tiff"} <= set(before)
    assert not any(name.endswith(".npy") for name in before)
    _dvc("add", "-q", "data", cwd=repo)
    assert (repo / "data.dvc").is_file()
    assert "up to date" in _dvc("status", cwd=repo).lower()

    # Regenerating from the same recipe and seed reproduces every byte: DVC sees no change.
    shutil.rmtree(data)
    prepare_dataset(_tiny_dataset(data), total_stride=64, progress=False)
    assert _digests(data) == before
    assert "up to date" in _dvc("status", cwd=repo).lower()

    # Push to the local remote, lose data and cache, pull back identical files.
    _dvc("push", "-q", cwd=repo)
    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc("pull", "-q", cwd=repo)
    assert _digests(data) == before


@pytest.mark.slow
def test_regenerated_demo_data_matches_the_committed_data_dvc(tmp_path):
    """The demo data made on this machine has the digest the repository's data.dvc records."""
    from conftest import ROOT

    root = tmp_path / "clone"
    root.mkdir()
    _run("git", "init", "-q", cwd=root)
    _dvc("init", "-q", cwd=root)
    shutil.copy(ROOT / "data.dvc", root / "data.dvc")
    env_overrides = [f"paths.data_dir={root}/data", f"hydra.run.dir={tmp_path}/out"]
    _run(sys.executable, "-m", "gigaseg.cli.prepare", *env_overrides, cwd=tmp_path)
    # A fresh clone has no DVC cache: committing hashes the workspace into it and would
    # rewrite data.dvc if the digest differed. It must not.
    committed = (root / "data.dvc").read_text()
    _dvc("commit", "-f", "-q", "data.dvc", cwd=root)
    assert (root / "data.dvc").read_text() == committed
    assert "up to date" in _dvc("status", "data.dvc", cwd=root).lower()
