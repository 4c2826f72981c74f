"""Durable file writes: a file or folder is either wholly there or not at all, even after a crash.

Every write goes to a temporary name in the destination's own directory (os.replace is atomic only
within one file system), is flushed and fsynced, renamed into place, and the directory is fsynced
so the rename itself survives a power cut. Checkpoints, prompt-embedding files, run-folder files,
sample videos and adapters are all written through here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_file(path: str | Path) -> None:
    """Flush a file some other code wrote to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_directory(path: str | Path) -> None:
    """Make the renames in a directory durable (best effort)."""
    try:
        dir_fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data itself is already synced
    finally:
        os.close(dir_fd)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(f)` into a temporary file beside `path`, then rename it over `path`: readers see the old
    file or the new one, and a failed write leaves the old one and no temporary file."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def torch_save_atomic(obj: object, path: str | Path) -> Path:
    """torch.save, atomically: a crash never leaves a torn file where a checkpoint was."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f))


def replace_directory(tmp: str | Path, final: str | Path) -> Path:
    """Put a fully written (and synced) folder `tmp` at `final`, replacing any folder there, and make
    the rename durable. `tmp` must be in `final`'s parent directory."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_directory(final.parent)
    return final
