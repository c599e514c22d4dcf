"""The ``fitnas`` command line. Each command group lives in its own module and registers
itself here; heavy imports happen inside commands so that ``fitnas worker`` runs with only
``fitnas[worker]`` installed."""

from __future__ import annotations

import sys

if sys.argv[1:2] == ["worker"]:
    # before the imports below: a SIGTERM during start-up must not kill a worker
    from service import signals as _stop_signals

    _stop_signals.install()

import typer

from service.cli import arch, evaluate, predictor, quality, search, server, trials, worker
from service.cli.common import CLIError

app = typer.Typer(
    name="fitnas",
    help="Hardware-aware neural architecture search for efficient CNNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (arch, evaluate, quality, search, server, worker, predictor, trials):
    module.register(app)


def _usage_error_types() -> tuple[type[BaseException], ...]:
    # typer ships its own copy of click; its exception classes sit behind BadParameter.
    usage = typer.BadParameter.__mro__[1]
    abort = getattr(sys.modules[usage.__module__], "Abort", KeyboardInterrupt)
    return usage, abort


def main(argv: list[str] | None = None) -> None:
    """Entry point: click's usage errors become one ``error: ...`` line (exit 2)."""
    usage_error, abort = _usage_error_types()
    try:
        code = app(args=argv, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            ctx = getattr(exc, "ctx", None)
            typer.echo(ctx.get_help() if ctx is not None else str(exc))
            sys.exit(0)
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except abort:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except CLIError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
