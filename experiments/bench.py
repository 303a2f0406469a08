"""The performance benchmark behind ``iqa bench``: one JSON record, measured side by side in one run.

What it measures (see ``docs/performance.md`` for the figures and targets):

- **env**: steps per second of ``TaskAmenabilityEnv`` under random actions,
  per task, and the *overhead ratio* = env time / bare torch compute.  The
  bare compute replays, on a copy of the env's predictor and optimiser and on
  the env's own image tensors, exactly the work the steps had to do: one
  forward + backward + optimiser step on each training step's selected
  images, and the validation forward passes (once per episode).  Env and bare
  blocks alternate, so machine load hits both alike.
- **controller**: single-frame latency (median, p99) and batch throughput of
  :class:`agents.Controller` on uint8 frames, the path a scanner would use.
- **rl**: env steps per second inside ``learn()`` for DDPG and REINFORCE at
  :func:`agents.make_agent`'s defaults, on the env each algorithm trains on
  with ``iqa train`` (the weighted reward, with
  :func:`agents.recommended_env_kwargs`: shifted training images, the
  predictor's weight average, ...; the *env* figures above are the plain
  env's), timed after the warm-up (DDPG's
  ``learning_starts``, REINFORCE's first rollout): whole episodes of
  REINFORCE, a few steps of DDPG (its gradient step dwarfs the env step).
- **replay_buffer**: bytes per stored transition of DDPG's default SB3
  buffer and of :class:`agents.index_buffer.IndexReplayBuffer`.
- **memory**: peak resident memory of the process (``ru_maxrss``).
- the torch thread count, device, versions and the targets each figure is
  held against.

Other processes only ever add time, so on a shared machine the headline
figures are best-of-repeats (fastest block, quietest round, as ``timeit``
reports), and the medians are reported beside them: the gap between the two
shows how busy the machine was (``load_average`` says so too).

Timings never go into tests; ``run_bench(quick=True)`` only checks that
everything runs and every field is there.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from experiments.workers import torch_threads

logger = logging.getLogger(__name__)

#: Version of the record's layout; bump it when a field changes meaning.
#: 2: the ``rl`` figures are timed on the env ``iqa train`` gives each algorithm (its recommended settings), not the plain env.
SCHEMA = "iqa-bench/2"
BENCH_TASKS: tuple[str, ...] = ("classification", "segmentation", "both")
BENCH_ALGORITHMS: tuple[str, ...] = ("ddpg", "reinforce")
#: The reward the ``learn()`` figures are timed with (the paper's main one).
LEARN_REWARD = "weighted"

#: Targets of the performance protocol (docs/performance.md); CPU-only ones say so.
OVERHEAD_RATIO_MAX = 1.15
CONTROLLER_P99_MS_MAX = 5.0
CONTROLLER_IMAGES_PER_S_MIN = 2000.0
INDEX_BUFFER_BYTES_MAX = 1024.0
PEAK_MEMORY_BYTES_MAX = 4 * 1024**3


@dataclass(frozen=True)
class BenchBudget:
    """How much of each measurement to take (``FULL`` or ``QUICK``)."""

    env_repeats: int
    """Alternating (env block, bare block) pairs; figures are medians over them."""
    env_episodes_per_repeat: int
    """Whole episodes per env block."""
    env_warmup_episodes: int
    """Untimed episodes (and bare replays) before the first repeat."""
    controller_frames: int
    """Timed single-frame scoring calls per round (latency median and p99)."""
    controller_rounds: int
    """Rounds of ``controller_frames`` calls; the p99 of the quietest round is reported beside the overall one."""
    controller_warmup_frames: int
    """Untimed single-frame calls first."""
    controller_batch: int
    """Images per batch-throughput call."""
    controller_batch_repeats: int
    """Timed batch calls (throughput is their median)."""
    controller_chunks: tuple[int, ...]
    """Extra ``Controller.score(batch_size=...)`` chunk sizes timed beside the default."""
    rl_on_policy_episodes: int
    """Whole episodes (rollouts + updates) timed inside REINFORCE's ``learn()`` after its first rollout."""
    rl_off_policy_steps: int
    """Steps timed inside DDPG's ``learn()`` after ``learning_starts``.  Each costs its gradient
    steps (4 of 16 whole observations with the weighted reward's defaults), which dwarf the env
    step, so a part of an episode is representative and keeps the benchmark short."""
    rl_predictor_warmup_steps: int | None = None
    """At most this many predictor warm-up updates before ``learn()`` (None: the algorithm's
    recommended number, as ``iqa train`` gives it).  The warm-up is not timed and changes no figure
    but the benchmark's wall time: REINFORCE's 2,000 updates per task would be most of a quick run."""


