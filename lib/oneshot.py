"""What a trial prunes from: dense input statistics, the oneshot pruner, and the dense snapshot.

Oneshot trials score every weight once from dense activations (Wanda's |W|·‖X‖ or the Optspa metric) and a
trial only thresholds: per row, the ``k`` lowest scores are zero. Any feasible trial prunes between
``k_min`` and ``k_max`` columns per row of a module (:meth:`SearchSpace.count_bounds`), so the pruner keeps
only that band of the per-row order; the ``k_min`` lowest are zeroed once and stay zero (their positions
kept as a bit mask, for the saved masks). Scores and orders are computed on the compute device; the band's
indices live beside the weight they belong to, and a trial that prunes less puts the dense values back from
the host snapshot (:class:`DenseSnapshot`), a few columns per row. Memory besides the model on the device:
the band's indices plus one bit per weight (:meth:`OneShotPruner.nbytes`), reported by the search.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .layerwise import capture_layer_inputs
from .masks import pack, unpack
from .models import decoder_layers, find_linears, layer_prefix
from .offload import on_device
from .prune import InputStats, collect_layer_inputs
from .sparsity import optspa_score, wanda_score

logger = logging.getLogger(__name__)

Unit = tuple[int, str]
SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "optspa": optspa_score, "wanda": wanda_score,
}


def linear_modules(model: nn.Module) -> dict[Unit, nn.Linear]:
    return {(i, n): m for i, layer in enumerate(decoder_layers(model)) for n, m in find_linears(layer).items()}


class DenseSnapshot:
    """A CPU copy of every prunable weight, taken once; :meth:`restore` undoes any pruning in place."""

    def __init__(self, model: nn.Module):
        self.modules = linear_modules(model)
        self.weights = {u: m.weight.data.detach().to("cpu", copy=True) for u, m in self.modules.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for u, m in self.modules.items():
            m.weight.data.copy_(self.weights[u].to(m.weight.device, non_blocking=True))

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights.values())


@torch.no_grad()
def dense_input_stats(model: nn.Module, calib: list[torch.Tensor], device: str | torch.device,
                      offload: bool = False) -> dict[Unit, torch.Tensor]:
    """Mean of x_j^2 over calibration tokens for every prunable linear, from the *dense* model, layer by
    layer through the shared capture path (used by oneshot trials and OWL)."""
    device = torch.device(device)
    inputs = capture_layer_inputs(model, calib, device)
    stats: dict[Unit, torch.Tensor] = {}
    for i, layer in enumerate(tqdm(decoder_layers(model), desc="dense stats", leave=False)):
        with on_device(layer, device, offload):
            collectors = {n: InputStats(m, optspa_score) for n, m in find_linears(layer).items()}
            # One pass: statistics and the dense outputs that feed the next layer.
            inputs.hidden = collect_layer_inputs(layer, inputs, device, collectors, keep=True)
            for n, c in collectors.items():
                stats[(i, n)] = c.mean_sq.cpu()
    return stats


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
        from .prune import PruneResult

        result = PruneResult()
        for (i, name), band in self.bands.items():
            result.add(f"{self.prefix}{i}.{name}.weight", band.mask(tuple(self.modules[(i, name)].weight.shape)))
        return result

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.bands.values())


def shipped_oneshot(profile, method: str, structured: bool = False) -> bool:
    """Whether ``profile`` must be applied as a oneshot search shipped it (scores from the dense model,
    thresholded) rather than by ``method``'s own layer-by-layer pruning: the one rule every re-apply follows."""
    return profile.meta.get("shipped") == "oneshot" and method in SCORES and not structured


@torch.no_grad()
def prune_oneshot(model: nn.Module, calib: list[torch.Tensor], profile, method: str, device: str | torch.device,
                  offload: bool = False):
    """Prune ``profile`` as oneshot search trials do (scores from the dense model's activations, thresholded
    per row): how a profile that shipped a oneshot model is applied again. Returns a PruneResult."""
    import time

    from .prune import PruneResult
    from .search_space import module_shapes, profile_counts

    t0 = time.perf_counter()
    stats = dense_input_stats(model, calib, device, offload)
    t1 = time.perf_counter()
    counts = profile_counts(profile, module_shapes(model))
    pruner = OneShotPruner(model, stats, method, {u: (k, k) for u, k in counts.items()}, device)
    result = pruner.masks()
    result.calib_seconds, result.prune_seconds = t1 - t0, time.perf_counter() - t1
    return result
