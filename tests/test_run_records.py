"""What a run leaves behind when it is stopped, relaunched, or its optional outputs fail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gblm.config import ConfigError
from gblm.loggers.local import LOCK_FILE, process_record, run_alive, run_lock, write_metrics
from gblm.run import run
from gblm.sweep_status import PLAN_FILE, summarize
from gblm.utils import atomic_write
from tests.conftest import ROOT, compose_config

SMALL = (
    "model=tiny_llama",
    "method=magnitude",
    "calibration.nsamples=4",
    "calibration.seqlen=32",
    "eval.perplexity.max_windows=2",
    "progress=false",
    "mask_images=[model.layers.0.mlp.down_proj]",
)

# The CLI, with the perplexity (dense, the first) replaced by a wait: the run is then surely mid-way
# when the test signals it (no timing involved). SIGINT gets Python's default handler even if the
# test runner was started with SIGINT ignored.
_PAUSED_CLI = """
import signal, sys, time
from pathlib import Path
import gblm.eval.perplexity

marker = Path(sys.argv[1])
sys.argv = ["gblm", *sys.argv[2:]]

def paused(*args, **kwargs):
    marker.write_text("paused")
    while True:
        time.sleep(0.05)

gblm.eval.perplexity.perplexity = paused
signal.signal(signal.SIGINT, signal.default_int_handler)
from gblm.run import main
main()
"""


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll ``condition`` (generously: the machine may be loaded); fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended early ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not reach the paused stage")
        time.sleep(0.2)


def _start_paused(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_CLI, str(marker), *SMALL, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(marker.exists, proc)
    return proc, run_dir


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("signum", "exit_code"), [(signal.SIGTERM, 128 + 15), (signal.SIGINT, 128 + 2)]
)
def test_a_signal_mid_run_records_interrupted(tmp_path, signum, exit_code):
    proc, run_dir = _start_paused(tmp_path)
    assert _metrics(run_dir)["status"] == "running" and run_alive(run_dir)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == exit_code, err[-3000:]
    metrics = _metrics(run_dir)
    assert metrics["status"] == "interrupted"
    assert metrics["error"] == f"interrupted by {signal.Signals(signum).name}"
    assert {"load model", "perplexity dense"} <= set(metrics["timings"])  # paused there
    assert "Traceback" not in err and "recorded as interrupted" in out + err
    assert not run_alive(run_dir)  # the lock went with the process


def test_a_signal_while_the_end_is_written_waits_for_the_record():
    from gblm.run import RunInterrupted, _interruptible, _on_signal, _signals_held

    done = []
    with _interruptible(), pytest.raises(RunInterrupted, match="SIGTERM"):
        with _signals_held():
            _on_signal(signal.SIGTERM, None)  # as Python calls it when the signal comes
            done.append("record written")
    assert done == ["record written"]
    with pytest.raises(KeyboardInterrupt), _signals_held():
        _on_signal(signal.SIGINT, None)


def _as_one_job_sweep(sweep: Path, run_dir: Path) -> None:
    """Make ``run_dir`` the one planned job of the sweep dir ``sweep``."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    plan = {"launch_id": "later", "jobs": [{"num": 0, "overrides": ["a=1"], "dir": run_dir.name}]}
    (sweep / PLAN_FILE).write_text(json.dumps(plan))


def test_a_live_run_is_refused_and_a_killed_one_is_incomplete_and_redone(tmp_path):
    proc, run_dir = _start_paused(tmp_path)
    _as_one_job_sweep(tmp_path, run_dir)
    live = _metrics(run_dir)
    assert run_alive(run_dir) and summarize(tmp_path)["jobs"][0]["status"] == "running"
    with pytest.raises(ConfigError, match=f"is in use: process {proc.pid} "):
        run(compose_config(*SMALL), run_dir=run_dir)  # another process, same dir
    assert _metrics(run_dir) == live  # the live run's record is its own
    proc.kill()  # SIGKILL: no handler runs, metrics.json stays "running"; the kernel frees the lock
    proc.communicate(timeout=600)
    killed = _metrics(run_dir)
    assert killed["status"] == "running" and killed["process"]["pid"] == proc.pid
    assert not run_alive(run_dir)
    job = summarize(tmp_path)["jobs"][0]
    assert job["status"] == "incomplete" and f"process {proc.pid}" in job["error"]
    redone = run(compose_config(*SMALL), run_dir=run_dir)  # the relaunch
    assert redone["status"] == _metrics(run_dir)["status"] == "finished"
    assert summarize(tmp_path)["jobs"][0]["status"] == "finished"


