"""The gradient stage block by block against the full model: equal bit for bit (torch.equal);
and the onloading helpers it runs on (gblm.models.onloading)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from gblm.calibration.gradients import GradientError, GradientSettings, gradient_norms
from gblm.models.layers import decoder_layers
from gblm.models.onloading import skeleton, visiting
from gblm.models.tiny import ARCHITECTURES, build_tiny_model, tiny_config

VOCAB = 256


def tiny(arch: str = "llama", **kwargs) -> nn.Module:
    return build_tiny_model(tiny_config(arch, vocab_size=VOCAB, **kwargs), seed=0)


def windows(n: int = 3, seqlen: int = 12, vocab: int = VOCAB) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, seqlen), generator=gen)  # (N, T)


def assert_bit_equal(ref: dict[str, Tensor], got: dict[str, Tensor]) -> None:
    assert list(got) == list(ref)
    for name, g in ref.items():
        assert bool(g.abs().sum() > 0), name  # a real gradient, not two zero tensors
        assert got[name].dtype == g.dtype and got[name].device == g.device, name
        assert torch.equal(got[name], g), name


def blockwise(norm: str, size: int, **kwargs) -> GradientSettings:
    return GradientSettings(norm=norm, blockwise=True, group_size=size, **kwargs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_bit_equal_to_the_full_model_on_every_architecture(arch: str, norm: str) -> None:
    model, ids = tiny(arch), windows()
    ref = gradient_norms(model, ids, GradientSettings(norm=norm), progress=False)
    for size in (1, 2, 3):  # 2: a short last group
        got = gradient_norms(model, ids, blockwise(norm, size), progress=False)
        assert_bit_equal(ref, got)


def test_bit_equal_in_bfloat16_with_fp32_accumulators() -> None:
    model, ids = tiny("qwen2", num_layers=3).to(torch.bfloat16), windows()
    for extra in ({"accumulator_dtype": "float32"}, {}):
        ref = gradient_norms(model, ids, GradientSettings(**extra), progress=False)
        got = gradient_norms(model, ids, blockwise("l1", 2, **extra), progress=False)
        assert_bit_equal(ref, got)


def test_file_backed_accumulators_change_nothing(tmp_path) -> None:
    model, ids = tiny("llama"), windows()
    for norm in ("l1", "l2"):
        ref = gradient_norms(model, ids, GradientSettings(norm=norm), progress=False)
        settings = blockwise(norm, 2)
        got = gradient_norms(
            model, ids, settings, file_backed=True, scratch_dir=tmp_path, progress=False
        )
        assert_bit_equal(ref, got)
        assert not list(tmp_path.iterdir())  # the files are unlinked at once
    with pytest.raises(ValueError, match="file-backed"):
        gradient_norms(model, ids, GradientSettings(), file_backed=True, progress=False)


@pytest.fixture(scope="module")
def smollm2() -> nn.Module:
    from gblm.config import ModelSpec
    from gblm.models.loading import load_model, load_tokenizer

    spec = ModelSpec()
    return load_model(spec, torch.device("cpu"), torch.float32, load_tokenizer(spec))


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_bit_equal_on_smollm2(smollm2: nn.Module, norm: str) -> None:
    ids = windows(n=2, seqlen=8, vocab=smollm2.config.vocab_size)
    ref = gradient_norms(smollm2, ids, GradientSettings(norm=norm), progress=False)
    for size in (1, 2):
        got = gradient_norms(smollm2, ids, blockwise(norm, size), progress=False)
        assert_bit_equal(ref, got)


def test_model_left_exactly_as_found() -> None:
    model, ids = tiny("opt"), windows()
    model.train()
    layers = list(decoder_layers(model))
    data = {name: p.data_ptr() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    gradient_norms(model, ids, blockwise("l1", 2), progress=False)
    assert list(decoder_layers(model)) == layers
    assert model.training
    for name, p in model.named_parameters():
        assert p.data_ptr() == data[name] and p.requires_grad == flags[name] and p.grad is None


def test_blocks_are_put_back_after_an_error() -> None:
    model = tiny("llama")
    layers = list(decoder_layers(model))
    with pytest.raises(RuntimeError, match="boom"), skeleton(model, lambda *_: None):
        assert not any(a is b for a, b in zip(decoder_layers(model), layers))
        raise RuntimeError("boom")
    assert list(decoder_layers(model)) == layers


def test_stand_ins_read_attributes_of_the_real_block() -> None:
    model = tiny("qwen2")
    with skeleton(model, lambda *_: None) as real:
        stand_in = decoder_layers(model)[0]
        assert stand_in.hidden_size == real[0].hidden_size
        assert not list(stand_in.parameters())


def test_visiting_the_own_device_is_a_no_op() -> None:
    linear = nn.Linear(3, 2)
    pointer = linear.weight.data_ptr()
    with visiting(linear, torch.device("cpu")):
        assert linear.weight.data_ptr() == pointer
    assert linear.weight.data_ptr() == pointer


@pytest.mark.gpu
def test_visiting_puts_the_same_host_tensors_back() -> None:
    model = tiny("llama")
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    with visiting(model, torch.device("cuda")):
        assert all(p.is_cuda for p in model.parameters())
        assert all(b.is_cuda for b in model.buffers())
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.data_ptr() == pointers[name]
    assert all(b.device.type == "cpu" for b in model.buffers())


def test_nonfinite_gradient_names_the_layer_and_sample() -> None:
    model, ids = tiny("llama"), windows()
    block = decoder_layers(model)[1]
    # a huge weight in the last block's MLP: the loss may stay finite while the gradient overflows
    with torch.no_grad():
        block.mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(GradientError):
        gradient_norms(model, ids, blockwise("l1", 2), progress=False)


def test_refuses_a_hook_other_than_a_device_maps() -> None:
    model = tiny("llama")  # offloaded device maps: tests/test_offload.py
    decoder_layers(model)[0]._hf_hook = object()  # not an AlignDevicesHook
    with pytest.raises(NotImplementedError, match="device maps"):
        gradient_norms(model, windows(), blockwise("l1", 2), progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_onloaded_from_the_host_equals_the_model_on_the_gpu(arch: str) -> None:
    """Weights on the CPU, blocks onloaded to the GPU one at a time, against the model on the GPU."""
    model, ids = tiny(arch), windows()
    on_gpu = tiny(arch).cuda()
    for norm in ("l1", "l2"):
        ref = gradient_norms(on_gpu, ids, GradientSettings(norm=norm), progress=False)
        got = gradient_norms(model, ids, blockwise(norm, 2), device="cuda", progress=False)
        assert all(p.device.type == "cpu" for p in model.parameters())
        assert_bit_equal(ref, got)
