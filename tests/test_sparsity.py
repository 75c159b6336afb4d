"""The mask routine and the scores: exact counts, exact N:M structure, the Optspa metric by hand."""
import math

import pytest
import torch

from lib.sparsity import SparsityType, optspa_score, prune_mask, wanda_score, wanda_variant_mask


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.63, 0.9])
def test_row_scope_prunes_exactly_int_cols_times_ratio_per_row(ratio):
    torch.manual_seed(0)
    score = torch.randn(37, 53)
    mask = prune_mask(score, ratio, SparsityType(), scope="row")
    k = int(53 * ratio)
    assert (mask.sum(dim=1) == k).all()
    # The pruned entries are the k smallest of each row.
    for r in range(37):
        kept_min = score[r][~mask[r]].min()
        if k:
            assert score[r][mask[r]].max() <= kept_min


def test_matrix_scope_prunes_exactly_int_numel_times_ratio():
    torch.manual_seed(1)
    score = torch.rand(16, 40)
    mask = prune_mask(score, 0.37, SparsityType(), scope="matrix")
    assert mask.sum() == int(16 * 40 * 0.37)
    assert score[mask].max() <= score[~mask].min()


def test_ties_are_broken_deterministically_and_counts_stay_exact():
    score = torch.ones(4, 8)
    mask = prune_mask(score, 0.5, SparsityType(), scope="row")
    assert (mask.sum(dim=1) == 4).all()
    assert mask[:, :4].all()  # stable sort: earliest positions first


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_structure_is_exact(pattern):
    p = SparsityType.parse(pattern)
    torch.manual_seed(2)
    score = torch.randn(12, 32)
    mask = prune_mask(score, p.ratio, p)
    groups = mask.reshape(12, 32 // p.m, p.m)
    assert (groups.sum(dim=-1) == p.n).all()
    sgroups = score.reshape(12, 32 // p.m, p.m)
    pruned_max = torch.where(groups, sgroups, torch.tensor(-float("inf"))).amax(-1)
    kept_min = torch.where(~groups, sgroups, torch.tensor(float("inf"))).amin(-1)
    assert (pruned_max <= kept_min).all()


def test_nm_needs_divisible_columns():
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_mask(torch.randn(2, 10), 0.5, SparsityType(2, 4))


@pytest.mark.parametrize("text", ["2:2", "0:4", "a:b", "2-4", "4:2"])
def test_bad_sparsity_types_are_rejected(text):
    with pytest.raises(ValueError):
        SparsityType.parse(text)


def _optspa_reference(W, s):
    rows, cols = W.shape
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(rows):
        rn = math.sqrt(sum(float(W[i, j]) ** 2 for j in range(cols)))
        for j in range(cols):
            cn = math.sqrt(sum(float(W[r, j]) ** 2 for r in range(rows)))
            a = abs(float(W[i, j]))
            rel = (a / rn if rn else 0.0) + (a / cn if cn else 0.0)
            out[i, j] = math.log(1 + rel) * float(s[j]) ** 0.25
    return out


def test_optspa_metric_matches_plain_reference_with_zero_row_and_column():
    torch.manual_seed(3)
    W = torch.randn(6, 9).half()
    W[2] = 0  # all-zero row
    W[:, 5] = 0  # all-zero column
    s = torch.rand(9) * 3
    s[7] = 0
    got = optspa_score(W, s)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _optspa_reference(W.float(), s), rtol=1e-5, atol=1e-6)
    assert (got[2] == 0).all() and (got[:, 5] == 0).all()


def test_wanda_score_is_abs_weight_times_activation_norm():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    s = torch.tensor([4.0, 1.0])  # mean of x^2; the norm is its square root up to a constant
    torch.testing.assert_close(wanda_score(W, s), torch.tensor([[2.0, 2.0], [6.0, 0.5]]))


def test_wanda_variant_reaches_target_sparsity():
    torch.manual_seed(4)
    score = torch.rand(64, 128) ** 3
    mask = wanda_variant_mask(score, 0.5)
    assert abs(mask.float().mean().item() - 0.5) <= 0.002
    # Per row the pruned entries are still the lowest ones.
    for r in range(64):
        if mask[r].any() and (~mask[r]).any():
            assert score[r][mask[r]].max() <= score[r][~mask[r]].min()
