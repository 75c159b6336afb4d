"""Pruning methods on hand-made layers with known answers, and on tiny models through the shared driver."""
import pytest
import torch
from torch import nn

from lib.models import decoder_layers, find_linears, load_model
from lib.profile import Profile
from lib.prune import InputStats, check_sparsity, prune_magnitude, prune_optspa, prune_sparsegpt, prune_wanda
from lib.sparsegpt import SparseGPT
from lib.sparsity import SparsityType, optspa_score, wanda_score


def _linear(W: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    return lin


def test_wanda_prunes_by_weight_times_input_norm_not_by_weight():
    W = torch.tensor([[4.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 0.5]])
    lin = _linear(W)
    stats = InputStats(lin, wanda_score)
    x = torch.tensor([[1.0, 1.0, 1.0, 10.0]]) * torch.ones(5, 1)  # column 3 carries large activations
    stats.add_batch(x.unsqueeze(0), None)
    mask = stats.prune(0.5, SparsityType())
    # scores row 0: [4, 1, 1, 10] -> prune cols 1, 2; row 1: [1, 1, 2, 5] -> prune cols 0, 1
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert (lin.weight.data[mask] == 0).all() and (lin.weight.data[~mask] == W[~mask]).all()


def test_optspa_collector_uses_mean_square_activation_and_the_metric():
    torch.manual_seed(0)
    W = torch.randn(8, 16)
    lin = _linear(W)
    stats = InputStats(lin, optspa_score)
    xs = [torch.randn(1, 10, 16) * torch.linspace(0.1, 3, 16) for _ in range(3)]
    for x in xs:
        stats.add_batch(x, None)
    s = torch.cat([x.reshape(-1, 16) for x in xs]).pow(2).mean(0)
    torch.testing.assert_close(stats.mean_sq, s, rtol=1e-5, atol=1e-6)
    mask = stats.prune(0.25, SparsityType())
    expected = optspa_score(W, s).argsort(dim=1, stable=True)[:, :4]
    assert (mask.sum(1) == 4).all()
    assert all(set(torch.nonzero(mask[r]).flatten().tolist()) == set(expected[r].tolist()) for r in range(8))


def test_sparsegpt_with_orthogonal_inputs_is_scaled_magnitude_without_updates():
    # Each token excites one input column: H is diagonal, so OBS moves no weight. The solver's diagonal is
    # that of chol(H^-1), 1/sqrt(H_jj + damp), so the saliency w^2/d^2 ranks by |w| * sqrt(H_jj + damp).
    torch.manual_seed(1)
    W = torch.randn(6, 8)
    scales = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 0.2, 1.5])
    lin = _linear(W)
    solver = SparseGPT(lin)
    solver.add_batch(torch.diag(scales).unsqueeze(0))
    H = 2 * torch.diag(scales**2)
    Hd = torch.diag(H) + 0.01 * torch.diag(H).mean()
    mask = solver.fasterprune(0.5, SparsityType(), blocksize=8)
    sal = (W.abs() * Hd.sqrt()).flatten()
    expected = torch.zeros(48, dtype=torch.bool)
    expected[sal.argsort(stable=True)[:24]] = True
    assert torch.equal(mask.flatten(), expected)
    torch.testing.assert_close(lin.weight.data, W.masked_fill(mask, 0))


def test_sparsegpt_update_reconstructs_better_than_masking_alone():
    torch.manual_seed(2)
    W = torch.randn(16, 32)
    base = torch.randn(200, 8)
    X = base @ torch.randn(8, 32) + 0.05 * torch.randn(200, 32)  # strongly correlated inputs
    lin = _linear(W)
    solver = SparseGPT(lin)
    solver.add_batch(X.unsqueeze(0))
    mask = solver.fasterprune(0.5, SparsityType(), blocksize=16)
    assert mask.sum() == 16 * 32 // 2
    err_obs = (X @ lin.weight.data.t() - X @ W.t()).pow(2).sum()
    err_mask = (X @ W.masked_fill(mask, 0).t() - X @ W.t()).pow(2).sum()
    assert err_obs < 0.5 * err_mask
    assert (lin.weight.data[mask] == 0).all()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sparsegpt_nm_structure(pattern):
    p = SparsityType.parse(pattern)
    torch.manual_seed(3)
    lin = _linear(torch.randn(8, 32))
    solver = SparseGPT(lin)
    solver.add_batch(torch.randn(1, 50, 32))
    mask = solver.fasterprune(p.ratio, p, blocksize=12)  # a block size that is no multiple of M still works
    assert (mask.reshape(8, -1, p.m).sum(-1) == p.n).all()
    assert ((lin.weight.data == 0) == mask).all()


