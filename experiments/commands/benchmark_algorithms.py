"""``iqa benchmark-algorithms``: DDPG, REINFORCE, PPO, A2C, SAC and TD3 on the same env, reward, budget and seeds."""

from __future__ import annotations

import argparse

from experiments.commands import HelpFormatter
from experiments.commands.reproduce import add_budget_arguments, add_kwargs_arguments

DESCRIPTION = (
    "Train a controller with each RL algorithm on the same env, reward, step budget and seeds (with "
    "experiments.training.train), beside the non-selective baseline predictor of each seed, and evaluate "
    "every run on the holdout patients as `iqa reproduce` does: the task metric at the paper's rejection "
    "ratio (5 % classification, 15 % segmentation) with a paired t-test against the baseline, the "
    "controller's AUROC against the ground-truth amenability at initialisation and at the end, and the wall "
    "time.\n\n"
    "Writes OUT/results.json, OUT/report.md (the table and every seed), OUT/learning_curves_TASK.png "
    "(holdout AUROC against env steps) and OUT/rejection_TASK.png; finished runs are kept, so the same "
    "command resumes an interrupted benchmark. Also runs as `python -m experiments.benchmark_algorithms`.\n\n"
    "Examples:\n\n"
    "  iqa benchmark-algorithms --quick --out runs/algos\n"
    "  iqa benchmark-algorithms --algos ddpg reinforce ppo --seeds 4 --steps 2000 --out runs/algos\n"
    "  iqa benchmark-algorithms --algos ppo a2c --agent-kwargs '{\"learning_rate\": 3e-4}' --out runs/algos-lr"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agents.factory import ALGORITHMS
    from iqa_env.rewards import REWARD_NAMES

    p.add_argument(
        "--algos", nargs="+", choices=ALGORITHMS, default=None, metavar="ALGO",
        help=f"algorithms to compare, of {', '.join(ALGORITHMS)} (default: all)",
    )
    p.add_argument(
        "--task", choices=("classification", "segmentation", "both"), default="classification", help="target task(s)"
    )
    p.add_argument("--reward", choices=REWARD_NAMES, default=None, help="reward of every run (default: TrainConfig's, weighted)")
    add_budget_arguments(p)
    add_kwargs_arguments(p)
    p.set_defaults(func=run)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "benchmark-algorithms",
        help="compare the RL algorithms on the same env, reward, budget and seeds",
        formatter_class=HelpFormatter,
        description=DESCRIPTION,
    )
    add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from experiments.benchmark_algorithms import benchmark_algorithms
    from experiments.reproduce import format_number

    results = benchmark_algorithms(
        args.out,
        algos=args.algos,
        dataset=args.dataset,
        tasks=args.task,
        reward=args.reward,
        quick=args.quick,
        seeds=args.seeds,
        steps=args.steps,
        workers=args.workers,
        device=args.device,
        env_kwargs=args.env_kwargs,
        agent_kwargs=args.agent_kwargs,
        mirror_average=args.mirror_average,
    )
    for task, t in results["tasks"].items():
        print(f"{task}: {t['metric']} at {t['paper_rejection_ratio']:.0%} rejection, holdout AUROC initial -> final")
        for row in t["table"]:
            print(
                f"  {row['algorithm']:10} {format_number(row['metric_mean'])}  "
                f"AUROC {format_number(row['initial_auroc']['mean'])} -> {format_number(row['final_auroc']['mean'])} "
                f"(higher on {row['seeds_higher_than_initial']})  {row['wall_time_s']['mean'] or 0:.0f} s"
            )
    print(f"report: {args.out}/report.md")
    return 0
