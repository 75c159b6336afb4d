"""Pruning methods: one function per method, all sharing one layer-by-layer driver and one mask routine.

Every method takes a :class:`~lib.profile.Profile` (sparsity per layer, optionally per module), so the
search and profile reloading use the same code as uniform pruning. Calibrated methods run Wanda's sequential
scheme: capture the inputs of decoder layer 0 once, then for each layer collect statistics of its linears'
inputs in one pass, prune, and run the pruned layer again to produce the next layer's inputs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm import tqdm

from .layerwise import capture_layer_inputs, run_layer
from .masks import pack
from .models import decoder_layers, find_linears, layer_prefix
from .offload import on_device
from .profile import Profile
from .sparsegpt import SharedInputs, SparseGPT
from .sparsity import SparsityType, optspa_score, prune_mask, wanda_score, wanda_variant_mask

logger = logging.getLogger(__name__)

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "optspa")


@dataclass
class PruneResult:
    """Packed masks by weight name (see :mod:`lib.masks`), their shapes, and where the time went."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    calib_seconds: float = 0.0
    prune_seconds: float = 0.0

    def add(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = pack(mask)
        self.shapes[name] = tuple(mask.shape)


class Collector(Protocol):
    """What the calibration pass feeds: one per linear, fed its inputs batch by batch, then asked for a mask."""
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None: ...
    def prune(self, ratio: float, pattern: SparsityType) -> torch.Tensor: ...
    def free(self) -> None: ...


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------- collectors
class InputStats:
    """Mean over calibration tokens of x_j^2 for each input column j of one linear layer (fp64 sums)."""

    def __init__(self, layer: nn.Linear, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 use_variant: bool = False):
        self.layer = layer
        self.score = score
        self.use_variant = use_variant
        self.sum_sq = torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)
        self.tokens = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()
        self.sum_sq += x.pow(2).sum(dim=0).double()
        self.tokens += x.shape[0]

    @property
    def mean_sq(self) -> torch.Tensor:
        return (self.sum_sq / max(self.tokens, 1)).float()

    @torch.no_grad()
    def prune(self, ratio: float, pattern: SparsityType) -> torch.Tensor:
        W = self.layer.weight.data
        score = self.score(W, self.mean_sq)
        if self.use_variant and not pattern.structured:
            mask = wanda_variant_mask(score, ratio)
        else:
            mask = prune_mask(score, ratio, pattern, scope="row")
        W.masked_fill_(mask, 0)
        return mask

    def free(self) -> None:
        self.sum_sq = None


class SparseGPTCollector:
    def __init__(self, layer: nn.Linear, blocksize: int, percdamp: float, shared: SharedInputs | None = None):
        self.solver = SparseGPT(layer, shared)
        self.blocksize = blocksize
        self.percdamp = percdamp

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.solver.add_batch(inp, out)

    def prune(self, ratio: float, pattern: SparsityType) -> torch.Tensor:
        return self.solver.fasterprune(ratio, pattern, blocksize=self.blocksize, percdamp=self.percdamp)

    def free(self) -> None:
        self.solver.free()


# ----------------------------------------------------------------------------------------- driver
def collect_layer_inputs(layer: nn.Module, inputs, device: str | torch.device, collectors: dict[str, Collector],
                         keep: bool = False) -> list[torch.Tensor]:
    """Run ``layer`` on every stored batch while each named linear's collector sees that linear's inputs;
    returns the layer's outputs when ``keep`` (the pruning driver and the search's dense statistics share it)."""
    linears = find_linears(layer)
    handles = [linears[name].register_forward_hook(
        lambda _m, inp, out, c=collector: c.add_batch(inp[0].data, out.data)) for name, collector in collectors.items()]
    try:
        return run_layer(layer, inputs, device, keep=keep)
    finally:
        for h in handles:
            h.remove()


