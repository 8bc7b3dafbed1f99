"""Reading and writing our files, safely.

Model and noise-model files are safetensors (weights) plus JSON metadata; safetensors cannot execute
code on load, unlike pickle-based ``torch.save`` files.

Every output (model files, TIFFs, figures) is written to a temporary file in the destination folder
and renamed over the destination only once it is complete (:func:`atomic_write`): a crash, a stop
or a full disk never leaves a half-written file, and a file that was there before stays intact.
Files are created with the usual permissions (0666 less the umask), so that colleagues on a shared
server can read them. :func:`check_output` checks a destination before any work starts.

Every input (model, noise-model and TIFF files) is checked by :func:`check_input_file` before
anything opens it: a FIFO, a device, a socket, a folder, a symbolic link loop or an empty file is
refused with one line, and a FIFO is never opened (opening one blocks until something writes).
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from ..errors import ModelFileError, OutputError

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def _open_tmp(path: Path):
    """A new, empty temporary file next to ``path``: ``(tmp_path, binary file object)``.

    ``open(..., "xb")`` creates it exclusively with mode 0o666 less the umask (``mkstemp`` would
    give 0600).
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, open(tmp, "xb")  # noqa: SIM115 - closed by the caller
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def write_failure(exc: OSError, path: Path, existed: bool | None = None) -> str:
    """One line saying why ``path`` was not written, and what is left there."""
    existed = path.exists() if existed is None else existed
    left = "the previous file is unchanged" if existed else "nothing was written there"
    code = getattr(exc, "errno", None)
    if code in _DISK_FULL or "No space left" in str(exc):
        return f"disk full: {path} was not written ({left}); free some space or write elsewhere"
    if code in _DENIED:
        why = "read-only file system" if code == errno.EROFS else "permission denied"
        return f"cannot write {path}: {why} ({left})"
    return f"cannot write {path}: {exc.strerror or exc} ({left})"


def atomic_write(path: str | os.PathLike, write: Callable, what: str = "file") -> Path:
    """Write ``path`` through ``write(fh)`` (``fh`` a binary file object), atomically.

    The contents go to a temporary file in the same folder, which is flushed to disk and renamed
    over ``path`` only when complete.

    Raises
    ------
    OutputError
        When the folder cannot be written or the disk is full: one line naming the file, which is
        left as it was (or absent).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder: give a file name for the {what}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fh = _open_tmp(path)
    except OSError as exc:
        raise OutputError(write_failure(exc, path, existed)) from None
    try:
        try:
            with fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(write_failure(exc, path, existed)) from None
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:  # pragma: no cover - nothing more can be done
                pass
    return path


def write_tiff(path: str | os.PathLike, array, **kwargs) -> Path:
    """Write ``array`` as a TIFF (``tifffile.imwrite`` keywords), atomically.

    Refuses (:class:`OutputError`) to write an array with NaN or infinite values: such a file would
    look like a result.
    """
    import numpy as np
    import tifffile

    arr = np.asarray(array)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise OutputError(f"{path} was not written: {bad} of its {arr.size} values are NaN or "
                          "infinite (the model or the data are not usable together)")
    return atomic_write(path, lambda fh: tifffile.imwrite(fh, arr, **kwargs), "TIFF image")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symbolic link loop: not a file, so not the other one
        return False


def check_output(path: str | os.PathLike, *, inputs: Iterable = (), overwrite: bool = False,
                 what: str = "output", overwrite_hint: str = "pass overwrite=True") -> Path:
    """Check, before any work starts, that ``path`` can be written.

    Refuses (:class:`OutputError`, one line) a destination that is one of ``inputs`` (whatever
    ``overwrite`` says), an existing folder, an existing file unless ``overwrite``, and a folder
    that cannot be written (read-only, missing permission, not a folder, ``/proc``).
    """
    p = Path(path).expanduser()
    for src in inputs:
        if src is not None and _same_file(p, Path(src).expanduser()):
            raise OutputError(f"the {what} {p} is also an input ({src}): writing it would destroy "
                              "the input; choose another name")
    if p.is_dir():
        raise OutputError(f"the {what} {p} is a folder: give a file name")
    try:
        mode = os.stat(p).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):  # never replace a device, FIFO or socket
        kind = next((name for test, name in _NOT_FILES if test(mode)), "not a regular file")
        raise OutputError(f"the {what} {p} is {kind}, not a file: give the name of a file to "
                          "write (napari-hdn never replaces a special file)")
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise OutputError(f"the {what} {p} exists: {overwrite_hint} to replace it, or choose "
                          "another name")
    check_folder(p.parent, what)
    return p


def check_folder(folder: str | os.PathLike, what: str = "output") -> Path:
    """Check that files can be created in ``folder`` (or in the folder that would hold it)."""
    folder = Path(folder).expanduser()
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot write the {what} in {folder}: {anc} is a file, not a folder")
    if anc != folder:  # to be created: the existing ancestor must take a new folder
        if not os.access(anc, os.W_OK | os.X_OK):
            raise OutputError(f"cannot create the folder {folder} for the {what}: {anc} is not "
                              "writable")
        return folder
    try:  # the only sure test (read-only mounts, /proc, ACLs): create and remove a file
        tmp, fh = _open_tmp(folder / "write-test")
        fh.close()
        tmp.unlink()
    except OSError as exc:
        why = ("read-only file system" if exc.errno == errno.EROFS else
               "permission denied" if exc.errno in _DENIED else exc.strerror or str(exc))
        raise OutputError(f"cannot write the {what} in {folder}: {why}") from None
    return folder


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` to ``path`` atomically (temp file + rename).

    A crash, a stop or a full disk in the middle of writing never leaves a half-written file at
    ``path``; see :func:`atomic_write`.
    """
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {k: json.dumps(v) for k, v in meta.items()}
    data = save_bytes(flat, metadata=header)
    return atomic_write(path, lambda fh: fh.write(data), "model file")


