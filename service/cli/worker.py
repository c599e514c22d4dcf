"""``fitnas worker``: a device worker that leases measurement tasks from the API.

Needs only ``fitnas[worker]``: nothing here (or in :mod:`service.worker`) imports the web
stack, the database layer or Optuna.
"""

from __future__ import annotations

from pathlib import Path

import typer

from service.cli.common import fail


def _wait_for_token_file(path: Path, poll_s: float = 1.0) -> str | None:
    """The token from ``path`` once it exists and is not empty (a bootstrap writes it);
    None if the worker is told to stop meanwhile. Waiting, not exiting, keeps a worker
    started before its token from restarting in a loop."""
    import logging
    import threading

    from service import signals

    log = logging.getLogger("fitnas.worker")
    said = False
    while not signals.pending():
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError:
            token = ""
        if token:
            return token
        if not said:
            log.warning("waiting for the worker token in %s", path)
            said = True
        threading.Event().wait(poll_s)
    return None


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
        token_file: Path | None = typer.Option(
            None, "--token-file", envvar="FITNAS_WORKER_TOKEN_FILE", show_default=False,
            help="Read the worker token from this file (a secret mounted into a "
            "container); until it exists the worker waits for it instead of exiting.",
        ),
        health_file: Path | None = typer.Option(
            None, "--health-file", envvar="FITNAS_WORKER_HEALTH_FILE", show_default=False,
            help="Touched on every answer from the API: a container healthcheck reads its "
            "age.",
        ),
        role: str = typer.Option(
            "latency", "--role", help="latency: lease measurement tasks of TARGET and "
            "measure them on this device; trainer: lease training tasks of the trainer pool "
            "named by --target (its token made with --role trainer) and never measure"),
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

        configure_logging(log_level)
        if not (token or "").strip() and token_file is not None:
            token = _wait_for_token_file(token_file)
            if token is None:  # stopped while waiting
                raise typer.Exit(0)
        try:
            sources = load_data_sources(data_sources)
            config = WorkerConfig(
                server=server,
                target=target,
                token=(token or "").strip(),
                role=role,
                device=device,
                runtimes=list(runtime) if runtime else available_runtimes(),
                name=name or "",
                data_sources=sources,
                poll_wait_s=poll_wait,
                grace_s=grace,
                max_tasks=max_tasks,
                backoff_cap_s=backoff_cap,
                health_file=str(health_file) if health_file else None,
            )
            check_environment(config)
        except WorkerError as exc:
            fail(str(exc))
        try:
            code = Worker(config).run()
        except WorkerError as exc:
            fail(str(exc))
        raise typer.Exit(code)
