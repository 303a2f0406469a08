"""Interrupted runs: checkpoints, kill-and-resume of `iqa train`, env state, replay buffers; memory script."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import checkpoint as ckpt
from tests.conftest import run_iqa_and_kill

REPO = Path(__file__).resolve().parents[1]

#: Tiny runs: 8-image batches, 2 training steps and one 8-image validation step per episode.
#: A short predictor warm-up: what these tests check does not depend on it, and REINFORCE's recommended 2,000
#: updates would be most of their time (test_a_fresh_run_builds_and_warms_up_its_predictor_once keeps it).
WARMUP = 20
TINY = ["--batch-size", "8", "--train-steps", "2", "--validation-size", "8", "--device", "cpu", "--no-progress",
        "--env-kwargs", json.dumps({"predictor_warmup_steps": WARMUP})]


def _train_args(algo: str, dataset: Path, steps: int, every: int, out: Path, seed: int = 0) -> list[str]:
    return [
        "train", "--algo", algo, "--dataset", str(dataset), "--steps", str(steps), "--seed", str(seed),
        "--checkpoint-every", str(every), "--eval-every", str(every), "--out", str(out), *TINY,
    ]


def _config(
    algo: str, dataset: Path, steps: int, every: int, seed: int = 0, checkpoints: bool = True, warmup: int | None = WARMUP
):
    """``warmup``: the predictor's warm-up (None: the algorithm's recommended one)."""
    from experiments.training import TrainConfig

    return TrainConfig(
        algo=algo, dataset=str(dataset), steps=steps, seed=seed, batch_size=8, train_steps=2,
        validation_size=8, device="cpu", eval_every=every, checkpoint_every=every if checkpoints else 0,
        env_kwargs={} if warmup is None else {"predictor_warmup_steps": warmup},
    )


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _kill_after_checkpoint(argv: list[str], run: Path, log: Path, timeout: float = 120.0) -> int:
    """Start `iqa train`, SIGKILL it as soon as a checkpoint exists; the checkpoint's step."""
    run_iqa_and_kill(argv, lambda: ckpt.find_checkpoint(run) is not None, log, timeout)
    assert not (run / "summary.json").exists()
    folder = ckpt.find_checkpoint(run)
    assert folder is not None
    return int(ckpt.read_meta(folder)["num_timesteps"])


def _resume(argv: list[str], timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "experiments.cli", *argv], cwd=REPO, env=_subprocess_env(),
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _check_resumed_run(run: Path, reference: dict, steps: int, every: int, resumed_at: int, dataset) -> dict:
    from agents import Controller

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["resumed_from"] == [resumed_at]
    curve_steps = [s for s, _ in summary["auroc_curve"]]
    assert curve_steps == sorted(set(curve_steps)) and curve_steps[0] == 0 and curve_steps[-1] == steps
    assert every in curve_steps  # evaluated before the kill, kept through the checkpoint
    # Nothing lost: the resumed run is the uninterrupted one, step for step.
    assert summary["auroc_curve"] == reference["auroc_curve"]
    assert (summary["final_score_mean"], summary["final_score_sd"]) == (
        reference["final_score_mean"], reference["final_score_sd"]
    )
    controller = Controller.load(run / "controller")
    scores = controller.score(dataset.images)
    assert scores.shape == (len(dataset),) and np.all((scores >= 0) & (scores <= 1))
    reference_weights = torch.load(Path(reference["dir"]) / "controller" / "controller.pt", weights_only=True)
    weights = torch.load(run / "controller" / "controller.pt", weights_only=True)
    assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)
    assert ckpt.find_checkpoint(run) is None  # removed once the run has finished
    from experiments.training import load_predictor

    predictor = load_predictor(run)  # weights_only
    saved = torch.load(run / "predictor.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in predictor.state_dict().items())
    return summary


@pytest.mark.parametrize(
    "algo, steps, every",
    [
        ("reinforce", 150, 30),  # episodes of 3 steps; a checkpoint at every 30th step
        ("ddpg", 18, 9),  # learning starts after 6 steps: the checkpoint holds trained networks and a buffer
    ],
)
def test_kill_and_resume_iqa_train(algo, steps, every, tiny_synthetic, tiny_synthetic_path, tmp_path, capsys):
    from experiments.cli import main
    from experiments.training import train

    reference = train(_config(algo, tiny_synthetic_path, steps, every, checkpoints=False), tmp_path / "reference")
    reference["dir"] = str(tmp_path / "reference")

    run = tmp_path / "run"
    argv = _train_args(algo, tiny_synthetic_path, steps, every, run)
    resumed_at = _kill_after_checkpoint(argv, run, tmp_path / "killed.log")
    assert every <= resumed_at < steps and resumed_at % every == 0
    if algo == "ddpg":
        assert (ckpt.find_checkpoint(run) / ckpt.BUFFER_NAME).is_file()

    done = _resume(argv)
    assert f"resumed from the checkpoint at step {resumed_at}" in done.stdout
    assert f"resuming classification-weighted-{algo}-seed0 from the checkpoint at step {resumed_at}" in done.stderr
    _check_resumed_run(run, reference, steps, every, resumed_at, tiny_synthetic)

    # A finished run: the same command does nothing; other settings are an error naming the field.
    capsys.readouterr()
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(_train_args(algo, tiny_synthetic_path, steps, every, run, seed=1)) == 2
    err = capsys.readouterr().err.strip()
    assert "seed: saved 0, now 1" in err and "--overwrite" in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="steps: saved"):
        train(_config(algo, tiny_synthetic_path, steps + 3, every), run)
    # The same data under another path is the same run; other data is not.
    moved = tmp_path / "moved.h5"
    moved.write_bytes(tiny_synthetic_path.read_bytes())
    assert train(_config(algo, moved, steps, every), run)["already_finished"]
    moved.write_bytes(tiny_synthetic_path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="dataset: saved"):
        train(_config(algo, moved, steps, every), run)


