"""The benchmark suite: per model, the floors, every method's stages, extras and the scaling fit.

For every model (tiny LLaMA configs of growing width and depth, optionally SmolLM2-135M):

- Floors, the least work each stage must do, measured in the same process on the same data
  (:mod:`benchmarks.work`), and each method run as gblm runs it, its stages timed by the walk's
  own timer. Ratios are CPU time over the floor.
- On one probe model: batch 1 vs 4 in the walk (time, and whether the masks agree), gradient
  checkpointing, bfloat16 against float32, and SparseGPT's per-Linear solve against the published
  loop (:mod:`benchmarks.reference_sparsegpt`) on the Hessians the walk gathered.
- Memory, in a pass of its own before any timing: glibc's mmap threshold is fixed low so that
  every tensor of 64 KiB or more is its own mapping, returned on free; the resident set then
  follows the live tensors, and each stage's peak is its high-water mark above the resident set
  at its start (see :mod:`benchmarks.measure`). Timings come after, with a normal heap.
- Judging (:mod:`benchmarks.analysis`): the targets per model, and time against analytic FLOPs
  (:mod:`benchmarks.flops`) across the tiny models.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import flops
from benchmarks.analysis import PUBLISHED_CALIBRATION, TARGETS, scaling_fit, verdicts
from benchmarks.cases import Prepared, Settings, prepare
from benchmarks.measure import (
    Measurement,
    best_stages,
    keep_freed_memory,
    measure,
    mmap_every_tensor,
)
from benchmarks.reference_sparsegpt import reference_sparsegpt
from benchmarks.work import (
    GRADIENT_STAGE,
    METHODS,
    REPLAYED,
    STAGE_FLOORS,
    STAGES,
    MaskingRecorder,
    MethodRun,
    RecordingPruner,
    applicable_stages,
    evaluation_floor,
    forward_graph_bytes,
    gradient_floor,
    mask_difference,
    measure_floors,
    product_path,
    replay_masking,
    run_method,
    walk_total,
)
from gblm.calibration.gradients import gradient_norms
from gblm.methods.registry import build_method
from gblm.models.layers import decoder_layers, prunable_linears
from gblm.pruning.sparsegpt import sparsegpt_prune

log = logging.getLogger("benchmarks")
#: The threads torch picks by itself (read before the suite sets its own count).
DEFAULT_THREADS = torch.get_num_threads()
#: The methods timed as a user runs them (:func:`benchmarks.work.product_path`).
PRODUCT_METHODS = ("wanda", "gblm")
ACCUMULATOR_BYTES = 2  # GBLM's default fp16 accumulators


def _stage_report(
    applicable: tuple[str, ...], stages: dict[str, dict[str, Any]], floors: dict[str, Measurement]
) -> dict[str, dict[str, Any]]:
    report: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        if stage not in applicable:
            report[stage] = {"applicable": False}
            continue
        t = stages[stage]
        floor_name, share, meaning = STAGE_FLOORS[stage]
        floor = floors[floor_name]
        report[stage] = {
            "applicable": True,
            "cpu_s": t["cpu_s"],
            "wall_s": t["wall_s"],
            "cpu_all": t["cpu_all"],
            "entries": t["entries"],
            "floor": floor_name,
            "floor_share": share,
            "ratio_meaning": meaning,
            "ratio_cpu": t["cpu_s"] / (floor.cpu_s * share),
            "ratio_wall": t["wall_s"] / (floor.wall_s * share),
            "peak_bytes": None,
        }
    return report


def _timed_runs(
    prepared: Prepared, settings: Settings, method: str, repeats: int, reference_linears: int
) -> tuple[dict[str, dict[str, Any]], MethodRun, MaskingRecorder | None, list]:
    """``repeats`` runs of ``method``: best stages, the first run, what its recorders kept.

    The first run records: the Hessians of the first ``reference_linears`` Linears for a method
    that gathers them (0: none), or the masking stage's inputs for a replayed method.
    """
    model, windows, eval_tokens = prepared.model, prepared.windows, prepared.eval_tokens
    declared = build_method(method)
    stage_runs, first, masking_inputs, recorded = [], None, None, []
    for r in range(repeats):
        recorder = None
        if "hessian" in declared.stats and reference_linears and r == 0:
            recorder = RecordingPruner(build_method(method), limit=reference_linears)
        elif method in REPLAYED and r == 0:
            recorder = masking_inputs = MaskingRecorder(build_method(method))
        run = run_method(model, method, windows, eval_tokens, settings, pruner=recorder)
        stage_runs.append(run.stages)
        if r == 0:
            first = run
            if isinstance(recorder, RecordingPruner):
                recorded = recorder.pairs
    return best_stages(stage_runs), first, masking_inputs, recorded


def _method_entry(
    declared, stages: dict[str, dict[str, Any]], floors: dict[str, Measurement], run: MethodRun
) -> dict[str, Any]:
    """A method's report: its stages, and its walk and end to end where it has them."""
    entry: dict[str, Any] = {
        "stages": _stage_report(applicable_stages(declared), stages, floors),
        "ppl": run.ppl,
    }
    walk_cpu, walk_wall = walk_total(stages), walk_total(stages, "wall_s")
    if declared.needs_calibration:
        entry["walk"] = {
            "cpu_s": walk_cpu,
            "wall_s": walk_wall,
            "ratio_cpu": walk_cpu / floors["walk"].cpu_s,
            "ratio_wall": walk_wall / floors["walk"].wall_s,
        }
    if declared.dense_pass is not None:  # GBLM: gradients, then the walk
        grad = stages[GRADIENT_STAGE]
        floor_cpu = floors["gradient"].cpu_s + floors["walk"].cpu_s
        floor_wall = floors["gradient"].wall_s + floors["walk"].wall_s
        entry["end_to_end"] = {
            "cpu_s": grad["cpu_s"] + walk_cpu,
            "wall_s": grad["wall_s"] + walk_wall,
            "floor_cpu_s": floor_cpu,
            "ratio_cpu": (grad["cpu_s"] + walk_cpu) / floor_cpu,
            "ratio_wall": (grad["wall_s"] + walk_wall) / floor_wall,
        }
    return entry


