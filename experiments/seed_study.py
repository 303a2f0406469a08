r"""Seed study: does the controller learn, seed after seed?  ``python -m experiments.seed_study``.

For each algorithm x reward and each seed it trains one controller with
:func:`experiments.training.train` and prints the holdout AUROC of its scores
against the ground-truth amenability label at initialisation and at the end,
beside the AUROC of simple heuristics (mean intensity, intensity st.d.).
Every seed is reported; none is chosen.  Runs go in parallel processes with
one torch thread each (on 2 cores, two runs at once double the throughput of
one run with two threads).  As each run ends, a line with its initial and
final AUROC goes to stderr and ``--json FILE`` is rewritten with the runs
that have ended, so a study stopped half-way keeps them; the table follows
at the end, with the mean and st.d. of each run's final holdout scores (a
saturated or collapsed controller stands out there).

``--eval-every N`` also prints each run's AUROC every N env steps (a learning
curve says more than two points): on stderr as each evaluation happens
(``  <run>: step N, holdout AUROC x (T s)``) and in the table's curve
column.  ``--time-limit S`` stops every run after S seconds of training,
for studies that must fit a fixed machine time; the table then says how
many steps each run reached.  ``--out DIR`` gives every run a folder in
DIR with checkpoints, and the time limit then *pauses* the runs: each
writes a checkpoint and the table shows where it stands; the same command
again goes on from there (finished runs are read back, not trained again),
so a study longer than one machine session runs in parts, e.g. one time-
limited call per session on a shared GPU, with DIR moved from one machine to
the next.

Each algorithm x reward ends with a tally: how many seeds reach AUROC >=
0.8, and the seeds' final AUROC against their own untrained controllers
(mean +- st.d. across seeds at both ends, and a sign test of how many
ended higher), then the same within each class of images, where the
runs recorded it (a reward that carries one class's quality only shows
there).  ``--summarise FILE [FILE ...]`` trains nothing: it reads
the ``--json`` files of a study run in parts (``--first-seed`` on several
machines or sessions) and prints the table and tallies of them all
together, one group per settings, naming the settings that differ.
The seed studies of
``docs/learning-status.md`` ran as, for example::

    python -m experiments.seed_study --algos reinforce --rewards weighted --seeds 8 \
        --steps 20000 --device cuda --workers 16 --eval-every 500 --time-limit 290
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.commands import json_object, non_negative_int, positive_int
from experiments.training import TrainConfig
from experiments.workers import completed, torch_threads, worker_pool
from iqa_env.checks import is_count


def _run(config: TrainConfig, out: str | None = None) -> dict[str, Any]:
    from experiments.training import show_evaluations, train

    show_evaluations()  # each holdout evaluation as it happens: a DDPG run on a CPU takes half an hour
    with torch_threads(1):
        if out is None:
            return train(config)
        return train(config, Path(out) / config.run_name, pause_at_time_limit=True)


def _within_classes(summary: dict[str, Any]) -> str:
    """``"; within class: <name> a -> b, ...; scores' variance between classes s"``: the run's AUROC
    in each class and ``final_class_share``, each left out where unknown."""
    initial = summary.get("initial_auroc_by_class") or {}
    final = summary.get("final_auroc_by_class") or {}
    share = summary.get("final_class_share")
    between = "" if share is None else f"; scores' variance between classes {share:.2f}"
    if not final:
        return between
    parts = [
        f"{name} {_fmt(initial.get(name)).strip()} -> {_fmt(value).strip()}" for name, value in final.items()
    ]
    return "; within class: " + ", ".join(parts) + between


def study_configs(algos: list[str], rewards: list[str], seeds: list[int], base: TrainConfig) -> list[TrainConfig]:
    """The runs of a study, in the order of its table: every algorithm x reward x seed."""
    return [dataclasses.replace(base, algo=a, reward=r, seed=s) for a in algos for r in rewards for s in seeds]


def seed_study(
    algos: list[str],
    rewards: list[str],
    seeds: list[int],
    base: TrainConfig,
    workers: int = 2,
    on_result: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
    out: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Train every (algo, reward, seed) and return their summaries, in that order.

    ``on_result(summary, finished)`` is called as each run ends (``finished``:
    the summaries so far, in the order they ended), e.g. to show progress and
    keep what is done when a long study is stopped.

    With ``out`` every run has a folder ``out/<run name>`` (checkpoints, and
    once finished the controller, predictor and ``summary.json``), the time
    limit pauses runs instead of finishing them (``"paused": True`` in their
    summaries), and the same call again resumes each run from its checkpoint
    and returns finished runs as they are (:func:`experiments.training.train`).
    """
    if not is_count(workers):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    configs = [config.validate() for config in study_configs(algos, rewards, seeds, base)]
    results: list[dict[str, Any] | None] = [None] * len(configs)
    finished: list[dict[str, Any]] = []
    with worker_pool(workers) as pool:  # spawned workers, which end if the study is stopped
        futures = {
            pool.submit(_run, config, None if out is None else str(out)): i for i, config in enumerate(configs)
        }
        for future in completed(futures):
            summary = future.result()
            results[futures[future]] = summary
            finished.append(summary)
            if on_result is not None:
                on_result(summary, finished)
    return [r for r in results if r is not None]


