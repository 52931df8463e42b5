"""The onload benchmark in its smallest mode: masks agree between the in-memory and the
disk-backed run, and every case has a time, a peak and a floor (no thresholds: the targets are
judged on the full size, docs/onload.md)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.onload import METHODS, MODES, main


def test_smoke_report_has_equal_masks_and_every_measure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--smoke", "--depths", "2", "--out", str(out), "--cache", str(tmp_path)]) == 0
    (report_path,) = out.glob("*.json")
    report = json.loads(report_path.read_text())
    (depth,) = report["depths"].values()
    for method in METHODS:
        entry = depth[method]
        assert entry["masks_equal"], method
        for mode in MODES:
            case = entry[mode]
            assert case["seconds"] > 0 and case["peak_anon"] >= 0, (method, mode)
            assert case["seconds"] == sum(case["stages"].values())
            assert ("gradients" in case["stages"]) == (method == "gblm")
        assert entry["floor"]["total"] > entry["floor"]["block"] > 0
        assert entry["time_disk_over_memory"] > 0
        assert (entry["floor"]["accumulators"] > 0) == (method == "gblm")
    assert "| 2 |" in next(out.glob("*.md")).read_text()
