"""``python -m benchmarks.run [--quick | --smoke]``: every method's stages against their floors.

Each method prunes SmolLM2-135M at the demo's calibration size (32 windows x 256 tokens, 50%
unstructured) in a fresh process (:func:`benchmarks.measure.measure`), then the pruned model's
perplexity on 4 windows. Per method and stage: the seconds the pipeline's timer gave, the floor
(the stage's FLOPs at the matmul rate and its bytes at the copy bandwidth, both measured in that
process just before the run) and the ratio; per method: the peak resident memory above the
process's own after its imports, beside the memory floor (weights + one block's scratch +
N x T x hidden activations + the method's state). ``--quick``: 8 x 128; ``--smoke``: a tiny
LLaMA in this process (seconds, for the tests).

The report goes to stdout and to ``outputs/bench/<timestamp>.json`` and ``.md``; progress to
stderr. A missed target is a finding in the verdicts, not an exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import EVALUATION, Config, machine, measure
from gblm.paths import PROJECT_ROOT
from gblm.pipeline import PRUNE
from gblm.utils import atomic_write_text

SMOLLM2 = {"smollm2": True}
TINY = {"llama": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "vocab_size": 512}}  # fmt: skip
#: The benchmarked runs: a method, or ``method@allocator``.
METHODS = ("magnitude", "wanda", "sparsegpt", "gblm", "wanda@owl")
#: Ratio to the floor each stage should stay within (GBLM end to end: its gradients + walk).
TARGETS = {"gradients": 1.3, PRUNE: 2.0, "gblm end to end": 1.5}
MODES = {  # model, windows, tokens, evaluation windows, fresh process per measurement
    "default": (SMOLLM2, 32, 256, 4, True),
    "quick": (SMOLLM2, 8, 128, 2, True),
    "smoke": (TINY, 2, 32, 1, False),
}
MIB = 2**20


def num(value: float) -> str:
    """Three significant digits."""
    return f"{value:.3g}"


def config_of(spec: str, model: dict, nsamples: int, seqlen: int, **extra: Any) -> Config:
    """The :class:`Config` of ``method`` or ``method@allocator``."""
    method, _, allocator = spec.partition("@")
    return Config(model=model, method=method, allocator=allocator or "uniform",
                  nsamples=nsamples, seqlen=seqlen, **extra)  # fmt: skip


def judged(result: dict[str, Any]) -> dict[str, Any]:
    """A measurement's stages against their floors, its end to end, its memory against its floor.

    A stage's floor: its FLOPs at the measured matmul rate plus its bytes at the measured copy
    bandwidth. End to end: the pipeline's stages (the evaluation left out).
    """
    rates, stages = result["rates"], {}
    for stage, seconds in result["seconds"].items():
        floor = result["floors"][stage]
        floor_s = floor["flops"] / rates["matmul_flops"] + floor["bytes"] / rates["copy_bytes"]
        stages[stage] = {"seconds": seconds, "floor_s": floor_s, "ratio": seconds / floor_s,
                         "flops": floor["flops"], "bytes": floor["bytes"],
                         "peak_bytes": result["stage_peak_bytes"].get(stage)}  # fmt: skip
    pipeline_stages = [s for name, s in stages.items() if name != EVALUATION]
    seconds = sum(s["seconds"] for s in pipeline_stages)
    floor_s = sum(s["floor_s"] for s in pipeline_stages)
    # the run's peak: the build and the pipeline's stages (the evaluation's logits left out)
    peaks = {n: p for n, p in result["stage_peak_bytes"].items() if n != EVALUATION}
    peaks["build"] = result["build_peak_bytes"] or 0
    peak_in = max(peaks, key=peaks.__getitem__) if len(peaks) > 1 else None
    peak = peaks[peak_in] if peak_in else result["peak_bytes"]
    held = peak - result["baseline_bytes"]
    return {
        "stages": stages,
        "end_to_end": {"seconds": seconds, "floor_s": floor_s, "ratio": seconds / floor_s},
        "memory": {
            "peak_bytes": peak,
            "peak_in": peak_in,
            "process_peak_bytes": result["peak_bytes"],
            "baseline_bytes": result["baseline_bytes"],
            "held_bytes": held,
            "floor": result["memory_floor"],
            "ratio": held / result["memory_floor"]["total"],
        },
        "sparsity": result["sparsity"],
        "ppl": result["ppl"],
        "masks_sha256": result["masks_sha256"],
        "rates": rates,
        "counts": result["counts"],
    }


def verdicts(methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target this run can judge: GBLM's gradients and end to end, every calibrated walk."""
    rows = []
    for label, m in methods.items():
        checks = [(f"{label}: {PRUNE}", m["stages"].get(PRUNE), TARGETS[PRUNE])]
        if label == "gblm":
            checks += [("gblm: gradients", m["stages"].get("gradients"), TARGETS["gradients"]),
                       ("gblm: end to end", m["end_to_end"], TARGETS["gblm end to end"])]  # fmt: skip
        for name, entry, target in checks:
            if entry is None or (name.endswith(PRUNE) and not entry["flops"]):
                continue  # magnitude's walk has no products: no target
            rows.append({"target": name, "ratio": entry["ratio"], "limit": target,
                         "met": entry["ratio"] <= target})  # fmt: skip
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def stage_table(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Per method and stage: seconds, floor, ratio, peak; then the method end to end."""
    rows = []
    for label, m in methods.items():
        for stage, s in m["stages"].items():
            peak = "-" if s["peak_bytes"] is None else f"{s['peak_bytes'] / MIB:.0f}"
            rows.append([label, stage, num(s["seconds"]), num(s["flops"] / 1e9),
                         num(s["floor_s"]), f"{s['ratio']:.2f}x", peak])  # fmt: skip
        e = m["end_to_end"]
        rows.append([label, "**end to end**", num(e["seconds"]), "", num(e["floor_s"]),
                     f"{e['ratio']:.2f}x", f"{m['memory']['peak_bytes'] / MIB:.0f}"])  # fmt: skip
    header = ["method", "stage", "seconds", "GFLOP", "floor s", "ratio", "peak RSS MiB"]
    return table(header, rows)


def memory_table(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Per method: peak above the baseline against the memory floor, by part."""
    rows = []
    for label, m in methods.items():
        mem, floor = m["memory"], m["memory"]["floor"]
        parts = ("weights", "block_scratch", "activations", "method_state", "total")
        rows.append([label, f"{mem['peak_bytes'] / MIB:.0f}", mem["peak_in"] or "-",
                     f"{mem['baseline_bytes'] / MIB:.0f}",
                     f"{mem['held_bytes'] / MIB:.0f}", *(f"{floor[p] / MIB:.1f}" for p in parts),
                     f"{mem['ratio']:.2f}x"])  # fmt: skip
    header = ["method", "peak RSS MiB", "peak in", "after imports", "held", "floor: weights",
              "block scratch", "activations", "method state", "floor", "held / floor"]  # fmt: skip
    return table(header, rows)


def render(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    m, methods = report["machine"], report["methods"]
    rates = next(iter(methods.values()))["rates"]
    lines = [
        f"# gblm benchmark ({report['mode']} mode): {report['model']}, {report['nsamples']} x "
        f"{report['seqlen']} calibration, 50% unstructured",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads; load "
        f"average at start {m['load_average']}; matmul {rates['matmul_flops'] / 1e9:.0f} "
        f"GFLOP/s, copy {rates['copy_bytes'] / 1e9:.1f} GB/s (the first run's); "
        f"{report['seconds']:.0f} s in all.",
        "",
        "Seconds: the pipeline's own stage timer (`gblm.pipeline.prune`; the perplexity stage "
        "timed by the benchmark in the same timer), one fresh process per method. Floor: the "
        "stage's matrix-product FLOPs at the matmul rate plus the bytes it must move at the copy "
        "bandwidth, both measured in that process. Peak RSS: the resident high-water mark, "
        "reset at each stage's start.",
        "",
        *stage_table(methods),
        "Memory: the peak resident set while the model was built and pruned (the evaluation "
        "left out), the resident set after the imports, the difference (what the run held) "
        "against the floor.",
        "",
        *memory_table(methods),
        "## Targets",
        "",
        *table(
            ["target", "ratio", "limit", "verdict"],
            [
                [
                    v["target"],
                    f"{v['ratio']:.2f}x",
                    f"{v['limit']}x",
                    "MET" if v["met"] else "missed",
                ]
                for v in report["verdicts"]
            ],
        ),  # fmt: skip
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_report(prefix: str, report: dict[str, Any], text: str, out: Path) -> Path:
    """``<out>/<prefix><timestamp>.json`` and ``.md``; returns the Markdown's path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    atomic_write_text(out / f"{prefix}{stamp}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / f"{prefix}{stamp}.md", text)
    return out / f"{prefix}{stamp}.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="8 x 128 calibration")
    speed.add_argument("--smoke", action="store_true", help="a tiny LLaMA, in-process (tests)")
    parser.add_argument("--methods", default=",".join(METHODS), help="method or method@allocator")
    parser.add_argument("--nsamples", type=int, help="calibration windows N")
    parser.add_argument("--seqlen", type=int, help="tokens per window T")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "bench")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "default"
    model, nsamples, seqlen, eval_windows, fresh = MODES[mode]
    nsamples, seqlen = args.nsamples or nsamples, args.seqlen or seqlen
    report: dict[str, Any] = {"mode": mode, "model": "smollm2_135m" if model is SMOLLM2 else
                              "tiny llama", "nsamples": nsamples, "seqlen": seqlen,
                              "machine": machine(), "methods": {}}  # fmt: skip
    began = time.perf_counter()
    for spec in args.methods.split(","):
        print(f"bench: {spec} ...", file=sys.stderr, flush=True)
        config = config_of(spec, model, nsamples, seqlen, eval_windows=eval_windows,
                           threads=args.threads)  # fmt: skip
        report["methods"][spec] = judged(measure(config, fresh=fresh))
    report["machine"]["threads"] = args.threads or report["machine"]["threads"]
    report["verdicts"] = verdicts(report["methods"])
    report["seconds"] = time.perf_counter() - began
    text = render(report)
    path = write_report("", report, text, args.out)
    print(text)
    print(f"written: {path} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
