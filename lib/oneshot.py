"""What a trial prunes from: input statistics, the oneshot pruner, and the dense snapshot.

Oneshot trials score every weight once from calibration activations (Wanda's |W|·‖X‖ or the Optspa metric) and a
trial only thresholds: per row, the ``k`` lowest scores are zero. Any feasible trial prunes between
``k_min`` and ``k_max`` columns per row of a module (:meth:`SearchSpace.count_bounds`), so the pruner keeps
only that band of the per-row order; the ``k_min`` lowest are zeroed once and stay zero (their positions
kept as a bit mask, for the saved masks). Scores and orders are computed on the compute device; the band's
indices live beside the weight they belong to, and a trial that prunes less puts the dense values back from
the host snapshot (:class:`DenseSnapshot`), a few columns per row. Memory besides the model on the device:
the band's indices plus one bit per weight (:meth:`OneShotPruner.nbytes`), reported by the search.

SparseGPT's oneshot trials (:class:`OneShotSparseGPT`) take every linear's Hessian from the dense model's
inputs, factor it once (kept on the host), and run the OBS pass per trial from the dense weights: each layer
compressed on its own, as EvoPress builds its levels, rather than on the pruned layers' outputs.

The activations are the dense model's by default. ``--trial_stats uniform`` takes them instead from the method's
own uniform sequential pruning at the target (each layer pruned, its outputs feeding the next, then put back
dense): what a sequential pruning near the target sees, so a trial's oneshot model stays close to the sequential
one where upstream pruning shifts the inputs (SparseGPT at 60-70%), and the uniform trial is exactly it.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .layerwise import capture_layer_inputs, run_layer
from .masks import pack, unpack
from .models import decoder_layers, find_linears, layer_prefix
from .offload import on_device
from .prune import Collector, InputStats, PruneResult, SparseGPTCollector, collect_layer_inputs
from .sparsegpt import SharedInputs, inverse_factor, obs_prune
from .sparsity import SparsityType, optspa_score, wanda_score

logger = logging.getLogger(__name__)

Unit = tuple[int, str]
SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "optspa": optspa_score, "wanda": wanda_score,
}
ONESHOT_METHODS = (*SCORES, "sparsegpt")


def linear_modules(model: nn.Module) -> dict[Unit, nn.Linear]:
    return {(i, n): m for i, layer in enumerate(decoder_layers(model)) for n, m in find_linears(layer).items()}


class DenseSnapshot:
    """A CPU copy of every prunable weight, taken once; :meth:`restore` undoes any pruning in place."""

    def __init__(self, model: nn.Module):
        self.modules = linear_modules(model)
        self.weights = {u: m.weight.data.detach().to("cpu", copy=True) for u, m in self.modules.items()}
        self.restores = 0  # counts restore(): a pruner that caches what the weights hold knows when it is stale

    @torch.no_grad()
    def restore(self) -> None:
        self.restores += 1
        for u, m in self.modules.items():
            m.weight.data.copy_(self.weights[u].to(m.weight.device, non_blocking=True))

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights.values())


@torch.no_grad()
def _stats_pass(model: nn.Module, calib: list[torch.Tensor], device: str | torch.device, offload: bool,
                collector: Callable[[nn.Linear], Collector], result: Callable[[Collector], object], desc: str,
                pruned_at: float | None = None) -> dict:
    """One pass over the model, layer by layer through the shared capture path: ``collector(linear)`` sees every
    prunable linear's inputs, and ``result(collector)`` is kept per unit. Without ``pruned_at`` the inputs are the
    dense model's. With it, each layer is then pruned by its collectors as the method's own sequential pruning
    prunes a search's uniform allocation at that target, its outputs feed the next layer, and its dense weights
    are put back: the statistics are those that pruning sees, and the model ends dense."""
    from .search_space import uniform_profile

    device = torch.device(device)
    # what a search's uniform trial prunes (the target in whole columns per row, the budget exact)
    uniform = uniform_profile(model, pruned_at) if pruned_at is not None else None
    inputs = capture_layer_inputs(model, calib, device)
    out: dict[Unit, object] = {}
    for i, layer in enumerate(tqdm(decoder_layers(model), desc=desc, leave=False)):
        with on_device(layer, device, offload):
            linears = find_linears(layer)
            collectors = {n: collector(m) for n, m in linears.items()}
            if pruned_at is None:  # one pass: statistics and the dense outputs that feed the next layer
                inputs.hidden = collect_layer_inputs(layer, inputs, device, collectors, keep=True)
            else:
                collect_layer_inputs(layer, inputs, device, collectors, keep=False)
            for n, c in collectors.items():  # all results before any pruning (shared factors compare H's)
                out[(i, n)] = result(c)
            if pruned_at is not None:
                dense = {n: m.weight.data.clone() for n, m in linears.items()}
                for n, c in collectors.items():
                    c.prune(uniform.ratio(i, n), SparsityType())
                    c.free()
                inputs.hidden = run_layer(layer, inputs, device)
                for n, m in linears.items():
                    m.weight.data.copy_(dense[n])
    return out


def input_stats(model: nn.Module, calib: list[torch.Tensor], device: str | torch.device, offload: bool = False,
                method: str = "optspa", pruned_at: float | None = None) -> dict[Unit, torch.Tensor]:
    """Mean of x_j^2 over calibration tokens for every prunable linear: from the dense model (oneshot trials,
    OWL), or with ``pruned_at`` from the inputs that ``method``'s uniform sequential pruning at that ratio sees."""
    return _stats_pass(model, calib, device, offload, lambda m: InputStats(m, SCORES[method]),
                       lambda c: c.mean_sq.cpu(), "input stats", pruned_at)


