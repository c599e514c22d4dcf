"""The device worker (``fitnas worker``): leases measurement tasks from the API over HTTP,
evaluates each one isolated in a child process and reports the outcome.

Imports with ``fitnas[worker]`` alone: no web stack, no database, no Optuna.
"""

from service.worker.loop import (
    ApiClient,
    Backoff,
    LeaseKeeper,
    Worker,
    WorkerConfig,
    WorkerError,
    adapt_task,
    available_runtimes,
    check_environment,
    configure_logging,
    load_data_sources,
)

__all__ = [
    "ApiClient",
    "Backoff",
    "LeaseKeeper",
    "Worker",
    "WorkerConfig",
    "WorkerError",
    "adapt_task",
    "available_runtimes",
    "check_environment",
    "configure_logging",
    "load_data_sources",
]
