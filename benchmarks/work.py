"""The measured work: each method run as gblm runs it, and the floors it is compared with.

A run's stages: ``capture``, ``statistics``, ``scoring and masking`` and ``re-forward`` are the
layer walk's (:data:`WALK_STAGES`), timed by wrapping the walk's stage functions and the method's
per-Linear step (:func:`timed_walk`; the walk has no timing parameter); the ``gradient stage``
(the method's dense-model pass, ``prepare``: GBLM's gradients) and ``evaluation`` (perplexity)
are timed around their calls. Which stages a method has follows from what it declares
(:func:`applicable_stages`).

The floors are the least work each stage must do: ``gradient``, N plain forward+backward passes
of the dense model (weight gradients for the decoder Linears only, dropped after each sample);
``walk``, N forward passes of all decoder blocks, twice (the statistics pass and the re-forward);
``evaluation``, plain forwards (logits only) of the evaluation windows.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import gblm.calibration.sequential as sequential
from benchmarks.cases import Settings
from benchmarks.measure import Measurement, PeakWatch, StageClock, measure
from gblm.calibration.capture import BlockInputs, capture_block_inputs
from gblm.calibration.gradients import decoder_linear_names
from gblm.calibration.sequential import prune_model
from gblm.calibration.stats import LinearStats
from gblm.eval.perplexity import perplexity
from gblm.methods.base import Pruner, RunContext, ScorePruner
from gblm.methods.registry import build_method
from gblm.models.layers import decoder_layers, prunable_linears
from gblm.pruning.sparsity import Sparsity
from gblm.pruning.storage import PackedMasks

#: The registered methods (``conf/method``) that are benchmarked, in table order.
METHODS = ("magnitude", "wanda", "sparsegpt", "gblm")
GRADIENT_STAGE = "gradient stage"
EVALUATION = "evaluation"
#: The walk's stages: block-0 input capture, the hooked forward that folds the statistics,
#: scoring and masking (the method's per-Linear step), and the pruned block's forward.
WALK_STAGES = ("capture", "statistics", "scoring and masking", "re-forward")
CAPTURE, STATISTICS, MASKING, REFORWARD = WALK_STAGES
STAGES = (CAPTURE, GRADIENT_STAGE, STATISTICS, MASKING, REFORWARD, EVALUATION)
# stage -> (floor, share of it, what the ratio says)
STAGE_FLOORS = {
    CAPTURE: ("walk", 1.0, "share of the walk floor (2N block forwards)"),
    GRADIENT_STAGE: ("gradient", 1.0, "x N plain fwd+bwd of the dense model"),
    STATISTICS: ("walk", 0.5, "x N block forwards"),
    MASKING: ("walk", 1.0, "share of the calibration passes (2N block forwards)"),
    REFORWARD: ("walk", 0.5, "x N block forwards"),
    EVALUATION: ("evaluation", 1.0, "x plain forwards of the eval windows"),
}


# --- methods ------------------------------------------------------------------------------------


def applicable_stages(method: Pruner) -> tuple[str, ...]:
    """The stages a method has, from what it declares: the walk's calibration passes only when
    it needs calibration, the gradient stage only when it has a dense-model pass (``prepare``)."""
    skipped = set()
    if not method.needs_calibration:
        skipped |= {CAPTURE, STATISTICS, REFORWARD}
    if method.dense_pass is None:
        skipped.add(GRADIENT_STAGE)
    return tuple(stage for stage in STAGES if stage not in skipped)


class _Delegating(Pruner):
    """A method seen through a wrapper: the walk asks the wrapper what the method needs."""

    def __init__(self, inner: Pruner) -> None:
        self.inner = inner
        self.stats = inner.stats
        self.needs_calibration = inner.needs_calibration
        self.true_sequential = inner.true_sequential
        self.dense_pass = inner.dense_pass

    def prepare(self, model: nn.Module, windows: Tensor | None, context: RunContext) -> None:
        self.inner.prepare(model, windows, context)

    def release(self) -> None:
        self.inner.release()

    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor:
        return self.inner.prune_linear(name, linear, stats, target)


class _TimedMasking(_Delegating):
    """Times the method's per-Linear step as the masking stage."""

    def __init__(self, inner: Pruner, clock: StageClock) -> None:
        super().__init__(inner)
        self.clock = clock

    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor:
        with self.clock.stage(MASKING):
            return super().prune_linear(name, linear, stats, target)


