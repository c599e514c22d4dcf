"""The warm evaluator: one long-lived child process that takes evaluation tasks over a
pipe, so that interpreter start-up, the torch / runtime imports and the reference
network's preparation are paid once per child instead of once per candidate.

It keeps every guarantee of the one-shot child (:func:`search.evaluators.runner.run_isolated`,
still the baseline and the fallback):

- the analytic memory pre-check and spec validation happen in the caller, as there;
- per task the child caps its address space at what it maps now plus ``task.memory_mb``
  (CUDA: a resident-memory watchdog), so a model over the ceiling fails its allocation;
- per-task timeout: no result within ``task.timeout_s`` (counted from the moment the task
  is handed over, a fresh child's start-up included) -> the child's process group is
  killed -> ``timeout``;
- a child that dies (signal, exit, the kernel's OOM killer) is classified exactly as a
  one-shot child's death (:func:`search.evaluators.runner.exit_failure`, from the log
  written since the task began);
- the child is replaced before the next task after any failure, after ``max_tasks``
  tasks, or when its resident memory has grown by more than ``max_rss_growth_mb`` since
  its first task, so that one task's leftovers (allocator caches, thread pools, a half
  built graph) cannot bias the next measurement. Each outcome records in
  ``evaluator`` whether it came from a fresh child.

The child dies with its parent: a watchdog thread exits when the parent process is gone
(``getppid`` changes; ``PR_SET_PDEATHSIG`` would fire when the *thread* that started the
child ends, and the worker starts evaluations from short-lived threads), and end of
input on the task pipe ends it too. Its log lives in a temporary directory that
:meth:`WarmEvaluator.close` removes (or the child, when the parent died without closing).

Protocol: one JSON line per task on the child's stdin (``{"task": EvalTask, "data_sources":
...}``), one JSON line of :class:`EvalOutcome` per task on a dedicated result pipe
(stdout and stderr go to the log, so nothing a library prints can corrupt a result).

Standard library and pydantic only at import time, like the runner.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from search.evaluators import runner
from search.evaluators.types import EvalOutcome, EvalTask, EvaluatorInfo, Failure

MiB = 2**20
DEFAULT_MAX_TASKS = 50
DEFAULT_MAX_RSS_GROWTH_MB = 512
_PARENT_POLL_S = 0.5


def _rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class _Child:
    """One running child: the process, its pipes and its log."""

    def __init__(self, data_dir: Path, index: int):
        self.log_path = data_dir / f"child-{index}.log"
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "search.evaluators.warm", "--child", str(write_fd),
               str(os.getpid()), str(data_dir)]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the child
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self.log,
                                         stderr=self.log, env=runner._child_env(),
                                         start_new_session=True, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            self.log.close()
            raise
        finally:
            os.close(write_fd)
        self.result_fd = read_fd
        self.buffer = b""
        self.tasks = 0
        self.rss_after_first: int | None = None

    def send(self, payload: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(payload.encode("utf-8") + b"\n")
        self.proc.stdin.flush()

    def read_line(self, deadline: float) -> bytes | None:
        """The next result line; None on timeout; b"" when the child closed the pipe."""
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.result_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.result_fd, 1 << 20)
            if not chunk:
                return b""
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(offset, self.log_size() - runner._LOG_TAIL_BYTES))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def kill(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        runner._kill_group(self.proc)
        with contextlib.suppress(OSError):
            os.close(self.result_fd)
        self.log.close()
        with contextlib.suppress(OSError):
            self.log_path.unlink()
        return self.proc.returncode


class WarmEvaluator:
    """Evaluate tasks in a long-lived child; never raises for a model's failure.

    Callable like :func:`search.evaluators.runner.evaluate` (``evaluator(task,
    isolated=True, data_sources=..., precheck=True)``), so the worker and the local
    search can hold one for their lifetime. ``threads="auto"``: a task with
    ``measure.threads`` unset gets the thread count chosen once, at the first such task,
    from the free cores then (so one search does not mix counts as the load moves); the
    contention policy still lowers it for a measurement when fewer cores are free.
    """

    def __init__(self, data_sources: dict[str, str] | None = None, *,
                 max_tasks: int = DEFAULT_MAX_TASKS,
                 max_rss_growth_mb: int = DEFAULT_MAX_RSS_GROWTH_MB,
                 threads: str | int | None = "auto", prespawn: bool = True):
        self.data_sources = data_sources
        self.max_tasks = max_tasks
        self.max_rss_growth_mb = max_rss_growth_mb
        self.threads_policy = threads
        self.threads: int | None = threads if isinstance(threads, int) else None
        self.prespawn = prespawn
        self._dir = runner.make_eval_dir("fitnas-warm-")
        self._child: _Child | None = None
        self._spawned = 0
        self._lock = threading.Lock()
        self._closed = False
        self._aborting: _Child | None = None
        self.children_started = 0

    # ---- lifetime ---------------------------------------------------------------------

    def __enter__(self) -> WarmEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child and remove the temporary directory. Idempotent."""
        with self._lock:
            self._closed = True
            self._retire()
            shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self):  # pragma: no cover - a safety net; close() is the contract
        with contextlib.suppress(Exception):
            self.close()

    def abort(self) -> None:
        """Kill the child now, from any thread: an evaluation in flight returns at once
        with ``crashed`` (for a caller that abandons it: a lost lease, a stop without
        grace). The next task gets a fresh child."""
        child = self._child
        if child is not None:
            self._aborting = child
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                os.killpg(child.proc.pid, signal.SIGKILL)

    def _retire(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child = None

    def _spawn(self) -> _Child:
        self._spawned += 1
        self.children_started += 1
        return _Child(self._dir, self._spawned)

    @property
    def child_pid(self) -> int | None:
        return self._child.proc.pid if self._child is not None else None

    # ---- evaluation -------------------------------------------------------------------

    def _resolve_threads(self, task: EvalTask) -> EvalTask:
        m = task.measure
        if m is None or m.threads is not None or not m.device.startswith("cpu"):
            return task
        if self.threads is None and self.threads_policy == "auto":
            from search.evaluators import fingerprint as fp

            self.threads, _notes = fp.choose_threads(None, fp.sample_load(0.25))
        if self.threads is None:
            return task
        return task.model_copy(update={"measure": m.model_copy(update={"threads":
                                                                       self.threads})})

    def __call__(self, task: EvalTask, *, isolated: bool = True,
                 data_sources: dict[str, str] | None = None,
                 precheck: bool = True) -> EvalOutcome:
        if not isolated:
            return runner.evaluate(task, isolated=False, data_sources=data_sources,
                                   precheck=precheck)
        return self.evaluate(task, data_sources=data_sources, precheck=precheck)

    def evaluate(self, task: EvalTask, *, data_sources: dict[str, str] | None = None,
                 precheck: bool = True) -> EvalOutcome:
        t0 = time.perf_counter()
        try:
            spec = runner._parse_spec(task)
            if precheck:
                refused = runner.memory_precheck(task, spec)
                if refused is not None:
                    return EvalOutcome(ok=False, failure=refused,
                                       seconds=time.perf_counter() - t0)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            return EvalOutcome(ok=False, failure=runner.classify(exc),
                               seconds=time.perf_counter() - t0)
        with self._lock:
            if self._closed:
                raise RuntimeError("the warm evaluator is closed")
            task = self._resolve_threads(task)
            return self._run(task, data_sources if data_sources is not None
                             else self.data_sources, t0)

    def _run(self, task: EvalTask, data_sources: dict[str, str] | None,
             t0: float) -> EvalOutcome:
        if self._child is not None and self._child.proc.poll() is not None:
            self._retire()  # died between tasks: replace it before this one
        if self._child is None:
            try:
                self._child = self._spawn()
            except OSError as exc:
                return EvalOutcome(ok=False, failure=Failure(
                    reason="crashed", message=f"could not start the evaluation: {exc}"),
                    seconds=time.perf_counter() - t0)
        child = self._child
        info = EvaluatorInfo(mode="warm", fresh=child.tasks == 0, task_index=child.tasks,
                             threads=self.threads)
        offset = child.log_size()
        deadline = time.monotonic() + task.timeout_s
        payload = json.dumps({"task": task.model_dump(mode="json"),
                              "data_sources": data_sources})
        try:
            child.send(payload)
            line = child.read_line(deadline)
        except (BrokenPipeError, OSError):
            line = b""
        except BaseException:
            self._retire()
            raise
        child.tasks += 1
        outcome = self._outcome(child, line, offset, task)
        outcome.seconds = time.perf_counter() - t0
        outcome.evaluator = info
        self._maybe_recycle(child, outcome)
        return outcome

    def _outcome(self, child: _Child, line: bytes | None, offset: int,
                 task: EvalTask) -> EvalOutcome:
        if line is None:
            self._retire()
            return EvalOutcome(ok=False, failure=Failure(
                reason="timeout",
                message=f"no result after {task.timeout_s:g} s; the evaluation was killed"))
        if line == b"" and self._aborting is child:
            self._aborting = None
            self._retire()
            return EvalOutcome(ok=False, failure=Failure(
                reason="crashed", message="the evaluation was aborted by its caller"))
        if line == b"":
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=10)
            tail = child.log_since(offset)
            returncode = child.proc.poll()
            self._retire()
            return EvalOutcome(ok=False, failure=runner.exit_failure(
                returncode if returncode is not None else -signal.SIGKILL, tail))
        try:
            return EvalOutcome.model_validate_json(line)
        except ValueError as exc:
            self._retire()
            return EvalOutcome(ok=False, failure=Failure(
                reason="crashed", message=f"unreadable result from the evaluation: {exc}"))

    def _maybe_recycle(self, child: _Child, outcome: EvalOutcome) -> None:
        if self._child is not child:
            return  # already retired (timeout, death)
        rss = _rss_of(child.proc.pid)
        if child.rss_after_first is None:
            child.rss_after_first = rss
        grown = (rss is not None and child.rss_after_first is not None
                 and rss - child.rss_after_first > self.max_rss_growth_mb * MiB)
        if not outcome.ok or child.tasks >= self.max_tasks or grown:
            self._retire()
            if self.prespawn and not self._closed:
                with contextlib.suppress(OSError):
                    self._child = self._spawn()  # its start-up overlaps the caller's work