def test_every_record_of_a_run_is_written_under_its_lock(tmp_path, monkeypatch):
    written = []

    def spy(run_dir, metrics):
        written.append((metrics["status"], run_alive(run_dir)))
        return write_metrics(run_dir, metrics)

    monkeypatch.setattr("gblm.run.write_metrics", spy)
    run(compose_config(*SMALL), run_dir=tmp_path)
    assert written[0] == ("running", True) and written[-1] == ("finished", True)
    assert all(alive for _, alive in written) and not run_alive(tmp_path)


def _record(run_dir: Path, status: str) -> None:
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    record = {"status": status, "process": process_record()}
    (run_dir / "metrics.json").write_text(json.dumps(record))


def test_the_run_lock_decides_running_or_incomplete_and_refuses_a_second_run(tmp_path):
    for name in ("live", "killed", "unlocked"):
        _record(tmp_path / name, "running")
    with run_lock(tmp_path / "killed"):  # held, then freed as a dead process's lock is
        pass
    assert (tmp_path / "killed" / LOCK_FILE).exists() and not run_alive(tmp_path / "killed")
    assert not run_alive(tmp_path / "unlocked") and not run_alive(tmp_path / "nowhere")
    assert not (tmp_path / "unlocked" / LOCK_FILE).exists()  # asking creates nothing
    names = ["live", "killed", "unlocked"]
    plan = {
        "launch_id": "x",
        "jobs": [{"num": i, "overrides": [], "dir": n} for i, n in enumerate(names)],
    }
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan))
    with run_lock(tmp_path / "live"):
        assert run_alive(tmp_path / "live")
        summary = summarize(tmp_path)
        with pytest.raises(ConfigError, match=f"is in use: process {os.getpid()} "):
            run(compose_config(*SMALL), run_dir=tmp_path / "live")
        with pytest.raises(ConfigError, match="is in use"):  # the lock itself refuses too
            with run_lock(tmp_path / "live"):
                pytest.fail("a held run lock was taken twice")
        _record(tmp_path / "live", "failed")  # a record that does not say "running" yet
        with pytest.raises(ConfigError, match="is in use"):
            run(compose_config(*SMALL), run_dir=tmp_path / "live")
        assert _metrics(tmp_path / "live")["status"] == "failed"  # not written over
    assert not run_alive(tmp_path / "live")
    statuses = {job["dir"]: job["status"] for job in summary["jobs"]}
    assert statuses == {"live": "running", "killed": "incomplete", "unlocked": "incomplete"}
    assert summary["counts"]["running"] == 1 and summary["counts"]["incomplete"] == 2


# A changed config in a finished run dir ---------------------------------------------------------
def test_a_changed_config_does_not_replace_a_finished_run(tmp_path):
    first = run(compose_config(*SMALL), run_dir=tmp_path)
    before = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match=r"changed: sparsity\.ratio\).*overwrite=true"):
        run(compose_config(*SMALL, "sparsity.ratio=0.3"), run_dir=tmp_path)
    assert (tmp_path / "metrics.json").read_bytes() == before  # kept as it was
    again = run(compose_config(*SMALL, "overwrite=true"), run_dir=tmp_path)
    assert again["timings"] == first["timings"]  # same config: skipped, overwrite or not
    replaced = run(compose_config(*SMALL, "sparsity.ratio=0.3", "overwrite=true"), run_dir=tmp_path)
    assert replaced["sparsity"]["ratio"] == _metrics(tmp_path)["sparsity"]["ratio"] == 0.3


