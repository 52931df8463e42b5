"""Full and read-only disks: an optional cache is a warning, a run folder or a saved model that
cannot be written is a clean error, and what finished is kept.

The faults are simulated (an ``OSError`` with ``ENOSPC`` or ``EROFS`` from the writer, a folder
that is a file); a ``chmod``'ed folder is tried too where the tests do not run as root (root
writes through permission bits).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import gblm.models.saving
from gblm.errors import OutputError
from gblm.run import run
from gblm.utils import cached_tensors
from tests.conftest import ROOT, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SMALL = ("model=tiny_llama", "method=wanda", "calibration.nsamples=4", "calibration.seqlen=32",
         "eval.perplexity.max_windows=2", "progress=false", "mask_images=[]")  # fmt: skip


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tensors() -> dict[str, torch.Tensor]:
    return {"x": torch.arange(6.0).reshape(2, 3)}


def test_a_full_cache_disk_is_a_warning_and_the_tensors_are_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)
    with caplog.at_level(logging.WARNING, logger="gblm"):
        got = cached_tensors(tmp_path / "entry.safetensors", _tensors, "test tensors")
    assert torch.equal(got["x"], _tensors()["x"])
    assert "cannot be written" in caplog.text and "No space left" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] in ([], ["entry.safetensors.lock"])  # no temp


def test_a_cache_folder_that_cannot_be_made_or_locked_is_a_warning(tmp_path, caplog):
    (tmp_path / "file").write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="gblm"):
        got = cached_tensors(tmp_path / "file" / "entry.safetensors", _tensors, "test tensors")
    assert torch.equal(got["x"], _tensors()["x"]) and "cannot be written" in caplog.text


@pytest.mark.skipif(AS_ROOT, reason="root writes into a read-only folder")
def test_a_read_only_cache_folder_is_read_but_not_written(tmp_path, caplog):
    entry = tmp_path / "cache" / "entry.safetensors"
    cached_tensors(entry, _tensors, "test tensors")
    entry.parent.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="gblm"):
            got = cached_tensors(entry, lambda: pytest.fail("recomputed"), "test tensors")
            fresh = cached_tensors(entry.with_name("other.safetensors"), _tensors, "test")
    finally:
        entry.parent.chmod(0o755)
    assert torch.equal(got["x"], fresh["x"]) and "cannot be written" in caplog.text


def test_a_run_whose_cache_cannot_be_written_finishes(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)
    with caplog.at_level(logging.WARNING, logger="gblm"):  # a seed no cache holds yet
        record = run(compose_config(*SMALL, f"calibration.seed={os.getpid()}"), tmp_path)
    assert record["status"] == "finished" and "calibration windows cache" in caplog.text


def test_a_full_disk_while_saving_is_a_clean_error_and_the_numbers_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(gblm.models.saving, "save_masks", _full_disk)  # after the weights
    with pytest.raises(OutputError, match=r"save_model=true: .*No space left.*save_model=false"):
        run(compose_config(*SMALL, "save_model=true"), tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed" and "traceback" not in record
    assert record["ppl"]["pruned"] > 0 and (tmp_path / "mask_stats.csv").exists()
    assert not [p.name for p in tmp_path.iterdir() if "model" in p.name]  # nothing half-saved


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gblm", *SMALL, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_a_run_folder_that_cannot_be_written_is_a_clean_refusal(tmp_path):
    (tmp_path / "file").write_text("")
    for run_dir in (tmp_path / "file" / "run", f"{tmp_path}/file/${{now:%H-%M-%S}}"):
        out = _cli(f"hydra.run.dir={run_dir}")
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and "hydra.run.dir=" in out.stderr
        assert "cannot be written" in out.stderr


@pytest.mark.skipif(AS_ROOT, reason="root writes into a read-only folder")
def test_a_read_only_run_folder_is_a_clean_refusal(tmp_path):
    tmp_path.chmod(0o555)
    try:
        out = _cli(f"hydra.run.dir={tmp_path}/run")
    finally:
        tmp_path.chmod(0o755)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "hydra.run.dir=" in out.stderr and "Permission denied" in out.stderr
