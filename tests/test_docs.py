"""The README and docs/ match the code: their links resolve, their commands parse, their Python compiles."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) and ![alt](target), an anchor dropped


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_to_a_file(page: Path) -> None:
    targets = [m.group(1) for m in LINK.finditer(page.read_text(encoding="utf-8"))]
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    missing = [t for t in local if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def _iqa_commands(text: str) -> list[str]:
    """Each ``iqa ...`` command of the README: in its shell blocks, and the first column of its command table."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                if part.strip().startswith("iqa "):
                    commands.append(part.strip())
    table = re.search(r"^\| command \| does \|\n(.*?)\n\n", text, flags=re.M | re.S)
    assert table, "the README has no command table (| command | does |)"
    commands += [m.group(1) for m in re.finditer(r"^\| `(iqa [^`]+)` \|", table.group(1), flags=re.M)]
    return commands


def test_the_readme_shows_its_commands() -> None:
    commands = _iqa_commands(_readme())
    # The main job and every subcommand of the command table: a README that lost them would pass the next test.
    assert "iqa reproduce --quick --task classification --out runs/quick" in commands
    assert {c.split()[1] for c in commands} >= {"data", "train", "score", "reproduce", "benchmark-algorithms"}


@pytest.mark.parametrize("command", _iqa_commands(_readme()))
def test_every_iqa_command_of_the_readme_parses(command: str) -> None:
    from experiments.cli import build_parser

    # "[--opt X]" marks an optional part: parse it too.
    argv = shlex.split(command.replace("[", " ").replace("]", " "))[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse refuses by exiting
        pytest.fail(f"the README's command {command!r} is refused by the command line (exit {e.code})")


def test_the_readme_python_compiles() -> None:
    blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
    assert blocks, "the README shows no Python"
    for block in blocks:
        ast.parse(block)  # a SyntaxError names the line


def test_the_readme_python_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python, run block after block in one namespace, does what its comments say.

    Only its budget is cut: ``agent.learn(4000)`` runs 16 env steps. ``images`` and
    ``reference_images`` are the user's own images there; here, random ones.
    """
    import numpy as np

    import agents

    build = agents.make_agent

    def make_agent_with_a_short_budget(*args, **kwargs):
        agent = build(*args, **kwargs)
        learn = agent.learn
        agent.learn = lambda steps, *a, **k: learn(min(steps, 16), *a, **k)
        return agent

    monkeypatch.setattr(agents, "make_agent", make_agent_with_a_short_budget)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    namespace = {
        "images": rng.integers(0, 256, (20, 1, 64, 64), dtype=np.uint8),
        "reference_images": rng.integers(0, 256, (40, 1, 64, 64), dtype=np.uint8),
    }
    blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["obs"].shape == (32, 1, 64, 64) and namespace["obs"].dtype == np.uint8
    scores = namespace["scores"]
    assert scores.shape == (20,) and np.all((scores >= 0) & (scores <= 1))
    assert namespace["keep"].shape == (20,) and namespace["keep"].dtype == bool
    assert namespace["controller"].mirror_average is True
    assert {p.name for p in (tmp_path / "my-controller").iterdir()} >= {"controller.json", "controller.pt"}