#: The walk's stage functions (module attributes of :mod:`gblm.calibration.sequential`).
_WALK_FUNCTIONS = {
    "capture_block_inputs": CAPTURE,
    "gather_statistics": STATISTICS,
    "reforward_block": REFORWARD,
}


@contextlib.contextmanager
def timed_walk(clock: StageClock) -> Iterator[None]:
    """Time the walk's capture, statistics and re-forward stages by wrapping its functions.

    Within the block the walk module's attributes are timing wrappers (restored on exit). A call
    made from inside a timed one (``gather_statistics`` calls itself again when inputs are
    shared in some batches only) is not timed twice.
    """
    saved = {attr: getattr(sequential, attr) for attr in _WALK_FUNCTIONS}
    inside: list[str] = []

    def timed(function: Callable, stage: str) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            if inside:
                return function(*args, **kwargs)
            inside.append(stage)
            try:
                with clock.stage(stage):
                    return function(*args, **kwargs)
            finally:
                inside.pop()

        return run

    try:
        for attr, stage in _WALK_FUNCTIONS.items():
            setattr(sequential, attr, timed(saved[attr], stage))
        yield
    finally:
        for attr, function in saved.items():
            setattr(sequential, attr, function)


def _innermost(pruner: Pruner) -> Pruner:
    while isinstance(pruner, _Delegating):
        pruner = pruner.inner
    return pruner


class RecordingPruner(_Delegating):
    """Delegates to a method and keeps (weight before pruning, Hessian) of the first Linears."""

    def __init__(self, inner: Pruner, limit: int) -> None:
        super().__init__(inner)
        self.limit = limit
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor:
        if len(self.pairs) < self.limit and stats.hessian is not None:
            self.pairs.append((linear.weight.detach().clone(), stats.hessian))
        return self.inner.prune_linear(name, linear, stats, target)


#: The benchmarked methods whose masking stage has a target (and is replayed alone).
REPLAYED = ("magnitude", "wanda")


class MaskingRecorder(_Delegating):
    """Delegates to a score method and keeps what each of its per-Linear steps was given.

    (Linear, statistics, sparsity) in the walk's order, so :func:`replay_masking` can run the
    scoring and masking stage again, alone, on the very same inputs. Nothing is copied while the
    walk is timed: the dense weights are taken back from the base model before each replay.
    """

    def __init__(self, inner: Pruner) -> None:
        if inner.true_sequential or not isinstance(inner, ScorePruner):
            raise ValueError("MaskingRecorder replays score methods in block order only")
        super().__init__(inner)
        self.records: list[tuple[str, nn.Linear, LinearStats, Sparsity]] = []

    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor:
        self.records.append((name, linear, stats, target))
        return self.inner.prune_linear(name, linear, stats, target)


