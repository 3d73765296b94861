"""File safety, in one place: open a file for reading only if it is a regular file (without blocking
on a FIFO), replace a file atomically with the mode a plain open() would give it, and say before any
work starts why a file or folder could not be written (``cannot_write``).

Every file the project writes (checkpoints, run-folder JSON, logs, reports, the guide) goes through
``write_atomic``: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable


class NotRegularFileError(OSError):
    """The path is a device, FIFO or socket."""


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only and return (fd, its stat); the caller closes fd. O_NONBLOCK: opening a
    FIFO must not wait for a writer. Raises what os.open raises (FileNotFoundError, ...),
    IsADirectoryError for a folder and NotRegularFileError for a device, FIFO or socket."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if stat.S_ISREG(st.st_mode):
        return fd, st
    os.close(fd)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"is a directory: {os.fspath(path)}")
    raise NotRegularFileError(f"not a regular file (a device, FIFO or socket): {os.fspath(path)}")


def umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes | Callable) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old file or the new one:
    a temporary file in the same folder, flushed to disk, renamed over the target. ``data`` is the
    bytes, or a function that writes them to the open (binary) file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp makes it 0600; give it what open() would
        os.replace(tmp, path)
        _fsync_folder(folder)  # make the rename itself survive a crash
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode(path: str) -> int:
    """The mode of the file being replaced, or what a plain open() would create under the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return 0o666 & ~umask()


def write_json_atomic(path: str | os.PathLike, doc: dict) -> None:
    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode())


def cannot_write(path: str | os.PathLike, *, folder: bool) -> str | None:
    """Why ``path`` (a folder to fill, or a file to write when ``folder`` is False) cannot be
    written, or None; checked by writing (and at once deleting) an unnamed probe file where the
    first write would go, so permissions, read-only mounts and root's privileges all count as they
    will. Nothing is created."""
    path = os.path.abspath(os.fspath(path))
    if folder and os.path.isdir(path):
        where = path
    elif not folder and os.path.isdir(path):
        return f"{path} is a folder"
    else:
        where = os.path.dirname(path)
        while not os.path.lexists(where):  # the nearest existing folder, where makedirs starts
            where = os.path.dirname(where)
        if not os.path.isdir(where):
            return f"{where} is not a folder"
    try:
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        return f"{where} is not writable ({e.strerror or e})"
    if not folder and os.path.lexists(path) and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None
