"""Where pulled models live: `~/.cache/afa-serve/models/<name>/`, a plain Hugging Face folder."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "AFA_SERVE_CACHE_DIR"
PULL_RECORD = "afa_serve_pull.json"  # written last into a pulled folder: its provenance


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` if given, else $AFA_SERVE_CACHE_DIR, else ~/.cache/afa-serve."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if configured := os.environ.get(CACHE_DIR_ENV):
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "afa-serve"


def model_folder(name: str, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "models" / name


def is_pulled(name: str, cache_dir: str | Path | None = None) -> bool:
    """Pulled folders appear whole (atomic rename), with their pull record inside."""
    return (model_folder(name, cache_dir) / PULL_RECORD).is_file()
