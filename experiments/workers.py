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
  instead of waiting for them.  What they had written stays: checkpoints and
  finished runs are written atomically, so the same command goes on from
  there.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["worker_pool"]


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
        for process in processes:
            process.join(timeout=30)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
