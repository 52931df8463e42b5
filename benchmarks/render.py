"""The benchmark report as Markdown: what was measured, how, and whether each target is met."""

from __future__ import annotations

from typing import Any

from benchmarks.work import EVALUATION, GRADIENT_STAGE, METHODS, STAGE_FLOORS, STAGES

_SHARE_STAGES = {stage for stage, (_, _, meaning) in STAGE_FLOORS.items() if "share" in meaning}

METHOD_NOTES = """\
How it is measured
- Time: CPU seconds of the process (`time.process_time`) and wall seconds, the minimum over the
  repeats; ratios use CPU time, so other work on the machine does not move them (wall ratios are
  shown beside). Intra-op threads = {threads}: on a shared 2-core machine extra threads
  wait on each other (elementwise ops measured 6x slower with 2 threads under load).
- Floors, measured in the same run on the same data: gradient = N plain fwd+bwd of the dense
  model (batch of one, weight gradients of the decoder Linears only, dropped after each sample);
  walk = N forward passes of all decoder blocks, twice; evaluation = plain forwards (logits only)
  of the evaluation windows. Stage ratios: statistics and re-forward against N block forwards
  (half the walk floor), capture and masking as a share of the walk floor (the calibration
  passes), the gradient stage against the gradient floor.
- Memory (peak MiB): measured first, in a pass of its own, with glibc's mmap threshold fixed
  at 64 KiB while the heap is still fresh, so every tensor of 64 KiB or more is its own mapping,
  unmapped when freed, and the resident set follows the live tensors. A stage's peak is the rise
  of the resident high-water mark (VmHWM, reset through /proc/self/clear_refs at the stage's
  start) over the resident set at its start; the maximum over blocks for walk stages. torch's
  CPU allocator keeps no statistics and tracemalloc does not see it, hence the kernel's count.
  Timings follow in the same process with every allocation served from glibc's heap and no
  freed memory handed back to the kernel: each timed run copies the model, and on a virtual
  machine re-faulting the pages a previous copy gave back costs up to 2x on the masking stages.
- FLOPs: analytic. Linears 2 x weights per token forward, 3x that with weight gradients, LM head
  2x forward (input gradient only), causal attention 2 T^2 H per block and sample forward (3x
  with backward), SparseGPT Hessians 2 d_in^2 per token per distinct input. GFLOP/s are per CPU
  second.
"""


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def _mib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _pct(share: float | None) -> str:
    if share is None:
        return "-"
    return f"{100 * share:.1f}%" if share >= 0.01 else f"{100 * share:.3f}%"


def _gflops(flop: float, seconds: float) -> str:
    return f"{flop / seconds / 1e9:.1f}" if seconds > 0 else "-"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _model_title(r: dict[str, Any]) -> str:
    c, counts = r["case"], r["counts"]
    shape = (
        "SmolLM2-135M (pretrained), hidden 576, 30 blocks"
        if c["smollm2"]
        else f"tiny LLaMA, hidden {c['hidden']}, MLP {c['intermediate']}, {c['layers']} blocks, "
        f"{c['heads']} heads, vocab {c['vocab']}"
    )
    return (
        f"### {c['name']}: {shape}; {counts['params'] / 1e6:.2f}M parameters "
        f"({counts['linear_params'] / 1e6:.2f}M in decoder Linears); N={r['nsamples']} x "
        f"T={r['seqlen']}, {r['repeats']} repeats"
    )


def _floors(r: dict[str, Any]) -> list[str]:
    f = r["flops"]
    work = {"gradient": f["gradient_floor"], "walk": f["walk_floor"], "evaluation": f["evaluation"]}
    what = {
        "gradient": "N plain fwd+bwd, dense model",
        "walk": "2N forward passes of the blocks",
        "evaluation": "plain forwards of the eval windows",
    }
    rows = []
    for name, m in r["floors"].items():
        rows.append(
            [
                name,
                what[name],
                _s(m["cpu_s"]),
                _s(m["wall_s"]),
                f"{m['spread']:.2f}",
                f"{work[name] / 1e9:.1f}",
                _gflops(work[name], m["cpu_s"]),
                _mib(m["peak_bytes"]),
            ]
        )
    header = ["floor", "work", "CPU s", "wall s", "max/min", "GFLOP", "GFLOP/s", "peak MiB"]
    return ["Floors", "", *_table(header, rows)]


