"""The seed study reports every seed with its initial and final holdout AUROC."""

from __future__ import annotations

from experiments.seed_study import main


def test_seed_study_reports_every_seed(tiny_synthetic_path, tmp_path, capsys):
    out = tmp_path / "study.json"
    code = main(
        ["--algos", "reinforce", "--rewards", "weighted", "selective", "--seeds", "2", "--steps", "30",
         "--dataset", str(tiny_synthetic_path), "--workers", "1", "--json", str(out),
         "--env-kwargs", '{"batch_size": 8, "train_steps": 2, "validation_size": 16}']
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "mean_intensity" in text and "intensity_std" in text
    lines = [line for line in text.splitlines() if line.startswith("reinforce ")]
    assert len(lines) == 4 + 2  # one row per run, one tally per reward
    assert "seeds reach AUROC >= 0.8" in text
    assert out.is_file()
