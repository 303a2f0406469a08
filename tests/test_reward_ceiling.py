"""The reward ceiling: how well the task predictor's own loss ranks images by amenability."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.reward_ceiling import fit_controller, fixed_objective, main, predictor_ceiling, selection_signal
from tests.conftest import occluded_dataset


def test_the_loss_of_a_predictor_ranks_visible_degradations_and_not_random_labels():
    # Known truth: a band of coarse noise hides the class in 40 % of the images.
    ds = occluded_dataset()
    result = predictor_ceiling(ds, controller="all", steps=150, eval_every=50, seed=0)
    curve = result["curve"]
    assert [point["updates"] for point in curve] == [50, 100, 150]
    assert curve[-1]["auroc_neg_loss"] >= 0.9
    assert curve[-1]["auroc_class_log"] >= 0.9
    assert fit_controller(result["env"], result["holdout"], "classification", steps=100) >= 0.9
    assert fit_controller(result["env"], result["holdout"], "classification", steps=100, target="ground_truth") >= 0.9
    assert fit_controller(result["env"], result["holdout"], "classification", steps=100, target="class_log_loss") >= 0.9
    with pytest.raises(ValueError, match="target must be one of"):
        fit_controller(result["env"], result["holdout"], "classification", target="labels")
    # The same images with the amenability labels shuffled: no ranking to find.
    rng = np.random.default_rng(0)
    ds.amenability["classification"] = rng.permutation(ds.amenability["classification"])
    shuffled = predictor_ceiling(ds, controller="all", steps=150, eval_every=50, seed=0)["curve"]
    assert abs(shuffled[-1]["auroc_neg_loss"] - 0.5) < 0.1


def test_the_oracle_controller_trains_on_amenable_images_only(monkeypatch):
    from iqa_env.env import TaskAmenabilityEnv

    trained = []
    original = TaskAmenabilityEnv._train_predictor

    def record(self, indices, batch_positions=None):
        trained.append(self.train_set.amenable("classification")[indices])
        return original(self, indices, batch_positions)

    monkeypatch.setattr(TaskAmenabilityEnv, "_train_predictor", record)
    result = predictor_ceiling(occluded_dataset(), controller="oracle", steps=20, eval_every=10, seed=0)
    assert [p["updates"] for p in result["curve"]] == [10, 20]
    assert len(trained) == 20 and all(batch.all() and len(batch) > 0 for batch in trained)
    trained.clear()
    predictor_ceiling(occluded_dataset(), controller="all", steps=20, eval_every=10, seed=0)
    assert len(trained) == 20 and all(len(batch) == 32 for batch in trained)
    assert not all(batch.all() for batch in trained)


def test_reward_ceiling_cli_writes_every_run(tiny_synthetic_path, tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    code = main(["--dataset", str(tiny_synthetic_path), "--steps", "4", "--eval-every", "2", "--fit-controller",
                 "--fit-steps", "2", "--json", str(out), "--plot", str(tmp_path / "ceiling.png")])
    assert code == 0
    text = capsys.readouterr().out
    assert "controller fitted to these losses" in text and "to the ground truth" in text
    assert "compared within each class" in text
    runs = json.loads(out.read_text())["runs"]
    assert [(r["controller"], r["seed"]) for r in runs] == [("all", 0), ("oracle", 0)]
    assert all(len(r["curve"]) == 2 for r in runs)
    assert (tmp_path / "ceiling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reward_ceiling_cli_passes_env_settings_and_picks_controllers(tiny_synthetic_path, tmp_path, monkeypatch):
    from experiments import reward_ceiling

    envs = []

    def recording(*args, **kwargs):
        result = predictor_ceiling(*args, **kwargs)
        envs.append(result["env"])
        return result

    monkeypatch.setattr(reward_ceiling, "predictor_ceiling", recording)
    out = tmp_path / "ceiling.json"
    assert main(["--dataset", str(tiny_synthetic_path), "--steps", "2", "--eval-every", "2", "--controllers", "all",
                 "--env-kwargs", '{"predictor_augment": true, "predictor_average": 0.99}', "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [r["controller"] for r in saved["runs"]] == ["all"]
    assert saved["env_kwargs"] == {"predictor_augment": True, "predictor_average": 0.99}
    assert [(e.predictor_augment, e.predictor_average) for e in envs] == [(True, 0.99)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        (["--eval-every", "-1"], "argument --eval-every: expected a positive integer, got '-1'"),
        (["--seeds", "0"], "argument --seeds: expected a positive integer, got '0'"),
        (["--env-kwargs", "{predictor_augment: 1}"], "argument --env-kwargs: not valid JSON"),
        (["--env-kwargs", "[1]"], "argument --env-kwargs: must be a JSON object"),
        (["--selection-signal", "--rate", "1.0"], "--rate must be a selection probability in (0, 1)"),
        (["--selection-signal", "--forms", "none"], "invalid choice: 'none'"),
        (["--class-ceiling", "--reps", "0"], "argument --reps: expected a positive integer, got '0'"),
        # these two had been taken and the measurement run (the ones a mode does not use were never read)
        (["--fit-controller", "--fit-steps", "0"], "argument --fit-steps: expected a positive integer, got '0'"),
        (["--selection-signal", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
    ],
)
def test_reward_ceiling_cli_refuses_impossible_settings(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_reward_ceiling_needs_ground_truth(tiny_synthetic_path):
    from iqa_env.data import load_dataset

    ds = load_dataset(tiny_synthetic_path)
    ds.amenability.clear()
    with pytest.raises(ValueError, match="ground-truth amenability for task 'classification'"):
        predictor_ceiling(ds, steps=2, eval_every=1)


def test_the_oracle_needs_amenable_training_images():
    ds = occluded_dataset()
    ds.amenability["classification"][:] = 0.0
    with pytest.raises(ValueError, match="none of the .* training images is amenable"):
        predictor_ceiling(ds, controller="oracle", steps=2, eval_every=1)


def test_selection_signal_cli_pairs_every_reward_with_its_selections(tiny_synthetic_path, tmp_path, capsys):
    """The paper's form gives one reward per episode of 8 training steps; ``paired`` one per step;
    ``weighted`` one per validation step (each episode: 8 training steps, then the validation images in
    batches of 8)."""
    from experiments.training import load_splits

    out = tmp_path / "signal.json"
    code = main(["--dataset", str(tiny_synthetic_path), "--selection-signal", "--steps", "16", "--batch-size", "8",
                 "--forms", "moving_average", "paired", "weighted",
                 "--env-kwargs", '{"predictor_warmup_steps": 0}', "--json", str(out)])
    assert code == 0
    assert "moving_average" in capsys.readouterr().out
    runs = json.loads(out.read_text())["selection_signal"]
    _, (_, validation, _) = load_splits(str(tiny_synthetic_path), 0)
    validation_steps = -(-min(256, len(validation)) // 8)  # TrainConfig's validation_size, in batches of 8
    episodes, rest = divmod(16, 8 + validation_steps)
    weighted = episodes * validation_steps + max(0, rest - 8)
    assert [(r["form"], r["seed"], r["rewards"]) for r in runs] == [
        ("moving_average", 0, 2), ("paired", 0, 16), ("weighted", 0, weighted)
    ]


def test_the_paired_fixed_reward_follows_the_amenability_of_the_selection():
    """On data whose truth is plain, each paired reward is larger the more amenable the selected images
    are than the rest of their batch (measured: correlation 0.205 over 300 steps, seed 1)."""
    signal = selection_signal(
        occluded_dataset(), form="paired", steps=300, seed=1, batch_size=16,
        env_kwargs={"predictor_warmup_steps": 100},
    )
    assert signal["rewards"] == 300
    assert signal["correlation"] > 0.1, signal
    # Decomposed (measured: amenable images of class 1 +1.286 +- 0.292; of class 0, the rarer, +0.048 +- 0.324):
    terms = signal["decomposition"]["terms"]
    assert list(terms) == ["amenable, 0", "amenable, 1", "class 1"]
    assert terms["amenable, 1"]["coefficient"] > 2 * terms["amenable, 1"]["standard_error"], terms


def test_the_decomposition_recovers_what_each_term_is_worth():
    """Rewards made from known worths of the contrasts, plus noise: least squares gives them back within
    three standard errors, and the standard errors shrink as the noise does."""
    from experiments.reward_ceiling import _decomposition

    rng = np.random.default_rng(0)
    worth = np.array([0.2, 0.7, -1.0])
    contrasts = rng.normal(scale=0.2, size=(400, 3))
    results = []
    for noise in (0.3, 0.03):
        rewards = 0.1 + contrasts @ worth + rng.normal(scale=noise, size=400)
        results.append(_decomposition(list(zip(contrasts, rewards)), ["a", "b", "c"]))
        for (name, term), w in zip(results[-1]["terms"].items(), worth):
            assert abs(term["coefficient"] - w) < 3 * term["standard_error"], (name, term)
    assert all(results[1]["terms"][t]["standard_error"] < 0.2 * results[0]["terms"][t]["standard_error"] for t in "abc")
    assert results[1]["explained_variance"] > 0.95 > results[0]["explained_variance"]
    assert _decomposition(list(zip(contrasts[:5], rewards[:5])), ["a", "b", "c"]) is None  # too few rewards


def test_the_fixed_rewards_draws_credit_the_more_amenable_selections():
    """``form="draws"``: the fixed reward as REINFORCE trains on it by default (eight draws of each
    batch's selection, the linearised probes).  On data whose truth is plain, each draw's reward less
    the mean of its step's other draws is larger the more amenable its selection is than the rest of
    the batch (measured: correlation 0.292 over 150 steps, seed 1; seed 0: 0.262), and every draw of
    every step is paired.  Where the same band of noise leaves the label readable, training on the
    "non-amenable" images costs nothing and the credit does not follow them (measured: 0.028, seed 0
    -0.003; corrupted Fashion-MNIST -0.006 and 0.029, ``docs/learning-status.md`` section 55)."""
    signal = selection_signal(
        occluded_dataset(), form="draws", steps=150, seed=1, batch_size=16,
        env_kwargs={"predictor_warmup_steps": 100},
    )
    assert signal["form"] == "draws" and signal["rewards"] == 150 * 8
    assert signal["correlation"] > 0.15, signal
    terms = signal["decomposition"]["terms"]  # measured: amenable images of class 1 +6.888 +- 0.463
    assert terms["amenable, 1"]["coefficient"] > 3 * terms["amenable, 1"]["standard_error"], terms
    harmless = selection_signal(
        occluded_dataset(hide_label=False), form="draws", steps=150, seed=1, batch_size=16,
        env_kwargs={"predictor_warmup_steps": 100},
    )
    assert abs(harmless["correlation"]) < 0.1, harmless
    with pytest.raises(ValueError, match="needs paired_draws >= 2, got 1"):
        selection_signal(
            occluded_dataset(), form="draws", steps=1, env_kwargs={"paired_draws": 1, "paired_class_correction": False}
        )


def test_the_weighted_reward_follows_the_amenability_of_the_validation_selection():
    """``form="weighted"``: on data whose truth is plain, each validation step's reward is larger the more
    amenable the chosen validation images are than the rest (measured: correlation 0.428 over 96 rewards,
    seed 1), and only validation steps are paired (8 of every 16 env steps here)."""
    signal = selection_signal(
        occluded_dataset(), form="weighted", steps=200, seed=1, batch_size=16,
        env_kwargs={"predictor_warmup_steps": 100},
    )
    assert signal["form"] == "weighted" and signal["rewards"] == 12 * 8  # 12 whole episodes of 8 + 8 steps
    assert signal["correlation"] > 0.3, signal


def test_the_fixed_reward_prefers_the_truths_selections_over_a_run():
    """On data whose truth is plain, the fixed reward's quantity (the loss over the clean validation images)
    is lowest for a predictor trained on the amenable images of each batch, higher for as many images at
    random and highest for as many of the least amenable (measured, seed 0, mean over three evaluations:
    0.230, 0.542 and 0.698)."""
    clean_loss = {}
    for rule in ("oracle", "random", "inverse"):
        result = fixed_objective(
            occluded_dataset(), rule=rule, steps=150, eval_every=50, seed=0, batch_size=16,
            env_kwargs={"predictor_warmup_steps": 0},
        )
        assert result["rule"] == rule and [c["updates"] for c in result["curve"]] == [50, 100, 150]
        clean_loss[rule] = np.mean([c["clean_loss"] for c in result["curve"]])
    assert clean_loss["oracle"] + 0.15 < clean_loss["random"] < clean_loss["inverse"] - 0.1, clean_loss


def test_fixed_objective_cli_writes_every_rule(tiny_synthetic_path, tmp_path, capsys):
    out = tmp_path / "objective.json"
    code = main(["--dataset", str(tiny_synthetic_path), "--fixed-objective", "--steps", "4", "--eval-every", "2",
                 "--batch-size", "8", "--env-kwargs", '{"predictor_warmup_steps": 0}', "--json", str(out)])
    assert code == 0
    assert "clean validation loss" in capsys.readouterr().out
    runs = json.loads(out.read_text())["fixed_objective"]
    assert [(r["rule"], r["seed"]) for r in runs] == [("oracle", 0), ("random", 0), ("inverse", 0), ("all", 0)]
    for r in runs:
        assert [c["updates"] for c in r["curve"]] == [2, 4]
        assert set(r["mean"]) == {"clean_loss", "holdout_clean_loss", "holdout_clean_metric", "holdout_metric"}
        assert all(np.isfinite(list(c.values())).all() for c in r["curve"])


def test_fixed_objective_refuses_what_it_cannot_measure(tiny_synthetic_path, capsys):
    with pytest.raises(ValueError, match="rule must be one of"):
        fixed_objective(occluded_dataset(), rule="best", steps=2, eval_every=1)
    unrated = occluded_dataset()
    unrated.human_amenability["classification"][:] = 0
    with pytest.raises(ValueError, match="none of the .* holdout images is"):
        fixed_objective(unrated, steps=2, eval_every=1)
    with pytest.raises(SystemExit):
        main(["--dataset", str(tiny_synthetic_path), "--fixed-objective", "--selection-signal"])
    assert "two measurements" in capsys.readouterr().err


def test_class_ceiling_is_the_auroc_of_one_class_ranked_and_the_rest_at_random():
    """One class ranked perfectly (scores 0/1), the other at random (N(0, 1)): the overall AUROC is, pair by
    pair, 1 within the ranked class, 1/2 within the other, Phi(1) for a ranked amenable image against an
    other non-amenable one and 1/2 for the reverse; the draws' mean matches that."""
    from scipy.stats import norm

    from experiments.reward_ceiling import class_ceiling

    n1, n0, m1, m0 = 30, 20, 200, 100  # ranked class: amenable, not; the other class: amenable, not
    truth = np.r_[np.ones(n1), np.zeros(n0), np.ones(m1), np.zeros(m0)]
    labels = np.r_[np.zeros(n1 + n0, int), np.ones(m1 + m0, int)]
    expected = (n1 * n0 + 0.5 * m1 * m0 + norm.cdf(1.0) * n1 * m0 + 0.5 * m1 * n0) / ((n1 + m1) * (n0 + m0))
    r = class_ceiling(truth, labels, ranked_class=0, noise=0.0, reps=200, seed=0)
    assert r["within"] == 1.0
    assert r["overall"] == pytest.approx(expected, abs=0.005)
    assert r["overall"] < r["best_shift"] < 1.0
    noisy = class_ceiling(truth, labels, ranked_class=0, noise=1.0, reps=200, seed=0)
    assert 0.5 < noisy["within"] < 0.9 and noisy["overall"] < r["overall"]
    for bad, message in [
        ({"ranked_class": 2}, "class 2 must hold some of the images and not all, got 0 of 350"),
        ({"noise": -1.0}, "noise must be >= 0 and reps >= 1, got noise -1.0, reps 50"),
    ]:
        with pytest.raises(ValueError, match=message):
            class_ceiling(truth, labels, **{"ranked_class": 0, "noise": 0.0, **bad})
    with pytest.raises(ValueError, match="truth must be 0/1"):
        class_ceiling(truth * 0.5, labels, 0, 0.0)


def test_class_ceiling_cli_prints_and_writes_every_class_and_noise(tiny_synthetic_path, tmp_path, capsys):
    from experiments.reward_ceiling import CEILING_NOISE

    out = tmp_path / "ceiling.json"
    assert main(["--class-ceiling", "--dataset", str(tiny_synthetic_path), "--reps", "5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["class_ceiling"]
    assert len(rows) == 2 * len(CEILING_NOISE) and {r["class_name"] for r in rows} == {"organ absent", "organ present"}
    for r in rows:
        assert f"  {r['class_name']}, {r['noise']:.2f}: " in printed
    with pytest.raises(SystemExit):
        main(["--class-ceiling", "--fixed-objective"])
    assert "--class-ceiling is a measurement of its own" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="compares the classes of a classification task, got --task segmentation"):
        main(["--class-ceiling", "--task", "segmentation"])
