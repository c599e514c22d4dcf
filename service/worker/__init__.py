"""The device worker (``fitnas worker``): leases measurement tasks from the API over HTTP,
evaluates each one isolated in a child process and reports the outcome.

Imports with ``fitnas[worker]`` alone: no web stack, no database, no Optuna.

Modules: ``client`` (the HTTP protocol client and its errors), ``keeper`` (the lease
heartbeat thread), ``config`` (configuration, data sources, fitting a task to this
worker) and ``loop`` (lease -> evaluate -> report).
"""

from service.worker.client import ApiClient, Backoff
from service.worker.config import (
    WorkerConfig,
    WorkerError,
    adapt_task,
    available_runtimes,
    check_environment,
    configure_logging,
    load_data_sources,
)
from service.worker.keeper import LeaseKeeper
from service.worker.loop import Worker

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
