"""Worker processes end with their caller: an exception or a SIGTERM does not leave them running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import workers
from experiments.workers import completed, worker_pool

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, ended but not yet collected, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_until(condition, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


def test_an_exception_in_the_caller_terminates_the_workers():
    with pytest.raises(RuntimeError, match="stopped"):
        with worker_pool(2) as pool:
            futures = [pool.submit(time.sleep, 600) for _ in range(2)]
            assert _wait_until(lambda: len(pool._processes) == 2)
            pids = list(pool._processes)
            raise RuntimeError("stopped")
    # By pid, not Process.is_alive(): the pool's own thread may reap a worker first, and is_alive() then
    # keeps saying True.
    assert _wait_until(lambda: not any(_alive(pid) for pid in pids)), "workers outlived the exception"
    assert not any(f.done() and not f.cancelled() and f.exception() is None for f in futures)  # none ran to its end


# The caller waits as experiments/reproduce.py and experiments/seed_study.py do.  ``poke`` optionally sends the
# SIGTERM from a thread of the caller's own to that thread: its handler is then due while the main thread waits
# and nothing interrupts that wait, as when a signal from outside lands just before the wait begins (CI saw the
# caller outlive a SIGTERM so).
_CALLER = (
    "import signal, sys, threading, time\n"
    "from experiments.workers import completed, worker_pool\n"
    "def poke():\n"
    "    sys.stdin.readline()\n"
    "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)\n"
    "with worker_pool(2) as pool:\n"
    "    futures = [pool.submit(time.sleep, 600) for _ in range(2)]\n"
    "    while len(pool._processes) < 2:\n"
    "        time.sleep(0.05)\n"
    "    threading.Thread(target=poke, daemon=True).start()\n"
    "    print(' '.join(str(pid) for pid in pool._processes), flush=True)\n"
    "    for future in completed(futures):\n"
    "        future.result()\n"
)


@pytest.mark.parametrize("sender", ["kill from outside", "a thread other than the waiting one"])
def test_a_sigterm_to_the_caller_ends_its_workers_too(sender):
    caller = subprocess.Popen([sys.executable, "-c", _CALLER], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        workers = [int(pid) for pid in caller.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        if sender == "kill from outside":
            caller.send_signal(signal.SIGTERM)
        else:
            caller.stdin.write("now\n")
            caller.stdin.flush()
        assert caller.wait(timeout=60) == 128 + signal.SIGTERM
        assert _wait_until(lambda: not any(_alive(pid) for pid in workers)), "workers outlived their caller"
    finally:
        caller.kill()
        caller.wait()


def test_a_worker_that_ignores_sigterm_is_killed(monkeypatch):
    monkeypatch.setattr(workers, "TERMINATE_GRACE_S", 1.0)
    with pytest.raises(RuntimeError, match="stopped"):
        with worker_pool(1) as pool:
            assert pool.submit(signal.signal, signal.SIGTERM, signal.SIG_IGN).result() == signal.SIG_DFL
            sleeping = pool.submit(time.sleep, 600)
            # Running: handed to the worker ahead of the end-of-work message that shutdown would send it.
            assert _wait_until(sleeping.running)
            pid = next(iter(pool._processes))
            raise RuntimeError("stopped")
    assert _wait_until(lambda: not _alive(pid), timeout=30), "a worker that ignores SIGTERM outlived the caller"


def test_completed_yields_each_future_once_as_it_finishes():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(time.sleep, delay) for delay in (0.6, 0.0)]
        assert list(completed(futures, poll_s=0.05)) == futures[::-1]
    assert list(completed([])) == []
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="poll_s must be a positive number of seconds"):
            list(completed(futures, poll_s=bad))


def test_the_signal_handler_is_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with worker_pool(1) as pool:
        assert pool.submit(abs, -3).result() == 3
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
