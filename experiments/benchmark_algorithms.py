"""Benchmark RL algorithms on one env: ``iqa benchmark-algorithms`` (or ``python -m experiments.benchmark_algorithms``).

DDPG, REINFORCE, PPO, A2C, SAC and TD3 (or the ones asked for) are trained
with :func:`experiments.training.train` on the same env, reward, step budget
and seeds, beside the non-selective baseline predictor of each seed.  Each
run is evaluated on the holdout patients exactly as ``iqa reproduce`` does
(:func:`experiments.reproduce.summarise_run`): the task metric at the paper's
rejection ratio with a paired t-test against the baseline, and the AUROC of
the controller against the ground-truth amenability at initialisation and at
the end.  Stages resume as in ``iqa reproduce``.

Outputs in ``out``: ``results.json`` (every figure; the same layout as
``iqa reproduce``'s, with one run label per algorithm), ``report.md`` (the
table, every seed, the settings), ``learning_curves_<task>.png`` (holdout
AUROC against env steps) and ``rejection_<task>.png`` (metric against
rejection ratio).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import reproduce as rp

logger = logging.getLogger(__name__)

SCHEMA = "iqa-benchmark-algorithms/1"


def benchmark_algorithms(
    out: str | os.PathLike[str],
    algos: Sequence[str] | None = None,
    dataset: str | os.PathLike[str] | None = None,
    tasks: str | Sequence[str] = ("classification",),
    reward: str | None = None,
    quick: bool = False,
    seeds: int | None = None,
    steps: int | None = None,
    workers: int = 1,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
    random_draws: int = rp.RANDOM_DRAWS,
    env_kwargs: dict[str, Any] | None = None,
    agent_kwargs: dict[str, Any] | None = None,
    mirror_average: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every algorithm of ``algos`` for every seed; returns what ``results.json`` holds.

    :param out: output folder; a folder holding a benchmark with the same settings is resumed
    :param algos: algorithms (default: all of :data:`agents.ALGORITHMS`)
    :param reward: the reward every algorithm is trained with (default: TrainConfig's)
    :param steps: env steps per run, the same for every algorithm (default: the budget's)
    :param env_kwargs: ``TaskAmenabilityEnv`` arguments over each algorithm's recommended ones, for every run
    :param agent_kwargs: arguments over each algorithm's defaults, for every run: each algorithm must take
        them (checked for every algorithm before any file is written)

    The other parameters are those of :func:`experiments.reproduce.reproduce`.
    """
    from agents import ALGORITHMS

    algo_names = tuple(dict.fromkeys(algos or ALGORITHMS))
    for algo in algo_names:
        if algo not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algo!r}")
    task_names = rp.check_tasks(tasks)
    fields = rp.with_kwargs(overrides, env_kwargs, agent_kwargs, mirror_average)
    if reward is not None:
        fields["reward"] = reward
    # The base is checked against the first algorithm (each run's algorithm replaces it, and is checked
    # before any file): agent_kwargs that only DDPG takes are not a reinforce setting refused.
    base, default_seeds = rp.budget_config(quick, dataset, algo_names[0], steps, device, fields)
    seed_list = rp.check_seeds(default_seeds if seeds is None else seeds)
    options = {
        "algos": list(algo_names) if algos else None,
        "dataset": dataset,
        "task": "both" if len(task_names) == 2 else task_names[0],
        "reward": reward,
        "quick": quick,
        "seeds": seeds,
        "steps": steps,
        "env_kwargs": env_kwargs or None,
        "agent_kwargs": agent_kwargs or None,
        "mirror_average": mirror_average,
    }
    runs = [{"label": a, "algo": a} for a in algo_names]
    folder, results = rp.run_experiment(
        "benchmark-algorithms", out, base, task_names, seed_list, runs, ("task", "algo", "seed"), options, overrides,
        workers, random_draws, quick=quick, algorithms=list(algo_names),
    )
    results["schema"] = SCHEMA
    for task, task_result in results["tasks"].items():
        task_result["table"] = benchmark_table(task_result)
        task_result["figures"] = {
            "learning_curves": f"learning_curves_{task}.png",
            "rejection": f"rejection_{task}.png",
        }
        plot_learning_curves(task_result, folder / task_result["figures"]["learning_curves"])
        rp.plot_rejection(task_result, folder / task_result["figures"]["rejection"])
    write_report(results, folder)
    rp.write_results(results, folder)
    logger.info("wrote %s and %s", folder / "results.json", folder / "report.md")
    return results