FULL = BenchBudget(
    env_repeats=5,
    env_episodes_per_repeat=2,
    env_warmup_episodes=1,
    controller_frames=400,
    controller_rounds=5,
    controller_warmup_frames=50,
    controller_batch=1024,
    controller_batch_repeats=7,
    controller_chunks=(16, 64, 256),
    rl_on_policy_episodes=3,
    rl_off_policy_steps=10,
)
QUICK = BenchBudget(
    env_repeats=2,
    env_episodes_per_repeat=1,
    env_warmup_episodes=1,
    controller_frames=15,
    controller_rounds=2,
    controller_warmup_frames=3,
    controller_batch=64,
    controller_batch_repeats=2,
    controller_chunks=(16,),
    rl_on_policy_episodes=1,
    rl_off_policy_steps=2,
    rl_predictor_warmup_steps=50,
)


# ---------------------------------------------------------------- helpers
def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes.

    ``getrusage`` where it exists (KiB on Linux, bytes on macOS); elsewhere
    psutil's peak working set if psutil is installed, else 0.
    """
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil
        except ImportError:
            return 0
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 min system load averages: a busy machine makes every timing slower."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _dataset_source(dataset: str | os.PathLike[str] | Any | None) -> str:
    if dataset is None:
        return "built-in synthetic"
    if isinstance(dataset, (str, os.PathLike)):
        return os.path.basename(os.fspath(dataset))
    return "ImageDataset object"


# ------------------------------------------------------------------- env
def _bare_tensors(env: Any) -> dict[str, torch.Tensor]:
    """The env's own device tensors: the bare compute must read the very same memory."""
    names = {
        "train_images": "_train_images_t",
        "train_targets": "_train_targets_t",
        "validation_images": "_validation_images_t",
        "validation_targets": "_validation_targets_t",
    }
    try:
        tensors = {key: getattr(env, attr) for key, attr in names.items()}
        order = torch.as_tensor(env._validation_order, device=env.device)
    except AttributeError as e:
        raise RuntimeError(f"TaskAmenabilityEnv no longer has the tensors the benchmark replays on ({e})") from e
    tensors["validation_order"] = order
    return tensors


def _validation_chunk(env: Any) -> int:
    """The chunk size of the env's validation forward passes (its attribute, else ``predictor_outputs``' default)."""
    chunk = getattr(env, "validation_chunk", None)
    if chunk is None:
        chunk = inspect.signature(env.predictor_outputs).parameters["chunk"].default
    return int(chunk)


def _run_env_block(
    env: Any, episodes: int, rng: np.random.Generator
) -> tuple[float, int, list[list[np.ndarray]]]:
    """``episodes`` whole episodes under random actions: (seconds, steps, selected indices per training step)."""
    batch = env.batch_size
    actions = rng.random((episodes * env.episode_length, batch), dtype=np.float32)
    selected: list[list[np.ndarray]] = []
    steps = 0
    _synchronize(env.device)
    start = time.perf_counter()
    for _ in range(episodes):
        _, info = env.reset()
        episode: list[np.ndarray] = []
        terminated = False
        while not terminated:
            shown = info["batch_indices"]
            _, _, terminated, _, info = env.step(actions[steps])
            if info["action_phase"] == "train":
                episode.append(shown[info["selection"]])
            steps += 1
        selected.append(episode)
    _synchronize(env.device)
    return time.perf_counter() - start, steps, selected


