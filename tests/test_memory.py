"""Weights memory-mapped from a checkpoint are copied into private memory before the walk writes."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from gblm.calibration.sequential import prune_model
from gblm.methods.registry import build_method
from gblm.models.layers import decoder_layers
from gblm.models.memory import (
    _libc_function,
    private_file_mappings,
    privatize_parameters,
)
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")


def in_mapping(tensor: torch.Tensor) -> bool:
    address = tensor.untyped_storage().data_ptr()
    return any(lo <= address < hi for lo, hi in private_file_mappings())


@pytest.fixture()
def mapped_model(tmp_path):
    """A tiny LLaMA saved as safetensors and loaded back the way a checkpoint is (mmap)."""
    build_tiny_model(tiny_config("llama", vocab_size=256), seed=0).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    return model


def test_maps_table_is_parsed(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000001000 rw-p 00000000 fe:00 12 /data/model.safetensors\n"
        "7f0000002000-7f0000003000 r--p 00000000 fe:00 12 /data/model.safetensors\n"
        "7f0000004000-7f0000005000 rw-s 00000000 fe:00 13 /dev/shm/x\n"
        "7f0000006000-7f0000007000 rw-p 00000000 00:00 0 \n"
        "7f0000008000-7f0000009000 rw-p 00000000 00:00 0 [heap]\n"
    )
    assert private_file_mappings(maps) == [(0x7F0000000000, 0x7F0000001000)]
    assert private_file_mappings(tmp_path / "absent") == []


def test_loaded_weights_are_mapped_and_privatized_bit_for_bit(mapped_model):
    block = decoder_layers(mapped_model)[0]
    weight = block.mlp.up_proj.weight
    if not in_mapping(weight):
        pytest.skip("this transformers build copies checkpoints into memory (nothing mapped)")
    before = weight.detach().clone()
    copied = privatize_parameters(block)
    assert copied == sum(p.numel() * p.element_size() for p in block.parameters())
    assert block.mlp.up_proj.weight is weight  # the same Parameter, new storage
    assert not any(in_mapping(p) for p in block.parameters())
    assert torch.equal(weight, before)
    assert privatize_parameters(block) == 0  # nothing left to copy


def _rss_file_kib() -> int:
    """The file-backed part of this process's resident set, in KiB: ``RssFile``, plus
    ``RssShmem`` where the file lies on a tmpfs (a temporary folder in memory)."""
    rss = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssFile:", "RssShmem:")):
            rss[line.split(":")[0]] = int(line.split()[1])
    if len(rss) < 2:
        pytest.skip("no RssFile and RssShmem in /proc/self/status")
    return sum(rss.values())


def test_privatized_weights_leave_the_file_pages(tmp_path):
    """A weight is never resident twice: its file pages leave the resident set as it is copied."""
    from safetensors.torch import load_file, save_file

    weight = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0))  # 16 MiB
    save_file({"weight": weight, "other": torch.ones(1024)}, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))  # "other" keeps the file mapped
    layer = torch.nn.Linear(1024, 4096, bias=False)
    layer.weight.data = loaded.pop("weight")
    if not in_mapping(layer.weight):
        pytest.skip("this safetensors build copies files into memory (nothing mapped)")
    assert torch.equal(layer.weight, weight)  # every page read: resident
    touched = _rss_file_kib()
    assert privatize_parameters(layer) == weight.numel() * 4
    assert _rss_file_kib() <= touched - 15 * 1024  # the 16 MiB of file pages left (a page slack)
    assert torch.equal(layer.weight, weight) and not in_mapping(layer.weight)
    assert in_mapping(loaded["other"]) and torch.equal(loaded["other"], torch.ones(1024))


def test_in_memory_model_is_not_copied():
    model = build_tiny_model(tiny_config("llama", vocab_size=256), seed=0)
    assert privatize_parameters(model) == 0


def test_walk_prunes_private_copies_with_the_same_masks(mapped_model):
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(mapped_model)  # deepcopy: ordinary memory
    assert not any(in_mapping(p) for p in reference.parameters())
    expected = prune_model(reference, build_method("wanda"), Sparsity(0.5), windows, device="cpu")
    got = prune_model(mapped_model, build_method("wanda"), Sparsity(0.5), windows, device="cpu")
    assert list(got) == list(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    for block in decoder_layers(mapped_model):
        assert not any(in_mapping(p) for p in block.parameters())
    for a, b in zip(mapped_model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


_HEAP_SCENARIO = """
import torch
from gblm.models.memory import release_free_heap

def rss_anon():
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

# A freed piece above the mmap threshold raises it (glibc: to the piece's size), so the 1 MB
# pieces below come from the heap; the small tensors kept between them pin it (fragmentation).
big = torch.empty(8 << 20, dtype=torch.uint8)
del big
pieces, pins = [], []
for _ in range(96):
    pieces.append(torch.ones(1 << 20, dtype=torch.uint8))  # touched: resident
    pins.append(torch.ones(1 << 16, dtype=torch.uint8))
before = rss_anon()
del pieces
held = rss_anon()
assert held > before - (16 << 20), (before, held)  # freed, yet still the process's memory
assert release_free_heap()
after = rss_anon()
assert after < held - (64 << 20), (held, after)  # most of the 96 MB left the process
assert all(int(p.sum()) == 1 << 16 for p in pins)  # what was kept is intact
"""


@pytest.mark.skipif(_libc_function("malloc_trim") is None, reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_kernel():
    # In a fresh process: where glibc places the pieces depends on the heap's history, which a
    # test process that ran other tests does not control.
    done = subprocess.run(
        [sys.executable, "-c", _HEAP_SCENARIO], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
