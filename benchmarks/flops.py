"""Analytic FLOP and byte counts of the calibration passes, from a model's modules.

A Linear with ``p = d_in * d_out`` weights costs ``2 p`` FLOPs per token forward; backward costs
another ``2 p`` for the input gradient and ``2 p`` for the weight gradient when the weight needs
one (the decoder Linears in the gradient stage; the LM head only passes the input gradient on).
Causal attention costs ``2 T^2 H`` per block per sample forward (QK^T and AV over half the
T x T scores, H = heads x head_dim) and about twice that backward. Embeddings, norms, rotary
terms and activation functions are left out (a few percent). SparseGPT's Hessian costs
``2 d_in^2`` per token for every distinct input (q/k/v share one, gate/up another).

A stage's floor (:func:`stage_floors`): the FLOPs of its matrix products, and the bytes it must
move where it has no products to hide them behind (the walk reads and writes every pruned weight).
A run's memory floor (:func:`memory_floor`): the weights, one block's scratch for one window, the
calibration activations (N x T x hidden in the model's dtype) and the state a method must keep.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from gblm.models.layers import decoder_layers, prunable_linears
from gblm.names import module_type

# Linears that read the same input tensor in the supported architectures.
_SHARED_INPUT_TYPES = (("q", "k", "v"), ("gate", "up"))


@dataclass(frozen=True)
class ModelCounts:
    """What the FLOP formulas need to know about a model."""

    blocks: int
    linear_params: int  # weights of the decoder-block Linears
    head_params: int  # the LM head's weights
    params: int  # every parameter
    param_bytes: int
    attention_width: int  # heads x head_dim
    hessian_sq_sum: int  # sum of d_in^2 over distinct Linear inputs of all blocks
    hidden: int
    intermediate: int
    heads: int
    dtype_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _distinct_input_widths(block: nn.Module) -> list[int]:
    widths: list[int] = []
    seen_groups: set[int] = set()
    for name, linear in prunable_linears(block).items():
        kind = module_type(name)
        group = next((i for i, g in enumerate(_SHARED_INPUT_TYPES) if kind in g), None)
        if group is not None:
            if group in seen_groups:
                continue
            seen_groups.add(group)
        widths.append(linear.in_features)
    return widths


def model_counts(model: nn.Module) -> ModelCounts:
    """Parameter counts and widths of a causal LM (any architecture ``decoder_layers`` knows)."""
    blocks = decoder_layers(model)
    linear_params = sum(
        lin.weight.numel() for block in blocks for lin in prunable_linears(block).values()
    )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 1)
    hidden = getattr(config, "hidden_size", 0)
    head_dim = getattr(config, "head_dim", None) or hidden // max(heads, 1)
    return ModelCounts(
        blocks=len(blocks),
        linear_params=linear_params,
        head_params=head.weight.numel() if head is not None else 0,
        params=sum(p.numel() for p in model.parameters()),
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        attention_width=heads * head_dim,
        hessian_sq_sum=sum(w * w for block in blocks for w in _distinct_input_widths(block)),
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 0),
        heads=heads,
        dtype_bytes=next(model.parameters()).element_size(),
    )


def block_forward_flops(c: ModelCounts, nsamples: int, seqlen: int) -> float:
    """One forward pass of all decoder blocks over N windows of T tokens."""
    tokens = nsamples * seqlen
    attention = c.blocks * 2.0 * seqlen * seqlen * c.attention_width * nsamples
    return 2.0 * c.linear_params * tokens + attention


def model_forward_flops(c: ModelCounts, nsamples: int, seqlen: int) -> float:
    """A full forward pass (blocks and LM head) over N windows."""
    return block_forward_flops(c, nsamples, seqlen) + 2.0 * c.head_params * nsamples * seqlen


def forward_backward_flops(c: ModelCounts, nsamples: int, seqlen: int) -> float:
    """Forward and backward with weight gradients for the decoder Linears only."""
    tokens = nsamples * seqlen
    attention = c.blocks * 2.0 * seqlen * seqlen * c.attention_width * nsamples
    return 3 * 2.0 * c.linear_params * tokens + 2 * 2.0 * c.head_params * tokens + 3 * attention


def hessian_flops(c: ModelCounts, nsamples: int, seqlen: int) -> float:
    """SparseGPT's ``sum x x^T`` over all tokens for every distinct Linear input."""
    return 2.0 * c.hessian_sq_sum * nsamples * seqlen


