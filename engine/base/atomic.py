"""Writing files and directories so that a reader sees the old version or the new one whole.

Reports, manifests, checkpoints, plans and timing caches are all replaced this way: a crash
or a concurrent reader never meets half a file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: bytes | str, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory (created
    with its parents when missing, as every ``--out`` of the CLI is).

    ``durable``: also fsync the data before the rename and the directory after it, so that
    once this returns a crash leaves the new file, whole (without it a crash soon after may
    leave the new name over data that never reached the disk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also keep the half-written file
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_directory(staging: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Move a finished ``staging`` directory to ``destination``, replacing what is there.

    The old ``destination`` is renamed aside first and deleted after, so the name always
    points at a complete directory; the parent directory is synced so the rename survives
    a crash.
    """
    staging, destination = Path(staging), Path(destination)
    old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
    if destination.exists():
        os.replace(destination, old)
    os.replace(staging, destination)
    shutil.rmtree(old, ignore_errors=True)
    fsync_path(destination.parent)
    return destination
