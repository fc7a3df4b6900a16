"""Per-expression output files written off the model's thread.

Storing one (mode, expression) costs a zlib pass over its probabilities plus two fsynced files: on the
4B-shaped H100 benchmark this "rest" was 4.6 s of the shared path's 7.2 s and grew with the number of
expressions; deflating a noisy [20,360,640] uint8 map alone takes ~60 ms on one core. zlib and file I/O
release the GIL, so writer threads overlap them with the next predictions. Jobs start in submission
order; a later job may finish first (several threads, or the closing thread helping) -- each job writes
its own expression's probabilities before its preds entry (the resume marker), so a kill never leaves a
marker without its data either way. At most ``max_pending`` jobs, holding at most ``max_pending_bytes``
of arrays, wait: a video's outputs come in a burst once its answers are decoded, and a queue sized in
bytes rather than a few jobs lets the model start on the next video while they are written (the runner's
bound: ``writer_pending_bytes``, a share of the available memory). Closing
drains every queued job, also when the evaluation itself failed, so nothing already computed is lost;
the closing thread (the model's, idle by then) runs queued jobs too, so the last video's burst is written
by one more thread.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Callable

logger = logging.getLogger("sasasa2va.eval")

WRITER_THREADS_MAX = 4
WRITER_MAX_PENDING = 256  # jobs queued per evaluation process (the runner's bound in count ...)
WRITER_PENDING_BYTES = 512 << 20  # ... and in bytes of the arrays they hold: at least this much ...
WRITER_PENDING_BYTES_MAX = 16 << 30  # ... at most this much ...
WRITER_MEMORY_SHARE = 0.25  # ... else this share of the memory available to the node's evaluation processes


def writer_threads(cpus: int | None = None, local_processes: int = 1) -> int:
    """Writer threads for one evaluation process: a quarter of the cores this process may use (shared
    with the other processes of the node), at most WRITER_THREADS_MAX, at least 1 (a 2-core machine keeps
    one writer beside the model's thread). Eight (half of 16 cores) emptied the H200 benchmark's one-video
    tail (0.51 -> 0.06 s) but its one two-video run, where a video's writes overlap the next video's
    host-bound decoding, decoded slower than ever (6.2 s vs 3.6-3.7 s): not adopted before an A/B
    (``benchmark_eval.py --writer-threads``)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, int(cpus) // max(1, int(local_processes)))
    return max(1, min(WRITER_THREADS_MAX, per_process // 4))


def available_memory_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Memory this process may still use: the kernel's MemAvailable, lowered to what the cgroup (v2) limit
    leaves (a container's limit is not in /proc/meminfo); None where neither can be read."""
    found = []
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(os.path.join(cgroup, "memory.max"), encoding="ascii") as f:
            limit = f.read().strip()
        with open(os.path.join(cgroup, "memory.current"), encoding="ascii") as f:
            current = int(f.read().strip())
        if limit != "max":
            found.append(max(0, int(limit) - current))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def writer_pending_bytes(local_processes: int = 1, available: int | None = None) -> int:
    """Bytes of output arrays one evaluation process may queue for its writers: a quarter of the available
    memory shared by the node's processes, within [WRITER_PENDING_BYTES, WRITER_PENDING_BYTES_MAX]
    (the least where the memory cannot be read). A video's outputs come in a burst once its answers are
    decoded; the model's thread goes on to the next video only once the burst is queued, so the queue should
    hold one: at real MeViS sizes (~80 frames of 1280x720) an output's masks and probabilities hold
    ~140 MB, and 512 MB held three of a video's ~40 (``tools/benchmark_writer.py``: the model thread waited
    3.85 s of 13.05 s for room, none with this bound)."""
    if available is None:
        available = available_memory_bytes()
    if available is None:
        return WRITER_PENDING_BYTES
    share = int(available * WRITER_MEMORY_SHARE) // max(1, int(local_processes))
    return max(WRITER_PENDING_BYTES, min(WRITER_PENDING_BYTES_MAX, share))


class BackgroundWriter:
    """``submit(fn, *args)`` runs ``fn`` on a writer thread (``threads`` of them; with ``threads=0`` inline,
    for debugging); ``submit_sized(nbytes, fn, *args)`` also counts the ``nbytes`` the job holds until it
    is done against ``max_pending_bytes`` (None: no bound in bytes; a lone job may exceed it).
    A failed write (disk full, ...) is not a per-expression failure: it is raised by every later
    ``submit`` and by ``close``, so the run stops instead of recording predictions it cannot store."""

    def __init__(self, max_pending: int = 4, threads: int = 1, max_pending_bytes: int | None = None):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        if max_pending_bytes is not None and max_pending_bytes < 0:
            raise ValueError(f"max_pending_bytes must be >= 0 or None, got {max_pending_bytes}")
        self.max_pending = int(max_pending)
        self.max_pending_bytes = max_pending_bytes
        self._cv = threading.Condition()
        self._queue: deque = deque()  # (fn, args, kwargs, nbytes) not started yet
        self._pending = 0  # jobs submitted and not done (queued or running), and the bytes they hold
        self._pending_bytes = 0
        self._closing = False
        self._error: BaseException | None = None
        self.jobs = 0
        self.wait_seconds = 0.0  # time submitters waited for room in the queue
        self.close_seconds = 0.0  # time close() took (draining what was left)
        self._threads = [threading.Thread(target=self._work, name=f"eval-writer-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        self.submit_sized(0, fn, *args, **kwargs)

    def submit_sized(self, nbytes: int, fn: Callable, *args, **kwargs) -> None:
        self._raise_error()
        self.jobs += 1
        if not self._threads:
            try:
                fn(*args, **kwargs)
            except BaseException as err:
                self._error = err
                raise
            return
        nbytes = max(0, int(nbytes))
        with self._cv:
            if self._closing:
                raise RuntimeError("BackgroundWriter: submit after close")
            t0 = None
            while self._pending and (self._pending >= self.max_pending or (
                    self.max_pending_bytes is not None and self._pending_bytes + nbytes > self.max_pending_bytes)):
                t0 = time.perf_counter() if t0 is None else t0
                self._cv.wait()
            if t0 is not None:
                self.wait_seconds += time.perf_counter() - t0
            self._pending += 1
            self._pending_bytes += nbytes
            self._queue.append((fn, args, kwargs, nbytes))
            self._cv.notify_all()

    def _next(self, wait: bool):
        """The oldest queued job, or None when there is none (``wait``: until one comes or closing)."""
        with self._cv:
            while wait and not self._queue and not self._closing:
                self._cv.wait()
            return self._queue.popleft() if self._queue else None

    def _work(self) -> None:
        while True:
            job = self._next(wait=True)
            if job is None:
                return
            self._run(job)
            job = None  # do not hold the finished job's arrays while waiting for the next one

    def _run(self, job) -> None:
        fn, args, kwargs, nbytes = job
        try:
            fn(*args, **kwargs)
        except BaseException as err:
            with self._cv:
                first = self._error is None
                if first:
                    self._error = err
            if not first:
                logger.error("output writer: another write failed too: %s: %s", type(err).__name__, err)
        finally:
            with self._cv:
                self._pending -= 1
                self._pending_bytes -= nbytes
                self._cv.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def wait_idle(self) -> None:
        """Block until every submitted job is done (the writer stays open)."""
        with self._cv:
            while self._pending:
                self._cv.wait()

    def close(self) -> None:
        """Run what is queued (on the writer threads and on this one), wait for it, then raise the first
        failure (if any)."""
        t0 = time.perf_counter()
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        while True:  # this thread is idle now: it takes queued jobs too
            job = self._next(wait=False)
            if job is None:
                break
            self._run(job)
        for t in self._threads:
            t.join()
        self.close_seconds += time.perf_counter() - t0
        self._raise_error()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the evaluation failed: still store what was computed, keep the original error
            self.close()
        except Exception as write_error:
            logger.error("output writer failed while the evaluation was failing: %s: %s",
                         type(write_error).__name__, write_error)
