"""The code has no error that a linter finds without running it (flake8, configured in setup.cfg)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("iqa_env", "agents", "experiments", "tests", "setup.py")


def test_flake8_finds_no_errors():
    assert importlib.util.find_spec("flake8") is not None, 'flake8 is a test dependency: pip install -e ".[dev]"'
    result = subprocess.run(
        [sys.executable, "-m", "flake8", *CHECKED], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
