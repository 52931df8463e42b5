"""Mask selection: the one place for unstructured (per row, per layer) and N:M selection.

Every score method hands its score matrix (d_out, d_in) here; True in a mask means pruned.

- ``row``: in every output row prune the ``int(d_in * ratio)`` lowest scores; ties are broken by
  a stable sort, so the lower column index is pruned first (Wanda / GBLM-Pruner).
- ``layer``: one threshold over the whole matrix, ``t = sort(score)[int(numel * ratio)]``, prune
  ``score <= t`` (the published magnitude rule; ties at ``t`` may overshoot slightly).
- N:M: every row is cut into groups of M consecutive columns; the N lowest of each are pruned.
- :func:`variant_mask` is Wanda's appendix variant: per row, prune the entries whose cumulative
  sorted score stays under ``alpha`` times the row sum, alpha found by bisection.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

COMPARISON_GROUPS = ("row", "layer")


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest entry (1-based) of every row of ``values`` (rows, n): (rows, 1).

    A selection, not a full sort. On the CPU, NumPy's SIMD sort of short fp32 arrays is the
    fastest primitive there is (about 1.2 ns per entry up to 512 entries, 4-6 ns beyond), so
    rows are cut into sorted runs of 512 and the answer is read off them
    (:func:`_sorted_runs_select`); a single long row (a whole layer) is first narrowed down by a
    sample (:func:`_bracketed_kth`). fp16 and bf16 rows are widened to fp32 (exactly) for it,
    fp64 rows take NumPy's introselect (``np.partition``), other devices ``torch.kthvalue``. All
    give the same value, in the dtype of ``values``; callers keep NaN away (its rank differs
    between them).
    """
    if values.device.type != "cpu" or values.dtype not in _SELECT_DTYPES:
        return torch.kthvalue(values, k, dim=1, keepdim=True).values
    rows, n = values.shape
    if values.dtype == torch.float64:
        kth = np.partition(values.detach().numpy(), k - 1, axis=1)[:, k - 1 : k]
        return torch.from_numpy(np.ascontiguousarray(kth))
    wide = values.detach().float().numpy()
    if rows == 1:
        kth = torch.tensor([[_flat_kth(wide.reshape(-1), k)]])
    else:
        kth = torch.from_numpy(_sorted_runs_select(wide, k)[0]).reshape(rows, 1)
    return kth.to(values.dtype)  # exact: the value is one of the entries


def _flat_kth(flat: np.ndarray, k: int) -> np.float32:
    """The ``k``-th smallest of a 1-D fp32 array: a sampled bracket when long, else sorted runs."""
    if flat.size >= _BRACKET_MIN:
        return _bracketed_kth(flat, k)
    return _sorted_runs_select(flat.reshape(1, -1), k)[0][0]


@functools.lru_cache(maxsize=64)
def _sample_positions(n: int, m: int) -> np.ndarray:
    """``m`` positions in [0, n) drawn with a fixed seed; kept, since a model has few shapes."""
    positions = np.random.default_rng(0).integers(n, size=m)
    positions.flags.writeable = False
    return positions


_SELECT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_BRACKET_MIN = 1 << 13  # shorter single rows: the sorted runs are as fast
_RUN = 512  # NumPy's fp32 sort is a SIMD network up to this length (x86-simd-sort)