@pytest.mark.parametrize("algo, steps, every", [("reinforce", 60, 30), ("ddpg", 18, 9)])
def test_a_run_paused_at_its_time_limit_goes_on_to_the_uninterrupted_run(
    algo, steps, every, tiny_synthetic, tiny_synthetic_path, tmp_path
):
    """A study longer than one machine session: pause at the time limit, resume in a later call."""
    import dataclasses

    from experiments.training import train

    reference = train(_config(algo, tiny_synthetic_path, steps, every, checkpoints=False), tmp_path / "reference")
    reference["dir"] = str(tmp_path / "reference")
    run = tmp_path / "run"
    # A limit already past when training starts: the run pauses at the first rollout boundary after its
    # first rollout (REINFORCE: an episode of 3 steps; DDPG: every step), whatever this machine's speed.
    limited = dataclasses.replace(_config(algo, tiny_synthetic_path, steps, every), time_limit_s=1e-9)
    paused = train(limited, run, pause_at_time_limit=True)
    first_boundary = 3 if algo == "reinforce" else 1
    assert paused["paused"] and paused["time_limited"] and paused["steps"] == first_boundary
    assert [s for s, _ in paused["auroc_curve"]] == [0, first_boundary]
    assert paused["initial_auroc"] == reference["initial_auroc"]
    assert paused["initial_auroc_by_class"] == reference["initial_auroc_by_class"]
    # Only the checkpoint is written, at the step the summary names; the run is not finished.
    folder = ckpt.find_checkpoint(run)
    assert folder is not None and int(ckpt.read_meta(folder)["num_timesteps"]) == first_boundary
    assert not (run / "summary.json").exists() and not (run / "controller").exists()
    # Paused again in a second call, one rollout further on.
    again = train(limited, run, pause_at_time_limit=True)
    assert again["paused"] and again["steps"] == 2 * first_boundary and again["resumed_from"] == [first_boundary]
    # Without the limit it goes on to the run that was never paused, weight for weight.
    summary = train(_config(algo, tiny_synthetic_path, steps, every), run)
    assert "paused" not in summary and not summary["time_limited"]
    assert summary["resumed_from"] == [first_boundary, 2 * first_boundary]
    # The initial AUROCs within each class come back from the checkpoint, not from the resumed agent.
    assert summary["initial_auroc_by_class"] == reference["initial_auroc_by_class"] is not None
    assert summary["final_auroc_by_class"] == reference["final_auroc_by_class"]
    summary["resumed_from"] = summary["resumed_from"][-1:]  # _check_resumed_run expects one resume
    (run / "summary.json").write_text(json.dumps(summary))
    _check_resumed_run(run, reference, steps, every, 2 * first_boundary, tiny_synthetic)


