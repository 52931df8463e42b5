"""GBLM-Pruner's gradient stage: per-sample gradient norms of the dense model.

GBLM-Pruner (Das et al., arXiv 2311.04902) scores a weight with

    W_m[i, j] = |W[i, j]| * ||X[:, j]||_2  +  alpha * |W[i, j]| * ||G[:, i, j]||_p

where ``G[n, i, j]`` is the gradient of sample ``n``'s loss with respect to ``W[i, j]``. This
module computes the gradient factor, with alpha folded in as the published code does:

- ``l1``: ``G1 = sum_n |scale * g_n|``, accumulated in ``accumulator_dtype`` (published: fp16);
- ``l2``: ``G2 = sqrt(sum_n (scale * g_n)^2)``, accumulated in fp32, stored in ``accumulator_dtype``.

Each of the N calibration windows is a batch of one; its loss is the mean next-token cross-entropy
with labels = the input ids. There is no division by N, and the weights never change.

Memory: only the decoder-block Linear weights require grad during the stage, and every weight's
gradient is folded into its accumulator by a post-accumulate-grad hook the moment backward
produces it, then freed. At most one weight gradient exists at a time beside the accumulators, so
the stage costs the accumulators plus the activations of one window (less with checkpointing),
instead of the published fp16 ``.grad`` for every parameter plus about 6 bytes per parameter of
host accumulators. The loss is the model's own (``model(ids, labels=ids).loss``), computed by
:func:`gblm.calibration.loss.lean_causal_lm_loss`: the same kernels, so the same bits, but its
backward holds no more (T, vocab) buffers than the forward did.

:func:`cached_gradient_norms` keeps the result on disk (safetensors), keyed by a hash of what
produced it (:func:`gradient_cache_key`: the weights by content, the windows, the settings),
written atomically under a file lock, with a checksum of the tensors verified on every load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from gblm import devices
from gblm.calibration.batching import WEIGHT_GRADIENT, batch_is_exact, exact_batch
from gblm.calibration.hooks import attached_hooks
from gblm.calibration.loss import lean_loss
from gblm.devices import dtype_name
from gblm.errors import NonFiniteError
from gblm.models.layers import decoder_layers, prunable_linears
from gblm.models.offload import has_offloaded
from gblm.utils import (
    atomic_write,
    atomic_write_text,
    canonical_json,
    content_hash,
    file_lock,
    tensors_checksum,
)

logger = logging.getLogger("gblm.gradients")

NORMS = ("l1", "l2")
ACCUMULATOR_DTYPES = {
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}
#: Per-sample weight gradients formed at once by the batched stage, at most (bytes).
FOLD_BYTES = 64 * 2**20
#: ``batch_size=auto`` keeps a batch's fp32 logits (b, T, vocab) within this many bytes. The
#: stage keeps every window's activations for its backward, so its memory grows with the batch;
#: on this project's 2-core VM a batch of 8 SmolLM2 windows of 256 tokens (3.6 GB of activations
#: and logits) ran 1.5x slower than one window at a time when that memory was first touched, and
#: 10% faster when it was reused. 128 MiB allows two such windows, a measured tie.
LOGITS_BYTES = 128 * 2**20
CACHE_FORMAT_VERSION = 2  # 2: the model keyed by its weights' content; a checksum per entry


@dataclass(frozen=True)
class GradientSettings:
    """Every setting of the gradient stage, checked once, here (keys of ``method.*``).

    Attributes:
        norm: ``l1`` (``sum_n |scale * g_n|``, the paper's headline) or ``l2``
            (``sqrt(sum_n (scale * g_n)^2)``).
        scale: The paper's alpha, applied to each gradient before the norm (published: 100).
        accumulator_dtype: dtype name of the l1 running sum and of the result (published:
            ``float16``); l2 always sums in fp32 and only the result is cast. A ``torch.dtype``
            is accepted and stored by name.
        checkpointing: Recompute each block's activations in backward (less memory, ~1.3x time).
        loss_chunk_tokens: 0 (default): the model's own loss over the full (T, vocab) logits, as
            published. > 0: the LM head and loss this many positions at a time
            (:func:`_chunked_loss_backward`); gradients may differ in the last float bits.
        blockwise: Compute the norms block by block
            (:func:`gblm.calibration.blockwise.blockwise_gradient_norms`): one decoder block on
            the compute device at a time, for models larger than it. Bit for bit the same norms.
        group_size: With ``blockwise``, the windows that go through the blocks together (S):
            each block is moved to the device twice per group; their block inputs stay on the
            host. No effect on the norms.
    """

    norm: str = "l1"
    scale: float = 100.0
    accumulator_dtype: str = "float16"
    checkpointing: bool = False
    loss_chunk_tokens: int = 0
    blockwise: bool = False
    group_size: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.accumulator_dtype, torch.dtype):
            object.__setattr__(self, "accumulator_dtype", dtype_name(self.accumulator_dtype))
        if self.norm not in NORMS:
            raise ValueError(f"method.norm={self.norm!r}: allowed values are {', '.join(NORMS)}.")
        if self.accumulator_dtype not in ACCUMULATOR_DTYPES:
            raise ValueError(
                f"method.accumulator_dtype={self.accumulator_dtype!r}: allowed values are "
                f"{', '.join(ACCUMULATOR_DTYPES)}."
            )
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise ValueError(f"method.scale={scale!r}: must be a finite number >= 0.")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"method.scale={scale!r}: must be a finite number >= 0.")
        object.__setattr__(self, "scale", float(scale))
        chunk = self.loss_chunk_tokens
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(
                f"method.loss_chunk_tokens={chunk!r}: must be an integer >= 0 (0 = off)."
            )
        if not isinstance(self.blockwise, bool):
            raise ValueError(
                f"method.gradient_blockwise={self.blockwise!r}: allowed values are true, false."
            )
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"method.gradient_group_size={size!r}: must be an integer >= 1.")

    @property
    def torch_accumulator_dtype(self) -> torch.dtype:
        return ACCUMULATOR_DTYPES[self.accumulator_dtype]


class GradientError(NonFiniteError, RuntimeError):
    """A non-finite loss or gradient in the gradient stage."""


def decoder_linear_names(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks, by its full name in ``model.named_modules()``."""
    full_names = {id(module): name for name, module in model.named_modules()}
    return {
        full_names[id(linear)]: linear
        for block in decoder_layers(model)
        for linear in prunable_linears(block).values()
    }


@contextlib.contextmanager
def _only_weights_require_grad(model: nn.Module, weights: list[Tensor]) -> Iterator[None]:
    """Let only ``weights`` require grad, with no stale ``.grad``; restore everything afterwards."""
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = {id(w): w.grad for w in weights}
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.grad = None  # an old .grad would be summed into the first sample's gradient
            w.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        for w in weights:
            w.grad = saved_grads[id(w)]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """No dropout during the stage; the caller's train/eval flags are restored per module."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training


@contextlib.contextmanager
def _checkpointed_blocks(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each decoder block's activations in backward instead of storing them.

    transformers' own ``gradient_checkpointing_enable`` only acts in training mode, and training
    mode turns dropout on (OPT, some attention implementations), which would change the
    gradients. So the block forwards are wrapped here, in eval mode, with non-reentrant
    ``torch.utils.checkpoint``; the wrappers are instance attributes, removed afterwards.
    """
    if not enabled:
        yield
        return
    blocks = list(decoder_layers(model))
    # accelerate's device-map hooks already put an instance-level forward on blocks: wrap it and
    # put it back afterwards.
    saved = [vars(block).get("forward") for block in blocks]
    try:
        for block in blocks:
            block.forward = _checkpointed(block.forward)
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                vars(block).pop("forward", None)
            else:
                block.forward = forward


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


class _Folder:
    """Folds each weight's per-sample gradient into its accumulator as backward produces it."""

    def __init__(
        self,
        linears: dict[str, nn.Linear],
        norm: str,
        scale: float,
        accumulator_dtype: torch.dtype,
        accumulate_on: torch.device | None,
    ) -> None:
        self.norm = norm
        self.scale = scale
        # l2 sums squares in fp32 whatever the stored dtype (published: fp32, then sqrt -> fp16).
        acc_dtype = accumulator_dtype if norm == "l1" else torch.float32
        self.names = list(linears)
        self.accumulators = {
            name: torch.zeros_like(
                linear.weight, dtype=acc_dtype, device=accumulate_on or linear.weight.device
            )  # (d_out, d_in)
            for name, linear in linears.items()
        }
        self.samples_seen = dict.fromkeys(self.names, 0)
        # The fold's working memory, by role, dtype and device (:meth:`_scratch`).
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        # One 0-d fp32 check value per Linear per sample: the sum of the folded term, finite iff
        # every entry was (barring an overflow of the sum itself). Checked once per sample (or
        # batch) so the hooks never synchronize with the device.
        self.checks: list[tuple[str, Tensor]] = []

    def _scratch(self, role: str, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> Tensor:  # fmt: skip
        """A reusable buffer viewed as ``shape``, one per role, dtype and device, grown as needed.

        The fold's per-sample tensors are large (the whole weight) and short-lived; allocated
        afresh, each would be mapped and zero-filled by the OS (page faults) every time before
        it is written. Reused, it costs that once per stage.
        """
        key = (role, dtype, torch.device(device))
        numel = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    @torch.no_grad()
    def fold(self, name: str, grads: Tensor) -> None:
        """Fold weight gradients into ``name``'s accumulator, sample after sample.

        The published step for each sample: grad -> fp32, times scale, abs (l1) or square
        (l2), cast to the accumulator dtype, add. The elementwise steps act on all samples of
        ``grads`` at once (the same bits per entry); the additions go one sample at a time, in
        order, as the rounding of a low-precision sum needs. fp32 gradients are modified in
        place: callers hand over gradients they no longer need. The fp32 copy of other dtypes
        and the cast go to reusable buffers (:meth:`_scratch`).

        Args:
            grads: one sample's (d_out, d_in) gradient, or (s, d_out, d_in) for s samples.
        """
        # Looked up per call: the block-by-block stage moves a block's accumulators to the
        # compute device for its backward and back afterwards.
        acc = self.accumulators[name]
        terms = grads.reshape(-1, *acc.shape)  # (s, d_out, d_in)
        if terms.dtype != torch.float32:
            terms = self._scratch("fp32", terms.shape, torch.float32, terms.device).copy_(terms)
        terms.mul_(self.scale)
        terms = terms.abs_() if self.norm == "l1" else terms.square_()
        sums = terms.sum(dim=(1, 2))  # (s,) one finiteness check per sample
        if terms.dtype != acc.dtype or terms.device != acc.device:
            terms = self._scratch("cast", terms.shape, acc.dtype, acc.device).copy_(terms)
        for i, term in enumerate(terms):
            self.checks.append((name, sums[i]))
            acc.add_(term)
        self.samples_seen[name] += terms.shape[0]

    def hook(self, name: str) -> Callable[[Tensor], None]:
        """A post-accumulate-grad hook: fold the weight's ``.grad`` (one sample's) and free it."""

        def fold_grad(weight: Tensor) -> None:
            self.fold(name, weight.grad)
            weight.grad = None

        return fold_grad

    @torch.no_grad()
    def fold_batch(self, name: str, inputs: Tensor, output_grad: Tensor, batch: int) -> None:
        """Fold the per-sample weight gradients of a batch, sample after sample.

        Sample s's gradient is ``output_grad[s]^T @ inputs[s]`` (d_out, d_in): the product
        autograd forms for a batch of one, with the same operands. The batched product computes
        each sample's matrix alone, so the results are the same bits (tests/test_batching.py).
        At most ``FOLD_BYTES`` of per-sample gradients exist at a time.

        Args:
            inputs: the Linear's input, (b, T, d_in) or (b * T, d_in) (OPT flattens tokens).
            output_grad: the gradient of its output, (b, T, d_out) or (b * T, d_out).
            batch: b.
        """
        x = inputs.reshape(batch, -1, inputs.shape[-1])  # (b, T, d_in)
        g = output_grad.reshape(batch, -1, output_grad.shape[-1])  # (b, T, d_out)
        step = max(1, FOLD_BYTES // (g.shape[-1] * x.shape[-1] * g.element_size()))
        for start in range(0, batch, step):
            gs, xs = g[start : start + step], x[start : start + step]  # s windows
            shape = (gs.shape[0], gs.shape[-1], xs.shape[-1])  # (s, d_out, d_in)
            product = self._scratch("product", shape, g.dtype, g.device)
            self.fold(name, torch.bmm(gs.transpose(1, 2), xs, out=product))

    def check_sample(self, sample: int, last: int | None = None) -> None:
        """Raise :class:`GradientError` naming the Linears whose gradient was not finite in
        sample ``sample`` (or samples ``sample..last``) since the previous check."""
        if not self.checks:
            return
        names = [name for name, _ in self.checks]
        device = self.checks[0][1].device
        finite = torch.isfinite(torch.stack([v.to(device) for _, v in self.checks]))
        self.checks = []
        if bool(finite.all()):
            return
        bad = list(dict.fromkeys(n for n, ok in zip(names, finite.tolist()) if not ok))
        more = f" (and {len(bad) - 1} more Linears)" if len(bad) > 1 else ""
        where = f"sample {sample}" if last in (None, sample) else f"samples {sample}-{last}"
        raise GradientError(
            f"non-finite gradient in {bad[0]} ({where}){more}: the loss was finite, so "
            "the backward pass overflowed or produced NaN. With an fp16 model, load it in "
            "bfloat16 or float32 for the gradient stage."
        )

    def finish(self, accumulator_dtype: torch.dtype) -> dict[str, Tensor]:
        self._buffers.clear()
        if self.norm == "l2":
            return {n: acc.sqrt_().to(accumulator_dtype) for n, acc in self.accumulators.items()}
        return self.accumulators


def check_chunkable(model: nn.Module) -> None:
    """Raise unless the model's logits are exactly ``lm_head(base_model(ids))`` (then cast to fp32).

    Architectures that scale or soft-cap their logits in the LM's own forward (Gemma-2's
    ``final_logit_softcapping``, Cohere's ``logit_scale``) would get a different loss.
    """
    config = getattr(model, "config", None)
    odd = [
        key
        for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")
        if getattr(config, key, None) not in (None, 1, 1.0)
    ]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if odd or not isinstance(head, nn.Linear) or getattr(model, "base_model", model) is model:
        why = f"it transforms its logits ({', '.join(odd)})" if odd else "it has no plain LM head"
        raise ValueError(
            f"method.loss_chunk_tokens > 0 needs logits = lm_head(hidden states), but {why}; "
            "set method.loss_chunk_tokens=0 (the model's own loss)."
        )


def _chunked_loss_backward(model: nn.Module, input_ids: Tensor, chunk: int) -> Tensor:
    """Backward of the mean next-token loss of one window, ``chunk`` positions of logits at a time.

    The decoder runs once; its last hidden states are cut off the graph, and for each run of
    ``chunk`` positions the LM head, the fp32 cast and the cross-entropy run forward and backward
    alone, filling that run's rows of the hidden-state gradient; then one backward through the
    decoder. Each logits row's gradient is ``(softmax - onehot) / (T - 1)`` as in the full loss,
    so the (T, vocab) logits, log-probabilities and their gradient never exist whole: the
    stage's peak drops by about ``2 x T x vocab x 4`` bytes against the default loss. The float
    summation of the LM head's input gradient may differ from the full matmul in the last bits
    (BLAS blocking), hence an option, not the default.
    Returns the loss (detached), for the finiteness check.
    """
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (1, T, H)
    head = model.get_output_embeddings()
    predicting = input_ids.shape[1] - 1  # the last position has no next token
    hidden_grad = torch.zeros_like(hidden)  # (1, T, H); the last row stays 0
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, predicting, chunk):
        stop = min(start + chunk, predicting)
        part = hidden[:, start:stop].detach().requires_grad_()  # (1, c, H)
        logits = head(part).float()  # (1, c, V), as the LM's own loss casts them
        loss = (
            nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                input_ids[0, start + 1 : stop + 1].to(logits.device),  # device maps: the head's
                reduction="sum",
            )
            / predicting
        )
        loss.backward()
        hidden_grad[:, start:stop] = part.grad
        total += loss.detach()
        del logits, loss, part
    hidden.backward(hidden_grad)
    return total


def _check_windows(windows: Tensor) -> tuple[int, int]:
    """(N, T) of a valid window tensor: int64 ids, N >= 1 samples of T >= 2 tokens."""
    if windows.ndim != 2 or windows.dtype != torch.long:
        raise ValueError(
            f"windows must be a (N, T) tensor of int64 token ids, got {tuple(windows.shape)} "
            f"{windows.dtype}."
        )
    nsamples, seqlen = windows.shape
    if nsamples == 0 or seqlen < 2:
        raise ValueError(f"windows of shape {tuple(windows.shape)}: need N >= 1 and T >= 2.")
    return nsamples, seqlen


def _loss_backward(model: nn.Module, input_ids: Tensor, chunk: int, first: int) -> None:
    """The loss of b windows ``input_ids`` (b, T) and its backward pass.

    The loss is the model's own mean over the b (T - 1) predictions; for b > 1 its backward is
    seeded with b, so each window gets the gradient a batch of one gets (:func:`_batched_passes`).
    One window may use the chunked loss (``chunk`` > 0). ``first``: the first window's index, for
    the error message.
    """
    batch = input_ids.shape[0]
    if chunk and batch > 1:
        raise ValueError("the chunked loss (method.loss_chunk_tokens) takes one window at a time")
    if chunk:
        loss = _chunked_loss_backward(model, input_ids, chunk)  # backward done chunk by chunk
    else:
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    if not bool(torch.isfinite(loss.detach())):
        where = f"sample {first}" if batch == 1 else f"samples {first}-{first + batch - 1}"
        raise GradientError(
            f"non-finite loss ({loss.item()}) on {where}: the dense model's forward pass "
            "overflows or has NaN/inf weights, so no gradient is usable."
        )
    if chunk:
        return
    if batch == 1:
        loss.backward()
    else:
        loss.backward(torch.tensor(float(batch), device=loss.device))


def gradient_norms(
    model: nn.Module,
    windows: Tensor,
    settings: GradientSettings | None = None,
    *,
    device: str | torch.device | None = None,
    accumulate_on: str | torch.device | None = None,
    progress: bool = True,
    batch_size: int | str = "auto",
) -> dict[str, Tensor]:
    """GBLM-Pruner's accumulated per-sample gradient norm of every decoder-block Linear.

    Args:
        model: A causal LM (``model(input_ids, labels=input_ids).loss``); it is left exactly as
            found: same weights, train/eval flags, ``requires_grad`` flags and ``.grad``.
        windows: Calibration token ids, shape (N, T); each row is one sample (batch of one).
        settings: The stage's settings (:class:`GradientSettings`; default: the published ones).
        device: Where the input ids go; default the device of the input embeddings.
        accumulate_on: Device of the accumulators; default the device of each Linear's weight.
            ``"cpu"`` keeps them in host memory, as the published code does.
        progress: Show a tqdm bar labelled ``gradients``.
        batch_size: Windows per forward and backward, or ``auto``: on the CPU enough to fill the
            matmuls where that gives each window's numbers bit for bit
            (:func:`gblm.calibration.batching.exact_batch`), one on a GPU. Each window still has
            its own gradient, folded in order. Batches are used with the model's own loss and
            no checkpointing; otherwise windows go one at a time.

    Returns:
        ``{full Linear name: (d_out, d_in) tensor}``, e.g. ``model.layers.0.self_attn.q_proj``.

    Raises:
        GradientError: A window's loss or a Linear's gradient is NaN or infinite.
    """
    settings = settings or GradientSettings()
    norm, scale, chunk = settings.norm, settings.scale, settings.loss_chunk_tokens
    accumulator_dtype = settings.torch_accumulator_dtype
    nsamples, seqlen = _check_windows(windows)
    if chunk:
        check_chunkable(model)
    if has_offloaded(model):  # its hooks would replace the Parameters the folding hooks are on
        raise NotImplementedError(
            "accelerate offloads some of this model's weights (meta tensors): compute the "
            "gradient norms with gblm.calibration.blockwise.blockwise_gradient_norms "
            "(GBLM-Pruner's method does so by itself)."
        )

    linears = decoder_linear_names(model)
    input_device = torch.device(device) if device is not None else devices.input_device(model)
    folder = _Folder(
        linears,
        norm,
        scale,
        accumulator_dtype,
        torch.device(accumulate_on) if accumulate_on is not None else None,
    )
    # Every in-place write to a tensor bumps its version counter: a free check that the stage
    # (no optimizer, hooks under no_grad) left every parameter untouched.
    versions = {name: p._version for name, p in model.named_parameters()}
    start = time.perf_counter()
    with (
        _eval_mode(model),
        lean_loss(model) if not chunk else contextlib.nullcontext(False) as lean,
        torch.enable_grad(),
    ):
        if not chunk and not lean:
            logger.info("the model's own loss function is not ForCausalLMLoss: it is used as is")
        # Batches and the hooks' products need the model's own mean loss (lean) and a plain
        # backward (checkpointing would run the forward hooks twice).
        batch, hooked = 1, False
        if lean and not settings.checkpointing:
            batch = _gradient_batch(model, linears, batch_size, windows, input_device)
            hooked = _products_in_hooks(linears, batch, seqlen, input_device)
        if hooked:
            _batched_passes(model, windows, linears, folder, batch, input_device, progress)
        else:
            _per_sample_passes(model, windows, linears, folder, settings, input_device, progress)
    norms = _finish(model, versions, folder, settings)
    logger.info(
        "gradient norms (%s, scale %g, %s) of %d Linears over %d windows x %d tokens: %.1f s",
        norm, scale, settings.accumulator_dtype, len(norms), nsamples, seqlen,
        time.perf_counter() - start,
    )  # fmt: skip
    return norms


def _gradient_batch(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    batch_size: int | str,
    windows: Tensor,
    device: torch.device,
) -> int:
    """Windows per forward and backward (:func:`gblm.calibration.batching.exact_batch`), with
    ``auto`` at most as many as keep the fp32 logits of a batch within ``LOGITS_BYTES``."""
    nsamples, seqlen = windows.shape
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if isinstance(head, nn.Linear) else None
    limit = max(1, LOGITS_BYTES // (seqlen * head.out_features * 4)) if head else None
    return exact_batch(batch_size, nsamples, seqlen, device, linears.values(),
                       check=WEIGHT_GRADIENT, head=head, limit=limit)  # fmt: skip


def _products_in_hooks(
    linears: dict[str, nn.Linear], batch: int, seqlen: int, device: torch.device
) -> bool:
    """Whether the Linears' hooks form each window's weight gradient (:func:`_batched_passes`)
    rather than autograd (:func:`_per_sample_passes`): always for batches of several windows;
    for one window at a time where the probe finds the hooks' product giving autograd's bits
    for every shape. The hooks write it into a buffer the stage reuses, where autograd makes a
    fresh ``.grad`` for every weight and window (on a 2-core CPU and a 2048-wide model, the
    page faults of those fresh tensors cost a tenth to a quarter of the stage)."""
    if batch > 1:
        return True
    return batch_is_exact(linears.values(), 1, seqlen, device, check=WEIGHT_GRADIENT)


def _per_sample_passes(
    model: nn.Module,
    windows: Tensor,
    linears: dict[str, nn.Linear],
    folder: _Folder,
    settings: GradientSettings,
    input_device: torch.device,
    progress: bool,
) -> None:
    """One forward and backward per window; autograd forms each weight gradient (the published
    computation), folded by a post-accumulate-grad hook."""
    weights = [linear.weight for linear in linears.values()]
    chunk = settings.loss_chunk_tokens
    with (
        _only_weights_require_grad(model, weights),
        _checkpointed_blocks(model, settings.checkpointing),
        folding_hooks(linears, folder),
    ):
        for n in tqdm(range(windows.shape[0]), desc="gradients", disable=not progress):
            _loss_backward(model, windows[n : n + 1].to(input_device), chunk, n)
            folder.check_sample(n)


def _batched_passes(
    model: nn.Module,
    windows: Tensor,
    linears: dict[str, nn.Linear],
    folder: _Folder,
    batch: int,
    input_device: torch.device,
    progress: bool,
) -> None:
    """``batch`` windows (one or more) per forward and backward; per-sample weight gradients
    formed in hooks.

    No weight requires grad, so autograd computes only the activation gradients (the input
    embeddings' output is made to require grad to start the graph). Each Linear's forward hook
    keeps its input and hooks its output's gradient, from which :meth:`_Folder.fold_batch` forms
    every sample's weight gradient. The loss is the model's own mean over the batch's
    ``b * (T - 1)`` predictions; its backward is seeded with ``b``, so each window's gradient is
    the one a batch of one gets: ``b / (b * (T - 1))`` rounds to the same float as ``1 / (T - 1)``,
    and the rest of the backward acts on each window's rows alone.
    """
    nsamples = windows.shape[0]
    bar = tqdm(total=nsamples, desc="gradients", disable=not progress)
    with (
        _only_weights_require_grad(model, []),
        attached_hooks([(model.get_input_embeddings(), _start_graph)]),
        _per_sample_gradient_hooks(linears, folder) as set_batch,
        bar,
    ):
        for start in range(0, nsamples, batch):
            ids = windows[start : start + batch].to(input_device)  # (b, T)
            set_batch(ids.shape[0])
            _loss_backward(model, ids, 0, start)
            folder.check_sample(start, start + ids.shape[0] - 1)
            bar.update(ids.shape[0])


def _start_graph(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
    return output.requires_grad_()  # the embeddings' output: a leaf, as no weight needs grad


@contextlib.contextmanager
def _per_sample_gradient_hooks(
    linears: dict[str, nn.Linear], folder: _Folder
) -> Iterator[Callable[[int], None]]:
    """Forward hooks that fold each Linear's per-sample weight gradients during backward.

    Yields:
        A setter for the number of windows in the current forward call.
    """
    batch = 1

    def set_batch(size: int) -> None:
        nonlocal batch
        batch = size

    def hook_for(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, output: Tensor) -> None:
            if not output.requires_grad:
                return
            inputs, size = args[0].detach(), batch  # kept for backward, as autograd would

            def on_grad(grad: Tensor) -> None:
                folder.fold_batch(name, inputs, grad, size)

            output.register_hook(on_grad)

        return hook

    with attached_hooks([(linear, hook_for(name)) for name, linear in linears.items()]):
        yield set_batch


@contextlib.contextmanager
def folding_hooks(linears: dict[str, nn.Linear], folder: _Folder) -> Iterator[None]:
    """Each Linear's weight gradient folded into its accumulator as soon as it is complete."""
    handles = [
        linear.weight.register_post_accumulate_grad_hook(folder.hook(name))
        for name, linear in linears.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _finish(
    model: nn.Module, versions: dict[str, int], folder: _Folder, settings: GradientSettings
) -> dict[str, Tensor]:
    """Check that no parameter changed, warn of Linears without gradient or with overflow, and
    return the finished norms."""
    accumulator_dtype = settings.torch_accumulator_dtype
    changed = [name for name, p in model.named_parameters() if p._version != versions[name]]
    if changed:
        raise RuntimeError(f"the gradient stage modified parameters: {', '.join(changed[:5])}")
    missing = [name for name, count in folder.samples_seen.items() if count == 0]
    if missing:
        logger.warning(
            "%d decoder Linears received no gradient (their norm stays 0): %s",
            len(missing),
            ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
        )
    norms = folder.finish(accumulator_dtype)
    overflowed = [name for name, g in norms.items() if bool(torch.isinf(g).any())]
    if overflowed:
        logger.warning(
            "%s accumulator overflowed to inf in %d Linears (e.g. %s); those weights always "
            "survive. accumulator_dtype=float32 avoids it.",
            dtype_name(accumulator_dtype),
            len(overflowed),
            overflowed[0],
        )
    return norms


def windows_digest(windows: Tensor) -> str:
    """sha256 of the window ids (as int64, C order) and their shape."""
    ids = windows.detach().to(device="cpu", dtype=torch.int64).contiguous()
    digest = hashlib.sha256(repr(tuple(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def gradient_cache_key(
    model_id: str, windows: Tensor, settings: GradientSettings, model_dtype: torch.dtype | str
) -> dict:
    """Everything the gradient norms depend on, as a JSON-able dict for :func:`cached_gradient_norms`.

    ``model_id`` identifies the weights by content (:func:`gblm.models.loading.weights_fingerprint`,
    through :meth:`gblm.methods.base.RunContext.model_key`), not by their path.
    """
    key = {
        "kind": "gblm-gradient-norms",
        "version": CACHE_FORMAT_VERSION,
        "model": model_id,
        "model_dtype": dtype_name(model_dtype)
        if isinstance(model_dtype, torch.dtype)
        else model_dtype,
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "windows_sha256": windows_digest(windows),
        "norm": settings.norm,
        "scale": settings.scale,
        "accumulator_dtype": settings.accumulator_dtype,
    }
    if settings.loss_chunk_tokens:  # its norms may differ from the default's in the last bits
        key["loss_chunk_tokens"] = settings.loss_chunk_tokens
    # Not in the key: checkpointing, blockwise and group_size, which give the same norms bit for
    # bit (tests/test_gradients.py, tests/test_blockwise.py), so one cache serves them all.
    return key


def gradient_cache_path(cache_dir: Path, key: dict) -> Path:
    """``cache_dir / grad_<first 16 hex of content_hash(key)>.safetensors``."""
    return Path(cache_dir) / f"grad_{content_hash(key, length=16)}.safetensors"


def _load_verified(path: Path) -> dict[str, Tensor] | None:
    """The norms stored at ``path`` if the file is whole and its checksum holds, else None.

    The checksum (:func:`gblm.utils.tensors_checksum`, in the file's metadata) covers every byte
    of tensor data, so bytes damaged behind an intact header are caught too.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get("checksum")
        norms = load_file(path)
        ok = expected is not None and expected == tensors_checksum(norms)
    except Exception as err:  # truncated or garbled: any reader error means recompute
        logger.warning("damaged gradient cache %s (%s): recomputing it", path, err)
        return None
    if not ok:
        logger.warning("damaged gradient cache %s (checksum mismatch): recomputing it", path)
        return None
    logger.info("gradient norms loaded from %s", path)
    return norms


def cached_gradient_norms(
    cache_dir: Path, key: dict, compute: Callable[[], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """Load the gradient norms for ``key`` from ``cache_dir``, or compute and store them.

    The file is written atomically (:func:`gblm.utils.atomic_write`) under a file lock, so
    concurrent sweep jobs with the same key compute once: the others wait for the lock and then
    load. Its metadata holds the key and a checksum of the tensors, verified on every load: a
    damaged or truncated entry is recomputed with a warning naming the file. The key is saved
    beside it as ``grad_<hash>.json``. Loaded tensors are on CPU.
    """
    path = gradient_cache_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        if path.exists():
            norms = _load_verified(path)
            if norms is not None:
                return norms
        norms = compute()
        tensors = {name: g.contiguous() for name, g in norms.items()}
        metadata = {"key": canonical_json(key), "checksum": tensors_checksum(tensors)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        atomic_write_text(
            path.with_suffix(".json"), json.dumps(key, sort_keys=True, indent=2) + "\n"
        )
        logger.info("gradient norms cached at %s", path)
    return norms
