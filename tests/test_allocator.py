"""The allocator policy every evaluation runs under: set on purpose, recorded, keyed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from search.evaluators import allocator
from search.evaluators.runner import _child_env
from search.evaluators.types import MeasureSettings

ROOT = Path(__file__).resolve().parents[1]


def test_children_get_the_fixed_thresholds_unless_set(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    env = _child_env()
    assert env["MALLOC_MMAP_THRESHOLD_"] == "268435456"
    assert env["MALLOC_TRIM_THRESHOLD_"] == "1073741824"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert _child_env()["MALLOC_MMAP_THRESHOLD_"] == "1048576"  # the operator's choice wins
    assert allocator.describe() == "glibc:mmap_threshold=1048576,trim_threshold=1073741824"


def test_policy_is_part_of_the_measurement_key(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    glibc = MeasureSettings().key("spec", "cpu")
    assert allocator.describe().startswith("glibc:mmap_threshold=268435456")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator.describe() == "preload:libjemalloc.so.2"
    assert MeasureSettings().key("spec", "cpu") != glibc
    monkeypatch.setenv("LD_PRELOAD", "/opt/libfoo.so")  # not an allocator
    assert MeasureSettings().key("spec", "cpu") == glibc


def _heap_served(apply: bool) -> bool:
    """Whether a 1 MiB malloc is served from the heap (below the program break) rather
    than by its own mmap, in a fresh interpreter."""
    code = (
        "import ctypes\n"
        "from search.evaluators import allocator\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.sbrk.restype = ctypes.c_void_p\n"
        "libc.sbrk.argtypes = [ctypes.c_long]\n"
        f"if {apply}: allocator.apply()\n"
        "a = libc.malloc(1 << 20)\n"
        "print(a < libc.sbrk(0))\n"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    return out.stdout.strip() == "True"


def test_apply_fixes_the_thresholds_in_process():
    """glibc's default mmaps a fresh 1 MiB block; after apply() it comes from the heap,
    as activations of a measured model do."""
    assert _heap_served(apply=False) is False
    assert _heap_served(apply=True) is True