def _replayed_entry(
    model: nn.Module, recorder: MaskingRecorder, run: MethodRun, floors, replays: int
) -> dict[str, Any]:
    """The masking stage replayed alone on the walk's inputs, best of ``replays``."""
    replayed, replay_masks = replay_masking(model, recorder, replays)
    return {
        "replays": replayed.repeats,
        "cpu_s": replayed.cpu_s,
        "cpu_all": replayed.cpu_all,
        "ratio_cpu": replayed.cpu_s / floors["walk"].cpu_s,
        # the replay did the walk's work: the same masks, in the walk's order
        "same_masks": all(torch.equal(a, b) for a, b in zip(replay_masks, run.masks.values())),
    }


def bench_model(prepared: Prepared, settings: Settings) -> dict[str, Any]:
    """Every timing on one model: floors, the benchmarked methods, and the extras on the probe."""
    began = time.perf_counter()
    case, model = prepared.case, prepared.model
    windows, eval_tokens = prepared.windows, prepared.eval_tokens
    counts = flops.model_counts(model)
    n, t = settings.nsamples, settings.seqlen
    repeats = settings.smollm2_repeats if case.smollm2 else settings.repeats
    log.info("%s: %.1fM parameters, floors", case.name, counts.params / 1e6)

    floors = measure_floors(model, windows, eval_tokens, settings, repeats)
    methods: dict[str, Any] = {}
    runs: dict[str, MethodRun] = {}
    recorded: list[tuple[Tensor, Tensor]] = []
    want_reference = case.name == settings.probe or case.smollm2
    first_block = len(prunable_linears(decoder_layers(model)[0])) if want_reference else 0
    for method in METHODS:
        log.info("%s: %s", case.name, method)
        stages, runs[method], masking_inputs, pairs = _timed_runs(
            prepared, settings, method, repeats, first_block
        )
        recorded = pairs or recorded
        entry = _method_entry(build_method(method), stages, floors, runs[method])
        if masking_inputs is not None:
            entry["masking_replayed"] = _replayed_entry(
                model, masking_inputs, runs[method], floors, settings.replays
            )
            del masking_inputs
        methods[method] = entry

    result: dict[str, Any] = {
        "case": asdict(case),
        "counts": counts.as_dict(),
        "vocab": model.get_output_embeddings().weight.shape[0],
        "nsamples": n,
        "seqlen": t,
        "repeats": repeats,
        "flops": _flop_counts(counts, settings, model),
        "floors": {k: v.as_dict() for k, v in floors.items()},
        "methods": methods,
    }
    if recorded:
        result["sparsegpt_reference"] = compare_with_reference(recorded, repeats=max(repeats, 2))
    if case.smollm2 or (case.name == settings.probe and not any(c.smollm2 for c in settings.cases)):
        log.info("%s: the product's own path (as loaded, %d threads)", case.name, DEFAULT_THREADS)
        result["product_path"] = product_path(
            case, windows, settings, DEFAULT_THREADS, PRODUCT_METHODS
        )
    if case.name == settings.probe:
        result["extras"] = bench_extras(model, windows, eval_tokens, settings, runs, result)
    result["seconds"] = time.perf_counter() - began
    return result


