"""Atomic writes: the target is the old file or the complete new one, with ordinary permissions; the
temporaries of writers killed on this host are removed by the next write, never those of live processes or other hosts."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gigaseg.atomic import atomic_path, remove_stale_temporaries, scratch_dir, temporary_name


def test_the_new_file_replaces_the_old_one_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failing_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_the_file_gets_the_permissions_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        os.umask(0o077)
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


# --- temporaries of killed writers ----------------------------------------------------------

_WRITER = """
import sys, time
from gigaseg.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    print(tmp, flush=True)
    time.sleep(120)
"""


def _ended_pid() -> int:
    """The pid of a process of this host that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def _named(target, pid: int, suffix: str = ".tmp", host: str | None = None):
    """A temporary of ``target`` as process ``pid`` (of ``host``, default this one) would have named it."""
    name = temporary_name(target, suffix).name.replace(f".{os.getpid()}.", f".{pid}.", 1)
    if host is not None:
        name = name.replace(f".{socket.gethostname()}", f".{host}", 1)
    return target.with_name(name)


def test_temporary_names_carry_the_target_the_host_and_the_pid(tmp_path):
    with atomic_path(tmp_path / "out.json") as tmp:
        assert tmp.name.startswith(f".out.json.{socket.gethostname()}")
        assert f".{os.getpid()}." in tmp.name and tmp.name.endswith(".tmp")
    with atomic_path(tmp_path / "plot.png", suffix=".png") as tmp:
        assert tmp.name.startswith(".plot.png.") and tmp.name.endswith(".png")
    with scratch_dir(tmp_path / "mask.tiff") as folder:
        assert folder.is_dir() and folder.parent == tmp_path and folder.name.startswith(".mask.tiff.")
        (folder / "level1").write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "plot.png"]


def test_a_writer_killed_with_sigkill_leaves_a_temporary_that_the_next_write_removes(tmp_path, caplog):
    target = tmp_path / "out.json"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(writer.stdout.readline().strip())
    finally:
        writer.kill()  # SIGKILL: no cleanup runs
        writer.wait(timeout=30)
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    assert left.parent == tmp_path and left.read_text() == "half" and f".{writer.pid}." in left.name
    # Temporaries that must stay: a live process's (this test's), another host's with an ended
    # pid (a shared folder), another target's, and this target's with another writer's suffix.
    ended = _ended_pid()
    stay = [
        _named(target, os.getpid()),
        _named(target, ended, host="other-node.example.org"),
        _named(tmp_path / "other.json", ended),
        _named(target, ended, suffix=".png"),
    ]
    for path in stay:
        path.write_text("someone's")
    with caplog.at_level(logging.INFO, logger="gigaseg.atomic"):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    assert target.read_text() == "new"
    assert not left.exists()
    assert left.name in caplog.text and str(writer.pid) in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in stay] + ["out.json"])


def test_a_scratch_folder_of_an_ended_process_is_removed_by_the_next_scratch_folder(tmp_path):
    target = tmp_path / "mask.tiff"
    left = _named(target, _ended_pid(), suffix=".scratch")
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "level1").write_bytes(b"raw")
    live = _named(target, os.getpid(), suffix=".scratch")
    live.mkdir()
    with scratch_dir(target) as folder:
        assert not left.exists() and live.is_dir() and folder.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


def test_remove_stale_temporaries_reports_what_it_removed(tmp_path):
    target = tmp_path / "region"
    ended = _ended_pid()
    building, replaced = _named(target, ended, ".tmp"), _named(target, ended, ".old")
    building.mkdir()
    replaced.symlink_to(tmp_path)  # a replaced folder that was a link: the link goes, not what it points to
    assert sorted(remove_stale_temporaries(target, (".tmp", ".old"))) == sorted([building, replaced])
    assert list(tmp_path.iterdir()) == []
    assert remove_stale_temporaries(tmp_path / "missing" / "x") == []  # no folder: nothing to do


def test_a_target_with_a_long_name_still_gets_a_temporary_and_its_leftovers_are_found(tmp_path):
    target = tmp_path / ("s" * 240 + ".json")  # a valid name, but the temporary's would be too long in full
    left = _named(target, _ended_pid())
    left.write_text("half")
    assert len(left.name.encode()) <= 255
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