def _sorted_runs_select(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The ``k``-th and ``k + 1``-th smallest (1-based) of every row of a (rows, n) fp32 array.

    Returns:
        ``(kth, following, has_nan)``: (rows,) each; ``following`` is +inf where there is no
        ``k + 1``-th entry (and may be +inf where it equals +inf): a row has ties at its k-th
        value beyond rank k exactly where ``following == kth``. With a NaN anywhere (sorted last
        in every run) only ``has_nan`` is meaningful.

    A row of up to 512 entries is sorted whole. A longer one is cut into ``m`` runs of 512
    consecutive columns (the last one shorter) and each run is sorted. Then every ``s``-th entry
    of each sorted run is a sample (``s`` = 8, or 16 past 8 runs), and the samples bound ranks:

    - in a run, ``c`` samples below ``v`` put at least ``c * s`` entries at or below ``v`` and,
      the next sample being at or above ``v``, at most ``c * s + s - 1`` strictly below it;
    - so over the row, the sample ``lo`` at rank ``(k - 1 - m (s - 1)) // s`` of the sorted samples
      has fewer than ``k`` entries below it, and the sample ``hi`` at rank ``ceil(k / s) - 1`` has
      ``k`` or more at or below it: the answer lies in [lo, hi].

    Every run's entries in [lo, hi] are a contiguous stretch of it (found by binary search); the
    answer is the entry of rank ``k - #(entries < lo)`` among them, gathered and sorted. About
    ``2 m s`` entries per row, a few percent of it. The ``k + 1``-th smallest, when it ties with
    the k-th, lies in [lo, hi] too, so it is read off the same sorted stretch.
    """
    rows, n = values.shape
    nothing = np.full(rows, np.inf, values.dtype)
    if n <= _RUN:
        ordered = values.copy()
        ordered.sort(axis=1)
        if np.isnan(ordered[:, -1]).any():
            return ordered[:, k - 1], nothing, True
        return ordered[:, k - 1], ordered[:, k] if k < n else nothing, False
    full, rest = divmod(n, _RUN)
    runs: list[np.ndarray] = []  # (rows, count, length) each, every length-axis sorted
    if full:
        block = np.array(values[:, : full * _RUN]).reshape(rows, full, _RUN)
        block.sort(axis=2)
        runs.append(block)
    if rest:
        tail = np.array(values[:, full * _RUN :]).reshape(rows, 1, rest)
        tail.sort(axis=2)
        runs.append(tail)
    if any(np.isnan(run[:, :, -1]).any() for run in runs):
        return nothing, nothing, True
    count = full + (rest > 0)
    stride = 8 if count <= 8 else 16
    samples = np.concatenate(
        [run[:, :, stride - 1 :: stride].reshape(rows, -1) for run in runs], axis=1
    )  # (rows, about n / stride)
    samples.sort(axis=1)
    rank_lo = (k - 1 - count * (stride - 1)) // stride
    rank_hi = -(-k // stride) - 1
    lo = samples[:, rank_lo] if rank_lo >= 0 else np.full(rows, -np.inf, values.dtype)
    hi = samples[:, rank_hi] if rank_hi < samples.shape[1] else nothing

    def stretch(run: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row and run: entries below ``lo``, and entries in [lo, hi]: (rows, runs) each."""
        sorted_rows = torch.from_numpy(run.reshape(-1, run.shape[2]))
        per = run.shape[1]
        bounds = [torch.from_numpy(np.repeat(b, per).reshape(-1, 1)) for b in (lo, hi)]
        below = torch.searchsorted(sorted_rows, bounds[0], right=False).numpy().reshape(rows, per)
        upto = torch.searchsorted(sorted_rows, bounds[1], right=True).numpy().reshape(rows, per)
        return below, upto - below

    found = [stretch(run) for run in runs]
    below = sum(first.sum(axis=1) for first, _ in found)  # (rows,) entries < lo
    band = int(max(width.max() for _, width in found))
    offsets = np.arange(band)
    gathered = []
    for run, (first, width) in zip(runs, found):
        index = np.minimum(first[..., None] + offsets, run.shape[2] - 1)  # (rows, runs, band)
        taken = np.take_along_axis(run, index, axis=2)
        gathered.append(np.where(offsets < width[..., None], taken, np.inf).reshape(rows, -1))
    candidates = np.concatenate(gathered, axis=1)  # (rows, runs * band)
    candidates.sort(axis=1)
    at = np.arange(rows)
    after = k - below  # where the k + 1-th smallest sits, when it is in the stretch
    following = candidates[at, np.minimum(after, candidates.shape[1] - 1)]
    following = np.where(after < candidates.shape[1], following, np.inf)
    return candidates[at, k - 1 - below], following, False


def _bracketed_kth(flat: np.ndarray, k: int) -> np.float32:
    """The ``k``-th smallest of a long 1-D fp32 array, partitioning only a narrow band of it.

    A fixed-seed sample (about ``8 sqrt(n)`` entries) brackets the wanted rank within about four
    standard deviations of the sampling error, [lo, hi]; one pass counts the entries below
    ``lo`` and picks those in [lo, hi] (a few percent), and the answer is the right rank among
    those. The counts prove the bracket holds (exactly ``below`` entries precede it); when it
    does not, the whole tensor is partitioned. Same value as a full sort, 2-3x faster than a
    partition of the whole.
    """
    n = flat.size
    m = min(1 << 14, max(1 << 10, 1 << round(math.log2(8.0 * math.sqrt(n)))))
    sample = np.sort(flat[_sample_positions(n, m)])  # (m,)
    q = (k - 0.5) / n
    spread = 4.0 * math.sqrt(m * q * (1.0 - q)) + 2.0
    lo = sample[max(0, math.floor(q * m - spread))]
    hi = sample[min(m - 1, math.ceil(q * m + spread))]
    below = int(np.count_nonzero(flat < lo))
    band = flat[(flat >= lo) & (flat <= hi)]  # ranks below + 1, below + 2, ... in some order
    rank = k - below  # 1-based, within the band
    if 1 <= rank <= band.size:
        return np.partition(band, rank - 1)[rank - 1]
    return np.partition(flat, k - 1)[k - 1]


def zero_masked_(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight[mask] = 0`` in place, writing exactly +0.0: the raw bits times ``~mask``.

    Multiplying the integer view by the kept entries is the same as a masked fill, bit for bit,
    and on a CPU about 15x faster than ``masked_fill_`` / boolean indexing.
    """
    bits = _SAME_SIZE_INT.get(weight.dtype)
    if bits is None:
        weight[mask] = 0
    else:
        weight.view(bits).mul_(mask.logical_not())
    return weight


_SAME_SIZE_INT = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


def _has_nan(score: Tensor) -> bool:
    """Whether ``score`` has a NaN: a sum (NaN if any entry is) first, the exact test only then."""
    return not bool(torch.isfinite(score.sum())) and bool(torch.isnan(score).any())


def _row_threshold(score: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """Every row's k-th smallest score (d_out, 1) and the rows where more entries tie with it
    (indices), or None when the score has a NaN. On the CPU both come out of one selection
    (:func:`_sorted_runs_select`), elsewhere from ``kthvalue`` and a count."""
    if score.device.type == "cpu" and score.dtype in _WIDENED_DTYPES:
        kth, following, has_nan = _sorted_runs_select(score.detach().float().numpy(), k)
        if has_nan:
            return None
        crowded = torch.from_numpy(np.flatnonzero(following == kth))
        return torch.from_numpy(kth).reshape(-1, 1).to(score.dtype), crowded
    if _has_nan(score):
        return None
    kth = kth_smallest(score, k).to(score.device)  # (d_out, 1)
    # int32 counts: a bool sum to int64 widens the whole mask first (5x slower, new pages)
    counts = (score <= kth).sum(dim=1, dtype=torch.int32)
    return kth, (counts > k).nonzero().squeeze(1)


_WIDENED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unstructured_row_mask(score: Tensor, ratio: float) -> Tensor:
    """Prune the ``int(d_in * ratio)`` lowest entries of every row (stable sort).

    The mask is exactly the first ``k`` entries of a stable ascending sort of each row, found
    without sorting: every entry up to the row's k-th smallest value; in the rare row where
    several entries tie at that value, the ties in column order until the row has ``k``. A
    selection is O(d_in) per row against the sort's O(d_in log d_in): 5-10x faster on a CPU. A
    score with NaN takes the sort (which orders NaN last), so the result never depends on the
    path.
    """
    k = int(score.shape[1] * ratio)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    found = _row_threshold(score, k)
    if found is None:  # NaN in the score
        order = torch.sort(score, dim=-1, stable=True)[1]  # (d_out, d_in)
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order[:, :k], True)
    kth, crowded = found  # (d_out, 1), indices of the rows with ties beyond rank k
    mask = score <= kth  # (d_out, d_in): k entries per row, more where ties at kth
    if crowded.numel():  # keep the lowest columns among the ties
        rows, row_kth = score[crowded], kth[crowded]
        below = rows < row_kth
        ties = rows == row_kth
        wanted = k - below.sum(dim=1, keepdim=True, dtype=torch.int32)  # ties to take, >= 1
        mask[crowded] = below | (ties & (ties.cumsum(dim=1) <= wanted))
    return mask


def unstructured_layer_mask(score: Tensor, ratio: float) -> Tensor:
    """Prune every entry at or below the ``int(numel * ratio)``-th smallest score."""
    k = int(score.numel() * ratio)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    values = score.reshape(1, -1).float()
    # the (k+1)-th smallest (1-based) is sorted(score)[k]
    if score.device.type == "cpu":
        # all in NumPy: for the small layers of small models the per-call cost is the cost
        flat = values.detach().numpy().reshape(-1)
        if not (np.isnan(flat.sum()) and np.isnan(flat).any()):
            return torch.from_numpy(flat.reshape(score.shape) <= _flat_kth(flat, k + 1))
    # elsewhere, or with NaN (which kthvalue ranks last)
    return score.float() <= torch.kthvalue(values, k + 1).values


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """In every group of ``m`` consecutive columns of each row, prune the ``n`` lowest."""
    d_out, d_in = score.shape
    if d_in % m:
        raise ValueError(f"N:M {n}:{m} needs the input width ({d_in}) to be a multiple of M.")
    groups = score.float().reshape(d_out, d_in // m, m)  # (d_out, groups, m)
    lowest = torch.topk(groups, n, dim=-1, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
    return mask.reshape(d_out, d_in)


def select_mask(score: Tensor, ratio: float, n: int = 0, m: int = 0, group: str = "row") -> Tensor:
    """Dispatch on the sparsity pattern: N:M when ``m > 0``, else unstructured by ``group``."""
    if m > 0:
        return nm_mask(score, n, m)
    if group == "row":
        return unstructured_row_mask(score, ratio)
    if group == "layer":
        return unstructured_layer_mask(score, ratio)
    raise ValueError(
        f"comparison_group={group!r}: allowed values are {', '.join(COMPARISON_GROUPS)}."
    )


def _mask_for_alpha(
    score: Tensor, sorted_score: Tensor, cumsum: Tensor, row_sum: Tensor, alpha: float
) -> Tensor:
    under = cumsum <= (row_sum * alpha).reshape(-1, 1)  # (d_out, d_in)
    count = under.sum(dim=1, keepdim=True)  # entries per row under the budget
    threshold = torch.gather(sorted_score, 1, (count - 1).clamp(min=0))
    threshold = torch.where(count > 0, threshold, torch.full_like(threshold, -torch.inf))
    return score <= threshold


def variant_mask(score: Tensor, ratio: float, tolerance: float = 0.001) -> Tensor:
    """Wanda's variant: bisection on alpha in [0, 0.8] from 0.4 until sparsity is within 0.001."""
    sorted_score = torch.sort(score, dim=-1, stable=True)[0]
    cumsum = torch.cumsum(sorted_score, dim=1)
    row_sum = score.sum(dim=1)
    alpha, low, high = 0.4, 0.0, 0.8
    mask = _mask_for_alpha(score, sorted_score, cumsum, row_sum, alpha)
    achieved = mask.float().mean().item()
    while abs(achieved - ratio) > tolerance and high - low >= 0.001:
        if achieved > ratio:
            alpha, high = (alpha + low) / 2.0, alpha
        else:
            alpha, low = (alpha + high) / 2.0, alpha
        mask = _mask_for_alpha(score, sorted_score, cumsum, row_sum, alpha)
        achieved = mask.float().mean().item()
    return mask
