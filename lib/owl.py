"""OWL: outlier-weighted layer-wise sparsity (Yin et al., 2023), a non-searched baseline allocation.

For each decoder layer, the outlier ratio D_l is the fraction of its weights whose Wanda score
|W_ij| * ||X_j||_2 exceeds ``M`` times the mean score of that layer. Layers with more outliers keep more
weights: the ratios are min-max scaled into [0, 2*lambda], centred on the target, and subtracted, so every
layer lies within target +- lambda and the parameter-weighted mean equals the target exactly.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .models import decoder_layers, find_linears
from .sparsity import wanda_score

logger = logging.getLogger(__name__)

DEFAULT_LAMBDA = 0.08  # OWL's setting for LLaMA-7B
DEFAULT_M = 5.0


@torch.no_grad()
def outlier_ratios(model: nn.Module, act_sq_mean: dict[tuple[int, str], torch.Tensor],
                   m: float = DEFAULT_M) -> list[float]:
    """Fraction of each layer's weights whose Wanda score is above ``m`` times the layer's mean score.

    ``act_sq_mean[(layer, module)]`` is the mean of x_j^2 over calibration tokens, from the dense model.
    """
    ratios = []
    for i, layer in enumerate(decoder_layers(model)):
        scores = [wanda_score(mod.weight.data, act_sq_mean[(i, name)].to(mod.weight.device)).flatten()
                  for name, mod in find_linears(layer).items()]
        # Layer-wide mean, as OWL concatenates the scores of all the layer's linears.
        total = sum(float(s.double().sum()) for s in scores)
        count = sum(s.numel() for s in scores)
        thresh = m * total / count
        outliers = sum(int((s > thresh).sum()) for s in scores)
        ratios.append(outliers / count)
    return ratios


def owl_allocation(outlier: list[float], target: float, lam: float = DEFAULT_LAMBDA,
                   layer_weights: list[float] | None = None) -> list[float]:
    """Per-layer sparsity from outlier ratios: more outliers, less sparsity; within target +- lam.

    ``layer_weights`` (parameter counts) make the weighted mean exactly ``target``; by default layers weigh
    the same (true of LLaMA-style decoders). The centring is weighted, so the bound can be exceeded by a hair
    when layers differ in size; ratios are clipped into [0, 1) in that case.
    """
    n = len(outlier)
    weights = layer_weights or [1.0] * n
    lo, hi = min(outlier), max(outlier)
    if hi - lo <= 0:
        return [target] * n  # no signal: uniform
    scaled = [(o - lo) / (hi - lo) * 2 * lam for o in outlier]
    wmean = sum(w * s for w, s in zip(weights, scaled)) / sum(weights)
    ratios = [target - (s - wmean) for s in scaled]
    clipped = [min(max(r, 0.0), 0.999) for r in ratios]
    if clipped != ratios:
        logger.warning("OWL ratios clipped into [0, 1); lower --owl_lambda")
    return clipped


def owl_profile(model: nn.Module, act_sq_mean: dict[tuple[int, str], torch.Tensor], target: float,
                lam: float = DEFAULT_LAMBDA, m: float = DEFAULT_M, **profile_kw):
    """The OWL allocation as a profile whose pruned counts hit ``target`` exactly (as the search's do)."""
    from .search_space import module_shapes, realized_profile

    ratios = owl_allocation(outlier_ratios(model, act_sq_mean, m), target, lam)
    logger.info("OWL per-layer sparsity %s", " ".join(f"{r:.3f}" for r in ratios))
    profile = realized_profile(model, {u: ratios[u[0]] for u in module_shapes(model)}, target, **profile_kw)
    profile.meta.update({"allocation": "owl", "owl_lambda": lam, "owl_m": m})
    return profile