def test_a_run_stopped_before_its_first_record_never_inherits_the_finished_one(
    tmp_path, monkeypatch
):
    """overwrite=true of another config, stopped (killed, a full disk) before its first
    metrics.json: the relaunch must not take the kept record of the old config for its own."""
    import gblm.run

    run(compose_config(*SMALL), run_dir=tmp_path)  # sparsity.ratio=0.5, finished

    def full_disk(run_dir, metrics):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(gblm.run, "write_metrics", full_disk)
        with pytest.raises(OSError):
            run(compose_config(*SMALL, "sparsity.ratio=0.3", "overwrite=true"), run_dir=tmp_path)
    try:
        again = run(compose_config(*SMALL, "sparsity.ratio=0.3"), run_dir=tmp_path)
    except ConfigError:  # the finished run of the other config, kept and refused: fine
        return
    assert again["sparsity"]["ratio"] == 0.3  # never the 0.5 run's record


def test_a_replaced_run_leaves_none_of_the_old_runs_mask_files(tmp_path):
    """overwrite=true of a pruned run by the dense baseline: the report must not show the old
    run's mask statistics and pictures as the dense run's."""
    from gblm.analysis.report.runs import read_run

    run(compose_config(*SMALL), run_dir=tmp_path / "run")  # magnitude: masks, their stats, a PNG
    assert (tmp_path / "run" / "mask_stats.csv").exists()
    run(compose_config(*SMALL, "method=dense", "overwrite=true"), run_dir=tmp_path / "run")
    shown = read_run(tmp_path / "run", tmp_path)
    assert shown.status == "finished" and shown.base == "dense"
    assert shown.mask_rows == [] and shown.mask_images == {}
    assert not (tmp_path / "run" / "mask_stats_blocks.json").exists()


def test_the_cli_refuses_a_changed_config_with_exit_status_2(tmp_path):
    run(compose_config(*SMALL), run_dir=tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "gblm", *SMALL, "sparsity.ratio=0.3", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "overwrite=true" in out.stderr + out.stdout and "Traceback" not in out.stderr
    assert _metrics(tmp_path)["sparsity"]["ratio"] == 0.5


# Optional outputs ------------------------------------------------------------------------------
def test_a_failing_mask_picture_is_a_warning(tmp_path, monkeypatch):
    import gblm.analysis.plots as plots

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "_save_mask_image", full_disk)
    metrics = run(compose_config(*SMALL), run_dir=tmp_path)
    on_disk = _metrics(tmp_path)
    assert on_disk["status"] == metrics["status"] == "finished"
    assert on_disk["ppl"]["pruned"] > 1
    assert "No space left on device" in on_disk["warnings"][0]


