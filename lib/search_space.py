"""The search space: settings, searched units, and the map from raw samples to feasible allocations.

Units
-----
The decoder linears are grouped into units: ``block`` (``num_blocks`` contiguous layer blocks), ``layer``,
``module`` (every linear of every layer) or ``block_module`` (a block of layers times a projection type:
q, k, v, o, gate, up, down). Every linear of a unit gets the unit's ratio.

Depth trends
------------
``trend`` searches a few numbers instead of one per unit: linear ``p`` of layer ``i`` at depth ``x`` in
[-1, 1] asks for ``target + slope * x + curve * (x**2 - 1/3) + offset[type of p]``, with one offset per
projection type (q, k, v, o, gate, up, down; ``trend_types=False``: none, per-layer units), every number in
``+-range``, mapped onto per-module levels (repair keeps the budget, so only the offsets' differences
matter). Searched profiles of real models share a shape (early layers less sparse, late ones more), and nine
numbers are learnt in far fewer evaluations than thirty or two hundred.
``trend_layer`` is coarse to fine: the trend for the first ``coarse_fraction`` of the evaluations, then
per-layer moves (in ``sparsity_step`` ratio steps, every linear of the layer alike) around the best trend so far
(its *center*, fixed once and kept in the study) within half the range: define-by-run, so one study, one
storage and resume hold both stages.

Levels measured in weights (feasible by construction)
-----------------------------------------------------
Each unit ``g`` of ``N_g`` weights gets an integer level ``l_g``; a level is the same number of weights in
every unit, ``q = step * min_g N_g``, so unit ``g``'s ratio is ``target + l_g * q / N_g`` (the smallest unit
moves by ``step``, larger ones by proportionally finer ratio steps). Levels are bounded so every ratio stays
within ``target +- range`` and inside ``[0, 0.99)``. The budget holds exactly when ``sum(l) == 0``: a raw
sample is repaired by moving every unit's ratio by the same amount (so the shape the sampler proposed is
kept), then stepping, one level at a time, the unit whose ratio is furthest out on the side of the remaining
excess back towards the target (always possible: a positive sum has a positive level). The repaired levels
are what is evaluated and recorded; a feasible point is its own image. A level switch (+1 on one unit, -1 on
another, as EvoPress moves) keeps the sum and so the budget.

Realized counts: pruning keeps ``int(cols * ratio)`` weights per row, so :func:`realize` turns nominal ratios
into per-module row counts whose total equals the target's count within half the smallest module's row
count, stored as per-module overrides so the pruned model, not only the profile, hits the target.

KV bits: each layer (or, with ``kv_separate``, each layer's keys and values) gets a priority in [0, 1] that
picks a wished-for level; levels are lowered from the lowest priority while the mean is over the budget, and
raised from the highest priority while a raise still fits.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .models import decoder_layers, find_linears
from .profile import Profile, block_layers
from .search_config import TREND_DEPTH_PARAMS, SearchConfig

MAX_RATIO = 0.99
Unit = tuple[int, str]  # (decoder layer, module name)


@dataclass
class Allocation:
    """One feasible point: per-unit nominal ratios, per-group levels, and per-layer KV bits."""

    unit_ratio: dict[Unit, float] = field(default_factory=dict)
    levels: list[int] = field(default_factory=list)
    key_bits: list[int] | None = None
    value_bits: list[int] | None = None

    def key(self) -> str:
        """Identity of the evaluated point (duplicates are detected by it)."""
        return json.dumps([self.levels, self.key_bits, self.value_bits])


def module_shapes(model: nn.Module) -> dict[Unit, tuple[int, int]]:
    """(rows, cols) of every prunable linear, by (layer, module name)."""
    return {(i, name): tuple(mod.weight.shape)
            for i, layer in enumerate(decoder_layers(model)) for name, mod in find_linears(layer).items()}


def projection_type(module_name: str) -> str:
    """``self_attn.q_proj`` -> ``q_proj``: what block_module units group by."""
    return module_name.rsplit(".", 1)[-1]


def make_groups(shapes: dict[Unit, tuple[int, int]], num_layers: int, granularity: str,
                num_blocks: int) -> tuple[list[str], list[list[Unit]]]:
    """Names and member modules of the searched units."""
    by_layer: dict[int, list[Unit]] = {}
    for unit in shapes:
        by_layer.setdefault(unit[0], []).append(unit)
    if granularity == "module":
        return [f"{i}-{n}" for i, n in shapes], [[u] for u in shapes]
    if granularity == "layer":
        return [f"layer{i}" for i in range(num_layers)], [by_layer[i] for i in range(num_layers)]
    blocks = block_layers(num_layers, num_blocks)
    if granularity == "block":
        return ([f"block{b}" for b in range(len(blocks))],
                [[u for i in layers for u in by_layer[i]] for layers in blocks])
    names, groups = [], []
    for b, layers in enumerate(blocks):
        kinds: dict[str, list[Unit]] = {}
        for i in layers:
            for u in by_layer[i]:
                kinds.setdefault(projection_type(u[1]), []).append(u)
        for kind, members in kinds.items():
            names.append(f"block{b}-{kind}")
            groups.append(members)
    return names, groups


class SearchSpace:
    """Maps Optuna's raw suggestions onto feasible allocations (see the module docstring)."""

    def __init__(self, cfg: SearchConfig, shapes: dict[Unit, tuple[int, int]], num_layers: int):
        self.cfg = cfg
        self.shapes = shapes
        self.num_layers = num_layers
        # A KV-only search has no sparsity units to group; per layer keeps the bookkeeping uniform.
        granularity = cfg.granularity if cfg.searches_sparsity else "layer"
        self.trend = granularity in ("trend", "trend_layer")
        if self.trend:
            granularity = "module" if cfg.trend_types else "layer"
        self.names, self.groups = make_groups(shapes, num_layers, granularity, cfg.num_blocks)
        self.weights = [sum(shapes[u][0] * shapes[u][1] for u in g) for g in self.groups]
        self.quantum = cfg.sparsity_step * min(self.weights)
        t = cfg.target
        lo_ratio, hi_ratio = max(0.0, t - cfg.sparsity_range), min(MAX_RATIO, t + cfg.sparsity_range)
        self.lo = [min(0, math.ceil((lo_ratio - t) * w / self.quantum - 1e-9)) for w in self.weights]
        self.hi = [max(0, math.floor((hi_ratio - t) * w / self.quantum + 1e-9)) for w in self.weights]
        self.kv_choices = sorted(set(cfg.kv_bits_choices))
        self.kv_budget = cfg.kv_budget
        self.kv_slots = (2 if cfg.kv_separate else 1) * num_layers
        self.center: list[int] | None = None  # trend_layer's refine stage: the levels it searches around
        self.unit_layer = [g[0][0] for g in self.groups]  # trends: every unit lies in one layer...
        self.unit_type = [projection_type(g[0][1]) for g in self.groups]  # ...and, per module, has one type
        self.types = list(dict.fromkeys(projection_type(u[1]) for u in shapes)) \
            if self.trend and cfg.trend_types else []

    def fingerprint(self) -> str:
        """Identifies the space and the model's module shapes, so a resumed or shared study with other
        settings or another model is refused instead of mixed."""
        shapes = hashlib.sha256(json.dumps(sorted((f"{i}-{n}", s) for (i, n), s in self.shapes.items()))
                                .encode()).hexdigest()[:12]
        desc = {"kind": self.cfg.kind, "target": round(self.cfg.target, 6), "groups": self.names,
                "levels": [self.lo, self.hi], "quantum": self.quantum, "shapes": shapes, "method": self.cfg.method,
                "kv": [self.kv_choices, self.kv_budget, self.cfg.kv_separate] if self.cfg.searches_kv else None,
                "mode": self.cfg.trial_mode, "objective": self.cfg.objective}
        if self.cfg.trial_stats != "dense":  # absent for the default: older studies keep their fingerprint
            desc["stats"] = self.cfg.trial_stats
        if self.trend:  # same units as "layer", other parameters: a study of one is not the other's
            desc["trend"] = [self.cfg.granularity, self.cfg.coarse_fraction, self.types]
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------ raw -> feasible
    def offset(self, g: int, level: int) -> float:
        return level * self.quantum / self.weights[g]

    def _clip(self, g: int, v: float) -> int:
        return min(max(int(round(v)), self.lo[g]), self.hi[g])

    def repair(self, raw: list[float]) -> list[int]:
        """Levels summing to zero (the exact budget): first every unit's ratio moves by the same amount (the
        sample's shape is kept), then the rounding remainder is taken from the most extreme units."""
        levels = [self._clip(g, v) for g, v in enumerate(raw)]
        excess = sum(levels)
        if excess == 0:
            return levels
        total = sum(self.weights)
        levels = [self._clip(g, v - excess * w / total) for g, (v, w) in enumerate(zip(levels, self.weights))]
        excess = sum(levels)
        if excess == 0:
            return levels
        sign = 1 if excess > 0 else -1
        # Max-heap of signed ratio offsets among the units on the excess side (ties: lower index first).
        heap = [(-sign * self.offset(g, v), g) for g, v in enumerate(levels) if sign * v > 0]
        heapq.heapify(heap)
        while excess != 0:
            _, g = heapq.heappop(heap)
            levels[g] -= sign
            excess -= sign
            if sign * levels[g] > 0:
                heapq.heappush(heap, (-sign * self.offset(g, levels[g]), g))
        return levels

    def trend_param_names(self) -> list[str]:
        return [*TREND_DEPTH_PARAMS, *(f"trend_{t}" for t in self.types)]

    def is_trend_trial(self, params: dict[str, Any]) -> bool:
        """Whether sampled parameters are a trend (trend_layer's coarse stage), not per-layer moves."""
        return self.trend and all(n in params for n in self.trend_param_names())

    def trend_levels(self, params: dict[str, float]) -> list[float]:
        """Raw per-unit levels of a trend (repair clips them and keeps the budget)."""
        n = self.num_layers
        xs = [2 * i / (n - 1) - 1 if n > 1 else 0.0 for i in range(n)]
        slope, curve = (params[k] for k in TREND_DEPTH_PARAMS)
        out = []
        for g, w in enumerate(self.weights):
            x = xs[self.unit_layer[g]]
            offset = params[f"trend_{self.unit_type[g]}"] if self.types else 0.0
            out.append((slope * x + curve * (x * x - 1 / 3) + offset) * w / self.quantum)
        return out

    def _step_levels(self, g: int) -> float:
        """Levels of unit ``g`` per refine step (one ``sparsity_step`` of its ratio)."""
        return self.cfg.sparsity_step * self.weights[g] / self.quantum

    def refine_bounds(self) -> tuple[list[int], list[int]]:
        """Bounds of the refine stage's per-layer moves from the center, in ratio steps: half the range, and
        every unit of the layer inside the space."""
        half = math.floor(self.cfg.sparsity_range / 2 / self.cfg.sparsity_step + 1e-9)
        lo, hi = [-half] * self.num_layers, [half] * self.num_layers
        for g, layer in enumerate(self.unit_layer):
            per = self._step_levels(g)
            lo[layer] = max(lo[layer], math.ceil((self.lo[g] - self.center[g]) / per - 1e-9))
            hi[layer] = min(hi[layer], math.floor((self.hi[g] - self.center[g]) / per + 1e-9))
        return lo, hi

    def set_center(self, levels: list[int]) -> None:
        self.center = self.repair(list(levels))

    def raw_levels(self, params: dict[str, Any]) -> list[float] | None:
        """The raw levels that sampled parameters ask for (before repair); None: no sparsity parameters."""
        if self.center is not None and all(n in params for n in self.refine_param_names()):
            moves = [params[n] for n in self.refine_param_names()]
            return [c + moves[self.unit_layer[g]] * self._step_levels(g) for g, c in enumerate(self.center)]
        if self.trend:
            return self.trend_levels(params) if self.is_trend_trial(params) else None
        if not all(n in params for n in self.param_names()):
            return None
        return [params[n] for n in self.param_names()]

    def ratios(self, levels: list[int]) -> list[float]:
        return [self.cfg.target + self.offset(g, v) for g, v in enumerate(levels)]

    def kv_from_priorities(self, prio: list[float]) -> list[int]:
        n = len(self.kv_choices)
        level = [min(int(p * n), n - 1) for p in prio]
        budget_total = self.kv_budget * len(level) + 1e-9
        total = sum(self.kv_choices[lv] for lv in level)
        order = sorted(range(len(prio)), key=lambda i: (prio[i], -i))  # lowest priority first
        for i in order:
            while total > budget_total and level[i] > 0:
                total += self.kv_choices[level[i] - 1] - self.kv_choices[level[i]]
                level[i] -= 1
        for i in reversed(order):  # highest priority first: spend what is left
            while level[i] < n - 1 and \
                    total - self.kv_choices[level[i]] + self.kv_choices[level[i] + 1] <= budget_total:
                total += self.kv_choices[level[i] + 1] - self.kv_choices[level[i]]
                level[i] += 1
        return [self.kv_choices[lv] for lv in level]

    def split_kv(self, bits: list[int] | None) -> tuple[list[int] | None, list[int] | None]:
        if bits is None:
            return None, None
        if self.cfg.kv_separate:
            return bits[: self.num_layers], bits[self.num_layers:]
        return list(bits), list(bits)

    def allocation(self, levels: list[int] | None, kv_bits: list[int] | None = None) -> Allocation:
        """The feasible allocation of per-group levels (raw or repaired: repair is idempotent); ``kv_bits``
        per KV slot (layers, or keys then values)."""
        levels = self.repair(levels) if levels is not None else [0] * len(self.groups)
        key_bits, value_bits = self.split_kv(kv_bits)
        alloc = Allocation(levels=levels, key_bits=key_bits, value_bits=value_bits)
        for g, ratio in enumerate(self.ratios(levels)):
            for u in self.groups[g]:
                alloc.unit_ratio[u] = ratio
        return alloc

    def param_names(self) -> list[str]:
        return [f"s_{name}" for name in self.names]

    def refine_param_names(self) -> list[str]:
        return [f"d_layer{i}" for i in range(self.num_layers)]

    def search_bounds(self) -> dict[str, tuple[int, int]]:
        """Integer parameters and their bounds (what level switches may move); trends have none."""
        if not self.cfg.searches_sparsity:
            return {}
        if self.center is not None:
            return dict(zip(self.refine_param_names(), zip(*self.refine_bounds())))
        return {} if self.trend else dict(zip(self.param_names(), zip(self.lo, self.hi)))

    def kv_param_names(self) -> list[str]:
        if self.cfg.kv_separate:
            return [f"kvk_{i}" for i in range(self.num_layers)] + [f"kvv_{i}" for i in range(self.num_layers)]
        return [f"kv_{i}" for i in range(self.num_layers)]

    def suggest(self, trial) -> Allocation:
        levels = kv_bits = None
        if self.cfg.searches_sparsity:
            r = self.cfg.sparsity_range
            if self.center is not None:
                params = {n: trial.suggest_int(n, lo, hi) for n, (lo, hi) in self.search_bounds().items()}
            elif self.trend:
                params = {n: trial.suggest_float(n, -r, r) for n in self.trend_param_names()}
            else:
                params = {n: trial.suggest_int(n, lo, hi) for n, lo, hi in zip(self.param_names(), self.lo, self.hi)}
            levels = self.raw_levels(params)
        if self.cfg.searches_kv:
            kv_bits = self.kv_from_priorities([trial.suggest_float(n, 0.0, 1.0) for n in self.kv_param_names()])
        return self.allocation(levels, kv_bits)

    def uniform_params(self) -> dict[str, Any]:
        """Raw parameters of the uniform allocation (trial 0, so the search never ends worse than uniform)."""
        params: dict[str, Any] = {}
        if self.cfg.searches_sparsity:
            params.update({n: 0 for n in (self.trend_param_names() if self.trend else self.param_names())})
        if self.cfg.searches_kv:
            # Every slot at the largest choice within the budget: uniform bits when the budget is a choice.
            within = [i for i, c in enumerate(self.kv_choices) if c <= self.kv_budget + 1e-9]
            prio = (max(within) + 0.5) / len(self.kv_choices)
            params.update({n: prio for n in self.kv_param_names()})
        return params

    def mean_sparsity(self, alloc: Allocation) -> float:
        total = sum(r * c for r, c in self.shapes.values())
        return sum(alloc.unit_ratio[u] * r * c for u, (r, c) in self.shapes.items()) / total

    def count_bounds(self) -> dict[Unit, tuple[int, int]]:
        """Per module, the fewest and most pruned columns per row any feasible trial can ask for (the
        realized count may move one column past the nominal one)."""
        bounds = {}
        for g, members in enumerate(self.groups):
            rmin, rmax = self.cfg.target + self.offset(g, self.lo[g]), self.cfg.target + self.offset(g, self.hi[g])
            for u in members:
                cols = self.shapes[u][1]
                bounds[u] = (max(0, int(cols * rmin) - 1), min(cols, int(cols * rmax) + 2))
        return bounds


