"""`iqa bench`: runs end to end with a tiny budget and reports every field (no timing thresholds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents import recommended_env_kwargs
from experiments.bench import format_table, run_bench
from experiments.cli import main

TOP_LEVEL = {
    "command", "schema", "quick", "budget", "device", "device_name", "torch_threads", "torch_interop_threads",
    "cpu_count", "versions", "dataset", "env", "controller", "rl", "replay_buffer", "memory",
    "reproduce_quick_wall_s", "reproduce_quick_note", "targets", "load_average", "wall_s",
}
ENV = {
    "steps_per_s", "step_ms", "bare_compute_ms_per_step", "overhead_ratio", "steps_per_s_median", "step_ms_median",
    "bare_compute_ms_per_step_median", "overhead_ratio_pairs_median", "overhead_ratio_pairs_min",
    "overhead_ratio_pairs_max", "repeats", "steps_per_repeat", "episode_length", "train_steps", "batch_size",
    "validation_images", "validation_chunk", "mean_selected_per_train_step",
}
CONTROLLER = {
    "single_frame_ms_median", "single_frame_ms_p99", "single_frame_ms_p99_quietest_round", "single_frame_ms_max",
    "single_frame_calls", "batch_images_per_s", "batch_images_per_s_median", "batch_size", "batch_repeats",
    "score_chunk_default", "batch_images_per_s_by_chunk", "mirror_average_single_frame_ms_median",
    "mirror_average_batch_images_per_s",
}
RL = {
    "algorithm", "steps_per_s", "steps_per_s_median", "steps_per_s_overall", "timed_steps", "block_steps",
    "warmup_steps", "warmup_s", "episode_length", "speed_vs_env_alone", "env_settings",
}
REPLAY_BUFFER = {
    "buffer_size", "default_class", "default_bytes_per_transition", "default_full_buffer_bytes", "index_class",
    "index_bytes_per_transition", "index_fixed_bytes", "index_full_buffer_bytes",
}
MEMORY = {"peak_rss_bytes", "peak_rss_mib", "source", "peak_rss_plus_full_default_buffer_bytes", "peak_rss_mib_after"}
TASKS = ("classification", "segmentation")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_iqa_bench_quick_reports_every_field(
    tiny_synthetic_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--json", "--device", "cpu", "--dataset", str(tiny_synthetic_path), "--out", str(out)]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == record

    assert set(record) == TOP_LEVEL
    assert record["command"].startswith("iqa bench --task both --device cpu --quick")
    assert record["quick"] is True and record["device"] == "cpu" and record["torch_threads"] >= 1
    assert record["dataset"]["source"] == tiny_synthetic_path.name
    assert record["reproduce_quick_wall_s"] is None and record["reproduce_quick_note"]

    assert set(record["env"]) == set(TASKS) and set(record["rl"]) == set(TASKS)
    for task in TASKS:
        env = record["env"][task]
        assert set(env) == ENV
        assert _positive(env["steps_per_s"]) and _positive(env["overhead_ratio"])
        assert env["steps_per_repeat"] == env["episode_length"]
        assert set(record["rl"][task]) == {"ddpg", "reinforce"}
        for algo, figures in record["rl"][task].items():
            assert set(figures) == RL and _positive(figures["steps_per_s"]) and figures["timed_steps"] >= 1
            # Timed on what `iqa train` gives the algorithm, not the plain env; the quick budget's warm-up shorter.
            recommended = recommended_env_kwargs(algo, "weighted")
            assert figures["env_settings"] == {
                "reward": "weighted", **recommended, "predictor_warmup_steps": min(recommended["predictor_warmup_steps"], 50)
            }

    controller = record["controller"]
    assert set(controller) == CONTROLLER
    median, p99, most = (controller[f"single_frame_ms_{k}"] for k in ("median", "p99", "max"))
    assert 0 < median <= p99 <= most
    assert 0 < controller["single_frame_ms_p99_quietest_round"] <= controller["single_frame_ms_max"]
    assert _positive(controller["batch_images_per_s"])
    assert _positive(controller["mirror_average_batch_images_per_s"])
    assert _positive(controller["mirror_average_single_frame_ms_median"])
    assert str(controller["score_chunk_default"]) in controller["batch_images_per_s_by_chunk"]

    buffer = record["replay_buffer"]
    assert set(buffer) == REPLAY_BUFFER
    c, h, w = record["dataset"]["image_shape"]
    batch = record["env"]["classification"]["batch_size"]
    assert buffer["default_bytes_per_transition"] >= 2 * batch * c * h * w  # obs + next_obs as uint8
    assert buffer["index_bytes_per_transition"] < buffer["default_bytes_per_transition"]

    assert set(record["memory"]) == MEMORY and _positive(record["memory"]["peak_rss_bytes"])
    assert set(record["memory"]["peak_rss_mib_after"]) == {
        "dataset",
        "controller",
        *(f"env/{t}" for t in TASKS),
        *(f"rl/{t}/{a}" for t in TASKS for a in ("ddpg", "reinforce")),
    }
    for target in record["targets"]:
        assert set(target) == {"figure", "value", "target", "met"}
        # "met" is the target's comparison of the value with its bound, recomputed here from the text.
        if target["value"] is None or target["target"] == "reported":
            assert target["met"] is None, target
        elif target["met"] is not None:  # None: the target does not apply on this device
            kind, bound = target["target"].split()[:2]
            value, bound = target["value"], float(bound)
            assert target["met"] == (value <= bound if kind == "<=" else value >= bound), target
    assert sum(t["met"] is not None for t in record["targets"]) >= 3  # the env ratios and the buffer always apply

    table = format_table(record)
    for figure in ("env overhead ratio (segmentation)", "controller single-frame p99 latency", "ddpg steps/s"):
        assert figure in table


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "detection"}, "task must be one of"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"device": "tpu"}, "device must be"),
    ],
)
def test_run_bench_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_bench(**kwargs)


def test_bench_refuses_a_reproduction_it_cannot_read_before_measuring(tmp_path, monkeypatch) -> None:
    """The results.json is read first: before, a wrong path failed after the minutes of measurement."""
    import iqa_env.env

    def measured(*args, **kwargs):
        raise AssertionError("the bench started measuring")

    monkeypatch.setattr(iqa_env.env, "as_dataset", measured)
    with pytest.raises(FileNotFoundError, match="expected the results.json of an `iqa reproduce` run"):
        run_bench(quick=True, reproduce_results=tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"kind": "train"}')
    with pytest.raises(ValueError, match="not the results.json of an `iqa reproduce` run"):
        run_bench(quick=True, reproduce_results=tmp_path / "other.json")


def test_bench_reports_the_wall_time_of_a_quick_reproduction(tmp_path):
    import json

    import pytest

    from experiments.bench import reproduce_quick_record

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"kind": "reproduce", "wall_s": 812.5, "workers": 2,
                                "settings": {"quick": True, "tasks": ["classification"], "seeds": [0, 1]}}))
    record = reproduce_quick_record(path)
    assert record["reproduce_quick_wall_s"] == 812.5
    assert "2 worker(s)" in record["reproduce_quick_note"]
    # A rerun that only rewrote the figures: the stages' invocation counts too.
    path.write_text(json.dumps({"kind": "reproduce", "wall_s": 11.0, "workers": 2, "wall_s_total": 823.5,
                                "invocations": [{"wall_s": 812.5}, {"wall_s": 11.0}],
                                "settings": {"quick": True, "tasks": ["classification"], "seeds": [0, 1]}}))
    record = reproduce_quick_record(path)
    assert record["reproduce_quick_wall_s"] == 823.5 and "over 2 invocation(s)" in record["reproduce_quick_note"]
    path.write_text(json.dumps({"kind": "reproduce", "wall_s": 1.0, "settings": {"quick": False}}))
    with pytest.raises(ValueError, match="--quick"):
        reproduce_quick_record(path)
    with pytest.raises(FileNotFoundError, match="results.json"):
        reproduce_quick_record(tmp_path / "missing.json")
    assert reproduce_quick_record(None)["reproduce_quick_wall_s"] is None
