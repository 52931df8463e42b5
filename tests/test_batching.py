"""``batch_size``: ``auto`` is one window at a time (the published computation), an integer is
taken as given; runs finished with one window are the same config as ``auto`` runs."""

from __future__ import annotations

import pytest
import torch

from gblm.calibration.sequential import prune_model
from gblm.devices import calibration_batch
from gblm.methods.registry import build_method
from gblm.models.layers import decoder_layers
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity

VOCAB, N, T = 256, 7, 32


def test_auto_is_one_window_and_integers_are_taken_as_given() -> None:
    assert calibration_batch("auto") == 1
    assert calibration_batch(3) == 3
    for bad in (0, -1, 1.5, True, "big"):
        with pytest.raises(ValueError, match="batch_size"):
            calibration_batch(bad)
    model = build_tiny_model(tiny_config("llama", vocab_size=VOCAB), seed=0)
    ids = torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(3))
    # statistics and re-forward: two calls per batch; 3 gives batches of 3, 3 and 1
    for batch_size, calls in (("auto", 2 * N), (3, 2 * 3), (N + 5, 2)):
        windows_per_call: list[int] = []
        handle = decoder_layers(model)[0].register_forward_hook(
            lambda _m, args, _out, seen=windows_per_call: seen.append(args[0].shape[0])
        )
        prune_model(model, build_method("wanda"), Sparsity(0.5), ids, device="cpu",
                    batch_size=batch_size, progress=False)  # fmt: skip
        handle.remove()
        assert len(windows_per_call) == calls and sum(windows_per_call) == 2 * N


def test_auto_batches_resume_runs_finished_with_one_window() -> None:
    from gblm.run import config_hash

    base = {"method": {"name": "wanda"}, "seed": 0}
    assert config_hash({**base, "batch_size": "auto"}) == config_hash({**base, "batch_size": 1})
    assert config_hash({**base, "batch_size": 4}) != config_hash({**base, "batch_size": 1})


def test_runs_finished_under_older_defaults_are_the_same_config(tmp_path) -> None:
    import json

    from gblm.run import _same_config, config_hash

    saved = {"method": {"name": "wanda"}, "model": {"name": "x"}, "batch_size": 1, "seed": 0}
    (tmp_path / "config_resolved.json").write_text(json.dumps(saved))
    previous = {"status": "finished", "config_hash": "f" * 16}  # an older version's hash
    # since then: batch_size=auto (same results) and a key whose off value is None
    now = {**saved, "batch_size": "auto", "model": {"name": "x", "offload_folder": None}}
    assert _same_config(previous, config_hash(now), tmp_path, now)
    assert not _same_config(previous, config_hash(now), tmp_path, {**now, "seed": 1})
    assert not _same_config(previous, config_hash(now), tmp_path, {**now, "batch_size": 4})
    assert not _same_config(previous, "0" * 16, tmp_path / "missing", now)  # no saved config


def test_gblm_runs_that_recorded_retired_memory_options_still_resume(tmp_path) -> None:
    """GBLM's records of earlier versions hold two memory-only options of the gradient stage that
    no longer exist; a relaunch skips those runs, while a real change of a method option does not."""
    import json

    from gblm.run import _same_config, config_hash

    now = {"method": {"name": "gblm", "norm": "l2", "scale": 100.0}, "seed": 0}
    saved = {"method": {**now["method"], "gradient_checkpointing": True, "loss_chunk_tokens": 512},
             "seed": 0}  # fmt: skip
    (tmp_path / "config_resolved.json").write_text(json.dumps(saved))
    previous = {"status": "finished", "config_hash": "f" * 16}
    assert _same_config(previous, config_hash(now), tmp_path, now)
    other = {**now, "method": {**now["method"], "norm": "l1"}}
    assert not _same_config(previous, config_hash(other), tmp_path, other)