def _stages(r: dict[str, Any]) -> list[str]:
    rows = []
    for method in METHODS:
        for stage in STAGES:
            e = r["methods"][method]["stages"][stage]
            if not e["applicable"]:
                continue
            share = stage in _SHARE_STAGES
            fmt = _pct if share else _x
            rows.append(
                [
                    method,
                    stage,
                    _s(e["cpu_s"]),
                    _s(e["wall_s"]),
                    fmt(e["ratio_cpu"]),
                    fmt(e["ratio_wall"]),
                    e["ratio_meaning"],
                    _mib(e["peak_bytes"]),
                ]
            )
    header = [
        "method",
        "stage",
        "CPU s",
        "wall s",
        "ratio CPU",
        "ratio wall",
        "against",
        "peak MiB",
    ]
    lines = ["Stages (ratios against the floors above)", "", *_table(header, rows)]
    replays = [
        f"{method} {_s(e['cpu_s'])} s = {_pct(e['ratio_cpu'])} (all: "
        + ", ".join(_s(t) for t in e["cpu_all"])
        + ")"
        for method in METHODS
        if (e := r["methods"][method].get("masking_replayed"))
    ]
    if replays:
        lines += [
            "Scoring and masking replayed alone on the walk's own inputs (dense weights back "
            "before each), best of the replays, against the calibration passes: "
            + "; ".join(replays)
            + ".",
            "",
        ]
    return lines


def _composites(r: dict[str, Any]) -> list[str]:
    rows = []
    f = r["flops"]
    for method in METHODS:
        e = r["methods"][method]
        if "walk" not in e:
            continue
        walk_flop = f["walk_floor"] + (
            f["hessian"] + f["sparsegpt_solve"] if method == "sparsegpt" else 0.0
        )
        rows.append(
            [
                f"{method} walk",
                _s(e["walk"]["cpu_s"]),
                _x(e["walk"]["ratio_cpu"]),
                _x(e["walk"]["ratio_wall"]),
                _gflops(walk_flop, e["walk"]["cpu_s"]),
                f"{e['ppl']:.4g}",
            ]
        )
    e2e = r["methods"]["gblm"]["end_to_end"]
    rows.append(
        [
            "gblm gradients + walk",
            _s(e2e["cpu_s"]),
            _x(e2e["ratio_cpu"]),
            _x(e2e["ratio_wall"]),
            _gflops(f["gradient_floor"] + f["walk_floor"], e2e["cpu_s"]),
            "",
        ]
    )
    header = ["", "CPU s", "/ floor (CPU)", "/ floor (wall)", "GFLOP/s", "ppl (random ids)"]
    return [
        "Walks against the walk floor; GBLM end to end against gradient + walk floors "
        "(SparseGPT's GFLOP/s count its Hessians and solves too)",
        "",
        *_table(header, rows),
    ]


def _memory(r: dict[str, Any]) -> list[str]:
    m = r.get("gradient_memory")
    if m is None:
        return []
    return [
        "Gradient-stage memory: weights "
        f"{_mib(m['weights_bytes'])} MiB + fp16 accumulators {_mib(m['accumulator_bytes'])} MiB"
        f" + one sample's activations {_mib(m['one_sample_activation_bytes'])} MiB (peak while"
        f" one forward graph is alive) = budget {_mib(m['budget_bytes'])} MiB; measured peak"
        f" {_mib(m['stage_peak_bytes'])} MiB (weights + {_mib(m['stage_extra_bytes'])} MiB"
        f" allocated during the stage) = {_x(m['ratio'])} the budget"
        f" ({_x(m['extra_over_accumulators_and_activations'])} of accumulators + activations;"
        f" beyond that, backward's working set: activation gradients, one weight gradient and"
        f" its fold at a time; a (T, vocab) fp32 buffer is {_mib(m['logits_gradient_bytes'])} MiB)."
        f" The published layout (fp16 .grad for every parameter + ~6 B per Linear weight of host"
        f" accumulators) would add {_mib(m['published_layout_bytes'])} MiB here.",
        "",
    ]


def _reference(r: dict[str, Any]) -> list[str]:
    ref = r.get("sparsegpt_reference")
    if not ref:
        return []
    rows = [
        [
            row["pattern"],
            str(row["linears"]),
            str(row["blocksize"]),
            _s(row["gblm_cpu_s"]),
            _s(row["reference_cpu_s"]),
            _x(row["ratio"]),
            "yes" if row["weights_identical"] else "NO",
        ]
        for row in ref["rows"]
    ]
    header = ["pattern", "Linears", "blocksize", "gblm CPU s", "published loop CPU s", "ratio",
              "same weights"]  # fmt: skip
    return [
        "SparseGPT per-Linear solve (block 0's Hessians from the walk) against the published "
        "loop re-implemented in benchmarks/reference_sparsegpt.py",
        "",
        *_table(header, rows),
    ]


