"""SparseGPT (Frantar & Alistarh, 2023): prune one linear layer and update its remaining weights by the
optimal brain surgeon rule, block by block, using the inverse Hessian of the layer's inputs.

The mask of each block comes from :func:`lib.sparsity.prune_mask` (the tool's one mask routine) applied to
the OBS saliency ``w^2 / [H^-1]_jj^2``: exactly ``int(numel * ratio)`` weights of each ``blocksize``-column
block (the adaptive mask selection of the paper), or ``n`` of every ``m`` columns for N:M.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .sparsity import SparsityType, prune_mask


class SharedInputs:
    """Linears that read one input tensor (q, k, v; gate, up) see it one after another in a forward pass. The
    first accumulates ``X X^T``; a linear that has seen the same inputs as that one on every batch copies its
    ``H`` (the same sums, bit for bit) instead of computing them again: a third of the Hessian work on a LLaMA
    layer. One instance serves any number of solvers; inputs are compared exactly, so sharing never guesses."""

    def __init__(self):
        self.last: tuple[torch.Tensor, "SparseGPT"] | None = None  # the last input accumulated, and by whom

    def copied(self, solver: "SparseGPT", inp: torch.Tensor) -> bool:
        last = self.last
        if last is None or solver.twin is False or solver.twin not in (None, last[1]) \
                or last[1].nsamples != solver.nsamples + inp.shape[0] or last[0].shape != inp.shape \
                or not torch.equal(last[0], inp):
            solver.twin = False  # from now on it accumulates its own
            return False
        solver.H.copy_(last[1].H)
        solver.nsamples, solver.twin = last[1].nsamples, last[1]
        return True


class SparseGPT:
    """Accumulates ``H = 2 X X^T / nsamples`` for one ``nn.Linear`` and prunes it in place."""

    def __init__(self, layer: nn.Linear, shared: SharedInputs | None = None):
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H: torch.Tensor | None = torch.zeros(
            (self.columns, self.columns), device=layer.weight.device, dtype=torch.float32
        )
        self.nsamples = 0
        self.shared = shared
        self.twin: SparseGPT | bool | None = None  # the solver whose H it copies (False: none, for good)

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """``inp``: the layer's input ``[batch, tokens, columns]`` (or ``[tokens, columns]``)."""
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        if self.shared is not None and self.shared.copied(self, inp):
            return
        batch = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t().float()
        # Running mean over samples, as the reference implementation (one calibration window = one sample).
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x @ x.t()
        if self.shared is not None:
            self.shared.last = (inp, self)

    @torch.no_grad()
    def fasterprune(
        self, sparsity: float, pattern: SparsityType = SparsityType(), blocksize: int = 128, percdamp: float = 0.01
    ) -> torch.Tensor:
        """Prune the layer to ``sparsity`` and return the boolean mask (True = pruned)."""
        H = self.H
        self.H = None
        Hinv, dead = inverse_factor(H, percdamp)
        W = self.layer.weight.data.clone().float()
        mask = obs_prune(W, Hinv, dead, sparsity, pattern, blocksize)
        self.layer.weight.data = W.to(self.layer.weight.dtype)
        return mask

    def free(self) -> None:
        self.H = None


@torch.no_grad()
def inverse_factor(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of the damped ``H^-1`` (row i: the OBS update for column i given the columns
    after it) and the dead inputs (never active in calibration). ``H`` is modified in place. It does not depend
    on the sparsity, so oneshot trials compute it once per module."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead


@torch.no_grad()
def obs_prune(W: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, sparsity: float,
              pattern: SparsityType = SparsityType(), blocksize: int = 128) -> torch.Tensor:
    """SparseGPT's blocked OBS pass on ``W`` (float32, modified in place) with the factor of
    :func:`inverse_factor`; returns the boolean mask (True = pruned)."""
    rows, columns = W.shape
    W[:, dead] = 0
    mask = torch.zeros_like(W, dtype=torch.bool)
    if pattern.structured:
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)  # N:M groups never straddle blocks
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if not pattern.structured:
            mask1 = prune_mask(W1**2 / d.reshape(1, -1) ** 2, sparsity, pattern, scope="matrix")
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                # N:M saliency uses the weights as updated so far, as in the paper.
                cols = slice(i, i + pattern.m)
                score = W1[:, cols] ** 2 / d[cols].reshape(1, -1) ** 2
                mask1[:, cols] = prune_mask(score, pattern.ratio, pattern)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    # Dead inputs were zeroed above whatever the saliency chose, so the mask records them too: the saved mask
    # and the pruned model must agree.
    mask[:, dead] = True
    return mask
