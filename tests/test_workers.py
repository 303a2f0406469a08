"""Worker processes end with their caller: an exception or a SIGTERM does not leave them running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.workers import worker_pool

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


def test_a_sigterm_to_the_caller_ends_its_workers_too():
    script = (
        "import time\n"
        "from experiments.workers import worker_pool\n"
        "with worker_pool(2) as pool:\n"
        "    futures = [pool.submit(time.sleep, 600) for _ in range(2)]\n"
        "    while len(pool._processes) < 2:\n"
        "        time.sleep(0.05)\n"
        "    print(' '.join(str(pid) for pid in pool._processes), flush=True)\n"
        "    [f.result() for f in futures]\n"
    )
    caller = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        workers = [int(pid) for pid in caller.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        caller.send_signal(signal.SIGTERM)
        assert caller.wait(timeout=60) == 128 + signal.SIGTERM
        assert _wait_until(lambda: not any(_alive(pid) for pid in workers)), "workers outlived their caller"
    finally:
        caller.kill()
        caller.wait()


def test_the_signal_handler_is_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with worker_pool(1) as pool:
        assert pool.submit(abs, -3).result() == 3
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
