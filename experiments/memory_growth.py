"""Resident memory over a long run: does one process stepping the env grow?

Steps ``TaskAmenability-v0`` (the ``iqa train`` env: patient-level split,
``TrainConfig`` defaults) ``--steps`` times in one process, with uniform random
actions (or inside ``REINFORCE.learn`` with ``--algo reinforce``), and records
the resident set size every ``--every`` steps after ``--warmup`` steps.  It
prints a table and the growth after warm-up::

    python -m experiments.memory_growth --steps 10000
    python -m experiments.memory_growth --steps 2000 --algo reinforce

Resident memory is read from ``/proc/self/statm`` (Linux); elsewhere it falls
back to ``resource.getrusage``'s peak RSS.  Each sample is taken after
``gc.collect()``, so uncollected cycles do not count as growth.  Not a timed
test: docs/reliability.md keeps the measured figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any

import numpy as np

from experiments.commands import non_negative_int, positive_int
from iqa_env.checks import is_integer


def resident_bytes() -> tuple[int, str]:
    """``(bytes, source)``: the current resident set size, or the peak one where that is all there is."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE"), "statm"
    except (OSError, ValueError, IndexError, AttributeError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * (1 if sys.platform == "darwin" else 1024), "getrusage-peak"


def measurement_config(
    steps: int,
    warmup: int,
    every: int,
    algo: str,
    dataset: str | None,
    task: str,
    reward: str,
    batch_size: int,
    train_steps: int,
    validation_size: int | None,
    seed: int,
    device: str,
) -> Any:
    """The :class:`~experiments.training.TrainConfig` a measurement steps, checked; ``ValueError`` names what is wrong."""
    from experiments.training import TrainConfig

    if algo not in ("random", "reinforce"):
        raise ValueError(f"algo must be 'random' or 'reinforce', got {algo!r}")
    if not all(is_integer(v) for v in (steps, warmup, every)) or not (0 <= warmup < steps) or every < 1:
        raise ValueError(
            f"need whole numbers 0 <= warmup < steps and every >= 1, got warmup={warmup!r}, steps={steps!r}, "
            f"every={every!r}"
        )
    return TrainConfig(
        algo="reinforce",
        task=task,
        reward=reward,
        dataset=dataset,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        train_steps=train_steps,
        validation_size=validation_size,
        device=device,
    ).validate()


def measure(
    steps: int = 10_000,
    warmup: int = 1_000,
    every: int = 500,
    algo: str = "random",
    dataset: str | None = None,
    task: str = "classification",
    reward: str = "weighted",
    batch_size: int = 32,
    train_steps: int = 8,
    validation_size: int | None = 256,
    seed: int = 0,
    device: str = "cpu",
    log: Any = None,
) -> dict[str, Any]:
    """Step the env ``steps`` times and sample resident memory; returns the samples and the growth.

    Samples are taken at ``warmup`` and then every ``every`` steps up to
    ``steps``; ``growth_pct`` compares the last sample with the first (at the
    end of the warm-up), ``max_growth_pct`` the largest with the first.
    """
    from experiments.training import load_splits, make_env

    config = measurement_config(
        steps, warmup, every, algo, dataset, task, reward, batch_size, train_steps, validation_size, seed, device
    )
    _, (train_set, validation_set, _holdout) = load_splits(config.dataset, config.split_seed)
    env = make_env(config, train_set, validation_set)
    marks = list(range(warmup, steps, every)) + [steps]
    samples: list[dict[str, float]] = []
    source = ""

    def sample(step: int) -> None:
        nonlocal source
        gc.collect()
        rss, source = resident_bytes()
        samples.append({"step": step, "rss_mib": rss / 2**20})
        if log is not None:
            print(f"{step:>8d}  {rss / 2**20:10.1f}", file=log, flush=True)

    if log is not None:
        print(f"{'step':>8s}  {'rss MiB':>10s}", file=log, flush=True)
    start = time.perf_counter()
    if algo == "random":
        env.reset(seed=seed)
        env.action_space.seed(seed)
        pending = list(marks)
        for step in range(1, steps + 1):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
            if pending and step == pending[0]:
                sample(step)
                pending.pop(0)
    else:
        from stable_baselines3.common.callbacks import BaseCallback

        from agents import make_agent

        agent = make_agent("reinforce", env, seed=seed)  # learn() makes the seeded reset
        pending = list(marks)

        class Sample(BaseCallback):
            def _on_step(self) -> bool:
                if pending and self.num_timesteps >= pending[0]:
                    sample(int(self.num_timesteps))
                    pending.pop(0)
                return True

        agent.learn(steps, callback=Sample())
        if pending:  # REINFORCE rounds up to whole rollouts; the last mark may fall inside the last one
            sample(int(agent.num_timesteps))
    wall = time.perf_counter() - start
    env.close()
    rss = np.array([s["rss_mib"] for s in samples])
    base = float(rss[0])
    return {
        "algo": algo,
        "task": task,
        "steps": steps,
        "warmup": warmup,
        "every": every,
        "batch_size": batch_size,
        "rss_source": source,
        "samples": samples,
        "baseline_mib": base,
        "final_mib": float(rss[-1]),
        "max_mib": float(rss.max()),
        "growth_pct": float((rss[-1] - base) / base * 100.0),
        "max_growth_pct": float((rss.max() - base) / base * 100.0),
        "wall_time_s": wall,
        "steps_per_s": steps / max(wall, 1e-9),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.memory_growth",
        description="Resident memory of one process stepping TaskAmenability-v0 for a long run.",
    )
    p.add_argument("--steps", type=positive_int, default=10_000, help="env steps in all")
    p.add_argument("--warmup", type=non_negative_int, default=1_000, help="steps before the first (baseline) sample")
    p.add_argument("--every", type=positive_int, default=500, help="steps between samples after the warm-up")
    p.add_argument("--algo", choices=("random", "reinforce"), default="random",
                   help="random actions, or the steps inside REINFORCE.learn")
    p.add_argument("--dataset", default=None, help="HDF5 dataset (default: the built-in synthetic set)")
    p.add_argument("--task", default="classification", help="classification or segmentation")
    p.add_argument("--reward", default="weighted", help="fixed, weighted or selective")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per env step")
    p.add_argument("--train-steps", type=positive_int, default=8, help="predictor training steps per episode")
    p.add_argument("--validation-size", type=non_negative_int, default=256, help="validation images per reward (0: all)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)
    try:  # before the data is loaded and the minutes of stepping
        measurement_config(
            args.steps, args.warmup, args.every, args.algo, args.dataset, args.task, args.reward, args.batch_size,
            args.train_steps, args.validation_size or None, args.seed, args.device,
        )
    except (ValueError, FileNotFoundError) as error:
        p.error(str(error))
    result = measure(
        steps=args.steps,
        warmup=args.warmup,
        every=args.every,
        algo=args.algo,
        dataset=args.dataset,
        task=args.task,
        reward=args.reward,
        batch_size=args.batch_size,
        train_steps=args.train_steps,
        validation_size=args.validation_size or None,
        seed=args.seed,
        device=args.device,
        log=sys.stdout,
    )
    print(
        f"growth after warm-up ({result['warmup']} steps): {result['growth_pct']:+.2f} % "
        f"({result['baseline_mib']:.1f} -> {result['final_mib']:.1f} MiB at step {result['samples'][-1]['step']}; "
        f"max {result['max_mib']:.1f} MiB, {result['max_growth_pct']:+.2f} %); "
        f"{result['steps']} steps of {result['algo']} in {result['wall_time_s']:.0f} s "
        f"({result['steps_per_s']:.1f} steps/s), RSS from {result['rss_source']}"
    )
    if args.json:
        from iqa_env.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
