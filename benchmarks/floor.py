"""``python -m benchmarks.floor``: GBLM's gradient stage and the Wanda walk against their FLOP floor.

As a user runs them: SmolLM2-135M as the loader maps it, torch's default threads, every default
(``batch_size=auto``), one fresh process per run (:func:`benchmarks.measure.measure`), at the
demo's size (32 windows x 256 tokens) and at 128 x 256, then a random LLaMA shape 2048 wide
(4 blocks, vocab 32000) at 8 x 256 (``--wide``). Each stage as the pipeline's timer gave it,
priced at its FLOPs over the fp32 matmul rate (and its bytes over the copy bandwidth) measured in
the same process just before the run (:func:`benchmarks.run.judged`). Targets: the gradient stage
within 1.3x its floor, the walk within 2x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import Config, machine, measure
from benchmarks.run import SMOLLM2, TARGETS, TINY, judged, num, table, write_report
from gblm.paths import PROJECT_ROOT
from gblm.pipeline import PRUNE

#: (stage as the report names it, the method that runs it, the pipeline's stage name)
STAGES = (("gradient stage", "gblm", "gradients"), ("walk", "wanda", PRUNE))


def wide_llama(width: int, blocks: int) -> dict[str, Any]:
    """A LLaMA ``width`` wide (MLP 8/3 wider, rounded to 8; heads of 64), vocab 32000."""
    heads = max(2, width // 64)
    return {"llama": {"hidden_size": width, "intermediate_size": round(width * 8 / 3 / 8) * 8,
                      "num_hidden_layers": blocks, "num_attention_heads": heads,
                      "vocab_size": 32000}}  # fmt: skip


def measure_size(name: str, model: dict, nsamples: int, seqlen: int, fresh: bool) -> list[dict]:
    """The gradient stage and the walk of ``model`` at N x T, each against its floor."""
    rows = []
    for stage, method, timed in STAGES:
        print(f"floor: {name} {nsamples} x {seqlen}, {method} ...", file=sys.stderr, flush=True)
        config = Config(model=model, method=method, nsamples=nsamples, seqlen=seqlen)
        entry = judged(measure(config, fresh=fresh))["stages"][timed]
        target = TARGETS[timed]
        rows.append({"model": name, "nsamples": nsamples, "seqlen": seqlen, "stage": stage,
                     **entry, "target": target, "met": entry["ratio"] <= target})  # fmt: skip
    return rows


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    rows = [
        [r["model"], f"{r['nsamples']} x {r['seqlen']}", r["stage"], num(r["seconds"]),
         num(r["floor_s"]), f"{r['ratio']:.2f}x", f"{r['target']}x",
         "MET" if r["met"] else "missed"]
        for r in report["rows"]
    ]  # fmt: skip
    return "\n".join(
        [
            "# The CPU passes against their FLOP floor",
            "",
            f"{m['cpu']}, torch {m['torch']}, {m['threads']} threads (torch's default); load "
            f"average at start {m['load_average']}; {report['seconds']:.0f} s in all. Floor: the "
            "stage's FLOPs at the fp32 matmul rate measured in its own process (best of five "
            "1024 x 1024 products) plus the weights it must read and write at the copy bandwidth.",
            "",
            *table(
                [
                    "model",
                    "windows x tokens",
                    "stage",
                    "seconds",
                    "floor s",
                    "ratio",
                    "target",
                    "verdict",
                ],
                rows,
            ),  # fmt: skip
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__)
    parser.add_argument("--sizes", default="32x256,128x256", help="WINDOWSxTOKENS, comma-separated")
    parser.add_argument("--wide", default="2048x4@8x256",
                        help="a random LLaMA, WIDTHxBLOCKS@WINDOWSxTOKENS; '' for none")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA in-process (tests)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "bench")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    report: dict[str, Any] = {"machine": machine(), "rows": []}
    if args.smoke:
        report["rows"] += measure_size("tiny llama", TINY, 2, 32, fresh=False)
    else:
        for size in filter(None, args.sizes.split(",")):
            nsamples, seqlen = (int(v) for v in size.split("x"))
            report["rows"] += measure_size("SmolLM2-135M", SMOLLM2, nsamples, seqlen, fresh=True)
        if args.wide:
            shape, size = args.wide.split("@")
            (width, blocks), (nsamples, seqlen) = (
                (int(v) for v in p.split("x")) for p in (shape, size)
            )
            name = f"LLaMA {width} x {blocks}"
            report["rows"] += measure_size(name, wide_llama(width, blocks), nsamples, seqlen, True)
    report["seconds"] = time.perf_counter() - began
    text = render(report)
    print(text)
    print(f"written: {write_report('floor-', report, text, args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
