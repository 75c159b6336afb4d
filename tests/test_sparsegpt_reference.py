"""lib/sparsegpt.py against the published SparseGPT.

``ReferenceSparseGPT`` below is a line-by-line port of ``SparseGPT.add_batch`` and ``SparseGPT.fasterprune``
from github.com/IST-DASLab/sparsegpt (sparsegpt.py, commit 147d215), kept in the test on purpose: lib must
never import it. Only what the tool does not use is left out (Conv1D/Conv2d reshapes, the quantizer, the
DEBUG prints, the timing print, ``torch.cuda.synchronize``), and one line is added: the port also returns
the mask it built (``mask_out``), which the original keeps local.

One documented difference (README, "Two deliberate differences"): the original's unstructured threshold
``tmp <= sort(tmp)[int(numel * sparsity)]`` prunes ``int(numel * sparsity) + 1`` weights per block, the tool
exactly ``int(numel * ratio)``. The test asks the reference for one weight fewer (a sparsity whose
``int(numel * s)`` is ``k - 1``), so both prune ``k`` per block and the results must be identical.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lib.sparsegpt import SparseGPT
from lib.sparsity import SparsityType, prune_mask


class ReferenceSparseGPT:
    def __init__(self, layer):
        self.layer = layer
        self.dev = self.layer.weight.device
        W = layer.weight.data.clone()
        self.rows = W.shape[0]
        self.columns = W.shape[1]
        self.H = torch.zeros((self.columns, self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp, out, blocksize=1024):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01):
        W = self.layer.weight.data.clone()
        W = W.float()

        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        Losses = torch.zeros(self.rows, device=self.dev)

        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns, device=self.dev)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H

        mask = None
        mask_out = torch.zeros_like(W, dtype=torch.bool)  # added: the port returns the mask it used

        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1

            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            if prunen == 0:
                if mask is not None:
                    mask1 = mask[:, i1:i2]
                else:
                    tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1

            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]

                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)

                q = w.clone()
                q[mask1[:, i]] = 0

                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d ** 2

                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1

            W[:, i1:i2] = Q1
            Losses += torch.sum(Losses1, 1) / 2
            mask_out[:, i1:i2] = mask1  # added

            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)
        return mask_out

    def free(self):
        self.H = None


ROWS, COLS, BLOCK = 24, 256, 128
DEAD = [5, 64, 65, 66, 200]  # 64..66: three dead inputs in one 4-group, more than 2:4 would prune there


def _layer_and_batches(seed: int):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(COLS, ROWS, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(ROWS, COLS, generator=gen))
    batches = []
    for _ in range(3):
        x = torch.randn(2, 40, COLS, generator=gen) * torch.rand(COLS, generator=gen)  # unequal column scales
        x[..., DEAD] = 0
        batches.append(x)
    return layer, batches


def _both(pattern: SparsityType, ratio: float, ref_sparsity: float, seed: int):
    layer, batches = _layer_and_batches(seed)
    ref_layer, lib_layer = copy.deepcopy(layer), copy.deepcopy(layer)
    ref, lib = ReferenceSparseGPT(ref_layer), SparseGPT(lib_layer)
    for x in batches:
        ref.add_batch(x, None)
        lib.add_batch(x, None)
    ref_mask = ref.fasterprune(ref_sparsity, prunen=pattern.n, prunem=pattern.m, blocksize=BLOCK, percdamp=0.01)
    lib_mask = lib.fasterprune(ratio, pattern, blocksize=BLOCK, percdamp=0.01)
    return ref_layer.weight.data, ref_mask, lib_layer.weight.data, lib_mask


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_matches_the_published_fasterprune(pattern: str, seed: int):
    pat = SparsityType.parse(pattern)
    if pat.structured:
        ratio = ref_sparsity = pat.ratio
    else:
        ratio = 0.5
        k = int(ROWS * BLOCK * ratio)
        ref_sparsity = (k - 1) / (ROWS * BLOCK)  # the original's "<=" prunes int(numel * s) + 1
        assert int(ROWS * BLOCK * ref_sparsity) == k - 1
    ref_w, ref_mask, lib_w, lib_mask = _both(pat, ratio, ref_sparsity, seed)
    dead = torch.zeros(COLS, dtype=torch.bool)
    dead[DEAD] = True
    assert torch.equal(lib_w, ref_w)
    # The original zeroes dead columns without always marking them; the tool's mask records every zero it made.
    assert torch.equal(lib_mask, ref_mask | dead)
    assert torch.equal(lib_mask, lib_w == 0)
    if pat.structured:  # n per group, more only where dead inputs were zeroed
        per_group = lib_mask.reshape(ROWS, -1, pat.m).sum(-1)
        dead_groups = dead.reshape(-1, pat.m).any(-1)
        assert (per_group[:, ~dead_groups] == pat.n).all() and (per_group >= pat.n).all()
    else:
        for i1 in range(0, COLS, BLOCK):
            assert int(lib_mask[:, i1:i1 + BLOCK].sum()) == int(ROWS * BLOCK * ratio)


def test_sparsegpt_mask_records_dead_columns_it_zeroed():
    """Three dead inputs in one 2:4 group: all three are zero in the model, so all three are in the mask."""
    layer, batches = _layer_and_batches(3)
    solver = SparseGPT(layer)
    for x in batches:
        solver.add_batch(x)
    mask = solver.fasterprune(0.5, SparsityType(2, 4), blocksize=BLOCK)
    assert mask[:, DEAD].all()
    assert torch.equal(mask, layer.weight.data == 0)


def test_nm_mask_breaks_ties_by_position():
    """All-equal scores: the first n of every m columns, as prune_mask's docstring promises (topk does not)."""
    for n, m in ((2, 4), (4, 8), (1, 4)):
        mask = prune_mask(torch.ones(3, 4 * m), n / m, SparsityType(n, m))
        expected = (torch.arange(4 * m) % m < n).expand(3, -1)
        assert torch.equal(mask, expected)


def test_matrix_mask_is_the_stable_sorts_first_k_with_ties_and_nan():
    """The matrix scope selects by the k-th value (SparseGPT masks every block this way) and must give exactly
    the stable sort's first k: ties by position, -0.0 equal to 0.0, and NaN last (the sort's own rule)."""
    gen = torch.Generator().manual_seed(0)
    for case in range(300):
        rows, cols = torch.randint(1, 30, (2,), generator=gen).tolist()
        if case % 3 == 0:
            score = torch.randint(0, 4, (rows, cols), generator=gen).float()  # many ties
        else:
            score = torch.randn(rows, cols, generator=gen)
        if case % 5 == 0:
            score.view(-1)[0] = -0.0
        if case % 11 == 0:
            score.view(-1)[-1] = float("nan")
        ratio = torch.rand(1, generator=gen).item()
        k = int(score.numel() * ratio)
        want = torch.zeros(score.numel(), dtype=torch.bool)
        want[torch.sort(score.flatten(), stable=True).indices[:k]] = True
        got = prune_mask(score, ratio, SparsityType(), scope="matrix")
        assert torch.equal(got.flatten(), want), case
        assert int(got.sum()) == k
