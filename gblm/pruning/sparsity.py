"""The target sparsity of one Linear: a ratio, unstructured or N:M."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sparsity:
    """Target sparsity: ``ratio`` in [0, 1); ``n:m`` = ``0:0`` for unstructured."""

    ratio: float
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"sparsity.ratio={self.ratio}: must lie in [0, 1).")
        if (self.n == 0) != (self.m == 0):
            raise ValueError(
                f"sparsity.n={self.n}, sparsity.m={self.m}: set both (N:M) or neither."
            )
        if self.structured and not 0 < self.n < self.m:
            raise ValueError(f"sparsity.n={self.n}, sparsity.m={self.m}: N:M needs 0 < N < M.")
        if self.structured and abs(self.ratio - self.n / self.m) > 1e-9:
            raise ValueError(
                f"sparsity.ratio={self.ratio} with N:M {self.n}:{self.m}: the ratio must equal "
                f"N/M = {self.n / self.m:g} (set sparsity.ratio={self.n / self.m:g})."
            )

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.ratio:g}"

    def target(self, block: int, name: str) -> Sparsity:
        """One target is the uniform plan: every Linear of every block gets it."""
        return self