def test_pausing_needs_a_run_folder_and_checkpoints(tiny_synthetic_path, tmp_path):
    import dataclasses

    from experiments.training import train

    config = dataclasses.replace(_config("reinforce", tiny_synthetic_path, 6, 3), time_limit_s=1.0)
    with pytest.raises(ValueError, match="pause_at_time_limit needs a run folder"):
        train(config, None, pause_at_time_limit=True)
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        train(dataclasses.replace(config, checkpoint_every=0), tmp_path / "run", pause_at_time_limit=True)
    assert not (tmp_path / "run").exists()


def test_other_settings_need_overwrite_even_before_a_checkpoint(tiny_synthetic_path, tmp_path):
    from experiments.training import train

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"algo": "ddpg", "steps": 4000}))  # killed before any checkpoint
    with pytest.raises(ValueError, match="algo: saved 'ddpg', now 'reinforce'"):
        train(_config("reinforce", tiny_synthetic_path, 6, 3), run)
    summary = train(_config("reinforce", tiny_synthetic_path, 6, 3), run, overwrite=True)
    assert summary["steps"] == 6 and summary["resumed_from"] == []
    assert json.loads((run / "config.json").read_text())["algo"] == "reinforce"


def test_a_run_saved_before_mirror_average_is_not_taken_for_one_with_it(tiny_synthetic_path, tmp_path):
    """A run folder written before ``mirror_average`` existed scored each image alone: it is not resumed or
    reused under the default (which scores with the mirror image), and is under ``mirror_average=False``."""
    from experiments.training import train

    run = tmp_path / "run"
    config = dataclasses.replace(_config("reinforce", tiny_synthetic_path, 6, 3), mirror_average=False)
    train(config, run)
    saved = json.loads((run / "config.json").read_text())
    del saved["mirror_average"]  # as an older version wrote it
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="mirror_average: saved False, now True"):
        train(_config("reinforce", tiny_synthetic_path, 6, 3), run)
    assert train(config, run)["already_finished"]


def test_a_run_made_under_other_env_defaults_is_not_resumed_or_reused(tiny_synthetic_path, tmp_path, monkeypatch, caplog):
    """The config alone does not say the env settings once the defaults change: the recorded ones are compared."""
    import agents
    from experiments.training import env_settings, env_settings_differences, train

    run = tmp_path / "run"
    config = _config("reinforce", tiny_synthetic_path, 6, 3)
    summary = train(config, run)
    assert summary["env_settings"]["validation_refresh"] is True
    assert train(config, run)["already_finished"]

    recommended = agents.recommended_env_kwargs
    # A later checkout whose defaults differ: the same config now gives another env.
    monkeypatch.setattr(agents, "recommended_env_kwargs", lambda *args: {**recommended(*args), "validation_refresh": False})
    with pytest.raises(ValueError, match="env setting validation_refresh: saved True, now False.*overwrite"):
        train(config, run)
    now = json.loads(json.dumps(env_settings(config)))
    assert env_settings_differences({**summary["env_settings"], "device": "cuda", "retired_setting": 1}, now) == [
        "env setting retired_setting: saved 1, now '(not set)'",
        "env setting validation_refresh: saved True, now False",
    ]  # the device may differ
    monkeypatch.setattr(agents, "recommended_env_kwargs", recommended)

    # A run made before the settings were recorded: reused, with a warning that says what cannot be checked.
    recorded = json.loads((run / "summary.json").read_text())
    del recorded["env_settings"]
    (run / "summary.json").write_text(json.dumps(recorded))
    with caplog.at_level("WARNING"):
        assert train(config, run)["already_finished"]
    assert "did not record its env settings" in caplog.text


