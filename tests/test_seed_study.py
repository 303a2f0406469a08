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
         "--env-kwargs", '{"batch_size": 8, "train_steps": 2, "validation_size": 16, "predictor_warmup_steps": 20}']
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
    # Each tally sets the seeds' ends against their own untrained controllers.
    for reward in ("weighted", "selective"):
        initial = [r["initial_auroc"] for r in runs if r["config"]["reward"] == reward]
        final = [r["final_auroc"] for r in runs if r["config"]["reward"] == reward]
        higher = sum(b > a for a, b in zip(initial, final))
        tally = next(line for line in lines if line.startswith(f"reinforce {reward}:"))
        assert (
            f"mean AUROC {np.mean(initial):.3f} +- {np.std(initial, ddof=1):.3f} at initialisation -> "
            f"{np.mean(final):.3f} +- {np.std(final, ddof=1):.3f} at the end (st.d. across seeds); "
            f"higher than at initialisation on {higher} of 2 (sign test p "
        ) in tally, tally
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
        "batch_size": 8, "train_steps": 2, "validation_size": 16, "predictor_warmup_steps": 20,
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
         "--time-limit", "1e-9", "--env-kwargs", '{"batch_size": 8, "train_steps": 2, "validation_size": 16, "predictor_warmup_steps": 20}']
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
            "--env-kwargs", '{"batch_size": 8, "train_steps": 2, "validation_size": 16, "predictor_warmup_steps": 20}']
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
    # (how many reach 0.8 after one episode is not what this checks)
    assert re.search(r"reinforce weighted: \d of 2 seeds reach AUROC >= 0.8 \(2 paused at the time limit", captured.out)
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
        (["--first-seed", "-1"], "argument --first-seed: expected a whole number >= 0, got '-1'"),
        (["--seeds", "0"], "argument --seeds: expected a positive integer, got '0'"),
        # --workers 0 had ended in concurrent.futures' traceback after the data was loaded
        (["--workers", "0"], "argument --workers: expected a positive integer, got '0'"),
        (["--steps", "1.5"], "argument --steps: expected a positive integer, got '1.5'"),
        (["--eval-every", "-5"], "argument --eval-every: expected a positive integer, got '-5'"),
        (["--env-kwargs", "{batch_size: 8}"], "argument --env-kwargs: not valid JSON"),
        (["--agent-kwargs", "[1]"], "argument --agent-kwargs: must be a JSON object"),
    ],
)
def test_seed_study_refuses_impossible_settings(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_seed_study_refuses_what_an_algorithm_refuses_before_any_run(tiny_synthetic_path, tmp_path, capsys):
    """Each algorithm's own settings, for every algorithm of the study (not only the first), and an argument only
    a policy's constructor refuses: a one-line error before any run or file (before, a worker's traceback)."""
    out = tmp_path / "study"
    argv = ["--dataset", str(tiny_synthetic_path), "--seeds", "1", "--steps", "8", "--workers", "1", "--out", str(out)]
    for extra, message in (
        (["--algos", "td3", "ddpg", "--agent-kwargs", '{"policy_kwargs": {"critic_head": "nope"}}'],
         "error: cannot build td3 with agent_kwargs"),
        (["--algos", "reinforce", "ddpg", "--agent-kwargs", '{"image_baseline": "none"}'],
         "error: agent_kwargs: ddpg takes no setting 'image_baseline'"),
        # SAC's own form of ent_coef had been refused as REINFORCE's ("must be a finite number")
        (["--algos", "sac", "--agent-kwargs", '{"ent_coef": "auto_0.1", "policy_kwargs": {"critic_head": "nope"}}'],
         "error: cannot build sac with agent_kwargs"),
        (["--algos", "ddpg", "td3", "--agent-kwargs", '{"tau": 1.5}'],
         "error: agent_kwargs: tau must be a number in (0, 1] (the target networks' soft-update rate), got 1.5"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main([*argv, *extra])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not out.exists()


def test_seed_study_workers_are_spawned_not_forked(monkeypatch):
    """A forked worker cannot use CUDA once the parent process has (``--device cuda`` failed so)."""
    import experiments.seed_study as study

    seen = {}

    import experiments.workers as workers

    class Recorder:
        def __init__(self, max_workers, mp_context=None):
            seen["context"] = mp_context

        def shutdown(self, wait=True, cancel_futures=False):
            pass

        def submit(self, fn, config, out):
            future = Future()
            future.set_result({"seed": config.seed})
            return future

    monkeypatch.setattr(workers, "ProcessPoolExecutor", Recorder)
    ended = []
    out = study.seed_study(
        ["reinforce"], ["weighted"], [0, 1, 2], study.TrainConfig(steps=1), workers=2,
        on_result=lambda summary, finished: ended.append((summary["seed"], len(finished))),
    )
    assert out == [{"seed": 0}, {"seed": 1}, {"seed": 2}]  # in the order asked, whatever the order they end
    assert sorted(seed for seed, _ in ended) == [0, 1, 2] and [n for _, n in ended] == [1, 2, 3]
    assert seen["context"] is not None and seen["context"].get_start_method() == "spawn"


@pytest.mark.parametrize("workers", [0, True, 1.5])
def test_seed_study_refuses_a_worker_count_before_any_process(workers, monkeypatch):
    import experiments.seed_study as study
    import experiments.workers as pools

    monkeypatch.setattr(pools, "ProcessPoolExecutor", None)  # any pool would fail with a TypeError instead
    with pytest.raises(ValueError, match=f"workers must be a positive integer, got {workers!r}"):
        study.seed_study(["reinforce"], ["weighted"], [0], study.TrainConfig(steps=1), workers=workers)


def test_seed_study_refuses_a_config_before_any_process(monkeypatch):
    import experiments.seed_study as study
    import experiments.workers as pools

    monkeypatch.setattr(pools, "ProcessPoolExecutor", None)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        study.seed_study(["reinforce"], ["weighted"], [-1], study.TrainConfig(steps=1), workers=1)


def test_seed_study_shows_each_evaluation_as_it_happens(tiny_synthetic_path, capfd):
    # The runs are worker processes: their lines reach the parent's stderr at the file-descriptor level.
    code = main(
        ["--algos", "reinforce", "--rewards", "weighted", "--seeds", "1", "--first-seed", "2", "--steps", "20",
         "--eval-every", "10", "--dataset", str(tiny_synthetic_path), "--workers", "1",
         "--env-kwargs", '{"batch_size": 8, "train_steps": 2, "validation_size": 16, "predictor_warmup_steps": 20}']
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


def _summary(seed: int, initial: float, final: float, env_kwargs: dict, steps: int = 400) -> dict:
    """A run summary as seed studies write them, with the fields the report reads."""
    return {
        "config": {"algo": "ddpg", "reward": "fixed", "task": "classification", "split_seed": 0, "seed": seed,
                   "dataset": None, "env_kwargs": env_kwargs, "agent_kwargs": {"gamma": 0.0}},
        "dataset_fingerprint": "builtin", "steps": steps, "steps_per_s": 0.2,
        "initial_auroc": initial, "final_auroc": final, "final_score_mean": 0.5, "final_score_sd": 0.1,
        "auroc_curve": [[0, initial], [steps, final]],
    }


def test_seed_study_summarise_merges_the_parts_of_a_study_and_tells_settings_apart(tmp_path, capsys):
    """Seeds run on different machines (``--first-seed``) read back as one study, grouped by settings."""
    heuristics = {"mean_intensity": 0.503, "intensity_std": 0.438}
    corrected, plain = {"reward_baseline": "paired", "paired_class_correction": True}, {"reward_baseline": "paired"}
    first = tmp_path / "seeds0-1.json"
    first.write_text(json.dumps({"heuristics": heuristics, "runs": [
        _summary(0, 0.40, 0.85, corrected), _summary(1, 0.50, 0.70, corrected)]}))
    # An object of studies or run lists, as hand-kept files hold them.
    second = tmp_path / "seed2-both.json"
    second.write_text(json.dumps({"heuristics": heuristics,
                                  "with": [_summary(2, 0.60, 0.65, corrected, steps=449)],
                                  "without": {"runs": [_summary(2, 0.60, 0.55, plain)]}}))
    assert main(["--summarise", str(first), str(second)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "heuristics (holdout AUROC vs ground-truth amenable): mean_intensity 0.503, intensity_std 0.438"
    with_rows = out.index("# ddpg fixed [env.paired_class_correction true]")
    assert [line.split()[2] for line in out[with_rows + 1:with_rows + 4]] == ["0", "1", "2"]
    assert out[with_rows + 3].split()[5] == "449"
    without_rows = out.index('# ddpg fixed [env.paired_class_correction (unset)]')
    assert out[without_rows + 1].split()[2:5] == ["2", "0.600", "0.550"]
    assert (
        "ddpg fixed [env.paired_class_correction true]: 1 of 3 seeds reach AUROC >= 0.8; mean AUROC 0.500 +- 0.100 "
        "at initialisation -> 0.733 +- 0.104 at the end (st.d. across seeds); higher than at initialisation on "
        "3 of 3 (sign test p 0.25)"
    ) in out
    assert (
        "ddpg fixed [env.paired_class_correction (unset)]: 0 of 1 seeds reach AUROC >= 0.8; mean AUROC 0.600 at "
        "initialisation -> 0.550 at the end (st.d. across seeds); higher than at initialisation on 0 of 1 "
        "(sign test p 1)"
    ) in out


def test_seed_study_tallies_each_class_where_the_runs_recorded_it(tmp_path, capsys):
    """Runs with AUROCs by class get a line per class under their tally (the sign test over the seeds of that
    class); runs written before the by-class figures existed get none, and a seed missing one class's figure
    (None: that class had one truth value) is left out of that class only."""
    by_class = []
    for seed, (absent, present) in enumerate([((0.5, 0.4), (0.4, 0.9)), ((0.6, 0.5), (0.5, 0.8)), ((0.4, None), (0.6, 0.7))]):
        run = _summary(seed, 0.5, 0.7, {"reward_baseline": "paired"})
        run["initial_auroc_by_class"] = {"organ absent": absent[0], "organ present": present[0]}
        run["final_auroc_by_class"] = {"organ absent": absent[1], "organ present": present[1]}
        by_class.append(run)
    study = tmp_path / "by-class.json"
    study.write_text(json.dumps({"runs": by_class}))
    assert main(["--summarise", str(study)]) == 0
    out = capsys.readouterr().out.splitlines()
    tally_line = next(i for i, line in enumerate(out) if line.startswith("ddpg fixed: "))
    assert out[tally_line + 1:] == [
        "  within organ absent: mean AUROC 0.550 +- 0.071 at initialisation -> 0.450 +- 0.071 at the end "
        "(st.d. across seeds); higher than at initialisation on 0 of 2 (sign test p 0.5)",
        "  within organ present: mean AUROC 0.500 +- 0.100 at initialisation -> 0.800 +- 0.100 at the end "
        "(st.d. across seeds); higher than at initialisation on 3 of 3 (sign test p 0.25)",
    ]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"runs": [_summary(0, 0.5, 0.7, {})]}))
    assert main(["--summarise", str(plain)]) == 0
    assert not any("within" in line for line in capsys.readouterr().out.splitlines())


def test_seed_study_summarise_refuses_a_seed_twice_and_files_that_are_not_studies(tmp_path, capsys):
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"runs": [_summary(0, 0.4, 0.8, {})]}))
    not_json, not_a_study, not_a_run = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    not_json.write_text("{runs: ")
    not_a_study.write_text("[1, 2]")
    not_a_run.write_text(json.dumps({"runs": [{"seed": 0}]}))
    for argv, message in [
        ([study, study], "ddpg fixed seed 0 with the same settings is also in " + str(study) + "; keep one"),
        ([not_json], f"{not_json}: not a readable JSON file"),
        ([not_a_study], f"{not_a_study}: expected a seed study's JSON"),
        ([not_a_run], f"{not_a_run}: run 0 is not a seed-study run summary"),
        ([tmp_path / "missing.json"], "missing.json: not a readable JSON file"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            main(["--summarise", *map(str, argv)])
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err
