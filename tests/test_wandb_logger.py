"""The W&B logger: an offline run is written and readable back; failures never reach the run."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from gblm.loggers.base import Logger, NullLogger
from gblm.loggers.wandb import WandbLogger, api_key_configured, flatten, resolve_mode

pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def _wandb_home(tmp_path, monkeypatch):
    """W&B's own folders (cache, config, data, artifact staging) in the test's tmp_path: by
    default they are under the user's home, which a CI runner may not have writable."""
    for key in ("CACHE", "CONFIG", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{key}_DIR", str(tmp_path / "home" / key.lower()))


def read_wandb_records(path: Path) -> list:
    """Decode a ``run-*.wandb`` file: a 7-byte W&B header, then LevelDB-log records.

    The log is cut into 32 KiB blocks; each record has a 7-byte header (crc32, little-endian
    length, type: 1 full, 2 first, 3 middle, 4 last) and a block tail under 7 bytes is padding.
    Each assembled payload is a serialized ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, payload, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def offline_run_contents(root: Path) -> tuple[dict, dict, list[str]]:
    """(config, last logged value per key, file names under files/) of the one offline run."""
    import json

    (run_dir,) = sorted((root / "wandb").glob("offline-run-*"))
    (log_file,) = run_dir.glob("run-*.wandb")
    config, history = {}, {}
    records = read_wandb_records(log_file)
    kinds = [record.WhichOneof("record_type") for record in records]
    assert kinds[-1:] == ["exit"], f"the offline run's log is incomplete: {kinds}"
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update(
                {item.key: json.loads(item.value_json) for item in record.run.config.update}
            )
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)  # objects arrive one leaf a line
                history[key] = json.loads(item.value_json)
    files = [p.relative_to(run_dir / "files").as_posix() for p in (run_dir / "files").rglob("*")]
    return config, history, files


def test_offline_run_is_written_and_readable(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(
        project="gblm-test",
        group="sweep",
        tags=("gblm", "0.5"),
        name="r1",
        mode="offline",
        dir=tmp_path,
    )
    assert isinstance(logger, Logger)
    logger.start({"method": {"name": "gblm"}, "sparsity": {"ratio": 0.5}})
    logger.log_metrics(
        {
            "ppl": {"dense": 20.5, "pruned": 31.25},
            "timings": {"total": 3.0},
            "sparsity_check": {"per_block": [0.5, 0.5]},
            "status": "finished",
        }
    )
    logger.log_table("mask_stats", [{"name": "model.layers.0.mlp.up_proj", "sparsity": 0.5}])
    image = tmp_path / "m.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(image, [[0.0, 1.0], [1.0, 0.0]])
    logger.log_images("masks", [image])
    logger.finish()
    assert logger.failures == []
    logger.finish()  # twice is harmless
    # The race: the SDK sends the init config inside the Run record, and the wandb-core service
    # writes the transaction log through a buffer that it flushes when it closes the run's stream.
    # run.finish() only *publishes* "inform_finish" and returns; the close happens later, so under
    # load the file read here could still hold the header alone. teardown() waits for the service
    # process to exit, after every stream is closed and its file complete.
    import wandb

    wandb.teardown()
    config, history, files = offline_run_contents(tmp_path)
    assert config["method"] == {"name": "gblm"} and config["sparsity"] == {"ratio": 0.5}
    assert history["ppl/pruned"] == 31.25 and history["ppl/dense"] == 20.5
    assert history["status"] == "finished"
    assert "sparsity_check/per_block" not in history  # lists are not metrics
    assert history["mask_stats/_type"] == "table-file"  # nested values come key path by path
    assert history["masks/_type"] == "images/separated" and history["masks/captions"] == ["m"]
    assert any(f.startswith("media/table/mask_stats") for f in files)
    assert any(f.startswith("media/images/masks") for f in files)


def test_failing_init_never_raises(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("no server")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.setattr("gblm.loggers.wandb.server_reachable", lambda *args, **kwargs: True)
    logger = WandbLogger(project="p", mode="online", dir=tmp_path)
    logger.start({"a": 1})  # online fails, the offline retry fails too
    assert logger.run is None and len(logger.failures) == 2
    assert "no server" in caplog.text
    logger.log_metrics({"ppl": 1.0})
    logger.log_table("t", [{"a": 1}])
    logger.log_images("i", [tmp_path / "missing.png"])
    logger.finish(exit_code=1)


def test_an_unreachable_server_falls_back_to_offline_in_seconds(tmp_path, monkeypatch, caplog):
    import socket
    import time

    with socket.socket() as probe:  # a local port that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_SILENT", "true")
    began = time.monotonic()
    logger = WandbLogger(project="p", mode="auto", dir=tmp_path)
    logger.start({"a": 1})
    try:
        # not W&B's own wait for the server (init_timeout, 90 s); a loaded machine may take a
        # while to start W&B's offline service, so the bound is generous
        assert time.monotonic() - began < 45
        assert logger.run is not None and logger.mode == "offline" and not logger.failures
        assert f"127.0.0.1:{port} cannot be reached" in caplog.text
    finally:
        logger.finish()
    assert sorted((tmp_path / "wandb").glob("offline-run-*"))


def test_failing_log_call_never_raises(tmp_path):
    class BrokenRun:
        def log(self, *args, **kwargs):
            raise ConnectionError("dropped")

        def finish(self, exit_code=0):
            raise ConnectionError("dropped")

    logger = WandbLogger(project="p", mode="offline", dir=tmp_path)
    logger.run = BrokenRun()
    logger.log_metrics({"a": 1})
    logger.log_table("t", [{"a": 1}])
    logger.finish()
    assert len(logger.failures) == 3 and logger.run is None


def test_mode_resolution(tmp_path):
    assert resolve_mode("auto", {"WANDB_API_KEY": "x" * 40}) == "online"
    assert resolve_mode("auto", {"NETRC": str(tmp_path / "none")}) == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert api_key_configured({"NETRC": str(netrc)})
    assert not api_key_configured({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example"})
    assert resolve_mode("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "x"}) == "disabled"
    assert resolve_mode("offline", {"WANDB_API_KEY": "x"}) == "offline"
    with pytest.raises(ValueError, match="logger.mode"):
        resolve_mode("sometimes")


def test_disabled_and_null_loggers_do_nothing(tmp_path):
    logger = WandbLogger(project="p", mode="disabled", dir=tmp_path)
    logger.start({})
    logger.log_metrics({"a": 1})
    logger.finish()
    assert not (tmp_path / "wandb").exists()
    null = NullLogger()
    assert isinstance(null, Logger)
    null.start({})
    null.log_metrics({})
    null.log_table("t", [])
    null.log_images("i", [])
    null.finish()


def test_flatten():
    flat = flatten({"ppl": {"dense": 1.0, "pruned": float("inf")}, "n": 2, "x": None, "l": [1]})
    assert flat == {"ppl/dense": 1.0, "ppl/pruned": float("inf"), "n": 2}


def test_a_diverged_runs_infinite_perplexity_reaches_the_dashboard(tmp_path, monkeypatch):
    """W&B takes inf and NaN in ``run.log`` (the summary shows Infinity, NaN): a diverged run's
    ``ppl/pruned`` is there, not missing as if the run had not been evaluated."""
    import math

    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="gblm-test", mode="offline", dir=tmp_path)
    logger.start({})
    logger.log_metrics({"ppl": {"dense": 20.5, "pruned": float("inf")}, "s": float("nan")})
    logger.finish()
    wandb.teardown()  # the service closes the run's file (see the first test)
    _, history, _ = offline_run_contents(tmp_path)
    assert logger.failures == [] and history["ppl/pruned"] == float("inf")
    assert math.isnan(history["s"]) and history["ppl/dense"] == 20.5


def test_a_run_logs_live_with_job_type_tags_group_and_an_artifact(tmp_path, monkeypatch):
    """Through ``run``: stages and the dense perplexity arrive while the run goes on (before the
    final summary), the run is typed by its method, tagged and grouped, its record an artifact."""
    import wandb

    from gblm.run import run
    from tests.conftest import compose_config

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config(
        "model=tiny_llama", "method=wanda", "logger=wandb", "logger.mode=offline",
        "calibration.nsamples=2", "calibration.seqlen=32", "eval.perplexity.max_windows=2",
        "progress=false", "mask_images=[model.layers.0.mlp.down_proj]",
    )  # fmt: skip
    metrics = run(cfg, run_dir=tmp_path)
    assert metrics["status"] == "finished"
    wandb.teardown()  # the service closes the run's file (see the test above)
    (run_dir,) = sorted((tmp_path / "wandb").glob("offline-run-*"))
    (log_file,) = run_dir.glob("run-*.wandb")
    records = read_wandb_records(log_file)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
    assert started.job_type == "wanda" and started.run_group == "single-tiny_llama"
    assert {"wanda", "sparsity=0.5", "tiny_llama"} <= set(started.tags)
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
    stages = [row["stage"] for row in rows if "stage" in row]
    # data and tokenizer load in the preflight, before any remote logger starts
    assert stages[:2] == ["load model", "load model"] and "prune" in stages
    first_dense = next(i for i, row in enumerate(rows) if "ppl/dense" in row)
    prune_end = next(i for i, row in enumerate(rows) if "stage_s/prune" in row)
    assert first_dense < prune_end  # live: the dense perplexity long before the run ends
    assert rows[first_dense]["ppl/dense"] == metrics["ppl"]["dense"]
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    (record,) = [a for a in artifacts if a.type == "run-record"]  # beside W&B's own table ones
    names = {f.path for f in record.manifest.contents}
    assert {"metrics.json", "mask_stats.csv", "model.layers.0.mlp.down_proj.png"} <= names


def test_names_sent_to_wandb_are_valid_by_construction(tmp_path):
    from gblm.loggers.wandb import artifact_name, fit

    assert artifact_name("run-2026-12-07_13-00-00-0_method=gblm,calibration.nsamples=8") == (
        "run-2026-12-07_13-00-00-0_method_gblm_calibration.nsamples_8"
    )
    assert artifact_name("==//") == "run"
    long = [artifact_name("x" * 300 + suffix) for suffix in ("a", "b")]
    assert all(len(name) == 128 for name in long) and long[0] != long[1]  # cut, still apart
    assert fit("short", 64) == "short"
    logger = WandbLogger(project="p", group="g" * 200, tags=("t" * 70, "", "m"), name="n" * 200,
                         job_type="j" * 70, mode="disabled", dir=tmp_path)  # fmt: skip
    assert len(logger.group) == len(logger.name) == 128 and len(logger.job_type) == 64
    assert [len(t) for t in logger.tags] == [64, 1]


def test_a_failed_artifact_or_image_upload_is_a_warning_of_the_record(tmp_path, monkeypatch):
    """The run finishes; metrics.json names each upload that failed, as the README promises."""
    import wandb

    from gblm.run import run
    from tests.conftest import compose_config

    monkeypatch.setenv("WANDB_SILENT", "true")

    def refused(kind):  # subclasses: wandb itself asks isinstance(x, wandb.Artifact)
        def __init__(self, *args, **kwargs):
            raise ValueError("refused by the server")

        return type(f"Refused{kind.__name__}", (kind,), {"__init__": __init__})

    monkeypatch.setattr(wandb, "Artifact", refused(wandb.Artifact))
    monkeypatch.setattr(wandb, "Image", refused(wandb.Image))
    cfg = compose_config(
        "model=tiny_llama", "method=magnitude", "logger=wandb", "logger.mode=offline",
        "eval.perplexity.max_windows=2", "progress=false", "mask_images=[model.layers.0.mlp.up_proj]",
    )  # fmt: skip
    metrics = run(cfg, run_dir=tmp_path / "run")
    wandb.teardown()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == metrics["status"] == "finished"
    warnings = saved["warnings"]
    assert any("log_artifact" in w and "refused by the server" in w for w in warnings), warnings
    assert any("log_images" in w and "refused by the server" in w for w in warnings), warnings
    assert saved["wandb"]["sync_dir"].startswith(str(tmp_path / "run" / "wandb" / "offline-run-"))


def test_a_relaunch_of_an_interrupted_run_resumes_its_wandb_run(tmp_path, monkeypatch):
    """An interrupted run relaunched in its run dir is one run: it used to open a second W&B
    run (a new id) beside the first, left failed, for one local record."""
    import wandb

    from gblm import pipeline
    from gblm.run import run
    from tests.conftest import compose_config

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config(
        "model=tiny_llama", "method=magnitude", "logger=wandb", "logger.mode=offline",
        "eval.perplexity.max_windows=2", "progress=false",
    )  # fmt: skip
    execute = pipeline.execute

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir=tmp_path)
    first = json.loads((tmp_path / "metrics.json").read_text())
    assert first["status"] == "interrupted" and first["wandb"]["id"]
    monkeypatch.setattr(pipeline, "execute", execute)
    metrics = run(cfg, run_dir=tmp_path)
    wandb.teardown()
    assert metrics["status"] == "finished"
    # offline-run-<date>_<time>-<id>, with "-1" added when a relaunch starts in the same second
    names = [p.name for p in (tmp_path / "wandb").glob("offline-run-*")]
    ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-([^-]+)(?:-\d+)?", n).group(1) for n in names}
    assert ids == {first["wandb"]["id"]} == {metrics["wandb"]["id"]}
