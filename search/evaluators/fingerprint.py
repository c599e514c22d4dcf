"""Who measured: the device fingerprint stored with every latency result, and the system
load around a measurement (free cores, contention).

A fingerprint names the hardware and software a number was taken on: CPU model and
instruction set level, usable cores, threads used, torch / ONNX Runtime versions, and the
GPU (name, driver, CUDA, compute capability) where one is used. ``id`` hashes the stable
part of it (everything except ``threads``), so results from the same machine and software
share an id.

The load helpers count the CPU time *other* processes burn (system CPU time minus this
process's own) over a window, which is what decides how many threads a measurement may
use and whether a result was taken under contention.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

from search.evaluators import allocator

MAX_DEFAULT_THREADS = 4


# ---- the machine ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    value = line.split(":", 1)[1].strip()
                    if value:
                        return value
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5, check=False)
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _cgroup_cpu_quota() -> float | None:
    """CPU limit of this container in cores (cgroup v2 ``cpu.max`` or v1 cfs quota)."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii") as fh:
            quota_us = int(fh.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii") as fh:
            period_us = int(fh.read())
        if quota_us > 0:
            return quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def logical_cores() -> int:
    """Cores this process may run on: CPU affinity, capped by a container CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver(index: int) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(index)],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip().splitlines()
    return value[0].strip() if out.returncode == 0 and value else None


def gpu_info(device: str) -> dict[str, Any] | None:
    """Name, driver, CUDA / cuDNN versions, capability and memory of a CUDA device."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "name": props.name,
        "index": index,
        "capability": f"{props.major}.{props.minor}",
        "memory_mb": int(props.total_memory // 2**20),
        "multiprocessors": props.multi_processor_count,
        "driver": _nvidia_driver(index),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
    }


_STABLE_KEYS = ("device", "cpu_model", "cpu_capability", "logical_cores", "machine", "os",
                "torch", "onnxruntime", "gpu_name", "gpu_driver")


def device_fingerprint(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Describe the machine and software a measurement runs on (JSON-able dict)."""
    import torch

    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = None
    gpu = gpu_info(device)
    fp: dict[str, Any] = {
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_capability": capability,
        "logical_cores": logical_cores(),
        "physical_cores": physical_cores(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnx": _version("onnx"),
        "gpu": gpu,
        "allocator": allocator.describe(),  # what evaluations here run under
    }
    stable = {k: fp.get(k) for k in _STABLE_KEYS}
    stable["gpu_name"] = gpu["name"] if gpu else None
    stable["gpu_driver"] = gpu["driver"] if gpu else None
    fp["id"] = hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]
    return fp


# ---- load and contention -------------------------------------------------------------------


def _system_cpu_seconds() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds summed over all CPUs since boot, or None if unknown."""
    try:
        import psutil

        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        steal = getattr(t, "steal", 0.0)
        busy = sum(t) - idle - steal - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return busy, steal
    except Exception:
        pass
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, _iowait, irq, softirq = fields[:7]
        steal = fields[7] if len(fields) > 7 else 0
        return (user + nice + system + irq + softirq) / hz, steal / hz
    except (OSError, ValueError):
        return None


def _own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def procs_running() -> int | None:
    """Runnable tasks right now (``procs_running`` of /proc/stat), this one included."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


@dataclass
class LoadWindow:
    """CPU use of other processes between :meth:`start` and :meth:`stop`, in cores."""

    wall0: float = 0.0
    sys0: tuple[float, float] | None = None
    own0: float = 0.0

    def start(self) -> LoadWindow:
        self.wall0 = time.perf_counter()
        self.sys0 = _system_cpu_seconds()
        self.own0 = _own_cpu_seconds()
        return self

    def stop(self) -> dict[str, Any]:
        wall = max(time.perf_counter() - self.wall0, 1e-6)
        sys1 = _system_cpu_seconds()
        own = (_own_cpu_seconds() - self.own0) / wall
        out: dict[str, Any] = {"seconds": round(wall, 3), "own_cores": round(own, 3)}
        if self.sys0 is not None and sys1 is not None:
            busy = (sys1[0] - self.sys0[0]) / wall
            out["busy_cores"] = round(busy, 3)
            out["other_cores"] = round(max(0.0, busy - own), 3)
            out["steal_cores"] = round(max(0.0, (sys1[1] - self.sys0[1]) / wall), 3)
        else:
            out["busy_cores"] = out["other_cores"] = out["steal_cores"] = None
        return out


def sample_load(seconds: float = 0.25) -> dict[str, Any]:
    """Sample what other processes use over ``seconds`` (this process idles meanwhile).
    ``seconds <= 0``: no window, a snapshot of the run queue and the load average only
    (``other_cores`` None)."""
    if seconds <= 0:
        sample: dict[str, Any] = {"seconds": 0.0, "own_cores": None, "busy_cores": None,
                                  "other_cores": None, "steal_cores": None}
    else:
        window = LoadWindow().start()
        time.sleep(seconds)
        sample = window.stop()
    sample["procs_running"] = procs_running()
    la = loadavg()
    sample["loadavg"] = [round(v, 2) for v in la] if la else None
    return sample


def free_cores(sample: dict[str, Any] | None = None, cores: int | None = None) -> int:
    """Usable cores minus the cores other processes keep busy (a core counts as taken
    from half a core's load on), at least 1."""
    cores = cores or logical_cores()
    other = (sample or sample_load()).get("other_cores")
    if other is None:
        la = loadavg()
        other = max(0.0, la[0] - 1.0) if la else 0.0
    return max(1, min(cores, math.floor(cores - other + 0.5)))


def choose_threads(requested: int | None, sample: dict[str, Any] | None = None,
                   cores: int | None = None) -> tuple[int, list[str]]:
    """Threads for a CPU measurement: ``requested`` or min(4, free cores), never more than
    the free cores. Returns (threads, notes)."""
    free = free_cores(sample, cores)
    notes: list[str] = []
    if requested is None:
        return max(1, min(MAX_DEFAULT_THREADS, free)), notes
    if requested > free:
        notes.append(f"asked for {requested} threads but only {free} core(s) were free; "
                     f"measured with {free}")
        return free, notes
    return requested, notes


def is_contended(threads: int, *others: float | None, cores: int | None = None,
                 tolerance: float = 0.5) -> bool:
    """True when other processes used more than the cores this measurement left free."""
    cores = cores or logical_cores()
    spare = cores - threads
    return any(o is not None and o > spare + tolerance for o in others)
