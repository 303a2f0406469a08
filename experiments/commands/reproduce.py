"""``iqa reproduce``: the paper's experiment end to end (Table 1, Figures 3 and 4, AUROC against the truth)."""

from __future__ import annotations

import argparse
import os

from experiments.commands import HelpFormatter, add_mirror_argument, json_object, positive_int


def default_workers() -> int:
    """Two stages at once where there are two cores: each runs one torch thread."""
    return max(1, min(2, os.cpu_count() or 1))


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``iqa reproduce`` and ``iqa benchmark-algorithms`` share."""
    p.add_argument("--dataset", default=None, help="HDF5 dataset (default: the built-in synthetic ultrasound set)")
    p.add_argument("--quick", action="store_true", help="reduced budget (experiments.reproduce.QUICK) instead of the full one")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds 0 .. N-1 (default: the budget's)")
    p.add_argument("--steps", type=positive_int, default=None, help="env steps per training run (default: the budget's)")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=default_workers(),
        help="stages run in this many processes at once, each stage on one torch thread whatever this is, "
        "so that a seed's figures do not depend on it",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--out", required=True, help="output folder (created; rerun with the same folder to resume)")


def add_kwargs_arguments(p: argparse.ArgumentParser) -> None:
    """``--env-kwargs`` and ``--agent-kwargs``, of ``iqa reproduce`` and ``iqa benchmark-algorithms``."""
    p.add_argument(
        "--env-kwargs",
        type=json_object,
        default=None,
        help='JSON object of TaskAmenabilityEnv arguments over the recommended ones, e.g. \'{"validation_size": 300}\'',
    )
    p.add_argument(
        "--agent-kwargs",
        type=json_object,
        default=None,
        help='JSON object of algorithm arguments over its defaults (every trained run), e.g. \'{"learning_rate": 3e-4}\'',
    )
    add_mirror_argument(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="reproduce the paper: Table 1, Figures 3 and 4, AUROC against the ground truth",
        formatter_class=HelpFormatter,
        description=(
            "Reproduce Saeed et al. (IPMI 2021) end to end. For each task and seed: the non-selective "
            "baseline predictor (same network, all training data, one predictor update per env step: as many as "
            "the fixed reward's run makes, three times the weighted and selective runs' with REINFORCE's "
            "defaults), then a controller "
            "and predictor trained with each reward (fixed, weighted, selective), each evaluated on the "
            "holdout patients: the metric after rejecting the lowest-scored 0-30 % (mean ± st.d. across "
            "patients), a paired t-test against the baseline, the 2x2 table and Cohen's kappa against the "
            "human labels, and the AUROC of the controller against the ground-truth amenability beside simple "
            "heuristics and the human labels.\n\n"
            "Writes OUT/results.json (every figure, the settings and seeds), OUT/report.md (Table 1 as in "
            "the paper, the figures, every seed), PNG figures, and per stage the controller, predictor and "
            "TensorBoard logs. Every finished stage is kept: run the same command again to resume an "
            "interrupted run. See docs/reproduce.md.\n\n"
            "Examples:\n\n"
            "  iqa reproduce --quick --task classification --out runs/reproduce-quick\n"
            "  iqa reproduce --task both --seeds 8 --out runs/reproduce\n"
            "  iqa reproduce --rewards weighted selective --seeds 4 --steps 4000 --out runs/reproduce-long\n"
            "  iqa reproduce --dataset fm.h5 --quick --out runs/reproduce-fm"
        ),
    )
    from agents.factory import ALGORITHMS

    p.add_argument(
        "--task", choices=("classification", "segmentation", "both"), default="classification", help="target task(s)"
    )
    from experiments.reproduce import REWARDS

    p.add_argument(
        "--rewards",
        nargs="+",
        choices=REWARDS,
        default=None,
        metavar="REWARD",
        help=f"the rewards to train, any of {', '.join(REWARDS)} (default: all three, Table 1's rows); "
        "rerun into the same --out with more of them to add their stages",
    )
    p.add_argument("--algo", choices=ALGORITHMS, default=None, help="RL algorithm (default: TrainConfig's, reinforce)")
    add_budget_arguments(p)
    add_kwargs_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.reproduce import (
        REFERENCES,
        against_initial_text,
        each_scorer,
        format_number,
        format_stats,
        margin_text,
        reproduce,
        tie_break_text,
        with_confidence_text,
    )

    results = reproduce(
        args.out,
        dataset=args.dataset,
        tasks=args.task,
        quick=args.quick,
        seeds=args.seeds,
        algo=args.algo,
        steps=args.steps,
        workers=args.workers,
        device=args.device,
        env_kwargs=args.env_kwargs,
        agent_kwargs=args.agent_kwargs,
        rewards=args.rewards,
        mirror_average=args.mirror_average,
    )
    for task, t in results["tasks"].items():
        print(f"{task} ({t['metric']} at {t['paper_rejection_ratio']:.0%} rejection, mean ± st.d. across seeds):")
        for row in t["table1"]:
            text = format_stats({"mean": row["metric_mean"], "std": row["metric_std_across_seeds"]})
            p = row["p_value_median"]
            line = f"  {row['method']:10} {text}" + ("" if p is None else f"  (median p {p:.3g})")
            if row["method"] in t["runs"]:
                s = t["runs"][row["method"]]["summary"]
                base, base_p = s["baseline_predictor_at_paper_ratio"]["mean"], s["baseline_predictor_p_value"]["median"]
                if base is not None:
                    line += f"; baseline predictor on the images it keeps: {format_number(base)}"
                    line += "" if base_p is None else f" (median p {base_p:.3g})"
            print(line)
        # The references, then the untrained controller(s) the runs started from.
        for _, text, r in each_scorer(t, lambda r: r if r["at_paper_ratio"]["mean"] is not None else None, lambda s: None):
            p = r["p_value"]["median"]
            print(f"  baseline predictor rejecting by {text}: {format_stats(r['at_paper_ratio'])}"
                  + ("" if p is None else f" (median p {p:.3g})"))
            ties = tie_break_text(r)
            if ties is not None:
                print(f"    ({ties})")
        print_by_ratio(t, REFERENCES)
        print_against_untrained(t)
        print_rejected(t, REFERENCES)
        if any(entry["summary"]["final_auroc"]["n"] for entry in t["runs"].values()):
            print("  controller AUROC against the ground truth, at initialisation -> at the end "
                  "(mean ± st.d. across seeds):")
            for label, entry in t["runs"].items():
                s = entry["summary"]
                print(f"    {label:10} {format_stats(s['initial_auroc'])} -> {format_stats(s['final_auroc'])}; "
                      f"seeds higher than at initialisation: {against_initial_text(s)}; "
                      f"beating every heuristic: {s['seeds_beating_heuristics']} of {s['final_auroc']['n']} "
                      f"(AUROC minus the best heuristic's, same seed: {margin_text(s)})")
                if s.get("with_confidence"):
                    print(f"      its ranks averaged with the baseline predictor's confidence: {with_confidence_text(s['with_confidence'])}")
            print("    heuristics: " + ", ".join(f"{name} {format_stats(h['auroc'])}" for name, h in t["heuristics"].items()))
    print(f"report: {args.out}/report.md, figures and results.json in {args.out}")
    return 0


def print_rejected(task_result: dict, references: tuple) -> None:
    """The baseline predictor's metric on the images each reference and each controller rejects at the
    paper's ratio (the report's "What each rejects" table, its first column): a score that finds the
    predictor's failures rejects images of a low metric."""
    from experiments.reproduce import each_scorer, format_number

    rows = each_scorer(task_result, lambda r: r.get("rejected"), lambda s: s.get("baseline_predictor_rejected"),
                       references, short=True)
    parts = [f"{label} {format_number(rejected['metric_rejected']['mean'])}" for _, label, rejected in rows]
    if rows:  # every row's metric_all is the same baseline predictors' on every image, as in the report's table
        overall = rows[0][2]["metric_all"]["mean"]
        print(f"  baseline predictor's {task_result['metric']} on the images each rejects at "
              f"{task_result['paper_rejection_ratio']:.0%} (on all: {format_number(overall)}): " + "; ".join(parts))


