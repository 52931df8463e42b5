"""The sequential layer walk: block-0 capture, hooks, pruned inputs, batching, exact counts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from gblm.calibration.capture import capture_block_inputs
from gblm.calibration.hooks import attached_hooks
from gblm.calibration.sequential import prune_model
from gblm.calibration.stats import LinearStats
from gblm.methods.base import Pruner
from gblm.methods.gblm import GBLMPruner
from gblm.methods.magnitude import MagnitudePruner
from gblm.methods.plans import PerBlockPlan, SparsityPlan
from gblm.methods.sparsegpt import SparseGPTPruner
from gblm.methods.wanda import WandaPruner
from gblm.models.layers import decoder_layers, decoder_layers_path, prunable_linears
from gblm.models.tiny import ARCHITECTURES, build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity

VOCAB, N, T = 256, 6, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str = "llama") -> nn.Module:
    return build_tiny_model(tiny_config(arch, vocab_size=VOCAB))


def _windows(n: int = N, seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def _hooks(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Forward and forward-pre hook counts per module (transformers installs some of its own)."""
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


class _Recorder(Pruner):
    """Wraps a method and keeps the statistics the walk handed it, by full Linear name."""

    def __init__(self, inner: Pruner, model: nn.Module) -> None:
        self.inner = inner
        self.stats = inner.stats
        self.needs_calibration = inner.needs_calibration
        self.true_sequential = inner.true_sequential
        self._names = {id(m): name for name, m in model.named_modules()}
        self.seen: dict[str, LinearStats] = {}
        self.targets: dict[str, Sparsity] = {}

    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor:
        assert self._names[id(linear)] == name  # the walk names each Linear by its full name
        self.seen[name], self.targets[name] = stats, target
        return self.inner.prune_linear(name, linear, stats, target)


# --- capture -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_capture_records_hidden_states_and_every_kwarg(arch: str) -> None:
    model, ids = _model(arch), _windows(5)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    before = _hooks(model)
    inputs = capture_block_inputs(model, ids, batch_size=2)  # batches of 2, 2 and 1
    assert _hooks(model) == before
    assert inputs.hidden.shape == (5, T, 64) and inputs.hidden.dtype == torch.float32
    torch.testing.assert_close(inputs.hidden, reference[0])
    assert sorted(inputs.calls) == [1, 2]
    args, kwargs = inputs.calls[2]
    assert "attention_mask" in kwargs and kwargs.get("use_cache") is False
    if arch != "opt":  # rotary models hand the block (cos, sin)
        cos, sin = kwargs["position_embeddings"]
        assert cos.shape[-2] == T and sin.shape == cos.shape
    else:  # OPT's position ids carry the batch dimension: the last batch needs its own
        assert kwargs["position_ids"].shape[0] == 2
        assert inputs.calls[1][1]["position_ids"].shape[0] == 1
    block = decoder_layers(model)[0]
    with torch.no_grad():
        for start, end in inputs.batches():
            call_args, call_kwargs = inputs.call_args(end - start, "cpu")
            out = block(inputs.hidden[start:end], *call_args, **call_kwargs)
            out = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(out, reference[1][start:end])


def test_capture_stores_in_model_dtype_and_restores_use_cache() -> None:
    model = build_tiny_model(tiny_config("llama", vocab_size=VOCAB), dtype=torch.bfloat16)
    model.config.use_cache = True
    inputs = capture_block_inputs(model, _windows(3), batch_size=3)
    assert inputs.hidden.dtype == torch.bfloat16
    assert model.config.use_cache is True


# --- hooks ---------------------------------------------------------------------------------


def test_attached_hooks_are_removed_on_error() -> None:
    linear = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="boom"), attached_hooks([(linear, lambda *a: None)]):
        assert linear._forward_hooks
        raise RuntimeError("boom")
    assert not linear._forward_hooks
    with attached_hooks([(linear, lambda *a: None)], pre=True, with_kwargs=True):
        assert len(linear._forward_pre_hooks) == 1
    assert not linear._forward_pre_hooks


def test_walk_leaves_no_hook_when_a_step_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    before = _hooks(model)

    def broken(*_args: object) -> int:
        raise RuntimeError("statistic failed")

    monkeypatch.setattr(LinearStats, "fold", broken)  # raises inside a Linear hook
    with pytest.raises(RuntimeError, match="statistic failed"):
        prune_model(model, WandaPruner(), Sparsity(0.5), _windows(), device="cpu", progress=False)
    assert _hooks(model) == before

    class Failing(WandaPruner):
        def prune_linear(self, *_args: object) -> Tensor:
            raise RuntimeError("prune failed")

    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="prune failed"):
        prune_model(model, Failing(), Sparsity(0.5), _windows(), device="cpu", progress=False)
    assert _hooks(model) == before


# --- the walk ------------------------------------------------------------------------------