# ---- the child process ----------------------------------------------------------------------


def _watch_parent(parent_pid: int, data_dir: str) -> None:
    """Exit when the parent is gone, removing the directory it can no longer remove."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                shutil.rmtree(data_dir, ignore_errors=True)
                os._exit(0)
            time.sleep(_PARENT_POLL_S)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class _MemoryCeiling:
    """Per task: cap the address space at what is mapped now plus the task's ceiling
    (CPU, Linux), or arm a resident-memory watchdog (CUDA and elsewhere)."""

    def __init__(self, write_result):
        import resource

        self.resource = resource
        self.write_result = write_result
        self.watch_limit: int | None = None
        self.watch_baseline = 0
        self.watch_mb = 0
        self.thread: threading.Thread | None = None

    def lift(self) -> None:
        r = self.resource
        self.watch_limit = None
        with contextlib.suppress(ValueError, OSError):
            _soft, hard = r.getrlimit(r.RLIMIT_AS)
            r.setrlimit(r.RLIMIT_AS, (hard, hard))

    def arm(self, task: EvalTask) -> None:
        r = self.resource
        cuda = task.measure is not None and task.measure.device.startswith("cuda")
        vm = runner._vm_bytes()
        limit = task.memory_mb * MiB
        if not cuda and vm is not None and sys.platform.startswith("linux"):
            _soft, hard = r.getrlimit(r.RLIMIT_AS)
            cap = vm + limit if hard == r.RLIM_INFINITY else min(vm + limit, hard)
            r.setrlimit(r.RLIMIT_AS, (cap, hard))
            return
        self.watch_baseline = runner._rss_bytes() or 0
        self.watch_mb = task.memory_mb
        self.watch_limit = limit
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="rss-watchdog",
                                           daemon=True)
            self.thread.start()

    def _watch(self) -> None:
        while True:
            limit = self.watch_limit
            rss = runner._rss_bytes()
            if limit is not None and rss is not None and rss - self.watch_baseline > limit:
                out = EvalOutcome(ok=False, failure=Failure(
                    reason="out_of_memory",
                    message=f"resident memory grew by {(rss - self.watch_baseline) / MiB:,.0f} "
                            f"MiB, over the memory ceiling of {self.watch_mb:,} MiB"))
                with contextlib.suppress(OSError):
                    self.write_result(out.model_dump_json())
                os._exit(3)
            time.sleep(0.05)


def _preload_deterministic() -> None:
    """Switching deterministic algorithms on (as quality evaluations do) imports torch's
    compiler modules the first time: seconds, and hundreds of modules. Pay it at start-up,
    not in the first task."""
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def child_main(result_fd: int, parent_pid: int, data_dir: str) -> int:
    """Entry point of the warm child: tasks from stdin until end of input."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _watch_parent(parent_pid, data_dir)
    out = os.fdopen(result_fd, "w", encoding="utf-8")
    write_lock = threading.Lock()

    def write_result(text: str) -> None:
        with write_lock:
            out.write(text + "\n")
            out.flush()

    from search.evaluators import allocator, latency
    from search.evaluators.types import QualitySettings

    allocator.apply()
    # torch, blocks, the evaluators and torch's thread pool, before the first task arrives
    runner._preload(EvalTask(spec={}, quality=QualitySettings()))
    _preload_deterministic()
    latency.enable_reference_reuse()
    ceiling = _MemoryCeiling(write_result)
    for line in sys.stdin:
        if not line.strip():
            continue
        t0 = time.perf_counter()
        try:
            payload = json.loads(line)
            task = EvalTask.model_validate(payload["task"])
            data_sources = payload.get("data_sources")
        except (ValueError, KeyError) as exc:
            write_result(EvalOutcome(ok=False, failure=Failure(
                reason="crashed", message=f"unreadable task: {exc}")).model_dump_json())
            continue
        try:
            ceiling.lift()
            runner._preload(task)
            ceiling.arm(task)
            outcome = runner.run_in_process(task, data_sources)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            outcome = EvalOutcome(ok=False, failure=runner.classify(exc))
        outcome.seconds = time.perf_counter() - t0
        try:
            text = outcome.model_dump_json()
        except MemoryError:
            text = json.dumps({"ok": False, "failure": {
                "reason": "out_of_memory", "message": "out of memory writing the result"}})
        ceiling.lift()
        write_result(text)
    # End of input: the parent closed the pipe (it kills this process next) or died (then
    # it is reparented in a moment, and the directory is this process's to remove).
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if os.getppid() != parent_pid:
            shutil.rmtree(data_dir, ignore_errors=True)
            break
        time.sleep(0.02)
    return 0


def _main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "--child":
        return child_main(int(argv[1]), int(argv[2]), argv[3])
    print("usage: python -m search.evaluators.warm --child RESULT_FD PARENT_PID DIR",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
