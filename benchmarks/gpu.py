"""``python -m benchmarks.gpu``: GBLM-Pruner end to end on a LLaMA-2-7B-shaped model, one GPU.

The performance goal on a GPU: gradients + layer walk (GBLM end to end) under 120 s with the peak
GPU memory under 40 GB, and a WikiText-2-sized perplexity evaluation (166 windows of 2048 tokens)
under 30 s, on one H100. No weights or data can be downloaded, so the model is LLaMA-2-7B's
shape with a seeded random init (``--shape llama2_7b``) and the calibration and evaluation
tokens are seeded random ids: the arithmetic, the memory and the time are those of the real
model; the perplexity means nothing.

One measurement (:func:`benchmarks.measure.measure`, a fresh process): the model built on the
GPU, pruned through :func:`gblm.pipeline.prune` (GBLM's ``gradients``, then the walk,
``prune``), then evaluated; each stage's seconds between device synchronisations (a listener
on the pipeline's stage timer) and its peak allocated GPU memory, beside its FLOP floor at the
matmul rate measured on the device in the model's dtype. On a machine without a GPU the same
code runs on the CPU (``--shape tiny --in-process`` for seconds), which is how it is tested.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import EVALUATION, Config, measure
from benchmarks.run import judged, num, table, write_report
from gblm.paths import PROJECT_ROOT
from gblm.pipeline import PRUNE

SHAPES = {
    # LLaMA-2-7B (meta-llama/Llama-2-7b-hf config.json)
    "llama2_7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    # a few seconds on a CPU: the code path of the benchmark, for its test
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 172,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
             "max_position_embeddings": 256, "rms_norm_eps": 1e-5},
}  # fmt: skip
WIKITEXT2_WINDOWS = 166  # the WikiText-2 test split in LLaMA tokens, in windows of 2048
GOALS = {"gblm_end_to_end_s": 120.0, "gblm_peak_gb": 40.0, "evaluation_s": 30.0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The measurement and its verdicts against :data:`GOALS`."""
    config = Config(
        model={"llama": SHAPES[args.shape]}, method="gblm",
        options={"gradient_blockwise": args.checkpointing}, sparsity=args.sparsity,
        nsamples=args.nsamples, seqlen=args.seqlen, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size, eval_windows=args.eval_windows,
        eval_batch_size=args.eval_batch_size,
    )  # fmt: skip
    result = measure(config, fresh=not args.in_process)
    if result["synced_seconds"]:  # on a GPU: the seconds between synchronisations
        result["seconds"] = result["synced_seconds"]
    out = judged(result)
    stages = out["stages"]
    measured = {
        "gblm_end_to_end_s": stages["gradients"]["seconds"] + stages[PRUNE]["seconds"],
        "gblm_peak_gb": max(stages["gradients"]["peak_bytes"], stages[PRUNE]["peak_bytes"]) / 1e9,
        "evaluation_s": stages[EVALUATION]["seconds"],
    }
    return {
        **out, "settings": {**vars(args), "out": str(args.out)}, "device": result["device_name"],
        "torch": torch.__version__, "measured": measured, "goals": GOALS,
        "verdicts": {k: "MET" if measured[k] <= GOALS[k] else "MISSED" for k in GOALS},
        "ppl_random": result["ppl"],
    }  # fmt: skip


def render(r: dict[str, Any]) -> str:
    s, c = r["settings"], r["counts"]
    rows = [
        [name, num(st["seconds"]), f"{(st['peak_bytes'] or 0) / 1e9:.2f}",
         f"{st['flops'] / st['seconds'] / 1e12:.1f}", num(st["floor_s"]), f"{st['ratio']:.2f}x"]
        for name, st in r["stages"].items()
    ]  # fmt: skip
    goals = [
        [key, f"{r['measured'][key]:.2f}", f"{goal:g}", r["verdicts"][key]]
        for key, goal in r["goals"].items()
    ]
    return "\n".join([
        f"# gblm GPU benchmark: GBLM-Pruner on {s['shape']} ({c['params'] / 1e9:.2f}B parameters, "
        f"random init), {r['device']}, torch {r['torch']}, {s['dtype']}",
        "",
        f"N={s['nsamples']} x T={s['seqlen']}, sparsity {s['sparsity']}, batch {s['batch_size']}, "
        f"checkpointing {s['checkpointing']}, evaluation {s['eval_windows']} windows; matmul "
        f"{r['rates']['matmul_flops'] / 1e12:.0f} TFLOP/s; decoder Linears "
        f"{100 * r['sparsity']:.2f}% zero.",
        "",
        *table(["stage", "s", "peak GB", "TFLOP/s", "floor s", "ratio"], rows),
        *table(["goal", "measured", "target", "verdict"], goals),
    ])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2_7b" if cuda else "tiny")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (2048)")
    p.add_argument("--eval-windows", type=int, default=None, help=f"({WIKITEXT2_WINDOWS})")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--checkpointing", action="store_true", help="the gradient stage block by block")
    p.add_argument("--in-process", action="store_true", help="no fresh process (tests)")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "bench")
    args = p.parse_args(argv)
    big = args.shape == "llama2_7b"
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    args.nsamples = args.nsamples or (128 if big else 4)
    args.seqlen = args.seqlen or (2048 if big else 64)
    args.eval_windows = args.eval_windows or (WIKITEXT2_WINDOWS if big else 2)
    if not math.isfinite(args.sparsity) or not 0 <= args.sparsity < 1:
        p.error(f"--sparsity {args.sparsity}: must lie in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - began
    text = render(result)
    print(text)
    print(f"written: {write_report('gpu-', result, text, args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
