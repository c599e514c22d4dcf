"""The worker's configuration: what it was started with (``WorkerConfig``), what this
machine can run (runtimes, device), its own data sources for the ``train`` signal, and
fitting a leased task to this worker. One-line ``WorkerError`` for everything a person
must fix."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from search.evaluators.types import EvalTask

RUNTIMES = ("eager", "torchscript", "onnxruntime")
DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
TOKEN_ENV = "FITNAS_WORKER_TOKEN"
DATA_SOURCES_ENV = "FITNAS_DATA_SOURCES"
DATA_SOURCES_FILE_ENV = "FITNAS_DATA_SOURCES_FILE"
def builtin_data() -> tuple[str, ...]:
    """The data sets the evaluators build themselves (no configuration can redefine them)."""
    from search.evaluators.datasets import BUILTIN

    return tuple(BUILTIN)


class WorkerError(Exception):
    """A configuration or authorization problem; one line for a person, fatal."""



def _parse_data_sources(text: str, where: str, base: Path) -> dict[str, str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkerError(f"{where}: data sources are not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise WorkerError(f'{where}: data sources must be a JSON object {{"name": "path"}}')
    out: dict[str, str] = {}
    for name, value in data.items():
        if name in builtin_data():
            raise WorkerError(f"{where}: {name!r} is built in and cannot be redefined")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise WorkerError(f"{where}: bad data source name {name!r} (letters, digits, _.-)")
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = base / p
        if not p.exists():
            raise WorkerError(f"{where}: data source {name!r}: {p} does not exist")
        if not (p.is_dir() or p.suffix == ".npz"):
            raise WorkerError(
                f"{where}: data source {name!r}: {p} is neither a directory nor a .npz file"
            )
        out[name] = str(p)
    return out


def _data_sources_file(path: str | os.PathLike) -> dict[str, str]:
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as exc:
        raise WorkerError(f"cannot read data sources file {p}: {exc.strerror or exc}") from exc
    return _parse_data_sources(text, str(p), p.resolve().parent)


def load_data_sources(path: str | os.PathLike | None = None,
                      environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's own data sources for the ``train`` signal: names mapped to ImageFolder
    directories or ``.npz`` files. Never taken from a task: a job only names a data set.

    ``path`` (``--data-sources FILE``, a JSON object ``{"name": "path"}``) wins outright.
    Otherwise the environment: ``FITNAS_DATA_SOURCES_FILE`` (such a file) and
    ``FITNAS_DATA_SOURCES`` (inline JSON, or a file path), the latter winning on equal
    names. Relative paths in a file are relative to that file. Every path must exist."""
    if path is not None:
        return _data_sources_file(path)
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    file_value = (env.get(DATA_SOURCES_FILE_ENV) or "").strip()
    if file_value:
        out.update(_data_sources_file(file_value))
    raw = (env.get(DATA_SOURCES_ENV) or "").strip()
    if raw.startswith("{"):
        out.update(_parse_data_sources(raw, DATA_SOURCES_ENV, Path.cwd()))
    elif raw:
        out.update(_data_sources_file(raw))
    return out


def available_runtimes() -> list[str]:
    """Runtimes this installation can measure with: eager and TorchScript always, ONNX
    Runtime when ``onnxruntime`` and ``onnx`` are importable."""
    have = ["eager", "torchscript"]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        have.append("onnxruntime")
    return have


def _device_kind(device: str) -> str:
    return device.split(":", 1)[0]


def adapt_task(task: EvalTask, device: str, runtimes: list[str]) -> EvalTask | str:
    """Fit ``task`` to this worker: measurement on this worker's exact device (``cuda``
    becomes ``cuda:1`` on a worker started with ``--device cuda:1``). Returns the task,
    or a one-line reason when this worker cannot run it."""
    m = task.measure
    if m is None:
        return task
    if _device_kind(m.device) != _device_kind(device):
        return f"task measures on {m.device!r} but this worker measures on {device!r}"
    if m.runtime not in runtimes:
        return f"task needs runtime {m.runtime!r}; this worker offers {', '.join(runtimes)}"
    if m.device != device:
        task = task.model_copy(update={"measure": m.model_copy(update={"device": device})})
    return task


@dataclass
class WorkerConfig:
    server: str
    target: str
    token: str
    role: str = "latency"  # or "trainer": trains for the pool named by target
    device: str = "cpu"
    runtimes: list[str] = field(default_factory=available_runtimes)
    name: str = ""
    data_sources: dict[str, str] = field(default_factory=dict)
    poll_wait_s: float = 10.0  # long-poll window of one lease request (API caps it at 30)
    grace_s: float = 30.0  # on SIGTERM: how long to let the current evaluation finish
    max_tasks: int | None = None  # exit after this many tasks (None: run until stopped)
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    request_timeout_s: float = 30.0
    health_file: str | None = None  # touched on every answer from the API

    def __post_init__(self) -> None:
        self.server = self.server.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", self.server):
            raise WorkerError(f"--server must be an http(s):// URL, got {self.server!r}")
        if not self.target.strip():
            raise WorkerError("--target must not be empty")
        if not self.token:
            raise WorkerError(f"a worker token is required: --token or {TOKEN_ENV}")
        if not DEVICE_RE.match(self.device):
            raise WorkerError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        bad = [r for r in self.runtimes if r not in RUNTIMES]
        if bad:
            raise WorkerError(f"unknown runtime {bad[0]!r}; known: {', '.join(RUNTIMES)}")
        if not self.runtimes:
            raise WorkerError("at least one runtime is needed")
        self.runtimes = list(dict.fromkeys(self.runtimes))
        if not 0 <= self.poll_wait_s <= 30:
            raise WorkerError("--poll-wait must be between 0 and 30 seconds")
        if self.grace_s < 0:
            raise WorkerError("--grace must not be negative")
        if not self.name:
            self.name = f"{socket.gethostname()}-{self.device}-{os.getpid()}"


def check_environment(config: WorkerConfig) -> None:
    """Fail fast, with one line, when this machine cannot do what the config promises."""
    if config.role not in ("latency", "trainer"):
        raise WorkerError(f"--role {config.role}: latency or trainer")
    if config.role == "trainer" and not config.device.startswith("cpu"):
        raise WorkerError(f"--role trainer --device {config.device}: trainers train on "
                          "the CPU in this version (the device is for latency workers)")
    if "onnxruntime" in config.runtimes and "onnxruntime" not in available_runtimes():
        raise WorkerError("runtime 'onnxruntime' needs the onnx and onnxruntime packages")
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise WorkerError(f"--device {config.device}: no CUDA device is available here")
        index = int(config.device.split(":")[1]) if ":" in config.device else 0
        if index >= torch.cuda.device_count():
            raise WorkerError(
                f"--device {config.device}: only {torch.cuda.device_count()} CUDA device(s)"
            )


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO; keep the worker's own log readable
    logging.getLogger("httpx").setLevel(logging.WARNING)
