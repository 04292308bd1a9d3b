"""DVC's digest of the data tags a run only when the files on disk are the ones it records."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gigaseg.tracking import dvc_data_digest


def _dvc(*args: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A DVC repository (no git) whose data/demo folder of three files was added with ``dvc add``."""
    root = tmp_path_factory.mktemp("dvc") / "project"
    demo = root / "data" / "demo"
    (demo / "train").mkdir(parents=True)
    (demo / "train" / "image.npy").write_bytes(bytes(range(256)) * 64)
    (demo / "train" / "manifest.json").write_text('{"seed": 3}\n')
    (demo / "slide.tiff").write_bytes(b"II*\x00" + bytes(1000))
    _dvc("init", "--no-scm", "-q", cwd=root)
    _dvc("config", "core.analytics", "false", cwd=root)
    _dvc("add", "-q", "data/demo", cwd=root)
    return root


@pytest.fixture
def repo(tracked, tmp_path):
    """A fresh copy of the tracked repository, free to change."""
    return Path(shutil.copytree(tracked, tmp_path / "project", symlinks=True))


def _recorded(repo: Path) -> str:
    return yaml.safe_load((repo / "data" / "demo.dvc").read_text())["outs"][0]["md5"]


def _rewrite(path: Path, data: bytes) -> None:
    """Write ``data`` and move the mtime on, as any later edit would (DVC trusts size and mtime)."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 2 * 10**9, before + 2 * 10**9))


def test_digest_when_the_files_on_disk_are_the_recorded_ones(repo):
    digest = _recorded(repo)
    assert digest.endswith(".dir")
    dvc_file = repo / "data" / "demo.dvc"
    assert dvc_data_digest(dvc_file, repo / "data" / "demo") == digest
    assert dvc_data_digest(dvc_file, repo / "data" / "demo" / "train") == digest  # a folder inside it
    assert dvc_data_digest(dvc_file, repo / "data" / "other") is None  # not tracked by this file
    assert dvc_data_digest(repo / "missing.dvc", repo / "data" / "demo") is None


def test_no_digest_and_the_changed_file_named_when_a_file_changed(repo, caplog):
    image = repo / "data" / "demo" / "train" / "image.npy"
    # Same size, other bytes: only the content tells them apart.
    _rewrite(image, bytes(reversed(image.read_bytes())))
    with caplog.at_level(logging.WARNING, logger="gigaseg.tracking"):
        assert dvc_data_digest(repo / "data" / "demo.dvc", repo / "data" / "demo") is None
    assert "changed: train/image.npy" in caplog.text
    assert "slide.tiff" not in caplog.text


def test_missing_and_unrecorded_files_are_named(repo, caplog):
    demo = repo / "data" / "demo"
    (demo / "slide.tiff").unlink()
    (demo / "val").mkdir()
    (demo / "val" / "image.npy").write_bytes(b"new")
    with caplog.at_level(logging.WARNING, logger="gigaseg.tracking"):
        assert dvc_data_digest(repo / "data" / "demo.dvc", demo) is None
    assert "missing: slide.tiff" in caplog.text
    assert "not recorded: val/image.npy" in caplog.text


def test_without_the_cache_a_change_is_still_seen(repo, caplog):
    # A fresh clone has data.dvc but no DVC cache: no listing to name files with, same verdict.
    shutil.rmtree(repo / ".dvc" / "cache")
    assert dvc_data_digest(repo / "data" / "demo.dvc", repo / "data" / "demo") == _recorded(repo)
    _rewrite(repo / "data" / "demo" / "slide.tiff", b"II*\x00" + bytes(999) + b"\x01")
    with caplog.at_level(logging.WARNING, logger="gigaseg.tracking"):
        assert dvc_data_digest(repo / "data" / "demo.dvc", repo / "data" / "demo") is None
    assert "modified" in caplog.text


def test_a_dvc_file_outside_a_dvc_repository_gives_no_digest(tmp_path, caplog):
    (tmp_path / "data").mkdir()
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")
    with caplog.at_level(logging.WARNING, logger="gigaseg.tracking"):
        assert dvc_data_digest(tmp_path / "data.dvc", tmp_path / "data") is None
    assert "DVC cannot compare them" in caplog.text
