"""`iqa train` then `iqa score`, as a user runs them, on a tiny dataset."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from experiments.cli import main


def test_train_then_score(tiny_synthetic, tiny_synthetic_path, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        ["train", "--algo", "reinforce", "--dataset", str(tiny_synthetic_path), "--steps", "48",
         "--batch-size", "8", "--device", "cpu", "--out", str(run)]
    )
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    # The progress bar (on by default) runs without extra packages and reaches the last step; its total
    # is, from the start, the step REINFORCE stops at (the end of the episode it is in at 48).
    err = capsys.readouterr().err
    assert f"{summary['steps']}/{summary['steps']}" in err
    assert summary["steps"] > 48
    assert {int(total) for total in re.findall(r"\b\d+/(\d+) \[", err)} == {summary["steps"]}
    for name in ("config.json", "predictor.pt", "controller/controller.json", "controller/controller.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())

    out = tmp_path / "scores.csv"
    preview = tmp_path / "pictures" / "scores.png"
    capsys.readouterr()
    code = main(["score", "--controller", str(run / "controller"), str(tiny_synthetic_path),
                 "--out", str(out), "--rejection-ratio", "0.1", "--preview", str(preview), "--n-preview", "5"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 192 and set(rows[0]) == {"index", "score", "percentile", "rejected"}
    scores = np.array([float(r["score"]) for r in rows])
    rejected = np.array([r["rejected"] == "1" for r in rows])
    assert rejected.sum() == 20  # the paper keeps floor((1 - 0.1) * 192) = 172
    assert scores[rejected].max() <= scores[~rejected].min()
    assert f"wrote preview {preview} (the 5 lowest- and highest-scored)" in capsys.readouterr().out
    import matplotlib.image

    assert matplotlib.image.imread(preview).ndim == 3  # a PNG picture, in a folder made for it

    # The saved controller carries its run's validation images' scores: percentiles against them,
    # and a rejection of one image at a time below the lowest tenth of them.
    from agents import Controller
    from experiments.training import load_splits

    controller = Controller.load(run / "controller")
    _, (_, validation_set, _) = load_splits(str(tiny_synthetic_path))
    reference = np.sort(controller.score(validation_set.images))
    assert controller.reference["images"] == len(validation_set)
    if torch.cuda.is_available():  # scored on the training device (CUDA), here on the CPU: equal to float rounding
        np.testing.assert_allclose(controller.reference["scores"], reference, rtol=0, atol=1e-6)
    else:
        assert controller.reference["scores"] == reference.tolist()
    exact = controller.score(tiny_synthetic.images)
    np.testing.assert_allclose(scores, exact, atol=1e-6)
    # The final AUROC within each class: the saved controller's holdout scores, one class at a time.
    from iqa_env.metrics import auroc_or_none

    holdout = load_splits(str(tiny_synthetic_path))[1][2]
    held = controller.score(holdout.images)
    truth = holdout.amenable("classification")
    expected = {
        name: auroc_or_none(held[holdout.labels == k], truth[holdout.labels == k])
        for k, name in enumerate(holdout.class_names)
    }
    assert set(summary["final_auroc_by_class"]) == set(holdout.class_names) == set(summary["initial_auroc_by_class"])
    assert any(v is not None for v in expected.values())
    for name, value in expected.items():
        assert summary["final_auroc_by_class"][name] == pytest.approx(value, abs=1e-9), name
    # The run's AUROCs against the holdout truth, recomputed here: at the end from the saved controller,
    # at initialisation from the same algorithm built with the run's seed and settings, before learning.
    from agents import make_agent
    from experiments.training import TrainConfig, make_env
    from iqa_env.metrics import auroc

    assert summary["final_auroc"] == pytest.approx(auroc(held, truth), abs=1e-9)
    config = TrainConfig(**json.loads((run / "config.json").read_text()))
    train_set, validation_set, _ = load_splits(str(tiny_synthetic_path))[1]
    env = make_env(config, train_set, validation_set)
    untrained = Controller.from_agent(
        make_agent(config.algo, env, seed=config.seed, **config.agent_kwargs), mirror_average=config.mirror_average
    )
    env.close()
    assert summary["initial_auroc"] == pytest.approx(auroc(untrained.score(holdout.images), truth), abs=1e-9)
    assert summary["initial_auroc"] != pytest.approx(summary["final_auroc"], abs=1e-6)  # 48 steps moved it
    percentiles = np.array([float(r["percentile"]) for r in rows])
    below = np.searchsorted(reference, exact, "left") + np.searchsorted(reference, exact, "right")
    np.testing.assert_allclose(percentiles, below / (2 * len(reference)), atol=1e-4)
    assert main(["score", "--controller", str(run / "controller"), str(tiny_synthetic_path), "--out", str(out),
                 "--rejection-ratio", "0.1", "--reject-by", "reference"]) == 0
    by_reference = np.array([r["rejected"] == "1" for r in csv.DictReader(out.open())])
    np.testing.assert_array_equal(by_reference, exact < np.quantile(reference, 0.1))
    assert 0 < by_reference.sum() < len(exact)
    assert f"{int(by_reference.sum())} rejected: the lowest 0.1 of the controller's reference images" in capsys.readouterr().out


def test_train_passes_env_and_agent_arguments(tiny_synthetic_path, tmp_path, capsys):
    """``--env-kwargs`` / ``--agent-kwargs`` reach the env and the algorithm, and the run records them."""
    base = ["train", "--dataset", str(tiny_synthetic_path), "--steps", "16", "--batch-size", "8",
            "--device", "cpu", "--no-progress"]
    run = tmp_path / "run"
    assert main([*base, "--out", str(run), "--env-kwargs", '{"reward_normalisation": "none"}',
                 "--agent-kwargs", '{"controller_average": 0.5}', "--eval-every", "8"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["env_kwargs"] == {"reward_normalisation": "none"}
    assert config["agent_kwargs"] == {"controller_average": 0.5}
    # Without the progress bar each holdout evaluation during the run is a line on stderr.
    curve = json.loads((run / "summary.json").read_text())["auroc_curve"]
    pattern = r"classification-weighted-reinforce-seed0: step (\d+), holdout AUROC (\S+) \("
    lines = [(int(step), float(value)) for step, value in re.findall(pattern, capsys.readouterr().err)]
    assert [step for step, _ in lines] == [8, 16]
    assert lines == [(step, pytest.approx(value, abs=5e-4)) for step, value in curve if step in (8, 16)]
    # --no-mirror-average: the same training, its controller scores each image alone.
    from agents import Controller
    from experiments.training import load_splits
    from iqa_env.metrics import auroc

    alone = tmp_path / "alone"
    assert main([*base, "--out", str(alone), "--env-kwargs", '{"reward_normalisation": "none"}',
                 "--agent-kwargs", '{"controller_average": 0.5}', "--eval-every", "8", "--no-mirror-average"]) == 0
    capsys.readouterr()
    assert config["mirror_average"] is True
    assert json.loads((alone / "config.json").read_text())["mirror_average"] is False
    mirrored, single = Controller.load(run / "controller"), Controller.load(alone / "controller")
    assert mirrored.mirror_average and not single.mirror_average
    for key, value in mirrored.backbone.state_dict().items():
        assert torch.equal(single.backbone.state_dict()[key], value), key
    images = load_splits(str(tiny_synthetic_path))[1][2].images
    expected = (single.score(images) + single.score(np.ascontiguousarray(images[..., ::-1]))) / 2
    np.testing.assert_allclose(mirrored.score(images), expected, rtol=0, atol=1e-6)
    assert json.loads((run / "summary.json").read_text())["final_auroc"] == pytest.approx(
        auroc(mirrored.score(images), load_splits(str(tiny_synthetic_path))[1][2].amenable("classification")), abs=1e-9
    )
    # A setting the env does not know is the env's own one-line error.
    assert main([*base, "--out", str(tmp_path / "bad"), "--env-kwargs", '{"reward_normalisation": "z"}']) == 2
    err = capsys.readouterr().err.strip()
    assert "reward_normalisation must be one of" in err and len(err.splitlines()) == 1
    assert main([*base, "--out", str(tmp_path / "bad"), "--agent-kwargs", '{"controller_average": 1.5}']) == 2
    assert "controller_average" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "bad"), "--agent-kwargs", "[1]"])
    assert "argument --agent-kwargs: must be a JSON object" in capsys.readouterr().err


def test_train_with_a_warmup_cache_loads_what_another_reward_kept(tiny_synthetic_path, tmp_path, caplog, capsys):
    """``--warmup-cache``: the selective run loads the weighted run's warm-up and ends where it would
    have ended warming up itself; the folder is where, not what (config.json's settings are unchanged)."""
    base = ["train", "--dataset", str(tiny_synthetic_path), "--steps", "12", "--batch-size", "8", "--train-steps", "2",
            "--validation-size", "16", "--device", "cpu", "--no-progress", "--checkpoint-every", "0",
            "--env-kwargs", '{"predictor_warmup_steps": 25}']
    cache = tmp_path / "warmup"
    with caplog.at_level("INFO", logger="iqa_env.env"):
        assert main([*base, "--reward", "weighted", "--warmup-cache", str(cache), "--out", str(tmp_path / "w")]) == 0
        assert "loaded" not in caplog.text and len(list(cache.iterdir())) == 1
        assert main([*base, "--reward", "selective", "--warmup-cache", str(cache), "--out", str(tmp_path / "s")]) == 0
        assert "predictor warm-up of 25 updates loaded" in caplog.text
    assert main([*base, "--reward", "selective", "--out", str(tmp_path / "plain")]) == 0
    for name in ("initial_auroc", "final_auroc"):
        shared, plain = (json.loads((tmp_path / d / "summary.json").read_text())[name] for d in ("s", "plain"))
        assert shared == plain, name
    shared, plain = (torch.load(tmp_path / d / "predictor.pt", weights_only=True) for d in ("s", "plain"))
    assert all(torch.equal(shared[k], plain[k]) for k in plain)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["warmup_cache"] == str(cache) and config["env_kwargs"] == {"predictor_warmup_steps": 25}
    # A file given as the folder: refused before the run writes anything.
    kept = next(cache.iterdir())
    assert main([*base, "--reward", "fixed", "--warmup-cache", str(kept), "--out", str(tmp_path / "bad")]) == 2
    assert f"{kept} is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_score_a_folder_of_images(tiny_synthetic, tmp_path, capsys):
    from PIL import Image

    from agents import Controller, make_agent
    from iqa_env.env import TaskAmenabilityEnv

    env = TaskAmenabilityEnv(tiny_synthetic, batch_size=8, train_steps=2, validation_size=8, device="cpu")
    Controller.from_agent(make_agent("reinforce", env, seed=0)).save(tmp_path / "ctrl")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(tiny_synthetic.images[i, 0]).save(folder / f"frame{i}.png")
    out = tmp_path / "scores.csv"
    assert main(["score", "--controller", str(tmp_path / "ctrl"), str(folder), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == [f"frame{i}.png" for i in range(5)]
    assert "percentile" not in rows[0]  # a controller without a reference has no percentiles
    before = out.read_bytes()
    assert main(["score", "--controller", str(tmp_path / "ctrl"), str(folder), "--out", str(out), "--reject-by", "reference"]) == 2
    assert "no reference scores; calibrate it" in capsys.readouterr().err
    assert out.read_bytes() == before  # nothing written is lost


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "missing.h5", "--out", "x"], "does not exist"),
        (["score", "--controller", "nowhere", "data.h5"], "controller.json"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_ddpg_with_the_fixed_reward_gets_its_measured_settings(tiny_synthetic_path, tmp_path, capsys):
    """DDPG with the fixed reward trains, by default, with the set-up measured to learn: each training step
    rewarded against a step on the rest of its batch on 32 validation images, 8 draws per step with the
    class term fitted on them, and a bandit critic fitted on the draws; an explicit size wins."""
    from agents import make_agent, recommended_env_kwargs
    from experiments.training import TrainConfig, env_settings, load_splits, make_env

    base = ["train", "--algo", "ddpg", "--reward", "fixed", "--dataset", str(tiny_synthetic_path), "--steps", "6",
            "--batch-size", "8", "--train-steps", "2", "--device", "cpu", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["validation_size"] == 32  # "auto", as the run records it
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    paired = {"reward_baseline": "paired", "validation_size": 32, "paired_draws": 8, "paired_class_correction": "step"}
    assert {key: summary["env_settings"][key] for key in paired} == paired
    # The same command with another size on the same folder is a different run, refused without --overwrite.
    assert main([*base, "--validation-size", "16", "--out", str(tmp_path / "run")]) == 2
    assert "validation_size: saved 32, now 16" in capsys.readouterr().err
    # REINFORCE gets the same set-up with the linearised probes in classification and the first-order ones
    # in segmentation (whose per-pixel outputs the linearised probes refuse); other algorithms and rewards
    # keep 256 and their own baselines.
    # REINFORCE's evaluate() also reports a weight average of the co-trained predictor, which its probes,
    # reading the weights themselves, do not use (DDPG's probe steps would), and in classification its real
    # training step takes 80 % of each batch.
    assert recommended_env_kwargs("reinforce", "fixed") == {
        **recommended_env_kwargs("ddpg", "fixed"), "batch_size": 16, "paired_probe": "linearised",
        "predictor_average": 0.998, "training_selection_rate": 0.8}
    assert recommended_env_kwargs("reinforce", "fixed", "segmentation")["paired_probe"] == "linear"
    assert env_settings(TrainConfig(algo="reinforce", reward="fixed", task="segmentation"))["paired_probe"] == "linear"
    assert env_settings(TrainConfig(algo="reinforce", reward="fixed"))["validation_size"] == 32
    assert env_settings(TrainConfig(algo="td3", reward="fixed"))["validation_size"] == 256
    assert "reward_baseline" not in env_settings(TrainConfig(algo="td3", reward="fixed"))  # the paper's form
    assert env_settings(TrainConfig(algo="ddpg", reward="weighted"))["validation_size"] == 256
    assert env_settings(TrainConfig(algo="ddpg", reward="fixed", validation_size=None))["validation_size"] is None
    # make_agent on that env builds the bandit critic fitted on the draws; on the paper's form, the pooled one.
    config = TrainConfig(algo="ddpg", reward="fixed", dataset=str(tiny_synthetic_path), batch_size=8,
                         train_steps=2, device="cpu")
    _, (train_set, validation_set, _) = load_splits(config.dataset)
    for env_kwargs, gamma, store in (({}, 0.0, True), ({"reward_baseline": "moving_average", "paired_draws": 1,
                                                       "paired_class_correction": False}, 0.9, False)):
        env = make_env(dataclasses.replace(config, env_kwargs=env_kwargs), train_set, validation_set)
        try:
            agent = make_agent("ddpg", env, seed=0)
            assert (agent.gamma, agent.store_selections) == (gamma, store)
        finally:
            env.close()


def test_train_threads_is_the_runs_torch_thread_count_and_one_gives_a_reproduce_stages_figures(
    tiny_synthetic_path, tmp_path, capsys
):
    """``--threads``: the run trains on that many torch threads (summary.json says how many), the caller's
    count is left as it was, and ``--threads 1`` ends where the same settings end run as a stage of
    ``iqa reproduce`` (one thread, ``experiments.reproduce.run_stage``) to the last digit."""
    from experiments.reproduce import STAGE_THREADS
    from experiments.training import TrainConfig, train

    args = ["--dataset", str(tiny_synthetic_path), "--steps", "16", "--batch-size", "8", "--train-steps", "2",
            "--device", "cpu", "--no-progress"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the stages' count, so that a --threads left unused shows
    try:
        assert main(["train", *args, "--threads", str(STAGE_THREADS), "--out", str(tmp_path / "one")]) == 0
        assert torch.get_num_threads() == 2
        capsys.readouterr()
        cli = json.loads((tmp_path / "one" / "summary.json").read_text())
        assert cli["torch_threads"] == STAGE_THREADS == 1
        config = TrainConfig(dataset=str(tiny_synthetic_path), steps=16, batch_size=8, train_steps=2, device="cpu")
        torch.set_num_threads(STAGE_THREADS)
        stage = train(config, tmp_path / "stage", progress=False)
        assert stage["torch_threads"] == 1
        assert stage["final_auroc"] == cli["final_auroc"] and stage["auroc_curve"] == cli["auroc_curve"]
        torch.set_num_threads(2)
        assert main(["train", *args, "--out", str(tmp_path / "default")]) == 0
        assert json.loads((tmp_path / "default" / "summary.json").read_text())["torch_threads"] == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["train", *args, "--threads", "0", "--out", str(tmp_path / "bad")])
    assert "argument --threads: expected a positive integer, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_score_preview_rows_hold_the_lowest_and_highest_once_each(tmp_path):
    from experiments.commands.score import preview_rows, write_score_preview

    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7])
    lowest, highest = preview_rows(scores, 2)
    assert lowest.tolist() == [1, 3] and highest.tolist() == [2, 4]
    lowest, highest = preview_rows(scores, 8)  # fewer images than two rows: each shown once
    assert lowest.tolist() == [1, 3, 0] and highest.tolist() == [2, 4]
    lowest, highest = preview_rows(scores[:1], 8)
    assert lowest.tolist() == [0] and highest.tolist() == []
    images = np.zeros((1, 1, 8, 8), np.uint8)
    path = write_score_preview(images, ["only.png"], scores[:1], None, np.array([True]), tmp_path / "one.png")
    assert path.is_file()
