"""Advisory locks on outputs, so that two runs never write into each other.

A run that writes an output (a model file, a checkpoint folder, a noise-model file, later a zarr
store) holds :func:`output_lock` on it for as long as it runs. The lock is a small file next to
the output, ``<name>.lock`` (``m.hdn.lock`` for ``m.hdn``, ``m.checkpoints.lock`` for the folder
``m.checkpoints``), holding the writer's process id, host, start time and command as JSON. It is
taken atomically with ``fcntl.flock`` on that file, which the kernel releases when the process
ends however it ends: a lock left by a killed process is found free and taken over (with a note
naming that process). Where ``flock`` is not available (Windows, a file system without it) the
file is created with ``O_CREAT | O_EXCL`` instead, and a lock file whose process no longer exists
on this host is taken over.

A second run asking for a held lock gets :class:`OutputLockedError`, one line naming the holder:
"m.hdn is being written by process 1234 on node7 (started 2026-12-07 14:03:11); wait for it to
finish or choose another --out".

Processes started by the holder to do its work (the ranks of a ``torchrun`` launch) inherit its
locks through the environment variable :data:`LOCK_ENV` (the holder's process id): a lock held by
that process counts as their own.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import OutputError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: the process id of a process whose locks this process (one it started) may write under
LOCK_ENV = "NAPARI_HDN_LOCKS_HELD_BY"
LOCK_SUFFIX = ".lock"
#: flock errors that mean "not supported here" (some network file systems): use O_EXCL instead
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class OutputLockedError(OutputError):
    """Another process is writing this output (it holds its lock)."""


#: never follow a symbolic link when opening a lock file (one could point at an input)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file of the output ``path``: ``<path>.lock``, next to the file the path names
    once symbolic links are resolved (two spellings of one output share one lock)."""
    p = Path(path).expanduser()
    try:
        p = p.resolve()
    except (OSError, RuntimeError):  # a loop: the output itself is refused elsewhere
        p = p.absolute()
    return p.with_name(p.name + LOCK_SUFFIX)


def _check_lock_path(file: Path, what: str) -> None:
    """Refuse a lock path that is not a regular file (a symbolic link, a folder, a FIFO): writing
    the lock record through it would change what it points at."""
    try:
        st = os.lstat(file)
    except (FileNotFoundError, NotADirectoryError):  # no lock file (the output's checks say why)
        return
    except OSError as exc:
        raise OutputError(f"cannot check the lock file {file} of the {what}: "
                          f"{exc.strerror or exc}") from None
    import stat

    if not stat.S_ISREG(st.st_mode):
        kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a folder"
                if stat.S_ISDIR(st.st_mode) else "not a regular file")
        raise OutputError(f"{file}, where the lock file of the {what} goes, is {kind}: napari-hdn "
                          "does not write through it; move it away (it is no napari-hdn lock) "
                          "or choose another output")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:  # pragma: no cover - e.g. Windows without the process
        return False
    return True


def _read(fd_or_path) -> dict | None:
    """The holder's record in a lock file (an open descriptor or a path), or None."""
    try:
        if isinstance(fd_or_path, int):
            os.lseek(fd_or_path, 0, os.SEEK_SET)
            data = os.read(fd_or_path, 4096)
        else:
            with open(fd_or_path, "rb") as fh:
                data = fh.read(4096)
        rec = json.loads(data.decode("utf-8", "replace")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(_program() if i == 0 else a for i, a in enumerate(sys.argv))[:300]}


def _program() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return "napari-hdn" if name in ("__main__.py", "napari-hdn") else name


def _who(rec: dict | None) -> str:
    if not rec:
        return "another process (its lock file does not say which)"
    host = rec.get("host")
    here = host in (None, socket.gethostname())
    started = str(rec.get("started", "?")).replace("T", " ")
    return f"process {rec.get('pid', '?')}{'' if here else f' on {host}'} (started {started})"


def _inherited(rec: dict | None) -> bool:
    """Whether the lock of ``rec`` is held by the process that started this one for its work."""
    owner = os.environ.get(LOCK_ENV)
    return bool(rec and owner and str(rec.get("pid")) == owner)