def replay_masking(
    base: nn.Module, recorder: MaskingRecorder, repeats: int
) -> tuple[Measurement, list[Tensor]]:
    """The scoring and masking stage again, ``repeats`` times, on the walk's inputs: best time.

    Before each replay (untimed) every recorded Linear gets its dense weight back from ``base``
    (a score method does not change the weights of blocks it has not reached, so these are the
    weights it scored); then each is scored, masked, zeroed and its mask packed, as in the walk.
    Returns the best measurement and the last replay's masks, in the walk's order.
    """
    dense = [
        lin.weight for block in decoder_layers(base) for lin in prunable_linears(block).values()
    ]
    if len(dense) != len(recorder.records) or any(
        w.shape != lin.weight.shape for w, (_, lin, _, _) in zip(dense, recorder.records)
    ):
        raise ValueError("the recorded Linears do not match the base model's decoder Linears")

    def restore() -> None:
        with torch.no_grad():
            for weight, (_, linear, _, _) in zip(dense, recorder.records):
                linear.weight.copy_(weight)

    def work(_: None) -> PackedMasks:
        masks = PackedMasks()
        for i, (name, linear, stats, target) in enumerate(recorder.records):
            masks.add(str(i), recorder.inner.prune_linear(name, linear, stats, target))
        return masks

    measured, masks = measure(work, repeats, setup=restore)
    return measured, [masks[str(i)] for i in range(len(masks))]


@dataclass
class MethodRun:
    """One run of a method: per-stage totals, the masks, the method as it ran, the perplexity.

    ``method`` is the method itself (no benchmark wrapper), still prepared: a later run may reuse
    its dense-model pass (``run_method(..., pruner=run.method, prepared=True)``).
    """

    stages: dict[str, dict[str, Any]]
    masks: dict[str, Tensor]
    method: Pruner
    ppl: float


def _context(model: nn.Module) -> RunContext:
    """The run context of a benchmarked run: the CPU, the model's dtype, no cache, no bars."""
    dtype = next(model.parameters()).dtype
    return RunContext(device=torch.device("cpu"), model_dtype=dtype, progress=False)


def run_method(
    base: nn.Module,
    method: str,
    windows: Tensor,
    eval_tokens: Tensor,
    settings: Settings,
    *,
    batch_size: int = 1,
    pruner: Pruner | None = None,
    prepared: bool = False,
    evaluate: bool = True,
    memory: bool = False,
) -> MethodRun:
    """Prune a fresh copy of ``base`` with ``method`` as gblm does, timing every stage.

    Args:
        base: the dense model; it is copied (untimed), never modified.
        method: a registered method (:func:`gblm.methods.registry.build_method`, its defaults).
        windows: (N, T) calibration ids. eval_tokens: (1, windows x T) evaluation ids.
        settings: sparsity and seqlen.
        batch_size: windows per forward in the walk.
        pruner: the method object to run instead of a fresh one (e.g. a
            :class:`RecordingPruner`, or the method of an earlier :class:`MethodRun`).
        prepared: ``pruner``'s dense-model pass already ran: it is not run (nor timed) again.
        evaluate: run the perplexity stage.
        memory: record each stage's peak memory too.
    """
    model = copy.deepcopy(base)
    clock = StageClock(memory=memory)
    pruner = pruner or build_method(method)
    if pruner.dense_pass is not None and not prepared:  # GBLM's gradient stage
        with clock.stage(GRADIENT_STAGE):
            pruner.prepare(model, windows, _context(model))
    with timed_walk(clock):
        masks = prune_model(
            model,
            _TimedMasking(pruner, clock),
            Sparsity(settings.sparsity),
            windows,
            device="cpu",
            batch_size=batch_size,
            progress=False,
        )
    ppl = math.nan
    if evaluate:
        with clock.stage(EVALUATION):
            ppl = perplexity(
                model, eval_tokens, settings.seqlen, device=torch.device("cpu"), progress=False
            )
    return MethodRun(clock.as_dict(), masks, _innermost(pruner), ppl)


def walk_total(stages: dict[str, dict[str, Any]], key: str = "cpu_s") -> float:
    """The walk's time: capture, statistics, scoring and masking, re-forward."""
    return sum(stages[s][key] for s in WALK_STAGES if s in stages)