def _flop_floor(r: dict[str, Any]) -> list[str]:
    rows = [
        [name, f"{x['flops'] / 1e9:.1f}", _s(x["floor_s"]), _s(x["controlled_cpu_s"]),
         _x(x["ratio"]), _s(x["product_wall_s"]), _x(x["product_ratio"])]
        for name, x in (r.get("flop_floor") or {}).items()
    ]  # fmt: skip
    if not rows:
        return []
    header = ["pass", "GFLOP", "floor s", "controlled CPU s", "ratio", "as run wall s",
              "ratio (default threads)"]  # fmt: skip
    return [
        "Against the FLOP floor: each pass's FLOPs at the fp32 matmul rate measured in this run "
        "(the suite's threads for the controlled runs, torch's default threads for the product's "
        "path).",
        "",
        *_table(header, rows),
        "",
    ]


def _product_path(r: dict[str, Any]) -> list[str]:
    runs = r.get("product_path")
    if not runs:
        return []
    rows = []
    for method, p in runs.items():
        controlled = r["methods"][method].get("walk", {})
        dense = p.get("dense_pass")
        rows.append([
            method, str(p["threads"]), _s(dense["wall_s"]) if dense else "-",
            _s(p["walk"]["wall_s"]), _s(p["walk"]["cpu_s"]), _s(controlled.get("wall_s")),
        ])  # fmt: skip
    header = ["method", "threads", "dense pass wall s", "walk wall s", "walk CPU s",
              "controlled walk wall s"]  # fmt: skip
    return [
        "As a user runs it: the model freshly loaded (weights as the loader maps them), torch's "
        "default threads, once; beside it the controlled walk (a private copy of the model, the "
        "suite's threads, best of the repeats).",
        "",
        *_table(header, rows),
        "",
    ]


def _extras(r: dict[str, Any]) -> list[str]:
    x = r.get("extras")
    if not x:
        return []
    lines = ["Batched calibration forwards in the walk (batch 1 vs 4, same windows)", ""]
    rows = []
    for method, b in x["batching"].items():
        masks = b["masks"]
        rows.append(
            [
                method,
                _s(b["batch1_walk_cpu_s"]),
                _s(b["batch4_walk_cpu_s"]),
                _x(b["speedup_cpu"]),
                "equal"
                if masks["equal"]
                else f"{masks['entries_differ']} of {masks['entries']} entries differ",
            ]
        )
    lines += _table(["method", "walk CPU s, batch 1", "batch 4", "speedup", "masks"], rows)
    c = x["checkpointing"]
    lines += [
        f"Gradient stage block by block: {_s(c['checkpointed_cpu_s'])} CPU s against "
        f"{_s(c['plain_cpu_s'])} ({_x(c['time_ratio'])} the time), peak "
        f"{_mib(c['peak_bytes'])} MiB against {_mib(c['plain_peak_bytes'])} MiB; gradient norms "
        f"{'identical' if c['norms_identical'] else 'DIFFERENT'}.",
        "",
    ]
    bf = x["bfloat16"]
    rows = [
        [f"floor: {name}", _s(v["fp32_cpu_s"]), _s(v["bf16_cpu_s"]), _x(v["speedup"])]
        for name, v in bf["floors"].items()
    ]
    rows += [
        [f"gblm: {stage}", _s(v["fp32_cpu_s"]), _s(v["bf16_cpu_s"]), _x(v["speedup"])]
        for stage, v in bf["gblm_stages"].items()
    ]
    lines += [
        "bfloat16 against float32 (model loaded in bf16; speedup > 1 means bf16 is faster)",
        "",
        *_table(["", "fp32 CPU s", "bf16 CPU s", "speedup"], rows),
        f"GBLM masks in bf16 agree with fp32 on {_pct(bf['mask_agreement_with_fp32'])} of the "
        f"entries; perplexity (random ids) {bf['ppl_fp32']:.4g} fp32, {bf['ppl_bf16']:.4g} bf16.",
        "",
    ]
    return lines


