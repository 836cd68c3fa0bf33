"""One writer per output file, and SIGTERM handled like Ctrl-C.

The lock is a hidden file beside the output (`.out.jsonl.lock`) holding the writer's pid, locked with
flock(2). The kernel drops a flock when its process dies (crash, SIGKILL, OOM kill), so a lock file
left behind by a killed run never blocks the next one: only a live writer does.

The lock is on the file, not its name: the lock file goes beside the resolved path (a symlink to
out.jsonl takes out.jsonl's lock), and the output file itself is flocked too, once it exists, so a
hard link to it (another name, the same device and inode) is refused as well.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Callable, Union

from llmlab.core.errors import DataError

# Exit status of a run stopped by SIGTERM: 128 + 15, what a shell reports for a process killed by it.
SIGTERM_EXIT = 143
# what signal.signal returns and takes: a function, SIG_DFL/SIG_IGN, or None (set outside Python)
_Handler = Union[Callable[[int, Union[FrameType, None]], object], int, signal.Handlers, None]


def lock_path(path: str) -> Path:
    target = Path(os.path.realpath(path))  # symlinks followed: every name of a file has one lock
    return target.with_name(f".{target.name}.lock")


class OutputLock:
    """An exclusive, non-blocking lock on an output file for as long as this object holds it."""

    def __init__(self, path: str):
        self.target = path
        self.path = lock_path(path)
        self._fd: int | None = None
        self._file_fd: int | None = None  # the output file itself, flocked (its device and inode)

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on this platform: no lock
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise DataError(f"cannot create the lock file '{self.path}' beside the output: {exc.strerror}; "
                                "choose another --output") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise DataError(f"{self.target} is being written by another llmlab process (pid {pid}); "
                                "wait for it to finish, or write to a different --output") from None
            # The last holder unlinks the lock file on release; if it did so between our open and our
            # flock, we hold a lock on a file no one else can see: drop it and take the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:  # a full disk: the lock holds, only the pid note is missing
            self.release()
            raise DataError(f"cannot write the lock file '{self.path}' beside the output: {exc.strerror}; "
                            "free space or choose another --output") from None
        try:
            self.hold_file()
        except BaseException:
            self.release()
            raise

    def hold_file(self) -> None:
        """Flock the output file itself (when it exists and is a regular file): another name for it
        (a hard link) has another lock file, but not another inode. Called again once it is created."""
        if self._fd is None or self._file_fd is not None:
            return
        import fcntl

        try:
            fd = os.open(self.target, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return  # not there yet (or unreadable: opening it for writing says why)
        try:
            import stat

            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataError(f"{self.target} is the same file as one another llmlab process is writing (a link to it); "
                            "wait for it to finish, or write to a different --output") from None
        self._file_fd = fd

    def release(self) -> None:
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Raised between two Python bytecodes, like KeyboardInterrupt for SIGINT: the `with` blocks
    # unwind, the output file is closed with every finished record in it, and the lock is dropped.
    raise SystemExit(SIGTERM_EXIT)


class SigtermAsExit:
    """While held, SIGTERM stops the run cleanly with exit status 143 instead of killing it outright.
    A no-op off the main thread (only it can set signal handlers)."""

    def __init__(self) -> None:
        self._previous: _Handler = None
        self._installed = False

    def install(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGTERM, _on_sigterm)
        self._installed = True

    def restore(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False
