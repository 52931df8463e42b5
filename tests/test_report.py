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
from gblm.utils import content_hash

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
    model: str = "tiny_llama",
    label: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Write one run folder the way gblm.run does: config, mask stats and images, metrics.json."""
    run_dir = sweep / folder
    (run_dir / ".hydra").mkdir(parents=True)
    config = {
        "method": {"name": method},
        "model": {"name": model},
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
    sparsity_label = f"{n}:{m}" if m else f"{sparsity['ratio']:g}"
    metrics = {
        "config_hash": content_hash(config, length=16),
        "method": method,
        "method_label": label or method,
        "sparsity": {**sparsity, "label": sparsity_label},
        "model": model,
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
    metrics.update(extra or {})
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
    assert "| gblm | 30.50 ± 0.71 (n=2) | 55.00 | 65.00 |" in md  # two seeds: mean ± std
    assert "| gblm | 43.00 ± 1.41 (n=2) | 35.00 | 34.00 |" in md  # zero-shot accuracy in %
    assert "| gblm | 6.50 ± 0.71 (n=2) | 6.00 | 6.00 |" in md  # wall time (s)
    assert "| method | sparsity | austen_cloze | mean |" in md
    assert "| gblm | 0.5 | 43.00 ± 1.41 (n=2) | 43.00 ± 1.41 (n=2) |" in md
    assert "| method | sparsity | calibration (s) | prune (s) | evaluation (s) | total (s) |" in md
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
    assert "ppl_tiny_llama.png" in pngs
    assert "zeroshot_tiny_llama.png" in pngs
    assert "blocks_tiny_llama_0.5.png" in pngs
    assert "masks_tiny_llama_2-4_model.layers.0.mlp.down_proj.png" in pngs
    for name in pngs:
        assert f"({name})" in md  # every plot is linked from the markdown
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "src='ppl_" not in page  # self-contained: no file references
    assert "<td>gblm</td>" in page


def test_report_structure_column_shows_gblm_channels(report):
    md = (report / "report.md").read_text()
    structure = md.split("### Mask structure")[1].split("###")[0].splitlines()
    gblm = next(line for line in structure if line.startswith("| gblm | 0.5 |"))
    wanda = next(line for line in structure if line.startswith("| wanda | 0.5 |"))
    assert "(n=2)" in gblm  # two seeds: the mean and its std
    gblm_structure = float(gblm.split("|")[3].split("±")[0])
    wanda_structure = float(wanda.split("|")[3])
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


def test_cli_refuses_an_out_folder_it_cannot_write(tmp_path, capsys):
    # was a traceback of out.mkdir (exit status 1)
    sweep = tmp_path / "sweep"
    make_run(sweep, "0_method=wanda", "wanda", UNSTRUCTURED, 31.25, images=False)
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    assert main([str(sweep), "--out", str(tmp_path / "a_file" / "report")]) == 2
    err = capsys.readouterr().err
    assert "--out=" in err and "cannot be written" in err and "Traceback" not in err


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
    assert "| block | wanda | gblm | target of gblm |" in md  # one run per method: its name alone
    assert "| 0 | 50.00 | 41.00 | 40.00 |" in md  # shares in %
    assert "| 1 | 51.00 | 59.00 | 60.00 |" in md
    assert "(blocks_tiny_llama_0.5.png)" in md

    make_run(sweep, "2_method=wanda,seed=1", "wanda", UNSTRUCTURED, 31.0, images=False, seed=1)
    md = (build_report(sweep) / "report.md").read_text()
    # two runs of one method: the folder tells them apart; equal values share one column
    assert "| block | wanda (0_method=wanda), wanda (2_method=wanda,seed=1) | gblm |" in md


def test_methods_follow_the_registry_order(report):
    from gblm.methods.registry import method_names

    md = (report / "report.md").read_text()
    table = md.split("Perplexity (lower is better):")[1].split("([CSV]")[0]
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
    # nsamples=8: the two seeds averaged (mean ± std), nsamples=2 apart
    assert "| wanda | 0.5 | 40.00 | 31.00 ± 1.41 (n=2) |" in text
    assert "| gblm | 0.5 | 29.00 | 28.00 |" in text  # method.norm=l1, l2
    nsamples_section = text.split("### Ablation: calibration.nsamples")[1].split("###")[0]
    assert "| gblm |" not in nsamples_section  # gblm ran at one nsamples only
    # the headline table never averages over an axis: each setting is its own row
    headline = text.split("Perplexity (lower is better):")[1].split("([CSV]")[0]
    assert "| wanda, calibration.nsamples=2 | 40.00 |" in headline
    assert "| wanda, calibration.nsamples=8 | 31.00 ± 1.41 (n=2) |" in headline
    assert "| gblm, method.norm=l1 | 29.00 |" in headline
    assert "| gblm, method.norm=l2 | 28.00 |" in headline
    assert (out / "perplexity_tiny_llama_calibration.nsamples.png").exists()
    assert (out / "perplexity_tiny_llama_method.norm.png").exists()


def test_one_number_format_and_mean_with_std():
    from gblm.analysis.report.tables import fmt_number, stat

    assert [fmt_number(v) for v in (452.876, 49541.3, 999.996, 0.5)] == [
        "452.88", "49,541", "1,000", "0.50"
    ]  # fmt: skip
    assert str(stat([30.0, 31.0])) == "30.50 ± 0.71 (n=2)"  # the sample std
    assert str(stat([1000.0, 1200.0])) == "1,100 ± 141.42 (n=2)"
    assert str(stat([0.42, None], scale=100)) == "42.00"  # one run: no spread


def test_every_table_is_exported_as_csv_and_latex(report):
    import pandas as pd

    md = (report / "report.md").read_text()
    csvs = sorted((report / "tables").glob("*.csv"))
    assert len(csvs) == md.count("([CSV](tables/") == len(list((report / "tables").glob("*.tex")))
    ppl = pd.read_csv(report / "tables" / "ppl_tiny_llama.csv").set_index("method")
    assert ppl.loc["gblm", "0.5"] == 30.5 and ppl.loc["gblm", "0.5 n"] == 2  # numbers, not text
    assert ppl.loc["gblm", "0.5 std"] == pytest.approx(0.7071, abs=1e-4)
    assert ppl.loc["dense", "2:4"] == 20.0
    latex = (report / "tables" / "ppl_tiny_llama.tex").read_text()
    assert all(rule in latex for rule in ("\\toprule", "\\midrule", "\\bottomrule"))
    assert "30.50 $\\pm$ 0.71 (n=2)" in latex


def test_no_machine_path_in_the_report(report, sweep):
    for name in ("report.md", "report.html"):
        text = (report / name).read_text()
        assert str(sweep) not in text and str(sweep.parent) not in text
    assert f"Sweep {sweep.name}:" in (report / "report.md").read_text()


def test_a_parent_folder_of_two_sweeps_counts_each_run_once(sweep, tmp_path):
    import shutil

    for copy in ("a", "b"):  # the same jobs in two sweeps under one folder
        shutil.copytree(sweep, tmp_path / "parent" / copy, ignore=shutil.ignore_patterns("report"))
    md = (build_report(tmp_path / "parent") / "report.md").read_text()
    assert "| wanda | 31.25 |  | 70.00 |" in md  # not (n=2)
    assert "| gblm | 30.50 ± 0.71 (n=2) | 55.00 | 65.00 |" in md  # the seeds only
    assert "7 run folder(s) repeat the settings of another" in md
    assert "b/2_method=gblm (= a/2_method=gblm)" in md


def test_published_numbers_stand_beside_ours(tmp_path):
    for dataset, sweep in (("wikitext2", tmp_path / "paper"), ("austen", tmp_path / "other")):
        protocol = {"eval": {"perplexity": {"dataset": dataset}}}
        kw = {"images": False, "model": "llama_7b", "settings": protocol, "dense_ppl": 5.70}
        make_run(sweep, "dense", "dense", {"ratio": 0.0, "n": 0, "m": 0}, 5.70, **kw)
        make_run(sweep, "gblm", "gblm", UNSTRUCTURED, 7.20, **kw)
        make_run(sweep, "gblm_24", "gblm", TWO_FOUR, 11.40, **kw)
        make_run(sweep, "wanda", "wanda", UNSTRUCTURED, 7.30, **kw)
    md = (build_report(tmp_path / "paper") / "report.md").read_text()
    assert "| method | 0.5 | 0.5 published | 2:4 | 2:4 published |" in md
    assert "| dense | 5.70 | 5.68 | 5.70 | 5.68 |" in md
    assert "| gblm | 7.20 | 7.15 | 11.40 | 11.33 |" in md
    assert "| wanda | 7.30 | 7.26 |  | 11.53 |" in md
    assert "Published: GBLM-Pruner paper" in md
    assert "published" not in (build_report(tmp_path / "other") / "report.md").read_text()


def _factorial(sweep: Path) -> Path:
    """Mask methods x a weight update (``reconstruct``), the way run records carry it: the update
    in the config (its options only where it has them) and in the method label (``gblm+admm``)."""
    updates = {
        "none": {"_target_": None},
        "obs": {"_target_": "gblm.reconstruct.obs.OBS", "percdamp": 0.01},
        "admm": {"_target_": "gblm.reconstruct.admm.ADMM", "percdamp": 0.1, "iterations": 20},
    }
    for i, method in enumerate(("magnitude", "wanda", "gblm", "ria")):
        for j, (update, options) in enumerate(updates.items()):
            for sparsity in (UNSTRUCTURED, TWO_FOUR):
                label = method if update == "none" else f"{method}+{update}"
                ppl = (90.0 - 10 * i - 5 * j) * (2 if sparsity["m"] else 1)
                settings = {"reconstruct": {"name": update, **options}}
                timed = {} if update == "none" else {"reconstruct_seconds": 0.5 * j}
                make_run(sweep, f"{label}_{sparsity['m']}", method, sparsity, ppl, images=False,
                         settings=settings, label=label, extra=timed)  # fmt: skip
    none = {"reconstruct": {"name": "none"}}
    make_run(sweep, "sparsegpt", "sparsegpt", UNSTRUCTURED, 40.0, images=False, settings=none)
    make_run(sweep, "dsnot", "dsnot", UNSTRUCTURED, 55.0, images=False, label="dsnot(wanda)",
             settings={**none, "method": {"initial": "wanda"}})  # fmt: skip
    return sweep


def test_a_weight_update_is_an_axis_of_its_own(tmp_path):
    from gblm.analysis.report.axes import swept_axes

    sweep = _factorial(tmp_path / "factorial")
    # its class and options follow the update's name: one axis
    assert swept_axes(find_runs(sweep)) == ["reconstruct.name"]
    out = build_report(sweep)
    md = (out / "report.md").read_text()
    headline = md.split("Perplexity (lower is better):")[1].split("([CSV]")[0]
    for row in ("| gblm | 70.00 | 140.00 |", "| gblm+obs | 65.00 | 130.00 |",
                "| gblm+admm | 60.00 | 120.00 |", "| sparsegpt | 40.00 |  |"):  # fmt: skip
        assert row in headline  # each update its own row, never averaged with another
    axis = md.split("### Ablation: reconstruct.name")[1].split("###")[0]
    # the mask methods as rows, without and with each update as columns, in registry order
    header = "| method | sparsity | reconstruct.name=none | reconstruct.name=obs | reconstruct.name=admm |"
    assert header in axis
    assert "| gblm | 0.5 | 70.00 | 65.00 | 60.00 |" in axis
    assert "| gblm | 2:4 | 140.00 | 130.00 | 120.00 |" in axis
    rows = [line.split(" | ")[0] for line in headline.splitlines() if line.startswith("| gblm")]
    assert rows == ["| gblm", "| gblm+obs", "| gblm+admm"]
    assert "sparsegpt" not in axis and "dsnot" not in axis  # ran with one update only
    assert (out / "perplexity_tiny_llama_reconstruct.name.png").exists()
    # the update's share of the prune stage, from the records, beside that stage
    timings = md.split("### Stage timings")[1].split("###")[0]
    assert "| prune (s) | of which update (s) | evaluation (s) |" in timings
    assert "| gblm+admm | 0.5 | 1.00 | 2.00 | 1.00 | 3.00 | 6.00 |" in timings
    assert "| gblm | 0.5 | 1.00 | 2.00 |  | 3.00 | 6.00 |" in timings


@pytest.fixture
def saved_figures(monkeypatch) -> dict[str, dict]:
    """What each ``savefig`` saved: the region written, legends and axes (pixels), and the
    colour, marker and fill of every labelled series of each axes."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure

    saved: dict[str, dict] = {}
    original = Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        original(fig, path, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        region = fig.bbox
        if kwargs.get("bbox_inches") == "tight":
            pad = kwargs.get("pad_inches", 0.1) * fig.dpi
            region = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans).padded(pad)
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
        styles = []
        for ax in fig.axes:
            styles.append({
                line.get_label(): (to_hex(line.get_color()), line.get_marker(), line.get_fillstyle())
                for line in ax.get_lines()
                if not line.get_label().startswith("_") and line.get_marker() not in (None, "None", "")
            })  # fmt: skip
        saved[f"{Path(path).parent.parent.name}/{Path(path).name}"] = {
            "region": region,
            "legends": [lg.get_window_extent(renderer) for lg in legends],
            "axes": [ax.get_window_extent(renderer) for ax in fig.axes],
            "styles": styles,
        }

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def _legend_problems(record: dict) -> list[str]:
    problems = []
    for box in record["legends"]:
        inside = record["region"]
        if not (box.x0 >= inside.x0 - 1 and box.x1 <= inside.x1 + 1
                and box.y0 >= inside.y0 - 1 and box.y1 <= inside.y1 + 1):  # fmt: skip
            problems.append("legend clipped by the saved figure")
        if any(box.overlaps(ax) for ax in record["axes"]):
            problems.append("legend over the axes")
    return problems


