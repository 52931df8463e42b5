"""``python -m benchmarks.gpu``: GBLM-Pruner end to end on a LLaMA-2-7B-shaped model, one GPU.

The performance goal on a GPU: gradients + layer walk (GBLM end to end) under 120 s with the peak
GPU memory under 40 GB, and a WikiText-2-sized perplexity evaluation (166 windows of 2048 tokens)
under 30 s, on one H100. No weights or data can be downloaded, so the model is LLaMA-2-7B's
shape with a seeded random init (``--shape llama2_7b``) and the calibration and evaluation
tokens are seeded random ids: the arithmetic, the memory and the time are those of the real
model; the perplexities mean nothing.

Stages, each timed between device synchronisations, with its peak allocated GPU memory:
the gradient stage (N windows, batch of one, fp16 accumulators), the layer walk (capture,
statistics, scoring and masking, re-forward), the evaluation; with ``--floors`` also N plain
forward+backward passes (the gradient stage's floor) and 2N forward passes of the blocks (the
walk's floor), so each stage's ratio to its floor is printed. The report (JSON and Markdown)
goes to ``--out`` (default ``outputs/bench``).

On a machine without a GPU it runs the same code on the CPU (``--shape tiny`` for seconds), which
is how its code path is tested.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks import flops
from benchmarks.work import WALK_STAGES, _TimedMasking, block_passes, gradient_floor, timed_walk
from gblm.calibration.capture import capture_block_inputs
from gblm.calibration.gradients import gradient_norms
from gblm.calibration.sequential import prune_model
from gblm.eval.perplexity import perplexity
from gblm.methods.registry import build_method
from gblm.models.layers import decoder_layers, prunable_linears
from gblm.paths import PROJECT_ROOT
from gblm.pruning.sparsity import Sparsity
from gblm.utils import atomic_write_text

SHAPES = {
    # LLaMA-2-7B (meta-llama/Llama-2-7b-hf config.json)
    "llama2_7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    # a few seconds on a CPU: the code path of the benchmark, for its test
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    ),
}
WIKITEXT2_WINDOWS = 166  # the WikiText-2 test split in LLaMA tokens, in windows of 2048
GOALS = {"gblm_end_to_end_s": 120.0, "gblm_peak_gb": 40.0, "evaluation_s": 30.0}


@dataclass
class Clock:
    """Stage times between device synchronisations, and each stage's peak allocated memory.

    Stages nest (the walk's own stages run inside ``walk``): the device's peak counter is reset
    at every entry, so before each reset the peak so far is handed to every stage still open.
    """

    device: torch.device
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    _open: list[dict[str, float]] = field(default_factory=list)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _fold_peak(self) -> None:
        if self.device.type != "cuda":
            return
        peak = torch.cuda.max_memory_allocated(self.device)
        for entry in self._open:
            entry["peak_bytes"] = max(entry["peak_bytes"], peak)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        entry = self.stages.setdefault(name, {"seconds": 0.0, "peak_bytes": 0, "entries": 0})
        self._sync()
        self._fold_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open.append(entry)
        began = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            entry["seconds"] += time.perf_counter() - began
            entry["entries"] += 1
            self._fold_peak()
            self._open.pop()


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-init LLaMA of ``shape``, made directly on ``device`` in ``dtype`` (seeded)."""
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_ids(rows: int, cols: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, cols), generator=gen).to(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype
    ]
    say = print if args.verbose else (lambda *_a, **_k: None)
    began = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    counts = flops.model_counts(model)
    vocab = model.config.vocab_size
    windows = random_ids(args.nsamples, args.seqlen, vocab, 0, device)  # (N, T)
    eval_tokens = random_ids(1, args.eval_windows * args.seqlen, vocab, 1, device)
    say(f"model built in {time.perf_counter() - began:.1f} s: {counts.params / 1e9:.2f}B params")
    clock = Clock(device)

    if args.floors:
        with clock.stage("floor: N fwd+bwd"):
            gradient_floor(model, windows)
        inputs = capture_block_inputs(
            model, windows, batch_size=args.batch_size, storage_device=device
        )
        with clock.stage("floor: 2N block forwards"):
            block_passes(model, inputs, device=device)
        del inputs
        say("floors done")

    method = build_method("gblm", gradient_blockwise=args.checkpointing)
    with clock.stage("gradient stage"):  # GBLM's dense-model pass, as its prepare runs it
        norms = gradient_norms(model, windows, method.gradients, progress=args.verbose)
    if args.norms_on_cpu:  # the walk moves each Linear's norms to the device as it prunes it
        norms = {name: g.cpu() for name, g in norms.items()}
    say("gradient stage done")
    method.set_gradient_norms(norms)
    with clock.stage("walk"), timed_walk(clock):
        prune_model(
            model,
            _TimedMasking(method, clock),
            Sparsity(args.sparsity),
            windows,
            device=device,
            batch_size=args.batch_size,
            progress=args.verbose,
        )
    method.release()
    del norms
    say("walk done")
    zeros = total = 0
    for block in decoder_layers(model):
        for linear in prunable_linears(block).values():
            zeros += int((linear.weight == 0).sum())
            total += linear.weight.numel()
    with clock.stage("evaluation"):
        ppl = perplexity(
            model, eval_tokens, args.seqlen, device=device, batch_size=args.eval_batch_size,
            progress=args.verbose,
        )  # fmt: skip
    result = report(args, counts, clock, ppl, time.perf_counter() - began)
    result["sparsity"] = zeros / total
    return result


