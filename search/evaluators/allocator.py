"""The memory allocator a measurement runs under, set on purpose.

glibc's malloc adapts its mmap threshold (and the trim threshold with it) to the sizes a
process has freed so far. A fresh process that runs one CNN allocates each activation
tensor (hundreds of KiB to MiB) above the initial 128 KiB threshold, so every
allocation is a fresh ``mmap`` and every free a ``munmap``: page faults on every
inference. Only after a large block has been freed does glibc raise the threshold and
recycle that memory from the heap. The same exported model reads about twice as slow in
the first state as in the second; which state a measurement saw used to depend on what
the process happened to do before timing.

fitnas fixes the state: every evaluation (one-shot child, warm child, in process) runs
with fixed thresholds, so activations are always served from the heap. A deployment that
wants the measured figure sets the same environment (:data:`DEPLOY_ENV`, documented in
docs/measurement.md and shipped with the exports). When a preloaded allocator
(jemalloc, tcmalloc through ``LD_PRELOAD``) is configured for the target, glibc's knobs
do not apply and the preloaded library is what the result records.

Standard library only: the runner imports this before torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

MMAP_THRESHOLD = 256 * 2**20  # 268435456: no activation of a mobile CNN reaches this
TRIM_THRESHOLD = 1024 * 2**20  # 1073741824: freed heap is kept for the next inference

# The environment a deployment sets to see what fitnas measured (glibc reads it at start).
DEPLOY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3

_applied = False


def preloaded(env: dict[str, str] | None = None) -> str | None:
    """The preloaded allocator library named in ``LD_PRELOAD`` (jemalloc / tcmalloc /
    mimalloc), or None."""
    env = os.environ if env is None else env
    for item in env.get("LD_PRELOAD", "").replace(":", " ").split():
        base = os.path.basename(item)
        if any(name in base for name in ("jemalloc", "tcmalloc", "mimalloc")):
            return base
    return None


def child_env(env: dict[str, str]) -> dict[str, str]:
    """Add the fixed thresholds to an evaluation child's environment (in place, and
    returned), unless the caller set their own."""
    for key, value in DEPLOY_ENV.items():
        env.setdefault(key, value)
    return env


def apply() -> None:
    """Fix glibc's thresholds in this process (``mallopt``; disables the dynamic
    adjustment exactly as the environment variables do). Idempotent; a no-op off glibc
    or under a preloaded allocator."""
    global _applied
    if _applied or preloaded() is not None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        mmap_t = int(os.environ.get("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD))
        trim_t = int(os.environ.get("MALLOC_TRIM_THRESHOLD_", TRIM_THRESHOLD))
        if libc.mallopt(_M_MMAP_THRESHOLD, mmap_t) and libc.mallopt(_M_TRIM_THRESHOLD, trim_t):
            _applied = True


def describe() -> str:
    """One stable string for the fingerprint and the measurement key, e.g.
    ``glibc:mmap_threshold=268435456,trim_threshold=1073741824`` or ``preload:libjemalloc.so.2``."""
    lib = preloaded()
    if lib is not None:
        return f"preload:{lib}"
    if not sys.platform.startswith("linux"):
        return "system"
    mmap_t = os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    trim_t = os.environ.get("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD))
    return f"glibc:mmap_threshold={mmap_t},trim_threshold={trim_t}"


def key() -> str:
    """What the measurement cache key holds: the policy evaluations in this process tree
    run under (the parent computes keys, its children inherit the same environment)."""
    return describe()