def test_figures_keep_their_legends_and_one_style_per_method(tmp_path, saved_figures):
    from gblm.analysis.plots import pyplot
    from gblm.analysis.report.plots import family

    out = build_report(_factorial(tmp_path / "factorial"))
    make_run(tmp_path / "seeds", "a", "gblm", UNSTRUCTURED, 30.0, images=False)  # error bars
    make_run(tmp_path / "seeds", "b", "gblm", UNSTRUCTURED, 31.0, images=False, seed=1)
    build_report(tmp_path / "seeds")
    for k in range(12):  # a legend taller than the axes: the figure grows
        for variant in ("", "+owl"):
            make_run(tmp_path / "many", f"{k}{variant}", "wanda", UNSTRUCTURED, 30.0 + k,
                     images=False, label=f"wanda({k}){variant}", settings={"device": {"index": k, "v": variant}})  # fmt: skip
    build_report(tmp_path / "many")
    assert "many/ppl_tiny_llama.png" in saved_figures
    shown = {"factorial/ppl_tiny_llama.png", "factorial/perplexity_tiny_llama_reconstruct.name.png"}
    assert shown <= set(saved_figures) and "seeds/ppl_tiny_llama.png" in saved_figures
    for name, record in saved_figures.items():
        assert _legend_problems(record) == [], name
    reports: dict[str, dict[str, tuple]] = {}  # report -> series -> (colour, marker, fill)
    for name, record in saved_figures.items():
        seen = reports.setdefault(name.split("/")[0], {})
        for styles in record["styles"]:
            if "/blocks_" in name:
                continue
            assert len(set(styles.values())) == len(styles), name  # no two series alike
            for series, style in styles.items():
                assert seen.setdefault(series, style) == style, series  # the same in every figure
    for seen in reports.values():
        colours = {family(s): style[0] for s, style in seen.items()}
        assert len(set(colours.values())) == len(colours)  # one colour per method
    assert reports["seeds"]["gblm"] == reports["factorial"]["gblm"]  # a registered one's in all
    seen = reports["factorial"]
    assert seen["gblm"][:2] == seen["gblm+admm"][:2] != seen["wanda"][:2]  # and its updates
    assert seen["gblm"][2] != seen["gblm+admm"][2]  # told apart by the fill
    assert (out / "ppl_tiny_llama.png").read_bytes()[:4] == b"\x89PNG"

    # the check itself: a legend pushed out of an unconstrained figure is caught
    fig, ax = pyplot().subplots()
    ax.plot([0, 1], [0, 1], "o", label="a long method name+owl")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.savefig(tmp_path / "clipped.png")
    pyplot().close(fig)
    assert "legend clipped by the saved figure" in _legend_problems(
        saved_figures[f"{tmp_path.parent.name}/clipped.png"]
    )


