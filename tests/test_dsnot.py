"""DSnoT: the two-cycle example, naive per-row loops, sparsity kept, DSnoT after every method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gblm.calibration.sequential import prune_model
from gblm.calibration.stats import LinearStats
from gblm.methods.base import RunContext
from gblm.methods.dsnot import DSnoTPruner
from gblm.methods.registry import build_method
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.dsnot import dsnot_nm, dsnot_unstructured
from gblm.pruning.masks import nm_mask, unstructured_row_mask
from gblm.pruning.sparsity import Sparsity

Q = "model.layers.0.self_attn.q_proj"


def _example(**options) -> list[int]:
    linear = nn.Linear(4, 1, bias=False)
    linear.weight.data = torch.tensor([[4.0, -1.0, 2.0, -3.0]])
    ones = torch.ones(4)
    stats = LinearStats(row_sq_norms=ones, mean=ones, var=ones)
    mask = DSnoTPruner(**options).prune_linear(Q, linear, stats, Sparsity(0.5))
    return mask[0].nonzero().flatten().tolist()


def test_the_two_cycle_example() -> None:
    assert _example(max_cycle=0) == [1, 2]  # Wanda's mask, e = -1 + 2 = 1
    assert _example(max_cycle=1) == [1, 3]  # grow 2, prune 3: e = -4
    assert _example(max_cycle=2) == [0, 3]  # grow 1, prune 0: e = 1
    assert _example(max_cycle=50) != [1, 2]
    assert _example(threshold=10.0) == [1, 2]  # |e| = 1 <= 10: unchanged


def _naive_row(pruned, D, wanda, var, cycles, thr, p):
    """One row in plain Python, run for ``cycles`` cycles (the whole matrix's count)."""
    d, pruned = len(D), list(pruned)
    e = sum(D[j] for j in range(d) if pruned[j])
    G = [D[j] / var[j] ** p if pruned[j] else 0.0 for j in range(d)]
    grow = sorted(range(d), key=lambda j: G[j])
    kept = sorted((j for j in range(d) if not pruned[j]), key=lambda j: wanda[j])
    plist = [j for j in kept if D[j] < 0]
    plist += [kept[0]] * sum(D[j] == 0 for j in kept) + [j for j in kept if D[j] > 0][::-1]
    gf, gb, pf, pb, active = 0, d - 1, 0, len(plist) - 1, True
    for _ in range(cycles):
        if e > 0:
            r, gb = grow[gb], gb - 1
        else:
            r, gf = grow[gf], gf + 1
        if e < 0:
            q, pb = plist[pb], pb - 1
        else:
            q, pf = plist[pf], pf + 1
        active = active and abs(e) > thr
        pruned[q], pruned[r] = active, not active
        if active:
            e = e + D[q] - D[r]
    return pruned, active


def _random(d_out: int, d_in: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=gen)
    W[W.abs() < 0.05] = 0  # some D == 0 entries
    mean = torch.randn(d_in, generator=gen)
    var = torch.rand(d_in, generator=gen) + 0.1
    row_sq = torch.rand(d_in, generator=gen) * 4
    return W, W * mean, (W.abs() * row_sq.sqrt()), var


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layer_mask", [False, True])
def test_unstructured_matches_a_naive_row_loop(seed: int, layer_mask: bool) -> None:
    W, D, wanda, var = _random(12, 40, seed)
    score = torch.rand(12, 40, generator=torch.Generator().manual_seed(seed + 9))
    if layer_mask:  # rows with different counts (a per-layer initial mask)
        mask = score <= score.flatten().sort().values[240]
    else:
        mask = unstructured_row_mask(score, 0.5)
    for max_cycle, thr in ((6, 0.1), (6, 0.8), (12, 0.3)):
        got = dsnot_unstructured(mask, D, wanda, var, max_cycle, thr, 1.0)
        # the matrix runs until every row stopped: find that count, then rerun the rows with it
        stops = []
        for c in range(1, max_cycle + 1):
            rows = [
                _naive_row(
                    mask[i].tolist(), D[i].tolist(), wanda[i].tolist(), var.tolist(), c, thr, 1
                )
                for i in range(12)
            ]
            stops.append(any(active for _, active in rows))
        cycles = next((c + 1 for c, any_active in enumerate(stops) if not any_active), max_cycle)
        naive = [
            _naive_row(
                mask[i].tolist(), D[i].tolist(), wanda[i].tolist(), var.tolist(), cycles, thr, 1
            )[0]
            for i in range(12)
        ]
        assert got.tolist() == naive, (max_cycle, thr)


def test_per_row_sparsity_is_unchanged() -> None:
    W, D, wanda, var = _random(32, 256, 5)
    mask = unstructured_row_mask(wanda, 0.6)
    refined = dsnot_unstructured(mask, D, wanda, var, 50, 0.1, 1.0)
    assert not torch.equal(refined, mask)
    assert torch.equal(refined.sum(dim=1), mask.sum(dim=1))


def _naive_nm_row(pruned, D, initial, var, m, cycles, thr, p, ties=None):
    ties = [] if ties is None else ties
    d, pruned = len(D), list(pruned)
    e = sum(D[j] for j in range(d) if pruned[j])
    sign = (e > 0) - (e < 0)
    G = [D[j] / var[j] ** p if pruned[j] else 0.0 for j in range(d)]
    grow = sorted(range(d), key=lambda j: G[j])
    score = [float("inf") if pruned[j] else initial[j] for j in range(d)]
    gf, gb, active = 0, d - 1, True
    for _ in range(cycles):
        if e > 0:
            r, gb = grow[gb], gb - 1
        else:
            r, gf = grow[gf], gf + 1
        start = r - r % m
        group = torch.tensor(score[start : start + m]).reshape(1, -1)
        q = start + int(torch.topk(group, 1, dim=1, largest=False).indices)  # published tie rule
        ties.append(group.isinf().all().item())
        after = e + D[q] - D[r]
        active = active and sign == ((after > 0) - (after < 0)) and abs(e) > thr
        score[q] = float("inf")
        pruned[q], pruned[r] = active, not active
        if active:
            e = e + D[q] - D[r]
    return pruned, active


def test_nm_matches_a_naive_row_loop_and_stays_nm() -> None:
    W, D, wanda, var = _random(10, 32, 7)
    mask = nm_mask(wanda, 2, 4)
    for max_cycle in (1, 4, 50):
        got = dsnot_nm(mask, D, wanda, var, 4, max_cycle, 0.1, 1.0)
        cycles = max_cycle
        for c in range(1, max_cycle + 1):
            rows = [
                _naive_nm_row(
                    mask[i].tolist(), D[i].tolist(), wanda[i].tolist(), var.tolist(), 4, c, 0.1, 1
                )
                for i in range(10)
            ]
            if not any(active for _, active in rows):
                cycles = c
                break
        naive = [
            _naive_nm_row(
                mask[i].tolist(), D[i].tolist(), wanda[i].tolist(), var.tolist(), 4, cycles, 0.1, 1
            )[0]
            for i in range(10)
        ]
        assert got.tolist() == naive, max_cycle
        if max_cycle < 8:  # fewer cycles than pruned entries of one sign: N:M is kept
            assert (got.reshape(10, -1, 4).sum(dim=-1) == 2).all()
    W, D, wanda, var = _random(10, 256, 8)
    got = dsnot_nm(nm_mask(wanda, 2, 4), D, wanda, var, 4, 50, 0.1, 1.0)
    assert (got.reshape(10, -1, 4).sum(dim=-1) == 2).all()


def test_nm_group_with_every_score_used_is_broken_as_published() -> None:
    """A narrow row runs out of pruned weights of one sign: the grow pointer walks into groups
    whose kept entries are all used (+inf), and the pick among them is topk's, not the first."""
    W, D, wanda, var = _random(6, 8, 3)
    mask = nm_mask(wanda, 2, 4)
    got = dsnot_nm(mask, D, wanda, var, 4, 8, -1.0, 1.0)  # threshold < 0: rows never settle
    ties: list[bool] = []
    naive = [
        _naive_nm_row(mask[i].tolist(), D[i].tolist(), wanda[i].tolist(), var.tolist(), 4, 8,
                      -1.0, 1, ties)[0]
        for i in range(6)
    ]  # fmt: skip
    assert any(ties)  # the case occurred
    assert got.tolist() == naive
    group = torch.full((1, 4), float("inf"))
    assert int(torch.topk(group, 1, dim=1, largest=False).indices) != int(group.argmin())


def test_mlp_keeps_the_initial_mask_unless_all_layers() -> None:
    W, _, _, var = _random(8, 64, 3)
    mean = torch.randn(64, generator=torch.Generator().manual_seed(4))
    stats = LinearStats(row_sq_norms=torch.ones(64), mean=mean, var=var)
    wanda = build_method("wanda")
    for name, layers, changed in (
        ("model.layers.0.mlp.down_proj", "attention", False),
        ("model.layers.0.mlp.down_proj", "all", True),
        (Q, "attention", True),
    ):
        initial = wanda.select(wanda.score(name, W, stats), Sparsity(0.5))
        linear = nn.Linear(64, 8, bias=False)
        linear.weight.data = W.clone()
        pruner = DSnoTPruner(layers=layers, max_cycle=8)  # fewer than the pruned of one sign
        mask = pruner.prune_linear(name, linear, stats, Sparsity(0.5))
        assert (not torch.equal(mask, initial)) == changed, (name, layers)
        assert torch.equal(mask.sum(dim=1), initial.sum(dim=1))


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="method.layers='mlp' is not allowed: choose one of"):
        build_method("dsnot", layers="mlp")
    with pytest.raises(Exception, match="not an option"):
        DSnoTPruner(initial="wanda", initial_options={"nope": 1})
    with pytest.raises(ValueError, match="score method"):
        DSnoTPruner(initial="dense")
    with pytest.raises(ValueError, match="percdamp"):
        DSnoTPruner(initial="sparsegpt", initial_options={"blocksize": 64})
    assert build_method("dsnot").max_cycle == 50
    assert build_method("dsnot", initial="gblm").label == "dsnot(gblm)"
    assert DSnoTPruner(initial="magnitude").inner.comparison_group == "row"  # published
    assert DSnoTPruner(initial="magnitude", comparison_group=None).inner.comparison_group == "layer"


