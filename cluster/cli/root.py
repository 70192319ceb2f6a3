"""The root command: its help, `--version`, and the group every command module adds to."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

app = typer.Typer(
    help="Expert-parallel Mixtral inference on Ray.", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False
)


def package_version() -> str:
    try:
        return version("moe-cluster")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def show_version(asked: bool) -> None:
    if asked:
        print(f"moe-cluster {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    _version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Expert-parallel Mixtral inference on Ray."""