# ----------------------------------------------------------------------------------------- realization
def realize(shapes: dict[Unit, tuple[int, int]], ratios: dict[Unit, float], target: float) -> dict[Unit, int]:
    """Per-row pruned counts per module whose total equals ``target`` of all weights as closely as the row
    granularity allows, each within one row-step of its nominal ``cols * ratio`` (rounded)."""
    k = {u: int(round(shapes[u][1] * ratios[u])) for u in shapes}
    goal = int(round(target * sum(r * c for r, c in shapes.values())))
    deficit = goal - sum(shapes[u][0] * k[u] for u in shapes)
    order = sorted(shapes, key=lambda u: (-shapes[u][0], u))  # big steps first, fine ones last
    changed = True
    while deficit and changed:
        changed = False
        for u in order:
            rows, cols = shapes[u]
            step = 1 if deficit > 0 else -1
            new = k[u] + step
            if abs(deficit - step * rows) < abs(deficit) and 0 <= new < cols \
                    and abs(new - cols * ratios[u]) <= 1.0 + 1e-9:
                k[u] = new
                deficit -= step * rows
                changed = True
    return k


def count_ratio(k: int, cols: int) -> float:
    """A short ratio that ``int(cols * ratio)`` maps back to exactly ``k``."""
    for digits in (3, 4, 5, 6):
        r = round(k / cols, digits)
        if int(cols * r) == k:
            return r
    return round((k + 0.5) / cols, 6)  # mid-step: safe from float round-off


