"""The ``fitnas`` command line. Each command group lives in its own module and registers
itself here; heavy imports happen inside commands so that ``fitnas worker`` runs with only
``fitnas[worker]`` installed."""

from __future__ import annotations

import sys

import typer

from service import cli_arch, cli_eval, cli_search, cli_server, cli_worker
from service.cli_common import CLIError

app = typer.Typer(
    name="fitnas",
    help="Hardware-aware neural architecture search for efficient CNNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (cli_arch, cli_eval, cli_search, cli_server, cli_worker):
    module.register(app)


def main() -> None:
    try:
        app()
    except CLIError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
