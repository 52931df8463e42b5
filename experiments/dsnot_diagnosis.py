"""Why DSnoT does not lower Wanda's perplexity on the embedded SmolLM2 (docs/results_notes.md).

DSnoT swaps pruned and kept weights in each row so that the row's *expected* output error, the
error's mean over tokens (``sum_j W_ij * M_ij * mean_j``), shrinks towards zero; the loss cares
about the error itself. On the dense model's inputs, for the attention projections DSnoT refines
by default (q, k, v, o) of every third block, this prints for Wanda's mask and for DSnoT's
refinement of it, on the calibration windows the statistics come from and on held-out windows:

- ``mean err``: the row's mean output error in units of the dense output's RMS, averaged over
  rows (what DSnoT drives to zero);
- ``rel mse``: ``||X (W * M)^T||^2 / ||X W^T||^2``, the share of the dense output's energy the
  mask removes (what the next layer sees);
- ``mean share`` (in the summary): the part of that error energy that is the error's mean over
  tokens, the most DSnoT can remove.

    .venv/bin/python experiments/dsnot_diagnosis.py [--nsamples 32 --seqlen 256 --sparsity 0.5]
    .venv/bin/python experiments/dsnot_diagnosis.py --nm 2:4

Same calibration as the results sweep (Austen train split, seed 0); held out: the test split.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

from gblm.calibration.stats import LinearStats
from gblm.data.calibration import sample_windows
from gblm.data.sources import load_documents
from gblm.methods.registry import build_method
from gblm.models.layers import decoder_layers, prunable_linears
from gblm.models.loading import ModelSpec, load_model, load_tokenizer
from gblm.pruning.sparsity import Sparsity

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _inputs(model: nn.Module, windows: Tensor, blocks: list[int]) -> dict[str, list[Tensor]]:
    """Per-window inputs (T, d_in) of the attention projections of ``blocks``, dense model."""
    seen: dict[str, list[Tensor]] = {}
    handles = []
    for b in blocks:
        for name, lin in prunable_linears(decoder_layers(model)[b]).items():
            if name.split(".")[-1] not in TYPES:
                continue
            key = f"{b}.{name}"
            seen[key] = []

            def hook(_m, args, _out, key=key):
                seen[key].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

            handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for window in windows:
            model(window.reshape(1, -1))
    for h in handles:
        h.remove()
    return seen


def _stats(samples: list[Tensor]) -> LinearStats:
    """The walk's statistics for DSnoT after Wanda, folded one window at a time."""
    stats = LinearStats.empty(frozenset({"row_sq", "mean", "var"}), samples[0].shape[-1], "cpu")
    for x in samples:
        stats.fold(x.unsqueeze(0))
    return stats


def _errors(weight: Tensor, mask: Tensor, samples: list[Tensor]) -> tuple[float, float, float]:
    """(mean err, rel mse, mean share) of the pruned part ``weight * mask`` on ``samples``."""
    x = torch.cat(samples).double()  # (tokens, d_in)
    dense = x @ weight.double().T  # (tokens, d_out)
    error = x @ (weight.double() * mask).T
    rms = dense.pow(2).mean(0).sqrt().clamp_min(1e-12)  # (d_out,)
    mean_err = (error.mean(0).abs() / rms).mean().item()
    rel_mse = (error.pow(2).sum() / dense.pow(2).sum()).item()
    mean_share = (error.mean(0).pow(2).sum() * len(x) / error.pow(2).sum()).item()
    return mean_err, rel_mse, mean_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nm", default=None, help="N:M instead of --sparsity, e.g. 2:4")
    parser.add_argument("--every", type=int, default=3, help="every k-th block")
    args = parser.parse_args()
    began = time.perf_counter()
    tokenizer = load_tokenizer(ModelSpec())
    model = load_model(ModelSpec(), torch.device("cpu"), torch.float32, tokenizer)
    draw = lambda split: sample_windows(  # noqa: E731
        tokenizer, load_documents("austen", split), args.nsamples, args.seqlen, seed=0
    )
    blocks = list(range(0, len(decoder_layers(model)), args.every))
    calib, held = _inputs(model, draw("train"), blocks), _inputs(model, draw("test"), blocks)
    wanda, dsnot = build_method("wanda"), build_method("dsnot", initial="wanda")
    if args.nm:
        n, m = map(int, args.nm.split(":"))
        target = Sparsity(n / m, n, m)
    else:
        target = Sparsity(args.sparsity)
    totals = {key: [0.0] * 12 for key in TYPES}
    print(
        f"{'linear':<22} {'swapped':>8}  mean err calib / held (wanda -> dsnot)"
        "   rel mse calib / held (wanda -> dsnot)"
    )
    for key, samples in calib.items():
        b, name = key.split(".", 1)
        linear = prunable_linears(decoder_layers(model)[int(b)])[name]
        weight, stats = linear.weight.data, _stats(samples)
        initial = wanda.select(wanda.score(key, weight, stats), target)
        refined = dsnot.refine(key, linear, stats, initial, target)
        row = []
        for mask in (initial, refined):
            row += [*_errors(weight, mask, samples), *_errors(weight, mask, held[key])]
        w, d = row[:6], row[6:]  # calib (mean err, rel mse, share), held (...): wanda, dsnot
        print(
            f"{key:<22} {(initial ^ refined).float().mean().item():8.4f}  "
            f"{w[0]:.4f}->{d[0]:.4f} / {w[3]:.4f}->{d[3]:.4f}    "
            f"{w[1]:.4f}->{d[1]:.4f} / {w[4]:.4f}->{d[4]:.4f}"
        )
        kind = name.split(".")[-1]
        totals[kind] = [t + v for t, v in zip(totals[kind], w + d, strict=True)]
    print(
        "\nmean over blocks: mean err calib, held | rel mse calib, held | wanda's mean share, held"
    )
    count = len(blocks)
    for kind, t in totals.items():
        t = [v / count for v in t]
        print(
            f"{kind:<7} wanda {t[0]:.4f} {t[3]:.4f} -> dsnot {t[6]:.4f} {t[9]:.4f} | "
            f"wanda {t[1]:.4f} {t[4]:.4f} -> dsnot {t[7]:.4f} {t[10]:.4f} | {t[5]:.3f}"
        )
    print(
        f"\n{target.label} sparsity, {count} blocks, {args.nsamples} x {args.seqlen} windows, "
        f"{time.perf_counter() - began:.0f} s"
    )


if __name__ == "__main__":
    main()
