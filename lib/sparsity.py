"""Sparsity patterns and the one routine that turns importance scores into a pruning mask.

Every method (magnitude, Wanda, SparseGPT's blocks, the Optspa metric) ends here: it computes a score per
weight and asks :func:`prune_mask` which weights to drop. Masks are boolean with True = pruned, as in Wanda.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparsityType:
    """``unstructured`` (n = m = 0) or N:M: prune ``n`` weights in every ``m`` consecutive inputs (Wanda's
    convention, so the ratio of an N:M pattern is n/m: 2:4 and 4:8 are both 50%)."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def ratio(self) -> float:
        return self.n / self.m if self.m else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    @classmethod
    def parse(cls, text: str) -> "SparsityType":
        if text == "unstructured":
            return cls()
        parts = text.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"sparsity type '{text}' is neither 'unstructured' nor N:M (e.g. 2:4)")
        n, m = int(parts[0]), int(parts[1])
        if m < 1 or not 0 < n < m:
            raise ValueError(f"sparsity type '{text}': need 0 < N < M")
        return cls(n, m)


def prune_mask(score: torch.Tensor, ratio: float, pattern: SparsityType, scope: str = "row") -> torch.Tensor:
    """Boolean mask (True = prune) of the lowest-scoring weights of a ``[rows, cols]`` score matrix.

    N:M: in every group of ``m`` consecutive columns of a row, the ``n`` lowest (``ratio`` is implied).
    Unstructured, ``scope="row"``: exactly ``int(cols * ratio)`` per output row (Wanda's comparison group).
    Unstructured, ``scope="matrix"``: exactly ``int(numel * ratio)`` over the whole matrix (magnitude).
    Ties break by position (stable sort), so the result is deterministic.
    """
    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if pattern.structured:
        if cols % pattern.m:
            raise ValueError(f"{pattern} sparsity needs the input dimension ({cols}) to be a multiple of {pattern.m}")
        groups = score.reshape(rows, cols // pattern.m, pattern.m)
        # A stable sort, not topk: topk returns tied entries in no promised order.
        idx = torch.sort(groups, dim=-1, stable=True).indices[..., : pattern.n]
        return mask.reshape(rows, cols // pattern.m, pattern.m).scatter_(-1, idx, True).reshape(rows, cols)
    if scope == "row":
        k = int(cols * ratio)
        if k:
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            mask.scatter_(1, idx, True)
        return mask
    if scope == "matrix":
        k = int(score.numel() * ratio)
        flat = score.flatten()
        if k and torch.isnan(flat).any():  # the sort puts NaN last; selection below assumes none
            mask.view(-1)[torch.sort(flat, stable=True).indices[:k]] = True
        elif k:
            # The stable sort's first k, found by selection (SparseGPT masks every block this way: a sort of the
            # whole block was a third of its time): all below the k-th value, then the first ties by position.
            kth = torch.kthvalue(flat, k).values
            below = flat < kth
            ties = (flat == kth).nonzero().flatten()[: k - int(below.sum())]
            mask.view(-1).copy_(below).index_fill_(0, ties, True)
        return mask
    raise ValueError(f"unknown scope {scope!r}")


def wanda_variant_mask(score: torch.Tensor, ratio: float, tol: float = 0.001) -> torch.Tensor:
    """Wanda's ``--use_variant``: per row, prune the lowest scores whose cumulative sum stays under
    ``alpha`` times the row's total, with ``alpha`` bisected until the matrix sparsity is within ``tol``.
    """
    sorted_scores, _ = torch.sort(score, dim=1, stable=True)
    cumsum = torch.cumsum(sorted_scores, dim=1)
    row_total = score.sum(dim=1, keepdim=True)

    def mask_for(alpha: float) -> torch.Tensor:
        count = (cumsum <= row_total * alpha).sum(dim=1, keepdim=True)
        # The threshold is the largest score inside the budget; a row with none prunes nothing.
        thresh = torch.gather(sorted_scores, 1, (count - 1).clamp_min(0))
        return (score <= thresh) & (count > 0)

    lo, hi, alpha = 0.0, 0.8, 0.4
    mask = mask_for(alpha)
    cur = mask.float().mean().item()
    while abs(cur - ratio) > tol and hi - lo >= tol:
        if cur > ratio:
            hi, alpha = alpha, (alpha + lo) / 2
        else:
            lo, alpha = alpha, (alpha + hi) / 2
        mask = mask_for(alpha)
        cur = mask.float().mean().item()
    return mask


def optspa_score(weight: torch.Tensor, act_sq_mean: torch.Tensor) -> torch.Tensor:
    """The Optspa metric, in fp32:

        S_ij = log(1 + |W_ij| / ||W_i,:||_2 + |W_ij| / ||W_:,j||_2) * s_j^(1/4)

    with ``act_sq_mean`` = s_j, the mean over calibration tokens of x_j^2. An all-zero row or column has
    zero entries only, so its ratio is defined as 0 rather than 0/0.
    """
    w = weight.float().abs()
    row = w.norm(dim=1, keepdim=True)
    col = w.norm(dim=0, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    rel = w / row.clamp_min(tiny) + w / col.clamp_min(tiny)
    return torch.log1p(rel) * act_sq_mean.float().clamp_min(0).pow(0.25).reshape(1, -1)


def wanda_score(weight: torch.Tensor, act_sq_mean: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, up to a constant per matrix (which leaves every per-row ranking unchanged)."""
    return weight.float().abs() * act_sq_mean.float().clamp_min(0).sqrt().reshape(1, -1)