#: kinds of files that are not files to read, as ``os.stat`` tells them (never opened: opening a
#: FIFO blocks until something writes to it, a device gives bytes forever)
_NOT_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_input_file(path, what: str, kind: str = "file", error: type = ModelFileError) -> Path:
    """``path`` as a Path, once ``os.stat`` says it is a regular, readable, non-empty file.

    Every file napari-hdn reads goes through this check before anything opens it (model and
    noise-model files in :func:`read_file`, TIFFs in :mod:`.imageio`). ``what`` names the input in
    the messages ("input", "napari-hdn model"), ``kind`` what it should be ("TIFF file").

    Raises
    ------
    error
        One line naming the path: not found (a broken symbolic link says where it points), a
        symbolic link loop, a path through a file, a folder, a FIFO, a device or a socket, no
        permission to read, or an empty file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"{what}: expected the path of a {kind}, not {type(path).__name__}")
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise error(f"{what} {p} is a broken symbolic link: it points to {os.readlink(p)}, "
                        "which does not exist") from None
        raise error(f"{what} file not found: {p}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{what} {p} is a symbolic link loop (too many levels of symbolic links): "
                        "point the link at a file") from None
        if exc.errno == errno.ENOTDIR:
            anc = next((a for a in p.parents if a.is_file()), p.parent)
            raise error(f"{what} file not found: {p} ({anc} is a file, not a folder)") from None
        why = "permission denied" if exc.errno in _DENIED else exc.strerror or str(exc)
        raise error(f"cannot read the {what} {p}: {why}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {p} is a folder, not a {kind}")
    for test, name in _NOT_FILES:
        if test(st.st_mode):
            raise error(f"{what} {p} is {name}, not a file: give a regular file (a {kind})")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {p} is not a regular file: give a {kind}")
    if not os.access(p, os.R_OK):
        raise error(f"cannot read the {what} {p}: permission denied")
    if st.st_size == 0:
        raise error(f"{what} {p} is empty (0 bytes), not a readable {kind}")
    return p


def read_file(path: str | os.PathLike, expect_format: str, what: str) -> tuple[dict, dict]:
    """Read a file written by :func:`write_file`, checking its ``format`` tag.

    Returns ``(meta, tensors)``. Raises :class:`ModelFileError` with a plain message when the file
    is missing, not a regular file (:func:`check_input_file`), unreadable, truncated/corrupt, or
    not a ``expect_format`` file.
    """
    path = check_input_file(path, what, f"{what} file", ModelFileError)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for bad headers/data
        raise ModelFileError(
            f"{path} is not a readable {what} file (corrupt, truncated or another format): {exc}. "
            f"Use a file written by napari-hdn."
        ) from None
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        meta = {}
    fmt = meta.get("format")
    if fmt != expect_format:
        found = f"a {fmt!r} file" if isinstance(fmt, str) and fmt else \
            "a file without napari-hdn metadata"
        raise ModelFileError(f"{path} is {found}, not a {what} file ({expect_format!r}).")
    return meta, tensors


def check_finite_tensors(tensors: dict[str, torch.Tensor], path, what: str) -> None:
    """Refuse (:class:`ModelFileError`) tensors with NaN or infinite values."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{path}: the {what} holds NaN or infinite values ({name}); the "
                                 "file is damaged or was edited, or training diverged")


def finite_number(value, name: str, path, positive: bool = False) -> float:
    """``value`` as a float, or :class:`ModelFileError` when it is not a finite (positive) number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and not value > 0):
        need = "a positive finite number" if positive else "a finite number"
        raise ModelFileError(f"{path}: {name} must be {need}, not {value!r}; the file is damaged or "
                             "was edited")
    return float(value)
