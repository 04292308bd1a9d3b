"""Atomic file writes: write beside the target, rename into place only when complete.

Temporaries beside a target are named ``.<target name>.<host>.<pid>.<random><suffix>``, so
that the next writer of the same target can remove those a killed process of this host
left behind (``kill -9`` runs no cleanup), and never those of a live process or another host.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from gigaseg.errors import WriteError

log = logging.getLogger(__name__)

#: OS errors that always mean "this cannot be written": read-only or full disk, quotas, size limits.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
#: OS errors that mean it when they concern the folder being written to (else they may be about an input).
_NOT_HERE = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR}
_HINTS = {
    errno.ENOSPC: "free some disk space or write elsewhere",
    errno.EDQUOT: "free some space within your disk quota or write elsewhere",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f) or the file system allows",
    errno.EROFS: "the file system is read-only; choose another output folder",
    errno.ENOENT: "its folder does not exist; create it or choose another output folder",
    errno.ENOTDIR: "a part of its folder path is a file, not a folder",
}


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (umask() is process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _concerns(filename: object, path: Path, folder: Path) -> bool:
    """Whether an error about ``filename`` is about writing ``path`` into ``folder``: a file there, or a folder above ``path``."""
    try:
        name = Path(os.fsdecode(filename)).absolute()  # type: ignore[arg-type]
    except TypeError:
        return False
    folder = folder.absolute()
    return name == folder or folder in name.parents or name in path.absolute().parents


@contextlib.contextmanager
def write_errors(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an ``OSError`` that means ``path`` cannot be written into a ``WriteError`` naming it.

    Permission, missing-folder and similar errors are converted only when they concern
    ``folder`` (default: ``path``'s folder), where the block writes, or a folder above ``path``,
    or name no file, since otherwise they may be about an input; full, read-only or
    size-limited disks always are.
    """
    path = Path(path)
    folder = path.parent if folder is None else Path(folder)
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        code = exc.errno
        if code in _NO_ROOM or (code in _NOT_HERE and (exc.filename is None or _concerns(exc.filename, path, folder))):
            reason = exc.strerror or type(exc).__name__
            hint = _HINTS.get(code, "make the folder writable or choose another output folder")
            raise WriteError(f"cannot write {path}: {reason}; {hint}", errno=code, filename=str(path)) from exc
        raise


#: Linux's initial PID namespace (PROC_PID_INIT_INO): the machine's own process numbers.
_INITIAL_PID_NAMESPACE = 0xEFFFFFFC
#: Longest file name most file systems allow (NAME_MAX), in bytes.
_NAME_MAX = 255
#: Room kept for the pid (Linux's pid_max is at most 2**22, 7 digits) and the random part.
_PID_DIGITS, _RANDOM_CHARS = 7, 8


def _host() -> str:
    """This machine as temporary names record it: its host name, with its PID namespace when not the initial one.

    Processes in a container see their own process numbers, and a container on the host's
    network (``--network host``, ``hostNetwork: true``) also has the host's name: without the
    namespace, a process numbered 57 there would look dead here, and its file be removed.
    """
    host = socket.gethostname() or "localhost"
    try:
        namespace = int(os.readlink("/proc/self/ns/pid").split("[")[1].rstrip("]"))
    except (OSError, IndexError, ValueError):
        namespace = _INITIAL_PID_NAMESPACE
    if namespace != _INITIAL_PID_NAMESPACE:
        host = f"{host}~{namespace}"
    for sep in {os.sep, os.altsep or os.sep, "\0"}:
        host = host.replace(sep, "_")
    return host


def _head(path: Path, suffix: str) -> str:
    """``.<target name>.<host>.``, the target's name shortened where the whole name would be too long.

    The room left depends only on the host and the suffix, not on the pid, so every writer of
    one target on one host shortens it alike, and finds the others' temporaries.
    """
    host = _host()
    room = _NAME_MAX - len(os.fsencode(f"..{host}.")) - _PID_DIGITS - 1 - _RANDOM_CHARS - len(os.fsencode(suffix))
    name = path.name
    while len(os.fsencode(name)) > room and name:
        name = name[:-1]
    return f".{name}.{host}."


def temporary_name(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new name beside ``path`` for a temporary file or folder of this process, which the caller creates.

    Use it (or ``atomic_path``, ``scratch_dir``) for anything written beside a target, so that
    ``remove_stale_temporaries`` finds it after a crash.
    """
    path = Path(path)
    return path.with_name(f"{_head(path, suffix)}{os.getpid()}.{secrets.token_hex(_RANDOM_CHARS // 2)}{suffix}")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host may still run (when in doubt, it does)."""
    if os.name == "nt":  # os.kill there terminates the process whatever the signal
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike, suffixes: Iterable[str] = (".tmp",)) -> list[Path]:
    """Remove the temporaries of ``path`` (files or folders) whose writer, a process of this host, has ended.

    Only names with this host and one of ``suffixes`` are considered, so a temporary of another
    machine on a shared folder is never removed, nor one of a live process. Only the target's own
    temporaries are, never the whole folder's: they are named after it, so no other program's
    hidden files can match, and the writer that would leave them is the one that comes back to
    write the same target (the same checkpoint, output, region). Returns what was removed.
    """
    path = Path(path)
    folder = path.parent
    # The whole name is matched, with the suffix: host names may hold dots and digits, so another
    # host whose name starts with this one's could otherwise pass for it. What follows this host's
    # name must be exactly "<pid>.<random><suffix>", the random part as mkstemp and temporary_name
    # make it (8 of [a-z0-9_], no dot).
    patterns = [
        re.compile(re.escape(_head(path, suffix)) + rf"(\d+)\.[a-z0-9_]{{{_RANDOM_CHARS}}}" + re.escape(suffix) + r"\Z")
        for suffix in suffixes
    ]
    try:
        names = os.listdir(folder)
    except OSError:  # no folder (yet), or unreadable: writing there will say so
        return []
    removed = []
    for name in names:
        match = next((m for m in (p.match(name) for p in patterns) if m), None)
        if match is None or _alive(int(match.group(1))):
            continue
        stale = folder / name
        try:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except FileNotFoundError:  # another writer removed it first
            continue
        except OSError as exc:  # not ours to remove after all (permissions): leave it
            log.debug("cannot remove %s (%s)", stale, exc)
            continue
        log.info("removed %s, left by process %s of this host, which has ended", stale, match.group(1))
        removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; it replaces ``path`` if the block succeeds.

    On any error (or interruption) the temporary file is removed, so ``path`` is either
    the old file or the complete new one, never a partial one. ``suffix`` keeps the
    extension for writers that choose a format by it. A folder that cannot be written
    to, or a disk that fills up, raises ``WriteError`` naming ``path``. Temporaries of
    ``path`` left by killed processes of this host are removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path, (suffix,))
    with write_errors(path):
        head = _head(path, suffix)
        fd, tmp = tempfile.mkstemp(prefix=f"{head}{os.getpid()}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            # mkstemp makes the file owner-only; give it the mode a plain open() would.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike, suffix: str = ".scratch") -> Iterator[Path]:
    """Yield a new empty folder beside ``path`` for the intermediate files of writing it; removed afterwards.

    Beside the target rather than in the system's temporary folder: it is on the same disk,
    which has room for the target. Scratch folders of ``path`` left by killed processes of
    this host are removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path, (suffix,))
    with write_errors(path):
        folder = Path(tempfile.mkdtemp(prefix=f"{_head(path, suffix)}{os.getpid()}.", suffix=suffix, dir=path.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
