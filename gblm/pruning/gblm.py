"""GBLM-Pruner's score: weights scored by their activations and their loss gradients.

GBLM-Pruner (Das et al., arXiv 2311.04902) prunes, in every output row, the weights with the
lowest

    W_m[i, j] = |W[i, j]| * ||X[:, j]||_2  +  alpha * |W[i, j]| * ||G[:, i, j]||_p

computed as the published code does: ``S = |W| * sqrt(row_sq) + |W| * G_p``, where ``row_sq`` is
the walk's running mean of squared inputs (so ``sqrt(row_sq) = ||X_j||_2 / sqrt(N)``) and
``G_p`` the dense model's per-sample gradient norm with alpha already folded in
(computed by the gradient stage, :mod:`gblm.calibration.gradients`). The first term is formed in
fp32; the second, ``|W| * G_p``, with torch's type promotion, as the published code does: in
fp32 for an fp32 or bf16 model with fp16 accumulators (``promote_types(bf16, fp16)`` is fp32), in
fp16 only when both the weight and ``G_p`` are fp16 (the published fp16 model). It is then
widened to fp32 for the sum.

Ablations: ``score="gradient"`` keeps only ``|W| * G_p``; ``score="activation"`` only
``|W| * sqrt(row_sq)``, which is Wanda. ``scale=0`` also gives Wanda's mask exactly.
"""

from __future__ import annotations

from torch import Tensor

from gblm.pruning.wanda import activation_term

SCORES = ("combined", "gradient", "activation")


def gradient_term(weight: Tensor, grad_norm: Tensor) -> Tensor:
    """``|W| * G_p`` with torch's type promotion, as published, shape (d_out, d_in).

    Neither factor is rounded to the other's dtype: the product is in
    ``torch.promote_types(weight.dtype, grad_norm.dtype)`` (fp32 for an fp32 or bf16 weight and
    fp16 accumulators; fp16 for an fp16 weight and fp16 accumulators). Callers widen it to fp32.
    """
    return weight.abs() * grad_norm.to(weight.device)


def gblm_score(
    weight: Tensor,
    row_sq_norms: Tensor | None,
    grad_norm: Tensor | None,
    score: str = "combined",
) -> Tensor:
    """GBLM-Pruner's importance of every entry of ``weight`` (d_out, d_in), fp32; low is pruned.

    Args:
        weight: The Linear's weight, (d_out, d_in).
        row_sq_norms: (d_in,) running mean of squared inputs; unused for ``score="gradient"``.
        grad_norm: (d_out, d_in) accumulated gradient norm; unused for ``score="activation"``.
        score: ``combined`` (both terms), ``gradient`` or ``activation``.
    """
    if score not in SCORES:
        raise ValueError(f"method.score={score!r}: allowed values are {', '.join(SCORES)}.")
    if score != "gradient" and row_sq_norms is None:
        raise ValueError(
            f"GBLM-Pruner score={score!r} needs the activation statistic row_sq_norms."
        )
    if score != "activation":
        if grad_norm is None:
            raise ValueError(
                f"GBLM-Pruner score={score!r} needs gradient norms: run the gradient stage "
                "(gblm.calibration.gradients) on the dense model first."
            )
        if grad_norm.shape != weight.shape:
            raise ValueError(
                f"gradient norm of shape {tuple(grad_norm.shape)} does not match the weight "
                f"{tuple(weight.shape)}: were the gradients computed for another model?"
            )
    if score == "activation":
        return activation_term(weight, row_sq_norms)
    if score == "gradient":
        return gradient_term(weight, grad_norm).float()
    # fp32 + the promoted product: the same sum as with the product widened first, without a copy
    return activation_term(weight, row_sq_norms).add_(gradient_term(weight, grad_norm))