def test_a_run_on_another_version_of_the_built_in_set_is_not_resumed_or_reused(tiny_synthetic, tmp_path, monkeypatch):
    """The built-in set is named by its generator version and settings: a run made on one version is not done on another."""
    from experiments.training import TrainConfig, train
    from iqa_env.data import cache

    monkeypatch.setattr(cache, "default_dataset", lambda: tiny_synthetic)
    monkeypatch.setattr(cache, "default_dataset_name", lambda: "synthetic-default-v1-aaaaaaaaaaaa.h5")
    config = TrainConfig(
        algo="reinforce", steps=6, seed=0, batch_size=8, train_steps=2, validation_size=8, device="cpu",
        eval_every=3, checkpoint_every=3,
    )
    run = tmp_path / "run"
    summary = train(config, run)
    assert config.dataset is None and summary["dataset_fingerprint"] == "built-in:synthetic-default-v1-aaaaaaaaaaaa.h5"
    assert train(config, run)["already_finished"]

    monkeypatch.setattr(cache, "default_dataset_name", lambda: "synthetic-default-v2-bbbbbbbbbbbb.h5")
    with pytest.raises(ValueError, match=(
        r"dataset_fingerprint: 'built-in:synthetic-default-v1-aaaaaaaaaaaa.h5' there, "
        r"'built-in:synthetic-default-v2-bbbbbbbbbbbb.h5' now \(the built-in set changed\).*overwrite"
    )):
        train(config, run)
    summary = train(config, run, overwrite=True)
    assert summary["dataset_fingerprint"] == "built-in:synthetic-default-v2-bbbbbbbbbbbb.h5"