def _settings_key(summary: dict[str, Any]) -> str:
    """What makes runs comparable seeds of one study: algorithm, reward, task, data and every extra argument.

    The budget (``steps``, the time limit), ``eval_every`` and the device are
    left out: a study split across machines or time limits is still one study,
    and the table shows each run's steps.
    """
    c = summary["config"]
    keep = {k: c.get(k) for k in ("algo", "reward", "task", "split_seed", "env_kwargs", "agent_kwargs")}
    keep["dataset"] = summary.get("dataset_fingerprint", c.get("dataset"))
    return json.dumps(keep, sort_keys=True)


def tally(runs: list[dict[str, Any]]) -> str:
    """One study's seeds in a line: how many reach AUROC >= 0.8, and the end against the start.

    ``"k of n seeds reach AUROC >= 0.8; mean AUROC a +- s at
    initialisation -> b +- t at the end (st.d. across seeds); higher than
    at initialisation on h of n (sign test p P)"``, with a note after the
    first part where runs are paused.  The untrained controller is every
    seed's own reference (:func:`experiments.evaluation.against_initial`).
    """
    reached = sum(s["final_auroc"] is not None and s["final_auroc"] >= 0.8 for s in runs)
    text = f"{reached} of {len(runs)} seeds reach AUROC >= 0.8"
    paused = sum(bool(s.get("paused")) for s in runs)
    if paused:
        text += f" ({paused} paused at the time limit ('p'): the same command goes on)"
    against = _against_initial_text([s["initial_auroc"] for s in runs], [s["final_auroc"] for s in runs])
    return text + (f"; {against}" if against else "")


def class_tallies(runs: list[dict[str, Any]]) -> list[str]:
    """The end against the start within each class (``initial_auroc_by_class`` / ``final_auroc_by_class``).

    One line per class, ``"within C: mean AUROC a +- s at initialisation -> b
    +- t at the end (st.d. across seeds); higher than at initialisation on h
    of n (sign test p P)"``, over the runs that recorded both; none for runs
    written before the by-class figures existed.  A reward that carries the
    quality of one class only shows here (``docs/learning-status.md``,
    section 35).
    """
    names: list[str] = []
    for s in runs:
        for name in (s.get("initial_auroc_by_class") or {}):
            if name not in names:
                names.append(name)
    lines = []
    for name in names:
        pairs = [
            ((s.get("initial_auroc_by_class") or {}).get(name), (s.get("final_auroc_by_class") or {}).get(name))
            for s in runs
        ]
        against = _against_initial_text([a for a, _ in pairs], [b for _, b in pairs])
        if against:
            lines.append(f"within {name}: {against}")
    return lines


def _against_initial_text(initial: list[float | None], final: list[float | None]) -> str:
    """``"mean AUROC a +- s at initialisation -> b +- t at the end (...); higher ... (sign test p P)"``; "" without pairs."""
    from experiments.evaluation import against_initial, seeds_higher_text

    c = against_initial(initial, final)
    if not c["pairs"]:
        return ""

    def both(side: dict[str, Any]) -> str:
        return f"{side['mean']:.3f}" + ("" if side["std"] is None else f" +- {side['std']:.3f}")

    return (
        f"mean AUROC {both(c['initial'])} at initialisation -> {both(c['final'])} at the end"
        f" (st.d. across seeds); higher than at initialisation on {seeds_higher_text(c)}"
    )


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``, to say which settings tell two studies apart (``{}`` sets nothing)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _algo_reward(runs: list[dict[str, Any]]) -> tuple[str, str]:
    return runs[0]["config"]["algo"], runs[0]["config"]["reward"]