def sparsegpt_solve_flops(d_out: int, d_in: int, blocksize: int = 128) -> float:
    """One Linear's solve: three d^3 factorisations (~5/3 d^3) plus the OBS updates.

    Column updates inside a block cost ``d_out * B^2`` per block (rank-1 updates over the block's
    remaining columns, ``d_out * d_in * B`` in all); the lazy updates after each block
    ``2 d_out B (d_in - end)``, about ``d_out * d_in^2`` in all.
    """
    return 5.0 / 3.0 * d_in**3 + d_out * d_in * blocksize + d_out * d_in**2


def sparsegpt_solves_flops(model: nn.Module) -> float:
    """Every decoder Linear's SparseGPT solve."""
    return sum(
        sparsegpt_solve_flops(lin.out_features, lin.in_features)
        for block in decoder_layers(model)
        for lin in prunable_linears(block).values()
    )


def stage_floors(
    model: nn.Module, method: Any, plan: Any, nsamples: int, seqlen: int
) -> dict[str, dict[str, float]]:
    """``{stage: {"flops", "bytes"}}`` for the stages :func:`gblm.pipeline.prune` times.

    The plan's dense pass (OWL's outlier ratios) is one forward of the blocks (statistics only,
    nothing pruned); GBLM's gradients, N forward+backward passes of the model; the walk
    (``prune``), the statistics forward and the re-forward of every block, plus the Hessians
    where the method gathers them and SparseGPT's solves, and one read and one write of every
    pruned weight. Magnitude's walk has no products: its floor is the bytes alone.
    """
    from gblm.pipeline import PRUNE

    c = model_counts(model)
    dense = {
        "gradients": forward_backward_flops(c, nsamples, seqlen),
        "outlier ratios": block_forward_flops(c, nsamples, seqlen),
    }
    floors: dict[str, dict[str, float]] = {}
    for stage in (plan, method):
        if stage.dense_pass is not None:
            floors[stage.dense_pass] = {"flops": dense[stage.dense_pass], "bytes": 0.0}
    walk = 0.0
    if method.needs_calibration:
        walk = 2 * block_forward_flops(c, nsamples, seqlen)
        if "hessian" in method.stats:
            walk += hessian_flops(c, nsamples, seqlen)
        if type(method).__name__ == "SparseGPTPruner":
            walk += sparsegpt_solves_flops(model)
    floors[PRUNE] = {"flops": walk, "bytes": 2.0 * c.linear_params * c.dtype_bytes}
    return floors


def memory_floor(model: nn.Module, method: Any, nsamples: int, seqlen: int) -> dict[str, int]:
    """The least memory a run must hold at once, by part, and its ``total``.

    ``weights``: every parameter. ``block_scratch``: one window through one block, its largest
    intermediates alive together (q, k, v and the attention output, T x hidden each; the MLP's
    gate, up and their product, T x intermediate each; the scores, heads x T x T).
    ``activations``: the calibration windows' hidden states between blocks (N x T x hidden; none
    for magnitude). ``method_state``: GBLM's gradient accumulators (fp16, one per decoder Linear
    weight); SparseGPT's Hessians of one block (fp32, d_in^2 per distinct input).
    """
    c = model_counts(model)
    scratch = seqlen * (4 * c.hidden + 3 * c.intermediate) + c.heads * seqlen * seqlen
    state = 0
    if getattr(method, "dense_pass", None) == "gradients":
        state = 2 * c.linear_params
    elif "hessian" in method.stats:
        state = 4 * c.hessian_sq_sum // max(c.blocks, 1)
    parts = {
        "weights": c.param_bytes,
        "block_scratch": scratch * c.dtype_bytes,
        "activations": nsamples * seqlen * c.hidden * c.dtype_bytes
        if method.needs_calibration
        else 0,
        "method_state": state,
    }
    return {**parts, "total": sum(parts.values())}