def realized_sparsity(shapes: dict[Unit, tuple[int, int]], counts: dict[Unit, int]) -> float:
    return sum(shapes[u][0] * counts[u] for u in shapes) / sum(r * c for r, c in shapes.values())


def realized_profile(model: nn.Module, ratios: dict[Unit, float], target: float, **kw) -> Profile:
    """A profile whose per-module overrides prune exactly the realized counts (see :func:`realize`)."""
    shapes = module_shapes(model)
    counts = realize(shapes, ratios, target)
    num_layers = len(decoder_layers(model))
    per_layer = []
    for i in range(num_layers):
        units = [u for u in shapes if u[0] == i]
        numel = sum(shapes[u][0] * shapes[u][1] for u in units)
        per_layer.append(round(sum(ratios[u] * shapes[u][0] * shapes[u][1] for u in units) / numel, 6))
    module: dict[int, dict[str, float]] = {}
    for (i, name), kk in counts.items():
        cols = shapes[(i, name)][1]
        ratio = count_ratio(kk, cols)
        if ratio == per_layer[i] and abs(ratios[(i, name)] - per_layer[i]) < 1e-9:
            continue  # the layer ratio is this count's: no override, a readable profile
        # Every module's ratio is count_ratio(count): SparseGPT prunes the ratio itself (per block), so a layer
        # ratio that merely rounds to the same count would prune otherwise sequentially than its oneshot trials.
        module.setdefault(i, {})[name] = ratio
    prof = Profile(num_layers=num_layers, sparsity=per_layer, module_sparsity=module, target_sparsity=target, **kw)
    prof.meta["realized_sparsity"] = realized_sparsity(shapes, counts)
    return prof


def uniform_profile(model: nn.Module, target: float) -> Profile:
    """A search's uniform allocation as its trial 0 prunes it (:func:`realized_profile` of ``target`` everywhere)."""
    return realized_profile(model, {u: target for u in module_shapes(model)}, target)


def profile_counts(profile: Profile, shapes: dict[Unit, tuple[int, int]]) -> dict[Unit, int]:
    """Pruned columns per row that ``profile`` asks of each module (what prune_mask does with its ratio)."""
    return {u: int(shapes[u][1] * profile.ratio(*u)) for u in shapes}


def band_bytes_estimate(linear_params: int, sparsity_range: float) -> int:
    """What oneshot trials hold beside the model on its device (see :mod:`lib.oneshot`): per weight in the
    movable band (``2 * range`` of every row, plus a few columns) an int16 index, plus one bit per weight.
    (The dense copy they take values back from is in host memory.)"""
    band = min(1.0, 2 * sparsity_range + 0.01)
    return int(linear_params * (band * 2 + 0.125))
