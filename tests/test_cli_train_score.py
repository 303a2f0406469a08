"""`iqa train` then `iqa score`, as a user runs them, on a tiny dataset."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from experiments.cli import main


def test_train_then_score(tiny_synthetic_path, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        ["train", "--algo", "reinforce", "--dataset", str(tiny_synthetic_path), "--steps", "48",
         "--batch-size", "8", "--device", "cpu", "--out", str(run)]
    )
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    # The progress bar (on by default) runs without extra packages and reaches the last step.
    assert f"{summary['steps']}/{summary['steps']}" in capsys.readouterr().err
    assert summary["steps"] >= 48 and 0.0 <= summary["initial_auroc"] <= 1.0
    for name in ("config.json", "predictor.pt", "controller/controller.json", "controller/controller.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())

    out = tmp_path / "scores.csv"
    code = main(["score", "--controller", str(run / "controller"), str(tiny_synthetic_path),
                 "--out", str(out), "--rejection-ratio", "0.1"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 192 and set(rows[0]) == {"index", "score", "rejected"}
    scores = np.array([float(r["score"]) for r in rows])
    rejected = np.array([r["rejected"] == "1" for r in rows])
    assert rejected.sum() == 20  # the paper keeps floor((1 - 0.1) * 192) = 172
    assert scores[rejected].max() <= scores[~rejected].min()


def test_train_passes_env_and_agent_arguments(tiny_synthetic_path, tmp_path, capsys):
    """``--env-kwargs`` / ``--agent-kwargs`` reach the env and the algorithm, and the run records them."""
    base = ["train", "--dataset", str(tiny_synthetic_path), "--steps", "16", "--batch-size", "8",
            "--device", "cpu", "--no-progress"]
    run = tmp_path / "run"
    assert main([*base, "--out", str(run), "--env-kwargs", '{"reward_normalisation": "none"}',
                 "--agent-kwargs", '{"controller_average": 0.5}']) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["env_kwargs"] == {"reward_normalisation": "none"}
    assert config["agent_kwargs"] == {"controller_average": 0.5}
    capsys.readouterr()
    # A setting the env does not know is the env's own one-line error.
    assert main([*base, "--out", str(tmp_path / "bad"), "--env-kwargs", '{"reward_normalisation": "z"}']) == 2
    err = capsys.readouterr().err.strip()
    assert "reward_normalisation must be one of" in err and len(err.splitlines()) == 1
    assert main([*base, "--out", str(tmp_path / "bad"), "--agent-kwargs", '{"controller_average": 1.5}']) == 2
    assert "controller_average" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "bad"), "--agent-kwargs", "[1]"])
    assert "argument --agent-kwargs: must be a JSON object" in capsys.readouterr().err


def test_score_a_folder_of_images(tiny_synthetic, tmp_path):
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