class OutputLock:
    """The lock on one output; see the module docstring. Use :func:`output_lock`."""

    def __init__(self, path: str | os.PathLike, what: str = "output", hint: str = "") -> None:
        self.path = Path(path)
        self.file = lock_file(path)
        self.what = what
        self.hint = hint or "wait for it to finish or choose another output"
        self.note: str | None = None  # set when a stale lock was taken over
        self._fd: int | None = None
        self._own_file = False

    # -- refusing -------------------------------------------------------------------------------
    def _refuse(self, rec: dict | None) -> OutputLockedError:
        return OutputLockedError(f"{self.path} is being written by {_who(rec)}; {self.hint} "
                                 f"(its lock file is {self.file})")

    def _stale(self, rec: dict | None) -> None:
        if rec:
            self.note = (f"{self.file} was left by {_who(rec)}, which is no longer running; "
                         "taking the lock over")

    def holder(self) -> dict | None:
        """The record of the live process holding this lock, None when it is free (or held by
        the process that started this one). Takes nothing."""
        _check_lock_path(self.file, self.what)
        if not self.file.exists():
            return None
        if fcntl is not None:
            try:
                fd = os.open(self.file, os.O_RDONLY | _NOFOLLOW)
            except OSError:
                return None
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    rec = _read(fd) or self._reread(fd)
                    return None if _inherited(rec) else (rec or {})
                except OSError as exc:
                    if exc.errno not in _NO_FLOCK:
                        raise
                else:
                    return None  # free: whoever wrote the file is gone
            finally:
                os.close(fd)
        rec = _read(self.file)
        if rec is None or _inherited(rec):
            return None
        if rec.get("host") == socket.gethostname() and not _alive(int(rec.get("pid", 0) or 0)):
            return None
        return rec

    @staticmethod
    def _reread(fd: int) -> dict | None:
        """The holder writes its record just after taking the lock: read again a moment later."""
        time.sleep(0.05)
        return _read(fd)

    # -- taking ---------------------------------------------------------------------------------
    def acquire(self) -> OutputLock:
        """Take the lock, or raise :class:`OutputLockedError` naming its holder (never waits)."""
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the folder of {self.path} for its lock file: "
                              f"{exc.strerror or exc}") from None
        _check_lock_path(self.file, self.what)
        if fcntl is not None and self._acquire_flock():
            return self
        self._acquire_exclusive()
        return self

    def _open_failure(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot create the lock file {self.file} of the {self.what}: "
                           f"{exc.strerror or exc}; make its folder writable or write elsewhere")

    def _acquire_flock(self) -> bool:
        """Take the lock with flock; False when this file system has no flock."""
        for _ in range(100):  # retried only when the file was replaced under us
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
            except OSError as exc:
                raise self._open_failure(exc) from None
            try:
                _flock_soon(fd)
            except BlockingIOError:
                rec = _read(fd) or self._reread(fd)
                os.close(fd)
                if _inherited(rec):
                    return True  # the launcher's lock covers this process: nothing to take
                raise self._refuse(rec) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_FLOCK:
                    return False
                raise self._open_failure(exc) from None
            try:  # the file may have been removed (released) between our open and our flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.file))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._stale(_read(fd))
            self._write(fd)
            self._fd, self._own_file = fd, True
            return True
        raise OutputError(f"could not take the lock file {self.file}: it keeps being replaced")

    def _acquire_exclusive(self) -> None:
        """Take the lock by creating the file exclusively (no flock here)."""
        for _ in range(100):
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
            except FileExistsError:
                rec = _read(self.file)
                if _inherited(rec):
                    return
                pid = int((rec or {}).get("pid", 0) or 0)
                gone = rec is not None and rec.get("host") == socket.gethostname() and not _alive(pid)
                if rec is None and time.time() - _mtime(self.file) > 10:
                    gone = True  # empty or garbled for a while: no live writer
                if not gone:
                    raise self._refuse(rec) from None
                self._stale(rec)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.file)
                continue
            except OSError as exc:
                raise self._open_failure(exc) from None
            self._write(fd)
            self._fd, self._own_file = fd, True
            return
        raise OutputError(f"could not take the lock file {self.file}: it keeps being replaced")

    @staticmethod
    def _write(fd: int) -> None:
        data = json.dumps(_record()).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)

    def release(self) -> None:
        """Give the lock back and remove its file (only the file this lock wrote)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._own_file:
                try:
                    if os.path.samestat(os.fstat(fd), os.stat(self.file)):
                        os.unlink(self.file)  # still holding it: nobody can take it in between
                except OSError:
                    pass
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flock_soon(fd: int, tries: int = 3) -> None:
    """flock(LOCK_EX) without waiting, tried a few times 50 ms apart: a check
    (:func:`check_unlocked`) holds a shared lock for a moment, which must not read as a writer."""
    for k in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if k == tries - 1:
                raise
            time.sleep(0.05)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "output", hint: str = "",
                note: Callable[[str], None] | None = None) -> Iterator[OutputLock]:
    """Hold the lock on the output ``path`` (a file, a folder or a zarr store) within the block.

    ``what`` names the output, ``hint`` is what the refusal suggests ("wait for it to finish or
    choose another --out"); ``note`` receives the line said when a stale lock is taken over.
    Raises :class:`OutputLockedError` at once when another live process holds it.
    """
    with output_locks([(path, what, hint)], note=note) as held:
        yield held[0]


@contextlib.contextmanager
def output_locks(outputs: Iterable, note: Callable[[str], None] | None = None
                 ) -> Iterator[list[OutputLock]]:
    """Hold the locks of several outputs, ``[(path, what, hint)]`` (None paths skipped; the same
    path once), all or none: a refusal releases those already taken."""
    held: list[OutputLock] = []
    seen: set = set()
    try:
        for path, what, hint in outputs:
            if path is None or lock_file(path) in seen:
                continue
            seen.add(lock_file(path))
            lock = OutputLock(path, what, hint).acquire()
            held.append(lock)
            if lock.note and note is not None:
                note(lock.note)
        yield held
    finally:
        for lock in reversed(held):
            lock.release()


def check_unlocked(outputs: Iterable) -> None:
    """Refuse (:class:`OutputLockedError`) at once when another live process holds the lock of
    one of ``outputs`` (``[(path, what, hint)]``); takes nothing, writes nothing. For the checks
    that run before any work, so that a run still writing an output is named as such rather than
    taken for an earlier run's leftovers."""
    for path, what, hint in outputs:
        if path is None:
            continue
        lock = OutputLock(path, what, hint)
        rec = lock.holder()
        if rec is not None:
            raise lock._refuse(rec)


def environment_for_children() -> dict:
    """The environment for processes started to do this process's work under its locks."""
    return {**os.environ, LOCK_ENV: str(os.getpid())}
