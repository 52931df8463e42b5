"""The GBLM gradient stage against per-sample gradients computed independently, and its cache."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from torch import Tensor, nn

from gblm.calibration.gradients import GradientError, GradientSettings, gradient_norms
from gblm.methods.gradient_score import cached_gradient_norms, gradient_cache_key
from gblm.models.layers import decoder_layers
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.utils import content_hash

VOCAB, NSAMPLES, SEQLEN, SCALE = 256, 3, 16, 100.0


def tiny(arch: str = "llama") -> nn.Module:
    return build_tiny_model(tiny_config(arch, vocab_size=VOCAB), seed=0)


def windows(seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (NSAMPLES, SEQLEN), generator=gen)  # (N, T)


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Decoder-block Linears found by name, independently of gblm.models.layers."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name
    }


def per_sample_grads(model: nn.Module, ids: Tensor) -> list[dict[str, Tensor]]:
    """One dict of fp32 weight gradients per window, by torch.autograd.grad (no .grad touched)."""
    linears = block_linears(model)
    weights = [m.weight for m in linears.values()]
    model.eval()
    grads = []
    for n in range(ids.shape[0]):
        sample = ids[n : n + 1]  # (1, T)
        loss = model(input_ids=sample, labels=sample).loss
        grads.append(dict(zip(linears, torch.autograd.grad(loss, weights))))
    return grads


def reference(grads: list[dict[str, Tensor]], norm: str, scale: float = SCALE) -> dict[str, Tensor]:
    """sum_n |scale g_n| or sqrt(sum_n (scale g_n)^2), in float64."""
    out = {}
    for name in grads[0]:
        terms = [scale * g[name].double() for g in grads]
        if norm == "l1":
            out[name] = sum(t.abs() for t in terms)
        else:
            out[name] = torch.sqrt(sum(t.square() for t in terms))
    return out


Case = tuple[nn.Module, Tensor, list[dict[str, Tensor]]]


def make_case(arch: str) -> Case:
    """A tiny model (never modified: the stage leaves it as found), windows, per-sample grads."""
    model, ids = tiny(arch), windows()
    return model, ids, per_sample_grads(model, ids)


@pytest.fixture(scope="module")
def llama_case() -> Case:
    return make_case("llama")


@pytest.fixture(scope="module")
def opt_case() -> Case:
    return make_case("opt")


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_norms_match_independent_per_sample_gradients(request, arch: str, norm: str) -> None:
    model, ids, grads = request.getfixturevalue(f"{arch}_case")
    expected = reference(grads, norm)
    got = gradient_norms(
        model, ids, GradientSettings(norm=norm, accumulator_dtype=torch.float32), progress=False
    )

    assert set(got) == set(expected)
    for name, g in got.items():
        assert g.dtype == torch.float32 and g.shape == expected[name].shape
        torch.testing.assert_close(
            g.double(), expected[name], rtol=1e-5, atol=1e-6 * expected[name].abs().max().item()
        )
    # Per-sample norms, not the norm of the summed gradient: the test could tell them apart.
    name = next(iter(expected))
    summed = SCALE * sum(g[name].double() for g in grads)
    assert not torch.allclose(summed.abs(), expected[name], rtol=1e-3)


def test_l1_fp16_follows_published_arithmetic(llama_case: Case) -> None:
    """fp16 l1: each term |scale g| is rounded to fp16, then added to an fp16 running sum."""
    model, ids, grads = llama_case
    got = gradient_norms(
        model, ids, GradientSettings(norm="l1"), progress=False
    )  # float16 by default
    for name, g in got.items():
        assert g.dtype == torch.float16
        published = torch.zeros_like(g)
        for sample in grads:
            published = published + (sample[name].float() * SCALE).abs().to(torch.float16)
        assert torch.equal(g, published), name
    expected = reference(grads, "l1")
    for name, g in got.items():
        torch.testing.assert_close(
            g.double(), expected[name], rtol=5e-3, atol=1e-4 * expected[name].abs().max().item()
        )


def test_l2_fp16_is_fp32_sum_then_cast(llama_case: Case) -> None:
    model, ids, grads = llama_case
    expected = reference(grads, "l2")
    got = gradient_norms(model, ids, GradientSettings(norm="l2"), progress=False)
    for name, g in got.items():
        assert g.dtype == torch.float16
        torch.testing.assert_close(g, expected[name].to(torch.float16), rtol=1e-3, atol=1e-6)


def test_scale_is_linear_and_zero_gives_zeros(llama_case: Case) -> None:
    model, ids, _ = llama_case
    one = gradient_norms(
        model, ids, GradientSettings(scale=1.0, accumulator_dtype=torch.float32), progress=False
    )
    hundred = gradient_norms(
        model, ids, GradientSettings(accumulator_dtype=torch.float32), progress=False
    )
    zero = gradient_norms(model, ids, GradientSettings(scale=0.0), progress=False)
    for name in one:
        torch.testing.assert_close(hundred[name], 100.0 * one[name], rtol=1e-5, atol=0.0)
        assert not zero[name].any()


def test_model_left_exactly_as_found() -> None:
    model, ids = tiny("opt"), windows()
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    got = gradient_norms(
        model, ids, GradientSettings(accumulator_dtype=torch.float32), progress=False
    )

    assert model.training and all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None, name
        assert p.requires_grad == flags[name], name
    # OPT has dropout 0.1: the stage ran in eval mode, so it matches an eval-mode reference.
    expected = reference(per_sample_grads(model, ids), "l1")
    for name, g in got.items():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(g.double(), expected[name], rtol=1e-5, atol=1e-6 * scale)


def test_a_weight_written_during_the_stage_is_caught() -> None:
    model, ids = tiny(), windows()
    linear = model.model.layers[0].mlp.up_proj

    def write(module: nn.Module, args: object) -> None:
        with torch.no_grad():
            module.weight.mul_(1.0)

    handle = linear.register_forward_pre_hook(write)
    with pytest.raises(RuntimeError, match=r"modified parameters: model\.layers\.0\.mlp\.up_proj"):
        gradient_norms(model, ids, progress=False)
    handle.remove()


def test_gradients_freed_as_produced() -> None:
    """When a late weight's gradient arrives, every earlier one has been folded and freed."""
    model, ids = tiny(), windows()
    params = dict(model.named_parameters())
    target = "model.layers.0.self_attn.q_proj.weight"  # among the last produced in backward
    seen: list[list[str]] = []

    def spy(weight: Tensor) -> None:
        seen.append([name for name, p in params.items() if p.grad is not None])

    handle = params[target].register_post_accumulate_grad_hook(spy)
    try:
        gradient_norms(model, ids, progress=False)
    finally:
        handle.remove()
    assert seen == [[target]] * NSAMPLES