def report(args, counts, clock: Clock, ppl: float, seconds: float) -> dict[str, Any]:
    stages = clock.stages
    n, t = args.nsamples, args.seqlen
    end_to_end = stages["gradient stage"]["seconds"] + stages["walk"]["seconds"]
    peak = max(stages["gradient stage"]["peak_bytes"], stages["walk"]["peak_bytes"])
    measured = {
        "gblm_end_to_end_s": end_to_end,
        "gblm_peak_gb": peak / 1e9,
        "evaluation_s": stages["evaluation"]["seconds"],
    }
    out: dict[str, Any] = {
        "settings": vars(args),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "params": counts.params,
        "linear_params": counts.linear_params,
        "stages": stages,
        "flop": {
            "gradient_floor": flops.forward_backward_flops(counts, n, t),
            "walk_floor": 2 * flops.block_forward_flops(counts, n, t),
            "evaluation": flops.model_forward_flops(counts, args.eval_windows, t),
        },
        "measured": measured,
        "goals": GOALS,
        "verdicts": {k: ("MET" if measured[k] <= GOALS[k] else "MISSED") for k in GOALS},
        "ppl_random": ppl,
        "seconds": seconds,
    }
    if "floor: N fwd+bwd" in stages:
        out["ratios"] = {
            "gradient stage / N fwd+bwd": stages["gradient stage"]["seconds"]
            / stages["floor: N fwd+bwd"]["seconds"],
            "walk / 2N block forwards": stages["walk"]["seconds"]
            / stages["floor: 2N block forwards"]["seconds"],
        }
    return out


def render(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        f"# gblm GPU benchmark: GBLM-Pruner on {s['shape']} ({r['params'] / 1e9:.2f}B parameters,"
        f" random init), {r['device']}, torch {r['torch']}, {s['dtype']}",
        "",
        f"N={s['nsamples']} x T={s['seqlen']}, sparsity {s['sparsity']}, walk batch "
        f"{s['batch_size']}, checkpointing {s['checkpointing']}, evaluation {s['eval_windows']} "
        f"windows; {r['seconds']:.0f} s in all; decoder Linears {100 * r['sparsity']:.2f}% zero.",
        "",
        "| stage | s | peak GB | TFLOP/s |",
        "|---|---|---|---|",
    ]
    flop_of = {
        "floor: N fwd+bwd": r["flop"]["gradient_floor"],
        "gradient stage": r["flop"]["gradient_floor"],
        "floor: 2N block forwards": r["flop"]["walk_floor"],
        "walk": r["flop"]["walk_floor"],
        "evaluation": r["flop"]["evaluation"],
    }
    for name, st in r["stages"].items():
        rate = flop_of.get(name)
        tflops = f"{rate / st['seconds'] / 1e12:.0f}" if rate and st["seconds"] > 0 else "-"
        label = f"walk: {name}" if name in WALK_STAGES else name
        lines.append(f"| {label} | {st['seconds']:.2f} | {st['peak_bytes'] / 1e9:.2f} | {tflops} |")
    lines += ["", "| goal | measured | target | verdict |", "|---|---|---|---|"]
    for key, goal in r["goals"].items():
        lines.append(f"| {key} | {r['measured'][key]:.2f} | {goal:g} | {r['verdicts'][key]} |")
    for key, value in r.get("ratios", {}).items():
        lines.append(f"\n{key}: {value:.2f}x")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward in the walk")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument(
        "--checkpointing", action="store_true", help="the gradient stage block by block (recompute)"
    )
    p.add_argument("--norms-on-cpu", action="store_true", help="keep gradient norms on the host")
    p.add_argument("--floors", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=True)
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
    result = run(args)
    text = render(result)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"gpu-{stamp}.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(args.out / f"gpu-{stamp}.md", text)
    print(text)
    print(f"written: {args.out}/gpu-{stamp}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
