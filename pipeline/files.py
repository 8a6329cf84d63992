"""Atomic file writes shared by every stage: a reader sees the old file or the complete new one, never a
partial file, even if the process is killed mid-write."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FILE_MODE = 0o644
TEMP_SUFFIX = ".part"  # hidden '.<name>.<random>.part' files: never read as data, removed on the next run


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    On any error the temporary file is removed, so ``path`` holds either its old content or the complete
    new one, never a partial file. A killed process leaves only a hidden ``.<name>.*.part`` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, FILE_MODE)
        os.replace(temp, path)
        _fsync_dir(path.parent)
    finally:
        temp.unlink(missing_ok=True)


def remove_stale_parts(folder: Path, name: str) -> None:
    """Delete temporary files a killed writer of ``folder/name`` left behind."""
    for stale in folder.glob(f".{name}.*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as temp:
        temp.write_bytes(text.encode("utf-8"))
    return Path(path)


def write_json(path: Path, payload: Mapping[str, Any], *, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n")
