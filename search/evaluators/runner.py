"""Evaluation isolation: run one :class:`EvalTask` (latency and/or quality) in a child
process with a timeout and a memory ceiling, and turn every way a model can fail into a
typed :class:`Failure`. The caller (the worker loop, the local search, ``fitnas measure``)
never sees an exception for a model's failure and lives on.

- The child is a fresh interpreter (``python -m search.evaluators.runner``) in its own
  session / process group; on timeout the whole group is killed -> ``timeout``.
- Memory: before spawning, an analytic lower bound (parameters and peak activations from
  :func:`blocks.cost.estimate_cost`) refuses an obviously too-big model as
  ``out_of_memory`` without allocating anything. In the child (CPU devices on Linux) the
  address space is capped with ``RLIMIT_AS`` at what the loaded runtime already uses plus
  ``task.memory_mb``, so a model over the ceiling fails its allocation (MemoryError /
  "can't allocate memory") -> ``out_of_memory``. On CUDA the address-space cap cannot be
  used (the driver maps huge virtual ranges), so a watchdog thread caps resident memory
  instead; CUDA's own out-of-memory error maps to ``out_of_memory`` too.
- The child dies with its parent, even one killed -9 (:func:`_die_with_parent`), and
  takes the temporary directory with it.
- A child killed by SIGKILL that we did not send (the kernel's OOM killer) ->
  ``out_of_memory``; another signal -> ``crashed``.

This module imports only pydantic and the standard library at import time, so that a
worker with ``fitnas[worker]`` installed can import it cheaply.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from search.evaluators import allocator
from search.evaluators.types import EvalOutcome, EvalTask, EvaluatorInfo, Failure

MiB = 2**20
# Memory patterns in exception messages of torch, its allocators and ONNX Runtime.
_OOM_PATTERNS = re.compile(
    r"out of memory|not enough memory|can't allocate memory|cannot allocate memory|"
    r"bad_alloc|bad allocation|failed to allocate memory|memoryerror",
    re.IGNORECASE,
)
_LOG_TAIL_BYTES = 8192
# Progress of a multi-fidelity evaluation: (step, value) -> go on? (False: stop, pruned)
ProgressCallback = Callable[[int, float], bool]
_PROGRESS_ENV = "FITNAS_PROGRESS_FDS"  # "<write fd>,<read fd>" in the child
_PARENT_ENV = "FITNAS_EVAL_PARENT_PID"  # the child dies when this process is gone


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def classify(exc: BaseException) -> Failure:
    """Map an exception raised while evaluating a model to a typed failure."""
    from pydantic import ValidationError

    from search.evaluators.latency import ExportError, UnsupportedSettings

    try:
        from blocks.load import SpecLoadError
        from blocks.shapes import SpecError
    except ImportError:  # pragma: no cover - blocks always ships with search
        SpecError = SpecLoadError = ()  # type: ignore[assignment,misc]

    msg = _first_line(exc)
    if isinstance(exc, SpecError | SpecLoadError | ValidationError):
        return Failure(reason="invalid_spec", message=str(exc).strip().splitlines()[0])
    if isinstance(exc, UnsupportedSettings):
        return Failure(reason="unsupported", message=str(exc))
    if isinstance(exc, ExportError):
        return Failure(reason="export_failed", message=str(exc))
    if isinstance(exc, MemoryError) or _OOM_PATTERNS.search(msg):
        return Failure(reason="out_of_memory", message=msg)
    if type(exc).__name__ in ("OutOfMemoryError",):  # torch.cuda.OutOfMemoryError
        return Failure(reason="out_of_memory", message=msg)
    return Failure(reason="runtime_error", message=msg)


def _parse_spec(task: EvalTask):
    from blocks.load import spec_from_dict
    from blocks.shapes import resolve

    spec = spec_from_dict(task.spec)
    resolve(spec)
    return spec


# ---- analytic memory pre-check ---------------------------------------------------------------


def memory_estimate(task: EvalTask, spec=None) -> tuple[int, str]:
    """A lower bound of the bytes the evaluation needs beyond the runtime itself, with a
    one-line explanation. Measuring holds the built model, its folded copy (and for ONNX
    Runtime the exported graph) and one inference's peak activations, for the candidate
    and the reference; training holds weights, gradients and saved activations."""
    from blocks.cost import estimate_cost
    from blocks.load import parse_spec

    spec = spec if spec is not None else _parse_spec(task)
    need = 0
    why = ""
    m = task.measure
    if m is not None:
        dtype_bytes = 2 if m.dtype in ("float16", "bfloat16") else 4
        copies = 3 if m.runtime == "onnxruntime" else 2
        res = m.resolution or spec.resolution
        c = estimate_cost(spec, res, m.batch, dtype_bytes=dtype_bytes)
        weights = c.params * 4 * copies
        acts = c.activation_bytes
        if m.reference:
            try:
                rs = parse_spec(m.reference)
                rc = estimate_cost(rs, m.resolution or rs.resolution, m.batch,
                                   dtype_bytes=dtype_bytes)
                weights += rc.params * 4 * copies
                acts = max(acts, rc.activation_bytes)
            except Exception:
                pass  # the measurement itself reports a bad reference
        need = weights + acts
        why = (f"{c.params:,} parameters and {acts / MiB:,.1f} MiB of peak activations at "
               f"batch {m.batch}, resolution {res}")
    q = task.quality
    if q is not None:
        res = q.resolution or 32
        batch = q.batch
        # the data set decides the class count; two classes keep this a lower bound
        c = estimate_cost(spec.model_copy(update={"num_classes": 2}), res, batch)
        train = c.params * 4 * 2 + c.activation_bytes_total
        if train > need:
            need = train
            why = (f"{c.params:,} parameters and {c.activation_bytes_total / MiB:,.1f} MiB of "
                   f"activations kept for backward at batch {batch}, resolution {res}")
    return need, why


def memory_precheck(task: EvalTask, spec=None) -> Failure | None:
    need, why = memory_estimate(task, spec)
    if need > task.memory_mb * MiB:
        return Failure(
            reason="out_of_memory",
            message=f"refused before allocating: needs at least {need / MiB:,.0f} MiB "
                    f"({why}), over the memory ceiling of {task.memory_mb:,} MiB",
        )
    return None


# ---- in process -----------------------------------------------------------------------------


def run_in_process(task: EvalTask, data_sources: dict[str, str] | None = None,
                   on_progress: ProgressCallback | None = None) -> EvalOutcome:
    """Evaluate in this process (no timeout, no memory ceiling); failures are typed.
    ``on_progress`` gets the quality signal's rungs (see :func:`evaluate`)."""
    t0 = time.perf_counter()
    latency = quality = None
    try:
        spec = _parse_spec(task)
        if task.measure is not None:
            from search.evaluators.latency import measure_latency

            latency = measure_latency(spec, task.measure, task.budget)
        if task.quality is not None:
            from search.evaluators.quality import evaluate_quality

            quality = evaluate_quality(spec, task.quality, data_sources,
                                       on_rung=on_progress)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return EvalOutcome(ok=False, latency=latency, quality=quality, failure=classify(exc),
                           seconds=time.perf_counter() - t0)
    return EvalOutcome(ok=True, latency=latency, quality=quality,
                       seconds=time.perf_counter() - t0)