INITIALS = {
    "magnitude": {},
    "wanda": {},
    "gblm": {"norm": "l2"},
    "ria": {"a": 1.0},
    "sparsegpt": {},
}


@pytest.mark.parametrize("initial", list(INITIALS))
@pytest.mark.parametrize("nm", [False, True])
def test_dsnot_after_every_method_on_a_tiny_model(initial: str, nm: bool) -> None:
    torch.set_num_threads(1)
    model = build_tiny_model(tiny_config("llama", vocab_size=256), seed=0)
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    context = RunContext(device=torch.device("cpu"), model_dtype=torch.float32, progress=False)
    method = build_method(
        "dsnot", initial=initial, initial_options=INITIALS[initial], max_cycle=8, layers="all"
    )
    method.prepare(model, windows, context)
    sparsity = Sparsity(0.5, 2, 4) if nm else Sparsity(0.5)
    masks = prune_model(model, method, sparsity, windows, device="cpu", progress=False)
    for name in masks:
        mask = masks[name]
        if nm:
            assert (mask.reshape(mask.shape[0], -1, 4).sum(dim=-1) == 2).all(), name
        else:
            assert (mask.sum(dim=1) == mask.shape[1] // 2).all(), name
    if initial == "sparsegpt":  # the Hessian is accumulated: not simply the first k columns
        first = torch.zeros_like(mask)
        first[:, : mask.shape[1] // 2] = True
        assert not torch.equal(mask, first)
