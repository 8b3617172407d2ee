"""Process-level settings that make simulation runs faster: glibc's allocator, the cores a run may use, and the
thread pool that trains client jobs side by side."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_malloc(mmap_threshold: int = 64 * 2**20, trim_threshold: int = 512 * 2**20) -> bool:
    """Keep freed buffers below ``mmap_threshold`` bytes in glibc's heap instead of unmapping them.

    PyTorch allocates CPU tensors with malloc. By default glibc serves blocks above a (dynamic, at most 32 MiB)
    threshold with mmap and returns them to the OS when freed, so every training step of a CNN re-faults its
    activation buffers page by page (measured here: a 4.7 MB channels-last copy took 4 ms instead of 0.5 ms,
    and a paper-CNN client job 36 ms instead of 28 ms). With these settings the heap keeps up to
    ``trim_threshold`` bytes of free memory for reuse. Returns whether the settings were applied (glibc only;
    elsewhere it does nothing).
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _tuned


T = TypeVar("T")
_core_budget: int | None = None


def set_core_budget(cores: int | None) -> None:
    """Cap the cores this process's runs plan for (sweep workers share the machine); None: all it may use."""
    global _core_budget
    _core_budget = None if cores is None else max(1, int(cores))


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), capped by ``set_core_budget``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _core_budget) if _core_budget else cores)


def auto_job_threads() -> int:
    """``run.job_threads: null``: one job thread per core left after each job's torch intra-op threads."""
    return max(1, available_cores() // max(1, torch.get_num_threads()))


def resolve_job_threads(requested: int | None, device: torch.device) -> int:
    """The job threads a run on ``device`` uses: ``requested`` (None: ``auto_job_threads``) on the CPU, else 1."""
    return 1 if device.type != "cpu" else requested or auto_job_threads()


def job_pool(threads: int, intra_op_threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads for client jobs, each running torch with ``intra_op_threads`` threads.

    Kept for the process (sweeps build many trainers; a forked child gets its own). PyTorch releases the GIL
    inside its operators, so jobs whose time goes into convolutions run in parallel; each thread sets its own
    OpenMP thread count, which threads otherwise take from the environment rather than from the caller's
    ``torch.set_num_threads``.
    """
    return _job_pool(os.getpid(), threads, intra_op_threads)


@functools.cache
def _job_pool(pid: int, threads: int, intra_op_threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="qafel-job",
                              initializer=torch.set_num_threads, initargs=(intra_op_threads,))


def map_in_threads(threads: int, fn: Callable[..., T], *iterables: Iterable[Any]) -> list[T]:
    """``[fn(*args) ...]`` computed by ``job_pool(threads, <this thread's torch threads>)``, in order.

    If a call fails (or the caller is interrupted), the calls not yet started are cancelled instead of being
    left to run in the background, and the first error is raised.
    """
    pool = job_pool(threads, torch.get_num_threads())
    futures = [pool.submit(fn, *args) for args in zip(*iterables, strict=True)]
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()