def _flop_counts(counts: flops.ModelCounts, settings: Settings, model: nn.Module) -> dict:
    n, t = settings.nsamples, settings.seqlen
    block = flops.block_forward_flops(counts, n, t)
    solve = sum(
        flops.sparsegpt_solve_flops(lin.out_features, lin.in_features)
        for b in decoder_layers(model)
        for lin in prunable_linears(b).values()
    )
    pub_n, pub_t = PUBLISHED_CALIBRATION
    return {
        "block_forward": block,
        "walk_floor": 2 * block,
        "gradient_floor": flops.forward_backward_flops(counts, n, t),
        "evaluation": flops.model_forward_flops(counts, settings.eval_windows, t),
        "hessian": flops.hessian_flops(counts, n, t),
        "sparsegpt_solve": solve,
        "walk_floor_published_calibration": 2 * flops.block_forward_flops(counts, pub_n, pub_t),
    }


# --- extras on the probe model ------------------------------------------------------------------


def compare_with_reference(
    pairs: list[tuple[Tensor, Tensor]], repeats: int, blocksize: int = 128
) -> dict[str, Any]:
    """gblm's SparseGPT solve against the published loop on the same (weight, Hessian) pairs."""
    rows = []
    for pattern, (ratio, n, m) in (("unstructured", (0.5, 0, 0)), ("2:4", (0.5, 2, 4))):
        ours_cpu = ref_cpu = 0.0
        identical = True
        for weight, hessian in pairs:
            args = (weight, hessian, ratio, n, m, blocksize)
            ours, (w_ours, _) = measure(lambda a=args: sparsegpt_prune(*a), repeats)
            ref, (w_ref, _) = measure(lambda a=args: reference_sparsegpt(*a), repeats)
            ours_cpu += ours.cpu_s
            ref_cpu += ref.cpu_s
            identical &= bool(torch.equal(w_ours, w_ref))
        rows.append(
            {
                "pattern": pattern,
                "linears": len(pairs),
                "shapes": [tuple(w.shape) for w, _ in pairs],
                "blocksize": blocksize,
                "gblm_cpu_s": ours_cpu,
                "reference_cpu_s": ref_cpu,
                "ratio": ours_cpu / ref_cpu,
                "weights_identical": identical,
            }
        )
    return {"rows": rows}


