"""Per-expression output files written off the model's thread.

Storing one (mode, expression) costs a zlib pass over its probabilities plus two fsynced files: on the
4B-shaped H100 benchmark this "rest" was 4.6 s of the shared path's 7.2 s and grew with the number of
expressions; deflating a noisy [20,360,640] uint8 map alone takes ~60 ms on one core. zlib and file I/O
release the GIL, so writer threads overlap them with the next predictions. Jobs start in submission
order; with one thread (the default, and on small machines) they also finish in it, with several a later
job may finish first -- each job writes its own expression's probabilities before its preds entry (the
resume marker), so a kill never leaves a marker without its data either way. At most ``max_pending`` jobs,
holding at most ``max_pending_bytes`` of arrays, wait: a video's outputs come in a burst once its answers
are decoded, and a queue sized in bytes rather than a few jobs lets the model start on the next video
while they are written. Closing drains every queued job, also when the evaluation itself failed, so
nothing already computed is lost.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

logger = logging.getLogger("sasasa2va.eval")

WRITER_THREADS_MAX = 4
WRITER_MAX_PENDING = 256  # jobs queued per evaluation process (the runner's bound in count ...)
WRITER_PENDING_BYTES = 512 << 20  # ... and in bytes of the arrays they hold


def writer_threads(cpus: int | None = None, local_processes: int = 1) -> int:
    """Writer threads for one evaluation process: a quarter of the cores this process may use (shared
    with the other processes of the node), at most WRITER_THREADS_MAX, at least 1 (a 2-core machine keeps
    one writer beside the model's thread)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, int(cpus) // max(1, int(local_processes)))
    return max(1, min(WRITER_THREADS_MAX, per_process // 4))


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
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="eval-writer") if threads else None
        self.max_pending = int(max_pending)
        self.max_pending_bytes = max_pending_bytes
        self._room = threading.Condition()
        self._pending = 0  # jobs submitted and not done, and the bytes they hold
        self._pending_bytes = 0
        self._futures: list[Future] = []
        self._error: BaseException | None = None
        self.jobs = 0

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        self.submit_sized(0, fn, *args, **kwargs)

    def submit_sized(self, nbytes: int, fn: Callable, *args, **kwargs) -> None:
        self._raise_finished_errors()
        self.jobs += 1
        if self._pool is None:
            try:
                fn(*args, **kwargs)
            except BaseException as err:
                self._error = err
                raise
            return
        nbytes = max(0, int(nbytes))
        with self._room:
            while self._pending and (self._pending >= self.max_pending or (
                    self.max_pending_bytes is not None and self._pending_bytes + nbytes > self.max_pending_bytes)):
                self._room.wait()
            self._pending += 1
            self._pending_bytes += nbytes
        try:
            fut = self._pool.submit(fn, *args, **kwargs)
        except BaseException:
            self._done(nbytes)
            raise
        fut.add_done_callback(lambda _f: self._done(nbytes))
        self._futures.append(fut)

    def _done(self, nbytes: int) -> None:
        with self._room:
            self._pending -= 1
            self._pending_bytes -= nbytes
            self._room.notify_all()

    def _collect(self, futures) -> None:
        for f in futures:
            err = f.exception()
            if err is None:
                continue
            if self._error is None:
                self._error = err
            else:
                logger.error("output writer: another write failed too: %s: %s", type(err).__name__, err)

    def _raise_finished_errors(self) -> None:
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        self._collect(done)
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every queued job, then raise the first failure (if any)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        futures, self._futures = self._futures, []
        self._collect(futures)
        if self._error is not None:
            raise self._error

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
