"""Atomic file writes: a reader (or a crash) sees the old file or the complete new one, never a
partial one. A leaf module: it imports nothing of ours, so every other module may use it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(
    path: str | os.PathLike[str], write: Callable[[Path], object], *, fsync: bool = False
) -> Path:
    """Call `write(temporary)` on a file beside `path`, then rename it onto `path`.

    The temporary file is removed if `write` raises; `fsync=True` flushes it to disk before the
    rename (for files a resumed run depends on). The result gets the usual umask permissions.
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        if fsync:
            with temporary.open("rb") as file:
                os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """`write_atomically` for a UTF-8 text file."""
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_folder(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Rename the finished folder `staging` onto `target`; an old `target` is moved aside first
    and removed only after the rename (put back if the rename fails). The parent is fsynced."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.rename(staging, target)
    else:
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, old / target.name)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old / target.name, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return target
