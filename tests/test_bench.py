"""The benchmark harness, in its smallest mode: a complete report, no timing thresholds.

Targets are judged in the benchmark's printed verdicts; here only the report's shape is checked:
every method has every stage, the applicable ones with positive times and ratios to a floor.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.analysis import TARGETS
from benchmarks.run import main
from benchmarks.work import METHODS, STAGES, applicable_stages
from gblm.methods.registry import build_method


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    assert main(["--smoke", "--out", str(out)]) == 0
    (json_path,) = out.glob("*.json")
    (md_path,) = out.glob("*.md")
    return json.loads(json_path.read_text()), md_path.read_text()


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def test_every_method_and_stage_has_times_and_ratios(report: tuple[dict, str]) -> None:
    data, _ = report
    assert len(data["models"]) >= 2  # a width and a depth step for the scaling fit
    for model in data["models"]:
        for name, floor in model["floors"].items():
            assert _positive(floor["cpu_s"]) and _positive(floor["wall_s"]), name
        for method in METHODS:
            stages = model["methods"][method]["stages"]
            assert list(stages) == list(STAGES)
            applicable = applicable_stages(build_method(method))
            for stage, entry in stages.items():
                if stage not in applicable:
                    assert entry == {"applicable": False}
                    continue
                assert entry["applicable"] and entry["floor"] in model["floors"]
                for key in ("cpu_s", "wall_s", "ratio_cpu", "ratio_wall"):
                    assert _positive(entry[key]), (method, stage, key)
                assert "peak_bytes" in entry
            if method != "magnitude":
                walk = model["methods"][method]["walk"]
                assert _positive(walk["ratio_cpu"]) and _positive(walk["ratio_wall"])
        for method in ("magnitude", "wanda"):  # their masking stage, replayed alone
            replayed = model["methods"][method]["masking_replayed"]
            assert replayed["same_masks"] and _positive(replayed["ratio_cpu"])
            assert replayed["replays"] == len(replayed["cpu_all"]) >= 2
        end_to_end = model["methods"]["gblm"]["end_to_end"]
        assert _positive(end_to_end["ratio_cpu"]) and _positive(end_to_end["floor_cpu_s"])
        flops = model["flops"]
        assert _positive(flops["walk_floor"]) and _positive(flops["gradient_floor"])


def test_extras_scaling_and_verdicts_are_reported(report: tuple[dict, str]) -> None:
    data, text = report
    probe = next(m for m in data["models"] if "extras" in m)
    extras = probe["extras"]
    assert set(extras["batching"]) == {"wanda", "sparsegpt", "gblm"}
    for entry in extras["batching"].values():
        assert _positive(entry["batch4_walk_cpu_s"]) and "equal" in entry["masks"]
    assert _positive(extras["checkpointing"]["time_ratio"])
    assert extras["checkpointing"]["norms_identical"]
    assert _positive(extras["bfloat16"]["gblm_stages"]["gradient stage"]["speedup"])
    reference = probe["sparsegpt_reference"]["rows"]
    assert {row["pattern"] for row in reference} == {"unstructured", "2:4"}
    assert all(row["weights_identical"] and _positive(row["ratio"]) for row in reference)

    assert set(data["scaling"]) >= {"gradient stage", "walk floor", "gblm walk"}
    for fit in data["scaling"].values():
        assert _positive(fit["gflops_per_cpu_s"]) and fit["loglog_slope"] is not None
    assert {v["limit"] for v in data["verdicts"]} == set(TARGETS.values())
    assert "## Targets" in text and "## How cost grows" in text


def test_product_path_is_timed_beside_the_controlled_runs(report: tuple[dict, str]) -> None:
    data, text = report
    (probe,) = [m for m in data["models"] if "product_path" in m]  # no SmolLM2 in smoke mode
    runs = probe["product_path"]
    assert set(runs) == {"wanda", "gblm"}
    assert _positive(runs["gblm"]["dense_pass"]["wall_s"]) and "dense_pass" not in runs["wanda"]
    assert all(_positive(r["walk"]["cpu_s"]) and r["threads"] >= 1 for r in runs.values())
    assert "As a user runs it" in text


def test_passes_are_priced_at_the_measured_matmul_rate(report: tuple[dict, str]) -> None:
    data, text = report
    rates = data["machine"]["matmul_gflops"]
    assert _positive(rates["suite_threads"]) and _positive(rates["default_threads"])
    for model in data["models"]:
        rows = model["flop_floor"]
        assert set(rows) == {"gradient stage (GBLM)", "walk (Wanda)"}
        for row in rows.values():
            assert row["floor_s"] == pytest.approx(row["flops"] / (rates["suite_threads"] * 1e9))
            assert _positive(row["ratio"])
    probe = next(m for m in data["models"] if "product_path" in m)
    assert all(_positive(r["product_ratio"]) for r in probe["flop_floor"].values())
    assert "Against the FLOP floor" in text


def test_gpu_benchmark_runs_its_code_path_on_the_cpu(tmp_path) -> None:
    """The GPU benchmark's CPU fallback: the tiny shape through every stage, a full report."""
    from benchmarks.gpu import GOALS
    from benchmarks.gpu import main as gpu_main

    assert (
        gpu_main(["--device", "cpu", "--shape", "tiny", "--no-verbose", "--out", str(tmp_path)])
        == 0
    )
    (json_path,) = tmp_path.glob("gpu-*.json")
    (md_path,) = tmp_path.glob("gpu-*.md")
    data = json.loads(json_path.read_text())
    expected = {"floor: N fwd+bwd", "floor: 2N block forwards", "gradient stage", "walk"}
    assert set(data["stages"]) >= expected | {"evaluation", "capture", "scoring and masking"}
    for name, stage in data["stages"].items():
        assert _positive(stage["seconds"]) and stage["entries"] >= 1, name
    assert data["stages"]["walk"]["seconds"] >= data["stages"]["scoring and masking"]["seconds"]
    assert set(data["verdicts"]) == set(GOALS) and set(data["verdicts"].values()) <= {
        "MET",
        "MISSED",
    }
    assert abs(data["sparsity"] - 0.5) < 0.01  # the walk really pruned every decoder Linear
    assert math.isfinite(data["ppl_random"]) and all(_positive(r) for r in data["ratios"].values())
    assert "| gradient stage |" in md_path.read_text()