# ---- the child process ----------------------------------------------------------------------


def _vm_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _preload(task: EvalTask) -> None:
    """Import what the evaluation needs and start torch's thread pool before the memory
    ceiling is set, so that the ceiling counts the model's memory, not the libraries'."""
    import torch

    import blocks.builder
    import blocks.cost
    import blocks.fold  # noqa: F401
    import search.evaluators.latency
    from search.evaluators.fingerprint import logical_cores

    if task.measure is not None:
        if task.measure.runtime == "onnxruntime":
            import onnxruntime  # noqa: F401
            import torch.onnx
        before = torch.get_num_threads()
        torch.set_num_threads(min(4, logical_cores()))
        with torch.no_grad():
            torch.nn.functional.conv2d(torch.ones(1, 8, 16, 16), torch.ones(8, 8, 3, 3))
        torch.set_num_threads(before)
    if task.quality is not None:
        with contextlib.suppress(ImportError):
            import search.evaluators.quality  # noqa: F401


def _write_json(path: str, data: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _rss_watchdog(limit_bytes: int, result_path: str, memory_mb: int) -> None:
    """Resident-memory ceiling where RLIMIT_AS cannot be used (CUDA, non-Linux)."""
    baseline = _rss_bytes() or 0

    def watch() -> None:
        while True:
            rss = _rss_bytes()
            if rss is not None and rss - baseline > limit_bytes:
                out = EvalOutcome(ok=False, failure=Failure(
                    reason="out_of_memory",
                    message=f"resident memory grew by {(rss - baseline) / MiB:,.0f} MiB, over "
                            f"the memory ceiling of {memory_mb:,} MiB"))
                with contextlib.suppress(OSError):
                    _write_json(result_path, out.model_dump_json())
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, name="rss-watchdog", daemon=True).start()


