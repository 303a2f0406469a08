"""Learning on the built-in synthetic ultrasound set, the data the agents issue's targets are about.

``tests/test_learning.py`` shows, in seconds, that each algorithm turns the
env's rewards into a ranking on plain data.  The tests here run on the
built-in set, whose degradations global statistics do not give away (mean
intensity ranks its holdout images at 0.508, intensity st.d. at 0.439, on the
generator's version 2), with
the defaults ``iqa train`` uses.  Each takes minutes on a CPU core, so they are
marked ``slow`` (``pytest -m slow``).

REINFORCE and DDPG each take a controller that starts inverted (holdout
AUROC < 0.5) to >= 0.8.  DDPG's test runs the ratio critic on plain
embeddings (``critic_standardise=False``, the weighted reward's earlier
default): with the current default, embeddings standardised across the batch,
DDPG needs about 1,000 env steps for that (on a GPU, seed 7 went from 0.376 to
0.804), nearly 3 hours on a CPU, where the plain critic's seed 0 passes 0.8 by
step 175 (``docs/learning-status.md``, sections 21, 22 and 24).

One seed per test, fixed, and run as ``experiments/seed_study.py`` runs it
(one torch thread), so that the test repeats a run the seed studies
reported.  How every seed does is the seed studies' job
(``docs/learning-status.md``), not these tests'.
"""

from __future__ import annotations

import pytest
import torch

from experiments.training import TrainConfig, train


def _train(**fields) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(TrainConfig(task="classification", reward="weighted", device="cpu", **fields))
    finally:
        torch.set_num_threads(threads)


def _report(run: str, summary: dict) -> None:
    # The curve's point at the last step is taken before that step's updates; final_auroc after them.
    print(f"{run}: holdout AUROC [step, AUROC] {summary['auroc_curve']}; final {summary['final_auroc']:.3f} "
          f"after {summary['steps']} env steps, scores {summary['final_score_mean']:.3f} "
          f"(sd {summary['final_score_sd']:.3f})")


@pytest.mark.slow
def test_reinforce_learns_the_ranking_on_the_built_in_set():
    # Seed 5 started at 0.317, the lowest of sweep 19's 8 seeds (docs/learning-status.md, section 16). On the
    # built-in set's version 2 (section 48) this run starts at 0.316 and, with REINFORCE's defaults (leave-one-out
    # image baselines on a predictor warmed up for 2,000 updates, section 51), ends at 0.864 after 2,016 env steps
    # (0.853 at 1,000); with the image baselines on 400 warm-up updates at 0.839 (0.835 at 1,000), with neither at
    # 0.839 (0.782 at 1,000); on version 1, on REINFORCE's batches of 16 (section 46), at 0.831 (0.762 at 1,000).
    # With the co-trained classifier on 80 % of each batch and validation-only credit (section 60) it ends at
    # 0.865 (0.879 at 1,000).
    summary = _train(algo="reinforce", seed=5, steps=2000, eval_every=1000)
    _report("reinforce seed 5", summary)
    assert summary["initial_auroc"] < 0.5, summary["auroc_curve"]
    assert summary["final_auroc"] >= 0.8, summary["auroc_curve"]


@pytest.mark.slow
def test_ddpg_learns_the_ranking_on_the_built_in_set():
    # Seed 0 starts at 0.433; with the plain critic a seed study on the CPU had it at 0.826-0.852 at
    # every evaluation from step 175 to 275, and this run ends at 0.847 (docs/learning-status.md,
    # section 24; the GPU run of section 10 had the same 0.539 and 0.829 at steps 100 and 200). On the
    # built-in set's version 2 (section 48) it starts at 0.447 and ends at 0.811 (0.786-0.790 at steps
    # 175-225, 0.847 at 250 before that step's updates): it passes with less room than on version 1.
    summary = _train(
        algo="ddpg",
        seed=0,
        steps=250,
        eval_every=25,
        agent_kwargs={"policy_kwargs": {"critic_standardise": False}},
    )
    _report("ddpg seed 0", summary)
    assert summary["initial_auroc"] < 0.5, summary["auroc_curve"]
    assert summary["final_auroc"] >= 0.8, summary["auroc_curve"]