def test_nonfinite_gradient_names_the_layer_and_sample() -> None:
    model, ids = tiny(), windows()
    weight = model.model.layers[1].mlp.down_proj.weight
    calls = {"n": 0}

    def poison(grad: Tensor) -> Tensor:
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    handle = weight.register_hook(poison)
    with pytest.raises(GradientError, match=r"model\.layers\.1\.mlp\.down_proj \(sample 1\)"):
        gradient_norms(model, ids, progress=False)
    handle.remove()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    gradient_norms(model, ids, progress=False)  # no hook left behind


def test_nan_weight_gives_a_clear_loss_error() -> None:
    model, ids = tiny(), windows()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(GradientError, match=r"non-finite loss .* samples? 0"):
        gradient_norms(model, ids, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_block_by_block_recomputes_every_block_but_the_last(llama_case: Case) -> None:
    """Blocks 0 .. L-2 run forward once and again in their backward; the last block and the
    head run once per window, as in the full model. The norms: tests/test_blockwise.py."""
    model, ids, _ = llama_case
    blocks = decoder_layers(model)
    calls = [0] * len(blocks)
    handles = [
        block.self_attn.q_proj.register_forward_hook(
            lambda *_, b=b: calls.__setitem__(b, calls[b] + 1)
        )
        for b, block in enumerate(blocks)
    ]
    try:
        gradient_norms(model, ids, progress=False)
        assert calls == [NSAMPLES] * len(blocks)
        calls[:] = [0] * len(blocks)
        gradient_norms(model, ids, GradientSettings(blockwise=True, group_size=2), progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [2 * NSAMPLES] * (len(blocks) - 1) + [NSAMPLES]


def test_bad_arguments(llama_case: Case) -> None:
    model, ids, _ = llama_case
    with pytest.raises(ValueError, match="int64"):
        gradient_norms(model, ids.float(), progress=False)


def fake_norms(value: float = 1.0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(int(value))
    return {
        "model.layers.0.mlp.up_proj": torch.rand(8, 4, generator=gen).half() * value,
        "model.layers.0.mlp.down_proj": torch.rand(4, 8, generator=gen).half(),
    }


def test_cache_computes_once_and_keys_separate_files(tmp_path) -> None:
    ids = windows()
    key_l1 = gradient_cache_key(
        "tiny-llama", ids, GradientSettings("l1", SCALE, torch.float16), torch.float32
    )
    key_l2 = gradient_cache_key(
        "tiny-llama", ids, GradientSettings("l2", SCALE, torch.float16), torch.float32
    )
    calls = {"n": 0}

    def compute() -> dict[str, Tensor]:
        calls["n"] += 1
        return fake_norms(float(calls["n"]))

    first = cached_gradient_norms(tmp_path, key_l1, compute)
    second = cached_gradient_norms(tmp_path, key_l1, compute)
    assert calls["n"] == 1
    assert set(first) == set(second)
    for name in first:
        assert second[name].dtype == torch.float16 and torch.equal(first[name], second[name])

    other = cached_gradient_norms(tmp_path, key_l2, compute)
    assert calls["n"] == 2
    assert not torch.equal(other["model.layers.0.mlp.up_proj"], first["model.layers.0.mlp.up_proj"])
    files = sorted(p.name for p in tmp_path.glob("grad_*.safetensors"))
    assert len(files) == 2 and f"grad_{content_hash(key_l1, length=16)}.safetensors" in files
    keys = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("grad_*.json"))]
    assert sorted(k["norm"] for k in keys) == ["l1", "l2"]
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_key_tracks_windows_and_settings() -> None:
    ids = windows()
    base = gradient_cache_key("m", ids, GradientSettings("l1", 100.0, torch.float16), torch.float16)
    assert base == gradient_cache_key(
        "m", ids.clone(), GradientSettings("l1", 100, "float16"), "float16"
    )
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % VOCAB
    assert (
        gradient_cache_key(
            "m", changed, GradientSettings("l1", 100.0, torch.float16), torch.float16
        )
        != base
    )
    assert (
        gradient_cache_key("m", ids, GradientSettings("l1", 1.0, torch.float16), torch.float16)
        != base
    )
    assert (
        gradient_cache_key("m", ids, GradientSettings("l1", 100.0, torch.float32), torch.float16)
        != base
    )
    assert (
        gradient_cache_key("m2", ids, GradientSettings("l1", 100.0, torch.float16), torch.float16)
        != base
    )
    settings = GradientSettings("l1", 100.0, torch.float16)
    assert gradient_cache_key("m", ids, settings, torch.float16, torch.device("cpu", 0)) == base
    assert gradient_cache_key("m", ids, settings, torch.float16, "cuda:1") != base
    json.dumps(base)


def test_cache_lock_lets_concurrent_jobs_compute_once(tmp_path) -> None:
    key = gradient_cache_key(
        "m", windows(), GradientSettings("l1", SCALE, torch.float16), torch.float16
    )
    calls = {"n": 0}
    results: list[dict[str, Tensor]] = []

    def compute() -> dict[str, Tensor]:
        calls["n"] += 1
        time.sleep(0.2)
        return fake_norms()

    def job() -> None:
        results.append(cached_gradient_norms(tmp_path, key, compute))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls["n"] == 1 and len(results) == 2
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name])