_PARENT_POLL_S = 0.5


def _die_with_parent(parent_pid: int, tmp_dir: Path) -> None:
    """The child dies with its parent: it runs in a session of its own (so that a timeout
    kills its whole group), which also keeps it alive when its parent is killed -9. A
    watchdog thread notices the parent is gone (``getppid`` changes), removes the
    temporary directory the parent can no longer remove and kills the child's group.
    (``PR_SET_PDEATHSIG`` would fire when the parent's *thread* that started the child
    ends, and the worker starts evaluations from short-lived threads.)"""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.killpg(0, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def child_main(task_path: str, result_path: str) -> int:
    """Entry point of the child process."""
    import resource

    _die_with_parent(int(os.environ.get(_PARENT_ENV, os.getppid())), Path(task_path).parent)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    payload = json.loads(Path(task_path).read_text(encoding="utf-8"))
    task = EvalTask.model_validate(payload["task"])
    data_sources = payload.get("data_sources")
    t0 = time.perf_counter()
    try:
        _preload(task)
        cuda = task.measure is not None and task.measure.device.startswith("cuda")
        vm = _vm_bytes()
        limit = task.memory_mb * MiB
        if not cuda and vm is not None and sys.platform.startswith("linux"):
            cap = vm + limit
            _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                cap = min(cap, hard)
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        else:
            _rss_watchdog(limit, result_path, task.memory_mb)
        outcome = run_in_process(task, data_sources, _child_progress())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        outcome = EvalOutcome(ok=False, failure=classify(exc))
    outcome.seconds = time.perf_counter() - t0
    try:
        _write_json(result_path, outcome.model_dump_json())
    except MemoryError:
        _write_json(result_path, json.dumps(
            {"ok": False, "failure": {"reason": "out_of_memory",
                                      "message": "out of memory writing the result"}}))
    return 0


def _child_progress() -> ProgressCallback | None:
    """In the child: report a rung to the parent over a pipe and wait for its answer."""
    fds = os.environ.get(_PROGRESS_ENV)
    if not fds:
        return None
    write_fd, read_fd = (int(f) for f in fds.split(","))

    def report(step: int, value: float) -> bool:
        os.write(write_fd, (json.dumps({"step": step, "value": value}) + "\n").encode())
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = os.read(read_fd, 16)
            if not chunk:  # the parent is gone: nobody wants the rest
                return False
            answer += chunk
        return answer.strip() == b"1"

    return report


def _wait_with_progress(proc: subprocess.Popen, timeout_s: float, progress_r: int,
                        answer_w: int, on_progress: ProgressCallback) -> int:
    """``proc.wait(timeout_s)`` that answers the child's progress reports meanwhile."""
    import select

    deadline = time.monotonic() + timeout_s
    buf = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
        ready, _, _ = select.select([progress_r], [], [], min(remaining, 1.0))
        if not ready:
            if proc.poll() is not None:
                return proc.returncode
            continue
        chunk = os.read(progress_r, 4096)
        if not chunk:  # the child closed its end: it is finishing
            return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            go_on = bool(on_progress(int(msg["step"]), float(msg["value"])))
            with contextlib.suppress(OSError):
                os.write(answer_w, b"1\n" if go_on else b"0\n")


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - _LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def exit_failure(returncode: int, log_tail: str) -> Failure:
    """Why a child that left no result died."""
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGKILL:
            return Failure(reason="out_of_memory",
                           message=f"the evaluation was killed by {name} (most likely the "
                                   "kernel's out-of-memory killer)")
        if _OOM_PATTERNS.search(log_tail):
            return Failure(reason="out_of_memory",
                           message=f"killed by {name}: {_last_line(log_tail)}")
        return Failure(reason="crashed", message=f"the evaluation died with {name}"
                       + (f": {_last_line(log_tail)}" if _last_line(log_tail) else ""))
    if _OOM_PATTERNS.search(log_tail):
        return Failure(reason="out_of_memory", message=_last_line(log_tail))
    tail = _last_line(log_tail)
    return Failure(reason="crashed", message=f"the evaluation exited with status {returncode}"
                   + (f": {tail}" if tail else " and no result"))


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("MALLOC_ARENA_MAX", "2")  # fewer 64 MiB malloc arenas in address space
    allocator.child_env(env)  # fixed thresholds from the first allocation on
    env["PYTHONUNBUFFERED"] = "1"
    env[_PARENT_ENV] = str(os.getpid())
    return env


def run_isolated(task: EvalTask, data_sources: dict[str, str] | None = None,
                 on_progress: ProgressCallback | None = None) -> EvalOutcome:
    t0 = time.perf_counter()
    pipes: list[int] = []  # progress: child -> parent, answers: parent -> child
    env = _child_env()
    pass_fds: tuple[int, ...] = ()
    if on_progress is not None:
        progress_r, progress_w = os.pipe()
        answer_r, answer_w = os.pipe()
        pipes = [progress_r, progress_w, answer_r, answer_w]
        env[_PROGRESS_ENV] = f"{progress_w},{answer_r}"
        pass_fds = (progress_w, answer_r)
    try:
        return _run_isolated(task, data_sources, t0, env, pass_fds, on_progress, pipes)
    finally:
        for fd in pipes:
            with contextlib.suppress(OSError):
                os.close(fd)


# Temporary folders of evaluations carry their owner's pid, so that one left behind by a
# parent killed with -9 together with its child (nothing alive to clean up) is removed
# the next time any evaluator starts on this machine.
TMP_PREFIXES = ("fitnas-eval-", "fitnas-warm-")
OWNER_FILE = ".owner-pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_stale_dirs(root: str | None = None) -> list[str]:
    """Remove evaluation folders under ``root`` (the temp folder) whose owning process is
    gone; returns the ones removed. A folder without an owner file is left alone."""
    import shutil

    removed = []
    base = Path(root or tempfile.gettempdir())
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for d in entries:
        if not d.name.startswith(TMP_PREFIXES) or not d.is_dir():
            continue
        try:
            pid = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def make_eval_dir(prefix: str) -> Path:
    """A new evaluation folder, owned by this process (see :func:`sweep_stale_dirs`)."""
    sweep_stale_dirs()
    path = Path(tempfile.mkdtemp(prefix=prefix))
    (path / OWNER_FILE).write_text(str(os.getpid()))
    return path


def _run_isolated(task: EvalTask, data_sources: dict[str, str] | None, t0: float,
                  env: dict[str, str], pass_fds: tuple[int, ...],
                  on_progress: ProgressCallback | None, pipes: list[int]) -> EvalOutcome:
    tmp_dir = make_eval_dir("fitnas-eval-")
    try:
        return _run_in(tmp_dir, task, data_sources, t0, env, pass_fds, on_progress, pipes)
    finally:
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)