def hessian_factors(model: nn.Module, calib: list[torch.Tensor], device: str | torch.device,
                    offload: bool = False, percdamp: float = 0.01, blocksize: int = 128,
                    pruned_at: float | None = None) -> dict[Unit, tuple[torch.Tensor, ...]]:
    """SparseGPT's damped inverse-Hessian factor and dead inputs (:func:`lib.sparsegpt.inverse_factor`) of every
    prunable linear, on the host: from the dense model's inputs, or with ``pruned_at`` from the inputs that
    SparseGPT's uniform sequential pruning at that ratio sees. Linears that read the same input (q, k, v;
    gate, up: neighbours in module order) share one factor."""
    last: list = []

    def factor(c: SparseGPTCollector):
        H = c.solver.H
        if last and torch.equal(last[0], H):
            return last[1]
        Hinv, dead = inverse_factor(H.clone(), percdamp)
        last[:] = [H, (Hinv.cpu(), dead.cpu())]
        return last[1]

    shared = SharedInputs()  # and their X X^T is computed once
    return _stats_pass(model, calib, device, offload, lambda m: SparseGPTCollector(m, blocksize, percdamp, shared),
                       factor, "hessians", pruned_at)


class _Band:
    """One module's part of the order that trials can move: ranks ``lo`` to ``hi`` of every row. It holds
    indices only; the dense values come from ``dense`` (the module's weight in the host snapshot)."""

    def __init__(self, weight: torch.Tensor, score: torch.Tensor, lo: int, hi: int, dense: torch.Tensor | None):
        order = torch.sort(score, dim=1, stable=True).indices  # the order prune_mask uses
        cols = weight.shape[1]
        idx_dtype = torch.int16 if cols < 32768 else torch.int32  # half the memory on LLaMA-size rows
        self.lo, self.hi, self.dense = lo, hi, dense
        home = weight.device
        always = torch.zeros(weight.shape, dtype=torch.bool, device=order.device)
        always.scatter_(1, order[:, :lo], True)
        self.always = pack(always.cpu())  # one bit per weight: the saved masks need these positions
        self.idx = order[:, lo:hi].to(idx_dtype).to(home)
        weight.masked_fill_(always.to(home), 0)
        self.k = lo  # columns per row pruned now

    def set(self, weight: torch.Tensor, k: int) -> None:
        if not self.lo <= k <= self.hi:
            raise ValueError(f"pruned count {k} outside the band [{self.lo}, {self.hi}]")
        a, b = sorted((k - self.lo, self.k - self.lo))
        if a != b:
            idx = self.idx[:, a:b].long()
            if k > self.k:
                weight.scatter_(1, idx, 0)
            else:  # prune less: the dense values back, from the host copy
                if self.dense is None:
                    raise ValueError("putting weights back needs the dense snapshot")
                values = self.dense.gather(1, idx.to(self.dense.device))
                weight.scatter_(1, idx, values.to(weight.device, weight.dtype, non_blocking=True))
        self.k = k

    def reset(self, weight: torch.Tensor) -> None:
        """``weight`` holds the dense values again: zero the always-pruned positions, band all dense."""
        weight.masked_fill_(unpack(self.always, tuple(weight.shape)).to(weight.device), 0)
        self.k = self.lo

    def mask(self, shape: tuple[int, int]) -> torch.Tensor:
        mask = unpack(self.always, shape)
        mask.scatter_(1, self.idx[:, : self.k - self.lo].long().cpu(), True)
        return mask

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.idx, self.always))