def _batching(
    model: nn.Module,
    windows: Tensor,
    eval_tokens: Tensor,
    settings: Settings,
    runs: dict[str, MethodRun],
    result: dict[str, Any],
) -> dict[str, Any]:
    """Batch 1 vs 4 in the walk: time, and whether the masks agree."""
    repeats = settings.repeats
    log.info("probe extras: batch size 4")
    batching = {}
    for method in (m for m in METHODS if runs[m].method.needs_calibration):
        stage_runs = []
        masks = None
        for _ in range(repeats):  # the same method objects: GBLM's gradients are not redone
            run = run_method(
                model, method, windows, eval_tokens, settings, batch_size=4,
                pruner=runs[method].method, prepared=True, evaluate=False,
            )  # fmt: skip
            stage_runs.append(run.stages)
            masks = masks or run.masks
        stages = best_stages(stage_runs)
        batch1 = result["methods"][method]["walk"]
        walk4 = walk_total(stages)
        batching[method] = {
            "batch1_walk_cpu_s": batch1["cpu_s"],
            "batch4_walk_cpu_s": walk4,
            "batch1_walk_wall_s": batch1["wall_s"],
            "batch4_walk_wall_s": walk_total(stages, "wall_s"),
            "speedup_cpu": batch1["cpu_s"] / walk4,
            "masks": mask_difference(runs[method].masks, masks),
        }
    return batching


def _gradient_options(
    model: nn.Module,
    windows: Tensor,
    settings: Settings,
    runs: dict[str, MethodRun],
    result: dict[str, Any],
) -> dict[str, Any]:
    """GBLM's gradient stage block by block (each block recomputed in backward), against plain."""
    repeats = settings.repeats
    extras: dict[str, Any] = {}
    log.info("probe extras: gradient stage block by block")
    plain = result["methods"]["gblm"]["stages"][GRADIENT_STAGE]
    gradients = runs["gblm"].method.gradients  # GBLM's registered gradient settings
    plain_norms = gradient_norms(model, windows, gradients, progress=False)  # untimed, to compare
    ckpt, ckpt_norms = measure(
        lambda: gradient_norms(model, windows, replace(gradients, blockwise=True), progress=False),
        repeats,
    )
    extras["checkpointing"] = {
        "plain_cpu_s": plain["cpu_s"],
        "checkpointed_cpu_s": ckpt.cpu_s,
        "checkpointed_wall_s": ckpt.wall_s,
        "time_ratio": ckpt.cpu_s / plain["cpu_s"],
        "norms_identical": all(torch.equal(ckpt_norms[k], plain_norms[k]) for k in ckpt_norms),
        "peak_bytes": None,
        "plain_peak_bytes": None,
    }
    return extras


def _bfloat16(
    model: nn.Module,
    windows: Tensor,
    eval_tokens: Tensor,
    settings: Settings,
    runs: dict[str, MethodRun],
    result: dict[str, Any],
) -> dict[str, Any]:
    """GBLM in bfloat16 against float32: floors, stages, masks, perplexity."""
    repeats = settings.repeats
    log.info("probe extras: bfloat16")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    floors16 = measure_floors(bf16, windows, eval_tokens, settings, repeats)
    stage_runs = []
    bf16_run = None
    for _ in range(repeats):
        bf16_run = run_method(bf16, "gblm", windows, eval_tokens, settings)
        stage_runs.append(bf16_run.stages)
    stages16 = best_stages(stage_runs)
    fp32 = result["methods"]["gblm"]["stages"]
    floors32 = result["floors"]
    return {
        "floors": {
            name: {
                "fp32_cpu_s": floors32[name]["cpu_s"],
                "bf16_cpu_s": floors16[name].cpu_s,
                "speedup": floors32[name]["cpu_s"] / floors16[name].cpu_s,
            }
            for name in floors16
        },
        "gblm_stages": {
            stage: {
                "fp32_cpu_s": fp32[stage]["cpu_s"],
                "bf16_cpu_s": stages16[stage]["cpu_s"],
                "speedup": fp32[stage]["cpu_s"] / stages16[stage]["cpu_s"],
            }
            for stage in STAGES
        },
        "mask_agreement_with_fp32": 1.0
        - mask_difference(runs["gblm"].masks, bf16_run.masks)["entries_differ"]
        / sum(m.numel() for m in bf16_run.masks.values()),
        "ppl_fp32": runs["gblm"].ppl,
        "ppl_bf16": bf16_run.ppl,
    }