def _run_in(tmp: Path, task: EvalTask, data_sources: dict[str, str] | None, t0: float,
            env: dict[str, str], pass_fds: tuple[int, ...],
            on_progress: ProgressCallback | None, pipes: list[int]) -> EvalOutcome:
    task_path = Path(tmp, "task.json")
    result_path = Path(tmp, "result.json")
    log_path = Path(tmp, "child.log")
    task_path.write_text(json.dumps({"task": task.model_dump(mode="json"),
                                     "data_sources": data_sources}), encoding="utf-8")
    cmd = [sys.executable, "-m", "search.evaluators.runner", "--child", str(task_path),
           str(result_path)]
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, start_new_session=True, pass_fds=pass_fds)
        except OSError as exc:
            return EvalOutcome(ok=False, failure=Failure(
                reason="crashed", message=f"could not start the evaluation: {exc}"),
                seconds=time.perf_counter() - t0)
        try:
            if on_progress is None:
                returncode = proc.wait(timeout=task.timeout_s)
            else:
                for fd in pass_fds:  # the child's ends: EOF once the child is done
                    os.close(fd)
                pipes[1] = pipes[2] = -1
                returncode = _wait_with_progress(proc, task.timeout_s, pipes[0], pipes[3],
                                                 on_progress)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return EvalOutcome(ok=False, failure=Failure(
                reason="timeout",
                message=f"no result after {task.timeout_s:g} s; the evaluation was killed"),
                seconds=time.perf_counter() - t0)
        except BaseException:
            _kill_group(proc)
            raise
        _kill_group(proc)  # anything the child left behind in its group
    seconds = time.perf_counter() - t0
    if result_path.is_file():
        try:
            outcome = EvalOutcome.model_validate_json(result_path.read_text("utf-8"))
        except ValueError as exc:
            return EvalOutcome(ok=False, failure=Failure(
                reason="crashed", message=f"unreadable result from the evaluation: {exc}"),
                seconds=seconds)
        outcome.seconds = seconds
        outcome.evaluator = EvaluatorInfo(mode="one_shot", fresh=True)
        return outcome
    return EvalOutcome(ok=False, failure=exit_failure(returncode, _log_tail(log_path)),
                       seconds=seconds, evaluator=EvaluatorInfo(mode="one_shot", fresh=True))


