"""Models dispatched by accelerate with offloaded blocks (meta weights): the walk and the
block-by-block gradient stage give the in-memory masks, weights and norms bit for bit, on the CPU.

Two kinds of store are covered: a ``device_map`` with ``"disk"`` entries and an offload folder
(the weights read from the checkpoint file, the pruned ones written as accelerate's ``.dat``
files), and ``accelerate.cpu_offload`` (a CPU state dict, written in place).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from gblm.calibration.gradients import GradientSettings, gradient_norms
from gblm.calibration.sequential import prune_model
from gblm.methods.base import RunContext
from gblm.models.layers import decoder_layers, decoder_layers_path
from gblm.models.offload import has_offloaded, offloaded_tensors
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity
from tests.test_onload import METHODS, VOCAB, _windows

DISK_BLOCKS = (1, 2)  # of the tiny models' 4 blocks; the LM head too


def _dense(arch: str) -> nn.Module:
    return build_tiny_model(tiny_config(arch, vocab_size=VOCAB), seed=0)


def _device_map(model: nn.Module) -> dict[str, str]:
    """Blocks 1 and 2 and an untied LM head on disk; every other child of the base model on the CPU."""
    layers = decoder_layers_path(model)  # model.layers, model.decoder.layers
    base = layers.rpartition(".")[0]
    placed = {
        f"{base}.{name}": "cpu"
        for name, _ in model.get_submodule(base).named_children()
        if f"{base}.{name}" != layers
    }
    for b in range(len(decoder_layers(model))):
        placed[f"{layers}.{b}"] = "disk" if b in DISK_BLOCKS else "cpu"
    # a head tied to the embeddings stays with them (accelerate finds no stored copy of its own)
    placed["lm_head"] = "cpu" if model.config.tie_word_embeddings else "disk"
    return placed


def _disk_offloaded(arch: str, tmp_path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    source = tmp_path / "checkpoint"
    dense = _dense(arch)
    dense.save_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(
        source, device_map=_device_map(dense), offload_folder=tmp_path / "offload",
        dtype=torch.float32,
    )  # fmt: skip
    model.eval()
    return model


def _cpu_offloaded(arch: str) -> nn.Module:
    from accelerate import cpu_offload

    return cpu_offload(_dense(arch), execution_device=torch.device("cpu"))


def _prune(model: nn.Module, method: str) -> dict[str, Tensor]:
    pruner = METHODS[method]()
    ids = _windows()
    pruner.prepare(model, ids, RunContext(device=torch.device("cpu"), model_dtype=torch.float32))
    masks = prune_model(model, pruner, Sparsity(0.5), ids, device="cpu", progress=False)
    return {name: masks[name] for name in masks}


def _stored_weights(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter as the model computes with it: an offloaded one from its hook's store."""
    full = {id(p): name for name, p in model.named_parameters()}
    weights = {full[id(e.current())]: e.read() for e in offloaded_tensors(model) if not e.buffer}
    for name, p in model.named_parameters():
        weights.setdefault(name, p.detach())
    return weights


def _assert_same(memory: nn.Module, memory_masks, offloaded: nn.Module, masks) -> None:
    assert list(masks) == list(memory_masks)
    for name, mask in memory_masks.items():
        assert torch.equal(masks[name], mask), name
    stored = _stored_weights(offloaded)
    for name, value in memory.named_parameters():
        assert torch.equal(stored[name], value), name
    ids = _windows()
    with torch.no_grad():  # the pruned weights are the ones the dispatched model computes with
        assert torch.equal(offloaded(ids).logits, memory(ids).logits)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_walk_on_a_disk_offloaded_model_gives_the_in_memory_masks(
    arch: str, method: str, tmp_path: Path
) -> None:
    memory = _dense(arch)
    memory_masks = _prune(memory, method)
    offloaded = _disk_offloaded(arch, tmp_path)
    assert has_offloaded(offloaded)
    checkpoint = tmp_path / "checkpoint" / "model.safetensors"
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    masks = _prune(offloaded, method)
    _assert_same(memory, memory_masks, offloaded, masks)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest  # never written
    assert all(p.device.type == "meta" for p in decoder_layers(offloaded)[1].parameters())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gblm"])
def test_walk_on_a_cpu_offloaded_model_gives_the_in_memory_masks(method: str) -> None:
    memory = _dense("llama")
    memory_masks = _prune(memory, method)
    offloaded = _cpu_offloaded("llama")
    assert has_offloaded(offloaded)
    _assert_same(memory, memory_masks, offloaded, _prune(offloaded, method))


def test_save_after_pruning_an_offloaded_model_saves_the_pruned_weights(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    memory = _dense("llama")
    _prune(memory, "wanda")
    offloaded = _disk_offloaded("llama", tmp_path)
    _prune(offloaded, "wanda")
    offloaded.save_pretrained(tmp_path / "pruned")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    weights = dict(saved.named_parameters())
    for name, value in memory.named_parameters():
        assert torch.equal(weights[name], value), name


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradients_of_offloaded_models_go_block_by_block_and_equal_the_in_memory_ones(
    norm: str, tmp_path: Path
) -> None:
    ids = _windows()
    ref = gradient_norms(_dense("llama"), ids, GradientSettings(norm=norm), progress=False)
    # block by block by itself: the setting asks for the full model
    settings = GradientSettings(norm=norm, group_size=3)
    for model in (_disk_offloaded("llama", tmp_path), _cpu_offloaded("llama")):
        got = gradient_norms(model, ids, settings, progress=False)
        assert list(got) == list(ref)
        for name, value in ref.items():
            assert bool(value.abs().sum() > 0) and torch.equal(got[name], value), name
        assert has_offloaded(model)  # the meta weights are back
        assert all(p.grad is None for p in model.parameters())


def test_zero_share_of_a_disk_offloaded_model_reads_the_stored_weights(tmp_path: Path) -> None:
    from gblm.models.zeros import weight_zero_share

    memory = _dense("llama")
    masks = _prune(memory, "wanda")
    offloaded = _disk_offloaded("llama", tmp_path)
    _prune(offloaded, "wanda")
    assert weight_zero_share(offloaded, list(masks)) == weight_zero_share(memory, list(masks))


def test_run_with_a_disk_device_map_finishes_with_the_in_memory_numbers(
    tmp_path: Path, tokenizer
) -> None:
    from gblm.run import run
    from tests.conftest import compose_config
    from tests.test_run import SMALL

    checkpoint = tmp_path / "checkpoint"
    dense = build_tiny_model(tiny_config("llama", vocab_size=len(tokenizer)), seed=0)
    dense.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    placed = ",".join(f"{k}:{v}" for k, v in _device_map(dense).items())
    base = ("model=hf", f"model.name_or_path={checkpoint}", "method=wanda", *SMALL)
    memory = run(compose_config(*base), run_dir=tmp_path / "m")
    offloaded = run(
        compose_config(*base, f"+model.device_map={{{placed}}}",
                       f"model.offload_folder={tmp_path / 'offload'}"),
        run_dir=tmp_path / "o",
    )  # fmt: skip
    assert offloaded["status"] == "finished"
    assert offloaded["sparsity_check"] == memory["sparsity_check"]
    assert offloaded["ppl"] == memory["ppl"]
