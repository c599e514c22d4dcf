"""``fitnas worker``: a device worker that leases measurement tasks from the API.

Needs only ``fitnas[worker]``: nothing here (or in :mod:`service.worker`) imports the web
stack, the database layer or Optuna.
"""

from __future__ import annotations

from pathlib import Path

import typer

from service.cli.common import fail


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker(
        server: str = typer.Option(
            ..., "--server", envvar="FITNAS_SERVER_URL",
            help="Base URL of the fitnas API, e.g. http://api:8000.",
        ),
        target: str = typer.Option(
            ..., "--target", envvar="FITNAS_WORKER_TARGET",
            help="Target (device class) this worker measures for; the token must be "
            "scoped to it.",
        ),
        token: str | None = typer.Option(
            None, "--token", envvar="FITNAS_WORKER_TOKEN", show_default=False,
            help="Worker token (prefer the FITNAS_WORKER_TOKEN environment variable: "
            "arguments show in ps).",
        ),
        device: str = typer.Option(
            "cpu", "--device", envvar="FITNAS_WORKER_DEVICE", help="cpu, cuda or cuda:N."
        ),
        runtime: list[str] | None = typer.Option(
            None, "--runtime",
            help="Runtime offered (repeat for several): eager, torchscript, onnxruntime. "
            "Default: every one installed.",
        ),
        name: str | None = typer.Option(
            None, "--name", envvar="FITNAS_WORKER_NAME",
            help="Name shown by the API. Default: HOST-DEVICE-PID.",
        ),
        data_sources: Path | None = typer.Option(
            None, "--data-sources",
            help='JSON file {"name": "path"} naming this worker\'s data sets (ImageFolder '
            "directories or .npz files) for the 'train' signal. Default: the environment, "
            "FITNAS_DATA_SOURCES_FILE (such a file) and FITNAS_DATA_SOURCES (inline JSON).",
        ),
        grace: float = typer.Option(
            30.0, "--grace", min=0.0,
            help="On SIGTERM, seconds to let the current evaluation finish before its "
            "lease is released.",
        ),
        poll_wait: float = typer.Option(
            10.0, "--poll-wait", min=0.0, max=30.0,
            help="Long-poll window of one lease request, seconds.",
        ),
        backoff_cap: float = typer.Option(
            30.0, "--backoff-cap", min=0.5,
            help="Longest wait between reconnection attempts while the API is down.",
        ),
        max_tasks: int | None = typer.Option(
            None, "--max-tasks", min=1, help="Exit after this many tasks."
        ),
        log_level: str = typer.Option(
            "info", "--log-level", help="debug, info, warning or error."
        ),
    ) -> None:
        """Run a device worker: lease measurement tasks for TARGET from the API, evaluate
        each in an isolated child process and report the results. Stops cleanly on
        SIGTERM (exit status 0)."""
        from service.worker import (
            Worker,
            WorkerConfig,
            WorkerError,
            available_runtimes,
            check_environment,
            configure_logging,
            load_data_sources,
        )

        try:
            sources = load_data_sources(data_sources)
            config = WorkerConfig(
                server=server,
                target=target,
                token=(token or "").strip(),
                device=device,
                runtimes=list(runtime) if runtime else available_runtimes(),
                name=name or "",
                data_sources=sources,
                poll_wait_s=poll_wait,
                grace_s=grace,
                max_tasks=max_tasks,
                backoff_cap_s=backoff_cap,
            )
            check_environment(config)
        except WorkerError as exc:
            fail(str(exc))
        configure_logging(log_level)
        try:
            code = Worker(config).run()
        except WorkerError as exc:
            fail(str(exc))
        raise typer.Exit(code)