def bench_extras(
    model: nn.Module,
    windows: Tensor,
    eval_tokens: Tensor,
    settings: Settings,
    runs: dict[str, MethodRun],
    result: dict[str, Any],
) -> dict[str, Any]:
    """Batch 1 vs 4, gradient checkpointing, bfloat16 vs float32 on the probe model."""
    extras: dict[str, Any] = {
        "batching": _batching(model, windows, eval_tokens, settings, runs, result)
    }
    extras.update(_gradient_options(model, windows, settings, runs, result))
    extras["bfloat16"] = _bfloat16(model, windows, eval_tokens, settings, runs, result)
    return extras


def memory_pass(prepared: Prepared, settings: Settings) -> dict[str, Any]:
    """Peak memory of the floors, of every method's stages, of one sample's activations.

    Meant to run in a process whose heap holds no large free chunks (see :func:`run_suite`), so
    that every tensor of 64 KiB or more is mapped when allocated and unmapped when freed. A warm-up
    first takes the one-time allocations (kernel workspaces, caches) out of the first reading.
    """
    model, windows, eval_tokens = prepared.model, prepared.windows, prepared.eval_tokens
    gradient_floor(model, windows[:1])
    evaluation_floor(model, eval_tokens, settings.seqlen)
    floors = measure_floors(model, windows, eval_tokens, settings, repeats=1, memory=True)
    memory: dict[str, Any] = {
        "floors": {name: m.peak_bytes for name, m in floors.items()},
        "activations": forward_graph_bytes(model, windows),
        "stages": {},
    }
    for method in METHODS:
        run = run_method(model, method, windows, eval_tokens, settings, memory=True)
        memory["stages"][method] = {k: v["peak_bytes"] for k, v in run.stages.items()}
    gradients = build_method("gblm").gradients  # GBLM's registered gradient settings
    if prepared.case.name == settings.probe:
        ckpt, _ = measure(
            lambda: gradient_norms(
                model, windows, replace(gradients, blockwise=True), progress=False
            ),
            memory=True,
        )
        memory["checkpointing"] = ckpt.peak_bytes
    return memory


def merge_memory(result: dict[str, Any], memory: dict[str, Any]) -> None:
    """Put the memory pass's peaks into a model's timing result; judge the gradient stage."""
    for name, peak in memory["floors"].items():
        result["floors"][name]["peak_bytes"] = peak
    for method, stages in memory["stages"].items():
        for stage, entry in result["methods"][method]["stages"].items():
            if entry.get("applicable"):
                entry["peak_bytes"] = stages.get(stage)
    counts = result["counts"]
    accumulators = counts["linear_params"] * ACCUMULATOR_BYTES
    activations = memory["activations"]
    stage_peak = memory["stages"]["gblm"].get(GRADIENT_STAGE)
    known = stage_peak is not None and activations is not None
    budget = counts["param_bytes"] + accumulators + (activations or 0)
    result["gradient_memory"] = {
        "weights_bytes": counts["param_bytes"],
        "accumulator_bytes": accumulators,
        "one_sample_activation_bytes": activations,
        "stage_extra_bytes": stage_peak,
        "stage_peak_bytes": counts["param_bytes"] + stage_peak if known else None,
        "budget_bytes": budget,
        "ratio": (counts["param_bytes"] + stage_peak) / budget if known else None,
        "extra_over_accumulators_and_activations": stage_peak / (accumulators + activations)
        if known
        else None,
        "published_layout_bytes": counts["params"] * 2 + counts["linear_params"] * 6,
        # the size of one (T, vocab) fp32 buffer (logits, log-probabilities or their gradient)
        "logits_gradient_bytes": result["seqlen"] * result["vocab"] * 4,
    }
    extras = result.get("extras")
    if extras is not None and "checkpointing" in memory:
        extras["checkpointing"]["peak_bytes"] = memory["checkpointing"]
        extras["checkpointing"]["plain_peak_bytes"] = stage_peak


