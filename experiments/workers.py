"""Worker processes for runs side by side (``seed_study``, ``reproduce``): they end when their caller does.

:func:`worker_pool` is a :class:`~concurrent.futures.ProcessPoolExecutor`
with two differences that long studies need:

- **spawn, not fork**: a forked worker cannot use CUDA once the parent
  process has touched it (``--device cuda`` failed so);
- **the workers stop with the caller**.  Ctrl-C reaches the workers anyway
  (they are in the terminal's process group), but a ``kill`` of the caller
  (SIGTERM, as a batch scheduler or a time limit sends it) would leave them
  running their runs to the end with nobody to collect them, each holding a
  CPU core or a GPU's memory.  Here SIGTERM raises ``SystemExit`` in the
  caller, and any exception out of the ``with`` block terminates the workers
  (and kills any that a SIGTERM did not end within a few seconds) instead of
  waiting for them.  What they had written stays: checkpoints and finished
  runs are written atomically, so the same command goes on from there.

Wait for the futures with :func:`completed`, not
:func:`concurrent.futures.as_completed`.  Python runs a signal's handler in
the main thread only, between bytecodes.  A main thread blocked in a wait
without a timeout runs it only if the signal interrupts that very wait; a
SIGTERM that lands in another thread, or just before the wait begins, is
acted on only when a future completes, which can be hours on.
:func:`completed` wakes every ``poll_s`` seconds, so the handler runs within
that time whatever thread the signal landed in.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

__all__ = ["completed", "torch_threads", "worker_pool"]

#: Seconds a worker gets to end after SIGTERM before it is sent SIGKILL.
TERMINATE_GRACE_S = 10.0


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A spawn-context process pool of ``workers`` processes that does not outlive an interrupted caller."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        yield pool
    except BaseException:
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():  # SIGTERM blocked or ignored there: the pool's own thread would wait forever
                process.kill()
                process.join(timeout=TERMINATE_GRACE_S)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def completed(futures: Iterable[Future], poll_s: float = 0.5) -> Iterator[Future]:
    """Yield ``futures`` as they finish, like :func:`~concurrent.futures.as_completed`, waking every ``poll_s`` s.

    The waking lets the main thread run a signal's handler (the SIGTERM of
    :func:`worker_pool`) within ``poll_s`` seconds, wherever the signal landed;
    see the module's docstring.
    """
    if not poll_s > 0:
        raise ValueError(f"poll_s must be a positive number of seconds, got {poll_s!r}")
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=poll_s, return_when=FIRST_COMPLETED)
        yield from done


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` torch intra-op threads (None: as they are), then give the caller its count back.

    The count changes the order of torch's sums on a CPU, and so a run's
    figures from their last digits on: a reproduce stage runs on one
    (``experiments.reproduce.STAGE_THREADS``), and ``iqa train --threads 1``
    runs as it does.
    """
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