def test_a_dataset_file_rewritten_at_the_same_path_is_not_resumed_or_reused(tiny_synthetic, tmp_path):
    """A run is tied to its data's content: other data under the same path is refused, the same data elsewhere is kept."""
    import re
    import shutil

    from experiments.training import run_folder_state, train
    from iqa_env.data import generate_synthetic, save_dataset

    data = tmp_path / "data.h5"
    save_dataset(tiny_synthetic, data)
    config = _config("reinforce", data, 6, 3)
    run = tmp_path / "run"
    recorded = train(config, run)["dataset_fingerprint"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", recorded)

    moved = tmp_path / "elsewhere" / "moved.h5"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    assert train(_config("reinforce", moved, 6, 3), run)["already_finished"]  # the same content at another path

    # The file regenerated with another seed under the same name: the run's config is unchanged, its data is not.
    save_dataset(generate_synthetic(n_patients=16, frames_per_patient=12, size=32, seed=1), data)
    refused = rf"dataset_fingerprint: '{recorded}' there, 'sha256:[0-9a-f]{{64}}' now \({re.escape(str(data))} changed since the run\).*overwrite"
    with pytest.raises(ValueError, match=refused):
        run_folder_state(config, run)
    with pytest.raises(ValueError, match=refused):
        train(config, run)
    assert (run / "summary.json").exists()  # refusing writes nothing
    summary = train(config, run, overwrite=True)
    assert summary["dataset_fingerprint"] not in (recorded, None) and summary["steps"] == 6


def _tiny_env(dataset, **kw):
    from iqa_env.env import TaskAmenabilityEnv

    return TaskAmenabilityEnv(dataset, batch_size=8, train_steps=3, validation_size=20, device="cpu", **kw)


@pytest.mark.parametrize(
    "settings",
    [{}, {"predictor_augment": True, "predictor_average": 0.9},
     {"reward": "fixed", "reward_baseline": "paired", "paired_class_correction": True, "paired_draws": 3},
     {"reward": "fixed", "reward_baseline": "paired", "paired_class_correction": "step", "paired_draws": 3}],
    ids=["plain", "augment+average", "paired+class-correction+draws", "paired+step-correction"],
)
def test_env_state_dict_round_trip(tiny_synthetic, settings):
    """An env loaded from another's state makes the same next steps (through a weights-only file)."""
    rng = np.random.default_rng(1)
    make = functools.partial(_tiny_env, **settings)
    a = make(tiny_synthetic)
    a.reset(seed=0)
    for _ in range(7):  # two episodes in: mid-validation, baselines and predictor trained
        if a.step(rng.random(8))[2]:
            a.reset()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    never_reset = make(tiny_synthetic)
    other_seed = make(tiny_synthetic)
    other_seed.reset(seed=5)
    for b in (never_reset, other_seed):
        b.load_state_dict(state)
    envs = [a, never_reset, other_seed]
    for _ in range(12):
        action = rng.random(8)
        results = [env.step(action) for env in envs]
        for obs, reward, terminated, _, info in results[1:]:
            assert np.array_equal(obs, results[0][0]) and reward == results[0][1] and terminated == results[0][2]
            assert np.array_equal(info["selection"], results[0][4]["selection"])
        if results[0][2]:
            for env in envs:
                env.reset()
    for env in envs[1:]:
        for key, value in a.predictor.state_dict().items():
            assert torch.equal(env.predictor.state_dict()[key], value)
        for key, value in a.evaluated_predictor.state_dict().items():
            assert torch.equal(env.evaluated_predictor.state_dict()[key], value)
    if settings.get("reward_baseline") == "paired":  # no moving average; the class correction's fit instead
        assert a.class_correction.fitted == never_reset.class_correction.fitted > 0
        assert np.array_equal(a.class_correction.weights, never_reset.class_correction.weights)
    else:
        assert a.baseline.values == never_reset.baseline.values != {}


def test_env_state_dict_refuses_other_settings(tiny_synthetic):
    a = _tiny_env(tiny_synthetic)
    a.reset(seed=0)
    b = _tiny_env(tiny_synthetic, reward="selective")
    with pytest.raises(ValueError, match="reward: saved 'weighted', this env 'selective'"):
        b.load_state_dict(a.state_dict())
    corrected = _tiny_env(tiny_synthetic, reward="fixed", reward_baseline="paired", paired_class_correction=True)
    with pytest.raises(ValueError, match="paired_class_correction: saved False, this env 'history'"):
        corrected.load_state_dict(_tiny_env(tiny_synthetic, reward="fixed", reward_baseline="paired").state_dict())
    # A state written when the setting was a bool (True: the running fit) loads into the same env ...
    state = corrected.state_dict()
    _tiny_env(tiny_synthetic, reward="fixed", reward_baseline="paired", paired_class_correction="history").load_state_dict(
        {**state, "settings": {**state["settings"], "paired_class_correction": True}}
    )
    # ... and not into one that fits each step's draws.
    per_step = _tiny_env(
        tiny_synthetic, reward="fixed", reward_baseline="paired", paired_class_correction="step", paired_draws=3
    )
    with pytest.raises(ValueError, match="paired_class_correction: saved 'history', this env 'step'"):
        per_step.load_state_dict({**state, "settings": {**state["settings"], "paired_draws": 3}})
    older = {**a.state_dict(), "format_version": 1}
    with pytest.raises(ValueError, match="format_version 1, written by another release; this release reads format_version 2"):
        _tiny_env(tiny_synthetic).load_state_dict(older)


@pytest.mark.parametrize("index_buffer", [False, True])
def test_replay_buffer_round_trip(index_buffer, tmp_path):
    from gymnasium import spaces
    from stable_baselines3.common.buffers import ReplayBuffer

    from agents.index_buffer import IndexReplayBuffer

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (30, 1, 6, 6), dtype=np.uint8)
    obs_space = spaces.Box(0, 255, (4, 1, 6, 6), np.uint8)
    act_space = spaces.Box(0.0, 1.0, (4,), np.float32)

    def make():
        if index_buffer:
            return IndexReplayBuffer(10, obs_space, act_space, "cpu", images=pool)
        return ReplayBuffer(10, obs_space, act_space, "cpu")

    buffer = make()
    for _ in range(13):  # wraps around: full
        obs, nxt = pool[rng.integers(0, 30, 4)], pool[rng.integers(0, 30, 4)]
        buffer.add(obs[None], nxt[None], rng.random((1, 4)), rng.random(1), np.array([0.0]), [{}])
    path = tmp_path / "buffer.npz"
    ckpt.save_replay_buffer(buffer, path, ckpt.ImagePool(pool))
    with np.load(path, allow_pickle=False) as saved:
        assert "observations" not in saved.files  # pixels stored as pool indices
    loaded = make()
    ckpt.load_replay_buffer(loaded, path, ckpt.ImagePool(pool))
    assert (loaded.pos, loaded.full) == (buffer.pos, buffer.full) == (3, True)
    for name in ("observations", "next_observations", "observation_indices", "actions", "rewards", "dones"):
        if isinstance(getattr(buffer, name, None), np.ndarray):
            assert np.array_equal(getattr(loaded, name), getattr(buffer, name)), name

    if not index_buffer:  # an image outside the pool: pixels are kept as they are
        partial = make()
        odd = rng.integers(0, 256, (1, 4, 1, 6, 6), dtype=np.uint8)
        partial.add(odd, odd, rng.random((1, 4)), rng.random(1), np.array([1.0]), [{}])
        ckpt.save_replay_buffer(partial, path, ckpt.ImagePool(pool))
        again = make()
        ckpt.load_replay_buffer(again, path, ckpt.ImagePool(pool))
        assert again.pos == 1 and np.array_equal(again.observations[0], odd)