class OneShotPruner:
    """Scores from dense activations, computed once; :meth:`apply` leaves the lowest ``k`` per row zeroed.

    A trial changes only the difference from the previous one (zero more of the order, or put dense values
    back), a few columns per row; the weights equal pruning the dense model with :func:`prune_mask` on the
    same scores (tested)."""

    def __init__(self, model: nn.Module, stats: dict[Unit, torch.Tensor], method: str,
                 bounds: dict[Unit, tuple[int, int]], device: str | torch.device,
                 dense: DenseSnapshot | None = None):
        """``dense``: the snapshot taken before this pruner zeroes anything; trials that prune less than the
        one before read their values from it (only a fixed count, ``lo == hi`` everywhere, needs none)."""
        if method not in SCORES:
            raise ValueError(f"oneshot trials need a score-based method ({', '.join(SCORES)}), not {method}")
        self.modules = linear_modules(model)
        self.prefix = layer_prefix(model)
        self.bands: dict[Unit, _Band] = {}
        device = torch.device(device)
        for u, mod in tqdm(self.modules.items(), desc="oneshot orders", leave=False):
            w = mod.weight.data
            score = SCORES[method](w.to(device), stats[u].to(device))
            self.bands[u] = _Band(w, score, *bounds[u], dense.weights[u] if dense is not None else None)
            del score

    @torch.no_grad()
    def apply(self, counts: dict[Unit, int]) -> None:
        """Prune ``counts[u]`` columns per row of every module (realized counts of an allocation)."""
        for u, band in self.bands.items():
            band.set(self.modules[u].weight.data, counts[u])

    @torch.no_grad()
    def rebuild(self, counts: dict[Unit, int]) -> None:
        """After the model's weights were restored to dense (a sequential re-prune in between): prune
        ``counts`` again, exactly as :meth:`apply` from the first state."""
        for u, band in self.bands.items():
            band.reset(self.modules[u].weight.data)
        self.apply(counts)

    def masks(self):
        """The current masks as a :class:`lib.prune.PruneResult` (what ``--save`` writes)."""
        result = PruneResult()
        for (i, name), band in self.bands.items():
            result.add(f"{self.prefix}{i}.{name}.weight", band.mask(tuple(self.modules[(i, name)].weight.shape)))
        return result

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.bands.values())

    def host_nbytes(self) -> int:
        return 0  # the always-pruned bits are counted in nbytes()


class OneShotSparseGPT:
    """SparseGPT with every linear's Hessian from the dense model's inputs (EvoPress's layer-wise
    compression, without its database of levels), or from its uniform sequential pruning's (``--trial_stats
    uniform``): the damped inverse-Hessian factors are computed once
    (:func:`hessian_factors`), and :meth:`apply` runs the OBS pass of each module whose count changed,
    from its dense weights (the host snapshot), at ``count_ratio(k, cols)``. The same counts give the same
    weights, so the shipped model is the scored one. Without a snapshot each module can be pruned once (the
    model's own weights are the dense ones), which is how a shipped profile is applied again."""

    def __init__(self, model: nn.Module, factors: dict[Unit, tuple[torch.Tensor, torch.Tensor]],
                 device: str | torch.device, dense: DenseSnapshot | None = None, blocksize: int = 128):
        self.modules = linear_modules(model)
        self.prefix = layer_prefix(model)
        self.factors, self.dense, self.blocksize = factors, dense, blocksize
        self.device = torch.device(device)
        self.counts: dict[Unit, int] = {}  # what each module's weight holds now
        self.packed: dict[Unit, torch.Tensor] = {}
        self.restores = dense.restores if dense is not None else 0

    @torch.no_grad()
    def apply(self, counts: dict[Unit, int]) -> None:
        from .search_space import count_ratio

        if self.dense is not None and self.dense.restores != self.restores:  # the weights were put back dense
            self.counts, self.restores = {}, self.dense.restores
        for u, k in tqdm(counts.items(), desc="sparsegpt oneshot", leave=False):
            if self.counts.get(u) == k:
                continue
            mod = self.modules[u]
            if self.dense is None and u in self.counts:
                raise ValueError("pruning a module again needs the dense snapshot")
            dense = self.dense.weights[u] if self.dense is not None else mod.weight.data
            W = dense.to(self.device, torch.float32, copy=True)
            Hinv, dead = (t.to(self.device) for t in self.factors[u])
            mask = obs_prune(W, Hinv, dead, count_ratio(k, W.shape[1]), blocksize=self.blocksize)
            mod.weight.data.copy_(W.to(mod.weight.device, mod.weight.dtype))
            self.packed[u], self.counts[u] = pack(mask.cpu()), k

    def rebuild(self, counts: dict[Unit, int]) -> None:
        """After the model's weights were restored to dense: prune ``counts`` again, exactly as :meth:`apply`."""
        self.counts = {}
        self.apply(counts)

    def masks(self) -> PruneResult:
        result = PruneResult()
        for (i, name), packed in self.packed.items():
            result.add(f"{self.prefix}{i}.{name}.weight", unpack(packed, tuple(self.modules[(i, name)].weight.shape)))
        return result

    def nbytes(self) -> int:
        return 0  # the factors stay on the host; each moves to the device for its module's pass

    def host_nbytes(self) -> int:
        seen = {id(f[0]): f for f in self.factors.values()}  # shared factors counted once
        return sum(t.numel() * t.element_size() for f in seen.values() for t in f)


