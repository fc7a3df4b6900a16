"""Atomic writes: a crash mid-write never leaves a truncated file that a later run would trust."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def _process_umask() -> int:
    """The umask, read without changing it where /proc allows (os.umask must set it to read it)."""
    try:
        with open("/proc/self/status", "r", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: mkstemp's temp files are 0600
DIR_MODE = 0o777 & ~_UMASK  # what os.makedirs would give: mkdtemp's folders are 0700


TEMP_PREFIX = ".tmp_"  # atomic_write_bytes' temp files: .tmp_<random><final name>, renamed when complete


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.basename(path), dir=directory)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any, **kwargs: Any) -> None:
    atomic_write_text(path, json.dumps(obj, **kwargs))


def sweep_temp_files(folders) -> list[str]:
    """Remove (and return) the temp files of atomic writes that a kill cut short, below ``folders``
    (missing folders skipped). Only for folders no process is writing to at the time: a live writer's
    temp file would go too."""
    removed = []
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                if name.startswith(TEMP_PREFIX):
                    path = os.path.join(root, name)
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    removed.append(path)
    return removed