def benchmark_table(task_result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per algorithm: metric at the paper's ratio, p-values, AUROC at start and end, wall time."""
    rows = []
    for algo, entry in task_result["runs"].items():
        s = entry["summary"]
        rates = [r["steps"] / r["wall_time_s"] for r in entry["runs"] if r.get("wall_time_s")]
        rows.append(
            {
                "algorithm": algo,
                "metric_mean": s["metric_at_paper_ratio"]["mean"],
                "metric_std_across_seeds": s["metric_at_paper_ratio"]["std"],
                "p_value_median": s["p_value"]["median"],
                "seeds_better_with_p_below_0.05": s["seeds_better_with_p_below_0.05"],
                "initial_auroc": s["initial_auroc"],
                "final_auroc": s["final_auroc"],
                "seeds_higher_than_initial": rp.against_initial_text(s),
                "seeds_beating_heuristics": s["seeds_beating_heuristics"],
                "wall_time_s": s["wall_time_s"],
                "env_steps_per_s": rp.mean_and_std(rates),
                "seeds": s["metric_at_paper_ratio"]["n"],
            }
        )
    return rows


def plot_learning_curves(task_result: dict[str, Any], path: Path) -> Path:
    """Holdout AUROC of the controller against env steps: thin lines per seed, the mean over seeds bold."""
    fig = rp.new_figure(6.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for i, (algo, entry) in enumerate(task_result["runs"].items()):
        color = [f"C{k}" for k in range(10) if k != 3][i % 9]  # C3 is the heuristics' colour
        curves = []
        for run in entry["runs"]:
            points = np.array([(s, a) for s, a in run["auroc_curve"] if a is not None], dtype=np.float64).reshape(-1, 2)
            if len(points):
                ax.plot(points[:, 0], points[:, 1], color=color, lw=0.6, alpha=0.5)
                curves.append(points)
        if curves:
            grid = curves[0][:, 0]
            mean = np.mean([np.interp(grid, c[:, 0], c[:, 1]) for c in curves], axis=0)
            ax.plot(grid, mean, color=color, lw=2, label=f"{algo} (mean of {len(curves)} seeds)")
    rp.draw_heuristics(ax, task_result)
    ax.axhline(0.5, color="black", lw=0.5)
    ax.set_ylim(0, 1)
    ax.set_xlabel("env steps")
    ax.set_ylabel("holdout AUROC vs ground-truth amenable")
    ax.legend(fontsize=7, loc="lower right")
    return rp.save_figure(fig, path)


def write_report(results: dict[str, Any], out: Path) -> Path:
    """``report.md``: one row per algorithm, the figures, every seed, the settings."""
    s = results["settings"]
    fmt, pm = rp.format_number, rp.format_stats
    lines = [
        "# RL algorithms on TaskAmenability-v0",
        "",
        f"Made by `{results['command']}` on {results['created']}.",
        "",
        (f"Data: {s['dataset'] or 'the built-in synthetic ultrasound set'} ({s['dataset_fingerprint']}); reward "
        f"{s['config']['reward']}; {s['config']['steps']} env steps per run; seeds {s['seeds']}. Every seed is "
        "reported; figures are means ± st.d. across seeds."),
        "",
    ]
    for task, t in results["tasks"].items():
        metric, ratio = t["metric"], t["paper_rejection_ratio"]
        base = t["baseline"]["summary"]["metric"]
        lines += [
            f"## {task.capitalize()}",
            "",
            (f"Holdout {metric} after rejecting the {ratio:.0%} lowest-scored images (mean over patients; the "
            f"non-selective baseline, all images: {pm(base)}); p: paired t-test across patients against the "
            "baseline of the same seed; AUROC of the controller's holdout scores against the ground-truth "
            "amenable label."),
            "",
            (f"| algorithm | {metric} at {ratio:.0%} | p (median) | seeds better with p < 0.05 | AUROC initial "
            "| AUROC final | seeds with AUROC higher than at initialisation (sign test p) "
            "| seeds beating every heuristic | wall time (s) | env steps/s |"),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in t["table"]:
            stats = {"mean": row["metric_mean"], "std": row["metric_std_across_seeds"]}
            rate = row["env_steps_per_s"]  # off-policy algorithms on a CPU: well under one step a second
            lines.append(
                f"| {row['algorithm']} | {pm(stats)} | {fmt(row['p_value_median'], 4)} "
                f"| {row['seeds_better_with_p_below_0.05']} of {row['seeds']} | {pm(row['initial_auroc'])} "
                f"| {pm(row['final_auroc'])} | {row['seeds_higher_than_initial']} "
                f"| {row['seeds_beating_heuristics']} of {row['seeds']} "
                f"| {pm(row['wall_time_s'], 0)} | {pm(rate, 1 if (rate['mean'] or 0) >= 1 else 3)} |"
            )
        heuristics = ", ".join(f"{n} {pm(h['auroc'])} (either sign {pm(h['auroc_either_sign'])})" for n, h in t["heuristics"].items())
        lines += [
            "",
            f"Heuristics' AUROC: {heuristics or 'n/a (no ground truth)'}.",
            "",
            f"![learning curves]({t['figures']['learning_curves']})",
            "",
            f"![rejection]({t['figures']['rejection']})",
            "",
            "### Every seed",
            "",
            *rp.per_seed_markdown(t),
            "",
        ]
    return rp.write_markdown(out, lines, s)


def main(argv: Sequence[str] | None = None) -> int:
    """``iqa benchmark-algorithms ARGV``: the same parser, and the same one-line errors."""
    from experiments.cli import main as iqa_main

    return iqa_main(["benchmark-algorithms", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
