"""The walk's calibration batches (``batch_size=auto``): the masks and weights of windows one at a
time, bit for bit, wherever batches are used; one window at a time where the machine's kernels
would change the bits."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gblm.calibration import batching
from gblm.calibration.batching import batch_is_exact, exact_batch
from gblm.calibration.gradients import gradient_norms
from gblm.calibration.sequential import prune_model
from gblm.devices import calibration_batch
from gblm.methods.registry import build_method
from gblm.models.layers import decoder_layers
from gblm.models.tiny import ARCHITECTURES, build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity

VOCAB, N, T = 256, 7, 32
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return build_tiny_model(tiny_config(arch, vocab_size=VOCAB), seed=0, dtype=dtype)


def _windows(n: int = N, seqlen: int = T, vocab: int = VOCAB) -> Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(3))


def _count_block_calls(model: nn.Module) -> tuple[list[int], object]:
    calls: list[int] = []
    handle = decoder_layers(model)[0].register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_auto_batch_size_rule() -> None:
    assert calibration_batch("auto", CPU, 256) == 8
    assert calibration_batch("auto", CPU, 4096) == 1
    assert calibration_batch("auto", torch.device("cuda"), 256) == 1  # published: one window
    assert calibration_batch(3, torch.device("cuda"), 256) == 3
    for bad in (0, -1, 1.5, True, "big"):
        with pytest.raises(ValueError, match="batch_size"):
            calibration_batch(bad, CPU, 256)
    linears = [nn.Linear(16, 8)]
    assert exact_batch("auto", 5, 1024, CPU, linears) == 2  # 2048 rows, capped by nothing
    assert exact_batch("auto", 1, 64, CPU, linears) == 1  # never more than the windows
    assert exact_batch(6, 40, 64, CPU, linears) == 6  # an integer is taken as given


@pytest.mark.parametrize("d_in, d_out, seqlen", [(64, 176, 32), (576, 1536, 16), (96, 64, 8)])
def test_probe_verdict_holds_for_other_values(d_in: int, d_out: int, seqlen: int) -> None:
    """The probe's verdict is about kernels, not values: new operands get the same verdict."""
    exact = batch_is_exact([nn.Linear(d_in, d_out)], 4, seqlen, CPU)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, seqlen, d_in, generator=gen) * 3
    w = torch.randn(d_out, d_in, generator=gen)
    batched, single = F.linear(x, w), torch.cat([F.linear(x[i : i + 1], w) for i in range(4)])
    if exact:
        assert torch.equal(batched, single)
    else:  # the probe found a product whose bits depend on the batch: this one may differ too
        torch.testing.assert_close(batched, single)


def test_inexact_kernels_send_windows_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "batch_is_exact", lambda *a, **k: False)
    model = _model("llama")
    calls, handle = _count_block_calls(model)
    prune_model(model, build_method("wanda"), Sparsity(0.5), _windows(), device="cpu",
                progress=False)  # fmt: skip
    handle.remove()
    assert len(calls) == 2 * N  # statistics and re-forward, one window each
    assert exact_batch("auto", N, T, CPU, [nn.Linear(4, 4)]) == 1


def _walk(arch: str, method: str, batch_size: int | str) -> tuple[dict, dict, int]:
    model = _model(arch)
    pruner = build_method(method)
    if method == "gblm":
        pruner.set_gradient_norms(gradient_norms(model, _windows(), progress=False))
    calls, handle = _count_block_calls(model)
    masks = prune_model(model, pruner, Sparsity(0.5), _windows(), device="cpu",
                        batch_size=batch_size, progress=False)  # fmt: skip
    handle.remove()
    return {k: masks[k] for k in masks}, model.state_dict(), len(calls)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gblm"])
def test_auto_batches_give_the_masks_and_weights_of_one_window(arch: str, method: str) -> None:
    masks_1, weights_1, calls_1 = _walk(arch, method, 1)
    masks_a, weights_a, calls_a = _walk(arch, method, "auto")
    assert calls_1 == 2 * N
    assert masks_a.keys() == masks_1.keys()
    for name, mask in masks_1.items():
        assert torch.equal(masks_a[name], mask), name
    for name, value in weights_1.items():
        assert torch.equal(weights_a[name], value), name
    model = _model(arch)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if exact_batch("auto", N, T, CPU, linears) > 1:  # batches were used: fewer, larger calls
        assert calls_a < calls_1


def test_probe_verdicts_are_remembered_by_what_they_depend_on(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GBLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(batching, "_verdicts", {})
    probed: list[tuple] = []
    real = batching._linear_is_exact

    def counting(*args):
        probed.append(args)
        return real(*args)

    monkeypatch.setattr(batching, "_linear_is_exact", counting)
    linears = [nn.Linear(32, 48), nn.Linear(48, 32), nn.Linear(32, 48)]  # two distinct shapes
    batch_is_exact(linears, 3, 16, CPU)
    assert sorted(a[:2] for a in probed) == [(32, 48), (48, 32)]
    assert len(list((tmp_path / "batch_probes").glob("*.json"))) == 2
    batch_is_exact(linears, 3, 16, CPU)
    assert len(probed) == 2  # remembered in the process
    monkeypatch.setattr(batching, "_verdicts", {})
    batch_is_exact(linears, 3, 16, CPU)
    assert len(probed) == 2  # and on disk
    for path in (tmp_path / "batch_probes").glob("*.json"):
        path.write_text("{damaged")
    monkeypatch.setattr(batching, "_verdicts", {})
    batch_is_exact(linears, 3, 16, CPU)
    assert len(probed) == 4  # a damaged entry is probed again
    batch_is_exact(linears, 3, 17, CPU)
    assert len(probed) == 6  # another length is another key


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
