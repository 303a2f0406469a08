"""``iqa bench``: the performance benchmark (env overhead, controller latency, RL throughput, memory)."""

from __future__ import annotations

import argparse
import json

from experiments.commands import HelpFormatter, non_negative_int, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure env overhead, controller latency, RL throughput and memory",
        formatter_class=HelpFormatter,
        description=(
            "Measure, side by side in one run: env steps/s with random actions and their overhead over "
            "the bare torch compute a step must do; the controller's single-frame latency (median, p99) "
            "and batch throughput; env steps/s inside learn() for DDPG and REINFORCE; peak resident "
            "memory and replay-buffer bytes per transition; the torch thread count and device. Prints "
            "a table with each figure's target, then the JSON record (only the JSON with --json).\n\n"
            "Timings are noisy on a shared machine: every figure is a median over repeats, with warm-up "
            "first. --quick runs a tiny budget that only shows everything works.\n\n"
            "Examples:\n\n"
            "  iqa bench\n"
            "  iqa bench --task classification --threads 1 --json --out bench.json\n"
            "  iqa bench --device cuda"
        ),
    )
    p.add_argument(
        "--task", choices=("classification", "segmentation", "both"), default="both", help="task predictor(s) to time"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--quick", action="store_true", help="tiny budget: checks that everything runs, rough figures")
    p.add_argument("--json", action="store_true", help="print only the JSON record")
    p.add_argument("--out", default=None, help="also write the JSON record to this file")
    p.add_argument("--dataset", default=None, help="HDF5 dataset (default: the built-in synthetic set)")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's own choice)"
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the envs, agents and random actions")
    p.add_argument(
        "--reproduce-results",
        default=None,
        metavar="RESULTS_JSON",
        help="results.json of an `iqa reproduce --quick` run: its wall time goes into the record",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.bench import format_table, main

    record = main(args)
    text = json.dumps(record, indent=2)
    if args.json:
        print(text)
    else:
        print(format_table(record))
        print()
        print(text)
    return 0
