"""Reliability: a worker that always handles SIGTERM, finished work that survives an
outage longer than the lease, fast take-over of a dead replica's job, counted scheduler
errors, no orphaned evaluation children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service_harness import clean_env, free_port

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & SIGTERM_BIT)
    return False


def test_worker_exits_0_on_sigterm_in_every_phase_start_up_and_shutdown_included(tmp_path):
    """SIGTERM every 20 ms from the moment the process catches it (its first imports) to
    its exit: start-up, registration against an API that is not there, and the way out.
    Exactly what a harness that signals twice, or ``docker stop`` during start-up, does."""
    port = free_port()  # nothing listens: the worker is in its registration backoff
    cmd = [sys.executable, "-m", "service.cli", "worker", "--server",
           f"http://127.0.0.1:{port}", "--target", "cpu", "--runtime", "eager"]
    env = clean_env({"FITNAS_WORKER_TOKEN": "fnw_not_checked", "PYTHONPATH": os.getcwd()})
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=tmp_path)
        deadline = time.monotonic() + 30
        while not _catches_sigterm(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the worker did not stop"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.02)
        out = proc.stdout.read().decode()
        proc.stdout.close()
        assert proc.returncode == 0, out
        assert "Traceback" not in out
