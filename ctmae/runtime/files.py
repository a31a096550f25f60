"""Atomic file writes: every output ctmae writes appears whole or not at all, and a full disk is one line."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctmae.runtime.loader import worker_failure


class OutputError(OSError):
    """An output that could not be written, as one line naming the file."""


# ``atomic_path``'s temporary names: .NAME.PID.HEX8.tmp[SUFFIX]
TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp(\.[^/]*)?$")
# A temporary untouched this long is no longer being written: every writer streams into it, and none pauses minutes.
STALE_SECONDS = 600


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is renamed over ``path``.

    The temporary name keeps the file's suffixes (nibabel and SimpleITK choose the format from them) and is removed
    if writing fails, so an earlier ``path`` stays intact. A failed write becomes ``OutputError`` naming ``path``:
    "No space left on device" when the folder's file system is full, whatever the writer said (torch's zip writer
    reports a full disk as ``RuntimeError: ... unexpected pos``). A write that failed because a data-loader worker
    died meanwhile raises that worker's ``LoaderError`` instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise worker_failure(e) or OutputError(
            f"{path}: could not write ({_reason(e, path.parent)}); earlier outputs are intact"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def sweep_temporaries(folder: str | os.PathLike, older_than: float = STALE_SECONDS) -> tuple[int, int]:
    """Remove the temporaries ``atomic_path`` left in ``folder`` when its process was killed mid-write (SIGKILL at
    the end of a job's grace period, the OOM killer, a lost node), where its ``finally`` never ran.

    Only files with ``atomic_path``'s temporary names that nothing has written to for ``older_than`` seconds go: a
    write in progress (another rank, another job sharing a cache folder) keeps its file fresh. Returns (files
    removed, their bytes); a folder that does not exist or cannot be listed removes nothing.
    """
    removed, size, now = 0, 0, time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not (TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False)):
                continue
            with contextlib.suppress(OSError):
                stat = entry.stat(follow_symlinks=False)
                if now - stat.st_mtime >= older_than:
                    os.unlink(entry.path)
                    removed, size = removed + 1, size + stat.st_size
    return removed, size


def _reason(error: BaseException, folder: Path) -> str:
    """A short reason for a failed write; a full disk is named whatever the writer's message was."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "No space left on device"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < (1 << 20):
            return "No space left on device"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Indented JSON with a final newline, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