def _prune_sequential(
    model: nn.Module, calib: list[torch.Tensor], profile: Profile, pattern: SparsityType,
    make_collector: Callable[[nn.Linear], Collector], device: str | torch.device, offload: bool, desc: str,
) -> PruneResult:
    device = torch.device(device)
    result = PruneResult()
    start = time.perf_counter()
    layers = decoder_layers(model)
    prefix = layer_prefix(model)
    logger.info("capturing decoder layer 0 inputs for %d calibration samples", len(calib))
    inputs = capture_layer_inputs(model, calib, device)
    for i, layer in enumerate(tqdm(layers, desc=desc)):
        with on_device(layer, device, offload):
            collectors = {name: make_collector(mod) for name, mod in find_linears(layer).items()}
            collect_layer_inputs(layer, inputs, device, collectors, keep=False)
            _sync(device)
            t0 = time.perf_counter()
            for name, collector in collectors.items():
                logger.debug("pruning layer %d name %s", i, name)
                result.add(f"{prefix}{i}.{name}.weight", collector.prune(profile.ratio(i, name), pattern))
                collector.free()
            _sync(device)
            result.prune_seconds += time.perf_counter() - t0
            del collectors
            inputs.hidden = run_layer(layer, inputs, device)  # the pruned layer feeds the next one
    result.calib_seconds = time.perf_counter() - start - result.prune_seconds
    return result


# ----------------------------------------------------------------------------------------- methods
@torch.no_grad()
def prune_magnitude(model: nn.Module, profile: Profile, pattern: SparsityType,
                    device: str | torch.device = "cpu", offload: bool = False) -> PruneResult:
    """|W|, one threshold per matrix (Wanda's magnitude baseline); per row for N:M."""
    result = PruneResult()
    prefix = layer_prefix(model)
    for i, layer in enumerate(tqdm(decoder_layers(model), desc="magnitude")):
        with on_device(layer, device, offload):
            t0 = time.perf_counter()
            for name, mod in find_linears(layer).items():
                W = mod.weight.data
                mask = prune_mask(W.float().abs(), profile.ratio(i, name), pattern, scope="matrix")
                W.masked_fill_(mask, 0)
                result.add(f"{prefix}{i}.{name}.weight", mask)
            result.prune_seconds += time.perf_counter() - t0
    return result


def prune_wanda(model: nn.Module, calib: list[torch.Tensor], profile: Profile, pattern: SparsityType,
                device: str | torch.device = "cpu", offload: bool = False, use_variant: bool = False) -> PruneResult:
    """|W_ij| * ||X_j||_2 compared within each output row (Wanda); ``use_variant``: Wanda's alpha search."""
    return _prune_sequential(model, calib, profile, pattern,
                             lambda mod: InputStats(mod, wanda_score, use_variant), device, offload, "wanda")


def prune_optspa(model: nn.Module, calib: list[torch.Tensor], profile: Profile, pattern: SparsityType,
                 device: str | torch.device = "cpu", offload: bool = False) -> PruneResult:
    """The Optspa metric (:func:`lib.sparsity.optspa_score`) compared within each output row."""
    return _prune_sequential(model, calib, profile, pattern,
                             lambda mod: InputStats(mod, optspa_score), device, offload, "optspa")


def prune_sparsegpt(model: nn.Module, calib: list[torch.Tensor], profile: Profile, pattern: SparsityType,
                    device: str | torch.device = "cpu", offload: bool = False, blocksize: int = 128,
                    percdamp: float = 0.01) -> PruneResult:
    """SparseGPT's OBS solver with weight updates (percdamp 0.01, blocksize 128 as the paper)."""
    shared = SharedInputs()  # q, k, v (gate, up) read one input: its X X^T is computed once

    def collector(mod: nn.Linear) -> SparseGPTCollector:
        return SparseGPTCollector(mod, blocksize, percdamp, shared)

    return _prune_sequential(model, calib, profile, pattern, collector, device, offload, "sparsegpt")


# ----------------------------------------------------------------------------------------- reporting
@torch.no_grad()
def check_sparsity(model: nn.Module) -> tuple[float, list[float]]:
    """Fraction of zero weights over all decoder linears, and per layer (Wanda's ``check_sparsity``)."""
    zeros = total = 0
    per_layer = []
    for layer in decoder_layers(model):
        lz = lt = 0
        for mod in find_linears(layer).values():
            lz += int((mod.weight.data == 0).sum())
            lt += mod.weight.numel()
        per_layer.append(lz / lt if lt else 0.0)
        zeros += lz
        total += lt
    return (zeros / total if total else 0.0), per_layer


def profile_mean_sparsity(model: nn.Module, profile: Profile) -> float:
    """Parameter-weighted mean sparsity that ``profile`` asks for on ``model``."""
    pruned = total = 0.0
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in find_linears(layer).items():
            pruned += profile.ratio(i, name) * mod.weight.numel()
            total += mod.weight.numel()
    return pruned / total if total else 0.0