def _labels(groups: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """``"algo reward"`` per settings group, with the settings that differ where one algorithm x reward has several."""
    flat = {
        key: {**_flat(runs[0]["config"].get("env_kwargs") or {}, "env"),
              **_flat(runs[0]["config"].get("agent_kwargs") or {}, "agent")}
        for key, runs in groups.items()
    }
    labels = {}
    for key, runs in groups.items():
        label = " ".join(_algo_reward(runs))
        peers = [k for k, r in groups.items() if _algo_reward(r) == _algo_reward(runs)]
        if len(peers) > 1:
            names = sorted({n for k in peers for n in flat[k]})
            def shown_value(k: str, n: str) -> str:
                return json.dumps(flat[k][n], sort_keys=True) if n in flat[k] else "(unset)"

            differ = [n for n in names if len({shown_value(k, n) for k in peers}) > 1]
            shown = ", ".join(f"{n} {shown_value(key, n)}" for n in differ)
            label += f" [{shown or 'same arguments; task, split or data differ'}]"
        labels[key] = label
    return labels


def print_report(summaries: list[dict[str, Any]]) -> None:
    """The study's table (a row per run) and a :func:`tally` per algorithm x reward x settings, on stdout.

    Where one algorithm x reward comes with several settings (studies merged
    by ``--summarise``), each group's rows follow a line naming the settings
    that differ, and so does its tally.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(_settings_key(s), []).append(s)
    labels = _labels(groups)
    several = len({_algo_reward(runs) for runs in groups.values()}) < len(groups)  # one has several settings
    print(
        f"{'algo':10} {'reward':10} {'seed':>4} {'initial':>8} {'final':>8} {'steps':>6} {'steps/s':>8} "
        f"{'score mean (sd)':>16}  curve"
    )
    for key, runs in (groups.items() if several else [("", summaries)]):
        if several:
            print(f"# {labels[key]}")
        for s in runs:
            c = s["config"]
            curve = " ".join(f"{step}:{'-' if a is None else f'{a:.3f}'}" for step, a in s["auroc_curve"])
            print(
                f"{c['algo']:10} {c['reward']:10} {c['seed']:>4} {_fmt(s['initial_auroc'])} {_fmt(s['final_auroc'])} "
                f"{s['steps']:>6}{'p' if s.get('paused') else ' '}{s['steps_per_s']:8.1f} {_spread(s):>16}  {curve}"
            )
    for key, runs in groups.items():
        print(f"{labels[key]}: {tally(runs)}")
        for line in class_tallies(runs):
            print(f"  {line}")


#: What :func:`print_report` reads of each run summary besides its config.
_RUN_FIELDS = ("initial_auroc", "final_auroc", "steps", "steps_per_s", "auroc_curve")


def read_summaries(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs and heuristics of seed-study JSON files (``--json``), for :func:`print_report`.

    A file is a study's ``{"heuristics": ..., "runs": [...]}``, or a JSON
    object whose values are such studies or their lists of runs (several
    kept in one file).  The same seed of the same settings in two places is
    refused: one of the two would be chosen silently.  Raises ``ValueError``
    naming the file and what was expected.
    """
    runs: list[dict[str, Any]] = []
    heuristics: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], str] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable JSON file ({error})") from None
        parts = {k: v for k, v in data.items() if k != "heuristics"} if isinstance(data, dict) else {}
        if isinstance(data, dict) and isinstance(data.get("runs"), list):
            studies = [(path, data)]
        elif parts and all(isinstance(v, list) or (isinstance(v, dict) and isinstance(v.get("runs"), list))
                           for v in parts.values()):
            studies = [
                (f"{path} [{k}]", {"heuristics": data.get("heuristics"), "runs": v} if isinstance(v, list) else v)
                for k, v in parts.items()
            ]
        else:
            raise ValueError(
                f"{path}: expected a seed study's JSON ({{\"heuristics\": ..., \"runs\": [...]}}, as --json writes) "
                "or an object of them (or of their run lists)"
            )
        for where, study in studies:
            if study.get("heuristics") and study["heuristics"] not in heuristics:
                heuristics.append(study["heuristics"])
            for k, run in enumerate(study["runs"]):
                config = run.get("config") if isinstance(run, dict) else None
                if not (isinstance(config, dict) and {"algo", "reward", "seed"} <= set(config)
                        and set(_RUN_FIELDS) <= set(run)):
                    raise ValueError(
                        f"{where}: run {k} is not a seed-study run summary (expected a config with algo, reward "
                        f"and seed, and {', '.join(_RUN_FIELDS)})"
                    )
                key = (_settings_key(run), run["config"]["seed"])
                if key in seen:
                    raise ValueError(
                        f"{where}: {run['config']['algo']} {run['config']['reward']} seed {run['config']['seed']} "
                        f"with the same settings is also in {seen[key]}; keep one"
                    )
                seen[key] = where
                runs.append(run)
    runs.sort(key=lambda r: (_settings_key(r), r["config"]["seed"]))
    return runs, heuristics


def _fmt(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:8.3f}"


