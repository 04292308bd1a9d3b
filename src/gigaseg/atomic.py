"""Atomic file writes: write beside the target, rename into place only when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from gigaseg.errors import WriteError

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; it replaces ``path`` if the block succeeds.

    On any error (or interruption) the temporary file is removed, so ``path`` is either
    the old file or the complete new one, never a partial one. ``suffix`` keeps the
    extension for writers that choose a format by it. A folder that cannot be written
    to, or a disk that fills up, raises ``WriteError`` naming ``path``.
    """
    path = Path(path)
    with write_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            # mkstemp makes the file owner-only; give it the mode a plain open() would.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