def test_find_checkpoint_takes_only_whole_ones(tmp_path):
    (tmp_path / ckpt.CHECKPOINT_DIR).mkdir()  # no checkpoint.json: never a whole checkpoint
    assert ckpt.find_checkpoint(tmp_path) is None
    (tmp_path / ckpt.OLD_DIR).mkdir()
    (tmp_path / ckpt.OLD_DIR / ckpt.META_NAME).write_text("{}")
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / ckpt.OLD_DIR  # killed between the two renames
    stale = tmp_path / f"{ckpt.TMP_PREFIX}x{ckpt.TMP_SUFFIX}"
    stale.mkdir()
    ckpt.remove_stale(tmp_path)
    assert not stale.exists()


def test_memory_growth_smoke(tiny_synthetic_path):
    from experiments.memory_growth import measure

    result = measure(steps=50, warmup=10, every=10, dataset=str(tiny_synthetic_path), batch_size=8,
                     train_steps=2, validation_size=8)
    assert [s["step"] for s in result["samples"]] == [10, 20, 30, 40, 50]
    assert all(s["rss_mib"] > 0 for s in result["samples"])
    for key in ("baseline_mib", "final_mib", "max_mib", "growth_pct", "max_growth_pct", "steps_per_s"):
        assert np.isfinite(result[key]), key
    assert result["rss_source"] in ("statm", "getrusage-peak")


@pytest.mark.parametrize(
    "argv, message",
    [
        # each of these had ended in a ValueError's traceback (or, --every 0 alone, after the data was loaded)
        (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        (["--every", "0"], "argument --every: expected a positive integer, got '0'"),
        (["--seed", "-1"], "argument --seed: expected a whole number >= 0, got '-1'"),
        (["--steps", "500", "--warmup", "600"], "need whole numbers 0 <= warmup < steps and every >= 1, got warmup=600"),
        (["--reward", "best"], "reward must be one of"),
        (["--dataset", "missing.h5"], "missing.h5"),
    ],
)
def test_memory_growth_refuses_impossible_settings_before_any_step(argv, message, capsys, monkeypatch):
    import experiments.memory_growth as growth

    monkeypatch.setattr(growth, "measure", None)  # reached, the command would fail with a TypeError instead
    with pytest.raises(SystemExit) as stopped:
        growth.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("algo", ["reinforce", "ddpg"])
def test_a_fresh_run_builds_and_warms_up_its_predictor_once(tiny_synthetic_path, monkeypatch, algo):
    """train() leaves the seeded reset to learn(): an extra env.reset(seed) rebuilt and re-warmed the predictor."""
    from experiments.training import train
    from iqa_env.env import TaskAmenabilityEnv

    builds = []
    original = TaskAmenabilityEnv._build_predictor

    def counting(self):
        builds.append(self.predictor_warmup_steps)
        return original(self)

    monkeypatch.setattr(TaskAmenabilityEnv, "_build_predictor", counting)
    from agents import recommended_env_kwargs

    config = _config(algo, tiny_synthetic_path, steps=24, every=12, checkpoints=False, warmup=None)
    summary = train(config)
    assert summary["steps"] >= 24
    # the algorithm's recommended warm-up (2,000 for REINFORCE with this reward, 400 for the others), once
    assert builds == [recommended_env_kwargs(algo, config.reward)["predictor_warmup_steps"]]
