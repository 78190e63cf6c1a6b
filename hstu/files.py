"""Files written so that nothing half-written is ever read, and leftovers of killed processes are removed.

A temporary file or folder is named ``<prefix><host>@<pid>-<random>``: the process that owns it (no
host name holds an ``@``, so one host's names never start with another's).
A process killed with SIGKILL cannot remove its temporaries; the next one to use the same folder
removes those whose owner is gone (:func:`remove_abandoned`), and never one whose owner still runs:
another run may be downloading right now.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

from hstu.errors import ConfigError


def owned_prefix(prefix: str) -> str:
    """``prefix`` followed by this host and process: the start of a temporary name this process owns."""
    return f"{prefix}{socket.gethostname()}@{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_abandoned(folder: Path, prefix: str) -> list[Path]:
    """Remove the temporaries named :func:`owned_prefix` (``prefix``) in ``folder`` whose process, on this
    host, no longer runs; return them. Other hosts' temporaries (a shared file system) are left alone."""
    start = f"{prefix}{socket.gethostname()}@"
    removed = []
    for entry in Path(folder).glob(f"{glob.escape(start)}*"):
        pid = entry.name[len(start):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _running(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def write_text_atomically(path: Path, text: str, replace: bool = True) -> None:
    """Write ``path`` through a temporary file in its folder: readers never see half of it. The file takes
    ``path``'s place with ``os.replace``; without ``replace`` with a hard link, which raises FileExistsError
    when ``path`` exists, so of two writers racing for a new file one fails and nothing is lost."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=owned_prefix(f".{path.name}."), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_folder_path(folder: str | Path, key: str) -> None:
    """ConfigError naming ``key`` when ``folder``, or the nearest existing path above it, is a file: no
    folder can be made or read there."""
    blocking = file_in_the_way(Path(folder))
    if blocking is not None:
        raise ConfigError(f"{key}={folder}: {blocking} is a file, not a folder")


def file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing path at or above ``folder`` when it is a file (so ``folder`` can never be made),
    else None."""
    nearest = next(path for path in (Path(folder), *Path(folder).parents) if path.exists())
    return None if nearest.is_dir() else nearest


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_of(path: Path) -> str:
    """The file's SHA-256 in hex, as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
