"""Atomic artefacts: a file or folder appears complete under its name, or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block succeeds it becomes `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, path)
        _fsync_directory(path.parent)
    finally:
        temporary_path.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_directory(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; once the block succeeds it becomes `path`.

    An existing `path` is an error unless `overwrite`; it is then swapped out and removed only
    after the new folder is in place.
    """
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield temporary
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(temporary, path)
            shutil.rmtree(old)
        else:
            os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _jsonl_lines(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace `path` by these records, one JSON object a line, atomically."""
    with atomic_file(path) as temporary:
        temporary.write_text(_jsonl_lines(records), encoding="utf-8")


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append whole lines and make them durable before returning (flush + fsync)."""
    lines = _jsonl_lines(records)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())


def recover_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete records of a JSONL file; a last line torn by a killed writer is cut off,
    so that the next append starts on a fresh line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete_length = data.rfind(b"\n") + 1
    if complete_length < len(data):
        with open(path, "rb+") as handle:
            handle.truncate(complete_length)
            os.fsync(handle.fileno())
    lines = data[:complete_length].decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
