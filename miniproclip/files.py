"""Crash-safe file writing: write under a temporary name, flush to disk, then rename over the target.

A rename is atomic on POSIX file systems, so a reader (or a resumed run) sees either the old file or the new
one, never half of one, whatever kills the writer (kill -9, a full disk, a lost node). Used by checkpoints,
caches, exported and merged model folders and the toy world.
"""

import contextlib
import os
import shutil
from pathlib import Path

TMP = ".tmp"  # `path + TMP` is the temporary name; checkpoint.py sweeps stale ones


def fsync_path(path: str) -> None:
    """Flush a file's data (or a folder's renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, per_process: bool = False):
    """`with atomic_path(p) as tmp: write(tmp)` makes `p` appear whole only once the block has succeeded.

    `per_process=True` where several processes (torchrun ranks) may write the same file at once, each with the
    same content: every process then writes its own temporary file, and the last rename wins.
    """
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + TMP + (str(os.getpid()) if per_process else "")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(path) or ".")
    finally:  # on failure nothing but the old file (if any) is left
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Atomically make `path` hold `text`."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_folder(path: str, replace: bool = True):
    """`with atomic_folder(p) as tmp: write(tmp/...)` makes the folder `p` appear whole only once the block has
    succeeded: it is written as a hidden sibling (`.NAME.partial-PID`) and renamed into place. An existing `p` is
    replaced (`replace=True`) or refused with FileExistsError; on failure the sibling is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier writer with this process id
    partial.mkdir()
    try:
        yield str(partial)
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} already exists: delete it or choose another output folder")
            shutil.rmtree(path)
        os.replace(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
