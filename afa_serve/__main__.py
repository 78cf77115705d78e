"""`python -m afa_serve` is the `afa-serve` command."""

from afa_serve.cli import app

app(prog_name="afa-serve")