def _direct_row_sq(model: nn.Module, ids: Tensor, block_index: int) -> dict[str, Tensor]:
    """(1/N) sum_{n,t} x^2 of every Linear input of one block, from a full forward of ``model``."""
    block = decoder_layers(model)[block_index]
    linears = prunable_linears(block)
    sums = {
        name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()
    }

    def add(name: str):
        def hook(_m: nn.Module, args: tuple, _out: Tensor) -> None:
            x = args[0].double()
            sums[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)

        return hook

    with torch.no_grad(), attached_hooks([(lin, add(name)) for name, lin in linears.items()]):
        for window in ids.split(1):
            model(window, use_cache=False)
    return {name: s / ids.shape[0] for name, s in sums.items()}


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_block_b_is_calibrated_on_the_pruned_outputs_of_block_b_minus_1(arch: str) -> None:
    model, ids = _model(arch), _windows()
    dense = copy.deepcopy(model)
    recorder = _Recorder(WandaPruner(), model)
    prune_model(model, recorder, Sparsity(0.5), ids, device="cpu", batch_size=4, progress=False)
    prefix = decoder_layers_path(model)

    # Independent check: pruned block 0 with block 1's dense weights, run as a whole model.
    check = copy.deepcopy(model)
    decoder_layers(check)[1].load_state_dict(decoder_layers(dense)[1].state_dict())
    expected = _direct_row_sq(check, ids, 1)
    from_dense = _direct_row_sq(dense, ids, 1)
    for name, row_sq in expected.items():
        got = recorder.seen[f"{prefix}.1.{name}"].row_sq_norms.double()
        torch.testing.assert_close(got, row_sq, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got, from_dense[name], rtol=1e-3)  # not the dense outputs
    for name, row_sq in _direct_row_sq(dense, ids, 0).items():  # block 0 sees the dense inputs
        got = recorder.seen[f"{prefix}.0.{name}"].row_sq_norms.double()
        torch.testing.assert_close(got, row_sq, rtol=1e-4, atol=1e-6)
        assert recorder.seen[f"{prefix}.0.{name}"].nsamples == N


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_batch_size_does_not_change_the_result(method: str) -> None:
    results = []
    for batch_size in (1, 4):  # 4 leaves a last batch of 2
        model = _model("qwen2")
        inner = WandaPruner() if method == "wanda" else SparseGPTPruner()
        recorder = _Recorder(inner, model)
        masks = prune_model(
            model,
            recorder,
            Sparsity(0.5),
            _windows(),
            device="cpu",
            batch_size=batch_size,
            progress=False,
            offload_inputs=batch_size == 4,
        )
        results.append((masks, recorder.seen, model.state_dict()))
    (masks_1, seen_1, weights_1), (masks_4, seen_4, weights_4) = results
    assert masks_1.keys() == masks_4.keys()
    differ = sum((masks_1[k] != masks_4[k]).sum().item() for k in masks_1)
    assert differ <= 2  # float reassociation may flip a near-tie at most
    for name, stats in seen_1.items():
        for field in ("row_sq_norms", "hessian"):
            a, b = getattr(stats, field), getattr(seen_4[name], field)
            if a is not None:  # entrywise, up to fp32 reassociation across batches
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * a.abs().max().item())
    if differ == 0:
        for key, value in weights_1.items():
            # SparseGPT's solve amplifies the last bits of the Hessian a little
            torch.testing.assert_close(value, weights_4[key], rtol=1e-3, atol=1e-4)


