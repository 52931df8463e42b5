"""A battery of bad inputs: each refused before the model loads, as one paragraph, exit status 2.

Each case runs the command line in-process (``gblm.run.cli`` with ``sys.argv`` set, the way
``python -m gblm`` runs it) with the model loader replaced by one that records the call; a few run
as real subprocesses to prove the exit status and that the log never reaches ``load model``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
BASE = (
    "model=tiny_llama",
    "calibration.nsamples=4",
    "calibration.seqlen=64",
    "eval.perplexity.max_windows=4",
    "progress=false",
    "mask_images=[]",
)

# (case id, overrides ({tmp} is the test's folder), text the message must hold, run dir marked)
# "composed": refused before Hydra starts the run (no run dir); "run": the run dir is marked failed.
CASES = [
    ("seed_abc", ["seed=abc"], ["seed=abc", "integer"], "composed"),
    ("calibration_seed_abc", ["calibration.seed=abc"], ["calibration.seed", "integer"], "composed"),
    ("ratio_null", ["sparsity.ratio=null"], ["sparsity.ratio", "null"], "composed"),
    ("nsamples_abc", ["calibration.nsamples=abc"], ["calibration.nsamples=abc"], "composed"),
    ("save_model_maybe", ["save_model=maybe"], ["save_model", "true or false"], "composed"),
    (
        "ppl_enabled_perhaps",
        ["eval.perplexity.enabled=perhaps"],
        ["eval.perplexity.enabled"],
        "composed",
    ),
    ("method_key_typo", ["method.nrom=l2"], ["method.nrom", "norm"], "composed"),
    (
        "calibration_key_typo",
        ["calibration.nsampels=4"],
        ["calibration.nsampels", "nsamples"],
        "composed",
    ),
    ("top_key_typo", ["sed=1"], ["sed", "seed"], "composed"),
    ("method_option", ["method=pruneall"], ["method=pruneall", "gblm", "wanda"], "composed"),
    ("calibration_option", ["calibration=tran"], ["calibration=tran", "austen"], "composed"),
    ("paths_unparsable", ["calibration.paths=[a"], ["calibration.paths"], "composed"),
    # the schema's type errors in OmegaConf's words, twice, naming no allowed value before
    (
        "paths_not_a_list",
        ["calibration.paths=a.txt"],
        ["calibration.paths=a.txt", "a list"],
        "composed",
    ),
    (
        "batch_size_fraction",
        ["batch_size=1.5"],
        ["batch_size=1.5", "an integer >= 1 or auto"],
        "run",
    ),
    (
        "zeroshot_batch_size_fraction",
        ["eval.zeroshot.batch_size=0.5"],
        ["eval.zeroshot.batch_size=0.5", "an integer >= 1 or auto"],
        "run",
    ),
    (
        "zeroshot_limit_word",
        ["eval.zeroshot.limit=all"],
        ["eval.zeroshot.limit='all'", "null (every item)"],
        "run",
    ),
    ("plus_method_key_typo", ["+method.nrom=l2"], ["method.nrom", "norm, scale"], "run"),
    (
        "plus_calibration_key_typo",
        ["+calibration.nsampels=4"],
        ["calibration.nsampels", "nsamples, seqlen"],
        "run",
    ),
    ("ratio_too_big", ["sparsity.ratio=1.5"], ["sparsity.ratio=1.5", "[0, 1)"], "run"),
    ("ratio_negative", ["sparsity.ratio=-0.1"], ["sparsity.ratio", "[0, 1)"], "run"),
    ("nm_ratio", ["sparsity=nm_2_4", "sparsity.ratio=0.7"], ["sparsity.ratio", "N/M"], "run"),
    (
        "per_block",
        ["sparsity=per_block", "sparsity.per_block=[0.5,1.0]"],
        ["sparsity.per_block[1]"],
        "run",
    ),
    ("per_block_uniform", ["sparsity.per_block=[0.5,0.5]"], ["sparsity=per_block"], "run"),
    ("nsamples_zero", ["calibration.nsamples=0"], ["calibration.nsamples=0", ">= 1"], "run"),
    ("seqlen_one", ["calibration.seqlen=1"], ["calibration.seqlen=1", ">= 2"], "run"),
    ("batch_size_zero", ["batch_size=0"], ["batch_size=0"], "run"),
    ("source", ["calibration.source=imagenet"], ["calibration.source", "austen"], "run"),
    ("sampling", ["calibration.sampling=random"], ["calibration.sampling", "stream"], "run"),
    ("ppl_dataset", ["eval.perplexity.dataset=ptb"], ["eval.perplexity.dataset", "austen"], "run"),
    ("device_name", ["device=tpu"], ["device='tpu'", "cuda:N"], "run"),
    # torch's own words naming no key before (and a sweep's preflight let them through)
    ("device_index", ["device=cuda:abc"], ["device='cuda:abc'", "cuda:N"], "run"),
    ("device_prefix", ["device=cudax"], ["device='cudax'", "cuda:N"], "run"),
    # a traceback of torch.manual_seed before
    ("seed_overflow", ["seed=99999999999999999999999"], ["seed=9999", "2**64"], "run"),
    # options of a plug-in that takes none were dropped without a word
    (
        "reconstruct_none_option",
        ["+reconstruct.iters=5"],
        ["reconstruct.iters=5", "reconstruct=none takes no option"],
        "run",
    ),
    (
        "method_target_not_importable",
        ["method._target_=nowhere.Pruner"],
        ["method._target_='nowhere.Pruner'", "cannot be imported"],
        "run",
    ),
    (
        "dense_option",
        ["method=dense", "+method.norm=l2"],
        ["method.norm='l2'", "method=dense takes no option"],
        "run",
    ),
    ("dtype", ["dtype=float8"], ["model.dtype", "bfloat16"], "run"),
    ("method_norm", ["method=gblm", "method.norm=l3"], ["method.norm", "l1, l2"], "run"),
    ("calibration_split", ["calibration.split=tran"], ["calibration.split='tran'", "train"], "run"),
    ("ppl_split", ["eval.perplexity.split=tst"], ["eval.perplexity.split='tst'", "test"], "run"),
    (
        "nsamples_huge",
        ["calibration.nsamples=1000000000"],
        ["calibration.nsamples=1000000000"],
        "run",
    ),
    (
        "seqlen_past_context",
        ["calibration.seqlen=4096", "calibration.nsamples=1"],
        ["calibration.seqlen=4096", "max_position_embeddings=2048"],
        "run",
    ),
    (
        "ppl_seqlen_past_context",
        ["eval.perplexity.seqlen=4096"],
        ["eval.perplexity.seqlen=4096", "max_position_embeddings"],
        "run",
    ),
    (
        "opt_past_context",
        ["model=tiny_opt", "calibration.seqlen=4096", "calibration.nsamples=1"],
        ["calibration.seqlen=4096"],
        "run",
    ),
    (
        "calibration_empty_file",
        ["calibration=local", "calibration.paths=[{tmp}/empty.txt]"],
        ["calibration.paths", "empty"],
        "run",
    ),
    (
        "calibration_short_file",
        ["calibration=local", "calibration.paths=[{tmp}/short.txt]"],
        ["calibration.paths", "calibration.nsamples=4 x calibration.seqlen=64"],
        "run",
    ),
    (
        "calibration_missing_file",
        ["calibration=local", "calibration.paths=[{tmp}/missing.txt]"],
        ["calibration.paths", "does not exist"],
        "run",
    ),
    (
        "calibration_folder",
        ["calibration=local", "calibration.paths=[{tmp}]"],
        ["calibration.paths", "is not a file"],
        "run",
    ),
    (
        "calibration_kind",
        ["calibration=local", "calibration.paths=[{tmp}/short.csv]"],
        ["calibration.paths", ".parquet"],
        "run",
    ),
    ("calibration_no_paths", ["calibration=local"], ["calibration.paths"], "run"),
    (
        "eval_empty_file",
        ["eval.perplexity.dataset=local", "eval.perplexity.paths=[{tmp}/empty.txt]"],
        ["eval.perplexity.paths", "empty"],
        "run",
    ),
    (
        "eval_missing_file",
        ["eval.perplexity.dataset=local", "eval.perplexity.paths=[{tmp}/missing.txt]"],
        ["eval.perplexity.paths", "does not exist"],
        "run",
    ),
    (
        "model_missing",
        ["model=hf", "model.name_or_path={tmp}/no_model"],
        ["model.name_or_path", "no_model"],
        "run",
    ),
    (
        "model_corrupt_config",
        ["model=hf", "model.name_or_path={tmp}/corrupt_model"],
        ["model.name_or_path", "config.json"],
        "run",
    ),
    ("model_no_path", ["model=hf"], ["model.name_or_path"], "run"),
    # A plug-in's options, each checked against its declaration; options that cannot apply.
    ("ria_a_nan", ["method=ria", "method.a=nan"], ["method.a=nan", "finite number >= 0"], "run"),
    ("ria_a_abc", ["method=ria", "method.a=abc"], ["method.a='abc'", "finite number"], "run"),
    (
        "ria_reallocation_maybe",
        ["method=ria", "method.reallocation=maybe"],
        ["method.reallocation='maybe'", "true, false"],
        "run",
    ),
    (
        "dsnot_threshold",
        ["method=dsnot", "method.threshold=-1"],
        ["method.threshold=-1", ">= 0"],
        "run",
    ),
    (
        "dsnot_max_cycle_abc",
        ["method=dsnot", "method.max_cycle=abc"],
        ["method.max_cycle='abc'", "an integer >= 0"],
        "run",
    ),
    ("owl_lmbda_nan", ["sparsity=owl", "sparsity.lmbda=nan"], ["sparsity.lmbda=nan"], "run"),
    (
        "ria_reallocation_unstructured",
        ["method=ria", "method.reallocation=true"],
        ["method.reallocation=true", "nm_2_4"],
        "run",
    ),
    ("save_dtype_unsaved", ["save_dtype=float16"], ["save_dtype='float16'", "save_model"], "run"),
    (
        "mask_images_unknown",
        ["mask_images=[model.layers.0.self_attn.nope]"],
        ["mask_images: 'model.layers.0.self_attn.nope'", "model.layers.1.mlp.down_proj"],
        "run",
    ),
    # Checkable before the load, from the config and the model's config (no weights)
    (
        "owl_lambda_past_one",
        ["sparsity=owl", "sparsity.ratio=0.7", "sparsity.lmbda=0.35"],
        ["sparsity.lmbda=0.35", "[0.35, 1.05]", "sparsity.lmbda < 0.3"],
        "run",
    ),
    (
        "owl_lambda_below_zero_unclamped",
        ["method=magnitude", "sparsity=owl", "sparsity.ratio=0.1", "sparsity.lmbda=0.2"],
        ["sparsity.lmbda=0.2", "sparsity.clamp=true"],
        "run",
    ),
    (
        "owl_lambda_nm",
        ["sparsity=owl", "sparsity.n=2", "sparsity.m=4", "sparsity.lmbda=4"],
        ["sparsity.lmbda=4", "2:4"],
        "run",
    ),
    (
        "per_block_length",
        ["sparsity=per_block", "sparsity.per_block=[0.5,0.5,0.5]"],
        ["sparsity.per_block has 3 ratios", "2 decoder blocks"],
        "run",
    ),
    (
        "zeroshot_task_typo",
        ["eval.zeroshot.enabled=true", "eval.zeroshot.tasks=[arc_easyy]"],
        ["eval.zeroshot.tasks", "arc_easyy", "arc_easy"],
        "run",
    ),
    (
        "zeroshot_limit_negative",
        ["eval.zeroshot.enabled=true", "eval.zeroshot.limit=-1"],
        ["eval.zeroshot.limit=-1", "null"],
        "run",
    ),
    # lm-eval reads 1.5 as 1 item: not one of the allowed values the refusal names
    (
        "zeroshot_limit_fractional_count",
        ["eval.zeroshot.enabled=true", "eval.zeroshot.limit=1.5"],
        ["eval.zeroshot.limit=1.5", "an integer >= 1"],
        "run",
    ),
    # was blamed on eval.zeroshot.tasks (an unknown austen_cloze)
    (
        "zeroshot_include_path_missing",
        ["eval.zeroshot.enabled=true", "eval.zeroshot.include_path={tmp}/no_tasks"],
        ["eval.zeroshot.include_path=", "no_tasks", "is not a folder"],
        "run",
    ),
    (
        "offload_folder_unwritable",
        ["model.device_map=cpu", "model.offload_folder={tmp}/empty.txt/offload"],
        ["model.offload_folder=", "cannot be written"],
        "run",
    ),
    ("tiny_arch", ["model.tiny.arch=gpt9"], ["model.tiny.arch='gpt9'", "llama"], "run"),
    (
        "tiny_heads",
        ["model.tiny.hidden_size=60", "model.tiny.num_heads=8"],
        ["model.tiny.hidden_size=60", "model.tiny.num_heads=8"],
        "run",
    ),
    ("tiny_key", ["+model.tiny.layers=3"], ["model.tiny.layers", "num_layers"], "run"),
    ("reconstruct_option", ["reconstruct=sgd"], ["reconstruct=sgd", "obs", "admm"], "composed"),
    (
        "reconstruct_after_sparsegpt",
        ["method=sparsegpt", "reconstruct=obs"],
        ["method=sparsegpt", "reconstruct=obs", "reconstruct=none"],
        "run",
    ),
    (
        "reconstruct_iters",
        ["reconstruct=admm", "reconstruct.iters=-2"],
        ["reconstruct.iters"],
        "run",
    ),
]
if not torch.cuda.is_available():
    CASES.append(("cuda_missing", ["device=cuda"], ["device='cuda'", "CUDA"], "run"))


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Too short to calibrate on.")
    (tmp_path / "short.csv").write_text("text\nhello\n")
    corrupt = tmp_path / "corrupt_model"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return tmp_path


@pytest.fixture
def no_model_load(monkeypatch):
    """Replace the model loader: every call is recorded (and fails the case)."""
    import gblm.models.loading as loading

    calls = []

    def must_not_load(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", must_not_load)
    return calls


def _cli(argv: list[str], monkeypatch) -> int:
    """The command line in this process; the root logger and torch's threads that Hydra's app
    sets are put back as they were (they would outlive the test)."""
    from gblm.cli import cli

    monkeypatch.setattr(sys, "argv", ["gblm", *argv])
    root, threads = logging.getLogger(), torch.get_num_threads()
    handlers, level = list(root.handlers), root.level
    GlobalHydra.instance().clear()
    try:
        cli()
    except SystemExit as done:
        return done.code
    finally:
        GlobalHydra.instance().clear()
        for handler in set(root.handlers) - set(handlers):
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return 0


@pytest.mark.parametrize(
    ("overrides", "needles", "marked"),
    [pytest.param(o, n, m, id=i) for i, o, n, m in CASES],
)
def test_bad_input_is_refused_before_the_model_loads(
    overrides, needles, marked, inputs, no_model_load, monkeypatch, capsys
):
    run_dir = inputs / "run"
    argv = [*BASE, *(o.format(tmp=inputs) for o in overrides), f"hydra.run.dir={run_dir}"]
    status = _cli(argv, monkeypatch)
    out = capsys.readouterr()
    assert status == 2, out.err[-2000:]
    assert "Traceback" not in out.err and "Traceback" not in out.out
    message = [line for line in out.err.splitlines() if line.startswith("gblm: ")]
    assert len(message) == 1, out.err[-2000:]  # one paragraph
    assert message[0].count("Invalid value") < 2 and "type hint" not in message[0], message[0]
    assert not re.search(r"([\w.]+: )\1", message[0]), message[0]  # the key named once
    for needle in needles:
        assert needle.format(tmp=inputs) in message[0], message[0]
    assert no_model_load == []
    if marked == "run":
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "failed" and "traceback" not in metrics
        assert needles[0].format(tmp=inputs) in metrics["error"]


def test_a_case_leaves_no_logging_or_threads_behind(inputs, no_model_load, monkeypatch, capsys):
    """Hydra's app in this process sets the root logger (a handler on this test's captured stream,
    closed after it; a file in its tmp_path) and torch's threads (the CPUs idle now): left set,
    each later test's log record printed a logging error's traceback into that test's stderr."""
    from gblm import devices

    root, threads = logging.getLogger(), torch.get_num_threads()
    handlers, level = list(root.handlers), root.level
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "idle_cpus", lambda interval=0.2: 1.0 if threads > 1 else 2.0)
    argv = [*BASE, "sparsity.ratio=1.5", f"hydra.run.dir={inputs / 'run'}"]
    assert _cli(argv, monkeypatch) == 2  # a "run" case: refused by the run, its log set up
    assert (root.handlers, root.level) == (handlers, level)
    assert torch.get_num_threads() == threads


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["seed=abc"], "seed=abc"),
        (["sparsity.ratio=1.5"], "sparsity.ratio=1.5"),
        (["calibration.nsamples=1000000000"], "calibration.nsamples=1000000000"),
        (["method=ria", "method.a=nan"], "method.a=nan"),
    ],
)
def test_the_real_command_exits_2_before_loading_the_model(tmp_path, overrides, needle):
    out = subprocess.run(
        [sys.executable, "-m", "gblm", *BASE, *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-2000:]
    assert "Traceback" not in text and needle in out.stderr
    assert "stage load model" not in text  # the run's log never reached the model


def test_the_sweep_preflight_refuses_too_many_samples():
    from gblm.sweep import SweepPreflightError, preflight
    from tests.test_sweeps import multirun_config

    with (
        multirun_config(
            "experiment=tiny_sweep", "method=wanda", "calibration.nsamples=4,1000000000"
        ) as cfg,
        pytest.raises(SweepPreflightError) as err,
    ):
        preflight(cfg)
    assert "calibration.nsamples=1000000000" in str(err.value)
    assert "no job was started" in str(err.value)
