"""``iqa train``: train a controller (and its task predictor) with one RL algorithm."""

from __future__ import annotations

import argparse
import json

from experiments.commands import HelpFormatter, add_mirror_argument, json_object, non_negative_int, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a controller with an RL algorithm",
        formatter_class=HelpFormatter,
        description=(
            "Train a task-amenability controller on TaskAmenability-v0 and save, in the run folder: "
            "config.json, the controller (controller/, for `iqa score`), the task predictor "
            "(predictor.pt), summary.json (holdout AUROC of the controller against ground-truth "
            "amenability at initialisation and at the end) and TensorBoard logs (tensorboard/).\n\n"
            "Interrupted runs resume: every --checkpoint-every env steps the run is checkpointed "
            "(checkpoint/, written atomically), and the same command on the same --out goes on from "
            "the last checkpoint; on a finished run it does nothing. Other settings on the same --out "
            "are an error unless --overwrite (see docs/reliability.md).\n\n"
            "Example:\n\n"
            "  iqa train --algo reinforce --task classification --reward weighted --steps 4000 --out runs/r1"
        ),
    )
    from agents.factory import ALGORITHMS
    from iqa_env.rewards import REWARD_NAMES
    from iqa_env.tasks import TASK_NAMES

    p.add_argument("--algo", choices=ALGORITHMS, default="reinforce", help="RL algorithm")
    p.add_argument("--task", choices=TASK_NAMES, default="classification", help="target task")
    p.add_argument("--reward", choices=REWARD_NAMES, default="weighted", help="validation reward")
    p.add_argument("--dataset", default=None, help="HDF5 dataset (default: the built-in synthetic ultrasound set)")
    p.add_argument(
        "--steps",
        type=int,
        default=4000,
        help="env steps to train for (at least: REINFORCE, PPO and A2C finish the rollout they are in)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the agent and the env")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per env step (default: the algorithm's recommended number, 16 for REINFORCE, else 32)",
    )
    p.add_argument("--train-steps", type=int, default=8, help="predictor training steps per episode")
    p.add_argument(
        "--validation-size",
        type=non_negative_int,
        default=None,
        help="validation images per reward (0: all; default: the algorithm's recommended number, "
        "32 for DDPG with the fixed reward, else 256)",
    )
    p.add_argument("--eval-every", type=int, default=500, help="env steps between holdout AUROC evaluations")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="env steps between checkpoints in OUT/checkpoint/ (0: none); rerun the command to resume",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard a run already in --out (checkpoint, summary, controller) and train from the start",
    )
    p.add_argument(
        "--env-kwargs",
        type=json_object,
        default={},
        help="JSON object of TaskAmenabilityEnv arguments over the algorithm's recommended ones, "
        'e.g. \'{"reward_normalisation": "none"}\' (docs/environment.md lists them)',
    )
    p.add_argument(
        "--agent-kwargs",
        type=json_object,
        default={},
        help="JSON object of algorithm arguments over agents.default_kwargs, "
        'e.g. \'{"learning_rate": 3e-4, "policy_kwargs": {"initial_selection_probability": 0.5}}\'',
    )
    p.add_argument(
        "--warmup-cache",
        default=None,
        metavar="DIR",
        help="folder where the predictor's warm-up is kept, so that runs with the same seed, data and "
        "predictor settings (e.g. the other rewards) load it instead of computing it again; results do not change",
    )
    add_mirror_argument(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads of the run (default: torch's own choice, one per core). The count changes the "
        "order of torch's sums, so a run's figures in their last digits: 1 gives the figures of the "
        "`iqa reproduce` stage with the same settings, which runs on one thread; summary.json records it",
    )
    p.add_argument("--out", required=True, help="run folder (created)")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: a line on stderr at each holdout evaluation instead (for logs)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.training import TrainConfig, show_evaluations, train
    from experiments.workers import torch_threads

    config = TrainConfig(
        algo=args.algo,
        task=args.task,
        reward=args.reward,
        dataset=args.dataset,
        steps=args.steps,
        seed=args.seed,
        batch_size="auto" if args.batch_size is None else args.batch_size,
        train_steps=args.train_steps,
        validation_size="auto" if args.validation_size is None else args.validation_size or None,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        warmup_cache=args.warmup_cache,
        env_kwargs=args.env_kwargs,
        agent_kwargs=args.agent_kwargs,
        mirror_average=args.mirror_average,
    )
    if args.no_progress:
        show_evaluations()  # the bar shows the holdout AUROC; without it, a line per evaluation
    with torch_threads(args.threads):  # a run called in-process gives the caller its thread count back
        summary = train(config, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    finished = bool(summary.get("already_finished"))
    if finished:
        print(
            f"{args.out} holds a finished run ({summary['steps']} steps); nothing to do "
            "(--overwrite trains it again)"
        )
    elif summary.get("resumed_from"):
        print(f"resumed from the checkpoint at step {summary['resumed_from'][-1]}")
    print(
        json.dumps(
            {k: summary[k] for k in ("run", "steps", "wall_time_s", "initial_auroc", "final_auroc")},
            indent=2,
        )
    )
    where = f"{args.out}/controller"
    print(
        f"controller {'in' if finished else 'saved to'} {where} "
        f"(score images with: iqa score --controller {where} INPUT)"
    )
    return 0