def _run_bare_block(env: Any, tensors: dict[str, torch.Tensor], selected: list[list[np.ndarray]]) -> float:
    """The torch work of the episodes ``selected`` came from, alone; returns seconds.

    Runs on a copy of the env's predictor and optimiser (the env is left as it
    was): per training step with a selection, forward + loss + backward +
    optimiser step on the selected images; per episode, the validation forward
    passes over the reward's validation images, in the env's own chunk size.
    """
    from iqa_env.networks import to_float

    chunk = _validation_chunk(env)
    predictor = copy.deepcopy(env.predictor)
    optimizer = type(env.optimizer)(predictor.parameters(), **env.optimizer.defaults)
    optimizer.load_state_dict(env.optimizer.state_dict())
    task, device = env.task, env.device
    validation_images = tensors["validation_images"]
    order = tensors["validation_order"]
    _synchronize(device)
    start = time.perf_counter()
    for episode in selected:
        predictor.train()
        for indices in episode:
            if len(indices) == 0:
                continue
            idx = torch.as_tensor(indices, device=device)
            outputs = predictor(to_float(tensors["train_images"][idx]))
            loss = task.per_sample_loss(outputs, tensors["train_targets"][idx]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        predictor.eval()
        with torch.no_grad():
            images = validation_images[order]
            for i in range(0, len(images), chunk):
                predictor(to_float(images[i : i + chunk]))
    _synchronize(device)
    return time.perf_counter() - start


def bench_env(env: Any, budget: BenchBudget, seed: int = 0) -> dict[str, Any]:
    """Env steps/s under random actions and the overhead ratio over the bare torch compute.

    Other processes only ever add time, so the headline figures use the
    fastest repeat (as ``timeit`` does): ``overhead_ratio`` = fastest env
    block / fastest bare block, per step.  The medians, and the spread of the
    ratio within each (env, bare) pair, are reported beside them.
    """
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    tensors = _bare_tensors(env)
    for _ in range(budget.env_warmup_episodes):
        _, _, selected = _run_env_block(env, 1, rng)
        _run_bare_block(env, tensors, selected)
    env_s: list[float] = []
    bare_s: list[float] = []
    ratios: list[float] = []
    steps_list: list[int] = []
    selections: list[int] = []
    for _ in range(budget.env_repeats):
        seconds, steps, selected = _run_env_block(env, budget.env_episodes_per_repeat, rng)
        bare = _run_bare_block(env, tensors, selected)
        env_s.append(seconds / steps)
        bare_s.append(bare / steps)
        ratios.append(seconds / bare)
        steps_list.append(steps)
        selections.extend(len(ix) for episode in selected for ix in episode)
    return {
        "steps_per_s": 1.0 / min(env_s),
        "step_ms": 1e3 * min(env_s),
        "bare_compute_ms_per_step": 1e3 * min(bare_s),
        "overhead_ratio": min(env_s) / min(bare_s),
        "steps_per_s_median": 1.0 / _median(env_s),
        "step_ms_median": 1e3 * _median(env_s),
        "bare_compute_ms_per_step_median": 1e3 * _median(bare_s),
        "overhead_ratio_pairs_median": _median(ratios),
        "overhead_ratio_pairs_min": float(min(ratios)),
        "overhead_ratio_pairs_max": float(max(ratios)),
        "repeats": budget.env_repeats,
        "steps_per_repeat": int(steps_list[0]),
        "episode_length": int(env.episode_length),
        "train_steps": int(env.train_steps),
        "batch_size": int(env.batch_size),
        "validation_images": len(tensors["validation_order"]),
        "validation_chunk": _validation_chunk(env),
        "mean_selected_per_train_step": float(np.mean(selections)) if selections else 0.0,
    }


# ------------------------------------------------------------ controller
def bench_controller(
    image_shape: tuple[int, int, int], frames: np.ndarray, device: torch.device, budget: BenchBudget
) -> dict[str, Any]:
    """Single-frame latency and batch throughput of :class:`agents.Controller` on uint8 frames."""
    from agents.controller import Controller
    from iqa_env.networks import ControllerBackbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        controller = Controller(ControllerBackbone(image_shape)).to(device)
    n = len(frames)
    for i in range(budget.controller_warmup_frames):
        controller.score(frames[i % n : i % n + 1])
    rounds: list[list[float]] = []
    for r in range(budget.controller_rounds):
        latencies = []
        for i in range(r * budget.controller_frames, (r + 1) * budget.controller_frames):
            frame = frames[i % n : i % n + 1]
            start = time.perf_counter()
            controller.score(frame)  # returns numpy: includes the device round trip
            latencies.append(time.perf_counter() - start)
        rounds.append(latencies)
    reps = -(-budget.controller_batch // n)
    batch = np.ascontiguousarray(np.concatenate([frames] * reps)[: budget.controller_batch])

    def throughput(chunk: int | None) -> tuple[float, float]:
        """(best, median) images/s of ``score`` with this chunk size (None: its default)."""
        kwargs = {} if chunk is None else {"batch_size": chunk}
        controller.score(batch, **kwargs)
        rates = []
        for _ in range(budget.controller_batch_repeats):
            start = time.perf_counter()
            controller.score(batch, **kwargs)
            rates.append(len(batch) / (time.perf_counter() - start))
        return max(rates), _median(rates)

    default_chunk = inspect.signature(controller.score).parameters["batch_size"].default
    by_chunk = {str(chunk): throughput(chunk)[0] for chunk in budget.controller_chunks}
    default_best, default_median = throughput(None)
    by_chunk[str(default_chunk)] = default_best
    ms = 1e3 * np.asarray(rounds)
    # As `iqa train` exports it: each image scored with its mirror image (two passes of the network).
    controller.mirror_average = True
    mirrored_ms = []
    for i in range(budget.controller_frames):
        frame = frames[i % n : i % n + 1]
        start = time.perf_counter()
        controller.score(frame)
        mirrored_ms.append(1e3 * (time.perf_counter() - start))
    mirrored_best, _ = throughput(None)
    return {
        "single_frame_ms_median": float(np.median(ms)),
        "single_frame_ms_p99": float(np.percentile(ms, 99)),
        "single_frame_ms_p99_quietest_round": float(min(np.percentile(r, 99) for r in ms)),
        "single_frame_ms_max": float(ms.max()),
        "single_frame_calls": int(ms.size),
        "batch_images_per_s": default_best,
        "batch_images_per_s_median": default_median,
        "batch_size": len(batch),
        "batch_repeats": budget.controller_batch_repeats,
        "score_chunk_default": int(default_chunk),
        "batch_images_per_s_by_chunk": by_chunk,
        "mirror_average_single_frame_ms_median": float(np.median(mirrored_ms)),
        "mirror_average_batch_images_per_s": mirrored_best,
    }


# ------------------------------------------------------------------- RL
def bench_learn(
    algorithm: str, make_env: Callable[[], Any], device: torch.device, budget: BenchBudget, seed: int = 0
) -> tuple[dict[str, Any], Any]:
    """Env steps/s inside ``learn()`` at :func:`agents.make_agent`'s defaults; returns (figures, agent).

    Timed from the end of the warm-up (DDPG: ``learning_starts`` steps of
    random exploration without gradient steps; REINFORCE: its first rollout)
    to the end of ``learn()``: ``budget.rl_off_policy_steps`` steps of DDPG,
    ``budget.rl_on_policy_episodes`` whole episodes of REINFORCE.  Each
    block (a DDPG step with its gradient step; a REINFORCE rollout with its
    update) is timed on its own: ``steps_per_s`` is the fastest block's rate,
    ``steps_per_s_median`` the median's, ``steps_per_s_overall`` the whole
    window's.
    """
    from stable_baselines3.common.callbacks import BaseCallback

    from agents import make_agent

    env = make_env()
    agent = make_agent(algorithm, env, seed=seed, device=device)
    episode = int(env.episode_length)
    off_policy = hasattr(agent, "replay_buffer")
    warmup = int(getattr(agent, "learning_starts", 0)) or int(getattr(agent, "n_steps", episode))
    warmup = -(-warmup // episode) * episode  # start the clock on an episode boundary
    if off_policy:
        warmup += 1  # SB3's first gradient step follows step learning_starts + 1
    timed = budget.rl_off_policy_steps if off_policy else budget.rl_on_policy_episodes * episode
    total = warmup + timed
    # One block = the unit of work that repeats: a step (+ its gradient step) for DDPG,
    # an episode (rollout + update) for REINFORCE.
    block = 1 if off_policy else episode
    marks: list[float] = []

    class _Clock(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps >= warmup and (self.num_timesteps - warmup) % block == 0:
                _synchronize(device)
                marks.append(time.perf_counter())
            return True

    begin = time.perf_counter()
    agent.learn(total, callback=_Clock())
    _synchronize(device)
    marks[-1] = time.perf_counter()  # the last block ends with its update, after the last step
    blocks = np.diff(marks)
    timed = int(agent.num_timesteps) - warmup
    return {
        "algorithm": type(agent).__name__,
        "steps_per_s": block / float(blocks.min()),
        "steps_per_s_median": block / float(np.median(blocks)),
        "steps_per_s_overall": timed / (marks[-1] - marks[0]),
        "timed_steps": timed,
        "block_steps": block,
        "warmup_steps": warmup,
        "warmup_s": marks[0] - begin,
        "episode_length": episode,
    }, agent


def bench_replay_buffer(agent: Any) -> dict[str, Any]:
    """Bytes per transition of an off-policy agent's buffer, and of :class:`IndexReplayBuffer` beside it."""
    from agents.index_buffer import (
        IndexReplayBuffer,
        index_buffer_kwargs,
        replay_buffer_nbytes,
    )

    default = replay_buffer_nbytes(agent.replay_buffer)
    buffer_size = int(agent.replay_buffer.buffer_size)
    index = IndexReplayBuffer(
        buffer_size,
        agent.observation_space,
        agent.action_space,
        device="cpu",
        **index_buffer_kwargs(agent.get_env()),
    )
    indexed = replay_buffer_nbytes(index)
    return {
        "buffer_size": buffer_size,
        "default_class": type(agent.replay_buffer).__name__,
        "default_bytes_per_transition": default["per_transition"],
        "default_full_buffer_bytes": default["per_transition"] * default["capacity"],
        "index_class": "agents.index_buffer.IndexReplayBuffer",
        "index_bytes_per_transition": indexed["per_transition"],
        "index_fixed_bytes": indexed["fixed"],
        "index_full_buffer_bytes": indexed["per_transition"] * indexed["capacity"] + indexed["fixed"],
    }


# ------------------------------------------------------------------ main
def _target(name: str, value: float | None, bound: float, kind: str, unit: str, applies: bool = True) -> dict[str, Any]:
    met = None if value is None or not applies else (value <= bound if kind == "<=" else value >= bound)
    return {"figure": name, "value": value, "target": f"{kind} {bound:g} {unit}".strip(), "met": met}


def _targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    on_cpu = record["device"] == "cpu"
    rows = [
        _target(f"env overhead ratio ({task})", fig["overhead_ratio"], OVERHEAD_RATIO_MAX, "<=", "")
        for task, fig in record["env"].items()
    ]
    c = record["controller"]
    p99 = c["single_frame_ms_p99_quietest_round"]
    rows.append(_target("controller single-frame p99 latency", p99, CONTROLLER_P99_MS_MAX, "<=", "ms", on_cpu))
    rate = c["batch_images_per_s"]
    rows.append(_target("controller batch throughput", rate, CONTROLLER_IMAGES_PER_S_MIN, ">=", "images/s", on_cpu))
    rb = record["replay_buffer"] or {}
    rows.append(
        _target(
            "replay buffer, index option",
            rb.get("index_bytes_per_transition"),
            INDEX_BUFFER_BYTES_MAX,
            "<=",
            "bytes/transition",
        )
    )
    mem = record["memory"]
    mib = 2.0**20
    rows.append(_target("peak resident memory", mem["peak_rss_bytes"] / mib, PEAK_MEMORY_BYTES_MAX / mib, "<=", "MiB"))
    rows.append(
        _target(
            "peak resident memory + full default DDPG buffer",
            mem["peak_rss_plus_full_default_buffer_bytes"] / mib if rb else None,
            PEAK_MEMORY_BYTES_MAX / mib,
            "<=",
            "MiB",
        )
    )
    rows.append({"figure": "iqa reproduce --quick wall time", "value": None, "target": "reported", "met": None})
    return rows


def reproduce_quick_record(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``reproduce_quick_wall_s`` and a note on where it comes from, read from a reproduce ``results.json``."""
    if path is None:
        return {
            "reproduce_quick_wall_s": None,
            "reproduce_quick_note": "not measured in this run: pass --reproduce-results RUN/results.json of "
            "an `iqa reproduce --quick` run to report its wall time",
        }
    import json
    from pathlib import Path

    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; expected the results.json of an `iqa reproduce` run") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable results.json of `iqa reproduce` ({e})") from None
    settings = results.get("settings", {}) if isinstance(results, dict) else {}
    if not isinstance(results, dict) or results.get("kind") != "reproduce" or "wall_s" not in results:
        raise ValueError(f"{path}: not the results.json of an `iqa reproduce` run (no 'kind'/'wall_s' fields)")
    if not settings.get("quick"):
        raise ValueError(f"{path}: that run was not made with --quick; expected a quick reproduction")
    # Every invocation into the run's folder counts: the last one may only have rewritten the figures.
    invocations = results.get("invocations")
    total = results.get("wall_s_total")
    wall = float(total) if isinstance(total, (int, float)) and isinstance(invocations, list) else float(results["wall_s"])
    over = (
        f", over {len(invocations)} invocation(s) into its folder"
        if isinstance(invocations, list) and len(invocations) > 1
        else ""
    )
    return {
        "reproduce_quick_wall_s": wall,
        "reproduce_quick_note": (
            f"from {Path(path).name} of `{results.get('command', 'iqa reproduce --quick')}` "
            f"(tasks {settings.get('tasks')}, seeds {settings.get('seeds')}, {results.get('workers')} worker(s){over})"
        ),
    }


def run_bench(
    task: str = "both",
    device: str = "cpu",
    quick: bool = False,
    *,
    dataset: str | os.PathLike[str] | Any | None = None,
    threads: int | None = None,
    seed: int = 0,
    algorithms: tuple[str, ...] = BENCH_ALGORITHMS,
    reproduce_results: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Measure everything ``iqa bench`` reports; returns the JSON-serialisable record.

    :param task: ``"classification"``, ``"segmentation"`` or ``"both"``
    :param device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``
    :param quick: a tiny budget (:data:`QUICK`): checks that everything runs, figures are rough
    :param dataset: an HDF5 path or an ``ImageDataset``; None for the built-in synthetic set
    :param threads: torch intra-op threads for the whole run (None: keep the current setting)
    :param seed: seed of the envs, the agents and the random actions
    :param algorithms: the RL algorithms timed inside ``learn()``
    :param reproduce_results: ``results.json`` of an ``iqa reproduce --quick`` run whose wall time
        the record reports (a quick reproduction takes minutes, so the bench does not run one itself)
    """
    from iqa_env.env import TaskAmenabilityEnv, resolve_device

    _check_choice("task", task, BENCH_TASKS)
    for name in algorithms:
        _check_choice("algorithm", name, BENCH_ALGORITHMS)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    dev = resolve_device(device)
    # Read first: a results.json that cannot be used fails before the minutes of measurement, not after.
    reproduce_record = reproduce_quick_record(reproduce_results)
    budget = QUICK if quick else FULL
    tasks = ("classification", "segmentation") if task == "both" else (task,)
    n_threads = threads or torch.get_num_threads()
    started = time.perf_counter()
    load_start = _load_average()

    with torch_threads(n_threads):
        from agents import recommended_env_kwargs
        from iqa_env.env import as_dataset

        data = as_dataset(dataset)
        record: dict[str, Any] = {
            "schema": SCHEMA,
            "quick": bool(quick),
            "budget": dataclasses.asdict(budget),
            "device": dev.type,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "numpy": np.__version__,
                "stable_baselines3": _version("stable_baselines3"),
            },
            "dataset": {
                "source": _dataset_source(dataset),
                "images": len(data),
                "image_shape": list(data.image_shape),
            },
            "env": {},
            "rl": {},
        }

        def make_env(name: str, settings: dict[str, Any] | None = None) -> Callable[[], Any]:
            return lambda: TaskAmenabilityEnv(data, task=name, device=dev, **(settings or {}))

        # ru_maxrss only grows: its value after each section shows which one set the peak.
        peak_after: dict[str, float] = {"dataset": peak_rss_bytes() / 2**20}
        for name in tasks:
            logger.info("env throughput and overhead: %s", name)
            env = make_env(name)()
            record["env"][name] = bench_env(env, budget, seed)
            frames = env.validation_set.images
            env.close()
            peak_after[f"env/{name}"] = peak_rss_bytes() / 2**20

        logger.info("controller scoring")
        record["controller"] = bench_controller(data.image_shape, frames, dev, budget)
        peak_after["controller"] = peak_rss_bytes() / 2**20

        for name in tasks:
            record["rl"][name] = {}
            for algorithm in algorithms:
                logger.info("RL throughput inside learn(): %s, %s", algorithm, name)
                # What `iqa train` gives the algorithm: the weighted reward and its recommended env settings.
                settings = {"reward": LEARN_REWARD, **recommended_env_kwargs(algorithm, LEARN_REWARD)}
                if budget.rl_predictor_warmup_steps is not None:
                    settings["predictor_warmup_steps"] = min(
                        settings.get("predictor_warmup_steps", 0), budget.rl_predictor_warmup_steps
                    )
                figures, agent = bench_learn(algorithm, make_env(name, settings), dev, budget, seed)
                figures["env_settings"] = settings
                # What share of the env's own speed survives inside learn().
                figures["speed_vs_env_alone"] = figures["steps_per_s"] / record["env"][name]["steps_per_s"]
                record["rl"][name][algorithm] = figures
                if algorithm == "ddpg" and "replay_buffer" not in record:
                    record["replay_buffer"] = bench_replay_buffer(agent)
                del agent
                peak_after[f"rl/{name}/{algorithm}"] = peak_rss_bytes() / 2**20
        record.setdefault("replay_buffer", None)

        peak = peak_rss_bytes()
        full_buffer = (record["replay_buffer"] or {}).get("default_full_buffer_bytes", 0.0)
        record["memory"] = {
            "peak_rss_bytes": peak,
            "peak_rss_mib": peak / 2**20,
            "source": "resource.getrusage(RUSAGE_SELF).ru_maxrss (the whole process, this run included)",
            # SB3 allocates the buffer up front but the OS commits pages only as they fill:
            # a long DDPG run adds the untouched rest on top of the peak measured here.
            "peak_rss_plus_full_default_buffer_bytes": peak + full_buffer,
            "peak_rss_mib_after": peak_after,
        }
        record.update(reproduce_record)
        record["targets"] = _targets(record)
        record["load_average"] = {"start": load_start, "end": _load_average()}
        record["wall_s"] = time.perf_counter() - started
    return record


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:  # noqa: BLE001 - a missing version is not worth failing a benchmark
        return None


# ------------------------------------------------------------- reporting
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)) and abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_table(record: dict[str, Any]) -> str:
    """A readable table of a :func:`run_bench` record, with each figure's target and status."""
    status = {True: "met", False: "MISSED", None: ""}
    targets = {t["figure"]: t for t in record["targets"]}
    rows: list[tuple[str, str, str, str]] = []

    def add(figure: str, value: Any, unit: str = "", target_key: str | None = None) -> None:
        t = targets.get(target_key or figure)
        shown = f"{_fmt(value)} {unit}".strip() if value is not None else "n/a"
        rows.append((figure, shown, t["target"] if t else "", status[t["met"]] if t else ""))

    for task, fig in record["env"].items():
        add(f"env steps/s ({task})", fig["steps_per_s"], f"(median {_fmt(fig['steps_per_s_median'])})")
        add(f"env step time ({task})", fig["step_ms"], "ms")
        add(f"bare torch compute per step ({task})", fig["bare_compute_ms_per_step"], "ms")
        add(
            f"env overhead ratio ({task})",
            fig["overhead_ratio"],
            f"(pairs: median {_fmt(fig['overhead_ratio_pairs_median'])}, "
            f"[{_fmt(fig['overhead_ratio_pairs_min'])}, {_fmt(fig['overhead_ratio_pairs_max'])}])",
        )
    c = record["controller"]
    add("controller single-frame median latency", c["single_frame_ms_median"], "ms")
    add(
        "controller single-frame p99 latency",
        c["single_frame_ms_p99_quietest_round"],
        f"ms (all rounds: {_fmt(c['single_frame_ms_p99'])} ms)",
    )
    add(
        "controller batch throughput",
        c["batch_images_per_s"],
        f"images/s (score chunk {c['score_chunk_default']}; median {_fmt(c['batch_images_per_s_median'])})",
    )
    best = max(c["batch_images_per_s_by_chunk"].items(), key=lambda kv: kv[1])
    if int(best[0]) != c["score_chunk_default"]:
        add(f"controller batch throughput, score chunk {best[0]}", best[1], "images/s")
    add("controller single-frame median latency, with the mirror image", c["mirror_average_single_frame_ms_median"], "ms")
    add("controller batch throughput, with the mirror image", c["mirror_average_batch_images_per_s"], "images/s")
    for task, algos in record["rl"].items():
        for algo, fig in algos.items():
            median = f"(median {_fmt(fig['steps_per_s_median'])})"
            add(f"{algo} steps/s inside learn(), weighted reward, iqa train's env ({task})", fig["steps_per_s"], median)
    rb = record["replay_buffer"]
    if rb:
        add("replay buffer, SB3 default", rb["default_bytes_per_transition"], "bytes/transition")
        add("replay buffer, index option", rb["index_bytes_per_transition"], "bytes/transition")
    mem = record["memory"]
    add("peak resident memory", mem["peak_rss_mib"], "MiB")
    if rb:
        add(
            "peak resident memory + full default DDPG buffer",
            mem["peak_rss_plus_full_default_buffer_bytes"] / 2**20,
            "MiB",
        )
    add("iqa reproduce --quick wall time", record["reproduce_quick_wall_s"], "s")

    data = record["dataset"]
    header = ("figure", "measured", "target", "status")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [
        f"iqa bench: {record['device']} ({record['device_name']}), {record['torch_threads']} torch thread(s), "
        f"dataset {data['source']} {data['images']} x {tuple(data['image_shape'])}"
        + (", QUICK budget (rough figures)" if record["quick"] else ""),
        "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def command_line(args: Any) -> str:
    """The ``iqa bench`` command that reproduces a run with these parsed arguments."""
    parts = ["iqa bench", f"--task {args.task}", f"--device {args.device}"]
    if args.quick:
        parts.append("--quick")
    if args.dataset is not None:
        parts.append(f"--dataset {os.path.basename(os.fspath(args.dataset))}")
    if args.threads is not None:
        parts.append(f"--threads {args.threads}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    if getattr(args, "reproduce_results", None):
        parts.append(f"--reproduce-results {args.reproduce_results}")
    return " ".join(parts)


def main(args: Any) -> dict[str, Any]:
    """Run the benchmark for parsed ``iqa bench`` arguments; writes ``args.out`` if set; returns the record."""
    import json
    from pathlib import Path

    record = {"command": command_line(args)}
    record.update(
        run_bench(
            args.task, args.device, args.quick, dataset=args.dataset, threads=args.threads, seed=args.seed,
            reproduce_results=getattr(args, "reproduce_results", None),
        )
    )
    if args.out is not None:
        from iqa_env.files import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    from experiments.cli import main as cli_main

    sys.exit(cli_main(["bench", *sys.argv[1:]]))
