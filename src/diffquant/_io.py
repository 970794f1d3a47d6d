"""Atomic file writes (temp file in the same folder + rename) shared by every room."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_folder", "atomic_path", "write_json", "write_text"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_folder(path: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Yield a hidden temp folder beside ``path`` and rename it onto ``path`` only if the block
    succeeds; an error, Ctrl-C or SIGTERM (raised as KeyboardInterrupt by the CLI) leaves
    nothing. An existing ``path`` is refused before any work."""
    from diffquant.errors import DiffquantError

    path = Path(path)
    if path.exists():
        raise DiffquantError(f"{what} {path} already exists; pass another --out or delete it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would leave the finished folder private
    try:
        yield tmp
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return _write(path, lambda p: p.write_text(text))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
