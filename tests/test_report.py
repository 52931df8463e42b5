"""The sweep report: a realistic fake sweep in, tables, plots and a self-contained HTML out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gblm.analysis.plots import save_mask_images
from gblm.analysis.records import write_mask_stats_csv
from gblm.analysis.stats import model_mask_stats
from gblm.pruning.masks import nm_mask, unstructured_row_mask
from gblm.report import build_report, find_runs, main

LINEARS = ("model.layers.{}.self_attn.q_proj", "model.layers.{}.mlp.down_proj")
SHAPES = {"q_proj": (32, 32), "down_proj": (32, 64)}


def _masks(method: str, ratio: float, n: int, m: int, seed: int) -> dict[str, torch.Tensor]:
    """Masks of two blocks; GBLM's favour whole input channels, like the paper's observation."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for block in range(2):
        for template in LINEARS:
            name = template.format(block)
            d_out, d_in = SHAPES[name.rsplit(".", 1)[-1]]
            score = torch.rand(d_out, d_in, generator=gen)
            if method == "gblm":
                score = score * 0.1 + torch.rand(d_in, generator=gen)  # channel structure
            masks[name] = nm_mask(score, n, m) if m else unstructured_row_mask(score, ratio)
    return masks


def make_run(
    sweep: Path,
    folder: str,
    method: str,
    sparsity: dict,
    ppl: float | None,
    *,
    status: str = "finished",
    zeroshot: float | None = None,
    seed: int = 0,
    dense_ppl: float = 20.0,
    images: bool = True,
    settings: dict | None = None,
) -> Path:
    """Write one run folder the way gblm.run does: config, mask stats and images, metrics.json."""
    run_dir = sweep / folder
    (run_dir / ".hydra").mkdir(parents=True)
    config = {
        "method": {"name": method},
        "model": {"name": "tiny_llama"},
        "sparsity": sparsity,
        "seed": seed,
    }
    for group, values in (settings or {}).items():  # e.g. {"calibration": {"nsamples": 8}}
        config.setdefault(group, {}).update(values)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if status == "unfinished":
        return run_dir
    n, m = sparsity.get("n", 0), sparsity.get("m", 0)
    masks = _masks(method, sparsity["ratio"], n, m, seed)
    per_linear, _, _, overall = model_mask_stats(masks, n, m)
    write_mask_stats_csv(per_linear, run_dir / "mask_stats.csv")
    if images:
        save_mask_images(masks, [LINEARS[1].format(0)], run_dir / "masks")
    label = f"{n}:{m}" if m else f"{sparsity['ratio']:g}"
    metrics = {
        "method": method,
        "sparsity": {**sparsity, "label": label},
        "model": "tiny_llama",
        "ppl": {"dense": dense_ppl, "pruned": ppl},
        "timings": {
            "calibration": 1.0,
            "prune": 2.0 + seed,
            "evaluation": 3.0,
            "total": 6.0 + seed,
        },
        "peak_memory_bytes": 3 * 2**30,
        "sparsity_check": {
            "overall": overall["sparsity"],
            "per_block": [
                {"block": b, "zero_share": sparsity["ratio"] + 0.01 * b} for b in range(2)
            ],
        },
        "status": status,
    }
    if zeroshot is not None:
        metrics["zeroshot"] = {
            "austen_cloze": {"acc": zeroshot, "acc_norm": zeroshot},
            "mean_acc": zeroshot,
            "mean_acc_norm": zeroshot,
        }
    if status == "failed":
        metrics["error"] = "RuntimeError: out of memory\ntraceback..."
        del metrics["ppl"]["pruned"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


UNSTRUCTURED = {"ratio": 0.5, "n": 0, "m": 0}
SIXTY = {"ratio": 0.6, "n": 0, "m": 0}
TWO_FOUR = {"ratio": 0.5, "n": 2, "m": 4}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Nine runs: four methods, three sparsities, two seeds in one cell, one failed, one unfinished."""
    sweep = tmp_path_factory.mktemp("sweep")
    make_run(sweep, "0_method=magnitude", "magnitude", UNSTRUCTURED, 95.5, zeroshot=0.30)
    make_run(sweep, "1_method=wanda", "wanda", UNSTRUCTURED, 31.25, zeroshot=0.40)
    make_run(sweep, "2_method=gblm", "gblm", UNSTRUCTURED, 30.0, zeroshot=0.42)
    make_run(sweep, "3_method=gblm,seed=1", "gblm", UNSTRUCTURED, 31.0, zeroshot=0.44, seed=1)
    make_run(sweep, "4_method=gblm,sparsity=0.6", "gblm", SIXTY, 55.0, zeroshot=0.35)
    make_run(sweep, "5_method=wanda,sparsity=nm_2_4", "wanda", TWO_FOUR, 70.0, zeroshot=0.33)
    make_run(sweep, "6_method=gblm,sparsity=nm_2_4", "gblm", TWO_FOUR, 65.0, zeroshot=0.34)
    make_run(sweep, "7_method=sparsegpt", "sparsegpt", UNSTRUCTURED, None, status="failed")
    make_run(
        sweep, "8_method=sparsegpt,sparsity=0.6", "sparsegpt", SIXTY, None, status="unfinished"
    )
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_find_runs_reads_every_folder(sweep):
    runs = {r.name: r for r in find_runs(sweep)}
    assert len(runs) == 9
    assert runs["1_method=wanda"].ppl_pruned == 31.25 and runs["1_method=wanda"].finished
    assert runs["5_method=wanda,sparsity=nm_2_4"].label == "2:4"
    assert runs["7_method=sparsegpt"].status == "failed"
    unfinished = runs["8_method=sparsegpt,sparsity=0.6"]
    assert (
        unfinished.status == "unfinished"
        and unfinished.method == "sparsegpt"
        and unfinished.label == "0.6"
    )
    assert len(runs["2_method=gblm"].mask_rows) == 4
    assert runs["2_method=gblm"].per_block == [0.5, 0.51]


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory) -> Path:
    return build_report(sweep, tmp_path_factory.mktemp("report"))


def test_report_tables_plots_and_html(report):
    out = report
    md = (out / "report.md").read_text()

    # methods x sparsity: columns in order unstructured ratios, then N:M
    assert "| method | 0.5 | 0.6 | 2:4 |" in md
    assert "| dense | 20.00 | 20.00 | 20.00 |" in md
    assert "| magnitude | 95.50 |  |  |" in md
    assert "| wanda | 31.25 |  | 70.00 |" in md
    assert "| gblm | 30.50 (n=2) | 55.00 | 65.00 |" in md  # two seeds averaged
    assert "| gblm | 43.0 (n=2) | 35.0 | 34.0 |" in md  # zero-shot mean accuracy in %
    assert "| gblm | 6.5 s (n=2) | 6.0 s | 6.0 s |" in md  # wall time
    assert "| method | sparsity | austen_cloze | mean |" in md
    assert "| gblm | 0.5 | 43.0 (n=2) | 43.0 (n=2) |" in md
    assert "| method | sparsity | calibration | prune | evaluation | total |" in md
    assert "column_structure" in md
    # failed and unfinished runs are listed, not dropped
    failed = md.split("## Failed and unfinished runs")[1].split("## All runs")[0]
    assert "7_method=sparsegpt | failed" in failed and "RuntimeError: out of memory" in failed
    assert "8_method=sparsegpt,sparsity=0.6 | unfinished" in failed
    assert (
        "sparsegpt"
        not in md.split("## Failed and unfinished runs")[0].split("### Stage timings")[0]
    )

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "ppl_vs_sparsity_tiny_llama.png" in pngs
    assert "zeroshot_vs_sparsity_tiny_llama.png" in pngs
    assert "block_sparsity_tiny_llama_0.5.png" in pngs
    assert "masks_tiny_llama_2-4_model.layers.0.mlp.down_proj.png" in pngs
    for name in pngs:
        assert f"({name})" in md  # every plot is linked from the markdown
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "src='ppl_vs" not in page  # self-contained: no file references
    assert "<td>gblm</td>" in page


def test_report_structure_column_shows_gblm_channels(report):
    md = (report / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| gblm | 0.5 | 2_method=gblm")]
    wanda = [line for line in md.splitlines() if line.startswith("| wanda | 0.5 | 1_method=wanda")]
    gblm_structure = float(rows[0].split("|")[4])
    wanda_structure = float(wanda[0].split("|")[4])
    assert gblm_structure > 2 * wanda_structure


def test_cli_default_out_dir_and_missing_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_run(sweep, "0_method=wanda", "wanda", UNSTRUCTURED, 31.25, images=False)
    assert main([str(sweep)]) == 0
    assert (sweep / "report" / "report.html").exists()
    assert main([str(sweep)]) == 0  # the report folder itself is not read as a run
    assert "1 run folder(s), 1 finished" in (sweep / "report" / "report.md").read_text()
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_per_block_sparsity_table_and_schedule_targets(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep, "0_method=wanda", "wanda", UNSTRUCTURED, 31.25, images=False)
    scheduled = make_run(sweep, "1_method=gblm", "gblm", UNSTRUCTURED, 30.0, images=False)
    metrics = json.loads((scheduled / "metrics.json").read_text())
    metrics["sparsity"]["per_block_target"] = [0.4, 0.6]
    metrics["sparsity_check"]["per_block"] = [
        {"block": 0, "zero_share": 0.41},
        {"block": 1, "zero_share": 0.59},
    ]
    (scheduled / "metrics.json").write_text(json.dumps(metrics))

    runs = {r.name: r for r in find_runs(sweep)}
    assert runs["1_method=gblm"].per_block_target == [0.4, 0.6]
    assert runs["0_method=wanda"].per_block_target == []
    md = (build_report(sweep) / "report.md").read_text()
    assert "| block | wanda | gblm | gblm target |" in md  # one run per method: its name alone
    assert "| 0 | 0.5000 | 0.4100 | 0.4000 |" in md
    assert "| 1 | 0.5100 | 0.5900 | 0.6000 |" in md
    assert "(block_sparsity_tiny_llama_0.5.png)" in md

    make_run(sweep, "2_method=wanda,seed=1", "wanda", UNSTRUCTURED, 31.0, images=False)
    md = (build_report(sweep) / "report.md").read_text()
    # two runs of one method: the folder tells them apart
    assert "| block | wanda (0_method=wanda) | wanda (2_method=wanda,seed=1) | gblm |" in md


def test_methods_follow_the_registry_order(report):
    from gblm.methods.registry import method_names

    md = (report / "report.md").read_text()
    table = md.split("Perplexity (lower is better):")[1].split("![")[0]
    shown = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    shown = [m for m in shown if m not in ("method", "dense")]
    assert shown == [m for m in method_names() if m in shown]


def test_swept_axes_get_their_own_tables_and_plots(tmp_path):
    from gblm.analysis.report.axes import swept_axes

    sweep = tmp_path / "ablation"
    cal = lambda n: {"calibration": {"nsamples": n, "seqlen": 64}}  # noqa: E731
    make_run(sweep, "0", "wanda", UNSTRUCTURED, 40.0, settings=cal(2))
    make_run(sweep, "1", "wanda", UNSTRUCTURED, 30.0, settings=cal(8))
    make_run(sweep, "2", "wanda", UNSTRUCTURED, 32.0, settings=cal(8), seed=1)  # a repeat
    make_run(sweep, "3", "gblm", UNSTRUCTURED, 29.0, settings={**cal(8), "method": {"norm": "l1"}})
    make_run(sweep, "4", "gblm", UNSTRUCTURED, 28.0, settings={**cal(8), "method": {"norm": "l2"}})
    runs = find_runs(sweep)
    assert swept_axes(runs) == ["calibration.nsamples", "method.norm"]  # seed is a repeat
    out = build_report(sweep)
    text = (out / "report.md").read_text()
    assert "This sweep also varies calibration.nsamples, method.norm" in text
    assert "### Ablation: calibration.nsamples" in text and "### Ablation: method.norm" in text
    row = next(line for line in text.splitlines() if line.startswith("| wanda | 0.5 | 40.00"))
    assert "31.00 (n=2)" in row  # nsamples=8: the two seeds averaged, nsamples=2 apart
    assert "| gblm | 0.5 | 29.00 | 28.00 |" in text  # method.norm=l1, l2
    nsamples_section = text.split("### Ablation: calibration.nsamples")[1].split("###")[0]
    assert "| gblm |" not in nsamples_section  # gblm ran at one nsamples only
    assert (out / "ppl_vs_tiny_llama_calibration.nsamples.png").exists()
    assert (out / "ppl_vs_tiny_llama_method.norm.png").exists()


def test_the_report_names_no_machine_path(report, sweep):
    """A report is published as it is: it names the sweep by its folder, never by where it lies."""
    for name in ("report.md", "report.html"):
        text = (report / name).read_text()
        assert str(sweep.resolve().parent) not in text and str(report.parent) not in text, name
        assert sweep.resolve().name in text