def _calib(vocab: int, n: int = 4, seqlen: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (1, seqlen), generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["wanda", "optspa", "sparsegpt", "magnitude"])
def test_per_layer_and_per_module_profile_is_applied_exactly(tiny_llama, method):
    lm = load_model(tiny_llama, dtype="float32")
    profile = Profile(num_layers=2, sparsity=[0.25, 0.625], module_sparsity={1: {"mlp.down_proj": 0.5}})
    calib = _calib(len(lm.tokenizer))
    if method == "magnitude":
        result = prune_magnitude(lm.model, profile, SparsityType())
    else:
        fn = {"wanda": prune_wanda, "optspa": prune_optspa, "sparsegpt": prune_sparsegpt}[method]
        result = fn(lm.model, calib, profile, SparsityType())
    for i, layer in enumerate(decoder_layers(lm.model)):
        for name, mod in find_linears(layer).items():
            ratio = profile.ratio(i, name)
            zeros = (mod.weight.data == 0)
            if method in ("wanda", "optspa"):
                assert (zeros.sum(1) == int(mod.in_features * ratio)).all(), (i, name)
            else:  # magnitude: per matrix; sparsegpt: per block of columns
                assert abs(zeros.float().mean().item() - ratio) < 0.02, (i, name)
    assert len(result.masks) == 2 * 7


@pytest.mark.parametrize("method", ["wanda", "optspa", "magnitude"])
def test_nm_on_model(tiny_llama, method):
    lm = load_model(tiny_llama, dtype="float32")
    p = SparsityType(2, 4)
    profile = Profile.uniform(2, 0.5)
    if method == "magnitude":
        prune_magnitude(lm.model, profile, p)
    else:
        (prune_wanda if method == "wanda" else prune_optspa)(lm.model, _calib(len(lm.tokenizer)), profile, p)
    for layer in decoder_layers(lm.model):
        for mod in find_linears(layer).values():
            W = mod.weight.data
            assert ((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2).all()
    assert check_sparsity(lm.model)[0] == pytest.approx(0.5)


def test_pruning_changes_later_layer_inputs_sequentially(tiny_llama):
    """Layer 1 is calibrated on the outputs of the pruned layer 0 (Wanda's sequential scheme)."""
    lm = load_model(tiny_llama, dtype="float32")
    seen = []
    layer1 = decoder_layers(lm.model)[1]
    handle = layer1.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    calib = _calib(len(lm.tokenizer), n=1)
    dense_in = None
    with torch.no_grad():
        lm.model(input_ids=calib[0])
        dense_in = seen.pop()
    prune_wanda(lm.model, calib, Profile(num_layers=2, sparsity=[0.9, 0.0]), SparsityType())
    handle.remove()
    assert seen, "layer 1 ran during calibration"
    assert not torch.allclose(seen[0], dense_in)  # fed by the pruned layer 0


def test_offload_path_gives_the_same_masks(tiny_llama):
    """The offload branch (weights parked on the CPU, one layer moved at a time) prunes identically."""
    from lib.models import place_model

    calib = None
    masks = []
    for offload in (False, True):
        lm = load_model(tiny_llama, dtype="float32")
        calib = calib or _calib(len(lm.tokenizer))
        place_model(lm.model, "cpu", offload)
        res = prune_optspa(lm.model, calib, Profile.uniform(2, 0.5), SparsityType(), device="cpu", offload=offload)
        masks.append(res.masks)
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_sparsegpt_computes_a_shared_input_once_and_prunes_the_same_bits(tiny_llama, monkeypatch):
    """q, k and v (gate and up) read one input: their X X^T is computed once and copied, and the pruned model is
    bit for bit the one every linear accumulating its own gives; a linear whose input differs never copies."""
    from lib.sparsegpt import SharedInputs

    # a different input (or a solver that has already seen other batches) is never copied
    a, b = SparseGPT(_linear(torch.ones(2, 4))), SparseGPT(_linear(torch.ones(2, 4)))
    sh = SharedInputs()
    a.shared = b.shared = sh
    x = torch.randn(1, 3, 4)
    a.add_batch(x)
    b.add_batch(x + 1)
    assert b.twin is False and not torch.equal(a.H, b.H)
    a.add_batch(x)
    b.add_batch(x)  # the same input now, but b has seen another one before: it accumulates its own
    assert b.twin is False and b.nsamples == a.nsamples == 2
    shared = load_model(tiny_llama, dtype="float32")
    calib = _calib(len(shared.tokenizer))
    profile = Profile(num_layers=2, sparsity=[0.4, 0.6])
    copies = []
    real = SharedInputs.copied

    def copied(self, solver, inp):
        out = real(self, solver, inp)
        copies.append(out)
        return out

    monkeypatch.setattr(SharedInputs, "copied", copied)
    prune_sparsegpt(shared.model, calib, profile, SparsityType())
    # per layer and batch: q, k, v, o, gate, up, down; k, v and up copy
    assert copies == [False, True, True, False, False, True, False] * 2 * len(calib)
    monkeypatch.setattr(SharedInputs, "copied", lambda self, solver, inp: False)  # every linear its own sums
    own = load_model(tiny_llama, dtype="float32")
    prune_sparsegpt(own.model, calib, profile, SparsityType())
    for name, w in own.model.named_parameters():
        assert torch.equal(w, shared.model.get_parameter(name)), name
