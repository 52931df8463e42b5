"""The benchmarks in their smallest modes: complete reports, no timing thresholds.

Targets are judged in the benchmarks' printed verdicts; here only the reports' shape is checked:
every method has every stage the pipeline times for it, with positive seconds, floors and ratios,
and a peak memory beside its floor; and no benchmark patches a production module.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from benchmarks.measure import EVALUATION, Config, measure
from benchmarks.run import METHODS, TINY, main
from gblm.methods.registry import build_allocator, build_method
from gblm.pipeline import PRUNE
from gblm.pruning.sparsity import Sparsity

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _expected_stages(spec: str) -> list[str]:
    """The stages the pipeline times for ``method[@allocator]``, then the evaluation."""
    method, _, allocator = spec.partition("@")
    plan = build_allocator(allocator or "uniform", Sparsity(0.5))
    passes = [plan.dense_pass, build_method(method).dense_pass]
    return [stage for stage in passes if stage] + [PRUNE, EVALUATION]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    assert main(["--smoke", "--out", str(out)]) == 0
    (json_path,) = out.glob("*.json")
    (md_path,) = out.glob("*.md")
    return json.loads(json_path.read_text()), md_path.read_text()


def test_every_method_has_every_stage_with_times_floors_and_ratios(report) -> None:
    data, text = report
    assert list(data["methods"]) == list(METHODS)
    for spec, entry in data["methods"].items():
        stages = entry["stages"]
        assert list(stages) == _expected_stages(spec), spec
        for stage, s in stages.items():
            for key in ("seconds", "floor_s", "ratio"):
                assert _positive(s[key]), (spec, stage, key)
            assert s["ratio"] == pytest.approx(s["seconds"] / s["floor_s"])
            assert s["peak_bytes"] > 0, (spec, stage)
        assert (stages[PRUNE]["flops"] > 0) == (spec != "magnitude")  # magnitude: no products
        assert _positive(entry["end_to_end"]["ratio"])
        assert abs(entry["sparsity"] - 0.5) < 0.01 and math.isfinite(entry["ppl"])
    assert "| gblm | gradients |" in text and "## Targets" in text


def test_peak_memory_stands_beside_its_floor(report) -> None:
    data, text = report
    for spec, entry in data["methods"].items():
        memory, floor = entry["memory"], entry["memory"]["floor"]
        assert memory["process_peak_bytes"] >= memory["peak_bytes"] >= memory["baseline_bytes"] > 0
        assert memory["peak_in"] in ("build", *entry["stages"]), spec
        assert floor["weights"] > 0 and floor["block_scratch"] > 0
        assert (floor["activations"] > 0) == (spec != "magnitude")
        assert (floor["method_state"] > 0) == (spec in ("gblm", "sparsegpt"))
        parts = ("weights", "block_scratch", "activations", "method_state")
        assert floor["total"] == sum(floor[p] for p in parts)
        assert memory["ratio"] == pytest.approx(memory["held_bytes"] / floor["total"])
    targets = {v["target"] for v in data["verdicts"]}
    assert {"gblm: gradients", "gblm: end to end", "wanda: prune"} <= targets
    assert "magnitude: prune" not in targets
    assert "| method | peak RSS MiB |" in text


def test_a_fresh_process_reports_its_stages_and_peaks() -> None:
    result = measure(Config(model=TINY, method="wanda", nsamples=2, seqlen=16))
    assert list(result["seconds"]) == [PRUNE] and _positive(result["seconds"][PRUNE])
    assert result["peak_bytes"] >= result["stage_peak_bytes"][PRUNE] > result["baseline_bytes"]
    assert _positive(result["rates"]["matmul_flops"]) and _positive(result["rates"]["copy_bytes"])
    assert len(result["masks_sha256"]) == 64


def test_floor_benchmark_prices_the_gradient_stage_and_the_walk(tmp_path: Path) -> None:
    from benchmarks import floor

    assert floor.main(["--smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("floor-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [row["stage"] for row in rows] == ["gradient stage", "walk"]
    for row, target in zip(rows, (1.3, 2.0)):
        assert _positive(row["seconds"]) and _positive(row["floor_s"])
        assert row["ratio"] == pytest.approx(row["seconds"] / row["floor_s"])
        assert row["target"] == target and row["met"] == (row["ratio"] <= target)
    assert "| 2 x 32 | walk |" in path.with_suffix(".md").read_text()


def test_gpu_benchmark_runs_its_code_path_on_the_cpu(tmp_path: Path) -> None:
    from benchmarks.gpu import GOALS
    from benchmarks.gpu import main as gpu_main

    argv = ["--device", "cpu", "--shape", "tiny", "--in-process", "--out", str(tmp_path)]
    assert gpu_main(argv) == 0
    (json_path,) = tmp_path.glob("gpu-*.json")
    data = json.loads(json_path.read_text())
    assert list(data["stages"]) == ["gradients", PRUNE, EVALUATION]
    for name, stage in data["stages"].items():
        assert _positive(stage["seconds"]) and _positive(stage["ratio"]), name
    assert set(data["verdicts"]) == set(GOALS)
    assert set(data["verdicts"].values()) <= {"MET", "MISSED"}
    assert abs(data["sparsity"] - 0.5) < 0.01 and math.isfinite(data["ppl_random"])
    assert "| gradients |" in json_path.with_suffix(".md").read_text()


def test_no_benchmark_patches_a_production_module() -> None:
    patching = re.compile(r"setattr\(|monkeypatch|^\s*(gblm|sequential|method_base)\.\w+\s*=", re.M)
    for path in BENCHMARKS.glob("*.py"):
        assert not patching.search(path.read_text()), path.name


def test_the_threads_report_judges_both_conditions(tmp_path):
    from benchmarks.threads import SETTINGS, child_env, render, verdicts

    found = {"quiet": {"load_average": [0.1], "seconds": {"torch default": [10.0], "gblm default":
                                                           [10.2], "one thread": [15.0]}},
             "busy": {"load_average": [1.0], "seconds": {"torch default": [80.0], "gblm default":
                                                          [17.0], "one thread": [16.0]}}}  # fmt: skip
    rows = {v["target"]: v for v in verdicts(found)}
    assert rows["quiet: gblm default / torch default"]["met"]  # 1.02 <= 1.05
    assert not rows["busy: gblm default / one thread"]["met"]  # 1.06 > 1.05
    report = {"machine": {"cpu": "c", "cores": 2, "torch": "t"}, "nsamples": 8, "seqlen": 128,
              "conditions": found, "verdicts": list(rows.values()), "seconds": 1.0}  # fmt: skip
    assert "| busy | [1.0] | torch default | - | 80.0 |" in render(report)
    assert set(SETTINGS) == {"torch default", "gblm default", "one thread"}
    assert "OMP_NUM_THREADS" not in child_env({})
