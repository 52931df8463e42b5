"""``python -m benchmarks.floor``: the product's CPU passes against their FLOP floor.

Each size runs as a user runs gblm: the model freshly loaded (its weights as the loader maps
them), torch's default threads, every default (``batch_size=auto``). Timed: GBLM-Pruner's
gradient stage (:func:`gblm.calibration.gradients.gradient_norms`) and the Wanda walk
(:func:`gblm.calibration.sequential.prune_model`). Each is priced against its FLOP floor: its
analytic FLOPs (:mod:`benchmarks.flops`) at the fp32 matmul rate measured in the same run at the
same threads (best of five 1024 x 1024 products). Targets: the walk within 2x of its floor, the
gradient stage within 1.3x.

Beside each stage, its matrix products alone (:func:`matmul_replay`): every product the stage
forms, at the batch it uses, replayed on random operands into preallocated outputs. The stage over
its floor then splits into the products' own shortfall (replay / floor) and everything else
(stage / replay: elementwise work, attention, the loss, the fold, memory, Python).

A wider model follows SmolLM2 (``--wide``, default a LLaMA shape 2048 wide, 4 blocks, vocab
32000, 8 x 256). Every pass goes one window at a time (``batch_size=auto``).

A second, instrumented walk on a fresh copy breaks the walk down into its parts, each timed by
wrapping the function that does it (the walk has no timing parameters): block-0 capture, the
hooked forwards (``statistics``; the hooks' folding of the statistics is timed apart), scoring,
mask selection, refinement, zeroing, packing the masks, copying mapped weights into private
memory, the re-forward; per block and per Linear. The forwards scale with the calibration; the
per-Linear parts are the fixed cost that does not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gblm.calibration.sequential as sequential
import gblm.methods.base as method_base
from benchmarks import flops
from benchmarks.cases import SMOLLM2, ModelCase, llama_case, random_ids
from benchmarks.suite import machine_info, matmul_rate
from gblm.calibration.gradients import decoder_linear_names, gradient_norms
from gblm.calibration.sequential import prune_model
from gblm.calibration.stats import LinearStats
from gblm.methods.registry import build_method
from gblm.paths import PROJECT_ROOT
from gblm.pruning.sparsity import Sparsity
from gblm.pruning.storage import PackedMasks
from gblm.utils import atomic_write_text

TARGETS = {"gradient stage": 1.3, "walk": 2.0}
#: The walk's parts: (where the function lives, its name, the part it is timed as).
_PARTS = (
    (sequential, "capture_block_inputs", "capture"),
    (sequential, "gather_statistics", "statistics (hooked forwards)"),
    (sequential, "reforward_block", "re-forward"),
    (sequential, "privatize_parameters", "copies (mapped weights to private memory)"),
    (method_base, "select_mask", "mask selection"),
    (method_base, "zero_masked_", "zeroing"),
)
#: Parts inside another part's time: the folds inside the hooked forwards, the rest inside
#: the method's per-Linear step.
_NESTED = {"statistics folds (in hooks)", "scoring", "mask selection", "zeroing"}


class _Clock:
    """Seconds and calls per part; nested parts are counted in their parent too."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - began
                self.calls[part] += 1

        return timed


