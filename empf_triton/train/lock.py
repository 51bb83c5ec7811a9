"""An exclusive lock on a training run's output folder. (`default_file_mode`, the file mode that
respects the umask, lives in `empf_triton._files` now; it is still exported here.)

Two `empf train` runs writing into one folder would leave a config.json, last.pt and best.pt that
come from different runs. `OutputLock(folder)` takes an OS lock (`fcntl.flock`, exclusive,
non-blocking) on `folder/.empf.lock` for the duration of a run: the kernel releases it when the
file is closed or the process ends in any way (exception, signal, crash), so a stale lock cannot
outlive its run. A second run fails at once with `OutputFolderBusyError`, naming the folder and
the process that holds it. The lock file itself is left in place (deleting it would let a third
run lock a fresh inode while the second still holds the old one).

Platforms without `fcntl` (Windows) run without the lock.
"""

from __future__ import annotations

import os
from pathlib import Path

from .._files import default_file_mode

__all__ = ["LOCK_NAME", "OutputFolderBusyError", "OutputLock", "default_file_mode"]

LOCK_NAME = ".empf.lock"


class OutputFolderBusyError(ValueError):
    """Another running process holds the lock of this output folder."""


class OutputLock:
    """Exclusive, non-blocking lock of a run's output folder (a context manager).

    Args:
        folder: the output folder (created if missing).

    Raises (on `acquire` / `__enter__`):
        OutputFolderBusyError: another process holds the lock.
        ValueError: the folder cannot be created (a file of that name exists, no permission, ...).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"output folder {self.folder} exists and is not a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ValueError(f"cannot use output folder {self.folder}: {e.strerror or e}") from e
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; run unlocked
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            who = f" (process {holder})" if holder.isdigit() else ""
            raise OutputFolderBusyError(
                f"output folder {self.folder} is in use by another empf train run{who}; "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