def mask_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Any]:
    """How many mask entries differ between two runs (``equal`` when none does)."""
    differ = sum(int((a[k] != b[k]).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    return {"entries_differ": differ, "entries": total, "equal": differ == 0}


# --- floors -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _only_linear_weights_require_grad(model: nn.Module) -> Iterator[list[Tensor]]:
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    weights = [lin.weight for lin in decoder_linear_names(model).values()]
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        yield weights
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None


def gradient_floor(model: nn.Module, windows: Tensor) -> None:
    """N plain forward+backward passes, batch of one, weight gradients of the decoder Linears."""
    with _only_linear_weights_require_grad(model) as weights, torch.enable_grad():
        for n in range(windows.shape[0]):
            ids = windows[n : n + 1]
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for w in weights:
                w.grad = None


def forward_graph_bytes(model: nn.Module, windows: Tensor) -> int | None:
    """One sample's activations: the peak memory while its forward graph (and loss) is alive."""
    with _only_linear_weights_require_grad(model), torch.enable_grad():
        watch = PeakWatch()
        watch.begin()
        ids = windows[:1]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        peak = watch.peak()
        del loss
    return peak


@torch.no_grad()
def block_passes(
    model: nn.Module, inputs: BlockInputs, passes: int = 2, device: torch.device | str = "cpu"
) -> None:
    """``passes`` forward passes of all decoder blocks over the N captured inputs."""
    blocks = decoder_layers(model)
    for _ in range(passes):
        hidden = inputs.hidden.clone()
        outputs = torch.empty_like(hidden)
        for block in blocks:
            for start, end in inputs.batches():
                args, kwargs = inputs.call_args(end - start, device)
                out = block(hidden[start:end], *args, **kwargs)
                outputs[start:end] = out[0] if isinstance(out, tuple | list) else out
            hidden, outputs = outputs, hidden


@torch.no_grad()
def evaluation_floor(model: nn.Module, eval_tokens: Tensor, seqlen: int) -> None:
    """Plain forwards (logits only) of the evaluation windows."""
    windows = eval_tokens.reshape(-1, seqlen)
    for n in range(windows.shape[0]):
        model(windows[n : n + 1], use_cache=False)


def measure_floors(
    model: nn.Module,
    windows: Tensor,
    eval_tokens: Tensor,
    settings: Settings,
    repeats: int,
    memory: bool = False,
) -> dict[str, Measurement]:
    """The gradient, walk and evaluation floors (walk: block-0 capture done untimed first)."""
    gradient, _ = measure(lambda: gradient_floor(model, windows), repeats, memory=memory)
    walk, _ = measure(
        lambda inputs: block_passes(model, inputs),
        repeats,
        setup=lambda: capture_block_inputs(model, windows),
        memory=memory,
    )
    evaluation, _ = measure(
        lambda: evaluation_floor(model, eval_tokens, settings.seqlen), repeats, memory=memory
    )
    return {"gradient": gradient, "walk": walk, "evaluation": evaluation}


def product_path(
    case: Any, windows: Tensor, settings: Settings, threads: int, methods: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Each method as a user runs it: the model freshly loaded (its weights as the loader maps
    them), torch's default threads, the method's dense pass then the walk; once each, untimed
    load. Beside the controlled runs (a private copy of the model, ``settings.threads``), this
    shows what the controlled runs cannot: costs of the loaded model itself (page faults on
    mapped weights) and of the thread count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, dict[str, Any]] = {}
    try:
        for name in methods:
            model = case.build()  # as loaded, no copy
            method = build_method(name)
            timings: dict[str, Any] = {}
            if method.dense_pass is not None:
                with _wall_and_cpu(timings, "dense_pass"):
                    method.prepare(model, windows, _context(model))
            with _wall_and_cpu(timings, "walk"):
                prune_model(model, method, Sparsity(settings.sparsity), windows, device="cpu",
                            progress=False)  # fmt: skip
            method.release()
            out[name] = {"threads": threads, **timings}
            del model
    finally:
        torch.set_num_threads(saved)
    return out


@contextlib.contextmanager
def _wall_and_cpu(into: dict[str, Any], key: str) -> Iterator[None]:
    """Wall and process CPU seconds of the block, as ``into[key] = {"wall_s", "cpu_s"}``."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    into[key] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
