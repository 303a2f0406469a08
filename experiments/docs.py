"""Generate ``docs/environment.md`` from ``TaskAmenabilityEnv``'s docstring: ``python -m experiments.docs``.

The docstring is the one source of truth; a test checks the page is up to date.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "docs" / "environment.md"

HEADER = """# `TaskAmenability-v0`

<!-- Generated from the docstring of iqa_env.env.TaskAmenabilityEnv by `python -m experiments.docs`; edit the docstring, not this page. -->

"""


def environment_page() -> str:
    from iqa_env.env import TaskAmenabilityEnv

    doc = inspect.cleandoc(TaskAmenabilityEnv.__doc__ or "")
    title, _, body = doc.partition("\n")
    return HEADER + f"{title}\n{body}\n"


def main() -> int:
    PAGE.write_text(environment_page())
    print(f"wrote {PAGE.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