def print_against_untrained(task_result: dict) -> None:
    """The baseline predictor on what each controller keeps at the paper's ratio against on what its untrained
    start keeps, patient by patient: what the training added (none where the stages lack the untrained scores)."""
    from experiments.reproduce import format_number, format_stats

    parts = []
    for label, entry in task_result["runs"].items():
        a = entry["summary"].get("baseline_predictor_against_untrained")
        if a and a["mean_difference"]["mean"] is not None:
            parts.append(
                f"{label} {format_stats(a['mean_difference'], signed=True)} (median p {format_number(a['p_value']['median'], 3)}; "
                f"better with p < 0.05 on {a['seeds_better_with_p_below_0.05']} of {a['mean_difference']['n']}, "
                f"worse on {a['seeds_worse_with_p_below_0.05']})"
            )
    if parts:
        print(f"  baseline predictor on the images each controller keeps at {task_result['paper_rejection_ratio']:.0%}, "
              "against on those its untrained start keeps: " + "; ".join(parts))


def print_by_ratio(task_result: dict, references: tuple) -> None:
    """The baseline predictor's seeds better with p < 0.05 at every ratio, rejecting by each reference and
    each controller (the report's "At every rejection ratio" table, in counts)."""
    from experiments.reproduce import each_scorer

    rows = [
        (label, by_ratio)
        for _, label, by_ratio in each_scorer(
            task_result, lambda r: r.get("by_ratio"), lambda s: (s.get("by_ratio") or {}).get("baseline_predictor"),
            references, short=True,
        )
    ]
    if not rows:
        return
    ratios = [r["ratio"] for r in rows[0][1] if r["ratio"] > 0]
    width = max(len(name) for name, _ in rows)
    print("  baseline predictor rejecting by each, seeds better than no rejection with p < 0.05 at "
          + " ".join(f"{r:.0%}" for r in ratios) + ":")
    for name, by_ratio in rows:
        counts = [str(r["seeds_better_with_p_below_0.05"]) for r in by_ratio if r["ratio"] > 0]
        print(f"    {name:{width}} " + " ".join(f"{c:>{len(f'{r:.0%}')}}" for c, r in zip(counts, ratios))
              + f"  of {by_ratio[0]['seeds']}")