def _spread(summary: dict[str, Any]) -> str:
    """The final holdout scores' mean and st.d., e.g. ``0.482 (0.000912)``, to compare across seeds."""
    if "final_score_sd" not in summary:  # summaries written before the field existed
        return "-"
    return f"{summary['final_score_mean']:.3f} ({summary['final_score_sd']:.3g})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=["reinforce", "ddpg"])
    p.add_argument("--rewards", nargs="+", default=["weighted", "fixed", "selective"])
    p.add_argument("--seeds", type=positive_int, default=8, help="number of seeds (default: 8)")
    p.add_argument("--first-seed", type=non_negative_int, default=0,
                   help="seeds FIRST .. FIRST+N-1 (default: 0), to split a study across machines")
    p.add_argument("--steps", type=positive_int, default=4000)
    p.add_argument("--dataset", default=None, help="HDF5 dataset (default: the built-in synthetic set)")
    p.add_argument("--task", default="classification")
    p.add_argument("--workers", type=positive_int, default=2, help="runs at once, one process each (default: 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--env-kwargs", type=json_object, default={},
                   help="JSON object of extra TaskAmenabilityEnv arguments")
    p.add_argument("--agent-kwargs", type=json_object, default={}, help="JSON object of extra algorithm arguments")
    p.add_argument("--eval-every", type=positive_int, default=500, help="env steps between holdout AUROCs (default: 500)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="stop each run after S seconds of training; with --out, pause it there "
                        "(default: none)")
    p.add_argument("--json", default=None,
                   help="also write the summaries to this JSON file (default with --out: DIR/seed_study.json)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="a folder per run, with checkpoints: --time-limit pauses the runs, and the same "
                        "command again goes on from where they stopped (default: none, nothing kept)")
    p.add_argument("--summarise", nargs="+", default=None, metavar="FILE",
                   help="train nothing: print the table and tallies of seed-study JSON files (--json), "
                        "merged, e.g. the parts of a study split across machines with --first-seed")
    args = p.parse_args(argv)
    if args.summarise is not None:
        try:
            summaries, heuristics_seen = read_summaries(args.summarise)
        except ValueError as error:
            p.error(str(error))
        for h in heuristics_seen:
            print("heuristics (holdout AUROC vs ground-truth amenable): "
                  + ", ".join(f"{k} {_fmt(v).strip()}" for k, v in h.items()))
        print_report(summaries)
        return 0
    if args.out is not None and args.json is None:
        args.json = str(Path(args.out) / "seed_study.json")
    base = TrainConfig(
        algo=args.algos[0],  # agent_kwargs are checked against the study's algorithms, not TrainConfig's default
        task=args.task,
        dataset=args.dataset,
        steps=args.steps,
        device=args.device,
        env_kwargs=args.env_kwargs,
        agent_kwargs=args.agent_kwargs,
        eval_every=args.eval_every,
        time_limit_s=args.time_limit,
    )
    try:
        base.validate()
    except (ValueError, FileNotFoundError) as error:
        p.error(str(error))
    from experiments.training import check_agent_builds, holdout_heuristics, load_splits

    _, (train_set, validation_set, holdout) = load_splits(args.dataset)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    # Each algorithm x reward's settings, env and agent once before any run: what only the algorithm or its
    # policy refuses would otherwise end the study in a worker's traceback.
    try:
        for config in study_configs(args.algos, args.rewards, seeds[:1], base):
            check_agent_builds(config.validate(), train_set, validation_set)
    except ValueError as error:
        p.error(str(error))
    heuristics = holdout_heuristics(holdout, args.task)
    print("heuristics (holdout AUROC vs ground-truth amenable): " + ", ".join(f"{k} {v:.3f}" for k, v in heuristics.items()))
    total = len(args.algos) * len(args.rewards) * len(seeds)
    if args.out is not None:
        # Every run folder is checked before any run starts: a clash found hours into a study costs the hours.
        from experiments.training import run_folder_state

        clashes = []
        for config in study_configs(args.algos, args.rewards, seeds, base):
            try:
                run_folder_state(config, Path(args.out) / config.run_name)
            except ValueError as error:
                clashes.append(str(error))
        if clashes:
            p.error("--out " + args.out + ": " + " | ".join(clashes))

    def write_json(summaries: list[dict[str, Any]]) -> None:
        if args.json:
            from iqa_env.files import atomic_write_text

            atomic_write_text(Path(args.json), json.dumps({"heuristics": heuristics, "runs": summaries}, indent=2))

    def progress(summary: dict[str, Any], finished: list[dict[str, Any]]) -> None:
        c = summary["config"]
        print(
            f"[{len(finished)}/{total}] {c['algo']} {c['reward']} seed {c['seed']}: AUROC "
            f"{_fmt(summary['initial_auroc']).strip()} -> {_fmt(summary['final_auroc']).strip()}"
            f"{_within_classes(summary)} ({summary['steps']} steps, {summary['wall_time_s']:.0f} s"
            f"{'; paused, the same command goes on' if summary.get('paused') else ''})",
            file=sys.stderr,
            flush=True,
        )
        write_json(finished)  # a stopped study keeps the runs that ended

    summaries = seed_study(args.algos, args.rewards, seeds, base, args.workers, on_result=progress, out=args.out)
    print_report(summaries)
    write_json(summaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