def _expect_valid_masks(model: nn.Module, masks: dict[str, Tensor], method: str, sp: Sparsity):
    prefix = decoder_layers_path(model)
    expected_names = {
        f"{prefix}.{b}.{name}"
        for b, block in enumerate(decoder_layers(model))
        for name in prunable_linears(block)
    }
    assert set(masks) == expected_names  # every decoder-block Linear, and only those
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight.data
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert (weight[mask] == 0).all()
        d_out, d_in = weight.shape
        if sp.structured:
            assert (mask.reshape(d_out, d_in // sp.m, sp.m).sum(dim=-1) == sp.n).all(), name
        elif method == "wanda":
            assert (mask.sum(dim=1) == int(d_in * sp.ratio)).all(), name
        else:  # one threshold per layer (magnitude) or per 128-column block (SparseGPT): `<=`
            assert d_in <= 128
            assert mask.sum().item() == int(weight.numel() * sp.ratio) + 1, name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_method_hits_exact_counts_on_every_architecture(arch: str) -> None:
    ids = _windows(4)
    for method, pruner in (
        ("magnitude", MagnitudePruner()),
        ("wanda", WandaPruner()),
        ("sparsegpt", SparseGPTPruner()),
    ):
        for sp in (Sparsity(0.5), Sparsity(0.5, 2, 4)):
            model = _model(arch)
            embed = model.get_input_embeddings().weight.clone()
            head = model.get_output_embeddings().weight.clone()
            masks = prune_model(model, pruner, sp, ids, device="cpu", batch_size=2, progress=False)
            _expect_valid_masks(model, masks, method, sp)
            assert torch.equal(model.get_input_embeddings().weight, embed)
            assert torch.equal(model.get_output_embeddings().weight, head)


def test_magnitude_needs_no_data_and_matches_the_direct_mask() -> None:
    model = _model()
    dense = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    masks = prune_model(model, MagnitudePruner(), Sparsity(0.5), device="cpu", progress=False)
    for name, mask in masks.items():
        weight = dense[name].abs()
        threshold = torch.sort(weight.flatten())[0][int(weight.numel() * 0.5)]
        assert torch.equal(mask, weight <= threshold)


def test_true_sequential_recalibrates_after_each_group() -> None:
    seen = {}
    for true_sequential in (False, True):
        model = _model()
        recorder = _Recorder(SparseGPTPruner(true_sequential=true_sequential), model)
        prune_model(model, recorder, Sparsity(0.5), _windows(4), device="cpu", progress=False)
        seen[true_sequential] = recorder.seen
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(seen[True][q].hessian, seen[False][q].hessian)
    # o_proj is calibrated after q, k, v were pruned: its inputs changed
    assert not torch.allclose(seen[True][o].hessian, seen[False][o].hessian, rtol=1e-3)


def test_missing_inputs_fail_clearly() -> None:
    model = _model()
    with pytest.raises(ValueError, match="no gradient norm for 'model.layers.0.self_attn.q_proj'"):
        prune_model(model, GBLMPruner(), Sparsity(0.5), _windows(), device="cpu", progress=False)
    with pytest.raises(ValueError, match="calibration windows"):
        prune_model(model, WandaPruner(), Sparsity(0.5), device="cpu")


def test_each_linear_gets_the_target_of_its_plan() -> None:
    """A per-block plan: every row of every Linear of block b prunes int(d_in * r_b) entries."""
    model = _model()
    recorder = _Recorder(WandaPruner(), model)
    ratios = [0.25, 0.75]
    masks = prune_model(
        model,
        recorder,
        PerBlockPlan(Sparsity(0.5), ratios),
        _windows(),
        device="cpu",
        progress=False,
    )
    for name, mask in masks.items():
        block = int(name.split(".")[2])
        assert recorder.targets[name] == Sparsity(ratios[block])
        per_row = mask.sum(dim=1)
        assert (per_row == int(mask.shape[1] * ratios[block])).all(), name


def test_a_plan_may_give_each_linear_its_own_target() -> None:
    class ByType(SparsityPlan):
        def target(self, block: int, name: str) -> Sparsity:
            return Sparsity(0.25) if name.endswith("q_proj") else Sparsity(0.5, 2, 4)

    model = _model()
    masks = prune_model(
        model, MagnitudePruner(), ByType(Sparsity(0.5)), device="cpu", progress=False
    )
    for name, mask in masks.items():
        if name.endswith("q_proj"):
            assert mask.sum().item() == int(mask.numel() * 0.25) + 1  # magnitude's '<=' rule
        else:
            groups = mask.reshape(mask.shape[0], -1, 4).sum(dim=-1)
            assert (groups == 2).all(), name


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_the_mask_statistics_ask_the_plan_by_the_walks_names(arch: str) -> None:
    """A plan is asked for a Linear's target by its name inside the block, in the walk and in the
    mask statistics alike (OPT's Linears sit one level shallower than LLaMA's)."""
    from gblm.pipeline import mask_statistics

    class Asked(SparsityPlan):
        def __init__(self, sparsity: Sparsity) -> None:
            super().__init__(sparsity)
            self.asked: list[set[tuple[int, str]]] = [set()]

        def target(self, block: int, name: str) -> Sparsity:
            self.asked[-1].add((block, name))
            return super().target(block, name)

    model, plan = _model(arch), Asked(Sparsity(0.5))
    masks = prune_model(model, MagnitudePruner(), plan, device="cpu", progress=False)
    plan.asked.append(set())
    mask_statistics(masks, plan)
    walk, statistics = plan.asked
    expected = {
        (block, name)
        for block, layer in enumerate(decoder_layers(model))
        for name in prunable_linears(layer)
    }
    assert walk == statistics == expected


def test_mean_and_variance_statistics_match_a_direct_computation() -> None:
    """The walk folds DSnoT's input statistics: per-sample token sums and variances."""

    class WantsMoments(WandaPruner):
        stats = frozenset({"row_sq", "mean", "var"})

    model, ids = _model(), _windows(3)
    dense = copy.deepcopy(model)
    recorder = _Recorder(WantsMoments(), model)
    q = "model.layers.0.self_attn.q_proj"
    seen: list[Tensor] = []
    handle = dict(dense.named_modules())[q].register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].detach().clone())
    )
    with torch.no_grad():
        for n in range(ids.shape[0]):
            dense(ids[n : n + 1], use_cache=False)
    handle.remove()
    prune_model(model, recorder, Sparsity(0.5), ids, device="cpu", batch_size=2, progress=False)
    got = recorder.seen[q]
    x = torch.cat(seen).double()  # (N, T, d_in): block 0 sees the dense model's inputs
    mean = x.sum(dim=1).mean(dim=0)  # mean over samples of the token sums
    var = x.var(dim=1, unbiased=False).mean(dim=0)  # equal T: token-weighted = plain mean
    torch.testing.assert_close(got.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.var.double(), var, rtol=1e-5, atol=1e-6)
    assert got.nsamples == 3 and got.ntokens == 3 * ids.shape[1]
