"""``model.onload``: weights on the host, one block at a time on the compute device.

Without a GPU the compute device is the host itself, so these CPU tests check what can be checked
soundly there: the onloaded walk and gradient stage give the in-memory masks and weights bit for
bit for every method, leave every block on the host, and the run and config accept the option.
The tests that move blocks to a real device are marked ``gpu``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from gblm.calibration.sequential import prune_model
from gblm.config import ConfigError
from gblm.methods.base import RunContext
from gblm.methods.gblm import GBLMPruner
from gblm.methods.magnitude import MagnitudePruner
from gblm.methods.sparsegpt import SparseGPTPruner
from gblm.methods.wanda import WandaPruner
from gblm.models.layers import decoder_layers
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity
from gblm.run import run
from tests.conftest import compose_config
from tests.test_run import SMALL

VOCAB = 256
METHODS = {
    "magnitude": MagnitudePruner,
    "wanda": WandaPruner,
    "sparsegpt": SparseGPTPruner,
    "gblm": GBLMPruner,
}


def _windows() -> Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def _prune(arch: str, method: str, device: str, onload: bool, home: str = "cpu"):
    model = build_tiny_model(tiny_config(arch, vocab_size=VOCAB), seed=0).to(home)
    pruner = METHODS[method]()
    ids = _windows()
    context = RunContext(device=torch.device(device), model_dtype=torch.float32, onload=onload)
    pruner.prepare(model, ids, context)
    masks = prune_model(
        model, pruner, Sparsity(0.5), ids, device=device, progress=False, onload=onload
    )
    return model, {name: masks[name] for name in masks}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_onloaded_walk_gives_the_in_memory_masks_and_weights(arch: str, method: str) -> None:
    memory, memory_masks = _prune(arch, method, "cpu", onload=False)
    onloaded, onload_masks = _prune(arch, method, "cpu", onload=True)
    assert list(onload_masks) == list(memory_masks)
    for name, mask in memory_masks.items():
        assert torch.equal(onload_masks[name], mask), name
    weights = memory.state_dict()
    for name, value in onloaded.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert all(p.device.type == "cpu" for p in onloaded.parameters())


def test_onloaded_capture_never_calls_a_real_block() -> None:
    model = build_tiny_model(tiny_config("llama", vocab_size=VOCAB), seed=0)
    calls = []
    for block in decoder_layers(model):
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    # magnitude needs no data; a method with data runs each block once for statistics and once
    # for the re-forward: capture adds no call of its own
    prune_model(model, WandaPruner(), Sparsity(0.5), _windows(), device="cpu", onload=True,
                batch_size=1)  # fmt: skip
    assert len(calls) == 2 * 4 * len(decoder_layers(model))  # 2 passes x 4 windows x blocks


def test_run_with_onload_gives_the_in_memory_masks(tmp_path, monkeypatch) -> None:
    import gblm.methods.gradient_score as gblm_method

    # the norms are computed, not loaded: the cache key is the same for all three on purpose
    monkeypatch.setattr(gblm_method, "cached_gradient_norms", lambda _dir, _key, compute: compute())
    blockwise_calls = []
    original = gblm_method.gradient_norms

    def spy(model, windows, settings, **kwargs):
        if settings.blockwise:
            blockwise_calls.append(settings.group_size)
        return original(model, windows, settings, **kwargs)

    monkeypatch.setattr(gblm_method, "gradient_norms", spy)
    base = ("model=tiny_llama", "method=gblm", *SMALL)
    memory = run(compose_config(*base), run_dir=tmp_path / "m")
    onloaded = run(compose_config(*base, "model.onload=true"), run_dir=tmp_path / "o")
    grouped = run(
        compose_config(*base, "method.gradient_blockwise=true", "method.gradient_group_size=3"),
        run_dir=tmp_path / "g",
    )
    assert onloaded["status"] == grouped["status"] == "finished"
    assert blockwise_calls == [8, 3]  # model.onload alone turns the block-by-block stage on
    assert onloaded["mask_stats"] == memory["mask_stats"] == grouped["mask_stats"]
    assert onloaded["ppl"]["pruned"] == memory["ppl"]["pruned"]
    recorded = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert recorded["status"] == "finished"


def test_onload_config_is_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model.device_map"):
        run(
            compose_config("model=tiny_llama", "model.onload=true", "model.device_map=auto"),
            run_dir=tmp_path / "a",
        )
    with pytest.raises(ConfigError, match="model.offload_folder"):
        run(
            compose_config("model=tiny_llama", "+model.device_map={model.layers.0: disk}"),
            run_dir=tmp_path / "c",
        )
    with pytest.raises(ConfigError, match="model.offload_folder"):
        run(
            compose_config("model=tiny_llama", f"model.offload_folder={tmp_path / 'off'}"),
            run_dir=tmp_path / "d",
        )
    with pytest.raises(ConfigError, match="gradient_group_size"):
        run(
            compose_config("model=tiny_llama", "method=gblm", "method.gradient_group_size=0"),
            run_dir=tmp_path / "b",
        )


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_onloaded_to_the_gpu_equals_the_model_on_the_gpu(arch: str, method: str) -> None:
    memory, memory_masks = _prune(arch, method, "cuda", onload=False, home="cuda")
    onloaded, onload_masks = _prune(arch, method, "cuda", onload=True, home="cpu")
    assert all(p.device.type == "cpu" for p in onloaded.parameters())
    assert all(b.device.type == "cpu" for b in onloaded.buffers())
    for name, mask in memory_masks.items():
        assert torch.equal(onload_masks[name], mask), name
    weights = memory.state_dict()
    for name, value in onloaded.state_dict().items():
        assert torch.equal(value, weights[name].cpu()), name


def _in_shared_file_mapping(tensor: Tensor) -> bool:
    """Whether ``tensor``'s storage lies in a shared mapping of a file (file-backed pages)."""
    address = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < end:
            return fields[1][3] == "s" and len(fields) == 6 and fields[5].startswith("/")
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux only")
@pytest.mark.parametrize("method", ["wanda", "gblm"])
def test_onloaded_checkpoint_leaves_anonymous_memory_block_by_block(method: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from gblm.models.memory import in_file_mappings, private_file_mappings

    memory, memory_masks = _prune("llama", method, "cpu", onload=False)
    build_tiny_model(tiny_config("llama", vocab_size=VOCAB), seed=0).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert in_file_mappings(model, private_file_mappings())  # the checkpoint's pages
    pruner, ids = METHODS[method](), _windows()
    context = RunContext(
        device=torch.device("cpu"), model_dtype=torch.float32, onload=True, scratch_dir=tmp_path
    )
    pruner.prepare(model, ids, context)
    if method == "gblm":  # l1: the norms are the accumulators themselves, file-backed
        assert all(_in_shared_file_mapping(g) for g in pruner._grad_norms.values())
    # On the CPU each block is pruned in its file-backed home: never copied into anonymous memory
    homes = []
    prune_linear = pruner.prune_linear

    def pruned_where(name, linear, stats, target):
        homes.append(_in_shared_file_mapping(linear.weight))
        return prune_linear(name, linear, stats, target)

    pruner.prune_linear = pruned_where
    masks = prune_model(
        model, pruner, Sparsity(0.5), ids, device="cpu", progress=False, onload=True,
        scratch_dir=tmp_path,
    )  # fmt: skip
    for name, mask in memory_masks.items():
        assert torch.equal(masks[name], mask), name
    weights = memory.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for block in decoder_layers(model):
        assert all(_in_shared_file_mapping(p) for p in block.parameters())
    assert homes and all(homes)
    assert not list(tmp_path.glob(".gblm-*"))  # unlinked at once
