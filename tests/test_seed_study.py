"""The seed study reports every seed with its initial and final holdout AUROC."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future

import numpy as np
import pytest

from agents import recommended_env_kwargs
from experiments.seed_study import main


def test_seed_study_reports_every_seed(tiny_synthetic_path, tmp_path, capsys):
    out = tmp_path / "study.json"
    code = main(
        ["--algos", "reinforce", "--rewards", "weighted", "selective", "--seeds", "2", "--first-seed", "3",
         "--steps", "30", "--dataset", str(tiny_synthetic_path), "--workers", "1", "--json", str(out),
         "--env-kwargs", '{"batch_size": 8, "train_steps": 2, "validation_size": 16}']
    )
    assert code == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "mean_intensity" in text and "intensity_std" in text
    # Progress: one line per run as it ends, on stderr.
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(progress) == 4 and progress[-1].startswith("[4/4] reinforce ")
    assert all(re.search(r"seed [34]: AUROC \S+ -> \S+; within class: .+ \(\d+ steps, \d+ s\)$", line)
               for line in progress), progress
    lines = [line for line in text.splitlines() if line.startswith("reinforce ")]
    assert len(lines) == 4 + 2  # one row per run, one tally per reward
    assert "seeds reach AUROC >= 0.8" in text
    runs = json.loads(out.read_text())["runs"]
    assert [(r["config"]["reward"], r["config"]["seed"]) for r in runs] == [
        ("weighted", 3), ("weighted", 4), ("selective", 3), ("selective", 4)
    ]
    # Each progress line shows the run's AUROC within each class, as its summary has it.
    for run in runs:
        line = next(x for x in progress if f" {run['config']['reward']} seed {run['config']['seed']}:" in x)
        for name, final in run["final_auroc_by_class"].items():
            initial = run["initial_auroc_by_class"][name]
            shown = "-" if final is None else f"{final:.3f}"
            assert f"{name} {'-' if initial is None else f'{initial:.3f}'} -> {shown}" in line, (name, line)
        # ... and how much of its scores' spread lies between the classes.
        assert 0.0 <= run["final_class_share"] <= 1.0
        assert f"scores' variance between classes {run['final_class_share']:.2f}" in line, line
    # Each run records the env arguments it had, the recommended defaults included.
    assert runs[0]["env_settings"] == {
        **recommended_env_kwargs("reinforce", "weighted"),
        **{key: runs[0]["config"][key] for key in ("task", "reward", "rejection_ratio", "device")},
        "batch_size": 8, "train_steps": 2, "validation_size": 16,
    }
    assert runs[0]["env_settings"]["validation_refresh"] is True
    # Each row shows how spread the final scores are (saturated or collapsed controllers stand out).
    for run in runs:
        assert 0.0 < run["final_score_mean"] < 1.0 and run["final_score_sd"] > 0.0
        row = next(line for line in lines if f" {run['config']['reward']} " in line
                   and line.split()[2] == str(run["config"]["seed"]))
        assert f"{run['final_score_mean']:.3f} ({run['final_score_sd']:.3g})" in row


def test_seed_study_time_limit_stops_every_run_and_says_so(tiny_synthetic_path, tmp_path, capsys):
    out = tmp_path / "study.json"
    code = main(
        ["--algos", "reinforce", "--rewards", "weighted", "--seeds", "2", "--steps", "5000",
         "--dataset", str(tiny_synthetic_path), "--workers", "1", "--json", str(out), "--eval-every", "4",
         "--time-limit", "0.5", "--env-kwargs", '{"batch_size": 8, "train_steps": 2, "validation_size": 16}']
    )
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2
    for run in runs:
        assert run["time_limited"] and 0 < run["steps"] < 5000
        steps = [step for step, _ in run["auroc_curve"]]
        assert steps[0] == 0 and steps[-1] == run["steps"]
    assert "curve" in capsys.readouterr().out


def test_seed_study_with_out_pauses_at_the_time_limit_and_goes_on(tiny_synthetic_path, tmp_path, capsys):
    """A study longer than one machine session: each call goes on from where the last one paused."""
    out = tmp_path / "study"
    argv = ["--algos", "reinforce", "--rewards", "weighted", "--seeds", "2", "--steps", "12",
            "--dataset", str(tiny_synthetic_path), "--workers", "1", "--eval-every", "4", "--out", str(out),
            "--env-kwargs", '{"batch_size": 8, "train_steps": 2, "validation_size": 16}']
    # A limit already past: every run pauses after its first episode (2 training and 2 validation
    # steps), at any machine speed.
    assert main([*argv, "--time-limit", "1e-9"]) == 0
    captured = capsys.readouterr()
    runs = json.loads((out / "seed_study.json").read_text())["runs"]  # the default --json with --out
    assert sorted(r["config"]["seed"] for r in runs) == [0, 1]
    for run in runs:
        assert run["paused"] and run["steps"] == 4
        folder = out / run["run"]
        assert (folder / "checkpoint" / "checkpoint.json").is_file() and not (folder / "summary.json").exists()
    assert captured.err.count("paused, the same command goes on") == 2
    assert "reinforce weighted: 0 of 2 seeds reach AUROC >= 0.8 (2 paused at the time limit" in captured.out
    assert len(re.findall(r"^reinforce +weighted +\d +\S+ +\S+ +4p ", captured.out, re.M)) == 2
    # The same command without the limit finishes both runs from their checkpoints ...
    assert main(argv) == 0
    finished = json.loads((out / "seed_study.json").read_text())["runs"]
    for run in finished:
        assert "paused" not in run and run["steps"] == 12 and run["resumed_from"] == [4]
        assert [s for s, _ in run["auroc_curve"]] == [0, 4, 8, 12]
        assert (out / run["run"] / "summary.json").is_file() and not (out / run["run"] / "checkpoint").exists()
    # ... and once more reads them back without training.
    capsys.readouterr()
    assert main(argv) == 0
    again = json.loads((out / "seed_study.json").read_text())["runs"]
    assert all(run["already_finished"] for run in again)
    assert [r["final_auroc"] for r in sorted(again, key=lambda r: r["config"]["seed"])] == [
        r["final_auroc"] for r in sorted(finished, key=lambda r: r["config"]["seed"])
    ]
    # Other settings on the same folders: refused before any run starts, each clash named.
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([*argv[:7], "16", *argv[8:]])  # --steps 16
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("holds a run with other settings (steps: saved 12, now 16)") == 2
    assert json.loads((out / "seed_study.json").read_text())["runs"] == again  # nothing rewritten


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--time-limit", "0"], "time_limit_s must be a positive number of seconds"),
        (["--first-seed", "-1"], "--first-seed >= 0, got 8 and -1"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--env-kwargs", "{batch_size: 8}"], "argument --env-kwargs: not valid JSON"),
        (["--agent-kwargs", "[1]"], "argument --agent-kwargs: must be a JSON object"),
    ],
)
def test_seed_study_refuses_impossible_settings(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_seed_study_workers_are_spawned_not_forked(monkeypatch):
    """A forked worker cannot use CUDA once the parent process has (``--device cuda`` failed so)."""
    import experiments.seed_study as study

    seen = {}

    class Recorder:
        def __init__(self, max_workers, mp_context=None):
            seen["context"] = mp_context

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, config, out):
            future = Future()
            future.set_result({"seed": config.seed})
            return future

    monkeypatch.setattr(study, "ProcessPoolExecutor", Recorder)
    ended = []
    out = study.seed_study(
        ["reinforce"], ["weighted"], [0, 1, 2], study.TrainConfig(steps=1), workers=2,
        on_result=lambda summary, finished: ended.append((summary["seed"], len(finished))),
    )
    assert out == [{"seed": 0}, {"seed": 1}, {"seed": 2}]  # in the order asked, whatever the order they end
    assert sorted(seed for seed, _ in ended) == [0, 1, 2] and [n for _, n in ended] == [1, 2, 3]
    assert seen["context"] is not None and seen["context"].get_start_method() == "spawn"


def test_seed_study_shows_each_evaluation_as_it_happens(tiny_synthetic_path, capfd):
    # The runs are worker processes: their lines reach the parent's stderr at the file-descriptor level.
    code = main(
        ["--algos", "reinforce", "--rewards", "weighted", "--seeds", "1", "--first-seed", "2", "--steps", "20",
         "--eval-every", "10", "--dataset", str(tiny_synthetic_path), "--workers", "1",
         "--env-kwargs", '{"batch_size": 8, "train_steps": 2, "validation_size": 16}']
    )
    assert code == 0
    err = capfd.readouterr().err.splitlines()
    evaluations = [line for line in err if "holdout AUROC" in line]
    steps = [int(m.group(1)) for line in evaluations
             if (m := re.fullmatch(r"  classification-weighted-reinforce-seed2: step (\d+), holdout AUROC "
                                   r"(?:0\.\d{3}|1\.000) \(\d+ s\)", line))]
    assert steps == [10, 20], evaluations
    # ... before the run's own line, which comes when it ends.
    assert err.index(evaluations[-1]) < next(i for i, line in enumerate(err) if line.startswith("[1/1] "))


def test_class_variance_share_is_the_between_class_part_of_the_scores_variance():
    from types import SimpleNamespace

    from experiments.training import class_variance_share

    holdout = SimpleNamespace(labels=np.array([0, 0, 1, 1]), num_classes=2)
    assert class_variance_share(np.array([0.1, 0.1, 0.9, 0.9]), holdout) == pytest.approx(1.0)  # a class score
    assert class_variance_share(np.array([0.1, 0.9, 0.1, 0.9]), holdout) == pytest.approx(0.0)  # within classes
    # class means 0.2 and 0.6 around 0.4: between 0.04 of the total 0.04 + 0.01
    assert class_variance_share(np.array([0.1, 0.3, 0.5, 0.7]), holdout) == pytest.approx(0.04 / 0.05)
    assert class_variance_share(np.full(4, 0.5), holdout) is None
    assert class_variance_share(np.arange(4.0), SimpleNamespace(labels=np.zeros(4), num_classes=1)) is None