@contextlib.contextmanager
def _instrumented(clock: _Clock, method: nn.Module) -> Iterator[None]:
    """Every part of the walk timed by ``clock``; everything put back afterwards."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in _PARTS]
    saved += [(LinearStats, "fold", LinearStats.fold), (PackedMasks, "add", PackedMasks.add)]
    try:
        for owner, name, part in _PARTS:
            setattr(owner, name, clock.wrap(part, getattr(owner, name)))
        LinearStats.fold = clock.wrap("statistics folds (in hooks)", LinearStats.fold)
        PackedMasks.add = clock.wrap("packing masks", PackedMasks.add)
        method.score = clock.wrap("scoring", method.score)
        method.prune_linear = clock.wrap("per-Linear step", method.prune_linear)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        vars(method).pop("score", None)
        vars(method).pop("prune_linear", None)


def _timed(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _timed_fresh(case: ModelCase, work: Callable[[nn.Module], Any]) -> float:
    """Seconds of ``work`` on a freshly loaded model (the load itself untimed)."""
    model = case.build()
    return _timed(lambda: work(model))


def walk_breakdown(case: ModelCase, windows: torch.Tensor) -> dict[str, Any]:
    """The Wanda walk on a freshly loaded model, every part timed; seconds, calls, per block
    and per Linear."""
    model = case.build()
    method = build_method("wanda")
    clock = _Clock()
    with _instrumented(clock, method):
        total = _timed(
            lambda: prune_model(
                model, method, Sparsity(0.5), windows, device="cpu", progress=False
            )  # fmt: skip
        )
    counts = flops.model_counts(model)
    linears = clock.calls["per-Linear step"]
    parts = dict(clock.seconds)
    outer = sum(seconds for part, seconds in parts.items() if part not in _NESTED)
    parts["other (loop, moves, logging)"] = max(0.0, total - outer)
    rows = {
        part: {
            "seconds": seconds,
            "share": seconds / total,
            "per_block_ms": 1e3 * seconds / counts.blocks,
            "per_linear_ms": 1e3 * seconds / max(linears, 1),
            "calls": clock.calls.get(part, 0),
        }
        for part, seconds in parts.items()
    }
    return {"total_s": total, "blocks": counts.blocks, "linears": linears, "parts": rows}


def _best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()  # warm: operands and output touched, kernels chosen
    return min(_timed(fn) for _ in range(repeats))


def _product_seconds(kind: str, batch: int, seqlen: int, d_in: int, d_out: int) -> float:
    """One product of a Linear (d_in -> d_out) over ``batch`` windows, best of 3: ``forward``
    (x W^T), ``input_grad`` (g W) or ``weight_grad`` (autograd's g^T x, window by window)."""
    gen = torch.Generator().manual_seed(d_in + d_out)
    rows = batch * seqlen
    w = torch.randn(d_out, d_in, generator=gen)
    x = torch.randn(batch, seqlen, d_in, generator=gen)
    g = torch.randn(batch, seqlen, d_out, generator=gen)
    if kind == "forward":
        out = torch.empty(rows, d_out)
        return _best_of(lambda: torch.mm(x.view(rows, d_in), w.t(), out=out))
    if kind == "input_grad":
        out = torch.empty(rows, d_in)
        return _best_of(lambda: torch.mm(g.view(rows, d_out), w, out=out))
    out3 = torch.empty(batch, d_out, d_in)
    return _best_of(lambda: [torch.mm(g[i].t(), x[i], out=out3[i]) for i in range(batch)])


def _batch_sizes(nsamples: int, batch: int) -> dict[int, int]:
    """{windows per call: calls} for ``nsamples`` windows in batches of ``batch``."""
    sizes = {batch: nsamples // batch, nsamples % batch: 1}
    return {size: calls for size, calls in sizes.items() if size and calls}


def matmul_replay(model: nn.Module, windows: Tensor, stage: str) -> dict[str, Any]:
    """Seconds the stage's matrix products alone take, at the batch the stage uses.

    Gradient stage: every decoder Linear's forward, input-gradient and per-window weight-gradient
    product (autograd's, one window at a time), and the LM head's
    forward and input gradient. Walk: every decoder Linear's forward, twice (the hooked forward
    and the re-forward). Each distinct product is timed once, best of 3, on random operands into
    a preallocated output, and counted as often as the stage forms it. Attention's products are
    not replayed (the floor prices them; they are a few percent).
    """
    nsamples, seqlen = windows.shape
    linears = decoder_linear_names(model)
    shapes: dict[tuple[int, int], int] = defaultdict(int)
    for linear in linears.values():
        shapes[(linear.in_features, linear.out_features)] += 1
    if stage == "walk":
        batch = 1  # batch_size=auto: one window
        kinds = {"forward": 2}
        head_kinds: dict[str, int] = {}
    else:  # one window at a time, autograd's products
        batch = 1
        kinds = {"forward": 1, "input_grad": 1, "weight_grad": 1}
        head_kinds = {"forward": 1, "input_grad": 1}
    head = model.get_output_embeddings()
    seconds = 0.0
    for size, calls in _batch_sizes(nsamples, batch).items():
        for (d_in, d_out), count in shapes.items():
            for kind, times in kinds.items():
                seconds += calls * count * times * _product_seconds(kind, size, seqlen, d_in, d_out)
        for kind, times in head_kinds.items():
            seconds += (
                calls
                * times
                * _product_seconds(kind, size, seqlen, head.in_features, head.out_features)
            )
    return {"seconds": seconds, "batch": batch}


def measure_size(
    case: ModelCase, nsamples: int, seqlen: int, rate: float, breakdown: bool = True
) -> dict[str, Any]:
    """Gradient stage and walk as a user runs them, against their floors and their products
    alone (:func:`matmul_replay`), and the walk's breakdown."""
    model = case.build()
    counts = flops.model_counts(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    del model
    windows = random_ids(nsamples, seqlen, vocab, seed=0)
    gradient = _timed_fresh(case, lambda model: gradient_norms(model, windows, progress=False))
    walk = _timed_fresh(
        case,
        lambda model: prune_model(model, build_method("wanda"), Sparsity(0.5), windows,
                                  device="cpu", progress=False),
    )  # fmt: skip
    floors = {
        "gradient stage": flops.forward_backward_flops(counts, nsamples, seqlen) / rate,
        "walk": 2 * flops.block_forward_flops(counts, nsamples, seqlen) / rate,
    }
    model = case.build()
    replays = {name: matmul_replay(model, windows, name) for name in floors}
    del model
    stages = {
        name: {"seconds": seconds, "floor_s": floors[name], "ratio": seconds / floors[name],
               "target": TARGETS[name], "met": seconds / floors[name] <= TARGETS[name],
               "matmuls_s": replays[name]["seconds"], "batch": replays[name]["batch"]}
        for name, seconds in (("gradient stage", gradient), ("walk", walk))
    }  # fmt: skip
    return {
        "model": case.name,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "stages": stages,
        "breakdown": walk_breakdown(case, windows) if breakdown else None,
    }


def render(report: dict[str, Any]) -> str:
    info = report["machine"]
    lines = [
        "# The CPU passes against their FLOP floor "
        f"({', '.join(dict.fromkeys(size['model'] for size in report['sizes']))})",
        "",
        f"{info.get('cpu', '?')}, torch {info.get('torch', '?')}, {report['threads']} threads "
        f"(torch's default); fp32 matmul rate measured in this run: "
        f"{report['matmul_gflops']:.0f} GFLOP/s; load average at start "
        f"{info.get('load_average_at_start', '?')}; {report['seconds']:.0f} s in all.",
        "",
        "Ratio: seconds over the FLOP floor. Matmuls alone: the stage's matrix products replayed "
        "at the batch it uses (windows per call), on random operands into preallocated outputs; "
        "the stage over its floor is their shortfall (matmuls / floor) times everything else "
        "(stage / matmuls).",
        "",
        "| model | windows x tokens | stage | batch | seconds | FLOP floor (s) | ratio | target "
        "| verdict | matmuls alone (s) | matmuls / floor | stage / matmuls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in report["sizes"]:
        for name, s in size["stages"].items():
            lines.append(
                f"| {size['model']} | {size['nsamples']} x {size['seqlen']} | {name} | "
                f"{s['batch']} | {s['seconds']:.1f} | {s['floor_s']:.1f} | {s['ratio']:.2f}x | "
                f"{s['target']:.1f}x | {'MET' if s['met'] else 'missed'} | "
                f"{s['matmuls_s']:.1f} | {s['matmuls_s'] / s['floor_s']:.2f}x | "
                f"{s['seconds'] / s['matmuls_s']:.2f}x |"
            )
    for size in report["sizes"]:
        b = size["breakdown"]
        if b is None:
            continue
        lines += [
            "",
            f"## The walk's parts at {size['nsamples']} x {size['seqlen']} "
            f"({b['total_s']:.1f} s instrumented, {b['blocks']} blocks, {b['linears']} Linears)",
            "",
            "Nested parts (in hooks, mask selection) are also inside their parent's time.",
            "",
            "| part | seconds | share | per block (ms) | per Linear (ms) | calls |",
            "|---|---|---|---|---|---|",
        ]
        for part, r in sorted(b["parts"].items(), key=lambda kv: -kv[1]["seconds"]):
            lines.append(
                f"| {part} | {r['seconds']:.2f} | {100 * r['share']:.1f}% | "
                f"{r['per_block_ms']:.1f} | {r['per_linear_ms']:.2f} | {r['calls']} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__)
    parser.add_argument(
        "--sizes", default="32x256,128x256",
        help="windows x tokens, comma-separated (default: the demo's 32x256 and 128 windows)",
    )  # fmt: skip
    parser.add_argument(
        "--wide", default="2048x4@8x256",
        help="a random LLaMA shape, WIDTHxBLOCKS@WINDOWSxTOKENS (vocab 32000), after SmolLM2; "
        "'' for none",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA, seconds (tests)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "bench")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    case = llama_case(64, 2, (), vocab=512) if args.smoke else SMOLLM2
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    if args.smoke:
        sizes = [(2, 32)]
    began = time.perf_counter()
    rate = matmul_rate(torch.get_num_threads())
    report: dict[str, Any] = {
        "model": case.name,
        "threads": torch.get_num_threads(),
        "matmul_gflops": rate / 1e9,
        "machine": machine_info_for_floor(),
        "sizes": [],
    }
    for nsamples, seqlen in sizes:
        print(f"floor: {case.name} {nsamples} x {seqlen} ...", file=sys.stderr, flush=True)
        report["sizes"].append(measure_size(case, nsamples, seqlen, rate))
    if args.wide and not args.smoke:
        shape, size = args.wide.split("@")
        (width, blocks), (nsamples, seqlen) = (
            [int(v) for v in part.split("x")] for part in (shape, size)
        )
        wide = llama_case(width, blocks, (), vocab=32000)
        print(f"floor: {wide.name} {nsamples} x {seqlen} ...", file=sys.stderr, flush=True)
        report["sizes"].append(measure_size(wide, nsamples, seqlen, rate, breakdown=False))
    report["seconds"] = time.perf_counter() - began
    text = render(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"floor-{stamp}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / f"floor-{stamp}.md", text)
    print(text)
    return 0


def machine_info_for_floor() -> dict[str, Any]:
    from benchmarks.cases import preset

    info = machine_info(preset("smoke"))
    return {key: info.get(key) for key in ("cpu", "torch", "load_average_at_start")}


if __name__ == "__main__":
    raise SystemExit(main())