def evaluate(task: EvalTask, *, isolated: bool = True,
             data_sources: dict[str, str] | None = None,
             precheck: bool = True,
             on_progress: ProgressCallback | None = None) -> EvalOutcome:
    """Evaluate ``task``; never raises for a model's failure.

    ``isolated`` (default): in a child process with ``task.timeout_s`` and
    ``task.memory_mb``. ``precheck``: refuse a model whose analytic memory lower bound is
    over the ceiling before anything is allocated.

    ``on_progress(step, value) -> bool`` is called in this process at every rung of a
    multi-fidelity quality signal (``train``); False stops the evaluation there and the
    outcome's quality has ``pruned=True``. The local search answers with the study's
    pruner (``SearchDriver.report_rung``); a remote worker can forward each call as a
    progress report to the service, where the same method answers.
    """
    t0 = time.perf_counter()
    try:
        spec = _parse_spec(task)
        if precheck:
            refused = memory_precheck(task, spec)
            if refused is not None:
                return EvalOutcome(ok=False, failure=refused, seconds=time.perf_counter() - t0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return EvalOutcome(ok=False, failure=classify(exc), seconds=time.perf_counter() - t0)
    if not isolated:
        return run_in_process(task, data_sources, on_progress)
    return run_isolated(task, data_sources, on_progress)


def _main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--child":
        return child_main(argv[1], argv[2])
    print("usage: python -m search.evaluators.runner --child TASK.json RESULT.json",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