def _scaling(report: dict[str, Any]) -> list[str]:
    models = report["models"]
    lines = ["## How cost grows", ""]
    for sweep in ("width", "depth"):
        order = "hidden" if sweep == "width" else "layers"
        cases = sorted(
            (r for r in models if sweep in r["case"]["sweeps"]), key=lambda r: r["case"][order]
        )
        if not cases:
            continue
        rows = []
        for r in cases:
            c, f, m = r["case"], r["flops"], r["methods"]
            rows.append(
                [
                    c["name"],
                    str(c["hidden"]),
                    str(c["layers"]),
                    f"{f['gradient_floor'] / 1e9:.1f}",
                    f"{f['walk_floor'] / 1e9:.1f}",
                    _s(r["floors"]["gradient"]["cpu_s"]),
                    _s(m["gblm"]["stages"][GRADIENT_STAGE]["cpu_s"]),
                    _s(r["floors"]["walk"]["cpu_s"]),
                    _s(m["wanda"]["walk"]["cpu_s"]),
                    _s(m["sparsegpt"]["walk"]["cpu_s"]),
                    _s(m["gblm"]["walk"]["cpu_s"]),
                    _s(m["magnitude"]["stages"]["scoring and masking"]["cpu_s"]),
                    _s(m["gblm"]["stages"][EVALUATION]["cpu_s"]),
                ]
            )
        header = ["model", "hidden", "blocks", "GFLOP fwd+bwd", "GFLOP walk", "grad floor",
                  "grad stage", "walk floor", "wanda walk", "sparsegpt walk", "gblm walk",
                  "magnitude", "eval"]  # fmt: skip
        lines += [f"Time (CPU s) against {sweep}", "", *_table(header, rows)]
    rows = []
    for name, fit in report["scaling"].items():
        residuals = ", ".join(f"{case} {100 * v:+.0f}%" for case, v in fit["residuals"].items())
        smol = fit.get("smollm2")
        rows.append(
            [
                name,
                f"{fit['gflops_per_cpu_s']:.1f}",
                "-" if fit["loglog_slope"] is None else f"{fit['loglog_slope']:.2f}",
                _pct(fit["max_abs_residual"]),
                residuals,
                "-"
                if smol is None
                else f"{_s(smol['measured_cpu_s'])} vs {_s(smol['predicted_cpu_s'])} "
                f"({100 * smol['residual']:+.0f}%)",
            ]
        )
    header = ["quantity", "fitted GFLOP/s", "log-log slope", "max |residual|", "residuals",
              "SmolLM2 measured vs predicted s"]  # fmt: skip
    lines += [
        "Fit time = FLOPs / rate over the tiny models (residual = measured / fitted - 1; a "
        "log-log slope of 1 means time grows in proportion to FLOPs)",
        "",
        *_table(header, rows),
    ]
    return lines


def _verdicts(report: dict[str, Any]) -> list[str]:
    rows = []
    for v in report["verdicts"]:
        share = "masking" in v["target"]
        fmt = _pct if share else _x
        met = "n/a" if v["met"] is None else ("MET" if v["met"] else "MISSED")
        rows.append([v["model"], v["target"], fmt(v["value"]), fmt(v["limit"]), met, v["note"]])
    met = sum(1 for v in report["verdicts"] if v["met"])
    missed = sum(1 for v in report["verdicts"] if v["met"] is False)
    return [
        "## Targets",
        "",
        *_table(["model", "target", "measured", "target", "verdict", "note"], rows),
        f"{met} met, {missed} missed.",
        "",
    ]


def render(report: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    s, m = report["settings"], report["machine"]
    lines = [
        f"# gblm benchmarks ({s['mode']} mode)",
        "",
        f"{m['cpu']}, {m['cores']} cores (bf16 instructions: "
        f"{', '.join(m['cpu_bf16_instructions']) or 'none'}), torch {m['torch']}, "
        f"{m['threads']} intra-op thread(s); "
        f"load average at start {m['load_average_at_start']}; fp32 matmul "
        f"{m.get('matmul_gflops', {}).get('suite_threads', float('nan')):.0f} GFLOP/s "
        f"({m.get('matmul_gflops', {}).get('default_threads', float('nan')):.0f} at torch's "
        f"default threads); sparsity {s['sparsity']}; "
        f"{report['seconds']:.0f} s in all.",
        "",
        METHOD_NOTES.format(threads=m["threads"]),
    ]
    lines += _verdicts(report)
    lines += ["## Per model", ""]
    for r in report["models"]:
        lines += [_model_title(r), ""]
        lines += _floors(r) + _stages(r) + _composites(r) + _memory(r)
        lines += _reference(r) + _flop_floor(r) + _product_path(r) + _extras(r)
    lines += _scaling(report)
    return "\n".join(lines).rstrip() + "\n"