def oneshot_state(model: nn.Module, calib: list[torch.Tensor], method: str, device: str | torch.device,
                  offload: bool = False, blocksize: int = 128, percdamp: float = 0.01,
                  pruned_at: float | None = None) -> dict[Unit, object]:
    """What ``method``'s oneshot trials prune from: input statistics (wanda, optspa) or SparseGPT's factors, from
    the dense model's inputs or (``pruned_at``) those of its uniform sequential pruning at that ratio."""
    if method == "sparsegpt":
        return hessian_factors(model, calib, device, offload, percdamp, blocksize, pruned_at)
    return input_stats(model, calib, device, offload, method, pruned_at)


def _pruner(model: nn.Module, state: dict, method: str, bounds: dict[Unit, tuple[int, int]],
            device: str | torch.device, dense: DenseSnapshot | None, blocksize: int):
    if method == "sparsegpt":
        return OneShotSparseGPT(model, state, device, dense, blocksize)
    return OneShotPruner(model, state, method, bounds, device, dense)


def oneshot_pruner(model: nn.Module, calib: list[torch.Tensor], method: str, bounds: dict[Unit, tuple[int, int]],
                   device: str | torch.device, offload: bool = False, dense: DenseSnapshot | None = None,
                   blocksize: int = 128, percdamp: float = 0.01, pruned_at: float | None = None):
    """The oneshot pruner of ``method`` (:func:`oneshot_state`): thresholded scores (wanda, optspa) or SparseGPT's
    layer-wise passes."""
    state = oneshot_state(model, calib, method, device, offload, blocksize, percdamp, pruned_at)
    return _pruner(model, state, method, bounds, device, dense, blocksize)


def stats_ratio(profile) -> float | None:
    """The uniform ratio whose sequential pruning gave a oneshot search's statistics (``--trial_stats uniform``),
    or None for the dense model's (profiles without the entry, as before it existed)."""
    return profile.target_sparsity if profile.meta.get("trial_stats") == "uniform" else None


def shipped_oneshot(profile, method: str, structured: bool = False) -> bool:
    """Whether ``profile`` must be applied as a oneshot search shipped it (scores from the dense model,
    thresholded) rather than by ``method``'s own layer-by-layer pruning: the one rule every re-apply follows."""
    return profile.meta.get("shipped") == "oneshot" and method in ONESHOT_METHODS and not structured


@torch.no_grad()
def prune_oneshot(model: nn.Module, calib: list[torch.Tensor], profile, method: str, device: str | torch.device,
                  offload: bool = False, blocksize: int = 128, percdamp: float = 0.01) -> PruneResult:
    """Prune ``profile`` as oneshot search trials do (from the dense model's activations or, as the profile
    records, its uniform sequential pruning's: scores thresholded per row, or SparseGPT's layer-wise passes): how
    a profile that shipped a oneshot model is applied again."""
    from .search_space import module_shapes, profile_counts

    t0 = time.perf_counter()
    counts = profile_counts(profile, module_shapes(model))
    state = oneshot_state(model, calib, method, device, offload, blocksize, percdamp, stats_ratio(profile))
    t1 = time.perf_counter()
    pruner = _pruner(model, state, method, {u: (k, k) for u, k in counts.items()}, device, None, blocksize)
    pruner.apply(counts)  # SparseGPT solves here; thresholded scores were pruned to the counts on construction
    result = pruner.masks()
    result.calib_seconds, result.prune_seconds = t1 - t0, time.perf_counter() - t1
    return result