def test_a_diverged_repeat_is_shown_not_dropped_nor_a_crash(tmp_path):
    """A seed whose perplexity overflowed (inf) or went NaN: the report used to crash on the
    spread of [inf, 30] (statistics.stdev) and to leave a NaN out of the mean, so the cell read
    as if every repeat were fine; a NaN printed as an empty cell, like "not measured"."""
    sweep = tmp_path / "sweep"
    make_run(sweep, "0_gblm_s0", "gblm", UNSTRUCTURED, float("inf"), images=False)
    make_run(sweep, "1_gblm_s1", "gblm", UNSTRUCTURED, 30.0, seed=1, images=False)
    make_run(sweep, "2_wanda_s0", "wanda", UNSTRUCTURED, float("nan"), images=False)
    make_run(sweep, "3_wanda_s1", "wanda", UNSTRUCTURED, 31.0, seed=1, images=False)
    md = (build_report(sweep) / "report.md").read_text()
    assert "| gblm | inf (n=2) |" in md
    assert "| wanda | nan (n=2) |" in md
    assert "| 2_wanda_s0 | finished | wanda | 0.5 | tiny_llama | 20.00 | nan |" in md


def test_a_killed_run_and_a_damaged_record_are_named_as_such(tmp_path):
    """A run killed outright leaves "running" in metrics.json: the report showed it running
    (the sweep summary says incomplete, killed), though no process holds its run lock; a
    metrics.json that is JSON but no object crashed the report with a traceback."""
    from gblm.loggers.local import run_lock

    sweep = tmp_path / "sweep"
    extra = {"process": {"pid": 4242, "host": "node7"}}
    make_run(sweep, "0_killed", "gblm", UNSTRUCTURED, None, status="running", extra=extra, images=False)  # fmt: skip
    live = make_run(sweep, "1_live", "wanda", UNSTRUCTURED, None, status="running", images=False)
    make_run(sweep, "2_damaged", "gblm", SIXTY, 30.0, images=False)
    (sweep / "2_damaged" / "metrics.json").write_text("[1, 2]")
    with run_lock(live):
        runs = {r.name: r for r in find_runs(sweep)}
        out = build_report(sweep)
    assert runs["0_killed"].status == "killed"
    assert "4242" in runs["0_killed"].error and "node7" in runs["0_killed"].error
    assert runs["1_live"].status == "running"
    assert (
        runs["2_damaged"].status == "unreadable" and "not a JSON object" in runs["2_damaged"].error
    )
    assert "| 0_killed | killed | gblm |" in (out / "report.md").read_text()
