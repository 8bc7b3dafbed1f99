"""Reading and writing our files: safetensors (weights) plus JSON metadata, written atomically.

safetensors cannot execute code on load, unlike pickle-based ``torch.save`` files.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelFileError


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` to ``path`` atomically (temp file + rename).

    A crash or a stop in the middle of writing never leaves a half-written file at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {k: json.dumps(v) for k, v in meta.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_file(path: str | os.PathLike, expect_format: str, what: str) -> tuple[dict, dict]:
    """Read a file written by :func:`write_file`, checking its ``format`` tag.

    Returns ``(meta, tensors)``. Raises :class:`ModelFileError` with a plain message when the file
    is missing, truncated/corrupt, or not a ``expect_format`` file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{what} file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a {what} file.")
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
        found = f"a {fmt!r} file" if fmt else "a file without napari-hdn metadata"
        raise ModelFileError(f"{path} is {found}, not a {what} file ({expect_format!r}).")
    return meta, tensors
