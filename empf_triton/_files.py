"""Files written whole: the mode a plain `open()` would give, and atomic replacement. Shared by
training (checkpoints, logs) and deployment (exports); imports nothing else of the library."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path


def default_file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0o666 less the umask.

    Read from /proc on Linux (thread-safe); elsewhere `os.umask` is set and restored at once.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_file_atomic(path: Path, data, *, overwrite: bool = True) -> None:
    """Write `data` (bytes-like) to `path` through a temporary file in the same folder, flushed
    to disk and renamed over `path`: readers see the old file or the new one, never a part.

    With `overwrite=False` an existing `path` (one that appeared meanwhile included) is left as
    it is and `FileExistsError` is raised."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file asked for, not the temporary one never made
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (umask respected).
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _link_new(tmp: str, path: Path) -> None:
    """Move the finished file `tmp` to `path` unless `path` exists (FileExistsError)."""
    try:
        os.link(tmp, path)  # atomic, and refuses a file that appeared meanwhile
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def check_output_file(path: str | os.PathLike, option: str, *, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output file path that cannot be written: its folder is
    missing or not a folder, the path is a folder, or (unless `overwrite`) a file is there
    already (ValueError naming `option`)."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file path")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise ValueError(f"{option} {path} already exists; pass --overwrite to replace it")
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ValueError(f"{option} {path}: the folder {parent} {what}")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {path}: the folder {parent} is not writable")
    return path
