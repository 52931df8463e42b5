"""The ADMM weight update of a given mask: a naive float64 reference, its fixed point, invariants."""

from __future__ import annotations

import torch

from gblm.pruning.admm import admm_update

D_OUT, D_IN, N, T = 5, 24, 4, 12


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight (d_out, d_in), X^T X summed over windows (d_in, d_in), a random mask."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_OUT, D_IN, generator=gen)
    mixing = torch.eye(D_IN) + 0.4 * torch.randn(D_IN, D_IN, generator=gen)
    scales = torch.rand(D_IN, generator=gen) * 3 + 0.1
    x = (torch.randn(N, T, D_IN, generator=gen) @ mixing) * scales
    gram = torch.zeros(D_IN, D_IN)
    for window in x:
        gram += window.T @ window
    mask = torch.rand(D_OUT, D_IN, generator=gen) < 0.5
    return weight, gram, mask


def _naive_admm(weight, gram, mask, iters=20, rho=1.0, percdamp=0.1):
    """The published iteration written with explicit matrices, in float64, one output at a time."""
    XX = gram.double()
    d_in = XX.shape[0]
    norm = [XX[j, j].sqrt().item() + 1e-8 for j in range(d_in)]
    Dinv = torch.diag(torch.tensor([1 / v for v in norm], dtype=torch.float64))
    A = Dinv @ XX @ Dinv
    A = A + percdamp * A.diagonal().mean() * torch.eye(d_in, dtype=torch.float64)
    out = torch.zeros(weight.shape, dtype=torch.float64)
    for r in range(weight.shape[0]):
        w0 = torch.tensor([weight[r, j].item() * norm[j] for j in range(d_in)], dtype=torch.float64)
        keep = (~mask[r]).double()
        b = A @ w0
        w, u = w0.clone(), torch.zeros(d_in, dtype=torch.float64)
        for _ in range(iters):
            z = (w + u) * keep
            u = u + w - z
            w = torch.linalg.solve(
                A + rho * torch.eye(d_in, dtype=torch.float64), b + rho * (z - u)
            )
        z = (w + u) * keep
        out[r] = torch.tensor([z[j].item() / norm[j] for j in range(d_in)], dtype=torch.float64)
    return out


def _restricted_least_squares(weight, gram, mask, percdamp=0.1):
    """The fixed point: per output, min (w - w0)^T A (w - w0) over w on the kept inputs, where A
    is the normalised, dampened X^T X (float64)."""
    XX = gram.double()
    norm = XX.diagonal().sqrt() + 1e-8
    A = XX / norm / norm[:, None]
    A = A + percdamp * A.diagonal().mean() * torch.eye(A.shape[0], dtype=torch.float64)
    out = torch.zeros(weight.shape, dtype=torch.float64)
    for r in range(weight.shape[0]):
        w0 = weight[r].double() * norm
        kept = (~mask[r]).nonzero().flatten()
        w = torch.zeros_like(w0)
        w[kept] = torch.linalg.solve(A[kept][:, kept], (A @ w0)[kept])
        out[r] = w / norm
    return out


def test_matches_the_naive_iteration():
    weight, gram, mask = _problem(0)
    updated = admm_update(weight, gram, mask)
    expected = _naive_admm(weight, gram, mask)
    assert torch.allclose(updated.double(), expected, rtol=1e-4, atol=1e-5)
    assert bool((updated[mask] == 0).all())


def test_converges_to_the_restricted_least_squares():
    weight, gram, mask = _problem(1)
    updated = admm_update(weight, gram, mask, iters=400)
    assert torch.allclose(
        updated.double(), _restricted_least_squares(weight, gram, mask), atol=1e-4
    )


def test_nothing_pruned_is_a_fixed_point():
    weight, gram, _ = _problem(2)
    updated = admm_update(weight, gram, torch.zeros(D_OUT, D_IN, dtype=torch.bool))
    assert (updated - weight).abs().max() < 1e-3  # fp32 rounding of the inverse


def test_lowers_the_output_error():
    weight, gram, mask = _problem(3)
    updated = admm_update(weight, gram, mask)

    def error(w):  # ||X (w - weight)^T||^2 from the summed X^T X
        d = (w - weight).double()
        return torch.einsum("ri,ij,rj->", d, gram.double(), d).item()

    assert error(updated) < 0.7 * error(weight * ~mask)


def test_inputs_not_modified_and_dtype_kept():
    weight, gram, mask = _problem(4)
    w0, g0 = weight.clone(), gram.clone()
    updated = admm_update(weight.half(), gram, mask, iters=3)
    assert updated.dtype == torch.float16
    assert torch.equal(weight, w0) and torch.equal(gram, g0)