def test_a_failing_picture_write_leaves_no_half_file(tmp_path, monkeypatch):
    import matplotlib.figure
    import torch

    import gblm.analysis.plots as plots

    def full_disk(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(OSError):
        plots.save_mask_images({"a": torch.zeros(4, 4, dtype=torch.bool)}, ["a"], tmp_path)
    assert list(tmp_path.iterdir()) == []


class _BrokenLogger:
    def __getattr__(self, name):
        def broken(*args, **kwargs):
            raise RuntimeError(f"remote {name} is down")

        return broken


@pytest.mark.parametrize("broken", ["calls", "setup"])
def test_a_failing_remote_logger_is_a_warning(tmp_path, monkeypatch, broken, caplog):
    import gblm.record

    def make(s, run_dir, resume_id=None):
        if broken == "setup":
            raise RuntimeError("remote setup is down")
        return _BrokenLogger()

    monkeypatch.setattr(gblm.record, "remote_logger", make)
    metrics = run(compose_config(*SMALL), run_dir=tmp_path)
    assert metrics["status"] == _metrics(tmp_path)["status"] == "finished"
    assert _metrics(tmp_path)["ppl"]["pruned"] > 1
    assert f"remote {broken if broken == 'setup' else 'start'} is down" in caplog.text
    warnings = _metrics(tmp_path)["warnings"]  # the record says what the dashboard lacks
    assert any(f"remote {'setup' if broken == 'setup' else 'log_artifact'} is down" in w for w in warnings)  # fmt: skip


class _DiskCheckingLogger:
    """A remote logger that notes, at each call, whether what it is sent is already on disk."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.seen = run_dir, []

    def start(self, config):
        on_disk = _metrics(self.run_dir).get("provenance")
        self.seen.append(("start", on_disk == config["provenance"]))

    def log_metrics(self, metrics):
        on_disk = _metrics(self.run_dir)
        self.seen.append(("log_metrics", all(on_disk.get(k) and all(
            on_disk[k].get(n) == v for n, v in metrics[k].items()) for k in ("ppl",) if k in metrics)))  # fmt: skip

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_the_remote_logger_is_sent_only_what_the_record_on_disk_holds(tmp_path, monkeypatch):
    import gblm.record

    remote = _DiskCheckingLogger(tmp_path)
    monkeypatch.setattr(gblm.record, "remote_logger", lambda conf, run_dir, resume_id: remote)
    run(compose_config(*SMALL), run_dir=tmp_path)
    assert remote.seen and ("start", True) in remote.seen
    assert all(ok for _, ok in remote.seen), remote.seen


class _InterruptedUpload:
    """A remote logger whose record upload is cut by SIGTERM (the handler raises mid-call)."""

    def __init__(self) -> None:
        self.finished_with: list[int] = []

    def log_artifact(self, *args, **kwargs):
        from gblm.run import RunInterrupted

        raise RunInterrupted(signal.SIGTERM)

    def finish(self, exit_code: int = 0) -> None:
        self.finished_with.append(exit_code)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_a_signal_during_the_final_upload_keeps_the_record_and_closes_the_logger(
    tmp_path, monkeypatch
):
    import gblm.record
    from gblm.run import RunInterrupted

    remote = _InterruptedUpload()
    monkeypatch.setattr(gblm.record, "remote_logger", lambda conf, run_dir, resume_id: remote)
    with pytest.raises(RunInterrupted):
        run(compose_config(*SMALL), run_dir=tmp_path)
    assert _metrics(tmp_path)["status"] == "finished"  # every number was on disk before
    assert remote.finished_with == [0]


# File modes ------------------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_result_files_respect_the_umask(tmp_path, umask_022):
    run(compose_config(*SMALL), run_dir=tmp_path)
    for name in (
        "metrics.json",
        "config_resolved.json",
        "mask_stats.csv",
        "mask_stats_blocks.json",
    ):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    (picture,) = (tmp_path / "masks").glob("*.png")
    assert picture.stat().st_mode & 0o777 == 0o644


def test_atomic_write_gives_the_umask_mode_even_to_a_replaced_temp_file(tmp_path, umask_022):
    def replace_with_private_file(tmp: Path) -> None:
        private = tmp.with_name("private")
        private.write_bytes(b"data")
        private.chmod(0o600)
        os.replace(private, tmp)

    atomic_write(tmp_path / "out.bin", replace_with_private_file)
    atomic_write(tmp_path / "plain.bin", b"data")
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "plain.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("content", ["", '{"status": "finis', "[1, 2]", "\xff\xfe"])
def test_an_unreadable_record_is_a_clean_refusal(tmp_path, content):
    """An empty, truncated or foreign metrics.json is refused naming the file, and kept;
    overwrite=true runs there again."""
    cfg = compose_config("model=tiny_llama", "method=magnitude", "eval.perplexity.enabled=false",
                         "progress=false", "mask_images=[]")  # fmt: skip
    record = tmp_path / "metrics.json"
    record.write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError, match="overwrite=true") as err:
        run(cfg, run_dir=tmp_path)
    assert str(record) in str(err.value)
    assert record.read_bytes() == content.encode("latin-1")  # kept for the user to look at
    again = run(compose_config("model=tiny_llama", "method=magnitude", "overwrite=true",
                               "eval.perplexity.enabled=false", "progress=false",
                               "mask_images=[]"), run_dir=tmp_path)  # fmt: skip
    assert again["status"] == "finished" and json.loads(record.read_text())["status"] == "finished"


def test_the_record_says_what_produced_it(tmp_path):
    """Provenance: the code's version and commit, the libraries, the device and the threads."""
    import torch

    cfg = compose_config("model=tiny_llama", "method=magnitude", "eval.perplexity.enabled=false",
                         "progress=false", "mask_images=[]")  # fmt: skip
    record = run(cfg, run_dir=tmp_path)["provenance"]
    assert record["torch"] == torch.__version__ and record["threads"] == torch.get_num_threads()
    assert all(record[name] for name in ("gblm", "transformers", "lm_eval", "accelerate", "device"))
    assert record["git_commit"] is None or len(record["git_commit"]) == 40
    assert json.loads((tmp_path / "metrics.json").read_text())["provenance"] == record