def test_cases_option_selects_models_and_names_the_known_ones() -> None:
    from benchmarks.run import parse_args, settings_from_args

    settings = settings_from_args(parse_args(["--smoke", "--cases", "llama_h64_l2"]))
    assert [c.name for c in settings.cases] == ["llama_h64_l2"] and settings.probe is None
    assert not any(c.smollm2 for c in settings_from_args(parse_args(["--quick"])).cases)
    assert any(c.smollm2 for c in settings_from_args(parse_args([])).cases)  # default: SmolLM2 too
    with pytest.raises(SystemExit, match="unknown nope; this mode has llama_h64_l1"):
        settings_from_args(parse_args(["--smoke", "--cases", "nope"]))


def test_stages_follow_from_what_a_method_declares() -> None:
    assert applicable_stages(build_method("magnitude")) == ("scoring and masking", "evaluation")
    calibrated = ("capture", "statistics", "scoring and masking", "re-forward", "evaluation")
    assert applicable_stages(build_method("wanda")) == calibrated
    assert applicable_stages(build_method("sparsegpt")) == calibrated
    assert applicable_stages(build_method("gblm")) == STAGES  # its gradient stage too


def test_timed_walk_times_each_stage_once_and_restores_the_walk() -> None:
    import gblm.calibration.sequential as sequential
    from benchmarks.measure import StageClock
    from benchmarks.work import timed_walk

    originals = {a: getattr(sequential, a) for a in ("gather_statistics", "reforward_block")}
    clock = StageClock()
    calls = []

    def outer(depth: int) -> None:  # calls itself through the module, as gather_statistics may
        calls.append(depth)
        if depth == 0:
            sequential.gather_statistics(1)

    try:
        sequential.gather_statistics = outer
        with timed_walk(clock):
            sequential.gather_statistics(0)
        assert calls == [0, 1] and clock.as_dict()["statistics"]["entries"] == 1
        assert sequential.gather_statistics is outer  # the wrapper is gone
    finally:
        sequential.gather_statistics = originals["gather_statistics"]
    assert sequential.reforward_block is originals["reforward_block"]


def test_floor_benchmark_prices_the_product_path_and_breaks_the_walk_down(tmp_path) -> None:
    import gblm.calibration.sequential as sequential
    from benchmarks import floor
    from gblm.calibration.stats import LinearStats

    originals = (sequential.gather_statistics, sequential.privatize_parameters, LinearStats.fold)
    assert floor.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert (sequential.gather_statistics, sequential.privatize_parameters,
            LinearStats.fold) == originals  # fmt: skip
    (path,) = tmp_path.glob("floor-*.json")
    report = json.loads(path.read_text())
    assert report["matmul_gflops"] > 0
    (size,) = report["sizes"]
    for name, target in (("gradient stage", 1.3), ("walk", 2.0)):
        stage = size["stages"][name]
        assert stage["seconds"] > 0 and stage["floor_s"] > 0
        assert stage["ratio"] == pytest.approx(stage["seconds"] / stage["floor_s"])
        assert stage["target"] == target and stage["met"] == (stage["ratio"] <= target)
        assert stage["matmuls_s"] > 0 and stage["batch"] >= 1
    breakdown = size["breakdown"]
    parts = breakdown["parts"]
    assert breakdown["linears"] == 14 and breakdown["blocks"] == 2  # tiny LLaMA: 2 x 7 Linears
    for part in ("per-Linear step", "scoring", "mask selection", "zeroing", "packing masks"):
        assert parts[part]["calls"] == 14, part
    assert parts["statistics (hooked forwards)"]["calls"] >= 2  # one per block at least
    assert parts["statistics folds (in hooks)"]["calls"] >= 2 * 2 * 4  # windows x blocks x inputs
    outer = [p for p in parts if p not in floor._NESTED]
    assert sum(parts[p]["seconds"] for p in outer) == pytest.approx(breakdown["total_s"], rel=1e-6)
    text = (path.with_suffix(".md")).read_text()
    assert "| 2 x 32 | walk |" in text and "mask selection" in text


def test_floor_replay_counts_every_call_of_a_batch_size() -> None:
    from benchmarks.floor import _batch_sizes

    assert _batch_sizes(10, 4) == {4: 2, 2: 1}
    assert _batch_sizes(8, 4) == {4: 2}
    assert _batch_sizes(3, 1) == {1: 3}
    assert _batch_sizes(2, 8) == {2: 1}
