"""Judging a benchmark run: the targets, the verdicts, and how time grows with FLOPs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from benchmarks.work import EVALUATION, GRADIENT_STAGE, MASKING

TARGETS = {
    "gradient_stage_vs_floor": 1.3,
    "gblm_end_to_end_vs_floor": 1.5,
    "masking_share": 0.05,
    "sparsegpt_solve_vs_reference": 1.0,
    "gradient_memory_vs_budget": 1.15,
}
PUBLISHED_CALIBRATION = (128, 2048)  # N windows x T tokens of the published protocol

SCALING_QUANTITIES: dict[str, tuple[Callable[[dict], float], Callable[[dict], float]]] = {
    "gradient floor": (
        lambda r: r["floors"]["gradient"]["cpu_s"],
        lambda r: r["flops"]["gradient_floor"],
    ),
    "gradient stage": (
        lambda r: r["methods"]["gblm"]["stages"][GRADIENT_STAGE]["cpu_s"],
        lambda r: r["flops"]["gradient_floor"],
    ),
    "walk floor": (lambda r: r["floors"]["walk"]["cpu_s"], lambda r: r["flops"]["walk_floor"]),
    "wanda walk": (
        lambda r: r["methods"]["wanda"]["walk"]["cpu_s"],
        lambda r: r["flops"]["walk_floor"],
    ),
    "sparsegpt walk": (
        lambda r: r["methods"]["sparsegpt"]["walk"]["cpu_s"],
        lambda r: r["flops"]["walk_floor"] + r["flops"]["hessian"] + r["flops"]["sparsegpt_solve"],
    ),
    "gblm walk": (
        lambda r: r["methods"]["gblm"]["walk"]["cpu_s"],
        lambda r: r["flops"]["walk_floor"],
    ),
    "evaluation": (
        lambda r: r["methods"]["gblm"]["stages"][EVALUATION]["cpu_s"],
        lambda r: r["flops"]["evaluation"],
    ),
}


def scaling_fit(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per quantity: the rate fitted over the tiny models, residuals, log-log slope, SmolLM2 check.

    ``time = FLOPs / rate`` with ``rate`` the geometric mean of the per-model rates (the
    least-squares fit of log time against log FLOPs at slope 1); the residual of a model is its
    time over the fitted time, minus 1. The free log-log slope says how time really grows with
    FLOPs (1 = in proportion; below 1 = fixed costs that the small models do not amortise).
    """
    tiny = [r for r in results if not r["case"]["smollm2"]]
    fits: dict[str, Any] = {}
    for name, (time_of, flops_of) in SCALING_QUANTITIES.items():
        points = [(r["case"]["name"], time_of(r), flops_of(r)) for r in tiny]
        if not points:
            continue
        logs = [(math.log(f), math.log(t)) for _, t, f in points]
        log_rate = sum(lf - lt for lf, lt in logs) / len(logs)
        rate = math.exp(log_rate)
        residuals = {case: t * rate / f - 1.0 for case, t, f in points}
        slope = None
        if len(logs) > 1:
            mx = sum(x for x, _ in logs) / len(logs)
            my = sum(y for _, y in logs) / len(logs)
            sxx = sum((x - mx) ** 2 for x, _ in logs)
            slope = sum((x - mx) * (y - my) for x, y in logs) / sxx if sxx else None
        entry = {
            "gflops_per_cpu_s": rate / 1e9,
            "residuals": residuals,
            "max_abs_residual": max(abs(v) for v in residuals.values()),
            "loglog_slope": slope,
        }
        for r in results:
            if r["case"]["smollm2"]:
                predicted = flops_of(r) / rate
                entry["smollm2"] = {
                    "measured_cpu_s": time_of(r),
                    "predicted_cpu_s": predicted,
                    "residual": time_of(r) / predicted - 1.0,
                }
        fits[name] = entry
    return fits


def _row(case: str, target: str, value: float | None, limit: float, note: str = "") -> dict:
    met = None if value is None else value <= limit
    return {"model": case, "target": target, "value": value, "limit": limit, "met": met,
            "note": note}  # fmt: skip


def _masking_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Magnitude's and Wanda's masking share of the calibration passes, measured and projected."""
    case, rows = r["case"]["name"], []
    scale_up = r["flops"]["walk_floor_published_calibration"] / r["flops"]["walk_floor"]
    for method in ("wanda", "magnitude"):
        walk_share = r["methods"][method]["stages"][MASKING]["ratio_cpu"]
        replayed = r["methods"][method].get("masking_replayed")
        share = replayed["ratio_cpu"] if replayed else walk_share
        how = (
            f"best of {replayed['replays']} replays on the walk's inputs; in the walk "
            f"{100 * walk_share:.1f}%"
            if replayed
            else "timed in the walk"
        )
        target = f"{method} masking / calibration passes"
        rows.append(_row(case, target, share, TARGETS["masking_share"],
                         f"at N={r['nsamples']}, T={r['seqlen']}: {how}"))  # fmt: skip
        rows.append(_row(case, f"{target} (N=128, T=2048)", share / scale_up,
                         TARGETS["masking_share"],
                         "projected: the passes scale with their FLOPs, masking does not"))  # fmt: skip
    return rows


def _memory_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The gradient stage's peak against its budget."""
    memory = r.get("gradient_memory")
    if memory is None:
        return []
    case, limit = r["case"]["name"], TARGETS["gradient_memory_vs_budget"]
    target = "gradient stage peak / (weights + accumulators + 1 sample activations)"
    return [_row(case, target, memory["ratio"], limit, "the published loss")]


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target, per model: the measured value, the target and whether it is met."""
    rows: list[dict[str, Any]] = []
    for r in results:
        case = r["case"]["name"]
        gblm = r["methods"]["gblm"]
        rows.append(_row(case, "gradient stage / N fwd+bwd",
                         gblm["stages"][GRADIENT_STAGE]["ratio_cpu"],
                         TARGETS["gradient_stage_vs_floor"]))  # fmt: skip
        rows.append(_row(case, "GBLM end to end / (grad floor + walk floor)",
                         gblm["end_to_end"]["ratio_cpu"],
                         TARGETS["gblm_end_to_end_vs_floor"]))  # fmt: skip
        rows += _masking_rows(r)
        for row in r.get("sparsegpt_reference", {}).get("rows", []):
            same = "weights identical" if row["weights_identical"] else "WEIGHTS DIFFER"
            rows.append(_row(case, f"SparseGPT solve / published loop ({row['pattern']})",
                             row["ratio"], TARGETS["sparsegpt_solve_vs_reference"], same))  # fmt: skip
        rows += _memory_rows(r)
    return rows