def matmul_rate(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """This CPU's fp32 matmul rate in FLOP/s at ``threads`` threads: best of ``repeats`` (n x n) @
    (n x n) products, 2 n^3 FLOPs each. The floor every calibration pass is priced at."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm up
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - began)
    finally:
        torch.set_num_threads(saved)
    return 2 * n**3 / best


def flop_floor(result: dict[str, Any], rate: float, product_rate: float) -> dict[str, Any]:
    """Each calibration pass against its FLOPs at the measured matmul rate: the controlled runs at
    the suite's threads (``rate``) and the product's path at torch's own threads."""
    f, methods = result["flops"], result["methods"]
    rows: dict[str, Any] = {}

    def add(name: str, flops_: float, controlled: float | None, product: float | None) -> None:
        floor, product_floor = flops_ / rate, flops_ / product_rate
        rows[name] = {
            "flops": flops_, "floor_s": floor, "controlled_cpu_s": controlled,
            "ratio": controlled / floor if controlled else None,
            "product_wall_s": product, "product_floor_s": product_floor,
            "product_ratio": product / product_floor if product else None,
        }  # fmt: skip

    product = result.get("product_path", {})
    gblm = methods["gblm"]
    add("gradient stage (GBLM)", f["gradient_floor"], gblm["stages"][GRADIENT_STAGE].get("cpu_s"),
        product.get("gblm", {}).get("dense_pass", {}).get("wall_s"))  # fmt: skip
    add("walk (Wanda)", f["walk_floor"], methods["wanda"].get("walk", {}).get("cpu_s"),
        product.get("wanda", {}).get("walk", {}).get("wall_s"))  # fmt: skip
    return rows


def machine_info(settings: Settings) -> dict[str, Any]:
    """The CPU, its bf16 instructions, the torch version and threads, the load at the start."""
    cpu, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_bf16_instructions": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "torch": torch.__version__,
        "threads": settings.threads,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_suite(settings: Settings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every measurement of ``settings``; returns the JSON-able report."""
    say = progress or (lambda _msg: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    began = time.perf_counter()
    try:
        info = machine_info(settings)
        rate, product_rate = matmul_rate(settings.threads), matmul_rate(DEFAULT_THREADS)
        info["matmul_gflops"] = {"suite_threads": rate / 1e9, "default_threads": product_rate / 1e9}
        prepared: list[Prepared] = []
        memory: dict[str, dict[str, Any]] = {}
        # Memory first, while the heap has no large free chunks: every tensor of 64 KiB or more
        # is then an mmap of its own, and the resident set follows the live tensors.
        with mmap_every_tensor(settings.memory) as exact:
            for case in settings.cases:
                prepared.append(prepare(case, settings))
                if settings.memory:
                    say(f"memory {case.name} ...")
                    memory[case.name] = memory_pass(prepared[-1], settings)
        info["memory_method_exact_mmap"] = exact
        results = []
        with keep_freed_memory() as kept:
            info["timings_keep_freed_memory"] = kept
            while prepared:
                item = prepared.pop(0)
                say(f"timing {item.case.name} ...")
                results.append(bench_model(item, settings))
                results[-1]["flop_floor"] = flop_floor(results[-1], rate, product_rate)
                if item.case.name in memory:
                    merge_memory(results[-1], memory[item.case.name])
                del item
        report = {
            "settings": _settings_dict(settings),
            "machine": info,
            "targets": TARGETS,
            "models": results,
            "scaling": scaling_fit(results),
            "verdicts": verdicts(results),
        }
        report["seconds"] = time.perf_counter() - began
        return report
    finally:
        torch.set_num_threads(threads)


def _settings_dict(settings: Settings) -> dict[str, Any]:
    data = asdict(settings)
    data["cases"] = [c["name"] for c in data["cases"]]
    return data
